"""The sampler's compiled programs, kept on disk so that a new process samples at once.

JAX's persistent compilation cache finds a program by its lowered module, so every new process
still traces the model and lowers it before it can look the executable up: for the 1M-parameter
default model that is about 1.4 s, most of a short `python -m gptjax.sample` run, and a second
run was no faster than the first. Here a program is found instead by what selects it: its
name, its static settings (model config, cache length, which filters), the arguments' shapes,
dtypes and device, the JAX, jaxlib and Flax versions, the backend, XLA_FLAGS, and a digest of
the source files that define the sampler. The executable is stored serialized
(`jax.experimental.serialize_executable`) and loaded back without tracing, lowering or
compiling.

The files live in `<jax_compilation_cache_dir>/gptjax-sampler` when JAX's cache directory is
set (`python -m gptjax.sample` sets it; see `gptjax.runtime.enable_compilation_cache`), next to
the executables JAX itself caches there, with the same trust: loading an executable runs code,
so the directory must be one only you write to. Without a cache directory programs are kept in
memory only. A missing, unreadable or stale file means compiling and writing it again; a failed
write is ignored (the cache only saves time). Programs whose arguments span several devices (a
model loaded onto a mesh) are compiled by `jax.jit` as usual.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tempfile
from typing import Any, Callable

import jax
from jax.experimental import serialize_executable

_SOURCES = ("model", "sampling")  # the packages whose source defines the sampler's programs
_loaded: dict[str, Any] = {}


@functools.lru_cache(maxsize=1)
def _environment() -> str:
    """What else a compiled program depends on: versions, XLA flags, and the sampler's source."""
    import importlib.metadata

    import jaxlib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for package in _SOURCES:
        for name in sorted(n for n in os.listdir(os.path.join(root, package)) if n.endswith(".py")):
            with open(os.path.join(root, package, name), "rb") as f:
                digest.update(f.read())
    return repr((jax.__version__, jaxlib.__version__, importlib.metadata.version("flax"), os.environ.get("XLA_FLAGS", ""), digest.hexdigest()))


def _describe(x: Any) -> tuple[Any, ...]:
    if isinstance(x, jax.Array):
        return (x.shape, str(x.dtype), x.aval.weak_type, repr(x.sharding))
    return (getattr(x, "shape", ()), str(getattr(x, "dtype", type(x).__name__)))


def _one_device(leaves: list[Any]) -> jax.Device | None:
    """The single device every array argument is on (None if they span several)."""
    devices = {d for x in leaves if isinstance(x, jax.Array) for d in x.sharding.device_set}
    if len(devices) > 1:
        return None
    return devices.pop() if devices else jax.devices()[0]


def _directory() -> str | None:
    base = jax.config.jax_compilation_cache_dir
    return os.path.join(os.path.expanduser(base), "gptjax-sampler") if base else None


def call(name: str, lower: Callable[[], Any], static: Any, args: tuple[Any, ...]) -> Any:
    """Run program `name` on `args` (its dynamic arguments), compiling it with `lower()` (a
    `jax.stages.Lowered` of the same call) only when neither memory nor disk holds it.

    `static` is everything besides the arguments that selects the program (its static
    arguments); it enters the key through its repr, so it must be a value with a faithful one.
    """
    leaves, in_tree = jax.tree_util.tree_flatten((args, {}))
    device = _one_device(leaves)
    key_text = repr((name, static, str(in_tree), [_describe(x) for x in leaves], _environment(), _platform(device)))
    key = hashlib.sha256(key_text.encode()).hexdigest()
    program = _loaded.get(key)
    if program is None:
        directory = _directory() if device is not None else None
        path = os.path.join(directory, f"{name}-{key}.bin") if directory else None
        program = _read(path, device) if path else None
        if program is None:
            program = _compile(lower) if path else lower().compile()
            if path:
                _write(path, program)
        _loaded[key] = program
    return program(*args)


def _compile(lower: Callable[[], Any]) -> Any:
    """Compile with JAX's own persistent cache off: an executable JAX loaded from that cache
    serializes without some of its kernels (a later process fails with "Function ... not
    found"), so only a freshly compiled one is stored."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return lower().compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)


def _platform(device: jax.Device | None) -> tuple[str, ...]:
    if device is None:
        return ("several devices",)
    return (device.platform, device.device_kind, str(device.id), device.client.platform_version)


def _read(path: str, device: jax.Device) -> Any:
    """The program stored at `path`, or None if it is missing or cannot be loaded."""
    try:
        with open(path, "rb") as f:
            payload, in_tree, out_tree = pickle.load(f)
        return serialize_executable.deserialize_and_load(
            payload, in_tree, out_tree, backend=device.client, execution_devices=[device]
        )
    except Exception:  # missing, truncated, or from another build: compile again
        return None


def _write(path: str, program: Any) -> None:
    """Store `program` at `path` atomically; give up quietly if it cannot be serialized or written."""
    tmp = None
    try:
        blob = pickle.dumps(serialize_executable.serialize(program))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except Exception:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
