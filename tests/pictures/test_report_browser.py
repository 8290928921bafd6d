"""`actmap report`: a real job's HTML report, static and offline, opened in a real headless
Chromium served over HTTP: every picture loads and the console stays silent."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from PIL import Image

from api.cli.report import report
from workers.analysis.compare import compare
from workers.analysis.filter_atlas import run_atlas
from workers.execution.embedded import scan
from workers.jobs import ExtractionSpec
from workers.pictures.report import comparison_section, write_report
from workers.settings import Settings
from workers.storage.layout import attrs, open_job, read
from workers.storage.stored_job import read_filters

SAMPLES = Path(__file__).parents[2] / "workers" / "demo" / "samples"
SCREENSHOT_COPY = Path("/tmp/actmap-report-screenshot.png")


@dataclass(frozen=True)
class Job:
    store: str
    job_id: str


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    store = str(tmp_path_factory.mktemp("report") / "store")
    spec = ExtractionSpec(
        model="digits-cnn",
        layers=("conv1", "block2", "conv3", "fc"),
        inputs=(str(SAMPLES),),
        batch_size=16,
        labels_from_dirs=True,
    )
    done = scan(spec, store, Settings(store=store))
    assert done.state == "succeeded"
    return Job(store, done.job_id)


@pytest.fixture(scope="module")
def atlas(job: Job) -> str:
    """An atlas of the first conv layer: its sheets carry the filter weights too."""
    return run_atlas(job.store, job.job_id, "conv1", 6)


@pytest.fixture(scope="module")
def page(
    job: Job,
    atlas: str,  # noqa: ARG001 (stored before the report is written, so the report shows it)
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    return report(job.store, job.job_id, tmp_path_factory.mktemp("out") / "report")


def _copy(job: Job, tmp_path: Path) -> Job:
    """A private copy of the job's store, to change without touching the shared one."""
    store = tmp_path / "store"
    shutil.copytree(job.store, store)
    return Job(str(store), job.job_id)


