"""Embedded `actmap jobs resume` loads and checks the job's model before it sends any
task, as `actmap scan` does (issue 17, point 3): the load is not charged to the first
task's batches, and a model that no longer loads is one line before any work, with the
job left resumable, instead of a failure inside every batch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from api.cli.main import main

SAMPLES = Path(__file__).parents[2] / "workers" / "demo" / "samples"
WEIGHTS = Path(__file__).parents[2] / "workers" / "demo" / "digits_cnn.safetensors"


def test_resume_of_a_job_whose_model_is_gone_refuses_before_any_batch_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.oracle import planned
    from workers.extraction.cache import ModelCache
    from workers.jobs import ExtractionSpec
    from workers.lifecycle.state import status
    from workers.storage.layout import open_job, read

    weights = tmp_path / "w.safetensors"
    shutil.copy(WEIGHTS, weights)
    store = str(tmp_path / "store")
    spec = ExtractionSpec(
        model="workers.demo.digits:digits_cnn", weights=str(weights), layers=("fc",),
        inputs=(str(SAMPLES / "3"),), batch_size=2,
    )  # fmt: skip
    job = planned(store, spec, ModelCache().get(spec).info)
    weights.unlink()
    code = main(["jobs", "resume", job.job_id, "--store", store])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not exist" in err
    assert len(err.strip().splitlines()) == 1
    group = open_job(store, job.job_id, mode="r")
    assert not read(group, "done").any()  # no batch ran, none failed
    assert (read(group, "error_code") == 0).all()
    assert status(store, job.job_id).state in ("queued", "stalled")
