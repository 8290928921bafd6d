"""The store contract, run against every kind of store location: a local directory, a
file:// URL, an in-memory fsspec URL and S3 (moto's server over HTTP, tests/storage/conftest.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from tests.oracle import planned, run_job
from workers.errors import NotFound
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.lifecycle.state import finalize
from workers.storage.layout import (
    CHUNK_BYTES,
    attrs,
    fresh_attrs,
    job_ids,
    open_job,
    read,
    sample_chunk,
)
from workers.storage.ledger import done_batches, mark_done, pending_batches

SAMPLES = Path(__file__).parents[2] / "workers" / "demo" / "samples"


@pytest.fixture(params=["dir", "file-url", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        found: str = request.getfixturevalue("s3_store")  # moto's server, over HTTP
        return found
    if request.param == "dir":
        return str(tmp_path / "store")
    if request.param == "file-url":
        return f"file://{tmp_path / 'store'}"
    return f"memory://actmap-{uuid.uuid4().hex}"


def _spec(**options: object) -> ExtractionSpec:
    return ExtractionSpec(
        model="digits-cnn",
        layers=("conv1", "conv3", "fc"),
        inputs=(str(SAMPLES / "2"), str(SAMPLES / "5")),
        batch_size=3,
        **options,  # type: ignore[arg-type]
    )


def test_plan_creates_every_array_with_its_final_shape_before_any_batch(store: str) -> None:
    models = ModelCache()
    job = planned(store, _spec(), models.get(_spec()).info)
    group = open_job(store, job.job_id, mode="r")
    assert group["layers/conv1/acts"].shape == (8, 16, 28, 28)  # type: ignore[union-attr]
    assert group["layers/conv3/pooled"].shape == (8, 64)  # type: ignore[union-attr]
    assert group["logits"].shape == (8, 10)  # type: ignore[union-attr]
    assert pending_batches(group) == [0, 1, 2]
    assert group.attrs["state"] == "queued"
    assert job_ids(store) == [job.job_id]


def test_the_ledger_counts_what_was_marked_and_nothing_else(store: str) -> None:
    models = ModelCache()
    job = planned(store, _spec(), models.get(_spec()).info)
    group = open_job(store, job.job_id)
    mark_done(group, 1)
    assert list(done_batches(group)) == [False, True, False]
    assert pending_batches(group) == [0, 2]


def test_a_finished_job_opens_in_xarray_from_every_store_kind(store: str) -> None:
    models = ModelCache()
    first = planned(store, _spec(), models.get(_spec()).info)
    second = planned(store, _spec(dtype="float32"), models.get(_spec()).info)
    run_job(store, second.job_id, models)
    run_job(store, first.job_id, models)
    for job in (first, second):
        table = xr.open_zarr(f"{store}/jobs/{job.job_id}")  # warnings are errors here
        assert table.attrs["state"] == "succeeded"  # the consolidated view is current
        assert table.sizes["sample"] == 8
        tree = xr.open_datatree(f"{store}/jobs/{job.job_id}", engine="zarr")
        layer = tree["layers/conv3"].dataset.sel(sample="2503.png")
        assert layer["acts"].shape == (64, 7, 7)
        by_group = xr.open_zarr(store, group=f"jobs/{job.job_id}", consolidated=False)
        assert by_group.sizes["sample"] == 8


def test_the_jobs_own_consolidated_map_holds_every_node_of_the_job_as_stored(store: str) -> None:
    models = ModelCache()
    job = planned(store, _spec(), models.get(_spec()).info)
    run_job(store, job.job_id, models)
    group = open_job(store, job.job_id, mode="r")
    stored = {path: node.metadata.to_dict() for path, node in group.members(None)}
    where = f"{store.removeprefix('file://')}/jobs/{job.job_id}"
    published = zarr.open_group(where, mode="r", use_consolidated=True)
    consolidated = published.metadata.consolidated_metadata
    assert consolidated is not None
    flat = {path: meta.to_dict() for path, meta in consolidated.flattened_metadata.items()}
    assert flat.keys() == stored.keys()
    assert published.attrs["state"] == "succeeded"
    assert flat["layers/conv3/acts"]["shape"] == stored["layers/conv3/acts"]["shape"]
    root = zarr.open_group(store.removeprefix("file://"), mode="r", use_consolidated=False)
    assert root.metadata.consolidated_metadata is None  # the root holds no map of jobs


def test_finalize_without_every_batch_done_fails_the_job_with_the_reason(store: str) -> None:
    models = ModelCache()
    job = planned(store, _spec(), models.get(_spec()).info)
    summary = finalize(store, job.job_id)
    assert summary["state"] == "failed"
    assert "3 of 3 batches" in open_job(store, job.job_id, mode="r").attrs["reason"]  # type: ignore[operator]


def test_an_unknown_job_is_a_clear_error(store: str) -> None:
    with pytest.raises(NotFound, match="no job 'nope'"):
        open_job(store, "nope")


def test_activation_chunks_grow_to_about_a_megabyte_when_the_batch_allows() -> None:
    assert sample_chunk(32, 16 * 28 * 28 * 2) == 32  # 0.8 MB: the whole batch in one chunk
    big_row = 512 * 28 * 28 * 2
    chunk = sample_chunk(256, big_row)
    assert 256 % chunk == 0
    assert chunk * big_row <= CHUNK_BYTES < chunk * 2 * big_row
    assert sample_chunk(7, CHUNK_BYTES * 2) == 1


def test_stored_values_survive_a_reopen(store: str) -> None:
    models = ModelCache()
    job = planned(store, _spec(), models.get(_spec()).info)
    run_job(store, job.job_id, models)
    acts = read(open_job(store, job.job_id, mode="r"), "layers/fc/acts")
    assert acts.shape == (8, 10)
    assert np.isfinite(acts).all()


@pytest.mark.parametrize("kind", ["local", "memory-url"])
def test_fresh_attrs_see_an_update_made_after_the_group_was_opened(
    tmp_path: Path, kind: str
) -> None:
    location = str(tmp_path / "s") if kind == "local" else f"memory://fresh-{tmp_path.name}"
    group = zarr.open_group(location, mode="w")
    group.update_attributes({"state": "running"})
    reader = zarr.open_group(location, mode="r")
    zarr.open_group(location, mode="r+").update_attributes({"state": "cancelled"})
    assert attrs(reader)["state"] == "running"  # as opened
    assert fresh_attrs(reader)["state"] == "cancelled"
    for state in ("queued", "running", "succeeded"):  # read again after every change
        zarr.open_group(location, mode="r+").update_attributes({"state": state})
        assert fresh_attrs(reader)["state"] == state
        assert fresh_attrs(reader)["state"] == state
