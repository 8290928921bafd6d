"""`actmap jobs list` on an object store: a page's statuses read one after another against
side by side (`PAGE_READERS`), in one interleaved run on a moto S3 server.

    python tests/bench/listing.py [--jobs 60] [--rounds 3]

Each status is a few small object reads, so on S3 a page of 50 costs 50 round trips of
latency when read in turn. Prints the median page time of each way and their ratio.
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
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402

from tests.bench.api import Processes, write_auth  # noqa: E402
from tests.bench.store_scale import Filler, _spec, _start_s3  # noqa: E402
from tests.oracle import planned, run_job  # noqa: E402
from workers.extraction.cache import ModelCache  # noqa: E402
from workers.lifecycle import state  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=60, help="jobs in the store")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each way")
    args = p.parse_args(argv)
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}; {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="actmap-bench-listing-"))
    (tmp / "logs").mkdir()
    procs = Processes(tmp / "logs")
    try:
        data, _ = write_auth(tmp)
        inputs = tuple(str(p) for p in sorted((data / "3").glob("*.png"))[:4])
        store = _start_s3(procs)
        models = ModelCache()
        template = planned(store, _spec(inputs), models.get(_spec(inputs)).info).job_id
        run_job(store, template, models)
        filler = Filler(store, template)
        while filler.count + 1 < args.jobs:
            filler.add(args.jobs - 1 - filler.count)
        times: dict[int, list[float]] = {1: [], state.PAGE_READERS: []}
        readers = list(times)
        for _ in range(args.rounds):
            for n in readers:
                state.PAGE_READERS = n
                began = time.perf_counter()
                page, _ = state.job_page(store, 50)
                times[n].append(time.perf_counter() - began)
                assert len(page) == 50
        serial, side = (statistics.median(times[n]) for n in readers)
        print(f"page of 50 on S3: in turn {serial * 1e3:.0f} ms, {readers[1]} side by side "
              f"{side * 1e3:.0f} ms; side by side / in turn = {side / serial:.2f}")  # fmt: skip
    finally:
        procs.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
