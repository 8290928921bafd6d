"""Quotas, body limits, authentication before the body and the access log, against real
`actmap serve` processes (uvicorn) sharing a private Redis and a store."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ROOT, Cluster, start_api, until
from workers.demo.digits import WEIGHTS
from workers.execution.registration import register_model

FACTORY = "workers.demo.digits:digits_cnn"
SAMPLES = ROOT / "workers" / "demo" / "samples"
TOKEN = "limits-token"
BODY_LIMIT = 2 << 20


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}


def _serve(cluster: Cluster, tmp_path: Path, name: str) -> Server:
    log = tmp_path / f"{name}.log"
    proc, url = start_api(cluster.env, log=log)
    return Server(url, int(url.rsplit(":", 1)[1]), proc, log)


@pytest.fixture
def servers(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[[int], list[Server]]]:
    """`start(n)`: n API processes on one Redis and one store, tenant acme with small quotas."""
    data = tmp_path / "data"
    for digit in ("1", "8"):
        (data / digit).mkdir(parents=True)
        for png in sorted((SAMPLES / digit).glob("*.png"))[:1]:
            (data / digit / png.name).write_bytes(png.read_bytes())
    quotas = {"queued_jobs": 2, "upload_bytes": 1 << 20}
    auth = {"tenants": {"acme": {"tokens": [TOKEN], "roots": [str(data)], "quotas": quotas}}}
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    cluster.env["ACTMAP_AUTH_FILE"] = str(tmp_path / "auth.json")
    cluster.env["ACTMAP_FACTORIES"] = json.dumps([FACTORY])
    cluster.env["ACTMAP_MAX_BODY_BYTES"] = str(BODY_LIMIT)
    started: list[Server] = []

    def start(n: int) -> list[Server]:
        started.extend(_serve(cluster, tmp_path, f"api{i}") for i in range(n))
        return started

    try:
        yield start
    finally:
        for server in started:
            server.proc.terminate()
            server.proc.wait(30)


def _ready_model(server: Server, store: str) -> str:
    """Registered through the API; its catalogue filled in here, as a worker would."""
    with WEIGHTS.open("rb") as f:
        response = httpx.post(
            f"{server.url}/v1/models", headers=server.headers(), timeout=30,
            data={"name": "digits", "factory": FACTORY},
            files={"weights": ("w.safetensors", f, "application/octet-stream")},
        )  # fmt: skip
    assert response.status_code == 202, response.text
    model_id: str = response.json()["id"]
    assert register_model(store, "acme", model_id, (FACTORY,)) == "ready"
    return model_id


def test_ten_concurrent_submissions_over_two_apis_take_exactly_the_quota_of_two(
    servers: Callable[[int], list[Server]], cluster: Cluster, tmp_path: Path
) -> None:
    first, second = servers(2)
    model_id = _ready_model(first, cluster.store)
    body = {"model_id": model_id, "layers": ["fc"], "inputs": [str(tmp_path / "data")]}
    barrier = threading.Barrier(10)
    codes: list[int] = []

    def submit(server: Server) -> None:
        with httpx.Client(timeout=60) as client:
            barrier.wait()
            answer = client.post(
                f"{server.url}/v1/jobs/extractions", headers=server.headers(), json=body
            )
        codes.append(answer.status_code)

    threads = [threading.Thread(target=submit, args=((first, second)[i % 2],)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(codes) == [202, 202] + [429] * 8


def test_the_upload_quota_counts_what_the_tenant_already_holds(
    servers: Callable[[int], list[Server]], cluster: Cluster
) -> None:
    (server,) = servers(1)
    megabyte = b"x" * (1 << 20)
    answers = [
        httpx.post(
            f"{server.url}/v1/inputs", headers=server.headers(), timeout=30,
            files=[("files", (f"part{i}.bin", megabyte[: 400 << 10], "application/octet-stream"))],
        ).status_code
        for i in range(5)
    ]  # fmt: skip
    assert answers == [201, 201, 413, 413, 413]
    held = sum(
        f.stat().st_size for f in (Path(cluster.store) / "uploads").rglob("*") if f.is_file()
    )
    assert held <= 1 << 20


def _exchange(port: int, head: bytes, body: Iterator[bytes]) -> bytes:
    """Send `head`, then body pieces while the server has not answered; all it answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        for piece in body:
            if select.select([sock], [], [], 0)[0]:  # the server has answered (or closed)
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = b""
        while not _complete(answer) and (more := sock.recv(65536)):
            answer += more
        return answer


def _complete(answer: bytes) -> bool:
    head, mark, body = answer.partition(b"\r\n\r\n")
    lengths = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    return bool(mark) and bool(lengths) and len(body) >= int(lengths[0].split(b":")[1])


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _endless_file() -> Iterator[bytes]:
    """A chunked multipart body whose one file never ends (stopped at 64 times the limit)."""
    part = (
        b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    piece = b"z" * 65536
    yield b"%x\r\n%s\r\n" % (len(part), part)
    for _ in range(64 * BODY_LIMIT // len(piece)):
        yield b"%x\r\n%s\r\n" % (len(piece), piece)


def test_a_body_is_refused_before_it_is_read_without_a_token_or_over_the_limit(
    servers: Callable[[int], list[Server]],
) -> None:
    (server,) = servers(1)
    multipart = "multipart/form-data; boundary=xyz"

    def head(length: str, token: bool = True) -> bytes:
        lines = [
            "POST /v1/inputs HTTP/1.1", f"Host: 127.0.0.1:{server.port}",
            f"Content-Type: {multipart}", length,
        ]  # fmt: skip
        if token:
            lines.append(f"Authorization: Bearer {TOKEN}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    anonymous = _exchange(server.port, head("Content-Length: 1000000000", token=False), iter([]))
    assert _status(anonymous) == 401
    declared = _exchange(server.port, head(f"Content-Length: {BODY_LIMIT * 8}"), iter([]))
    assert _status(declared) == 413
    chunked = _exchange(server.port, head("Transfer-Encoding: chunked"), _endless_file())
    assert _status(chunked) == 413
    assert b"ACTMAP_MAX_BODY_BYTES" in chunked


def test_a_token_in_the_query_string_is_not_written_to_the_access_log(
    servers: Callable[[int], list[Server]],
) -> None:
    (server,) = servers(1)
    secret = "query-secret-abc123"
    httpx.get(f"{server.url}/v1/jobs?token={secret}&access_token={secret}", timeout=30)
    httpx.get(f"{server.url}/v1/jobs", headers=server.headers(), timeout=30)
    until(lambda: "/v1/jobs" in server.log.read_text(), 30, "the access log lines")
    server.proc.terminate()
    server.proc.wait(30)
    written = server.log.read_text()
    assert "GET /v1/jobs" in written
    assert secret not in written
