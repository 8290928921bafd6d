"""Does a job cost the same in a store of 10,000 jobs as in one of 10? (a script, not a test)

Run from the repository root (redis-server on PATH for the API figures; with --s3 also
moto_server, from the dev extras):

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python tests/bench/store_scale.py
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python tests/bench/store_scale.py \
        --s3 --sizes 10,100,1000

One store is filled to each size in turn (10, 100, 1,000, 10,000 jobs), and at each size
these are timed (the median of --repeats, interleaved round by round):

- scan: a real scan of 4 digit images end to end in this process (plan, every batch, the
  finalize: conv1, conv3 and fc of the bundled model; the model loaded once beforehand);
- list: `actmap jobs list --limit 50 --json`, through the CLI's own main();
- status: `workers.lifecycle.state.status` of one job;
- open_zarr / open_datatree: xarray of one job, at its own location;
- submit / GET jobs: an API submission (4 images) and `GET /v1/jobs?limit=50` through a
  running `actmap serve` (a private redis-server; local store only: the model registry is
  a local folder).

Each is printed as a ratio to its value at 10 jobs; the root `zarr.json` size too. With
`--s3 --count-requests`, each operation is also run once more at each size while its S3
requests are counted (tests/bench/s3_requests.py: by operation, listings by prefix, keys
listed, bytes), and moto's own answer to a listing of one fixed prefix, a HEAD and a GET is
timed with boto3 alone: counts that stay the same while time grows point at the server.

How the store is filled faster than by scans: one job is scanned for real, then copied
under new ids (its whole folder: every group, array, chunk and the ledger), its `created`
attr set to the copy's time and its tenant to the bench tenant, and then published as a
finalize would publish it (`workers.storage.consolidate.publish`: the group's own
consolidated map and its index records). So each copy's groups, attrs and index entries
are what a real scan leaves; only the forward passes are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from typing import Any  # noqa: E402

import xarray as xr  # noqa: E402

from api.cli.main import main as cli  # noqa: E402
from api.client import Client  # noqa: E402
from tests.bench.api import (  # noqa: E402
    TENANT,
    TOKEN,
    Processes,
    Stack,
    register,
    start_redis,
    write_auth,
)
from tests.bench.s3_requests import (  # noqa: E402
    Requests,
    count_each,
    counting,
    print_counts,
    print_moto,
    time_moto,
)
from tests.oracle import planned, run_job  # noqa: E402
from workers.extraction.cache import ModelCache  # noqa: E402
from workers.jobs import (  # noqa: E402
    ExtractionSpec,  # noqa: E402
    new_id,
    now,
)
from workers.lifecycle.state import status  # noqa: E402
from workers.storage.consolidate import publish  # noqa: E402
from workers.storage.objects import filesystem, get_json, put_json  # noqa: E402

SAMPLES = ROOT / "workers" / "demo" / "samples"
LAYERS = ("conv1", "conv3", "fc")


def _spec(inputs: tuple[str, ...]) -> ExtractionSpec:
    return ExtractionSpec(model="digits-cnn", layers=LAYERS, inputs=inputs, batch_size=4)


class Filler:
    """Copies of one real job, published like a finalize publishes (module docstring)."""

    def __init__(self, store: str, template: str) -> None:
        self.store, self.template = store, template
        self.fs, self.root = filesystem(store)
        self.count = 0

    def add(self, n: int) -> None:
        for _ in range(n):
            job_id = new_id()
            src, dst = f"{self.root}/jobs/{self.template}", f"{self.root}/jobs/{job_id}"
            if self.fs.exists(dst):
                continue  # the same second and random suffix: draw again next round
            if type(self.fs).__name__ == "LocalFileSystem":
                shutil.copytree(src, dst)
            else:
                self.fs.copy(src, dst, recursive=True)
            doc = get_json(self.fs, f"{dst}/zarr.json")
            assert doc is not None
            doc["attributes"].update(created=now(), tenant=TENANT)
            put_json(self.fs, f"{dst}/zarr.json", doc)
            publish(self.store, job_id)
            self.count += 1


def _timed(fn: Callable[[], Any]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def _quiet_cli(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if cli(argv) != 0:
            raise RuntimeError(f"actmap {' '.join(argv)} failed")


def _root_bytes(store: str) -> int:
    fs, root = filesystem(store)
    return int(fs.size(f"{root}/zarr.json"))


def _ops(
    store: str,
    template: str,
    models: ModelCache,
    inputs: tuple[str, ...],
    api: tuple[str, str] | None,
) -> dict[str, Callable[[], Any]]:
    ops: dict[str, Callable[[], Any]] = {
        "scan": lambda: run_job(store, planned(store, _spec(inputs), models.get(_spec(inputs)).info).job_id, models),  # noqa: E501
        "list": lambda: _quiet_cli(["jobs", "list", "--store", store, "--limit", "50", "--json"]),
        "status": lambda: status(store, template),
        "open_zarr": lambda: xr.open_zarr(f"{store}/jobs/{template}").close(),
        "open_datatree": lambda: xr.open_datatree(f"{store}/jobs/{template}", engine="zarr").close(),  # noqa: E501
    }  # fmt: skip
    if api is not None:
        url, model_id = api
        client = Client(url, TOKEN)
        ops["submit"] = lambda: client.submit_extraction(model_id, inputs, ["fc"], batch_size=4)
        ops["GET jobs"] = lambda: client.jobs_page(limit=50)
    return ops


def measure(ops: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):  # interleaved: every op once a round
        for name, fn in ops.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(found) for name, found in times.items()}


def _print(rows: list[tuple[int, int, dict[str, float]]]) -> None:
    names = list(rows[0][2])
    print(f"\n{'jobs':>7}{'root zarr.json':>16}" + "".join(f"{n:>14}" for n in names))
    for size, root, found in rows:
        print(f"{size:>7}{root:>14} B" + "".join(f"{found[n] * 1e3:>12.1f}ms" for n in names))
    # A listing of 10 jobs reads 10; of 100 or more, a page of 50: its ratio to the 100-job
    # value is the one that says whether a page costs a page.
    for base in [rows[0]] + [r for r in rows[1:2] if r[0] >= 50]:
        print(f"\nratios to the value at {base[0]} jobs")
        print(f"{'jobs':>7}" + "".join(f"{n:>14}" for n in names))
        for size, _, found in rows:
            print(f"{size:>7}" + "".join(f"{found[n] / base[2][n]:>13.2f}x" for n in names))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10,100,1000,10000", help="jobs in the store, in order")
    p.add_argument("--repeats", type=int, default=5, help="rounds of timings at each size")
    p.add_argument("--s3", action="store_true", help="on a moto S3 server (no API figures)")
    p.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    p.add_argument(
        "--count-requests", action="store_true",
        help="with --s3: also count each operation's S3 requests once, and time moto's own "
        "listing of a fixed prefix, at each size",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.count_requests and not args.s3:
        p.error("--count-requests counts S3 requests: add --s3")
    sizes = [int(s) for s in args.sizes.split(",")]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{when}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="actmap-bench-store-"))
    (tmp / "logs").mkdir()
    (tmp / "redis").mkdir()
    procs = Processes(tmp / "logs")
    hooks = contextlib.ExitStack()
    # Entered before the first store call: s3fs caches its instances, and their sessions.
    seen = hooks.enter_context(counting()) if args.count_requests else None
    try:
        data, auth = write_auth(tmp)
        inputs = tuple(str(p) for p in sorted((data / "3").glob("*.png"))[:4])
        api: tuple[str, str] | None = None
        if args.s3:
            store = _start_s3(procs)
        else:
            store = str(tmp / "store-scale")
            url = start_redis(procs, args.redis_server, tmp / "redis")
            stack = Stack(procs, tmp, url, data, auth)
            stack.start_api("scale")
            stack.start_worker()
            stack.wait_api("scale")
            model_id = register(stack, ["scale"])["scale"]
            procs.stop(["worker"])  # submissions queue; nothing competes for the cores
            api = (stack.apis["scale"], model_id)
        models = ModelCache()
        template = planned(store, _spec(inputs), models.get(_spec(inputs)).info).job_id
        run_job(store, template, models)
        filler = Filler(store, template)
        rows = []
        counted: list[tuple[int, dict[str, Requests]]] = []
        moto: list[tuple[int, dict[str, float]]] = []
        for size in sizes:
            began = time.monotonic()
            while filler.count + 1 < size:
                filler.add(size - 1 - filler.count)
            print(f"filled to {size} jobs in {time.monotonic() - began:.0f} s", flush=True)
            ops = _ops(store, template, models, inputs, api)
            found = measure(ops, args.repeats)
            rows.append((size, _root_bytes(store), found))
            print("  " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in found.items()), flush=True)
            if seen is not None:
                counted.append((size, count_each(ops, seen)))
                moto.append((size, time_moto(store, template)))
        _print(rows)
        if counted:
            print_counts(counted)
            print_moto(moto)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        hooks.close()
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _start_s3(procs: Processes) -> str:
    """A moto server on a free port, the environment pointing s3fs at it, and a bucket."""
    import httpx

    from tests.bench.api import free_port, until

    port = free_port()
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    procs.start("moto", [server, "-H", "127.0.0.1", "-p", str(port)], dict(os.environ))
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        procs.check("moto")
        try:
            return httpx.get(f"{url}/moto-api/", timeout=1).status_code < 500
        except httpx.TransportError:
            return False

    until(up, 60, "moto_server")
    os.environ.update(
        AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )  # fmt: skip
    httpx.put(f"{url}/actmap-bench").raise_for_status()
    return "s3://actmap-bench/store-scale"


if __name__ == "__main__":
    sys.exit(main())
