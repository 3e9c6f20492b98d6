"""A local Google Cloud Storage for tests: gs://BUCKET/... works with no network and no credentials.

`gcs_bucket` (a pytest fixture: import it into a test module) starts gcp-storage-emulator as a
subprocess on 127.0.0.1 (not 'localhost': IPv6 ::1 is refused) and points gcsfs (etils.epath's
gs:// backend) and tensorstore at it. A subprocess, because the emulator's single-threaded
server dies in-process when a client hangs up early and pytest has closed the stderr it reports to. `EMULATOR_ENV` lists the settings that keep clients
anonymous and instant: without them gcsfs asks Google's storage-control service over gRPC for
the bucket's layout and retries for 60 s, and google-auth probes the GCE metadata server.
Subprocesses inherit the settings through os.environ.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Iterator

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _point_gcsfs(token: str | None) -> None:
    """Make gcsfs use `token` and the current environment, forgetting instances made before."""
    import fsspec
    import gcsfs.core

    conf = fsspec.config.conf.setdefault("gcs", {})  # FSSPEC_GCS_TOKEN is read when fsspec is imported
    if token is None:
        conf.pop("token", None)
    else:
        conf["token"] = token
    for protocol in ("gs", "gcs"):  # the plain class, whatever GCSFS_EXPERIMENTAL_... was at import
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()


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
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
         "--default-bucket", BUCKET, "--in-memory", "--quiet"],
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
