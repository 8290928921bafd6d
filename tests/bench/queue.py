"""Queue overhead and scaling: actmap through Redis against in-process, and simulated GPUs.

Run from the repository root (needs redis-server; about 3 to 5 minutes on 2 cores):

    .venv/bin/python tests/bench/queue.py [--images 2048] [--repeats 3]
        [--sleep 0.05] [--workers 1,4,16,64] [--per-worker 20] [--skip-overhead|--skip-scaling]

It starts a private `redis-server` on a free port (no persistence, in a temporary
directory; never the machine's own), starts and stops every worker process itself in its
own process group, and kills all of them and the Redis server on exit, Ctrl-C included.

1. Per-task overhead. The same job (the bundled model `digits-cnn`, layers conv1, block2
   and conv3 stored as float16, batch 32, on `--images` seeded random (1, 28, 28) `.npy`
   inputs, a fresh store and job each time) run three ways, interleaved A B C A B C over
   `--repeats` repeats after one untimed warm-up of each, model loads outside the timing:
   - in-process: `workers.pipeline.plan` + `workers.runner.run_job` (the pipelined runner);
   - embedded:   `workers.embedded.scan`, the same Celery tasks on the in-memory transport
                 drained by a worker thread (this path builds its own app and model cache,
                 so its time includes a model load and the worker thread's start and stop);
   - redis:      plan + `workers.control.enqueue` + `workers.control.wait` (with
                 RedisCounters, its default 0.2 s poll) against one real CPU worker process,
                 exactly the command `actmap worker --cpu 1` runs (`workers.launcher.command`:
                 prefork, concurrency 1, prefetch 1). The submit side is timed end to end;
                 the worker's own span (first batch started to job finalized) is shown apart.
   It prints images/s per method (median and best) and the ratios against in-process.

2. Scaling, simulated. N simulated GPU workers (tests/bench/sim_worker.py: the real
   `make_celery` app and task name, acks late, prefetch 1, the real `RedisCounters` calls,
   a `time.sleep(--sleep)` forward pass that uses no CPU), as Celery `--pool threads`
   processes of at most 16 threads each, one thread per GPU. For each N it enqueues
   M = max(200, per-worker x N) batches with `workers.control.enqueue` and times from the
   first enqueue to the last batch in the done set (polled every 5 ms); achieved = M /
   elapsed, ideal = N / sleep. Redis commands per batch come from `INFO commandstats`
   (this script's own polls and INFO calls taken out), and the CPU seconds per batch of
   Redis, of the worker processes and of the submitter show which shared part saturates
   first. Each N is run `--repeats` times on the same workers; the median is shown.

Every figure comes from one run on one machine; nothing here is an assertion. The load
average is printed before and after: other processes on the machine skew every figure.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named queue.py: run as a script, its folder would come first on sys.path and
# shadow the standard library's `queue` (which celery, kombu and concurrent.futures import).
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import ExitStack, contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402
from pydantic import SecretStr  # noqa: E402

from workers.celery_app import make_celery  # noqa: E402
from workers.control import enqueue, wait  # noqa: E402
from workers.counters import RedisCounters  # noqa: E402
from workers.embedded import scan  # noqa: E402
from workers.extraction.cache import ModelCache  # noqa: E402
from workers.gpu import Slot  # noqa: E402
from workers.jobs import ExtractionSpec  # noqa: E402
from workers.launcher import command  # noqa: E402
from workers.pipeline import plan  # noqa: E402
from workers.runner import run_job  # noqa: E402
from workers.settings import Settings  # noqa: E402
from workers.storage.layout import attrs, open_job  # noqa: E402

BATCH = 32
MODEL = "digits-cnn"
LAYERS = ("conv1", "block2", "conv3")
THREADS_PER_PROCESS = 16  # simulated GPUs per `--pool threads` worker process
POLL = 0.005  # seconds between polls of the done set in the simulation
READY_TIMEOUT = 120.0  # seconds for a worker process to answer a ping
JOB_TIMEOUT = 300.0  # seconds before a job is declared hung


# --- processes: a private Redis and worker processes, each in its own process group -------


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port != 6379:  # never the machine's own Redis
            return port


class Processes:
    """Every process this script starts, each the leader of a new process group, so that
    stopping one stops its children too (the prefork pool, say)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Any:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.running.append(proc)
        return proc

    def stop(self, procs: list[subprocess.Popen[bytes]] | None = None, grace: float = 20) -> None:
        """SIGTERM (Celery's warm shutdown) to each group, SIGKILL to what is left."""
        chosen = list(self.running if procs is None else procs)
        for proc in chosen:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in chosen:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._signal(proc, signal.SIGKILL)  # the group: stray pool children too
            proc.wait()
            self.running.remove(proc)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@contextmanager
