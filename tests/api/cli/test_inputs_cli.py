"""What a new user's inputs meet (issue 17): labels taken from folders, files that are not
of the model's input kind, and modules called more than once, through `actmap` itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from api.cli.main import main
from workers.errors import SampleCode, SpecError
from workers.storage.layout import attrs, open_job, read

SAMPLES = Path(__file__).parents[3] / "workers" / "demo" / "samples"


def _scan(store: Path, *argv: str) -> tuple[int, str]:
    code = main(["scan", *argv, "--model", "digits-cnn", "--out", str(store), "--json"])
    return code, str(store)


def _job(capsys: pytest.CaptureFixture[str]) -> str:
    job_id: str = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["job_id"]
    return job_id


def test_folders_of_a_subset_of_classes_are_labelled_by_their_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([
        "scan", str(SAMPLES / "3"), str(SAMPLES / "7"), "--model", "digits-cnn",
        "--layers", "conv1", "--labels-from-dirs", "--out", str(tmp_path / "s"),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "accuracy on labelled samples: 8/8" in printed
    job_id = printed.split("job ", 1)[1].split()[0]
    group = open_job(str(tmp_path / "s"), job_id, mode="r")
    assert sorted(set(read(group, "label").tolist())) == [3, 7]
    assert attrs(group)["classes"] == [str(d) for d in range(10)]


def _folders(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        shutil.copy(next((SAMPLES / "3").glob("*.png")), root / name / "a.png")


def test_integer_folders_of_a_model_without_class_names_take_the_integer() -> None:
    from workers.extraction.inputs import Source, labels_from_dirs

    sources = [Source("a", "/x/4/a.png"), Source("b", "/x/9/b.png")]
    assert labels_from_dirs(sources, None, 10) == ([4, 9], None)
    named = ("zero", "one", "two", "three", "4", "five", "6", "9")
    assert labels_from_dirs(sources, named, 8) == ([4, 7], list(named))
    with pytest.raises(SpecError, match="not one of the model's classes"):
        labels_from_dirs([Source("c", "/x/cat/c.png")], ("dog", "bird"), 2)
    with pytest.raises(SpecError, match="not a class index below 10"):
        labels_from_dirs([Source("c", "/x/12/c.png")], None, 10)


def test_folders_that_name_no_class_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _folders(tmp_path / "in", ["cat", "dog"])
    code, store = _scan(tmp_path / "s", str(tmp_path / "in"), "--layers", "conv1",
                        "--labels-from-dirs")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "'cat'" in err
    assert "classes" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    jobs = tmp_path / "s" / "jobs"
    assert not jobs.exists() or not any(jobs.iterdir())


def test_a_stray_text_file_in_an_image_folder_is_skipped_not_scored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(SAMPLES / "3", tmp_path / "in" / "3")
    (tmp_path / "in" / "3" / "README.txt").write_text("these are threes\n" * 40)
    code = main([
        "scan", str(tmp_path / "in"), "--model", "digits-cnn", "--layers", "conv1",
        "--labels-from-dirs", "--out", str(tmp_path / "s"),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "1 file skipped: not an image" in printed
    assert "succeeded: 5/5 samples in 1/1 batches, 0 failed" in printed
    assert "accuracy on labelled samples: 4/4" in printed
    job_id = printed.split("job ", 1)[1].split()[0]
    group = open_job(str(tmp_path / "s"), job_id, mode="r")
    samples = list(read(group, "sample"))
    row = samples.index("3/README.txt")
    assert read(group, "error_code")[row] == SampleCode.WRONG_KIND
    assert read(group, "pred")[row] == -1


def test_input_kind_overrides_the_models_declaration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "a.npy", np.zeros((1, 28, 28), np.float32))
    shutil.copy(next((SAMPLES / "3").glob("*.png")), tmp_path / "in" / "b.png")
    code, store = _scan(tmp_path / "s", str(tmp_path / "in"), "--layers", "conv1",
                        "--input-kind", "array")  # fmt: skip
    assert code == 0
    group = open_job(store, _job(capsys), mode="r")
    assert list(read(group, "error_code")) == [SampleCode.OK, SampleCode.WRONG_KIND]


@pytest.mark.parametrize("layer", ["relu", "block1.relu"])
def test_a_module_called_twice_is_refused_at_submission(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layer: str
) -> None:
    code, _ = _scan(tmp_path / "s", str(SAMPLES / "3"), "--layers", f"conv1,{layer}")
    err = capsys.readouterr().err
    assert code == 2
    assert f"{layer!r}" in err
    assert "times in one forward pass" in err
    assert "Traceback" not in err


def test_layers_says_how_often_each_module_is_called(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", "--model", "digits-cnn", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    assert rows["relu"]["calls"] == 3
    assert rows["block1.relu"]["calls"] == 2
    assert rows["conv1"]["calls"] == 1
