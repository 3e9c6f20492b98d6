"""Parameters for sampling, read straight from a local checkpoint's files when that is safe.

`python -m gptjax.sample` spends longer importing orbax and letting it restore a small model
than sampling a short text. A checkpoint's `params` item is, on disk, an OCDBT key-value store
of one zarr array per parameter (named by its path joined with dots) and a `_METADATA` file
that lists them; tensorstore, which orbax itself reads them with, opens those arrays directly.

Only the format this reader fully understands is read here: a local checkpoint, OCDBT, every
entry a dict key path to an array that orbax would restore. Anything else (a bucket, another
layout, a file that does not read) is left to `gptjax.checkpoint.restore_params`, which reads
with orbax and reports a damaged checkpoint in one line before falling back to an older one;
so what `load_for_inference` returns never differs from what orbax would, only how fast. That
module, and orbax with it, is imported only then; it does not import this one.

The run's config.json is read here too (`read_run_config`), since reading it needs no orbax.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from gptjax import storage
from gptjax.config import ConfigDict, from_json
from gptjax.layout import RunDir, find_run

_ARRAY_TYPES = ("jax.Array", "np.ndarray")
_DICT_KEY = 2  # orbax's KeyType.DICT


def load_for_inference(path: str, device: jax.Device | None = None) -> tuple[ConfigDict, Any]:
    """(config, params) of a run directory or one of its `checkpoints/<step>` directories, on one
    device (default: the default backend's first), whatever mesh the run was trained on.

    The direct read where it applies, else orbax (`gptjax.checkpoint.restore_params`). In a
    bucket, listings this process made earlier are forgotten first, so that checkpoints another
    process saved since are seen.
    """
    found = read_direct(path, device)
    if found is not None:
        return found
    from gptjax.checkpoint import restore_params  # orbax: only where the direct read does not apply

    storage.refresh(str(path))
    run_dir, step = find_run(str(path))
    config = read_run_config(run_dir)
    assert config is not None  # find_run found its config.json
    return config, restore_params(run_dir, step, device)


def read_direct(path: str, device: jax.Device | None = None) -> tuple[ConfigDict, Any] | None:
    """(config, params) read with tensorstore alone, or None where orbax must read them."""
    if storage.is_url(path):
        return None
    run_dir, step = find_run(str(path))
    if step is None:
        steps = run_dir.steps()
        if not steps:
            return None
        step = steps[-1]
    try:
        params = _read_params(os.path.join(run_dir.checkpoint(step), "params"))
        config = read_run_config(run_dir)
    except Exception:  # noqa: BLE001 - any surprise: orbax reads it, and reports real damage
        return None
    if params is None or config is None:
        return None
    return config, jax.device_put(params, device or jax.devices()[0])


def read_run_config(run_dir: RunDir) -> ConfigDict | None:
    """The run's saved config.json, or None where there is none (local or in a bucket)."""
    if not run_dir.exists():
        return None
    return from_json(storage.read_text(run_dir.config))


def _read_params(directory: str) -> dict[str, Any] | None:
    """The nested dict of numpy arrays in an orbax PyTree item, or None for a layout not handled."""
    import tensorstore as ts

    with open(os.path.join(directory, "_METADATA"), encoding="utf-8") as f:
        metadata = json.load(f)
    if metadata.get("use_ocdbt") is not True:
        return None
    driver = "zarr3" if metadata.get("use_zarr3") else "zarr"
    entries = []
    for entry in metadata["tree_metadata"].values():
        keys = entry["key_metadata"]
        value = entry["value_metadata"]
        if value.get("value_type") not in _ARRAY_TYPES or value.get("skip_deserialize"):
            return None
        if not keys or any(k.get("key_type") != _DICT_KEY for k in keys):
            return None
        entries.append(tuple(str(k["key"]) for k in keys))
    base = "file://" + os.path.abspath(directory) + "/"
    opened = [
        ts.open({"driver": driver, "kvstore": {"driver": "ocdbt", "base": base, "path": ".".join(keys)}}, open=True, read=True)
        for keys in entries
    ]
    reads = [o.result().read() for o in opened]
    tree: dict[str, Any] = {}
    for keys, r in zip(entries, reads):
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = np.asarray(r.result())
    return tree
