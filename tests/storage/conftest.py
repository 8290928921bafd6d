"""An S3 endpoint for the store's contract suite: moto's standalone server, started as a
process on a free loopback port (a real HTTP S3 API, not an in-process mock). Credentials,
endpoint and region reach s3fs the way they reach any botocore client: the environment."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

BUCKET = "actmap-test"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a moto S3 server with the test bucket, for this session."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if server is None:
        pytest.fail("moto_server is missing: pip install 'moto[server]' (in the dev extras)")
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    process = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start; see {log.name}")
                time.sleep(0.1)
        httpx.put(f"{url}/{BUCKET}").raise_for_status()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture
def s3_store(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh store prefix in the moto bucket, with the environment pointing at it."""

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    close_all()  # a cached instance keeps an older endpoint
    try:
        yield f"s3://{BUCKET}/store-{uuid.uuid4().hex[:12]}"
    finally:
        close_all()


def close_all() -> None:
    """Close the HTTP sessions of every cached s3fs instance (ours and zarr's, which runs on
    zarr's own event loop), then forget them: a session left to the garbage collector is
    an unclosed-socket warning at exit."""
    import s3fs
    from fsspec.asyn import sync
    from zarr.core.sync import sync as zarr_sync

    for fs in list(s3fs.S3FileSystem._cache.values()):
        client = getattr(fs, "_s3", None)
        if client is None:
            continue
        if fs.asynchronous:  # zarr's: its session lives on zarr's loop
            zarr_sync(client.__aexit__(None, None, None))
        else:
            sync(fs.loop, client.__aexit__, None, None, None, timeout=10)
        fs._s3 = None
    s3fs.S3FileSystem.clear_instance_cache()
