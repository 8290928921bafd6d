"""Queue overhead and scaling: actmap through Redis against in-process, and simulated GPUs.

Run from the repository root (needs redis-server; about 3 to 5 minutes on 2 cores):

    .venv/bin/python tests/bench/queueing.py [--images 2048] [--repeats 3] [--torch-threads 1]
        [--sleep 0.05] [--workers 1,4,16,64] [--seconds 5] [--compare-at 4,16,64]
        [--control-sleep 0.2] [--skip-overhead] [--skip-scaling] [--no-embedded]

It starts a private `redis-server` on a free port (no persistence, files in a temporary
directory; never the machine's own Redis), starts every worker process itself, each in a
process group of its own, and stops all of them and the Redis server on exit, on an error
or Ctrl-C (SIGTERM, then SIGKILL to the group; on Linux they also get SIGKILL should this
script itself be killed). Worker logs and the stores go to a temporary directory under
`--dir` (/dev/shm by default, so that a shared disk's writeback is not part of the figure).

1. Per-task overhead. The same job (the bundled model `digits-cnn`, layers conv1, block2
   and conv3 stored as float16, batch 32, on `--images` seeded random (1, 28, 28) `.npy`
   inputs; a fresh store and job each time), one untimed warm-up per method (imports, the
   worker child's model load), then the methods interleaved A B C D A B C D ...:
   - in-process: `workers.pipeline.plan` + `tests.oracle.run_job`, the pipelined runner
                 (decode ahead, writes behind);
   - redis:      plan + `workers.lifecycle.submit.send_batches` + `workers.lifecycle.state.wait`
                 (the store read once a second; the finalizing task's announcement, a Redis pub/sub
                 message, ends the wait) against one real worker process started with the
                 command `actmap worker --cpu 1` runs (`workers.execution.launcher.command`:
                 prefork,
                 concurrency 1, prefetch 1); timed end to end on the submitting side, and
                 split into plan, enqueue, first pickup, worker span (first batch started to
                 job finalized) and the wait's tail;
   - task loop:  plan + `workers.lifecycle.delivery.execute_batch` for every batch in a plain loop
   in
                 this process (MemoryCounters): what the tasks do, without Celery or Redis,
                 and without the runner's overlap; it splits the gap in two;
   - embedded:   `workers.execution.embedded.scan`, the Celery tasks on the in-memory transport in a
                 worker thread; it builds its own model cache, so its time includes a model
                 load and the worker thread's start and stop.
   Torch runs `--torch-threads` intra-op threads in this process and in the worker (1 by
   default: with 2 threads on a shared 2-core machine the same job's time varied up to
   8-fold from run to run, whichever method ran it; 0 keeps torch's default). Printed:
   images/s per method (median and best) and each against in-process.

2. Scaling, simulated. N simulated GPU workers (tests/bench/sim_worker.py: the app from
   `make_celery`, so acks late, prefetch 1 and the visibility timeout, the real task name
   and arguments, the real `RedisCounters` calls, and `time.sleep(--sleep)` for the forward
   pass, which leaves the CPU idle) as Celery `--pool threads` processes of at most 16
   threads, one thread per GPU, through the one private Redis. For each N it enqueues
   M = max(200, N x seconds / sleep) batches, `--seconds` (5) of work at the ideal rate
   (a job's start, the first tasks' enqueue and pickup, is a fixed cost: at 1 s it was 5 to
   10% of N=64), and polls the job's done set every 5 ms; achieved = M / (first enqueue to
   last done), ideal = N / sleep. Where N is in `--compare-at` three enqueue variants run
   interleaved: "as is" (`workers.lifecycle.submit.send_batches` cutting tasks for the workers
   on the roster, as the CLI and API send), "one per task" and "pre-filled" (the queue filled
   while the workers are told not to consume, the clock started when they resume: the
   submitter out of the loop). `--control-sleep` reruns the largest N with a longer sleep,
   so that the workers' own CPU stays well inside this machine's. Redis commands per batch
   come from `INFO commandstats` (this script's polls and INFO calls taken out); CPU per
   batch of Redis (`INFO cpu`), of the worker processes and of this submitter shows what
   saturates first. Each case runs `--repeats` times; the median round is shown.

Every figure comes from one run on one machine; nothing here is an assertion. The load
average is printed before and after: other processes on the machine skew every figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where a sibling (api.py) would shadow
# the project's `api` package: take the folder off and put the repository root on.
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import ctypes  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Iterator  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from contextlib import ExitStack, contextmanager, suppress  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402
from celery._state import _set_task_join_will_block  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from tests.oracle import planned, run_job  # noqa: E402
from workers.execution.celery_app import CeleryQueue, make_celery  # noqa: E402
from workers.execution.embedded import scan  # noqa: E402
from workers.execution.launcher import command  # noqa: E402
from workers.execution.slots import Slot  # noqa: E402
from workers.extraction.cache import ModelCache  # noqa: E402
from workers.jobs import ExtractionSpec  # noqa: E402
from workers.lifecycle.counters import (  # noqa: E402
    MemoryCounters,
    RedisCounters,
    Roster,
)
from workers.lifecycle.delivery import Runtime, execute_batch  # noqa: E402
from workers.lifecycle.state import wait  # noqa: E402
from workers.lifecycle.submit import send_batches  # noqa: E402
from workers.pipeline import Extraction  # noqa: E402
from workers.settings import Settings  # noqa: E402
from workers.storage.layout import attrs, open_job  # noqa: E402

BATCH = 32
MODEL = "digits-cnn"
LAYERS = ("conv1", "block2", "conv3")
THREADS_PER_PROCESS = 16  # simulated GPUs per `--pool threads` worker process
POLL = 0.005  # seconds between polls of the done set in the simulation
READY_TIMEOUT = 120.0  # seconds for a worker process to answer a ping
JOB_TIMEOUT = 300.0  # seconds before a job is declared hung
PR_SET_PDEATHSIG = 1  # prctl(2)


# --- processes: a private Redis and worker processes, each in its own process group -------


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 6379:  # never the machine's own Redis
            return port


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, ask for SIGKILL when this script dies, a safety
    net for the cases where its `finally` cannot run (SIGKILL)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Processes:
    """Every process this script starts, each the leader of a new process group, so that
    stopping one stops its children too (the prefork pool, say)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []
        self.services: list[subprocess.Popen[bytes]] = []  # stopped last: Redis

    def start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None, service: bool = False
    ) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.running.append(proc)
        if service:
            self.services.append(proc)
        return proc

    def stop(self, procs: list[subprocess.Popen[bytes]] | None = None, grace: float = 20) -> None:
        """SIGTERM (Celery's warm shutdown) to each group, SIGKILL to what is left after
        `grace` seconds. By default every running process but the services."""
        if procs is None:
            procs = [p for p in self.running if p not in self.services]
        chosen = [p for p in procs if p in self.running]
        for proc in chosen:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in chosen:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            self._signal(proc, signal.SIGKILL)  # the group: stray pool children too
            proc.wait()
            self.running.remove(proc)

    def stop_all(self) -> None:
        self.stop()
        self.stop(list(self.running))

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


