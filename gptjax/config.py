"""Run configuration: ml_collections ConfigDicts, loaded from a file and overridden from argv,
then parsed once into typed sections.

A config file is a Python file with `get_config() -> ConfigDict` (see configs/). Recipes start
from `base_config()` and change what they need, so every field exists in every run and a typo
on the command line is caught.

The schema lives in `gptjax.schema` (re-exported here): each section's frozen dataclass with
its fields, defaults and validation (`schema()`: GPTConfig, TokenizerConfig, DataConfig,
OptimConfig, TrainConfig, MeshConfig, EvalConfig, WandbConfig), `base_config()` built from those
defaults, and `sections()`, which parses a config once into `Sections`; nothing after that
reads the ConfigDict (`gptjax.run.resolve` takes the sections; `to_config` turns them back into
the config.json a run saves). This module holds what edits a ConfigDict: the config file, and
overrides like `--config.optim.lr=3e-4` (or `--config.optim.lr 3e-4`), converted to the type of
the field they replace; and config.json's text.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any, Sequence


from gptjax.errors import UserError
from gptjax.schema import (  # noqa: F401  (the schema's classes and functions are part of this module's API)
    MODEL_VOCAB_FROM_TOKENIZER,
    ConfigDict,
    DataConfig,
    EvalConfig,
    MeshConfig,
    OptimConfig,
    Sections,
    TokenizerConfig,
    TopConfig,
    TrainConfig,
    WandbConfig,
    base_config,
    check_types,
    field_names,
    parse,
    schema,
    sections,
    to_config,
)


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
                raise UserError(f"unknown config field {name!r}: no section {part!r} in {where} (allowed: {field_names(node)})")
            node = node[part]
        if not isinstance(node, ConfigDict) or leaf not in node:
            where = ".".join(parents) or "the config"
            raise UserError(f"unknown config field {name!r}; fields in {where}: {field_names(node)}")
        current = node[leaf]
        if isinstance(current, ConfigDict):
            raise UserError(f"config field {name!r} is a section; set one of its fields: {field_names(current)}")
        with node.unlocked():
            node[leaf] = _convert(name, raw, current)
    return config


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ConfigDict:
    return ConfigDict(json.loads(text))
