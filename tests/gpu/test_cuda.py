"""Checks that need CUDA; skipped where no CUDA device exists. Run them on a GPU host with
`pytest -m gpu`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.oracle import planned, run_job
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.pipeline import Decoded, compute_batch
from workers.storage.layout import open_job, read

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SAMPLES = Path(__file__).parents[2] / "workers" / "demo" / "samples"


def _spec(**kw: object) -> ExtractionSpec:
    return ExtractionSpec(
        model="digits-cnn",
        layers=("conv1", "conv3", "fc"),
        inputs=(str(SAMPLES),),
        **kw,  # type: ignore[arg-type]
    )


def test_the_cuda_path_stores_what_the_cpu_path_stores(tmp_path: Path) -> None:
    spec = _spec(dtype="float32")
    stores = {}
    for device in ("cpu", "cuda:0"):
        models = ModelCache(device)
        job = planned(str(tmp_path / device), spec, models.get(spec).info)
        run_job(str(tmp_path / device), job.job_id, models)
        stores[device] = open_job(str(tmp_path / device), job.job_id, mode="r")
    for name in ("logits", "layers/conv1/acts", "layers/conv3/pooled"):
        np.testing.assert_allclose(
            read(stores["cuda:0"], name), read(stores["cpu"], name), atol=1e-3, rtol=1e-3
        )


def test_device_results_reach_the_host_through_pinned_buffers() -> None:
    models = ModelCache("cuda:0")
    spec = _spec()
    model = models.get(spec)
    x = np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32)
    rows = compute_batch(model, spec, Decoded(0, 0, x, np.zeros(64, np.int16), [""] * 64))
    assert rows.layers["conv1"].acts.shape == (64, 16, 28, 28)
    assert np.isfinite(rows.layers["conv1"].acts).all()


def test_a_batch_too_large_for_the_gpu_is_split_not_lost() -> None:
    from workers.pipeline import compute_fitting

    models = ModelCache("cuda:0")
    spec = _spec(max_size=None)
    model = models.get(spec)
    free, _total = torch.cuda.mem_get_info()
    # Enough samples that one forward's activations exceed free memory several times over.
    per_sample = 16 * 28 * 28 * 4 * 8
    n = min(int(free * 3 // per_sample), 2_000_000)
    x = np.zeros((n, 1, 28, 28), np.float32)
    rows = compute_fitting(model, spec, Decoded(0, 0, x, np.zeros(n, np.int16), [""] * n))
    assert (rows.error_code == 0).all()
