"""GPT-2 in Flax linen, and its modern options: the model top to bottom.

Token and learned position embeddings, pre-LayerNorm blocks of causal multi-head
self-attention (`gptjax.model.attention`) and a tanh-GELU MLP (`gptjax.model.mlp`), a final
LayerNorm, and an output projection tied to the token embedding. The options of
`GPTConfig` swap pieces: rotary positions instead of the `wpe` table (applied inside the
attention), RMSNorm (`gptjax.model.layers.NORMS`), other MLPs (`gptjax.model.mlp.MLPS`),
fewer key/value heads, an untied head `lm_head`, no biases, soft-capped logits.
Parameters are fp32; the compute dtype (`model.dtype`)
is the dtype of every matmul's operands (and of the key/value cache), accumulated in fp32
(`gptjax.model.layers.matmul`); the residual stream, norms, softmax and activations stay fp32.
Every parameter carries logical axis names (see `gptjax.sharding` for the rules that map them
to mesh axes).

The same modules serve training and decoding: with `decode=True` each attention layer keeps a
key/value cache in the `cache` collection, writes the keys and values of the tokens it is
given at the cache's current index, and attends over everything written so far. Prefill
passes a whole (padded) prompt at once; decoding then passes one token per call. With
`decode_layout` every dense kernel is stored [out, in] (`gptjax.model.decode_layout`).

Array names carry their shapes (`x_BxTxC`): B batch, T tokens of this call, C embed, M mlp,
V vocabulary.

Parameter names follow Hugging Face's GPT-2 (`wte`, `wpe`, `h_{i}`, `ln_1`, `attn`, `c_attn`,
`c_proj`, `ln_2`, `mlp`, `c_fc`, `ln_f`) so that a reader can map the two by eye.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.model.attention import CausalSelfAttention
from gptjax.model.config import GPTConfig
from gptjax.model.layers import UntiedHead, head_logits, norm, normal, remat_policy
from gptjax.model.mlp import MLPS


class Block(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); positions reach the attention (for RoPE)."""

    cfg: GPTConfig
    decode_layout: bool = False

    @nn.compact
    def __call__(self, x_BxTxC: jax.Array, positions_BxT: jax.Array, token_mask: jax.Array | None,
                 segment_ids: jax.Array | None, deterministic: bool, decode: bool) -> jax.Array:
        cfg, layout = self.cfg, self.decode_layout
        attn = CausalSelfAttention(cfg, layout, name="attn")
        h_BxTxC = attn(norm(cfg, "ln_1")(x_BxTxC), positions_BxT, token_mask, segment_ids, deterministic, decode)
        x_BxTxC = x_BxTxC + h_BxTxC
        x_BxTxC = x_BxTxC + MLPS[cfg.mlp](cfg, layout, name="mlp")(norm(cfg, "ln_2")(x_BxTxC), deterministic)
        return nn.with_logical_constraint(x_BxTxC, ("batch", "seq", "act_embed"))


