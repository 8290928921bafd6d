"""The filter atlas's memory and time against one plain read of the layer it streams.

The jobs are built directly in the store as a scan leaves them (storage.layout.create_job
with the bundled digits model's catalogue, then conv3's `acts` (N, 64, 7, 7) float16
written a batch of 64 rows at a time: ReLU'd Gaussian noise, every sample ok, state
succeeded), so the figures are about reading, not extracting. Peak memory is
tracemalloc's (numpy and the codecs' buffers are traced). Runs interleave the plain read
and the atlas, three rounds, and print the load average.

    OMP_NUM_THREADS=1 python -m tests.bench.atlas
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from workers.analysis.filter_atlas import run_atlas
from workers.extraction.models import load_model
from workers.jobs import JobState, new_id, now
from workers.storage.consolidate import publish
from workers.storage.layout import LayerLayout, create_job, open_job, writable

LAYER, BATCH, ROUNDS = "conv3", 64, 3


def build(store: str, n: int) -> str:
    info = load_model("digits-cnn").info
    row = info.layer(LAYER)
    job_id = new_id()
    attrs = {
        "kind": "extraction", "state": JobState.SUCCEEDED.value, "tenant": "local",
        "spec": {"layers": [LAYER]}, "catalogue": info.model_dump(mode="json"),
        "n_samples": n, "batch_size": BATCH, "model": {"name": info.name}, "created": now(),
    }  # fmt: skip
    layout = LayerLayout(LAYER, row.output_shape, row.output_shape[0], "float16")
    group = create_job(store, job_id, attrs, n, BATCH, info.classes, [layout])
    rng = np.random.default_rng(0)
    acts, pooled = (
        writable(group, f"layers/{LAYER}/acts"),
        writable(group, f"layers/{LAYER}/pooled"),
    )
    for start in range(0, n, BATCH):
        stop = min(n, start + BATCH)
        block = np.maximum(rng.standard_normal((stop - start, *row.output_shape)), 0)
        acts[start:stop] = block.astype(np.float16)
        pooled[start:stop] = block.mean(axis=(2, 3)).astype(np.float32)
    job = open_job(store, job_id)
    for name, value in (("error_code", 0), ("label", 0), ("pred", 0)):
        job[name][:] = value  # type: ignore[index]
    job["sample"][:] = np.asarray([f"s{i:05d}" for i in range(n)], dtype=object)  # type: ignore[index]
    publish(store, job_id)
    return job_id


def measured(run: Callable[[], Any]) -> tuple[float, float]:
    """(seconds, peak MiB traced) of one call."""
    tracemalloc.start()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = f"{folder}/store"
        jobs = {n: build(store, n) for n in (1_000, 10_000)}
        big = open_job(store, jobs[10_000], mode="r")[f"layers/{LAYER}/acts"]
        size = np.prod(big.shape) * 2 / 2**20  # type: ignore[union-attr]
        runs: dict[str, list[tuple[float, float]]] = {"read": [], "atlas": [], "atlas_1k": []}
        for _ in range(ROUNDS):
            runs["read"].append(measured(lambda: big[...]))  # type: ignore[index]
            runs["atlas"].append(measured(lambda: run_atlas(store, jobs[10_000], LAYER, 9)))
            runs["atlas_1k"].append(measured(lambda: run_atlas(store, jobs[1_000], LAYER, 9)))
    t = {k: statistics.median(s for s, _ in v) for k, v in runs.items()}
    m = {k: statistics.median(p for _, p in v) for k, v in runs.items()}
    print(
        f"load average {os.getloadavg()}; {LAYER} (N, 64, 7, 7) float16, {size:.1f} MiB "
        f"at N=10,000, chunks of {BATCH} rows; median of {ROUNDS} interleaved rounds"
    )
    print(f"plain read of acts, N=10,000: {t['read']:.2f} s, peak {m['read']:.1f} MiB")
    print(f"atlas top 9,         N=10,000: {t['atlas']:.2f} s, peak {m['atlas']:.1f} MiB")
    print(f"atlas top 9,         N=1,000:  {t['atlas_1k']:.2f} s, peak {m['atlas_1k']:.1f} MiB")
    print(f"time atlas / read: {t['atlas'] / t['read']:.2f}x; peak atlas / read: "
          f"{m['atlas'] / m['read']:.3f}x; peak atlas 10k / 1k: "
          f"{m['atlas'] / m['atlas_1k']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
