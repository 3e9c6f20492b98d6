"""Run configuration: ml_collections ConfigDicts, loaded from a file and overridden from argv.

A config file is a Python file with `get_config() -> ConfigDict` (see configs/). Recipes start
from `base_config()` and change what they need, so every field exists in every run and a typo
on the command line is caught.

The schema of each section is a frozen dataclass (`schema()`: GPTConfig, OptimConfig,
DataConfig and the ones below) that holds the fields, their defaults and their validation;
`base_config()` is built from those defaults, and `section()` builds a dataclass back from a
ConfigDict. The ConfigDict is what files and the command line edit; the dataclasses are what
the code reads. Overrides look like `--config.optim.lr=3e-4` (or
`--config.optim.lr 3e-4`) and are converted to the type of the field they replace.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections

from gptjax.errors import UserError

ConfigDict = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class TopConfig:
    """The config's top-level fields."""

    seed: int = 0  # parameter initialisation, dropout and the batches drawn
    # '' trains from scratch; 'hf:/path/to/gpt2' starts from a local Hugging Face GPT-2
    # directory (model shape and tokenizer come from it).
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """`config.tokenizer`: the SentencePiece model a run trains when its workdir has none."""

    vocab_size: int = 2048
    model_type: str = "bpe"  # 'bpe' or 'unigram'
    max_chars: int = 10_000_000  # characters sampled from the training text to train it


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


# config.model.vocab_size = 0 means "the tokenizer's": a GPTConfig always holds the resolved
# size, so the field has no dataclass default and its config default lives here.
MODEL_VOCAB_FROM_TOKENIZER = 0


def schema() -> dict[str, type]:
    """The dataclass of each config section: its fields, defaults and validation."""
    from gptjax.data import DataConfig  # here: config files import this module, light
    from gptjax.model import GPTConfig
    from gptjax.optim import OptimConfig

    return {
        "model": GPTConfig,
        "tokenizer": TokenizerConfig,
        "data": DataConfig,
        "optim": OptimConfig,
        "train": TrainConfig,
        "mesh": MeshConfig,
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


def section(config: Any, name: str) -> Any:
    """The section `name` of `config` as its schema dataclass (validated); '' for the top level.

    `model` is built by `gptjax.run`, which resolves its vocabulary size first.
    """
    cls = TopConfig if not name else schema()[name]
    node = config if not name else config[name]
    return cls(**{f.name: node[f.name] for f in dataclasses.fields(cls) if f.name in node})


def load_config(path: str | None) -> ConfigDict:
    """The config from a file's `get_config()`, or `base_config()` when no path is given."""
    if not path:
        return base_config()
    if not os.path.isfile(path):
        raise UserError(f"config file {path!r} does not exist (give a .py file with get_config(), e.g. configs/default.py)")
    spec = importlib.util.spec_from_file_location(f"gptjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path!r} has no get_config() function")
    config = module.get_config()
    if not isinstance(config, ConfigDict):
        raise UserError(f"get_config() in {path!r} must return an ml_collections.ConfigDict")
    return config


def parse_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """Split `--config.a.b=v` / `--config.a.b v` arguments into (dotted name, raw value) pairs."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--config."):
            raise UserError(f"unrecognised argument {arg!r}; config fields are set as --config.section.field=value")
        name, eq, value = arg[len("--config.") :].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise UserError(f"--config.{name} needs a value (--config.{name}=VALUE)")
            i += 1
            value = argv[i]
        out.append((name, value))
        i += 1
    return out


def _convert(name: str, raw: str, current: Any) -> Any:
    """Convert a command-line string to the type of the field's current value."""
    kind = type(current).__name__
    try:
        if isinstance(current, bool):
            low = raw.strip().lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(current, int):
            value = ast.literal_eval(raw.strip().replace("_", ""))
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, str):
            return raw
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(raw)
            if not isinstance(value, (tuple, list)):
                raise ValueError
            return type(current)(value)
    except (ValueError, SyntaxError):
        pass
    else:
        raise UserError(f"config field {name} has type {kind}, which cannot be set from the command line")
    raise UserError(f"config field {name} expects a {kind} (like {current!r}), got {raw!r}")


def apply_overrides(config: ConfigDict, overrides: Sequence[tuple[str, str]]) -> ConfigDict:
    """Set each dotted field, refusing unknown fields and values of the wrong type."""
    for name, raw in overrides:
        *parents, leaf = name.split(".")
        node = config
        for j, part in enumerate(parents):
            if not isinstance(node, ConfigDict) or part not in node:
                where = ".".join(parents[:j]) or "the config"
                raise UserError(f"unknown config field {name!r}: no section {part!r} in {where} (allowed: {_keys(node)})")
            node = node[part]
        if not isinstance(node, ConfigDict) or leaf not in node:
            where = ".".join(parents) or "the config"
            raise UserError(f"unknown config field {name!r}; fields in {where}: {_keys(node)}")
        current = node[leaf]
        if isinstance(current, ConfigDict):
            raise UserError(f"config field {name!r} is a section; set one of its fields: {_keys(current)}")
        with node.unlocked():
            node[leaf] = _convert(name, raw, current)
    return config


def _keys(node: Any) -> str:
    return ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else "none"


def check_types(config: ConfigDict, reference: ConfigDict | None = None, prefix: str = "") -> None:
    """Refuse fields a recipe added that the base config does not have, or of another type."""
    reference = base_config() if reference is None else reference
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key not in reference:
            raise UserError(f"unknown config field {name!r}; allowed here: {_keys(reference)}")
        ref = reference[key]
        if isinstance(ref, ConfigDict):
            if not isinstance(value, ConfigDict):
                raise UserError(f"config field {name!r} must be a section with fields {_keys(ref)}")
            check_types(value, ref, name + ".")
        elif isinstance(ref, float) and isinstance(value, int) and not isinstance(value, bool):
            continue
        elif type(value) is not type(ref):
            raise UserError(f"config field {name} expects a {type(ref).__name__}, got {value!r}")


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ConfigDict:
    return ConfigDict(json.loads(text))
