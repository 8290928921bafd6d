"""The HTTP API under load: submissions per second, and the round trip of a one-sample
screening-style extraction (upload -> result) with a warm CPU worker.

Run from the repository root (needs redis-server; about 3 minutes on 2 shared cores):

    .venv/bin/python tests/bench/api.py [--trips 100] [--warmup 5] [--poll 0.01]
        [--submissions 80] [--threads 4] [--layer fc] [--redis-server /usr/bin/redis-server]

What it starts, each as a subprocess that leads a process group of its own, with its output
in a temporary folder (printed, and shown on a failure): a private `redis-server` on a free
port (no RDB, no AOF; never the machine's own Redis), one `actmap serve` per phase below (the
same Redis, an auth file with one tenant `bench`, its token and a root holding a copy of the
demo samples of workers/demo/samples, each server with a store of its own so that every phase
starts on an empty store) and one CPU worker, `actmap worker --cpu 1 --queues screen,extract`.
Readiness is polled: `/readyz` of every server, then the model's registration (a task the
worker runs), then warm-up round trips (the first loads the model in the worker's child). In
`finally`, on an error or on Ctrl-C / SIGTERM: SIGTERM to every process group, SIGKILL to what
is left after a grace period.

The model is the bundled one, registered through `api.client.Client.register_model` with the
weights workers/demo/digits_cnn.safetensors and the factory workers.demo.digits:digits_cnn
(on the servers' ACTMAP_FACTORIES allow-list).

1. Round trip. `--warmup` untimed, then `--trips` sequential requests, each: upload one demo
   PNG (POST /v1/inputs), submit it (POST /v1/jobs/extractions: the input set, layer
   `--layer`, queue `screen`), poll GET /v1/jobs/{id} every `--poll` seconds (10 ms: a tight
   poll, the time of the GET itself comes on top) until the job is finished, then fetch the
   pooled activations (GET /v1/jobs/{id}/layers/{layer}/pooled, `.npy`). Printed: p50, p90,
   p99 and max of the whole and of its parts on one clock (time.time(), one host): upload;
   submit (the API plans the job, creating its Zarr arrays, before it answers 202); wait (202
   received to the worker's first `attempt` of the batch, the Redis key actmap:{job}:started:
   queue and pickup); run (that to the job's `finished` stamp: decode, forward, writes,
   finalize); notice (that stamp to the poll that first saw a finished state); fetch. Also
   the servers' own time per route (the API's Prometheus histogram, before and after), polls
   per trip, CPU seconds per trip of the API, the worker, Redis and this client, the p50 by
   jobs in the store (with the worker's time per task, from Celery's "succeeded in" log
   line: the run, then finalize's publish, then Celery's own work), and torn reads: a
   finished state seen before the job's `finished` stamp (finalize writes its attributes one
   key at a time), re-read every 1 ms until the stamp is there (that wait counts in the
   total, in no part).

2. Submissions per second. The worker is stopped first (so nothing runs the jobs and nothing
   competes for the CPU), then `--submissions` extraction jobs of one server-side sample each
   (layer `--layer`, queue `extract`, through `Client.submit_extraction`, so with an
   Idempotency-Key) are submitted as fast as they are answered 202: from one client,
   sequentially, then from `--threads` client threads (one `Client` each) on a second server
   with an empty store. Only the HTTP submission is timed. Drain: the queued tasks are then
   deleted from Redis (DEL of the `extract` list); their jobs stay `queued` in the throwaway
   stores. The tenant's queued-jobs quota is raised to allow this (the default is 20).
   Printed: submissions/s overall and per block of jobs already in the store, latency p50 and
   p99, and CPU per submission of the API. (80 by default, not more: a submission costs more
   the more jobs the store holds, see 3., so that 200 per run would take minutes each.)

3. Why, in-process: on the sequential phase's store and on an empty one, the time of
   `workers.lifecycle.plan.plan` (what a submission runs), of its `create_job` (timed by wrapping
   the
   name plan calls) and its `publish` (the store root's consolidated metadata, timed again
   after the plan), of `workers.lifecycle.state.list_jobs` (the quota check of every submission),
   and the size of the store root's zarr.json.

Every figure comes from one run on one machine; nothing here is an assertion. The load
average is printed before and after: other processes on the machine skew every figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Python put this script's folder first on sys.path, where this very file would shadow the
# project's `api` package: take it
# off before importing anything else.
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import ctypes  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from contextlib import suppress  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import redis  # noqa: E402

import workers.lifecycle.plan  # noqa: E402
from api.client import Client  # noqa: E402
from tests.oracle import planned  # noqa: E402
from workers.jobs import ExtractionSpec, ModelInfo  # noqa: E402
from workers.lifecycle.state import list_jobs  # noqa: E402
from workers.storage.consolidate import publish  # noqa: E402
from workers.storage.layout import job_ids  # noqa: E402

FACTORY = "workers.demo.digits:digits_cnn"
WEIGHTS = ROOT / "workers" / "demo" / "digits_cnn.safetensors"
SAMPLES = ROOT / "workers" / "demo" / "samples"
TENANT = "bench"
TOKEN = "bench-token-not-a-secret"
FINISHED = {"succeeded", "partial", "failed", "cancelled"}
READY_TIMEOUT = 120.0  # seconds for a server, or the model's registration
JOB_TIMEOUT = 120.0  # seconds before a round trip is declared hung
GRACE = 5.0  # seconds between SIGTERM and SIGKILL
PR_SET_PDEATHSIG = 1  # prctl(2)
ROUTES = {
    "upload": "/v1/inputs",
    "submit": "/v1/jobs/extractions",
    "status": "/v1/jobs/{job_id}",
    "pooled": "/v1/jobs/{job_id}/layers/{layer}/pooled",
}


# --- processes ----------------------------------------------------------------------------


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 6379:  # never the machine's own Redis
            return port


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, SIGKILL when this script dies; a safety net for
    when its `finally` cannot run."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Processes:
    """Every process this script starts, each leading a new process group, so that stopping
    one stops its children too (the worker's Celery process and its pool child)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.running[name] = proc
        return proc

    def stop(self, names: Sequence[str] | None = None, grace: float = GRACE) -> dict[str, str]:
        """SIGTERM to each group, SIGKILL to what is left after `grace`; says how each ended."""
        chosen = [n for n in (self.running if names is None else names) if n in self.running]
        began = time.monotonic()
        for name in chosen:
            _killpg(self.running[name], signal.SIGTERM)
        ended: dict[str, str] = {}
        for name in chosen:
            proc = self.running.pop(name)
            try:
                proc.wait(max(0.1, began + grace - time.monotonic()))
                ended[name] = f"exited on SIGTERM in {time.monotonic() - began:.1f} s"
            except subprocess.TimeoutExpired:
                ended[name] = f"still running {grace:.0f} s after SIGTERM: SIGKILLed"
            _killpg(proc, signal.SIGKILL)  # the whole group: stray children too
            with suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        return ended

    def check(self, *names: str) -> None:
        for name in names:
            proc = self.running.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(f"  {name}| {line}" for line in text.splitlines()[-lines:])


def _killpg(proc: subprocess.Popen[bytes], sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def start_redis(procs: Processes, binary: str, folder: Path) -> str:
    port = free_port()
    cmd = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(folder),
    ]  # fmt: skip
    procs.start("redis", cmd, dict(os.environ))
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=2)

    def up() -> bool:
        procs.check("redis")
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    until(up, 20, f"redis-server on port {port}")
    client.close()
    return url


