"""One rate and one time left (issue 17, point 8): the scan's summary, `jobs status` and
the report show the same samples/s for a job, and a finished job no time left."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from api.cli.main import main

SAMPLES = Path(__file__).parents[3] / "workers" / "demo" / "samples"


def test_scan_status_and_report_show_one_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, report = str(tmp_path / "store"), tmp_path / "report"
    code = main(["scan", str(SAMPLES / "3"), "--model", "digits-cnn", "--layers", "fc",
                 "--out", store, "--report", str(report)])  # fmt: skip
    assert code == 0
    summary = capsys.readouterr().out
    said = re.search(r"job (\S+) succeeded: .*, ([\d.]+) samples/s", summary)
    assert said is not None, summary
    job_id, rate = said.group(1), said.group(2)
    assert "s left" not in summary
    assert main(["jobs", "status", job_id, "--store", store, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["samples_per_s"] is not None
    assert f"{status['samples_per_s']:.1f}" == rate
    assert status["eta_s"] is None
    assert f"{rate} samples/s" in (report / "index.html").read_text()
