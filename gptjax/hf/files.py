"""What every Hugging Face format shares: reading config.json and safetensors weights (never a
pickle), mapping tensors to gptjax parameters through a format's layout, and writing a directory.

A directory may be local or a gs:// URL: weights in a bucket are copied to a temporary local
file one at a time (safetensors memory-maps a local file), and an export to a bucket is written
locally first and then uploaded.

A format (`gptjax.hf.gpt2`, `gptjax.hf.llama`) describes its tensors as a layout: Hugging Face
tensor name -> `Entry` (the gptjax parameter path, both shapes, and the maps between the two
arrays). `tensors_to_params` and `params_to_tensors` check every tensor against it, so a
config.json that disagrees with its weights is one clear line, never a wrong model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import tempfile
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from gptjax import storage
from gptjax.errors import UserError
from gptjax.model.config import GPTConfig
from gptjax.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor: its gptjax parameter `path`, its shape there (`hf_shape`) and
    here (`shape`), and the maps between the two (default: a reshape). With `slot` (axis, index)
    the tensor is one slice of the parameter (e.g. the keys of a fused key/value kernel): the
    parameter is the slices of its entries stacked along `axis` in index order."""

    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    to_params: Callable[[Array], Array] | None = None
    to_hf: Callable[[Array], Array] | None = None
    slot: tuple[int, int] | None = None

    def param(self, value: Array) -> Array:
        return value.reshape(self.shape) if self.to_params is None else self.to_params(value)

    def tensor(self, value: Array) -> Array:
        return value.reshape(self.hf_shape) if self.to_hf is None else self.to_hf(value)


Layout = Mapping[str, Entry]


def read_json(path: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(storage.read_text(path))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}); expected {what}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object; expected {what}")
    return data


def positive_int(hf: Mapping[str, Any], key: str, path: str) -> int:
    """hf[key], which must be a positive integer (a bool is not)."""
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: {key} must be a positive integer, got {value!r}")
    return value


def positive_float(hf: Mapping[str, Any], key: str, path: str) -> float:
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(f"{path}: {key} must be a positive number, got {value!r}")
    return float(value)


def weight_files(directory: str, what: str, model_class: str) -> list[str]:
    """The safetensors files of `directory`; a directory with only pickled weights is refused
    (`what` names the weights, `model_class` the transformers class that converts them)."""
    single = storage.join(directory, WEIGHTS_FILE)
    if storage.is_file(single):
        return [single]
    index_path = storage.join(directory, WEIGHTS_INDEX_FILE)
    if storage.is_file(index_path):
        weight_map = read_json(index_path, "a safetensors shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_path} has no 'weight_map' naming the shard files")
        files = [storage.join(directory, name) for name in sorted(set(weight_map.values()))]
        missing = [posixpath.basename(f) for f in files if not storage.is_file(f)]
        if missing:
            raise UserError(f"{index_path} names shard(s) missing from {directory}: {missing}")
        return files
    pickled = sorted(posixpath.basename(p) for pattern in _PICKLED
                     for p in storage.glob_files(storage.join(directory, pattern)))
    if pickled:
        raise UserError(
            f"{directory} holds PyTorch pickle weights ({', '.join(pickled)}) but no {WEIGHTS_FILE}; "
            "gptjax reads only safetensors, because loading a pickle can run arbitrary code. "
            "Convert once where transformers and torch are installed: "
            f"{model_class}.from_pretrained('{directory}').save_pretrained('{directory}', safe_serialization=True)"
        )
    raise UserError(f"{directory} has no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX_FILE}): no {what} weights to import")


