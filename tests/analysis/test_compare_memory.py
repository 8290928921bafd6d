"""A comparison of stored jobs holds about its memory budget, not the jobs' pooled arrays.

The jobs are written straight into the store's layout (no model needed): one flat layer
whose pooled array is many times the budget. Peaks are measured with tracemalloc, which
sees numpy's and Zarr's buffers.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from workers.analysis.analyses import run_compare
from workers.analysis.compare import compare
from workers.storage.analyses import open_analysis
from workers.storage.layout import LayerLayout, array, attrs, create_job, open_job, read
from workers.storage.stored_job import Selection, StoredJob

N, C, BATCH = 80_000, 128, 1_000
POOLED_BYTES = 2 * N * C * 4  # both jobs' pooled float32 arrays: 82 MB
CHUNK_BYTES = BATCH * C * 4  # one stored chunk, which Zarr decodes whole on any read
LAYER = "flat"


def _job(store: str, job_id: str, shift: float, seed: int) -> None:
    layer = LayerLayout(LAYER, (C,), C, "float32")
    meta = {"state": "succeeded", "spec": {"layers": [LAYER]}, "model": {"sha256": "x"}}
    group = create_job(store, job_id, meta, N, BATCH, 10, [layer])
    rng = np.random.default_rng(seed)
    pooled = array(group, f"layers/{LAYER}/pooled")
    for start in range(0, N, BATCH):
        block = rng.standard_normal((BATCH, C), dtype=np.float32) + np.float32(shift)
        pooled[start : start + BATCH] = block.round(2)  # ties, as stored activations have


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    found = str(tmp_path_factory.mktemp("memory") / "store")
    _job(found, "a", 0.0, seed=1)
    _job(found, "b", 0.05, seed=2)
    return found


@pytest.fixture(scope="module")
def in_memory(store: str) -> np.ndarray:
    """AUROC per channel of the two jobs' whole pooled arrays, ranked in memory."""
    pooled = [read(open_job(store, j, mode="r"), f"layers/{LAYER}/pooled") for j in "ab"]
    return compare(*pooled).auroc


def _peak(run: Callable[[], Any]) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        return run(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# 6 MiB holds blocks of whole columns, so AUROC is exact; in three quarters of 256 KiB
# one channel of 80 000 float32 values (320 kB) does not fit, so histograms stand in.
@pytest.mark.parametrize("budget", [6 << 20, 256 << 10], ids=["exact", "histogram"])
def test_comparing_jobs_many_times_larger_than_the_budget_holds_about_the_budget(
    store: str, in_memory: np.ndarray, budget: int
) -> None:
    # What any analysis of the two jobs holds whatever the layer: their per-sample tables.
    _, tables = _peak(lambda: (StoredJob(store, "a").rows(), StoredJob(store, "b").rows()))
    analysis, peak = _peak(
        lambda: run_compare(store, Selection("a"), Selection("b"), [LAYER], budget=budget)
    )
    assert 10 * budget < POOLED_BYTES
    assert peak - tables < budget + 4 * CHUNK_BYTES
    assert peak < POOLED_BYTES / 4
    summary = attrs(open_analysis(store, analysis))["layers"][LAYER]
    got = read(open_analysis(store, analysis), f"layers/{LAYER}/auroc")
    assert np.abs(got - in_memory).max() <= summary["auroc_error"]
    if budget == 6 << 20:
        np.testing.assert_array_equal(got, in_memory)
        assert summary["auroc_error"] == 0.0
    else:
        assert 0.0 < summary["auroc_error"] < 0.01
