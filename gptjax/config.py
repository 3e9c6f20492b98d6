"""Run configuration: ml_collections ConfigDicts, loaded from a file and overridden from argv,
then parsed once into typed sections.

A config file is a Python file with `get_config() -> ConfigDict` (see configs/). Recipes start
from `base_config()` and change what they need, so every field exists in every run and a typo
on the command line is caught.

Each section's schema is a frozen dataclass that holds its fields, defaults and validation
(`schema()`: GPTConfig, TokenizerConfig, DataConfig, OptimConfig, TrainConfig, MeshConfig,
EvalConfig);
`base_config()` is built from those defaults. The ConfigDict is what files and the command line
edit; `sections()` parses it once into `Sections`, and nothing after that reads the ConfigDict
(`gptjax.run.resolve` takes the sections; `to_config` turns them back into the config.json a
run saves). Overrides look like `--config.optim.lr=3e-4` (or `--config.optim.lr 3e-4`) and are
converted to the type of the field they replace.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import types
from typing import Any, Sequence

import ml_collections

from gptjax.errors import UserError
from gptjax.model.config import GPTConfig
from gptjax.schema import (  # noqa: F401  (the section classes are part of this module's API)
    MODEL_VOCAB_FROM_TOKENIZER,
    DataConfig,
    EvalConfig,
    MeshConfig,
    OptimConfig,
    Sections,
    TokenizerConfig,
    TopConfig,
    TrainConfig,
    WandbConfig,
    parse,
)

ConfigDict = ml_collections.ConfigDict


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