def private_redis(procs: Processes, binary: str, folder: Path) -> Iterator[str]:
    """A throwaway redis-server on a free port: no RDB, no AOF, its files in `folder`."""
    port = free_port()
    server = procs.start(
        "redis",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(folder)],
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


def group_cpu(procs: list[Any]) -> float:
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


def wait_ready(app: Any, hostnames: list[str], procs: list[Any], timeout: float) -> None:
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
    worker_span: float | None = None  # first batch started -> job finalized, worker side


@dataclass
class Overhead:
    images: int
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def rates(self, method: str) -> tuple[float, float]:
        """(median, best) images/s."""
        seconds = [r.seconds for r in self.runs[method]]
        return self.images / statistics.median(seconds), self.images / min(seconds)


def check(state: str, method: str, job: Any) -> None:
    if state != "succeeded":
        raise RuntimeError(f"{method}: job ended {state}: {job}")


def overhead(args: argparse.Namespace, tmp: Path, procs: Processes, url: str) -> Overhead:
    inputs = tmp / "inputs"
    make_inputs(inputs, args.images)
    spec = ExtractionSpec(model=MODEL, layers=LAYERS, inputs=(str(inputs),), batch_size=BATCH)
    local = Settings(store=str(tmp / "unused"), broker_url=None)
    models = ModelCache(local.device, factories=local.factories)
    info = models.get(spec).info

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
    if worker.poll() is not None:
        raise RuntimeError("the worker exited")

    def in_process(store: Path) -> Run:
        cpu = self_cpu()
        start = time.perf_counter()
        job = plan(str(store), spec, info)
        result = run_job(str(store), job.job_id, models, None, local.decode_threads)
        seconds = time.perf_counter() - start
        check(result["state"], "in-process", result)
        return Run(seconds, self_cpu() - cpu)

    def embedded(store: Path) -> Run:
        cpu = self_cpu()
        start = time.perf_counter()
        result = scan(spec, str(store), local)
        seconds = time.perf_counter() - start
        check(result.state, "embedded", result)
        return Run(seconds, self_cpu() - cpu)

    def through_redis(store: Path) -> Run:
        cpu, cpu_worker = self_cpu(), group_cpu([worker])
        start = time.perf_counter()
        job = plan(str(store), spec, info)
        enqueue(app, str(store), job.job_id, range(job.n_batches))
        result = wait(str(store), job.job_id, counters, timeout=JOB_TIMEOUT)
        seconds = time.perf_counter() - start
        check(result.state, "redis", result)
        if worker.poll() is not None:
            raise RuntimeError("the worker exited")
        started = counters.started(job.job_id)
        finished = attrs(open_job(str(store), job.job_id, mode="r")).get("finished")
        span = None
        if started and finished:
            span = _iso_seconds(str(finished)) - started
        return Run(seconds, self_cpu() - cpu, group_cpu([worker]) - cpu_worker, span)

    methods: dict[str, Callable[[Path], Run]] = {
        "in-process": in_process,
        "redis": through_redis,
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
            if run.worker_span is not None:
                extra = f", worker span {run.worker_span:.2f} s, worker CPU {run.cpu_worker:.2f} s"
            print(
                f"  repeat {r + 1} {name:<10} {run.seconds:6.2f} s "
                f"{args.images / run.seconds:7.0f} images/s, this process CPU "
                f"{run.cpu_self:.2f} s{extra}",
                flush=True,
            )
    procs.stop([worker])
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
    spans = [r.worker_span for r in runs if r.worker_span is not None]
    if spans:
        span = statistics.median(spans)
        total = statistics.median(r.seconds for r in runs)
        cpu = statistics.median(r.cpu_worker for r in runs)
        print(
            f"  redis: worker span {span:.2f} s of {total:.2f} s end to end "
            f"({result.images / span:.0f} images/s inside the worker; the rest is plan, "
            f"enqueue, queue pickup and the 0.2 s wait poll); worker CPU {cpu:.2f} s"
        )


# --- 2. scaling, simulated ----------------------------------------------------------------


@dataclass
class Round:
    batches: int
    elapsed: float
    enqueue_s: float
    commands: dict[str, int]
    redis_cpu: float
    worker_cpu: float
    submit_cpu: float


def command_calls(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def redis_cpu(client: redis.Redis) -> float:
    cpu: dict[str, Any] = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def sim_round(app: Any, client: redis.Redis, workers: list[Any], batches: int, tag: str) -> Round:
    job_id = f"sim-{tag}-{os.urandom(3).hex()}"
    done_key = f"actmap:{job_id}:done"
    before, cpu_redis = command_calls(client), redis_cpu(client)
    cpu_workers, cpu_self = group_cpu(workers), self_cpu()
    polls = 0
    start = time.perf_counter()
    enqueue(app, f"sim://bench#{batches}", job_id, range(batches))
    enqueued = time.perf_counter()
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
    worker = group_cpu(workers) - cpu_workers
    cpu = redis_cpu(client) - cpu_redis
    after = command_calls(client)
    diff = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    diff["scard"] = diff.get("scard", 0) - polls  # our own polls
    diff["info"] = diff.get("info", 0) - 3  # our own INFO calls
    diff = {k: v for k, v in diff.items() if v > 0}
    return Round(batches, elapsed, enqueued - start, diff, cpu, worker, submit)


@dataclass
class Scaling:
    sleep: float
    rounds: dict[int, list[Round]] = field(default_factory=dict)

    def median(self, n: int) -> Round:
        rounds = sorted(self.rounds[n], key=lambda r: r.elapsed)
        return rounds[len(rounds) // 2]


def scaling(args: argparse.Namespace, procs: Processes, url: str) -> Scaling:
    client = redis.Redis.from_url(url)
    app = make_celery(Settings(broker_url=SecretStr(url)))
    env = {**os.environ, "ACTMAP_BROKER_URL": url, "ACTMAP_BENCH_SLEEP": str(args.sleep)}
    env["PYTHONPATH"] = str(ROOT)
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = Scaling(args.sleep)
    for n in args.workers:
        n_procs = -(-n // THREADS_PER_PROCESS)
        threads = [n // n_procs + (1 if i < n % n_procs else 0) for i in range(n_procs)]
        names = [f"sim{n}-{i}@localhost" for i in range(n_procs)]
        workers = [
            procs.start(
                f"sim-{n}-{i}",
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "tests.bench.sim_worker",
                    "worker",
                    "--pool",
                    "threads",
                    "--concurrency",
                    str(k),
                    "--prefetch-multiplier",
                    "1",
                    "--hostname",
                    name,
                    "--queues",
                    "extract",
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel",
                    "WARNING",
                ],
                env,
            )  # fmt: skip
            for i, (k, name) in enumerate(zip(threads, names, strict=True))
        ]
        try:
            wait_ready(app, names, workers, READY_TIMEOUT)
            batches = max(200, args.per_worker * n)
            ideal = n / args.sleep
            result.rounds[n] = []
            for r in range(args.repeats):
                one = sim_round(app, client, workers, batches, f"{n}-{r}")
                result.rounds[n].append(one)
                print(
                    f"  N={n:<3} repeat {r + 1}: {batches} batches in {one.elapsed:6.2f} s "
                    f"(enqueue {one.enqueue_s:5.2f} s), {batches / one.elapsed:7.1f}/s of "
                    f"{ideal:.0f}/s ideal: {batches / one.elapsed / ideal:.3f}",
                    flush=True,
                )
                for proc in workers:
                    if proc.poll() is not None:
                        raise RuntimeError(f"a simulated worker exited with {proc.returncode}")
        finally:
            procs.stop(workers)
    client.close()
    return result


def print_scaling(result: Scaling) -> None:
    print(
        f"\n  {'N':>3} | {'batches':>7} | {'elapsed s':>9} | {'achieved/s':>10} | "
        f"{'ideal/s':>7} | {'efficiency':>10} | {'redis cmds/batch':>16} | "
        f"{'redis CPU us/b':>14} | {'worker CPU ms/b':>15} | {'submit CPU ms/b':>15} | "
        f"{'enqueue/s':>9}"
    )
    for n in result.rounds:
        r = result.median(n)
        achieved, ideal = r.batches / r.elapsed, n / result.sleep
        print(
            f"  {n:>3} | {r.batches:>7} | {r.elapsed:>9.2f} | {achieved:>10.1f} | "
            f"{ideal:>7.0f} | {achieved / ideal:>10.3f} | "
            f"{sum(r.commands.values()) / r.batches:>16.1f} | "
            f"{r.redis_cpu / r.batches * 1e6:>14.0f} | {r.worker_cpu / r.batches * 1e3:>15.2f} | "
            f"{r.submit_cpu / r.batches * 1e3:>15.2f} | {r.batches / r.enqueue_s:>9.0f}"
        )
    largest = max(result.rounds)
    r = result.median(largest)
    top = sorted(r.commands.items(), key=lambda kv: -kv[1])
    print(
        f"  Redis commands per batch at N={largest}: "
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
    p.add_argument("--per-worker", type=int, default=20, help="batches per simulated worker")
    p.add_argument(
        "--torch-threads", type=int, default=1,
        help="torch intra-op threads here and in the worker (0: torch's default, all cores)",
    )  # fmt: skip
    p.add_argument("--redis-server", default="/usr/bin/redis-server")
    p.add_argument("--no-embedded", action="store_true", help="skip workers.embedded.scan")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    signal.signal(signal.SIGTERM, _interrupt)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
        f"load average {load()}",
        flush=True,
    )
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="actmap-queue-") as name, ExitStack() as stack:
        tmp = Path(name)
        (tmp / "logs").mkdir()
        (tmp / "redis").mkdir()
        procs = Processes(tmp / "logs")
        stack.callback(procs.stop)  # whatever is still running, on any exit
        url = stack.enter_context(private_redis(procs, args.redis_server, tmp / "redis"))
        print(f"private Redis at {url.rsplit('/', 1)[0]}", flush=True)
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
                f"{','.join(map(str, args.workers))}, {THREADS_PER_PROCESS} threads per worker "
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
            print(f"  redis / in-process at batch {BATCH}: {target:.2f}x (target 0.95x or better)")
        if scale is not None:
            for n in scale.rounds:
                r = scale.median(n)
                print(
                    f"  N={n:<3} efficiency {r.batches / r.elapsed / (n / scale.sleep):.3f}, "
                    f"{sum(r.commands.values()) / r.batches:.1f} Redis commands per batch"
                )
            if 64 in scale.rounds:
                r = scale.median(64)
                eff = r.batches / r.elapsed / (64 / scale.sleep)
                print(f"  efficiency at 64 workers: {eff:.3f} (target 0.9 or better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