def _sources(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_the_report_is_static_offline_and_links_its_pictures_relatively(page: Path) -> None:
    html = page.read_text()
    sources = _sources(html)
    assert len(sources) >= 10
    for src in sources:
        assert src.startswith("img/"), src
        with Image.open(page.parent / src) as picture:
            assert picture.format == "PNG"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "url(" not in html
    assert "@import" not in html
    on_disk = {p.name for p in (page.parent / "img").iterdir()}
    assert on_disk == {src.removeprefix("img/") for src in sources}


def test_the_report_names_the_model_layers_timings_and_filter_health(page: Path, job: Job) -> None:
    html = page.read_text()
    sha = attrs(open_job(job.store, job.job_id, mode="r"))["model"]["sha256"]
    for expected in (
        str(sha),
        "receptive field",
        "<td>[21, 21]</td>",  # conv3's receptive field
        "samples/s",
        "accuracy on labelled samples",
        "Filter health",
        "median sparsity",
        "correct: <code>",
        "misclassified: <code>",
        "low confidence: <code>",
        "conv1: 16 filters",
    ):
        assert expected in html, expected


def test_the_atlas_page_shows_the_strongest_channels_with_their_weights(
    page: Path, atlas: str
) -> None:
    html = page.read_text()
    assert 'id="atlas-conv1"' in html
    assert f"Atlas {atlas} of layer <code>conv1</code>" in html
    sheet = next((page.parent / "img").glob(f"atlas-{atlas}-conv1-*.png"))
    with Image.open(sheet) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.shape[1] > 6 * 72  # six crops side by side, the weights before them


def test_the_first_conv_layers_weights_are_kept_in_the_store_for_the_api(
    page: Path, job: Job
) -> None:
    kept = read_filters(open_job(job.store, job.job_id, mode="r"), "conv1")
    assert kept is not None
    assert kept.shape == (16, 1, 3, 3)
    assert (page.parent / "img" / "filters-conv1.png").is_file()


def test_without_labels_the_report_picks_by_confidence_and_says_why(
    job: Job, tmp_path: Path
) -> None:
    copy = _copy(job, tmp_path)
    labels = open_job(copy.store, copy.job_id).get("label")
    assert isinstance(labels, zarr.Array)
    labels[:] = -1
    html = write_report(copy.store, copy.job_id, tmp_path / "out").read_text()
    assert "Labels are unknown" in html
    assert "most confident: <code>" in html
    assert "misclassified: <code>" not in html
    assert "labels unknown" in html


def test_a_screening_job_gets_the_histogram_of_its_scores(job: Job, tmp_path: Path) -> None:
    copy = _copy(job, tmp_path)
    group = open_job(copy.store, copy.job_id)
    scores = np.random.default_rng(0).standard_normal(40).astype(np.float32)
    screen = group.require_group("screen")
    screen.attrs["threshold"] = 1.25
    screen.create_array("score", shape=(40,), dtype="float32")[:] = scores
    screen.create_array("flag", shape=(40,), dtype="bool")[:] = scores > 1.25
    out = tmp_path / "out"
    html = write_report(copy.store, copy.job_id, out).read_text()
    assert 'id="screening"' in html
    assert "threshold 1.25" in html
    assert (out / "img" / "screen-scores.png").is_file()


def test_a_comparison_plugs_in_as_a_section_with_bars_and_difference_maps(
    job: Job, tmp_path: Path
) -> None:
    group = open_job(job.store, job.job_id, mode="r")
    right = read(group, "pred") == read(group, "label")
    pooled = np.asarray(group["layers/conv3/pooled"][...])  # type: ignore[index]
    acts = np.asarray(group["layers/conv3/acts"][...], dtype=np.float32)  # type: ignore[index]
    wrong_row, right_row = int(np.flatnonzero(~right)[0]), int(np.flatnonzero(right)[0])
    section = comparison_section(
        compare(pooled[right], pooled[~right]),
        "conv3",
        "Correct against misclassified",
        difference_ids=[0, 1, 2, 3],
        differences=acts[wrong_row, :4] - acts[right_row, :4],
        pair="a misclassified sample minus a correct one",
    )
    out = tmp_path / "out"
    html = write_report(job.store, job.job_id, out, sections=[section]).read_text()
    assert "Correct against misclassified" in html
    names = {p.name for p in (out / "img").iterdir()}
    assert "compare-Correct_against_misclassified-conv3.png" in names
    assert "diff-Correct_against_misclassified-conv3.png" in names


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the report folder quietly and records every request's path and status."""

    served: list[tuple[str, int]]

    def log_request(self, code: Any = "-", size: Any = "-") -> None:  # noqa: ARG002 (the base's)
        self.served.append((self.path, int(code)))

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass


@pytest.fixture
def served(page: Path) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    served: list[tuple[str, int]] = []
    handler = type("Handler", (_Handler,), {"served": served})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(page.parent))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/index.html", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "no chromium on PATH (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: .ci/run installs it, so CI must have it")
        pytest.skip(reason)
    return found


def _headless(
    browser: str, profile: Path, url: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=5000", *extra, url,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_a_real_browser_loads_every_picture_and_the_console_stays_silent(
    page: Path, atlas: str, served: tuple[str, list[tuple[str, int]]], tmp_path: Path
) -> None:
    browser = _chromium()
    url, requests = served
    dom = _headless(browser, tmp_path / "profile", url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body is not None, dom.stdout[:500]
    data = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    images = len(_sources(page.read_text()))
    assert data.get("images-total") == str(images), data
    assert data.get("images-loaded") == str(images), "some pictures did not load"
    assert data.get("errors") == "0", "the page saw errors"
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "\n".join(console)
    pictures = {path for path, code in requests if path.startswith("/img/") and code == 200}
    assert len(pictures) == images, requests
    sheets = {path for path in pictures if path.startswith(f"/img/atlas-{atlas}-conv1-")}
    assert len(sheets) == 8, "the atlas page's channel sheets loaded in the browser"

    shot = tmp_path / "report.png"
    taken = _headless(
        browser, tmp_path / "profile", url, f"--screenshot={shot}", "--window-size=1280,2000",
        "--hide-scrollbars",
    )  # fmt: skip
    assert taken.returncode == 0, taken.stderr[-2000:]
    with Image.open(shot) as picture:
        assert picture.size == (1280, 2000)
        pixels = np.asarray(picture.convert("L"))
    assert pixels.std() > 20, "the screenshot shows more than a blank page"
    shutil.copyfile(shot, SCREENSHOT_COPY)