def cpu_seconds(procs: Sequence[subprocess.Popen[bytes]]) -> float:
    """CPU seconds used so far by these processes and all their descendants."""
    total = 0.0
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            for p in [root, *root.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- the API's own view: its request histogram ---------------------------------------------

_SERIES = re.compile(r'^actmap_request_seconds_(sum|count)\{route="([^"]+)"\} (\S+)$')


def server_times(url: str) -> dict[str, tuple[float, float]]:
    """route -> (count, seconds) from /metrics (which itself scans every job of the store)."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = _SERIES.match(line)
        if m:
            found.setdefault(m.group(2), [0.0, 0.0])[m.group(1) == "sum"] = float(m.group(3))
    return {route: (v[0], v[1]) for route, v in found.items()}


def server_ms(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
              route: str) -> tuple[int, float]:  # fmt: skip
    """(requests, mean server ms) of `route` between two scrapes."""
    n0, s0 = before.get(route, (0.0, 0.0))
    n1, s1 = after.get(route, (0.0, 0.0))
    n = int(round(n1 - n0))
    return n, (s1 - s0) / n * 1e3 if n else float("nan")


# --- the stack ----------------------------------------------------------------------------


@dataclass
class Stack:
    procs: Processes
    tmp: Path
    redis_url: str
    data: Path
    auth: Path
    apis: dict[str, str] = field(default_factory=dict)  # name -> base URL

    def env(self, store: Path) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("ACTMAP_")}
        return {
            **base,
            "ACTMAP_BROKER_URL": self.redis_url,
            "ACTMAP_STORE": str(store),
            "ACTMAP_AUTH_FILE": str(self.auth),
            "ACTMAP_METRICS": "open",  # the bench scrapes it; off by default with an auth file
            "ACTMAP_FACTORIES": json.dumps([FACTORY]),
            "PYTHONPATH": str(ROOT),
        }

    def store(self, name: str) -> Path:
        return self.tmp / f"store-{name}"

    def start_api(self, name: str) -> None:
        port = free_port()
        self.procs.start(f"api-{name}", [*actmap(), "serve", "--port", str(port)],
                         self.env(self.store(name)))  # fmt: skip
        self.apis[name] = f"http://127.0.0.1:{port}"

    def wait_api(self, name: str) -> None:
        url = self.apis[name]

        def ready() -> bool:
            self.procs.check(f"api-{name}")
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        until(ready, READY_TIMEOUT, f"{url}/readyz", every=0.1)

    def start_worker(self) -> None:
        cmd = [*actmap(), "worker", "--cpu", "1", "--queues", "screen,extract"]
        self.procs.start("worker", cmd, self.env(self.store("worker-default")))


def actmap() -> list[str]:
    script = Path(sys.executable).with_name("actmap")
    return [str(script)] if script.exists() else [sys.executable, "-m", "api.cli.main"]


def write_auth(tmp: Path) -> tuple[Path, Path]:
    """A tenant root holding a copy of the demo samples, and the auth file naming it."""
    data = tmp / "data"
    shutil.copytree(SAMPLES, data)
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    quotas = {"queued_jobs": 1_000_000, "samples_per_job": 1000}
    auth = {"tenants": {TENANT: {"tokens": [f"sha256:{digest}"], "roots": [str(data)],
                                 "quotas": quotas}}}  # fmt: skip
    path = tmp / "auth.json"
    path.write_text(json.dumps(auth))
    return data, path


def register(stack: Stack, names: Sequence[str]) -> dict[str, str]:
    """Register the bundled model on each server; the worker computes each catalogue."""
    pending: dict[str, str] = {}
    for name in names:
        with Client(stack.apis[name], TOKEN) as client:
            pending[name] = client.register_model("digits", weights=WEIGHTS, factory=FACTORY,
                                                  wait=False)  # fmt: skip
    for name, model_id in pending.items():
        with Client(stack.apis[name], TOKEN) as client:

            def ready(c: Client = client, m: str = model_id, on: str = name) -> bool:
                stack.procs.check("worker")
                state = c.request("GET", f"/v1/models/{m}").json()["state"]
                if state == "failed":
                    raise RuntimeError(f"the model could not be registered on {on}")
                return bool(state == "ready")

            until(ready, READY_TIMEOUT, f"the model's registration on {name}", every=0.1)
    return pending


# --- 1. round trip ------------------------------------------------------------------------


@dataclass
class Trip:
    jobs_before: int  # jobs in the store when it was submitted
    parts: dict[str, float]  # seconds: upload, submit, wait, run, notice, fetch, total
    polls: int
    poll_s: list[float]  # client time of each status GET
    torn: int  # status reads after the finished state, before the job's finished stamp


def one_trip(client: Client, counters: redis.Redis, model_id: str, png: Path, layer: str,
             poll: float, jobs_before: int) -> Trip:  # fmt: skip
    t0 = time.time()
    input_set = client.upload([png])
    t1 = time.time()
    job = client.submit_extraction(model_id, layers=[layer], input_set=input_set,
                                   queue="screen")  # fmt: skip
    t2 = time.time()
    polls: list[float] = []
    while True:
        s = time.perf_counter()
        current = job.status()
        polls.append(time.perf_counter() - s)
        if current["state"] in FINISHED:
            break
        if time.time() - t2 > JOB_TIMEOUT:
            raise TimeoutError(f"job {job.id} still {current['state']} after {JOB_TIMEOUT} s")
        time.sleep(poll)
    t3 = time.time()
    torn = 0
    while current["finished"] is None:  # finalize writes its attributes one at a time
        torn += 1
        if torn > 1000:
            raise RuntimeError(f"job {job.id} is {current['state']} but has no finished stamp")
        time.sleep(0.001)
        current = job.status()
    t3b = time.time()
    response = client.request("GET", f"/v1/jobs/{job.id}/layers/{layer}/pooled")
    values = np.load(io.BytesIO(response.content), allow_pickle=False)
    t4 = time.time()
    if current["state"] != "succeeded" or values.shape[0] != 1 or not np.isfinite(values).all():
        raise RuntimeError(f"job {job.id} ended {current['state']}: {current}, {values!r}")
    raw = counters.get(f"actmap:{job.id}:started")  # set by the worker's first attempt
    started = float(raw) if raw is not None else float("nan")
    finished = datetime.fromisoformat(str(current["finished"])).timestamp()
    parts = {
        "upload": t1 - t0,
        "submit": t2 - t1,
        "wait": started - t2,
        "run": finished - started,
        "notice": t3 - finished,
        "fetch": t4 - t3b,
        "total": t4 - t0,
    }
    return Trip(jobs_before, parts, len(polls), polls, torn)


@dataclass
class RoundTrips:
    warmup: list[float]
    trips: list[Trip]
    server: dict[str, tuple[int, float]]  # part -> (requests, mean server ms)
    cpu: dict[str, float]  # process -> CPU seconds over the timed trips
    task_s: list[float]  # the worker's run_batch task times from its log, in order


def round_trips(stack: Stack, model_id: str, args: argparse.Namespace) -> RoundTrips:
    url = stack.apis["rt"]
    pngs = sorted(SAMPLES.glob("*/*.png"))
    counters = redis.Redis.from_url(stack.redis_url)
    api = stack.procs.running["api-rt"]
    watched = {"API": [api], "worker": [stack.procs.running["worker"]],
               "Redis": [stack.procs.running["redis"]]}  # fmt: skip
    with Client(url, TOKEN) as client:
        warmup = []
        for i in range(args.warmup):
            trip = one_trip(client, counters, model_id, pngs[i % len(pngs)], args.layer,
                            args.poll, i)  # fmt: skip
            warmup.append(trip.parts["total"])
        before = server_times(url)
        cpu0 = {k: cpu_seconds(v) for k, v in watched.items()}
        mine0 = self_cpu()
        trips = []
        for i in range(args.trips):
            png = pngs[(args.warmup + i) % len(pngs)]
            trips.append(one_trip(client, counters, model_id, png, args.layer, args.poll,
                                  args.warmup + i))  # fmt: skip
        cpu = {k: cpu_seconds(v) - cpu0[k] for k, v in watched.items()}
        cpu["this client"] = self_cpu() - mine0
        after = server_times(url)
    counters.close()
    server = {part: server_ms(before, after, route) for part, route in ROUTES.items()}
    log = stack.procs.logs / "worker.log"
    expected = args.warmup + args.trips  # the last line comes once the last publish is done
    with suppress(TimeoutError):
        until(lambda: len(task_times(log)) >= expected, 10, "the worker's log", every=0.1)
    tasks = task_times(log)
    return RoundTrips(warmup, trips, server, cpu, tasks if len(tasks) == expected else [])


_TASK = re.compile(r"Task actmap\.run_batch\[[^\]]+\] succeeded in ([0-9.eE-]+)s")


def task_times(log: Path) -> list[float]:
    """Seconds of each run_batch task the worker logged (Celery's INFO line), in order."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [float(m.group(1)) for m in _TASK.finditer(text)]


# --- 2. submissions per second --------------------------------------------------------------


@dataclass
class Submissions:
    threads: int
    spans: list[tuple[float, float]]  # (start, end) of each POST, perf_counter seconds
    began: float
    wall: float
    api_cpu: float
    server_ms: float  # the API's own mean time per submission

    @property
    def rate(self) -> float:
        return len(self.spans) / self.wall

    def blocks(self, size: int) -> list[tuple[int, float]]:
        """(jobs in the store before the block, submissions/s within it), by completion."""
        ends = sorted(e for _, e in self.spans)
        out = []
        previous = self.began
        for i in range(0, len(ends), size):
            chunk = ends[i : i + size]
            out.append((i, len(chunk) / max(chunk[-1] - previous, 1e-9)))
            previous = chunk[-1]
        return out


def submissions(stack: Stack, name: str, model_id: str, args: argparse.Namespace,
                threads: int) -> Submissions:  # fmt: skip
    url = stack.apis[name]
    paths = sorted(str(p) for p in stack.data.glob("*/*.png"))  # server-side, in the root
    clients = [Client(url, TOKEN) for _ in range(threads)]
    for client in clients:  # connect first: the timed part is the submissions alone
        client.request("GET", f"/v1/models/{model_id}")
    barrier = threading.Barrier(threads + 1)

    def run(k: int) -> list[tuple[float, float]]:
        spans = []
        barrier.wait()
        for i in range(k, args.submissions, threads):
            s = time.perf_counter()
            clients[k].submit_extraction(model_id, [paths[i % len(paths)]], [args.layer])
            spans.append((s, time.perf_counter()))
        return spans

    before = server_times(url)
    api = [stack.procs.running[f"api-{name}"]]
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(run, k) for k in range(threads)]
        cpu0 = cpu_seconds(api)
        barrier.wait()
        began = time.perf_counter()
        spans = [span for f in futures for span in f.result()]
    wall = max(e for _, e in spans) - began
    api_cpu = cpu_seconds(api) - cpu0
    _, mean_ms = server_ms(before, server_times(url), ROUTES["submit"])
    for client in clients:
        client.close()
    return Submissions(threads, spans, began, wall, api_cpu, mean_ms)


def drain(redis_url: str) -> int:
    """Delete the queued tasks (nothing consumes them: the worker is stopped)."""
    client = redis.Redis.from_url(redis_url)
    try:
        depth = int(client.llen("extract"))
        client.delete("extract")
        return depth
    finally:
        client.close()


# --- 3. why, in-process -------------------------------------------------------------------


@dataclass
class Probe:
    jobs: int
    root_bytes: int
    list_jobs_ms: float
    plan_ms: float
    create_ms: float  # of which workers.storage.layout.create_job
    publish_ms: float


def probe(store: Path, info: ModelInfo, layer: str, sample: Path, repeats: int = 3) -> Probe:
    """Time what one submission runs against `store`: the quota scan, the plan, its publish."""
    jobs = len(job_ids(str(store)))
    spec = ExtractionSpec(model=FACTORY, weights=str(WEIGHTS), layers=(layer,),
                          inputs=(str(sample),), tenant=TENANT)  # fmt: skip
    listing, planning, creating, publishing = [], [], [], []
    name = "create_job"  # as workers.lifecycle.plan imported it: the name plan() calls
    create_job: Callable[..., Any] = vars(workers.lifecycle.plan)[name]

    def timed(*a: Any, **k: Any) -> Any:
        s = time.perf_counter()
        try:
            return create_job(*a, **k)
        finally:
            creating.append(time.perf_counter() - s)

    setattr(workers.lifecycle.plan, name, timed)  # put back below
    try:
        for _ in range(repeats):
            s = time.perf_counter()
            list_jobs(str(store))
            listing.append(time.perf_counter() - s)
            s = time.perf_counter()
            job = planned(str(store), spec, info)
            planning.append(time.perf_counter() - s)
            s = time.perf_counter()
            publish(str(store), job.job_id)
            publishing.append(time.perf_counter() - s)
    finally:
        setattr(workers.lifecycle.plan, name, create_job)
    root = store / "zarr.json"
    return Probe(
        jobs, root.stat().st_size if root.exists() else 0,
        *(statistics.median(v) * 1e3 for v in (listing, planning, creating, publishing)),
    )  # fmt: skip


# --- printing -----------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def ms_row(label: str, values: Sequence[float], note: str = "") -> str:
    cells = [pct(values, q) * 1e3 for q in (50, 90, 99)] + [max(values) * 1e3]
    return f"  {label:<26}" + "".join(f"{c:>9.1f}" for c in cells) + (f"   {note}" if note else "")


def print_round_trips(rt: RoundTrips, args: argparse.Namespace) -> None:
    trips = rt.trips
    n = len(trips)
    print(
        f"\n1. Round trip, one sample: upload PNG -> submit (queue screen, layer {args.layer}) "
        f"-> poll every {args.poll * 1e3:.0f} ms -> GET pooled; {n} sequential after "
        f"{len(rt.warmup)} warm-up"
    )
    print("  warm-up totals (ms): " + ", ".join(f"{w * 1e3:.0f}" for w in rt.warmup))
    print(f"  {'ms':<26}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}   server ms/request (mean)")
    server = {"upload": "upload", "submit": "submit", "notice": "status", "fetch": "pooled"}
    for part in ("upload", "submit", "wait", "run", "notice", "fetch"):
        values = [t.parts[part] for t in trips]
        note = ""
        if part in server:
            count, mean = rt.server[server[part]]
            note = f"{mean:.1f} ({count} x {ROUTES[server[part]]})"
        label = {"wait": "wait (queue + pickup)", "run": "run (worker)",
                 "notice": "notice (poll)"}.get(part, part)  # fmt: skip
        print(ms_row(label, values, note))
    totals = [t.parts["total"] for t in trips]
    print(ms_row("total", totals))
    polls = [t.polls for t in trips]
    poll_ms = [p * 1e3 for t in trips for p in t.poll_s]
    print(
        f"  status polls per trip: median {statistics.median(polls):.0f}, max {max(polls)}; "
        f"client ms per status GET: median {statistics.median(poll_ms):.1f}"
    )
    torn = [t.torn for t in trips]
    print(
        f"  torn reads: {sum(1 for k in torn if k)} of {n} trips saw state finished before the "
        f"job's finished stamp ({sum(torn)} extra status GETs)"
    )
    total_s = sum(totals)
    print(
        "  CPU ms per trip: "
        + ", ".join(f"{k} {v / n * 1e3:.0f}" for k, v in rt.cpu.items())
        + f"  (wall {total_s / n * 1e3:.0f} ms per trip)"
    )
    size = max(1, n // 5)
    tasks = rt.task_s[-n:] if len(rt.task_s) >= n else []
    print("  p50 ms by jobs already in the store:")
    print(f"  {'jobs':<10}{'total':>8}{'submit':>8}{'run':>8}{'task':>8}   (task: the worker's "
          "time per task, from its log: run + finalize's publish + Celery)")  # fmt: skip
    for i in range(0, n, size):
        chunk = trips[i : i + size]
        cells = [pct([t.parts[k] for t in chunk], 50) for k in ("total", "submit", "run")]
        cells.append(pct(tasks[i : i + size], 50) if tasks else float("nan"))
        label = f"{chunk[0].jobs_before}-{chunk[-1].jobs_before}"
        print(f"  {label:<10}" + "".join(f"{c * 1e3:>8.0f}" for c in cells))


def print_submissions(runs: list[Submissions], drained: list[int], stops: dict[str, str],
                      block: int) -> None:  # fmt: skip
    print(
        f"\n2. Submissions/s: {len(runs[0].spans)} one-sample extraction jobs per run, HTTP 202 "
        "timed only, worker stopped first, each run on a fresh server and store"
    )
    print(f"  worker stop: {stops.get('worker', '?')}")
    print(f"  {'clients':<10}{'subm/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'server ms':>11}"
          f"{'API CPU ms':>12}   subm/s by jobs already in the store")  # fmt: skip
    for run, left in zip(runs, drained, strict=True):
        latency = [e - s for s, e in run.spans]
        by_size = " ".join(f"{k}:{r:.1f}" for k, r in run.blocks(block))
        label = "1 (seq)" if run.threads == 1 else f"{run.threads} thr"
        print(
            f"  {label:<10}{run.rate:>8.1f}{pct(latency, 50) * 1e3:>9.0f}"
            f"{pct(latency, 99) * 1e3:>9.0f}{run.server_ms:>11.0f}"
            f"{run.api_cpu / len(run.spans) * 1e3:>12.0f}   {by_size}"
        )
        print(f"  {'':<10}drained: DEL extract removed {left} queued tasks")


def print_probes(probes: dict[str, Probe]) -> None:
    print("\n3. What a submission runs, in-process (median of 3; each plan adds a job)")
    print(f"  {'store':<24}{'jobs':>6}{'root zarr.json':>16}{'list_jobs ms':>14}"
          f"{'plan ms':>9}{'create_job':>12}{'publish':>9}")  # fmt: skip
    for name, p in probes.items():
        print(
            f"  {name:<24}{p.jobs:>6}{p.root_bytes / 1e6:>13.2f} MB{p.list_jobs_ms:>14.1f}"
            f"{p.plan_ms:>9.1f}{p.create_ms:>12.1f}{p.publish_ms:>9.1f}"
        )
    print("  (plan = checks + create_job + sample ids + publish; a submission = list_jobs + plan)")


# --- main ---------------------------------------------------------------------------------


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--trips", type=int, default=100, help="timed round trips")
    p.add_argument("--warmup", type=int, default=5, help="untimed round trips first")
    p.add_argument("--poll", type=float, default=0.01, help="status poll interval, seconds")
    p.add_argument("--submissions", type=int, default=80, help="jobs per submission run")
    p.add_argument("--threads", type=int, default=4, help="client threads of the second run")
    p.add_argument("--layer", default="fc", help="the layer extracted and fetched")
    p.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = p.parse_args(argv)
    if min(args.trips, args.submissions, args.threads) < 1 or args.warmup < 1:
        p.error("--trips, --warmup, --submissions and --threads must be at least 1")
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"{os.cpu_count()} cores; load average {load()}", flush=True)
    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="actmap-bench-api-"))
    (tmp / "logs").mkdir()
    (tmp / "redis").mkdir()
    procs = Processes(tmp / "logs")
    ok = False
    try:
        url = start_redis(procs, args.redis_server, tmp / "redis")
        data, auth = write_auth(tmp)
        stack = Stack(procs, tmp, url, data, auth)
        print(f"private Redis at {url}; logs in {tmp / 'logs'}", flush=True)
        servers = ("rt", "seq", "conc")
        for name in servers:
            stack.start_api(name)
        stack.start_worker()
        for name in servers:
            stack.wait_api(name)
        models = register(stack, servers)
        print(f"ready after {time.monotonic() - began:.0f} s: 3 API servers, 1 worker, "
              "model registered on each", flush=True)  # fmt: skip

        rt = round_trips(stack, models["rt"], args)
        print_round_trips(rt, args)

        stops = procs.stop(["worker"])
        runs, drained = [], []
        for name, threads in (("seq", 1), ("conc", args.threads)):
            runs.append(submissions(stack, name, models[name], args, threads))
            drained.append(drain(url))
        print_submissions(runs, drained, stops, max(1, args.submissions // 4))

        with Client(stack.apis["seq"], TOKEN) as client:
            record = client.request("GET", f"/v1/models/{models['seq']}").json()
        info = ModelInfo.model_validate(record["catalogue"])
        sample = next(iter(sorted(data.glob("*/*.png"))))
        probes = {
            "empty": probe(tmp / "store-probe", info, args.layer, sample),
            "after the round trips": probe(stack.store("rt"), info, args.layer, sample),
            "after seq submissions": probe(stack.store("seq"), info, args.layer, sample),
        }
        print_probes(probes)

        totals = [t.parts["total"] for t in rt.trips]
        size = max(1, len(totals) // 5)
        first, last = totals[:size], totals[-size:]
        seq, conc = (run.blocks(max(1, args.submissions // 4))[0][1] for run in runs)
        print(
            f"\nsummary: round trip p50 {pct(totals, 50) * 1e3:.0f} ms, p99 "
            f"{pct(totals, 99) * 1e3:.0f} ms ({len(totals)} trips, {args.poll * 1e3:.0f} ms "
            f"poll; p50 {pct(first, 50) * 1e3:.0f} ms over the first {size}, "
            f"{pct(last, 50) * 1e3:.0f} ms over the last {size} as the store grew to "
            f"{len(totals) + args.warmup} jobs); submissions {runs[0].rate:.1f}/s from 1 "
            f"client, {runs[1].rate:.1f}/s from {args.threads} threads ({args.submissions} "
            f"each; {seq:.1f}/s and {conc:.1f}/s over the first quarter, into an empty store); "
            f"load average {load()}; {time.monotonic() - began:.0f} s"
        )
        ok = True
    finally:
        ended = procs.stop([n for n in procs.running if n != "redis"])  # Redis last
        ended.update(procs.stop())
        if not ok:
            for name in ("api-rt", "api-seq", "api-conc", "worker"):
                print(procs.tail(name), file=sys.stderr)
            print(f"stopped: {ended}; logs kept in {tmp / 'logs'}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
