"""`actmap scan` and `actmap layers` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from api.cli.main import main

SAMPLES = Path(__file__).parents[3] / "workers" / "demo" / "samples"


def test_scan_json_prints_one_object_with_where_the_results_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    code = main(
        [
            "scan", str(SAMPLES), "--model", "digits-cnn", "--layers", "conv1,conv3,fc",
            "--labels-from-dirs", "--out", str(store), "--batch-size", "16", "--json",
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["state"] == "succeeded"
    assert result["n_samples"] == 40
    assert result["n_failed"] == 0
    assert (store / "jobs" / result["job_id"] / "layers" / "conv3" / "acts").is_dir()


def test_scan_summary_names_the_store_and_the_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    code = main(["scan", str(SAMPLES), "--model", "digits-cnn", "--layers", "conv1",
                 "--labels-from-dirs", "--out", str(store)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "accuracy on labelled samples" in printed
    assert str(store.absolute()) in printed
    assert "open_datatree" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layers", "conv_1"], "unknown layer 'conv_1'"),
        (["--layers", "conv1", "--channels", "99"], "channel 99"),
        (["--layers", "conv1", "--batch-size", "0"], "invalid batch_size"),
        (["--layers", "conv1", "--model", "no-such-model"], "is not a file"),
        (["--layers", "conv1", "--no-wait"], "--no-wait needs a broker"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    base = ["scan", str(SAMPLES / "3"), "--model", "digits-cnn", "--out", str(tmp_path / "s")]
    if "--model" in argv:
        base = base[:2] + argv[argv.index("--model") : argv.index("--model") + 2] + base[4:]
        argv = argv[: argv.index("--model")] + argv[argv.index("--model") + 2 :]
    code = main(base + argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("actmap: error:")
    assert message in err
    assert "Traceback" not in err


def test_a_missing_input_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["scan", str(tmp_path / "nope"), "--model", "digits-cnn", "--layers", "conv1",
                 "--out", str(tmp_path / "s")])  # fmt: skip
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_layers_lists_the_catalogue_with_receptive_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["layers", "--model", "digits-cnn", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in info["layers"]}
    assert rows["conv3"]["receptive_field"] == [21, 21]
    assert rows["conv3"]["rf_stride"] == [4, 4]
    assert rows["fc"]["output_shape"] == [10]
    assert rows["fc"]["receptive_field"] is None


def test_preprocessing_is_overridable_on_the_command_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["layers", "--model", "digits-cnn", "--input-size", "32x32", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["preprocessing"]["size"] == [32, 32]
    assert {r["name"]: r for r in info["layers"]}["conv1"]["output_shape"] == [16, 32, 32]


def test_the_installed_command_runs_as_a_subprocess(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "api.cli.main", "scan", str(SAMPLES / "7"), "--model", "digits-cnn",
         "--layers", "fc", "--out", str(tmp_path / "s"), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["n_samples"] == 4


def test_jobs_list_status_and_resume_work_on_an_embedded_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(tmp_path / "store")
    scan = ["scan", str(SAMPLES / "1"), "--model", "digits-cnn", "--layers", "fc", "--out", store]
    assert main([*scan, "--json"]) == 0
    job_id = json.loads(capsys.readouterr().out.splitlines()[-1])["job_id"]
    assert main(["jobs", "list", "--store", store, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["jobs"]
    assert [j["job_id"] for j in listed] == [job_id]
    assert main(["jobs", "status", job_id, "--store", store, "--json"]) == 0
    current = json.loads(capsys.readouterr().out)
    assert current["state"] == "succeeded"
    assert current["samples_done"] == current["n_samples"] == 4
    assert main(["jobs", "resume", job_id, "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "succeeded"


def test_cancelling_a_finished_job_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(tmp_path / "store")
    assert main(["scan", str(SAMPLES / "1"), "--model", "digits-cnn", "--layers", "fc",
                 "--out", store, "--json"]) == 0  # fmt: skip
    job_id = json.loads(capsys.readouterr().out.splitlines()[-1])["job_id"]
    assert main(["jobs", "cancel", job_id, "--store", store]) == 2
    assert capsys.readouterr().err.strip() == (
        f"actmap: error: job {job_id} is already succeeded; nothing to cancel"
    )
    assert main(["jobs", "status", "nope", "--store", store]) == 2
    assert "no job 'nope'" in capsys.readouterr().err


def test_a_cancelled_embedded_job_resumes_exactly_its_missing_batches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.oracle import planned
    from workers.extraction.cache import ModelCache
    from workers.jobs import ExtractionSpec
    from workers.lifecycle.counters import MemoryCounters
    from workers.lifecycle.delivery import Runtime, execute_batch
    from workers.lifecycle.state import cancel
    from workers.pipeline import Extraction
    from workers.storage.layout import open_job, read

    store = str(tmp_path / "store")
    spec = ExtractionSpec(model="digits-cnn", layers=("fc",), inputs=(str(SAMPLES),), batch_size=8)
    models = ModelCache()
    job = planned(store, spec, models.get(spec).info)
    execute_batch(store, job.job_id, 1, Runtime(Extraction(models), MemoryCounters()))
    cancel(store, job.job_id)
    assert main(["jobs", "resume", job.job_id, "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "succeeded"
    assert read(open_job(store, job.job_id, mode="r"), "done").all()


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"ACTMAP_ATTEMPT_CAP": "three"}, "invalid ACTMAP_ATTEMPT_CAP: Input should be a valid"),
        ({"ACTMAP_TASK_BUDGET_S": "-1"}, "invalid ACTMAP_TASK_BUDGET_S: Input should be greater"),
        ({"ACTMAP_TASK_BUDGET_S": "600"}, "ACTMAP_TASK_BUDGET_S (600) must be below"),
        (
            {"ACTMAP_MODEL_CHECK_TIMEOUT_S": "540"},
            "ACTMAP_MODEL_CHECK_TIMEOUT_S (540) must be below",
        ),
    ],
)
def test_a_bad_setting_is_a_one_line_error_naming_the_variable(
    env: dict[str, str],
    said: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["jobs", "list", "--store", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert said in err
    assert len(err.strip().splitlines()) == 1
