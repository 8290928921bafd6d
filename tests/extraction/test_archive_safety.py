"""A .pt2 that would run code when torch loads it is refused before torch reads it, in one
line, in process, on the command line and at registration; a first load that needs too much
memory or never ends costs a child process, not the caller."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.extraction.hostile import KINDS, TRICKS, genuine, hostile, trick
from workers.demo.digits import WEIGHTS
from workers.errors import ModelError
from workers.execution.registration import register_model
from workers.extraction.cache import ModelCache
from workers.extraction.isolation import ChildLimits, Verdicts, load_in_child
from workers.extraction.models import load_model
from workers.jobs import ExtractionSpec
from workers.storage.registry import ModelRecord, Registry

ROOT = Path(__file__).parents[2]
SLEEPY = "tests.extraction.hostile:sleepy_net"
HUNGRY = "tests.extraction.hostile:hungry_net"


REFUSED = [kind for kind in KINDS if kind != "sample inputs"]


@pytest.mark.parametrize("kind", REFUSED)
def test_an_archive_torch_would_run_code_from_is_refused_in_one_line(
    kind: str, tmp_path: Path
) -> None:
    marker = tmp_path / "MARKER"
    path = hostile(kind, tmp_path / "evil.pt2", marker)
    with pytest.raises(ModelError) as refused:
        load_model(str(path))
    assert "\n" not in str(refused.value)
    assert str(path) in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", list(TRICKS))
def test_a_zip_that_could_read_differently_to_torch_is_refused(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = trick(kind, tmp_path / "odd.pt2", marker)
    with pytest.raises(ModelError) as refused:
        load_model(str(path))
    assert "\n" not in str(refused.value)
    assert not marker.exists()


def test_sample_inputs_are_never_unpickled_whatever_they_hold(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = hostile("sample inputs", tmp_path / "evil.pt2", marker)
    assert load_model(str(path)).info.layer_names() == ["conv", "fc"]
    assert not marker.exists()


def test_a_genuine_archive_loads_with_its_catalogue(tmp_path: Path) -> None:
    loaded = load_model(str(genuine(tmp_path / "tiny.pt2")))
    assert loaded.info.layer_names() == ["conv", "fc"]
    assert loaded.info.classes == 3


@pytest.mark.parametrize("kind", ["weights marked use_pickle", "legacy pickled weights"])
def test_actmap_layers_refuses_a_hostile_archive_with_one_line_and_exit_code_2(
    kind: str, tmp_path: Path
) -> None:
    marker = tmp_path / "MARKER"
    path = hostile(kind, tmp_path / "evil.pt2", marker)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTMAP_")}
    done = subprocess.run(
        [sys.executable, "-m", "api.cli.main", "layers", "--model", str(path)],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("actmap: error: ")
    assert "refused" in lines[0]
    assert not marker.exists()


def _record(store: Path, ref: str, weights: str | None = None) -> str:
    registry = Registry(str(store))
    record = ModelRecord(
        id=registry.new_id(), tenant="acme", name="m", ref=ref, weights=weights,
        created=registry.stamp(),
    )  # fmt: skip
    registry.create(record)
    return record.id


def test_registering_a_hostile_archive_fails_the_record_with_the_reason(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = hostile("constants marked use_pickle", tmp_path / "evil.pt2", marker)
    model_id = _record(tmp_path / "store", str(path))
    assert register_model(str(tmp_path / "store"), "acme", model_id, None) == "failed"
    record = Registry(str(tmp_path / "store")).get("acme", model_id)
    assert record.error is not None
    assert "refused" in record.error
    assert "\n" not in record.error
    assert not marker.exists()


def test_a_first_load_that_allocates_past_the_cap_fails_in_the_child() -> None:
    limits = ChildLimits(memory_mb=1024, timeout_s=300)
    with pytest.raises(ModelError, match="needed more than 1024 MiB"):
        load_in_child(HUNGRY, str(WEIGHTS), None, [HUNGRY], limits)


def test_a_first_load_past_the_deadline_is_stopped(tmp_path: Path) -> None:
    model_id = _record(tmp_path / "store", SLEEPY)
    limits = ChildLimits(timeout_s=5)
    store = str(tmp_path / "store")
    assert register_model(store, "acme", model_id, [SLEEPY], limits) == "failed"
    error = Registry(store).get("acme", model_id).error
    assert error is not None
    assert "took longer than 5 s" in error


def test_a_worker_loads_model_bytes_it_has_not_seen_in_a_child_first(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    evil = hostile("weights marked use_pickle", tmp_path / "evil.pt2", marker)
    good = genuine(tmp_path / "tiny.pt2")
    verdicts = Verdicts(ChildLimits(timeout_s=300))
    models = ModelCache(verdicts=verdicts)
    with pytest.raises(ModelError, match="refused"):
        models.get(ExtractionSpec(model=str(evil), layers=("conv",), inputs=("x",)))
    assert not marker.exists()
    loaded = models.get(ExtractionSpec(model=str(good), layers=("conv",), inputs=("x",)))
    assert loaded.info.sha256 in verdicts
