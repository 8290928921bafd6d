"""One sample screened through the API with a warm worker: how long until its answer?

Run from the repository root (needs redis-server; about 2 minutes on 2 shared cores):

    nice -n 10 .venv/bin/python tests/bench/screen_latency.py --threads 1 [--requests 200]
        [--warmup 5] [--poll 0.01] [--redis-server /usr/bin/redis-server]

What it starts, with tests/bench/api.py's helpers (each process leads a process group of its
own, stopped in `finally`; logs in a temporary folder, shown on a failure): a private
`redis-server` on a free port (never the machine's own Redis), one `actmap serve` (an auth file
with one tenant whose root holds a copy of the 40 labelled demo digits) and one CPU worker,
`actmap worker --cpu 1 --queues screen,extract,analysis`, with `--threads` torch threads.

Setup, through the API: the bundled model registered; a reference extraction of the 40 demo
digits (labels from their folders, the layers conv1, conv2, conv3, pool); a screening profile
fitted on it (POST /v1/analyses/profiles, FPR 0.05, the default detectors and combination).

Then `--warmup` untimed and `--requests` timed screenings of each path, interleaved (a job,
then a sample, alternating which goes first), one demo digit each:

* job: a screening job (what `actmap screen run --api` does): POST /v1/jobs/screenings with
  the digit's server path, poll GET /v1/jobs/{id} every `--poll` seconds until it is
  finished, then GET /v1/jobs/{id}/screen (the score, the flag and the threshold);
* sample: the digit's bytes screened now (what `actmap screen sample --api` does): POST
  /v1/analyses/{profile}/screen, answered by the worker, nothing stored. Its parts, from the
  response's Server-Timing: worker (the task's own work: decode, forward, score), broker
  (the rest of the API's wait: the queue, Redis, the handover to the worker's child) and api
  (the rest: HTTP, the token, the profile's check, the body).

Then `--alone` one-sample screenings back to back, with no job between them (a screening
queue's steady state: the worker's child has only these to do).

Printed: p50, p95 and max of each path's whole request and of the job path's parts (submit:
until the 202; wait: until the poll that saw the job finished; answer: the score's GET), the
share flagged, how far apart the two paths' scores of each digit are, and the load average
before and after. Every figure comes from one run on one machine; nothing here is an
assertion.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Python put this script's folder first on sys.path, where tests/bench/api.py would shadow
# the project's `api` package: take it off before importing anything else.
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from api.client import Client  # noqa: E402
from tests.bench.api import (  # noqa: E402
    FINISHED,
    JOB_TIMEOUT,
    READY_TIMEOUT,
    TOKEN,
    Processes,
    Stack,
    actmap,
    load,
    register,
    start_redis,
    until,
    write_auth,
)

LAYERS = ("conv1", "conv2", "conv3", "pool")
FPR = 0.05


def finished(client: Client, job_id: str, poll: float) -> dict[str, Any]:
    began = time.monotonic()
    while True:
        current: dict[str, Any] = client.request("GET", f"/v1/jobs/{job_id}").json()
        if current["state"] in FINISHED and current["finished"] is not None:
            return current
        if time.monotonic() - began > JOB_TIMEOUT:
            raise TimeoutError(f"job {job_id} still {current['state']} after {JOB_TIMEOUT} s")
        time.sleep(poll)


def fit_profile(client: Client, model_id: str, digits: list[Path], poll: float) -> str:
    """A reference job of the labelled demo digits, and a profile fitted on it."""
    job = client.submit_extraction(
        model_id, inputs=[str(p) for p in digits], layers=list(LAYERS), labels_from_dirs=True
    )
    done = finished(client, job.id, poll)
    if done["state"] != "succeeded":
        raise RuntimeError(f"the reference job ended {done['state']}: {done}")
    body = {"reference_job": job.id, "fpr": FPR}
    profile = client.request("POST", "/v1/analyses/profiles", json=body).json()["analysis_id"]

    def fitted() -> bool:
        found = client.request("GET", f"/v1/analyses/{profile}").json()
        if found["state"] not in ("queued", "running", "succeeded"):
            raise RuntimeError(f"the profile ended {found['state']}: {found.get('reason')}")
        return bool(found["state"] == "succeeded")

    until(fitted, READY_TIMEOUT, "the profile's fit", every=0.1)
    return str(profile)


def one_request(client: Client, profile: str, digit: Path, poll: float) -> dict[str, float]:
    """Seconds of each part of one single-sample screening; 'flagged' is 1.0 or 0.0."""
    t0 = time.perf_counter()
    body = {"profile_id": profile, "inputs": [str(digit)]}
    job_id = client.request("POST", "/v1/jobs/screenings", json=body).json()["job_id"]
    t1 = time.perf_counter()
    state = finished(client, job_id, poll)["state"]
    t2 = time.perf_counter()
    answer = client.request("GET", f"/v1/jobs/{job_id}/screen").json()
    t3 = time.perf_counter()
    if state != "succeeded" or answer["scores"][0] is None:
        raise RuntimeError(f"screening {job_id} ended {state}: {answer}")
    return {"submit": t1 - t0, "wait": t2 - t1, "answer": t3 - t2, "total": t3 - t0,
            "score": answer["scores"][0], "flagged": float(answer["flags"][0])}  # fmt: skip


def one_sample(client: Client, profile: str, digit: Path) -> dict[str, float]:
    """Seconds of one screening of the digit's bytes, its score, and 'flagged' (1.0, 0.0)."""
    data = digit.read_bytes()
    t0 = time.perf_counter()
    response = client.request(
        "POST", f"/v1/analyses/{profile}/screen", params={"name": digit.name}, content=data,
        headers={"Content-Type": "application/octet-stream"},
    )  # fmt: skip
    total = time.perf_counter() - t0
    answer = response.json()
    timing = response.headers["Server-Timing"]
    parts = {
        name: float(dur.removeprefix("dur=")) / 1e3
        for name, dur in (part.strip().split(";") for part in timing.split(","))
    }
    return {"total": total, "worker": parts["worker"], "broker": parts["broker"],
            "api": total - parts["worker"] - parts["broker"], "score": answer["score"],
            "flagged": float(answer["flag"])}  # fmt: skip