class GPT(nn.Module):
    """A GPT-2 language model: token ids [batch, seq] -> fp32 logits [batch, seq, vocab].

    decode_layout: every dense kernel is one [out, in] matrix, the layout the sampler decodes
    with on a CPU (`gptjax.model.decode_layout.to_decode_layout` makes such parameters).
    """

    cfg: GPTConfig
    decode_layout: bool = False

    @nn.compact
    def __call__(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array | None = None,
        token_mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array:
        """Logits for every position.

        positions_BxT: position ids (default 0..seq-1); in a packed row, each token's position
            within its example.
        token_mask: [batch, seq], False for padding; padded keys are never attended to.
        segment_ids: [batch, seq] int, the example of each token in a packed row: a token attends
            only to tokens of its own segment (training and evaluation; not with decode).
        decode: use and update the key/value cache (see the module docstring).
        return_hidden: return the final norm's output [batch, seq, n_embd] instead of the
            logits, for a loss that applies the head itself (`gptjax.loss.head_cross_entropy`
            over `gptjax.model.layers.head_table`).
        """
        cfg = self.cfg
        b, t = tokens_BxT.shape
        if decode and segment_ids is not None:
            raise ValueError("segment_ids are for full passes (training, evaluation), not for decoding")
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
        wte = nn.Embed(
            cfg.padded_vocab,
            cfg.n_embd,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            embedding_init=normal(0.02, ("vocab", "embed")),
            name="wte",
        )
        x_BxTxC = wte(tokens_BxT)
        if cfg.position == "learned":  # else rotary: the attention rotates q and k by position
            wpe = nn.Embed(
                cfg.block_size,
                cfg.n_embd,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                embedding_init=normal(0.01, ("pos", "embed")),
                name="wpe",
            )
            x_BxTxC = x_BxTxC + wpe(positions_BxT)
        x_BxTxC = nn.Dropout(cfg.dropout)(x_BxTxC, deterministic=deterministic)
        x_BxTxC = nn.with_logical_constraint(x_BxTxC, ("batch", "seq", "act_embed"))
        if cfg.scan_layers and not decode and not self.is_initializing():
            x_BxTxC = self._scan_blocks(x_BxTxC, positions_BxT, token_mask, segment_ids, deterministic)
        else:
            policy = remat_policy(cfg)
            block = Block if cfg.saved == "everything" else nn.remat(Block, static_argnums=(5, 6), policy=policy)
            for i in range(cfg.n_layer):
                x_BxTxC = block(cfg, self.decode_layout, name=f"h_{i}")(
                    x_BxTxC, positions_BxT, token_mask, segment_ids, deterministic, decode
                )
        x_BxTxC = norm(cfg, "ln_f")(x_BxTxC)
        # The head reads a [vocab, embed] table as stored: already the [out, in] layout.
        table_VxC = wte.embedding if cfg.tie_embeddings else UntiedHead(cfg, name="lm_head")()
        if return_hidden:
            return x_BxTxC.astype(cfg.compute_dtype)
        return head_logits(cfg, x_BxTxC, table_VxC)

    def _scan_blocks(self, x_BxTxC: jax.Array, positions_BxT: jax.Array, token_mask: jax.Array | None,
                     segment_ids: jax.Array | None, deterministic: bool) -> jax.Array:
        """The blocks of a full pass as one `jax.lax.scan` (`model.scan_layers`).

        The parameters stay one subtree per layer (`h_{i}`, as `init` makes them), so
        checkpoints, Hugging Face conversion, per-layer optimizer rules and the sampler read
        the same tree; here they are stacked on a leading layer axis (one copy of the block
        parameters per pass, split like each layer's by the mesh rules) and the scan body
        applies one `Block` to one layer's slice. Dropout draws a key per layer from this
        module's `dropout` stream. The body is rematerialized as `model.remat_policy` says.
        """
        cfg = self.cfg
        block = Block(cfg, self.decode_layout, parent=None)
        params = self.variables["params"]
        layers = [nn.meta.unbox(params[f"h_{i}"]) for i in range(cfg.n_layer)]
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
        x_spec = jax.ShapeDtypeStruct(x_BxTxC.shape, x_BxTxC.dtype)
        p_spec = jax.ShapeDtypeStruct(positions_BxT.shape, positions_BxT.dtype)
        boxed = jax.eval_shape(
            lambda x, p: block.init(jax.random.PRNGKey(0), x, p, None, None, True, False), x_spec, p_spec
        )
        names = nn.get_partition_spec(boxed["params"])

        def constrain(tree: Any, lead: tuple[None, ...]) -> Any:
            def one(x: jax.Array, spec: Any) -> jax.Array:
                if len(spec) + len(lead) != x.ndim:  # a kernel without logical names (decode layout)
                    return x
                return nn.with_logical_constraint(x, (*lead, *spec))

            return jax.tree_util.tree_map(one, tree, names)

        stacked = constrain(stacked, (None,))
        keys = None if deterministic else jax.random.split(self.make_rng("dropout"), cfg.n_layer)

        def body(x_BxTxC: jax.Array, layer: tuple[Any, jax.Array | None]) -> tuple[jax.Array, None]:
            layer_params, key = layer
            rngs = None if key is None else {"dropout": key}
            x_BxTxC = block.apply({"params": constrain(layer_params, ())}, x_BxTxC, positions_BxT, token_mask,
                                  segment_ids, deterministic, False, rngs=rngs)
            return x_BxTxC, None

        if cfg.saved != "everything":
            body = jax.checkpoint(body, prevent_cse=False, policy=remat_policy(cfg))
        x_BxTxC, _ = jax.lax.scan(body, x_BxTxC, (stacked, keys))
        return x_BxTxC


def init_params(cfg: GPTConfig, rng: jax.Array) -> Any:
    """Unboxed fp32 parameters (no sharding; `gptjax.state.init_boxed_params` keeps the logical axis names for sharding)."""
    variables = GPT(cfg).init(rng, jnp.zeros((1, min(8, cfg.block_size)), jnp.int32))
    return nn.meta.unbox(variables["params"])

