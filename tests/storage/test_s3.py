"""The store on S3 (moto's standalone server over HTTP): what the local store's contract
suite does not cover alone: writers in several processes without locks, resume, analyses,
the report's reads, and no secret in what is stored or said."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import fsspec
import pytest
import xarray as xr

from tests.bench.s3_requests import counting
from tests.oracle import planned, run_job
from tests.storage.conftest import CREDENTIALS, close_all
from workers.errors import ActmapError
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.lifecycle.state import cancel, finalize, list_jobs, prepare_resume, status
from workers.storage.index import page
from workers.storage.layout import open_job

SAMPLES = Path(__file__).parents[2] / "workers" / "demo" / "samples"


def _spec() -> ExtractionSpec:
    return ExtractionSpec(
        model="digits-cnn", layers=("conv1", "fc"), inputs=(str(SAMPLES / "4"),), batch_size=2
    )


def _finalize_at(store: str, job_id: str, moment: float) -> str:
    while time.time() < moment:  # both processes start their finalize together
        time.sleep(0.001)
    return str(finalize(store, job_id)["state"])


def test_two_processes_finalizing_at_the_same_moment_both_appear_in_the_index(
    s3_store: str,
) -> None:
    info = ModelCache().get(_spec()).info
    jobs = [planned(s3_store, _spec(), info).job_id for _ in range(2)]
    ctx = multiprocessing.get_context("spawn")  # the environment (endpoint, keys) is inherited
    with ctx.Pool(2) as pool:
        pool.apply(time.sleep, (0,))  # both started before the moment is chosen
        pool.apply(time.sleep, (0,))
        moment = time.time() + 2
        states = pool.starmap(_finalize_at, [(s3_store, j, moment) for j in jobs])
    assert states == ["failed", "failed"]  # no batch ran: each fails with its reason
    entries, _ = page(s3_store, 10, states=["failed"])
    assert sorted(e.job_id for e in entries) == sorted(jobs)
    assert page(s3_store, 10, states=["queued"])[0] == []


def test_a_cancelled_job_resumes_and_finishes_on_s3(s3_store: str) -> None:
    models = ModelCache()
    job = planned(s3_store, _spec(), models.get(_spec()).info)
    cancel(s3_store, job.job_id)
    assert [s.job_id for s in list_jobs(s3_store, "cancelled")] == [job.job_id]
    assert prepare_resume(s3_store, job.job_id) == [0, 1]
    assert run_job(s3_store, job.job_id, models)["state"] == "succeeded"
    assert [s.job_id for s in list_jobs(s3_store, "succeeded")] == [job.job_id]
    assert list_jobs(s3_store, "cancelled") == []
    table = xr.open_zarr(f"{s3_store}/jobs/{job.job_id}")
    assert table.sizes["sample"] == 4


def test_an_analysis_and_the_report_read_a_job_on_s3(s3_store: str, tmp_path: Path) -> None:
    from workers.analysis.requests import run_analysis
    from workers.jobs import new_id
    from workers.pictures.report import write_report

    models = ModelCache()
    job = planned(s3_store, _spec(), models.get(_spec()).info)
    run_job(s3_store, job.job_id, models)
    analysis_id = new_id()
    state = run_analysis(s3_store, "health", {"job_id": job.job_id}, analysis_id, "local")
    assert state == "succeeded"
    tree = xr.open_datatree(f"{s3_store}/analyses/{analysis_id}", engine="zarr")
    assert "layers" in tree.children
    page_path = write_report(s3_store, job.job_id, tmp_path / "report")
    assert job.job_id in page_path.read_text()


def test_no_secret_is_stored_in_the_store_or_said_in_an_error(s3_store: str) -> None:
    models = ModelCache()
    job = planned(s3_store, _spec(), models.get(_spec()).info)
    run_job(s3_store, job.job_id, models)
    secret = CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    fs, root = fsspec.core.url_to_fs(s3_store)
    for path in fs.find(root):
        if path.endswith(".json"):
            assert secret not in fs.cat_file(path).decode(), path
    assert secret not in str(open_job(s3_store, job.job_id, mode="r").attrs.asdict())
    with pytest.raises(ActmapError) as missing:
        open_job("s3://no-such-bucket-here/store", "nope")
    assert secret not in str(missing.value)


def test_a_status_on_s3_reads_zarr_v3_documents_and_lists_nothing(s3_store: str) -> None:
    # A group opened without its format asks for the v2 documents too, and s3fs answers
    # each missing one with a HEAD and a listing: 3 listings a job (138 in a page of 50 in
    # tests/bench/README.md), and an object store's listing is its slowest request.
    models = ModelCache()
    job = planned(s3_store, _spec(), models.get(_spec()).info)
    run_job(s3_store, job.job_id, models)  # every chunk written: none is missing
    close_all()  # as in a process that did not write it: nothing of the job cached
    with counting() as seen:
        assert status(s3_store, job.job_id).state == "succeeded"
    assert seen.total > 0
    assert [c for c in seen.calls if ".z" in c or c.startswith("ListObjectsV2")] == []
