"""`actmap scan --dtype uint8` and `--compression`, embedded, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from api.cli.main import main
from workers.storage.layout import array, attrs, open_job

SAMPLES = Path(__file__).parents[3] / "workers" / "demo" / "samples"


def _scan(store: Path, capsys: pytest.CaptureFixture[str], *options: str) -> str:
    code = main(["scan", str(SAMPLES / "1"), "--model", "digits-cnn", "--layers", "block1",
                 "--out", str(store), "--json", *options])  # fmt: skip
    assert code == 0
    job_id: str = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["job_id"]
    return job_id


def test_an_embedded_scan_on_a_cpu_host_names_lz4_when_it_names_no_codec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ACTMAP_DEVICE", raising=False)
    job_id = _scan(tmp_path / "store", capsys)
    assert attrs(open_job(str(tmp_path / "store"), job_id, "r"))["spec"]["compression"] == "lz4"


def test_a_uint8_scan_with_a_codec_stores_levels_with_that_codec_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    job_id = _scan(store, capsys, "--dtype", "uint8", "--compression", "none")
    group = open_job(str(store), job_id, "r")
    acts = array(group, "layers/block1/acts")
    assert acts.dtype == np.uint8
    assert acts.compressors == ()
    assert attrs(group)["spec"]["compression"] == "none"


def test_an_unknown_codec_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["scan", str(SAMPLES), "--model", "digits-cnn", "--layers", "conv1",
              "--compression", "gzip"])  # fmt: skip
    assert stopped.value.code == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert "--compression" in said[-1]
    assert "zstd" in said[-1]
