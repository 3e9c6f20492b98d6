"""Paths that may be URLs (gs://...): local paths go through os, URLs through etils.epath.

This is the one module that tells a URL from a local path (`is_url`); the rest of gptjax reads
and writes files that may be either through it. A pod's hosts share a bucket: data files, the
token cache, the tokenizer and the run directory may live there. Files that a library can only
read or write on disk (a tokenizer's vocabulary, a model written in several files) go through a
local directory: `local_copy` for reading, `local_dir` for writing. Token streams are
memory-mapped, so a cache in a bucket is copied once to a host-local directory
(`host_cache_root`) and mapped from there.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from typing import IO, Iterator, Sequence

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


def open_binary(path: str) -> IO[bytes]:
    """A file opened for reading bytes (seekable), local or a URL."""
    return epath.Path(path).open("rb") if is_url(path) else open(path, "rb")


def read_text(path: str) -> str:
    if is_url(path):
        return epath.Path(path).read_text()
    with open(path) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Replace the file at `path` whole: a reader sees the old text or the new, never a part
    (a bucket's object is replaced by one write; a local file by a rename)."""
    if is_url(path):
        epath.Path(path).write_text(text)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_bytes(path: str) -> bytes:
    if is_url(path):
        return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    if is_url(path):
        epath.Path(path).write_bytes(data)
        return
    with open(path, "wb") as f:
        f.write(data)


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


def move_dir(src: str, dst: str) -> None:
    """Move a directory on disk, or every object under a URL prefix: each is copied, then all
    are deleted (a bucket has no directories to rename)."""
    if not is_url(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
        return
    from etils.epath import backend

    fs = backend.fsspec_backend.fs(src)
    prefix = src.split("://", 1)[1]
    for name in fs.find(prefix):
        fs.copy(name, dst + name[len(prefix):])
    fs.rm(prefix, recursive=True)


def upload_dir(local: str, directory: str, last: str | None = None) -> None:
    """Copy the files of the local directory `local` into `directory`; the file named `last`
    is written after all others, so that a reader who sees it sees a complete directory."""
    makedirs(directory)
    for name in sorted(os.listdir(local), key=lambda n: n == last):
        copy_file(os.path.join(local, name), join(directory, name))


@contextlib.contextmanager
def local_dir(directory: str, last: str | None = None) -> Iterator[str]:
    """A local directory to write `directory`'s files into: `directory` itself (created), or for
    a URL a temporary one whose files are uploaded (`upload_dir`, `last` last) when the block
    ends without an error."""
    if not is_url(directory):
        os.makedirs(directory, exist_ok=True)
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="gptjax-") as local:
        yield local
        upload_dir(local, directory, last)


@contextlib.contextmanager
def local_copy(directory: str, names: Sequence[str]) -> Iterator[str]:
    """A local directory holding the files `names` of `directory`: itself when it is local, else
    a temporary copy, removed when the block ends."""
    if not is_url(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="gptjax-") as local:
        for name in names:
            copy_file(join(directory, name), os.path.join(local, name))
        yield local


def host_cache_root() -> str:
    """Host-local directory for copies of token caches kept in a bucket ($XDG_CACHE_HOME/gptjax/data)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gptjax", "data")
