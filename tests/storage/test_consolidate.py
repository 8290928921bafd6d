"""Each job group carries its own consolidated metadata; the root stays a small group, and
opening a job reads nothing outside it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import xarray as xr
import zarr
from zarr.storage import LocalStore

from tests.oracle import planned, run_job
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.storage.consolidate import reindex
from workers.storage.index import IndexMissing, page

SAMPLES = Path(__file__).parents[2] / "workers" / "demo" / "samples"


def _spec() -> ExtractionSpec:
    return ExtractionSpec(
        model="digits-cnn", layers=("conv1", "fc"), inputs=(str(SAMPLES / "2"),), batch_size=2
    )


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every key zarr reads or lists from a local store, as a path under the store."""
    seen: list[str] = []
    get, exists, list_dir = LocalStore.get, LocalStore.exists, LocalStore.list_dir

    def _at(store: LocalStore, key: str) -> str:
        return (Path(store.root) / key).as_posix()

    async def logged_get(self: LocalStore, key: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(_at(self, key))
        return await get(self, key, *args, **kwargs)

    async def logged_exists(self: LocalStore, key: str) -> bool:
        seen.append(_at(self, key))
        return await exists(self, key)

    def logged_list_dir(self: LocalStore, prefix: str) -> Any:
        seen.append(_at(self, prefix) + "/")
        return list_dir(self, prefix)

    monkeypatch.setattr(LocalStore, "get", logged_get)
    monkeypatch.setattr(LocalStore, "exists", logged_exists)
    monkeypatch.setattr(LocalStore, "list_dir", logged_list_dir)
    return seen


def test_opening_a_job_in_xarray_reads_nothing_outside_its_group(
    tmp_path: Path, reads: list[str]
) -> None:
    store = str(tmp_path / "store")
    models = ModelCache()
    jobs = [planned(store, _spec(), models.get(_spec()).info) for _ in range(3)]
    run_job(store, jobs[1].job_id, models)
    inside = (tmp_path / "store" / "jobs" / jobs[1].job_id).as_posix()
    reads.clear()
    table = xr.open_zarr(f"{store}/jobs/{jobs[1].job_id}")  # a warning would fail the test
    tree = xr.open_datatree(f"{store}/jobs/{jobs[1].job_id}", engine="zarr")
    assert table.sizes["sample"] == 4
    assert tree["layers/fc"].dataset["acts"].shape == (4, 10)
    assert reads  # the logging saw the opens
    outside = [key for key in reads if not key.startswith(inside + "/")]
    assert outside == []
    metadata = [k for k in reads if k.endswith("zarr.json")]
    assert metadata == [f"{inside}/zarr.json"] * 2  # one document each: the map is inline


def test_the_root_does_not_grow_with_jobs(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    models = ModelCache()
    planned(store, _spec(), models.get(_spec()).info)
    first = (tmp_path / "store" / "zarr.json").read_bytes()
    for _ in range(3):
        run_job(store, planned(store, _spec(), models.get(_spec()).info).job_id, models)
    assert (tmp_path / "store" / "zarr.json").read_bytes() == first
    assert len(first) < 200


def _old_store(store: str, job_id: str) -> None:
    """What the store looked like before: the job groups without their own map, and the
    root's map listing every job, and no index."""
    shutil.rmtree(Path(store) / "index")
    zarr.consolidate_metadata(store)
    job = Path(store) / "jobs" / job_id / "zarr.json"
    doc = json.loads(job.read_bytes())
    doc.pop("consolidated_metadata", None)
    job.write_text(json.dumps(doc))


def test_a_store_written_before_opens_its_new_jobs_and_reindex_upgrades_the_old(
    tmp_path: Path,
) -> None:
    store = str(tmp_path / "store")
    models = ModelCache()
    old = planned(store, _spec(), models.get(_spec()).info)
    run_job(store, old.job_id, models)
    with pytest.warns(UserWarning, match="Consolidated metadata"):
        _old_store(store, old.job_id)
    new = planned(store, _spec(), models.get(_spec()).info)  # drops the root's stale map
    run_job(store, new.job_id, models)
    assert xr.open_zarr(f"{store}/jobs/{new.job_id}").attrs["state"] == "succeeded"
    with pytest.raises(IndexMissing, match="actmap store reindex"):  # not a silent half list
        page(store, 10)
    with pytest.warns(RuntimeWarning, match="consolidated"):  # the old job has no map yet
        xr.open_zarr(f"{store}/jobs/{old.job_id}")
    assert reindex(store) == 2
    assert xr.open_zarr(f"{store}/jobs/{old.job_id}").attrs["state"] == "succeeded"
    assert [e.job_id for e in page(store, 10)[0]] == [new.job_id, old.job_id]
    assert "consolidated_metadata" not in json.loads((tmp_path / "store" / "zarr.json").read_text())
