"""A local Google Cloud Storage for tests: gs://BUCKET/... works with no network and no credentials.

`gcs_bucket` (a pytest fixture: import it into a test module) starts gcp-storage-emulator in a
subprocess on 127.0.0.1 (not 'localhost': IPv6 ::1 is refused) and points gcsfs (etils.epath's
gs:// backend) and tensorstore at it. A subprocess, because the emulator's single-threaded
server dies in-process when a client hangs up early and pytest has closed the stderr it
reports to.

The subprocess runs this file (`serve`), which adds to the emulator what tensorstore's gcs
driver relies on and the emulator lacks (orbax writes arrays through that driver into an OCDBT
database, whose manifest each writer replaces by a conditional write):

- the generation preconditions `ifGenerationMatch` and `ifGenerationNotMatch` on reads,
  uploads and deletes (GCS answers 412, or 304 to a read);
- the `x-goog-generation` header on downloads: without it tensorstore takes the manifest's
  generation to be 0 and refuses its next conditional write ("Malformed StorageGeneration");
- `startOffset` and `endOffset` in listings: tensorstore's DeleteRange lists by them alone,
  so a listing that ignored them would have it delete the whole bucket.

`emulator_env` lists the settings that keep clients anonymous and instant: without them gcsfs
asks Google's storage-control service over gRPC for the bucket's layout and retries for 60 s,
and google-auth probes the GCE metadata server. Subprocesses inherit the settings through
os.environ.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from http import HTTPStatus
from typing import Any, Callable, Iterator

import pytest

BUCKET = "gptjax-test"


def emulator_env(url: str) -> dict[str, str]:
    """Environment that sends gcsfs and tensorstore to the emulator at `url`, anonymously."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs kvstore (orbax's array writer)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: a fixed token, no credential search
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # google-cloud-cpp: array_record's reader (TFDS data_source)
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential search
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-layout gRPC call to Google
        "NO_GCE_CHECK": "true",  # gcsfs: no GCE metadata credentials
        "GCE_METADATA_HOST": "127.0.0.1:1",  # google-auth: a metadata server that refuses at once
        "GCE_METADATA_IP": "127.0.0.1:1",
        "GCE_METADATA_ROOT": "127.0.0.1:1",  # tensorstore's metadata server
    }


Handler = Callable[..., Any]  # gcp-storage-emulator's handler(request, response, storage)


def _live_generation(storage: Any, bucket: str, name: str) -> int:
    """The object's generation; 0 when there is none (GCS's `ifGenerationMatch=0`: "absent")."""
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0


def _failed_precondition(query: dict[str, list[str]], live: int, read: bool) -> HTTPStatus | None:
    """The status GCS answers when the request's generation preconditions do not hold."""
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"][0]) != live:
        return HTTPStatus.PRECONDITION_FAILED
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"][0]) == live:
        return HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
    return None


def _object_name(request: Any) -> str:
    return request.params["object_id"]


def _upload_name(request: Any) -> str | None:
    """The object an upload writes; None for a later chunk of a resumable upload (its
    preconditions were checked when it began)."""
    if "upload_id" in request.query:
        return None
    if "name" in request.query:
        return request.query["name"][0]
    if request.query.get("uploadType") == ["multipart"]:
        return request.data["meta"].get("name")
    return (request.data or {}).get("name")


def _conditional(handler: Handler, name_of: Callable[[Any], str | None], read: bool) -> Handler:
    """`handler`, run only when the request's generation preconditions hold."""
    def handle(request, response, storage, *args, **kwargs):
        name = name_of(request)
        if name is not None:
            failed = _failed_precondition(request.query, _live_generation(storage, request.params["bucket_name"], name),
                                          read)
            if failed is not None:
                response.status = failed
                return None
        return handler(request, response, storage, *args, **kwargs)
    return handle


def _with_generation_headers(download: Handler) -> Handler:
    """`download`, answering with the object's generation in headers as GCS does."""
    def handle(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]
    return handle


def _with_offsets(ls: Handler) -> Handler:
    """`ls`, keeping only names in [startOffset, endOffset) as GCS does."""
    def handle(request, response, storage, *args, **kwargs):
        ls(request, response, storage, *args, **kwargs)
        start, end = request.query.get("startOffset", [""])[0], request.query.get("endOffset", [None])[0]
        if response.status == HTTPStatus.OK and (start or end):
            inside = lambda name: start <= name and (end is None or name < end)
            listing = json.loads(response._content)
            listing["items"] = [o for o in listing["items"] if inside(o["name"])]
            listing["prefixes"] = [p for p in listing["prefixes"] if inside(p)]
            response.json(listing)
    return handle


def serve(port: int) -> None:
    """Serve an empty in-memory bucket named BUCKET on 127.0.0.1:`port` until killed, with
    the additions the module docstring lists."""
    import logging

    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    logging.getLogger().setLevel(logging.CRITICAL)
    download = _with_generation_headers(objects.download)
    replaced = {
        objects.get: _conditional(objects.get, _object_name, read=True),
        objects.download: _conditional(download, _object_name, read=True),
        objects.delete: _conditional(objects.delete, _object_name, read=False),
        objects.insert: _conditional(objects.insert, _upload_name, read=False),
        objects.ls: _with_offsets(objects.ls),
    }
    objects.download = download  # what objects.get answers ?alt=media with
    objects.insert = replaced[objects.insert]  # the router's fallback for uploads outside /upload
    for _, methods in server.HANDLERS:
        for method, handler in methods.items():
            methods[method] = replaced.get(handler, handler)
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET).run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _point_gcsfs(token: str | None) -> None:
    """Make gcsfs use `token` and the current environment, forgetting instances made before
    (and their listings: etils.epath keeps one of its own)."""
    import fsspec
    import gcsfs.core
    from etils.epath import backend

    conf = fsspec.config.conf.setdefault("gcs", {})  # FSSPEC_GCS_TOKEN is read when fsspec is imported
    if token is None:
        conf.pop("token", None)
    else:
        conf["token"] = token
    for protocol in ("gs", "gcs"):  # the plain class, whatever GCSFS_EXPERIMENTAL_... was at import
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"gcp-storage-emulator did not listen on 127.0.0.1:{port} within {timeout_s:g} s")


@pytest.fixture
def gcs_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty emulated bucket for one test; yields its name (paths are gs://<name>/...)."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process)
        for key, value in emulator_env(f"http://127.0.0.1:{port}").items():
            monkeypatch.setenv(key, value)
        _point_gcsfs("anon")
        yield BUCKET
    finally:
        process.terminate()
        process.wait(timeout=30)
        monkeypatch.undo()
        _point_gcsfs(None)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