def read_tensors(files: list[str], rename: Callable[[str], str | None]) -> dict[str, Array]:
    """Weights by `rename(key)` as fp32 numpy (keys it maps to None are buffers, skipped); nothing unpickled."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, Array] = {}
    for path in files:
        try:
            with _local_file(path) as local, safe_open(local, framework="np") as f:
                for key in f.keys():
                    name = rename(key)
                    if name is None:
                        continue
                    if name in tensors:
                        raise UserError(f"{path}: tensor {name!r} appears twice (under two names)")
                    tensors[name] = np.asarray(f.get_tensor(key), np.float32)
        except SafetensorError as e:
            raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    return tensors


@contextlib.contextmanager
def _local_file(path: str) -> Iterator[str]:
    """`path` itself, or for a URL a temporary local copy, removed afterwards."""
    if not storage.is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="gptjax-hf-") as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        storage.copy_file(path, local)
        yield local


def shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def tensors_to_params(tensors: Mapping[str, Array], layout: Layout, source: str, optional: frozenset[str] = frozenset()) -> dict:
    """gptjax parameters (nested dicts) from `tensors`, each checked against `layout`; tensors
    named in `optional` may be present without being in the layout (the caller checks them)."""
    missing = sorted(set(layout) - set(tensors), key=list(layout).index)
    if missing:
        first = missing[0]
        raise UserError(
            f"{source} lacks {len(missing)} tensor(s) that config.json implies, first {first!r} "
            f"(expected shape {shape_str(layout[first].hf_shape)}); config.json and the weights disagree"
        )
    extra = sorted(set(tensors) - set(layout) - optional)
    if extra:
        raise UserError(
            f"{source} has tensor(s) that config.json does not imply: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}; config.json and the weights disagree"
        )
    params: dict = {}
    slices: dict[tuple[str, ...], dict[int, Array]] = {}
    for name, entry in layout.items():
        value = tensors[name]
        if value.shape != entry.hf_shape:
            raise UserError(
                f"{source}: tensor {name!r} has shape {shape_str(value.shape)} but config.json implies "
                f"{shape_str(entry.hf_shape)}; config.json and the weights disagree"
            )
        if entry.slot is None:
            _set(params, entry.path, entry.param(value))
        else:
            slices.setdefault(entry.path, {})[entry.slot[1]] = entry.param(value)
    axes = {entry.path: entry.slot[0] for entry in layout.values() if entry.slot is not None}
    for path, parts in slices.items():
        _set(params, path, np.stack([parts[i] for i in sorted(parts)], axis=axes[path]))
    return params


def _set(tree: dict, path: tuple[str, ...], value: Array) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


EMBEDDING = ("wte", "embedding")


def params_to_tensors(params: Mapping[str, Any], layout: Layout, fields: Mapping[str, Any]) -> dict[str, Array]:
    """Contiguous fp32 tensors by Hugging Face name from gptjax parameters, checked against `layout`."""
    out: dict[str, Array] = {}
    for name, entry in layout.items():
        node: Any = params
        for part in entry.path:
            if not isinstance(node, Mapping) or part not in node:
                raise UserError(f"the parameters lack {'/'.join(entry.path)} (model shape {dict(fields)})")
            node = node[part]
        value, where = np.asarray(node, np.float32), "/".join(entry.path)
        if entry.slot is not None:
            axis, index = entry.slot
            if value.ndim <= axis or value.shape[axis] <= index:
                raise UserError(f"parameter {where} has shape {shape_str(value.shape)}: no index {index} on axis {axis}")
            value, where = np.take(value, index, axis=axis), f"{where}[axis {axis}, {index}]"
        if entry.path == EMBEDDING and value.shape == (GPTConfig.from_config(fields).padded_vocab, *entry.shape[1:]):
            value = value[: entry.shape[0]]  # padded rows (model.vocab_multiple) stay behind
        if value.shape != entry.shape:
            raise UserError(
                f"parameter {where} has shape {shape_str(value.shape)} but the model config implies {shape_str(entry.shape)}"
            )
        out[name] = np.ascontiguousarray(entry.tensor(value))
    return out


def absolute(directory: str) -> str:
    """A local path made absolute; a URL as given."""
    return directory.rstrip("/") if storage.is_url(directory) else os.path.abspath(os.path.expanduser(directory))


def require_new_dir(directory: str) -> str:
    """The absolute path (or URL) of `directory`, which must not exist or be empty (no stale
    files mix in)."""
    directory = absolute(directory)
    if storage.is_url(directory):
        taken = storage.exists(directory)  # a prefix exists while any object lies under it
    else:
        taken = os.path.exists(directory) and (not os.path.isdir(directory) or bool(os.listdir(directory)))
    if taken:
        raise UserError(f"{directory} already exists and is not an empty directory; choose a new output directory")
    return directory


def check_vocab(tokenizer: Tokenizer, vocab_size: int, context: str, owner: str) -> None:
    """The model's embedding must have a row for every id of the tokenizer; `context` starts
    the error line, `owner` says whose vocab_size it is ("config.json's", "the model's")."""
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"{context}the tokenizer has {tokenizer.vocab_size} tokens but {owner} vocab_size "
                        f"is {vocab_size}; the embedding has no row for the extra ids")


def write_dir(tensors: dict[str, Array], config: dict[str, Any], tokenizer: Tokenizer, directory: str) -> None:
    """Write config.json, model.safetensors (fp32), generation_config.json and the tokenizer's own
    files into the new or empty `directory` (local or a URL)."""
    directory = require_new_dir(directory)
    if storage.is_url(directory):
        with tempfile.TemporaryDirectory(prefix="gptjax-hf-") as local:
            _write_local(tensors, config, tokenizer, local)
            for name in sorted(os.listdir(local)):
                storage.copy_file(os.path.join(local, name), storage.join(directory, name))
        return
    os.makedirs(directory, exist_ok=True)
    _write_local(tensors, config, tokenizer, directory)


def _write_local(tensors: dict[str, Array], config: dict[str, Any], tokenizer: Tokenizer, directory: str) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, f, indent=2)
    tokenizer.save(directory)
