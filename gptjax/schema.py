"""The schema of a run's config: one frozen dataclass per section, holding its fields, their
defaults and their validation (`schema()`); the base config built from those defaults
(`base_config()`); and a config checked and parsed once into them (`sections()`), and back
(`to_config`). Loading config files and command-line overrides is `gptjax.config`'s; the rest of
gptjax reads only these dataclasses.

The model section's schema is `gptjax.model.config.GPTConfig` (beside the model it describes).
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Mapping, TypeVar

import ml_collections

from gptjax.errors import UserError
from gptjax.model.config import GPTConfig
from gptjax.source_syntax import parse_source

ConfigDict = ml_collections.ConfigDict

SCHEDULES = ("cosine", "linear", "constant")  # optim.schedule
HIDDEN_OPTIMIZERS = ("adamw", "muon")  # optim.hidden
LONG_EXAMPLES = ("truncate", "drop")  # what becomes of a pairs example longer than a row (data.long_examples)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TopConfig:
    """The config's top-level fields."""

    seed: int = 0  # parameter initialisation, dropout and the batches drawn
    # '' trains from scratch; 'hf:/path/to/dir' starts from a Hugging Face GPT-2 or Llama
    # directory (model shape, architecture and tokenizer come from it).
    init_from: str = ""

    def __post_init__(self) -> None:
        kind, _, path = self.init_from.partition(":")
        if self.init_from and (kind != "hf" or not path):
            raise UserError("init_from must be '' or 'hf:/path/to/hf-dir' (a GPT-2 or Llama directory), "
                            f"got {self.init_from!r}")

    @property
    def init_dir(self) -> str:
        """The directory of `init_from=hf:DIR` (a local path or a gs:// URL); '' without one."""
        return self.init_from.partition(":")[2]


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """`config.tokenizer`: the SentencePiece model a run trains when its workdir has none."""

    vocab_size: int = 2048
    model_type: str = "bpe"  # 'bpe' or 'unigram'
    max_chars: int = 10_000_000  # characters sampled from the training text to train it
    # A given tokenizer instead of a trained one: a Hugging Face tokenizer.json (GPT-2's, say), a
    # directory holding one, or a SentencePiece .model file. '' trains one (the fields above).
    path: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """`config.train`: the loop's length, batch, and how often it evaluates, logs and saves."""

    steps: int = 1000
    batch_size: int = 16  # global batch (sequences per optimizer step)
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per step; batch_size must be divisible by it
    eval_every: int = 250
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 250
    keep_checkpoints: int = 3
    peak_tflops: float = 0.0  # per device, for MFU; 0: measured (CPU) or looked up (GPU/TPU)
    # Steps in a row whose loss or gradient is not finite (each one skipped) before the run
    # stops with an error, keeping its last good checkpoint.
    max_bad_steps: int = 5

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_every", "log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_batches < 0:
            raise UserError(f"train.eval_batches must be >= 0, got {self.eval_batches}")
        if self.peak_tflops < 0:
            raise UserError(f"train.peak_tflops must be >= 0 (0: measured or looked up), got {self.peak_tflops}")
        if self.batch_size % self.grad_accum:
            raise UserError(f"train.batch_size={self.batch_size} must be divisible by train.grad_accum={self.grad_accum}")

    @property
    def micro_batch(self) -> int:
        """Sequences per micro-batch (one forward and backward pass)."""
        return self.batch_size // self.grad_accum


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """`config.mesh`: device mesh axis sizes; one may be -1 for "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`config.data`: where the documents come from and how they are held out."""

    source: str = "stdlib"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    tfds_split: str = "train"
    tfds_val_split: str = ""  # '' holds out val_fraction of tfds_split; else this split is validation
    tfds_feature: str = "text"
    tfds_data_dir: str = ""
    val_fraction: float = 0.02
    cache_dir: str = ""  # '' means <workdir>/data; shared by a pod's hosts like the workdir (may be gs://)
    host_wait_s: float = 600.0  # how long other hosts wait without a sign of progress from host 0's preparation
    # pairs: sources. Rows hold whole examples with segment ids, so that an example attends only to
    # itself: several packed into each row, or (False) one per row, padded.
    packing: bool = True
    long_examples: str = "truncate"  # an example longer than seq_len+1 tokens: 'truncate' (its prompt, from the left) or 'drop'
    # Plain-text sources: a token attends only within its document (split at end-of-text) and positions restart.
    document_mask: bool = False
    workers: int = 0  # processes that read and encode the data (0: every core this process may use)
    # hf:NAME[/CONFIG] sources (Hugging Face datasets; the column is text_field)
    hf_split: str = "train"
    hf_val_split: str = ""  # '' holds out val_fraction of hf_split; else this split is validation
    hf_streaming: bool = False  # read a Hub dataset as a stream instead of downloading it first
    hf_max_docs: int = 0  # read at most this many rows of each split (0: all)
    hf_max_chars: int = 0  # stop a split after this many characters (0: all)

    def __post_init__(self) -> None:
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not float(self.host_wait_s) > 0:
            raise UserError(f"data.host_wait_s must be a positive number of seconds, got {self.host_wait_s}")
        if self.long_examples not in LONG_EXAMPLES:
            raise UserError(f"data.long_examples must be one of {list(LONG_EXAMPLES)}, got {self.long_examples!r}")
        for name in ("workers", "hf_max_docs", "hf_max_chars"):
            if int(getattr(self, name)) < 0:
                raise UserError(f"data.{name} must be >= 0 (0: {'every core' if name == 'workers' else 'no limit'}), "
                                f"got {getattr(self, name)}")
        parse_source(self.source)  # its syntax; the sources themselves are read when the run is prepared


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """`config.optim`: the learning rate, its schedule, AdamW's settings and the per-parameter rules
    (see `gptjax.optim`)."""

    lr: float = 3e-3  # peak learning rate
    schedule: str = "cosine"  # 'cosine' | 'linear' | 'constant'
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # the final lr is min_lr_ratio * lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW); 0 turns it off everywhere
    grad_clip: float = 1.0  # global norm of the trainable gradients; 0 = off
    no_decay: str = "*bias,*ln_*,ln_f/*,wte/*,wpe/*"  # patterns without weight decay
    freeze: str = ""  # patterns of frozen parameters
    train_only: str = ""  # patterns of the only trainable parameters
    train_last_blocks: int = 0  # train only the last N blocks and ln_f (0 = off)
    layer_decay: float = 1.0  # per-block lr decay, in (0, 1]; 1 = off
    lr_rules: str = ""  # 'pattern=multiplier,...'; matching multipliers multiply
    # The optimizer of the hidden matrices (the kernels inside the blocks; see `gptjax.muon`):
    # 'adamw', or 'muon' (optax.contrib.muon) with its own peak lr (on the same schedule, so
    # the lr multipliers and warmup/decay apply to it too), Nesterov momentum and weight decay.
    # Everything else (embeddings, head, norms, biases) keeps AdamW with the fields above.
    hidden: str = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"optim.lr must be a positive number, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"optim.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("eps", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0.0:
                raise UserError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if self.train_last_blocks < 0:
            raise UserError(f"optim.train_last_blocks must be >= 0 (0 = off), got {self.train_last_blocks}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise UserError(f"optim.layer_decay must be in (0, 1] (1 = off), got {self.layer_decay}")
        if self.hidden not in HIDDEN_OPTIMIZERS:
            raise UserError(f"optim.hidden must be one of {list(HIDDEN_OPTIMIZERS)}, got {self.hidden!r}")
        if not (math.isfinite(self.muon_lr) and self.muon_lr > 0):
            raise UserError(f"optim.muon_lr must be a positive number, got {self.muon_lr}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise UserError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not self.muon_weight_decay >= 0.0:
            raise UserError(f"optim.muon_weight_decay must be >= 0, got {self.muon_weight_decay}")


WANDB_MODES = ("", "online", "offline", "disabled")  # wandb.mode; '' = W&B's own choice (WANDB_MODE, else online)


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """`config.wandb`: Weights & Biases as a metrics sink beside metrics.jsonl and TensorBoard
    (`gptjax.metrics`); off by default."""

    enabled: bool = False
    project: str = "gptjax"
    entity: str = ""  # the W&B team or user; '' = the logged-in user's default
    name: str = ""  # the run's display name; '' = the workdir's directory name
    mode: str = ""  # one of WANDB_MODES: 'offline' logs to local files only (`wandb sync` uploads them)

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise UserError(f"wandb.mode must be one of {list(WANDB_MODES)} ('' = W&B's default), got {self.mode!r}")
        if self.enabled and not self.project.strip():
            raise UserError("wandb.project must name a W&B project when wandb.enabled=True")


EVAL_TASK_KINDS = ("hellaswag", "bpb")  # eval.tasks


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`config.eval`: benchmarks evaluated beside the validation loss every train.eval_every
    steps and at the last step (see `gptjax.evaluate.tasks`)."""

    # Tasks separated by ';': 'hellaswag:PATH' (multiple choice on a HellaSwag-format jsonl
    # file: acc, acc_norm) or 'bpb:SOURCE' (bits per byte of a data.source's validation text,
    # e.g. 'bpb:files:data/wiki/*.txt'). '' evaluates none.
    tasks: str = ""
    max_items: int = 0  # multiple choice: the first N items of each file (0: all)
    batch_size: int = 32  # multiple choice: rows per forward pass (rounded up to the data-parallel size)
    bpb_batches: int = 0  # bpb: evaluation batches of train.micro_batch rows per source (0: train.eval_batches)

    def __post_init__(self) -> None:
        for name in ("max_items", "bpb_batches"):
            if getattr(self, name) < 0:
                raise UserError(f"eval.{name} must be >= 0 (0: the default), got {getattr(self, name)}")
        if self.batch_size < 1:
            raise UserError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        for kind, arg in self.task_list():
            if kind == "bpb":
                parse_source(arg, field=f"eval.tasks 'bpb:{arg}'")  # its syntax, once, as data.source's

    def task_list(self) -> list[tuple[str, str]]:
        """(kind, argument) of each task in eval.tasks."""
        out = []
        for term in (t.strip() for t in str(self.tasks).split(";")):
            if not term:
                continue
            kind, _, arg = term.partition(":")
            if kind.strip() not in EVAL_TASK_KINDS or not arg.strip():
                raise UserError(f"eval.tasks: bad task {term!r}; allowed: 'hellaswag:PATH.jsonl' or 'bpb:SOURCE' "
                                "(a data.source), separated by ';'")
            out.append((kind.strip(), arg.strip()))
        return out


# config.model.vocab_size = 0 means "the tokenizer's": a GPTConfig always holds the resolved
# size, so the field has no dataclass default and its config default lives here.
MODEL_VOCAB_FROM_TOKENIZER = 0


def parse(cls: type[T], fields: Mapping[str, Any], section: str) -> T:
    """`cls` from a section's fields (a ConfigDict or dict): unknown fields are refused, missing
    ones take their defaults."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(f"unknown {section} field(s) {unknown}; allowed: {sorted(known)}")
    return cls(**{k: fields[k] for k in fields})


@dataclasses.dataclass(frozen=True)
class Sections:
    """A config parsed once (`sections`): each section as its schema dataclass.

    `model` holds the model fields as given (vocab_size 0 means "the tokenizer's"): a GPTConfig
    needs the resolved size, which `gptjax.run.resolve` works out from the tokenizer or an
    imported checkpoint."""

    top: TopConfig
    model: Mapping[str, Any]
    tokenizer: TokenizerConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    mesh: MeshConfig
    wandb: WandbConfig = WandbConfig()


    eval: EvalConfig = EvalConfig()


def schema() -> dict[str, type]:
    """The dataclass of each config section: its fields, defaults and validation."""
    return {
        "model": GPTConfig,
        "tokenizer": TokenizerConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "train": TrainConfig,
        "mesh": MeshConfig,
        "eval": EvalConfig,
        "wandb": WandbConfig,
    }


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def base_config() -> ConfigDict:
    """Every field a run has, with its default (the built-in CPU demo), from `schema()`."""
    c = ConfigDict(_defaults(TopConfig))
    for name, cls in schema().items():
        c[name] = ConfigDict(_defaults(cls))
    c.model.vocab_size = MODEL_VOCAB_FROM_TOKENIZER
    return c


def sections(config: ConfigDict) -> Sections:
    """Check `config` against the schema (unknown fields, wrong types, invalid values) and parse
    every section once."""
    check_types(config)
    parsed = {name: parse(cls, config[name], name) for name, cls in schema().items() if name != "model"}
    top = parse(TopConfig, {k: v for k, v in config.items() if not isinstance(v, ConfigDict)}, "top-level")
    return Sections(top=top, model=types.MappingProxyType(config.model.to_dict()), **parsed)


def to_config(s: Sections) -> ConfigDict:
    """The ConfigDict of parsed sections: what a run saves as config.json."""
    c = ConfigDict(dataclasses.asdict(s.top))
    c.model = ConfigDict(dict(s.model))
    for name in ("tokenizer", "data", "optim", "train", "mesh", "eval", "wandb"):
        c[name] = ConfigDict(dataclasses.asdict(getattr(s, name)))
    return c


def field_names(node: Any) -> str:
    """The fields of a config section, for a message ('none' for a value)."""
    return ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else "none"


def check_types(config: ConfigDict, reference: ConfigDict | None = None, prefix: str = "") -> None:
    """Refuse fields a recipe added that the base config does not have, or of another type."""
    reference = base_config() if reference is None else reference
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in reference:
            raise UserError(f"unknown config field {name!r}; allowed here: {field_names(reference)}")
        ref = reference[key]
        if isinstance(ref, ConfigDict):
            if not isinstance(value, ConfigDict):
                raise UserError(f"config field {name!r} must be a section with fields {field_names(ref)}")
            check_types(value, ref, name + ".")
        elif isinstance(ref, float) and isinstance(value, int) and not isinstance(value, bool):
            continue
        elif type(value) is not type(ref):
            raise UserError(f"config field {name} expects a {type(ref).__name__}, got {value!r}")
