"""GPU pinning and out-of-memory handling, checked on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_arrays
from workers.errors import SampleCode, UserError
from workers.execution.launcher import command
from workers.execution.slots import Slot, list_gpus, slots
from workers.extraction.models import LoadedModel
from workers.jobs import ExtractionSpec
from workers.pipeline import Decoded, compute_batch, compute_fitting
from workers.storage.quantised import decode

ROOT = Path(__file__).parents[2]


def test_one_worker_per_gpu_each_seeing_only_its_own() -> None:
    found = slots("all", None, [0, 1, 2, 3], host="node7")
    assert [s.name for s in found] == [f"actmap-gpu{i}@node7" for i in range(4)]
    assert [s.environment() for s in found] == [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(4)]
    chosen = slots("0,2", None, [0, 1, 2, 3], host="node7")
    assert [s.environment()["CUDA_VISIBLE_DEVICES"] for s in chosen] == ["0", "2"]


def test_cpu_workers_see_no_gpu_at_all() -> None:
    found = slots(None, 2, [], host="h")
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert found == [Slot("actmap-cpu0@h", None, threads), Slot("actmap-cpu1@h", None, threads)]
    assert found[0].environment() == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}


def test_each_worker_runs_one_task_at_a_time_under_its_own_name() -> None:
    argv = command(Slot("actmap-gpu1@h", 1), ["screen", "extract"])
    assert argv[argv.index("--concurrency") + 1] == "1"
    assert argv[argv.index("--prefetch-multiplier") + 1] == "1"
    assert argv[argv.index("--hostname") + 1] == "actmap-gpu1@h"
    assert argv[argv.index("--queues") + 1] == "screen,extract"


@pytest.mark.parametrize(
    ("gpus", "available", "message"),
    [
        ("all", [], "no NVIDIA GPU found"),
        ("0,5", [0, 1], "GPU 5 is not on this host"),
        ("one", [0], "--gpus takes 'all' or indices"),
    ],
)
def test_asking_for_gpus_that_are_not_there_is_a_clear_error(
    gpus: str, available: list[int], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        slots(gpus, None, available)


def test_gpu_discovery_reads_nvidia_smi_without_touching_cuda() -> None:
    assert list_gpus(lambda _cmd: "0\n1\n") == [0, 1]
    assert list_gpus(lambda _cmd: "") == []


def test_actmap_worker_gpus_all_on_a_machine_without_gpus_says_so() -> None:
    if list_gpus():
        pytest.skip("this machine has GPUs")
    env = {"ACTMAP_BROKER_URL": "redis://127.0.0.1:1/0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "api.cli.main", "worker", "--gpus", "all"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "actmap: error: no NVIDIA GPU found on this host (nvidia-smi lists none); use --cpu N"
    ]


class _FlakyMemory:
    """Wraps a model's forward: raises CUDA out-of-memory above `fits` samples."""

    def __init__(self, model: LoadedModel, fits: int) -> None:
        self.inner = model.module.forward
        self.fits = fits
        self.sizes: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        out: torch.Tensor = self.inner(x)
        return out


def _decoded(tmp_path: Path, n: int) -> Decoded:
    paths = write_arrays(tmp_path / "x", n)
    x = np.stack([np.load(p) for p in paths])
    return Decoded(0, 0, x, np.zeros(n, np.int16), [""] * n)


def test_out_of_memory_halves_the_batch_and_gives_the_same_rows(
    model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = ExtractionSpec(model="m", layers=("conv1", "fc"), inputs=("x",), dtype="float32")
    decoded = _decoded(tmp_path, 12)
    whole = compute_batch(model, spec, decoded)
    flaky = _FlakyMemory(model, fits=3)
    monkeypatch.setattr(model.module, "forward", flaky)
    split = compute_fitting(model, spec, decoded)
    assert flaky.sizes == [12, 6, 3, 3, 6, 3, 3]
    np.testing.assert_allclose(split.layers["conv1"].acts, whole.layers["conv1"].acts, atol=1e-6)
    np.testing.assert_allclose(split.logits, whole.logits, atol=1e-5)
    assert (split.error_code == 0).all()


def test_a_sample_that_does_not_fit_alone_becomes_a_sample_error(
    model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = ExtractionSpec(model="m", layers=("conv1",), inputs=("x",))
    monkeypatch.setattr(model.module, "forward", _FlakyMemory(model, fits=0))
    rows = compute_fitting(model, spec, _decoded(tmp_path, 4))
    assert (rows.error_code == SampleCode.COMPUTE).all()
    assert "out of GPU memory" in rows.error_message[0]
    assert np.isnan(rows.layers["conv1"].acts).all()


def test_a_uint8_batch_computed_in_halves_is_stored_under_one_scale_for_the_batch(
    model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = ExtractionSpec(model="m", layers=("conv1",), inputs=("x",), dtype="uint8")
    exact = ExtractionSpec(model="m", layers=("conv1",), inputs=("x",), dtype="float32")
    decoded = _decoded(tmp_path, 12)
    truth = compute_batch(model, exact, decoded).layers["conv1"].acts
    whole = compute_batch(model, spec, decoded).layers["conv1"]
    monkeypatch.setattr(model.module, "forward", _FlakyMemory(model, fits=3))
    split = compute_fitting(model, spec, decoded).layers["conv1"]
    assert split.scale is not None
    assert split.offset is not None
    assert whole.scale is not None
    np.testing.assert_allclose(split.scale, whole.scale, rtol=1e-5)
    values = decode(split.acts, np.tile(split.scale, (12, 1)), np.tile(split.offset, (12, 1)))
    half_step = split.scale[None, :, None, None] / 2
    assert (np.abs(values - truth) <= half_step * (1 + 1e-5) + 1e-6).all()


def test_a_uint8_batch_where_no_sample_fits_stores_missing_levels(
    model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = ExtractionSpec(model="m", layers=("conv1",), inputs=("x",), dtype="uint8")
    monkeypatch.setattr(model.module, "forward", _FlakyMemory(model, fits=0))
    rows = compute_fitting(model, spec, _decoded(tmp_path, 4)).layers["conv1"]
    assert (rows.acts == 255).all()
    assert rows.scale is not None
    assert np.isnan(rows.scale).all()
