"""What `health`, `compare` and `screen fit` print (issue 17, points 7 and 9): tables a
person reads, `--json` for scripts, refusals before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.cli.main import main

SAMPLES = Path(__file__).parents[3] / "workers" / "demo" / "samples"


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    store = str(tmp_path_factory.mktemp("analysis-output") / "store")
    argv = ["scan", str(SAMPLES), "--model", "digits-cnn", "--layers", "conv1,conv3,fc",
            "--labels-from-dirs", "--out", store, "--json"]  # fmt: skip
    assert main(argv) == 0
    return store, json.loads(_last_job(store))


def _last_job(store: str) -> str:
    jobs = sorted(p.name for p in Path(store, "jobs").iterdir() if p.is_dir())
    return json.dumps(jobs[-1])


def test_health_prints_a_table_with_sparse_filters(
    scanned: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    store, job = scanned
    capsys.readouterr()
    assert main(["health", job, "--store", store]) == 0
    shown = capsys.readouterr().out
    assert "sparse" in shown
    assert "always on" in shown
    assert '"layers"' not in shown  # a table, not JSON
    assert main(["health", job, "--store", store, "--json"]) == 0
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "n_sparse" in found["layers"]["conv3"]


def test_compare_prints_group_sizes_and_top_channels(
    scanned: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    store, job = scanned
    capsys.readouterr()
    code = main(["compare", job, "--a", "correct=true", "--b", "correct=false",
                 "--store", store])  # fmt: skip
    assert code == 0
    shown = capsys.readouterr().out
    assert "A: 38 samples" in shown
    assert "B: 2 samples" in shown
    for column in ("Cohen's d", "AUROC", "q"):
        assert column in shown


def test_compare_without_a_selection_refuses(
    scanned: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    store, job = scanned
    capsys.readouterr()
    assert main(["compare", job, "--store", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--a" in err[0]
    assert "JOB_B" in err[0]


def test_screen_fit_on_the_demo_with_the_default_fpr_prints_its_figures(
    scanned: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    store, job = scanned
    capsys.readouterr()
    assert main(["screen", "fit", "--reference", job, "--store", store]) == 0
    shown = capsys.readouterr().out
    assert "threshold" in shown
    assert "realised" in shown
    assert "layers" in shown
    assert '"column_weights"' not in shown


def test_screen_fit_on_a_reference_too_small_refuses_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = str(tmp_path / "store")
    argv = ["scan", str(SAMPLES / "1"), "--model", "digits-cnn", "--layers", "fc",
            "--labels-from-dirs", "--out", store, "--json"]  # fmt: skip
    assert main(argv) == 0
    job = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["job_id"]
    assert main(["screen", "fit", "--reference", job, "--store", store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "needs at least" in err[0]
    assert not Path(store, "analyses").exists()


def test_screen_fit_holds_out_the_share_asked_and_says_on_how_many_it_calibrated(
    scanned: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    store, job = scanned
    capsys.readouterr()
    fit = ["screen", "fit", "--reference", job, "--fpr", "0.1", "--store", store]
    assert main(fit) == 0
    assert "on 10 held-out clean samples" in capsys.readouterr().out  # 1 of each class's 4
    assert main([*fit, "--held-out", "0.5", "--json"]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["n_calibration"] == fitted["profile"]["n_calibration"] == 20
    assert main([*fit, "--held-out", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["actmap: error: --held-out is a share in (0, 1), got 1.0"]
