"""The schema of a GPT's shape and numerics (`config.model`), apart from the Flax modules.

The modules of `gptjax.model` are built from a `GPTConfig`. It imports no Flax, so that code
that only needs a model's shape (sampling with stored programs, the checkpoint tools, the
config schema) stays light.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from gptjax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION = ("xla", "dot_product", "splash")  # model.attention: the keys of gptjax.model.attention.IMPLEMENTATIONS
POSITIONS = ("learned", "rope")  # model.position
NORMS = ("layernorm", "rmsnorm")  # model.norm: the keys of gptjax.model.layers.NORMS
MLPS = ("gelu", "swiglu", "relu2")  # model.mlp: the keys of gptjax.model.mlp.MLPS
REMAT_POLICIES = ("nothing", "dots", "everything")  # model.remat_policy: what the backward pass finds saved
HEAD_LOSSES = ("xla", "kernel", "auto")  # model.head_loss (`gptjax.model.platform.resolve_head_loss`)
ATTENTION_AUTO = "auto"  # model.attention: the platform's fast path (`gptjax.model.attention.resolve_attention`)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The shape and numerics of a GPT: the schema of `config.model` (its defaults are the
    built-in CPU demo's). Built from a resolved `config.model` with `GPTConfig.from_config`;
    `vocab_size` has no default because a GPTConfig always holds the resolved size (the
    config's 0, "the tokenizer's", is resolved by `gptjax.run`)."""

    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_mlp: int = 0  # 0 means 4 * n_embd
    block_size: int = 128  # the longest context, and the number of learned positions
    dropout: float = 0.0
    ln_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype; parameters are always fp32
    remat: bool = False  # recompute each block's activations in the backward pass
    # What a block's backward pass finds saved (`jax.checkpoint` policies): "nothing" (recompute
    # the block from its input: `remat=True`), "dots" (the outputs of its projections and of
    # attention, tagged "matmul": only elementwise work is recomputed), "everything" (no
    # recomputation: `remat=False`). "" follows `remat`.
    remat_policy: str = ""
    attention: str = "xla"  # one of ATTENTION, or ATTENTION_AUTO
    # Full passes (training, evaluation) run the blocks as one scan over their stacked
    # parameters, so compile time does not grow with depth; decoding stays unrolled.
    scan_layers: bool = False
    # Architecture options; the defaults are GPT-2's. The parameters each one makes are listed
    # in `gptjax.model`'s docstring.
    position: str = "learned"  # one of POSITIONS
    rope_base: float = 10000.0
    norm: str = "layernorm"  # one of NORMS
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys
    mlp: str = "gelu"  # one of MLPS
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 means n_head
    tie_embeddings: bool = True  # the output head is `wte`; False: its own `lm_head`
    bias: bool = True  # biases in every projection and LayerNorm
    zero_init_proj: bool = False  # the projections into the residual stream start at zero
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)
    # The embedding (and tied head) has `padded_vocab` rows: vocab_size rounded up to a multiple
    # of this (e.g. 128: 50,257 -> 50,304, tiles an accelerator's matmul units evenly). The
    # padded rows are never in the loss, never sampled, and not exported to Hugging Face.
    vocab_multiple: int = 1
    # The dtype the MLP's hidden pre-activation (c_fc's output; SwiGLU's gate and up) is kept in,
    # and so saved for the backward pass; the activation itself is computed in fp32 from it.
    # "bfloat16" halves the HBM bytes of the block's largest activation (a numerics change:
    # the pre-activation is rounded to bf16; opt-in for the accelerator recipes).
    activation_dtype: str = "float32"
    # The most fp32 logits per chip the tied head's chunked cross entropy makes at once, in MiB
    # (`gptjax.loss.head_cross_entropy`); 0: the platform's default (64 on a CPU, 1024 on a TPU
    # or GPU). Larger chunks re-read the head's table and gradient accumulator fewer times.
    logits_chunk_mib: int = 0
    # How the head's cross entropy is computed: "xla" (`gptjax.loss`'s chunked einsums, whose
    # logits chunks go through HBM), "kernel" (Pallas kernels that keep each logits tile on
    # chip, `gptjax.model.head_kernel`: a TPU kernel, in Pallas interpret mode elsewhere, slow
    # there, refused on a GPU), "auto" (the kernel on a TPU, "xla" elsewhere).
    head_loss: str = "xla"
    # On a TPU slice, let the compiler run a sharded matmul and its all-gather or reduce-scatter
    # as a windowed einsum (collective matmul: the matmul in steps, each overlapping one hop of
    # the collective). False: one matmul and one collective. With fsdp, each window of a weight
    # gradient's matmul re-reads the whole activation, so False moves fewer HBM bytes (the
    # 124M recipe on v5e:2x2: 16% fewer per step; docs/tpu.md); the collective is then
    # overlapped only by the scheduler. No effect on a CPU or GPU, or without a mesh to shard on.
    collective_matmul: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model.n_head={self.n_head} must divide model.n_embd={self.n_embd} "
                f"(allowed: a head count that divides the width, e.g. {_divisors(self.n_embd)})"
            )
        if self.n_mlp < 0:
            raise UserError(f"model.n_mlp must be >= 0 (0 means 4 * n_embd), got {self.n_mlp}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in DTYPES:
            raise UserError(f"model.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.activation_dtype not in DTYPES:
            raise UserError(f"model.activation_dtype must be one of {sorted(DTYPES)}, got {self.activation_dtype!r}")
        if not isinstance(self.logits_chunk_mib, int) or isinstance(self.logits_chunk_mib, bool) or self.logits_chunk_mib < 0:
            raise UserError(f"model.logits_chunk_mib must be an integer >= 0 (0: the platform's default), got {self.logits_chunk_mib!r}")
        if self.attention not in (*ATTENTION, ATTENTION_AUTO):
            raise UserError(f"model.attention must be one of {[*ATTENTION, ATTENTION_AUTO]}, got {self.attention!r}")
        if not isinstance(self.vocab_multiple, int) or isinstance(self.vocab_multiple, bool) or self.vocab_multiple < 1:
            raise UserError(f"model.vocab_multiple must be a positive integer (1: no padding), got {self.vocab_multiple!r}")
        if self.remat_policy not in ("", *REMAT_POLICIES):
            raise UserError(
                f"model.remat_policy must be one of {list(REMAT_POLICIES)} or '' (follow model.remat), got {self.remat_policy!r}"
            )
        if not isinstance(self.scan_layers, bool):
            raise UserError(f"model.scan_layers must be true or false, got {self.scan_layers!r}")
        for name, allowed in (("position", POSITIONS), ("norm", NORMS), ("mlp", MLPS), ("head_loss", HEAD_LOSSES)):
            if getattr(self, name) not in allowed:
                raise UserError(f"model.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("qk_norm", "tie_embeddings", "bias", "zero_init_proj", "collective_matmul"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            raise UserError(
                f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} "
                f"(0 means n_head; allowed: {[d for d in _divisors(self.n_head) if self.n_head % d == 0]})"
            )
        if self.position == "rope" and (self.head_dim % 2 or not self.rope_base > 0):
            raise UserError(
                f"model.position='rope' needs an even head_dim (n_embd / n_head = {self.head_dim}) "
                f"and model.rope_base > 0 (got {self.rope_base})"
            )
        if not self.logit_softcap >= 0:
            raise UserError(f"model.logit_softcap must be >= 0 (0 means off), got {self.logit_softcap}")
        if self.attention not in ("xla", ATTENTION_AUTO) and self.dropout > 0:
            raise UserError(
                f"model.attention={self.attention!r} has no attention dropout; use model.dropout=0 or model.attention='xla'"
            )

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any]) -> "GPTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(model_cfg) - fields)
        if unknown:
            raise UserError(f"unknown model field(s) {unknown}; allowed: {sorted(fields)}")
        return cls(**{k: model_cfg[k] for k in model_cfg})

    @property
    def mlp_dim(self) -> int:
        """The MLP's hidden width: n_mlp, else 4 * n_embd (GELU, ReLU squared) or, for SwiGLU,
        Llama's default: 8/3 * n_embd rounded up to a multiple of 256."""
        if self.n_mlp:
            return self.n_mlp
        if self.mlp == "swiglu":
            return 256 * -(-int(8 * self.n_embd / 3) // 256)
        return 4 * self.n_embd

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when 0 (multi-head attention)."""
        return self.n_kv_head or self.n_head

    @property
    def saved(self) -> str:
        """The remat policy in force: `remat_policy`, else "nothing" with `remat`, else "everything"."""
        return self.remat_policy or ("nothing" if self.remat else "everything")

    @property
    def padded_vocab(self) -> int:
        """The embedding's rows: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    def num_params(self) -> int:
        """Parameter count (a tied output head counted once; padded vocabulary rows, which do no
        useful work, left out: MFU counts the real vocabulary's FLOPs)."""
        c, m, d, b = self.n_embd, self.mlp_dim, self.head_dim, int(self.bias)
        qkv = (self.n_head + 2 * self.kv_heads) * d
        norm = c * (1 + b * (self.norm == "layernorm"))
        attn = c * qkv + b * qkv + self.n_head * d * c + b * c + 2 * d * self.qk_norm
        mlp = 3 * c * m + b * (2 * m + c) if self.mlp == "swiglu" else 2 * c * m + b * (m + c)
        embeddings = self.vocab_size * c * (2 - self.tie_embeddings) + self.block_size * c * (self.position == "learned")
        return embeddings + self.n_layer * (2 * norm + attn + mlp) + norm

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B convention: 6 per
        matmul parameter (the head counts; the position table and an untied input table, which
        are looked up, do not) plus attention's 12 * layers * width * context."""
        lookups = self.block_size * self.n_embd * (self.position == "learned")
        lookups += self.vocab_size * self.n_embd * (not self.tie_embeddings)
        return 6.0 * (self.num_params() - lookups) + 12.0 * self.n_layer * self.n_embd * seq_len


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]
