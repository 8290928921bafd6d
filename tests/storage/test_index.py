"""The job index: a record per job, pages newest first after a cursor, filters by state and
tenant, counts from names, several writers without locks, and a rebuild from the groups."""

from __future__ import annotations

import multiprocessing
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.oracle import planned
from workers.errors import UserError
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.lifecycle.state import cancel, finalize, job_page, list_jobs
from workers.storage.consolidate import reindex
from workers.storage.index import IndexMissing, count, figures, page, record

SAMPLES = Path(__file__).parents[2] / "workers" / "demo" / "samples"


@pytest.fixture(params=["dir", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        found: str = request.getfixturevalue("s3_store")  # moto's server, over HTTP
        return found
    if request.param == "dir":
        return str(tmp_path / "store")
    return f"memory://actmap-{uuid.uuid4().hex}"


def _attrs(i: int, tenant: str = "a", state: str = "queued") -> dict[str, Any]:
    created = f"2026-12-02T06:{i // 60:02d}:{i % 60:02d}.000+00:00"
    return {
        "state": state, "tenant": tenant, "created": created,
        "n_samples": 4, "n_batches": 2, "kind": "extraction",
    }  # fmt: skip


def test_pages_come_newest_first_and_the_cursor_walks_them_all_once(store: str) -> None:
    for i in range(23):
        record(store, f"job-{i:02d}", _attrs(i))
    seen: list[str] = []
    cursor = None
    while True:
        entries, cursor = page(store, 5, cursor)
        assert len(entries) <= 5
        seen.extend(e.job_id for e in entries)
        if cursor is None:
            break
    assert seen == [f"job-{i:02d}" for i in reversed(range(23))]


def test_filters_by_state_and_tenant_follow_each_state_change(store: str) -> None:
    for i in range(6):
        record(store, f"job-{i}", _attrs(i, tenant="a" if i % 2 else "b"))
    record(store, "job-3", _attrs(3, tenant="a", state="succeeded"))
    record(store, "job-4", _attrs(4, tenant="b", state="cancelled"))
    assert [e.job_id for e in page(store, 10, states=["queued"])[0]] == [
        "job-5", "job-2", "job-1", "job-0",
    ]  # fmt: skip
    assert [e.job_id for e in page(store, 10, tenant="a")[0]] == ["job-5", "job-3", "job-1"]
    assert [e.state for e in page(store, 10, tenant="a")[0]] == ["queued", "succeeded", "queued"]
    assert [e.job_id for e in page(store, 10, tenant="b", states=["cancelled"])[0]] == ["job-4"]
    assert count(store, "a", ["queued", "running"]) == 2
    assert count(store, "b", ["queued", "running"]) == 2
    assert figures(store).counts["queued"] == 4


def test_a_cursor_not_made_by_a_listing_is_refused_with_a_clear_error(store: str) -> None:
    with pytest.raises(UserError, match="not one a listing gave"):
        page(store, 5, "../../etc/passwd")


def _spec() -> ExtractionSpec:
    return ExtractionSpec(
        model="digits-cnn", layers=("fc",), inputs=(str(SAMPLES / "2"),), batch_size=2
    )


def test_jobs_are_listed_from_the_index_with_their_live_status(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    info = ModelCache().get(_spec()).info
    jobs = [planned(store, _spec(), info).job_id for _ in range(4)]
    cancel(store, jobs[0])
    finalize(store, jobs[1])  # no batch done: failed
    found, cursor = job_page(store, 2)
    assert [s.job_id for s in found] == jobs[::-1][:2]
    more, end = job_page(store, 2, cursor)
    assert [s.job_id for s in more] == jobs[::-1][2:]
    assert end is None
    assert [s.job_id for s in list_jobs(store, "queued")] == [jobs[3], jobs[2]]
    assert [s.job_id for s in list_jobs(store, "cancelled")] == [jobs[0]]
    assert [s.job_id for s in list_jobs(store, "failed")] == [jobs[1]]


def test_reindex_rebuilds_a_lost_index_from_the_job_groups(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    info = ModelCache().get(_spec()).info
    jobs = [planned(store, _spec(), info).job_id for _ in range(3)]
    cancel(store, jobs[1])
    shutil.rmtree(tmp_path / "store" / "index")
    with pytest.raises(IndexMissing):  # said, not a silently empty list
        page(store, 10)
    assert reindex(store) == 3
    assert [e.job_id for e in page(store, 10)[0]] == jobs[::-1]
    assert [e.job_id for e in page(store, 10, states=["cancelled"])[0]] == [jobs[1]]
    shutil.rmtree(tmp_path / "store" / "jobs" / jobs[0])
    assert reindex(store) == 2
    assert [e.job_id for e in page(store, 10)[0]] == [jobs[2], jobs[1]]
    assert count(store, "local", ["cancelled"]) == 1


def _plan_many(store: str, n: int) -> list[str]:
    info = ModelCache().get(_spec()).info
    return [planned(store, _spec(), info).job_id for _ in range(n)]


def test_writers_in_several_processes_all_appear_in_the_index(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        made = pool.starmap(_plan_many, [(store, 4)] * 3)
    ids = {j for part in made for j in part}
    assert len(ids) == 12
    assert {s.job_id for s in list_jobs(store)} == ids
    assert count(store, "local", ["queued"]) == 12


def test_cli_lists_a_page_with_whole_ids_and_the_command_for_the_next(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from api.cli.main import main

    store = str(tmp_path / "store")
    jobs = _plan_many(store, 3)
    assert main(["jobs", "list", "--store", store, "--limit", "2"]) == 0
    printed = capsys.readouterr()
    assert jobs[2] in printed.out
    assert jobs[1] in printed.out
    assert jobs[0] not in printed.out
    assert "next page: actmap jobs list --limit 2 --cursor " in printed.err.replace("\n", "")
    cursor = printed.err.replace("\n", "").split("--cursor ")[1].strip()
    assert main(["jobs", "list", "--store", store, "--limit", "2", "--cursor", cursor]) == 0
    assert jobs[0] in capsys.readouterr().out
    assert main(["store", "reindex", "--store", store, "--json"]) == 0
    assert '"jobs": 3' in capsys.readouterr().out
