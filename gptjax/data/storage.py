"""Paths that may be URLs (gs://...): local paths go through os as before, URLs through etils.epath.

A pod's hosts share a bucket: data files, the token cache and the tokenizer may live there.
Token streams are memory-mapped, so a cache in a bucket is copied once to a host-local
directory (`host_cache_root`) and mapped from there.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from typing import IO

from etils import epath

COPY_CHUNK_BYTES = 16 << 20
_GLOB_CHARS = frozenset("*?[")


def is_url(path: str) -> bool:
    """Whether `path` names an object store location (gs://, s3://, ...) rather than a local file."""
    return "://" in str(path)


def join(base: str, *names: str) -> str:
    """`base`/name/...: posix joining, which is right for local paths and URLs alike."""
    return os.path.join(base, *names)


def exists(path: str) -> bool:
    return epath.Path(path).exists() if is_url(path) else os.path.exists(path)


def is_file(path: str) -> bool:
    return epath.Path(path).is_file() if is_url(path) else os.path.isfile(path)


def size(path: str) -> int:
    return int(epath.Path(path).stat().length) if is_url(path) else os.path.getsize(path)


def fingerprint(path: str) -> str:
    """What identifies a file's version: its absolute name, size and modification time."""
    if is_url(path):
        st = epath.Path(path).stat()
        return f"{path}\0{st.length}\0{st.mtime}"
    st = os.stat(path)
    return f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}"


def open_text(path: str, **kwargs) -> IO[str]:
    """`open(path, encoding=..., errors=..., newline=...)` for reading; `.buffer.tell()` counts bytes."""
    if not is_url(path):
        return open(path, **kwargs)
    return io.TextIOWrapper(epath.Path(path).open("rb"), **kwargs)


def read_text(path: str) -> str:
    if is_url(path):
        return epath.Path(path).read_text()
    with open(path) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    if is_url(path):
        epath.Path(path).write_text(text)
        return
    with open(path, "w") as f:
        f.write(text)


def makedirs(path: str) -> None:
    """Create a directory and its parents (nothing to do for a URL: object stores have no directories)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    """Delete a file if it is there."""
    if is_url(path):
        epath.Path(path).unlink(missing_ok=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def refresh(path: str) -> None:
    """Forget cached listings of object stores, so that files other hosts wrote since are seen
    (gcsfs answers `exists` from a directory listing it made earlier)."""
    if is_url(path) and "gcsfs" in sys.modules:
        from etils.epath import backend

        backend.fsspec_backend.fs(path).invalidate_cache()


def glob_files(pattern: str) -> list[str]:
    """Files matching a glob: `**` spans directories for local paths; a URL takes one level per `*`."""
    if not is_url(pattern):
        import glob

        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        return [os.path.normpath(p) for p in matches if os.path.isfile(p)]
    parts = pattern.split("/")
    first = next((i for i, p in enumerate(parts) if _GLOB_CHARS & set(p)), len(parts))
    if first == len(parts):
        return [pattern] if is_file(pattern) else []
    base, rest = "/".join(parts[:first]), "/".join(parts[first:])
    return [str(p) for p in epath.Path(base).glob(rest) if p.is_file()]


def copy_file(src: str, dst: str) -> None:
    """Copy one file between any two locations (local or URL), in chunks."""
    with (epath.Path(src).open("rb") if is_url(src) else open(src, "rb")) as f:
        with (epath.Path(dst).open("wb") if is_url(dst) else open(dst, "wb")) as g:
            shutil.copyfileobj(f, g, COPY_CHUNK_BYTES)


def host_cache_root() -> str:
    """Host-local directory for copies of token caches kept in a bucket ($XDG_CACHE_HOME/gptjax/data)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gptjax", "data")