def _row(name: str, seconds: list[float]) -> str:
    v = np.array(seconds) * 1e3
    return f"{name:<16}{np.percentile(v, 50):>8.1f}{np.percentile(v, 95):>8.1f}{v.max():>8.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--requests", type=int, default=200, help="timed screenings")
    p.add_argument("--warmup", type=int, default=5, help="untimed screenings first")
    p.add_argument(
        "--alone", type=int, default=200, help="then one-sample screenings with no job between"
    )
    p.add_argument("--poll", type=float, default=0.01, help="status poll interval, seconds")
    p.add_argument("--threads", type=int, default=1, help="the worker's torch threads")
    p.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 1:
        p.error("--requests and --warmup must be at least 1")
    print(f"{os.cpu_count()} cores; load average {load()}", flush=True)
    began = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="actmap-bench-screen-"))
    (tmp / "logs").mkdir()
    (tmp / "redis").mkdir()
    procs = Processes(tmp / "logs")
    ok = False
    try:
        url = start_redis(procs, args.redis_server, tmp / "redis")
        data, auth = write_auth(tmp)
        stack = Stack(procs, tmp, url, data, auth)
        stack.start_api("screen")
        env = {**stack.env(stack.store("screen")), "OMP_NUM_THREADS": str(args.threads)}
        cmd = [*actmap(), "worker", "--cpu", "1", "--queues", "screen,extract,analysis"]
        procs.start("worker", cmd, env)
        stack.wait_api("screen")
        model_id = register(stack, ["screen"])["screen"]
        digits = sorted(data.glob("*/*.png"))
        with Client(stack.apis["screen"], TOKEN) as client:
            profile = fit_profile(client, model_id, digits, args.poll)
            print(f"ready after {time.monotonic() - began:.0f} s: profile {profile}", flush=True)
            for i in range(args.warmup):
                one_request(client, profile, digits[i % len(digits)], args.poll)
                one_sample(client, profile, digits[i % len(digits)])
            jobs, samples = [], []
            for i in range(args.requests):
                digit = digits[i % len(digits)]
                if i % 2:
                    samples.append(one_sample(client, profile, digit))
                    jobs.append(one_request(client, profile, digit, args.poll))
                else:
                    jobs.append(one_request(client, profile, digit, args.poll))
                    samples.append(one_sample(client, profile, digit))
            alone = [
                one_sample(client, profile, digits[i % len(digits)]) for i in range(args.alone)
            ]
        print(f"\n{args.requests} screenings of one digit by each path through the API, one "
              f"at a time, interleaved, {args.poll * 1e3:.0f} ms poll; ms:")  # fmt: skip
        print(f"{'path / part':<16}{'p50':>8}{'p95':>8}{'max':>8}")
        for part in ("submit", "wait", "answer", "total"):
            print(_row(f"job {part}", [t[part] for t in jobs]))
        for part in ("api", "broker", "worker", "total"):
            print(_row(f"sample {part}", [t[part] for t in samples]))
        if alone:
            print(f"then {args.alone} one-sample screenings back to back, no job between them:")
            for part in ("api", "broker", "worker", "total"):
                print(_row(f"alone {part}", [t[part] for t in alone]))
        by_job = np.array([t["score"] for t in jobs])
        apart = np.abs(np.array([t["score"] for t in samples]) - by_job) / np.abs(by_job)
        for name, trips in (("job", jobs), ("sample", samples)):
            flagged = np.mean([t["flagged"] for t in trips])
            print(f"{name}: {flagged:.1%} of the (clean) demo digits flagged")
        print(f"scores of the two paths apart by at most {apart.max():.2e} (relative), median "
              f"{np.median(apart):.2e}; load average {load()}; "
              f"{time.monotonic() - began:.0f} s")  # fmt: skip
        ok = True
    finally:
        ended = procs.stop([n for n in procs.running if n != "redis"])  # Redis last
        ended.update(procs.stop())
        if not ok:
            for name in ("api-screen", "worker"):
                print(procs.tail(name), file=sys.stderr)
            print(f"stopped: {ended}; logs kept in {tmp / 'logs'}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
