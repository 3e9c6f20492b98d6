"""Run configuration: ml_collections ConfigDicts, loaded from a file and overridden from argv.

A config file is a Python file with `get_config() -> ConfigDict` (see configs/). Recipes start
from `base_config()` and change what they need, so every field exists in every run and a typo
on the command line is caught. Overrides look like `--config.optim.lr=3e-4` (or
`--config.optim.lr 3e-4`) and are converted to the type of the field they replace.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections

from gptjax.errors import UserError

ConfigDict = ml_collections.ConfigDict


def base_config() -> ConfigDict:
    """Every field a run has, with the built-in CPU demo's values."""
    c = ConfigDict()
    c.seed = 0
    # '' trains from scratch; 'hf:/path/to/gpt2' starts from a local Hugging Face GPT-2
    # directory (model shape and tokenizer come from it).
    c.init_from = ""

    c.model = ConfigDict(
        dict(
            vocab_size=0,  # 0: the tokenizer's vocabulary size
            n_layer=4,
            n_head=4,
            n_embd=128,
            n_mlp=0,  # 0: 4 * n_embd
            block_size=128,
            dropout=0.0,
            ln_eps=1e-5,
            dtype="float32",
            remat=False,
        )
    )
    c.tokenizer = ConfigDict(
        dict(
            vocab_size=2048,
            model_type="bpe",  # sentencepiece model type: 'bpe' or 'unigram'
            max_chars=10_000_000,  # characters sampled from the training text to train it
        )
    )
    c.data = ConfigDict(
        dict(
            # 'stdlib' | 'files:GLOB[,GLOB]' | 'tfds:NAME' | 'pairs:GLOB', or a weighted
            # mixture such as 'files:news/*.jsonl@3 + pairs:qa.jsonl@1'.
            source="stdlib",
            text_field="text",
            prompt_field="prompt",
            completion_field="completion",
            tfds_split="train",
            tfds_val_split="",  # '' holds out val_fraction of tfds_split; else this split validates
            tfds_feature="text",
            tfds_data_dir="",
            val_fraction=0.02,
            cache_dir="",  # tokenized streams; '' means <workdir>/data (a local path)
        )
    )
    c.optim = ConfigDict(
        dict(
            lr=3e-3,
            schedule="cosine",
            warmup_steps=50,
            min_lr_ratio=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            grad_clip=1.0,
            no_decay="*bias,*ln_*,ln_f/*,wte/*,wpe/*",
            freeze="",
            train_only="",
            train_last_blocks=0,
            layer_decay=1.0,
            lr_rules="",
        )
    )
    c.train = ConfigDict(
        dict(
            steps=1000,
            batch_size=16,  # global batch (sequences per optimizer step)
            seq_len=128,
            grad_accum=1,  # micro-batches per step; batch_size must be divisible by it
            eval_every=250,
            eval_batches=8,
            log_every=10,
            checkpoint_every=250,
            keep_checkpoints=3,
            peak_tflops=0.0,  # per device, for MFU; 0: measured (CPU) or looked up (GPU/TPU)
        )
    )
    # Mesh axis sizes; one may be -1 for "all remaining devices".
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return c


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