@contextmanager
def private_redis(procs: Processes, binary: str, folder: Path) -> Iterator[str]:
    """A throwaway redis-server on a free port: no RDB, no AOF, its files in `folder`."""
    port = free_port()
    server = procs.start(
        "redis",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(folder)],
        service=True,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {procs.logs}") from None
            time.sleep(0.05)
    try:
        yield url
    finally:
        client.close()
        procs.stop([server])


def group_cpu(procs: list[subprocess.Popen[bytes]]) -> float:
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


def wait_ready(
    app: Any, hostnames: list[str], procs: list[subprocess.Popen[bytes]], timeout: float
) -> None:
    """Poll until every worker answers a ping; fail early if one exits."""
    deadline = time.monotonic() + timeout
    missing = set(hostnames)
    while missing:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a worker exited with {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not ready after {timeout:.0f} s: {sorted(missing)}")
        for reply in app.control.ping(destination=sorted(missing), timeout=0.5) or []:
            missing -= set(reply)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- 1. per-task overhead -----------------------------------------------------------------


def make_inputs(folder: Path, n: int, seed: int = 0) -> None:
    """n `.npy` inputs of digits-cnn's input shape, pixel-like values, seeded."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.save(folder / f"{i:05d}.npy", rng.random((1, 28, 28), dtype=np.float32))


@dataclass
class Run:
    seconds: float
    cpu_self: float  # CPU seconds of this process during the run
    cpu_worker: float = 0.0  # CPU seconds of the worker process group during the run
    stages: dict[str, float] = field(default_factory=dict)  # the redis path, in seconds


@dataclass
class Overhead:
    images: int
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def rates(self, method: str) -> tuple[float, float]:
        """(median, best) images/s."""
        seconds = [r.seconds for r in self.runs[method]]
        return self.images / statistics.median(seconds), self.images / min(seconds)

    def paired(self) -> float:
        """The median over repeats of in-process over redis seconds: each pair ran side by
        side, so a slow drift of the machine's load falls on both of its sides."""
        pairs = zip(self.runs["in-process"], self.runs["redis"], strict=True)
        return statistics.median(i.seconds / r.seconds for i, r in pairs)


def check(state: str, method: str, job: Any) -> None:
    if state != "succeeded":
        raise RuntimeError(f"{method}: job ended {state}: {job}")


def alive(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is not None:
        raise RuntimeError("the worker exited")


def overhead(args: argparse.Namespace, tmp: Path, procs: Processes, url: str) -> Overhead:
    inputs = tmp / "inputs"
    make_inputs(inputs, args.images)
    spec = ExtractionSpec(model=MODEL, layers=LAYERS, inputs=(str(inputs),), batch_size=BATCH)
    local = Settings(store=str(tmp / "unused"), broker_url=None)
    models = ModelCache(local.device, factories=local.factories)
    info = models.get(spec).info
    decoders = ThreadPoolExecutor(local.decode_threads, thread_name_prefix="bench-decode")

    env = {**os.environ, "ACTMAP_BROKER_URL": url, "ACTMAP_STORE": str(tmp)}
    env.update(Slot("bench-cpu0@localhost", None).environment())
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.torch_threads)
    worker = procs.start(
        "worker-cpu", command(Slot("bench-cpu0@localhost", None), ["extract"]), env
    )
    app = make_celery(Settings(broker_url=SecretStr(url)))
    counters = RedisCounters(url)
    wait_ready(app, ["bench-cpu0@localhost"], [worker], READY_TIMEOUT)
    alive(worker)

    def in_process(store: Path) -> Run:
        cpu = self_cpu()
        start = time.perf_counter()
        job = planned(str(store), spec, info)
        result = run_job(str(store), job.job_id, models, None, local.decode_threads)
        seconds = time.perf_counter() - start
        check(result["state"], "in-process", result)
        return Run(seconds, self_cpu() - cpu)

    def task_loop(store: Path) -> Run:
        cpu = self_cpu()
        start = time.perf_counter()
        job = planned(str(store), spec, info)
        runtime = Runtime(Extraction(models, decoders), MemoryCounters(), local.attempt_cap)
        for batch in range(job.n_batches):
            execute_batch(str(store), job.job_id, batch, runtime)
        seconds = time.perf_counter() - start
        state = attrs(open_job(str(store), job.job_id, mode="r"))["state"]
        check(state, "task loop", job)
        return Run(seconds, self_cpu() - cpu)

    def embedded(store: Path) -> Run:
        cpu = self_cpu()
        start = time.perf_counter()
        result = scan(spec, str(store), local)
        seconds = time.perf_counter() - start
        # The embedded worker thread set Celery's process-wide "joins would block" flag, which
        # makes send_task skip its result subscription; a submitting process (the CLI, the
        # API) has it unset. Unset it, as celery.contrib.testing.worker does on teardown.
        _set_task_join_will_block(False)
        check(result.state, "embedded", result)
        return Run(seconds, self_cpu() - cpu)

    def through_redis(store: Path) -> Run:
        cpu, cpu_worker = self_cpu(), group_cpu([worker])
        start, t0 = time.perf_counter(), time.time()
        job = planned(str(store), spec, info)
        t_plan = time.time()
        enqueue_sized(app, str(store), job.job_id, range(job.n_batches))
        t_enqueue = time.time()
        result = wait(str(store), job.job_id, counters, timeout=JOB_TIMEOUT)
        seconds, t_end = time.perf_counter() - start, time.time()
        check(result.state, "redis", result)
        alive(worker)
        started = counters.started(job.job_id) or t_enqueue
        finished = _iso_seconds(str(attrs(open_job(str(store), job.job_id, mode="r"))["finished"]))
        stages = {
            "plan": t_plan - t0,
            "enqueue": t_enqueue - t_plan,
            "first pickup": started - t_enqueue,  # negative: it started during the enqueue
            "worker span": finished - started,
            "wait tail": t_end - finished,
        }
        return Run(seconds, self_cpu() - cpu, group_cpu([worker]) - cpu_worker, stages)

    methods: dict[str, Callable[[Path], Run]] = {
        "in-process": in_process,
        "redis": through_redis,
        "task loop": task_loop,
    }
    if not args.no_embedded:
        methods["embedded"] = embedded
    result = Overhead(args.images, {name: [] for name in methods})
    for name, method in methods.items():  # warm-up: imports, model load in the worker child
        method(tmp / f"warm-{name}")
    for r in range(args.repeats):
        for name, method in methods.items():
            run = method(tmp / f"store-{name}-{r}")
            result.runs[name].append(run)
            extra = ""
            if run.stages:
                extra = f", worker CPU {run.cpu_worker:.2f} s; " + ", ".join(
                    f"{k} {v:.2f}" for k, v in run.stages.items()
                )
            print(
                f"  repeat {r + 1} {name:<10} {run.seconds:6.2f} s "
                f"{args.images / run.seconds:7.0f} images/s, this process CPU "
                f"{run.cpu_self:.2f} s{extra}",
                flush=True,
            )
    procs.stop([worker])
    decoders.shutdown()
    return result


def _iso_seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def print_overhead(result: Overhead) -> None:
    base, _ = result.rates("in-process")
    print(f"\n  {'method':<11} {'median img/s':>12} {'best img/s':>11} {'vs in-process':>14}")
    for method in result.runs:
        median, best = result.rates(method)
        print(f"  {method:<11} {median:12.0f} {best:11.0f} {median / base:13.2f}x")
    runs = result.runs["redis"]
    print(f"  redis / in-process, median of the {len(runs)} pairs: {result.paired():.2f}x")
    names = list(runs[0].stages)
    stages = {k: statistics.median(r.stages[k] for r in runs) for k in names}
    total = statistics.median(r.seconds for r in runs)
    print(
        f"  redis, median seconds of {total:.2f} end to end: "
        + ", ".join(f"{k} {v:.3f}" for k, v in stages.items())
        + f"; worker CPU {statistics.median(r.cpu_worker for r in runs):.2f} s, "
        f"{result.images / stages['worker span']:.0f} images/s inside the worker"
    )


# --- 2. scaling, simulated ----------------------------------------------------------------

Enqueue = Callable[[Any, str, str, Iterable[int]], int]


def enqueue_sized(app: Any, store: str, job_id: str, batches: Iterable[int]) -> int:
    """`workers.lifecycle.submit.send_batches` as the CLI and the API call it: tasks of
    consecutive batches cut by `workers.lifecycle.submit.task_groups` for the workers on the
    roster (at most `ACTMAP_BATCHES_PER_TASK` to a task)."""
    jobs = CeleryQueue(app, Roster(app.conf.broker_url).size)
    return send_batches(jobs, store, job_id, batches, "extract", Settings().batches_per_task)


def enqueue(app: Any, store: str, job_id: str, batches: Iterable[int]) -> int:
    """One batch to a task."""
    return send_batches(CeleryQueue(app), store, job_id, batches, "extract", 1)


@dataclass(frozen=True)
class Variant:
    send: Enqueue
    prefill: bool  # enqueue everything while the workers do not consume, then time the drain


VARIANTS = {
    "as is": Variant(enqueue_sized, prefill=False),
    "one per task": Variant(enqueue, prefill=False),
    "pre-filled": Variant(enqueue_sized, prefill=True),
}


@dataclass
class Round:
    batches: int
    elapsed: float
    enqueue_s: float
    commands: dict[str, int]
    redis_cpu: float
    worker_cpu: float
    submit_cpu: float
    polls: int


def command_calls(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def redis_cpu(client: redis.Redis) -> float:
    cpu: dict[str, Any] = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def sim_round(
    app: Any,
    client: redis.Redis,
    workers: tuple[list[subprocess.Popen[bytes]], list[str]],
    batches: int,
    variant: Variant,
) -> Round:
    """Enqueue `batches` batches of a new job and poll its done set until all are in. The
    clock starts at the first enqueue, or for a pre-filled queue when the workers are told
    to consume again."""
    procs, names = workers
    job_id = f"sim-{os.urandom(4).hex()}"
    done_key = f"actmap:{job_id}:done"
    if variant.prefill:
        app.control.cancel_consumer("extract", destination=names, reply=True, timeout=10)
    before, cpu_redis = command_calls(client), redis_cpu(client)
    cpu_workers, cpu_self = group_cpu(procs), self_cpu()
    polls = 0
    start = time.perf_counter()
    # The batch count rides in the store argument so the last task can claim the finalize.
    variant.send(app, f"sim://bench#{batches}", job_id, range(batches))
    enqueue_s = time.perf_counter() - start
    if variant.prefill:
        start = time.perf_counter()
        replies = app.control.add_consumer("extract", destination=names, reply=True, timeout=10)
        if len(replies or []) != len(names):
            raise RuntimeError(f"add_consumer answered by {replies}, not by all of {names}")
    deadline = start + JOB_TIMEOUT
    while True:
        polls += 1
        if int(client.scard(done_key)) >= batches:
            break
        if time.perf_counter() > deadline:
            raise TimeoutError(f"simulated job {job_id} not done after {JOB_TIMEOUT:.0f} s")
        time.sleep(POLL)
    elapsed = time.perf_counter() - start
    submit = self_cpu() - cpu_self
    worker = group_cpu(procs) - cpu_workers
    cpu = redis_cpu(client) - cpu_redis
    after = command_calls(client)
    diff = {k: v - before.get(k, 0) for k, v in after.items()}
    diff["scard"] = diff.get("scard", 0) - polls  # our own polls
    diff["info"] = diff.get("info", 0) - 3  # our own INFO calls (the 4th runs after the read)
    diff = {k: v for k, v in diff.items() if v > 0}
    return Round(batches, elapsed, enqueue_s, diff, cpu, worker, submit, polls)


Key = tuple[int, float, str]  # simulated workers, sleep per batch, enqueue variant


@dataclass
class Scaling:
    rounds: dict[Key, list[Round]] = field(default_factory=dict)

    def median(self, key: Key) -> Round:
        rounds = sorted(self.rounds[key], key=lambda r: r.elapsed)
        return rounds[len(rounds) // 2]

    def efficiency(self, key: Key) -> float:
        n, sleep, _ = key
        r = self.median(key)
        return r.batches / r.elapsed / (n / sleep)


def start_sim_workers(
    procs: Processes, n: int, env: dict[str, str]
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """n simulated GPUs as pool threads, at most THREADS_PER_PROCESS per worker process."""
    n_procs = -(-n // THREADS_PER_PROCESS)
    threads = [n // n_procs + (1 if i < n % n_procs else 0) for i in range(n_procs)]
    names = [f"sim{n}-{i}@localhost" for i in range(n_procs)]
    workers = []
    for i, (k, name) in enumerate(zip(threads, names, strict=True)):
        cmd = [
            sys.executable, "-m", "celery", "-A", "tests.bench.sim_worker", "worker",
            "--pool", "threads", "--concurrency", str(k), "--prefetch-multiplier", "1",
            "--hostname", name, "--queues", "extract", "--without-gossip",
            "--without-mingle", "--loglevel", "WARNING",
        ]  # fmt: skip
        gpus = {"ACTMAP_BENCH_GPUS": str(k)}  # each pool thread checks in as a worker
        workers.append(procs.start(f"sim-{n}-{i}", cmd, {**env, **gpus}))
    return workers, names


def scaling(args: argparse.Namespace, procs: Processes, url: str) -> Scaling:
    """Each (N, sleep) on freshly started workers; the variants interleaved per repeat."""
    plans: list[tuple[int, float, list[str]]] = [
        (n, args.sleep, list(VARIANTS) if n in args.compare_at else ["as is"]) for n in args.workers
    ]
    if args.control_sleep:
        plans.append((max(args.workers), args.control_sleep, ["as is"]))
    client = redis.Redis.from_url(url)
    app = make_celery(Settings(broker_url=SecretStr(url)))
    result = Scaling()
    try:
        for n, sleep, variants in plans:
            env = {**os.environ, "ACTMAP_BROKER_URL": url, "ACTMAP_BENCH_SLEEP": str(sleep)}
            env["CUDA_VISIBLE_DEVICES"] = ""
            workers, names = start_sim_workers(procs, n, env)
            try:
                wait_ready(app, names, workers, READY_TIMEOUT)
                batches = max(200, round(n * args.seconds / sleep))
                ideal = n / sleep
                for r in range(args.repeats):
                    for variant in variants:  # interleaved: A B C A B C ...
                        one = sim_round(app, client, (workers, names), batches, VARIANTS[variant])
                        result.rounds.setdefault((n, sleep, variant), []).append(one)
                        print(
                            f"  N={n:<3} {sleep * 1e3:3.0f} ms {variant:<10} repeat {r + 1}: "
                            f"{batches} batches in {one.elapsed:6.2f} s (enqueue "
                            f"{one.enqueue_s:5.2f} s), {batches / one.elapsed:7.1f}/s of "
                            f"{ideal:.0f}/s ideal: {batches / one.elapsed / ideal:.3f}",
                            flush=True,
                        )
                        for proc in workers:
                            if proc.poll() is not None:
                                raise RuntimeError(f"a simulated worker exited: {proc.returncode}")
            finally:
                procs.stop(workers)
                client.delete("actmap:roster:extract")  # a worker killed late stays on it
    finally:
        client.close()
    return result


def print_scaling(result: Scaling) -> None:
    cores = os.cpu_count() or 1
    print(
        f"\n  {'N':>3} | {'sleep':>6} | {'enqueue':<10} | {'batches':>7} | {'elapsed s':>9} | "
        f"{'achieved/s':>10} | {'ideal/s':>7} | {'efficiency':>10} | {'redis cmds/b':>12} | "
        f"{'enqueue/s':>9} | {'CPU ms/b: redis':>15} | {'workers':>7} | {'submit':>6} | "
        f"{'cores at ideal':>14}"
    )
    for key in result.rounds:
        n, sleep, variant = key
        r = result.median(key)
        achieved, ideal = r.batches / r.elapsed, n / sleep
        cpu = r.redis_cpu + r.worker_cpu + r.submit_cpu
        print(
            f"  {n:>3} | {sleep * 1e3:>3.0f} ms | {variant:<10} | {r.batches:>7} | "
            f"{r.elapsed:>9.2f} | {achieved:>10.1f} | {ideal:>7.0f} | {achieved / ideal:>10.3f} | "
            f"{sum(r.commands.values()) / r.batches:>12.1f} | {r.batches / r.enqueue_s:>9.0f} | "
            f"{r.redis_cpu / r.batches * 1e3:>15.3f} | {r.worker_cpu / r.batches * 1e3:>7.2f} | "
            f"{r.submit_cpu / r.batches * 1e3:>6.2f} | {cpu / r.batches * ideal:>9.2f} of {cores}"
        )
    print(
        "  as is: workers.lifecycle.submit.send_batches, tasks cut for the workers on the roster; "
        "one per\n"
        "  task: a task for each batch; pre-filled: as is, but the queue is filled while the\n"
        "  workers do not consume and the clock starts when they resume (the submitter out of\n"
        "  the loop).\n"
        "  CPU ms per batch of Redis, of the worker processes and of this submitter (which also\n"
        "  polls); cores at ideal: the CPU all of them would need at the ideal rate."
    )
    largest = max(n for n, _, _ in result.rounds)
    for key in result.rounds:
        n, sleep, variant = key
        if n != largest or variant == "pre-filled":
            continue
        r = result.median(key)
        top = sorted(r.commands.items(), key=lambda kv: -kv[1])
        print(
            f"  Redis commands per batch, N={n}, {sleep * 1e3:.0f} ms, {variant}: "
            + ", ".join(f"{k} {v / r.batches:.2f}" for k, v in top if v / r.batches >= 0.05)
        )


# --- main ---------------------------------------------------------------------------------


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--images", type=int, default=2048, help="inputs of the overhead job")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    p.add_argument("--sleep", type=float, default=0.05, help="simulated forward pass, seconds")
    p.add_argument("--workers", default="1,4,16,64", help="simulated GPU worker counts")
    p.add_argument(
        "--seconds", type=float, default=5.0, help="work per round at the ideal rate, seconds"
    )
    p.add_argument(
        "--control-sleep", type=float, default=0.2,
        help="also run the largest N at this sleep, where the machine's CPU is not the limit "
        "(0: skip)",
    )  # fmt: skip
    p.add_argument(
        "--compare-at", default="4,16,64",
        help="worker counts at which the enqueue variants 'one per task' and 'pre-filled' "
        "run too, interleaved with 'as is'",
    )  # fmt: skip
    p.add_argument(
        "--torch-threads", type=int, default=1,
        help="torch intra-op threads here and in the worker (0: torch's default, all cores)",
    )  # fmt: skip
    p.add_argument("--redis-server", default="/usr/bin/redis-server")
    p.add_argument(
        "--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
        help="where the stores live (default /dev/shm: a shared disk's writeback is noise "
        "that falls on every method unevenly)",
    )  # fmt: skip
    p.add_argument(
        "--no-embedded", action="store_true", help="skip workers.execution.embedded.scan"
    )
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    args.compare_at = [int(w) for w in args.compare_at.split(",") if w.strip()]
    signal.signal(signal.SIGTERM, _interrupt)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
        f"load average {load()}",
        flush=True,
    )
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="actmap-queue-", dir=args.dir) as name,
        ExitStack() as stack,
    ):
        tmp = Path(name)
        (tmp / "logs").mkdir()
        (tmp / "redis").mkdir()
        procs = Processes(tmp / "logs")
        # On any exit, in this order: the workers, then Redis, then anything left.
        stack.callback(procs.stop_all)
        url = stack.enter_context(private_redis(procs, args.redis_server, tmp / "redis"))
        stack.callback(procs.stop)
        print(f"private Redis at {url.rsplit('/', 1)[0]}; stores under {tmp}", flush=True)
        over = scale = None
        if not args.skip_overhead:
            print(
                f"\n1. Per-task overhead: {MODEL}, layers {','.join(LAYERS)}, float16, batch "
                f"{BATCH}, {args.images} .npy inputs, {args.repeats} repeats (interleaved)",
                flush=True,
            )
            over = overhead(args, tmp, procs, url)
            print_overhead(over)
        if not args.skip_scaling:
            print(
                f"\n2. Scaling, simulated: sleep {args.sleep * 1e3:.0f} ms per batch, N = "
                f"{','.join(map(str, args.workers))} (and {max(args.workers)} at "
                f"{args.control_sleep * 1e3:.0f} ms), {THREADS_PER_PROCESS} threads per worker "
                f"process at most, {args.repeats} repeats each",
                flush=True,
            )
            scale = scaling(args, procs, url)
            print_scaling(scale)
        print(f"\nSummary (load average now {load()}; {time.monotonic() - began:.0f} s in all)")
        if over is not None:
            base, _ = over.rates("in-process")
            for method in over.runs:
                median, _ = over.rates(method)
                print(f"  {method:<11} {median:7.0f} images/s  {median / base:.2f}x in-process")
            target = over.rates("redis")[0] / base
            print(
                f"  redis / in-process at batch {BATCH}: {target:.2f}x, median of pairs "
                f"{over.paired():.2f}x (target 0.95x or better)"
            )
        if scale is not None:
            for key in scale.rounds:
                n, sleep, variant = key
                r = scale.median(key)
                print(
                    f"  N={n:<3} {sleep * 1e3:3.0f} ms {variant:<10} efficiency "
                    f"{scale.efficiency(key):.3f}, "
                    f"{sum(r.commands.values()) / r.batches:.1f} Redis commands per batch"
                )
            if (64, args.sleep, "as is") in scale.rounds:
                eff = scale.efficiency((64, args.sleep, "as is"))
                print(f"  efficiency at 64 workers: {eff:.3f} (target 0.9 or better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
