"""The small things a user expects of `actmap` (issue 17, point 10)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from api.cli.main import main
from workers.jobs import VERSION

ROOT = Path(__file__).parents[3]
SAMPLES = ROOT / "workers" / "demo" / "samples"


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"actmap {VERSION}"


def test_each_jobs_action_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["jobs", "status", "--help"])
    shown = capsys.readouterr().out
    assert "usage: actmap jobs status" in shown
    assert "--cursor" not in shown  # list's options belong to `jobs list`
    with pytest.raises(SystemExit):
        main(["jobs", "list", "--help"])
    assert "--cursor" in capsys.readouterr().out


def test_serve_help_lists_the_settings_it_reads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    shown = capsys.readouterr().out
    for name in ("ACTMAP_STORE", "ACTMAP_BROKER_URL", "ACTMAP_AUTH_FILE", "ACTMAP_METRICS"):
        assert name in shown


def test_a_mistyped_flag_is_refused_with_the_close_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["scan", str(SAMPLES), "--model", "digits-cnn", "--layer", "conv1",
              "--out", str(tmp_path)])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--layer" in err
    assert "did you mean --layers?" in err
    assert not (tmp_path / "jobs").exists()


def test_a_bad_auth_file_names_the_bad_field(tmp_path: Path) -> None:
    from api.auth import Tenants
    from workers.errors import ActmapError

    auth = tmp_path / "auth.json"
    tenants = {"acme": {"tokens": ["t"], "roots": ["/data"], "quotas": {"max_jobs": "many"}}}
    auth.write_text(json.dumps({"tenants": tenants}))
    with pytest.raises(ActmapError) as found:
        Tenants.from_file(str(auth))
    assert "tenants.acme.quotas.max_jobs" in str(found.value)


def test_json_into_a_closed_pipe_gives_no_traceback(tmp_path: Path) -> None:
    """`actmap jobs list --json | head -0`: the reader is gone before actmap writes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli.main", "jobs", "list", "--json",
         "--store", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # before the interpreter is up, let alone printing
    err = proc.stderr.read().decode()
    proc.stderr.close()
    proc.wait(timeout=120)
    assert "Traceback" not in err
    assert "BrokenPipeError" not in err


def test_the_store_records_task_seconds_for_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`actmap_task_seconds` is the mean seconds per batch of finished jobs, from the
    job's elapsed time; a finished job must carry it."""
    from workers.storage.index import figures

    store = tmp_path / "store"
    code = main(["scan", str(SAMPLES / "1"), "--model", "digits-cnn", "--layers", "fc",
                 "--out", str(store), "--json"])  # fmt: skip
    assert code == 0
    capsys.readouterr()
    assert figures(str(store)).task_seconds > 0


def test_the_worker_start_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    """Starting a worker is news, not a warning."""
    from workers.execution.launcher import Supervisor
    from workers.execution.slots import Slot

    launcher = Supervisor([Slot("cli-test-worker", None)], ["extract"])
    with caplog.at_level(logging.INFO, logger="actmap"):
        launcher._start(0)
    try:
        started = [r for r in caplog.records if "started cli-test-worker" in r.getMessage()]
        assert [r.levelno for r in started] == [logging.INFO]
    finally:
        launcher.stop()
        launcher.procs[0].wait(timeout=60)
