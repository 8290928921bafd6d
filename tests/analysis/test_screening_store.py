"""Screening through the store: a reference job scanned with `squeeze` and `benign` stores
what the in-process bench hands the profile (tests/bench/screening.py), and a profile
fitted on it through `actmap screen fit` and run by `actmap screen run` flags what the same
profile fitted in process flags. Real embedded scans of the bundled demo model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image

from api.cli.main import main
from tests.oracle import planned, run_job
from workers.analysis.profiles import fit_profile, score_job
from workers.analysis.screening import LOGITS, SQUEEZE, ScreeningProfile
from workers.demo.digits import PREPROCESSING, WEIGHTS
from workers.errors import SpecError
from workers.execution.screen_one import Screeners, screen_sample
from workers.extraction.attacks import fgsm, normaliser
from workers.extraction.cache import ModelCache
from workers.extraction.inputs import decode
from workers.extraction.models import LoadedModel
from workers.extraction.screen_inputs import screening_inputs
from workers.extraction.squeezing import benign_copy, benign_corruptions, pixels
from workers.jobs import BENIGN_COPIES, ExtractionSpec
from workers.lifecycle.counters import MemoryCounters
from workers.lifecycle.delivery import Outcome, Runtime, execute_batch
from workers.pipeline import Extraction
from workers.storage.layout import attrs, open_job, read
from workers.storage.ledger import pending_batches

DIGITS = "workers.demo.digits:digits_cnn"
SAMPLES = Path(__file__).parents[2] / "workers" / "demo" / "samples"
LAYERS = ("conv1", "conv3", "fc")
Features = dict[str, np.ndarray]


@dataclass(frozen=True)
class Reference:
    store: str
    job_id: str
    model: LoadedModel
    paths: list[str]  # in row order
    labels: np.ndarray


def _spec(inputs: list[str], **options: Any) -> ExtractionSpec:
    return ExtractionSpec(
        model=DIGITS, weights=str(WEIGHTS), layers=LAYERS, inputs=tuple(inputs), batch_size=16,
        dtype="float32", labels_from_dirs=True, **options,
    )  # fmt: skip


def _scan(store: str, spec: ExtractionSpec, models: ModelCache) -> str:
    job_id = planned(store, spec, models.get(spec).info).job_id
    run_job(store, job_id, models)
    return job_id


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The 40 demo digits scanned with --squeeze --benign, in batches of 16 (the last one 8)."""
    store = str(tmp_path_factory.mktemp("screen-store") / "store")
    models = ModelCache()
    spec = _spec([str(SAMPLES)], squeeze=True, benign=True)
    job_id = _scan(store, spec, models)
    group = open_job(store, job_id, mode="r")
    paths = [str(p) for p in read(group, "source")]
    return Reference(store, job_id, models.get(spec), paths, np.asarray(read(group, "label")))


def _pixels(paths: list[str]) -> torch.Tensor:
    """The files decoded as a scan decodes them, back in pixel space."""
    x = torch.from_numpy(np.stack([decode(p, PREPROCESSING) for p in paths]))
    return pixels(x, PREPROCESSING)


def _features(model: LoadedModel, x: torch.Tensor) -> Features:
    """What the bench hands the profile, computed in process."""
    pooled, logits, squeezed = screening_inputs(model.module, x, PREPROCESSING, LAYERS)
    return {**pooled, LOGITS: logits, SQUEEZE: squeezed}


def _values(tree: xr.DataTree, path: str) -> np.ndarray:
    node = tree[path]
    assert isinstance(node, xr.DataArray), path
    return node.values


def _last(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return found


def test_the_stored_squeeze_column_and_benign_copies_equal_the_in_process_ones(
    reference: Reference,
) -> None:
    tree = xr.open_datatree(f"{reference.store}/jobs/{reference.job_id}", engine="zarr")
    x = _pixels(reference.paths)
    clean = _features(reference.model, x)
    assert tree["squeeze"].dims == ("sample", "squeezer")
    np.testing.assert_allclose(_values(tree, "squeeze"), clean[SQUEEZE], atol=1e-5)
    assert clean[SQUEEZE].max() > 0.1  # some digits move under squeezing: not all zeros
    rows = list(range(len(reference.paths)))
    for name in BENIGN_COPIES:
        copy = _features(reference.model, benign_copy(name, x, rows))
        logits = _values(tree, f"benign/{name}/logits")
        np.testing.assert_allclose(logits, copy[LOGITS], rtol=1e-4, atol=1e-4)
        squeezed = _values(tree, f"benign/{name}/squeeze")
        np.testing.assert_allclose(squeezed, copy[SQUEEZE], atol=1e-4)
        for layer in LAYERS:
            pooled = _values(tree, f"benign/{name}/layers/{layer}/pooled")
            np.testing.assert_allclose(pooled, copy[layer], rtol=1e-4, atol=1e-4)
    # The noise is a copy's, not the clean digit's: the copies differ from it.
    assert not np.allclose(_values(tree, "benign/noise-0.3/logits"), _values(tree, "logits"))


def test_a_benign_copy_is_the_same_whichever_batch_its_row_runs_in() -> None:
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    whole = benign_copy("noise-0.1", x, range(10, 16))
    assert torch.equal(benign_copy("noise-0.1", x[3:], range(13, 16)), whole[3:])
    assert not torch.equal(benign_copy("noise-0.1", x, range(6)), whole)
    assert tuple(benign_corruptions(x, torch.Generator().manual_seed(0))) == BENIGN_COPIES


def _fgsm_digits(reference: Reference, folder: Path) -> None:
    """The demo digits attacked by FGSM at eps 0.2, as 8-bit PNGs, beside clean copies."""
    folder.mkdir()
    x = _pixels(reference.paths)
    y = torch.from_numpy(reference.labels.astype(np.int64))
    adv = fgsm(reference.model.module, x, y, 0.2, normaliser(PREPROCESSING))
    for i, (clean, attacked) in enumerate(zip(x, adv, strict=True)):
        for tag, image in (("clean", clean), ("fgsm", attacked)):
            pixels_8bit = (image[0].numpy() * 255).round().clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels_8bit).save(folder / f"{tag}-{i:02d}.png")


def test_a_profile_fitted_through_the_store_flags_what_the_in_process_profile_flags(
    reference: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, job_id = reference.store, reference.job_id
    argv = ["screen", "fit", "--reference", job_id, "--fpr", "0.2", "--store", store, "--json"]
    assert main(argv) == 0
    fitted = _last(capsys)
    assert fitted["squeeze"] is True
    assert fitted["benign_copies"] == list(BENIGN_COPIES)
    assert "input/squeeze" in fitted["column_weights"]
    assert main([*argv[:-1]]) == 0  # and a person reads which it used
    assert "squeezing distances: used; benign copies: noise-0.05" in capsys.readouterr().out

    x = _pixels(reference.paths)
    rows = list(range(len(reference.paths)))
    parts = [_features(reference.model, benign_copy(n, x, rows)) for n in BENIGN_COPIES]
    in_process = ScreeningProfile.fit(
        _features(reference.model, x), reference.labels, fpr=0.2,
        benign={k: np.concatenate([p[k] for p in parts]) for k in parts[0]},
        benign_of=np.tile(np.arange(len(rows)), len(BENIGN_COPIES)),
    )  # fmt: skip
    assert fitted["threshold"] == pytest.approx(in_process.threshold, rel=1e-4, abs=1e-4)

    inputs = tmp_path / "screened"
    _fgsm_digits(reference, inputs)
    run = ["screen", "run", str(inputs), "--profile", fitted["profile_id"], "--store", store]
    assert main([*run, "--json"]) == 0
    screened = _last(capsys)
    group = open_job(store, screened["job_id"], mode="r")
    spec = attrs(group)["spec"]
    assert spec["squeeze"] is True  # the profile scores squeezing: the job computes it
    assert "benign" not in spec  # and never stores benign copies
    flags = np.asarray(read(group, "screen/flag"))
    scores = np.asarray(read(group, "screen/score"))
    found = _features(reference.model, _pixels([str(p) for p in read(group, "source")]))
    expected = in_process.score(found)
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3)
    assert flags.tolist() == (expected > in_process.threshold).tolist()
    attacked = np.asarray(["fgsm-" in Path(str(p)).name for p in read(group, "source")])
    assert flags[attacked].mean() > flags[~attacked].mean()  # the screen does something


def test_a_squeeze_profile_scoring_a_job_without_squeezing_is_a_one_line_error(
    reference: Reference,
) -> None:
    profile = fit_profile(reference.store, reference.job_id, fpr=0.2)
    models = ModelCache()
    plain = _scan(reference.store, _spec([reference.paths[0]]), models)
    with pytest.raises(SpecError, match="scores feature squeezing and job .* without it") as err:
        score_job(reference.store, plain, profile)
    assert "\n" not in str(err.value)


def test_rerunning_a_batch_of_a_squeeze_and_benign_job_rewrites_identical_bytes(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "inputs" / "7"
    broken.mkdir(parents=True)
    (broken / "broken.png").write_bytes(b"\x89PNG not an image")
    inputs = [*sorted(str(p) for p in (SAMPLES / "3").iterdir()), str(broken / "broken.png")]
    store = str(tmp_path / "store")
    spec = _spec(inputs, squeeze=True, benign=True).model_copy(update={"batch_size": 3})
    job_id = _scan(store, spec, ModelCache())
    root = Path(store) / "jobs" / job_id

    def digest() -> dict[str, str]:
        """Every file but the job's attrs (the batch, last again, finalizes it again)."""
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p != root / "zarr.json"
        }

    before = digest()
    assert any(name.startswith("benign/noise-0.3/squeeze/c") for name in before)
    group = open_job(store, job_id)
    last = int(group["done"].shape[0]) - 1  # type: ignore[union-attr]
    group["done"][last] = False  # type: ignore[index]
    assert pending_batches(group) == [last]
    runtime = Runtime(Extraction(ModelCache()), MemoryCounters())
    assert execute_batch(store, job_id, last, runtime) is Outcome.RAN
    assert digest() == before
    failed = len(inputs) - 1
    for name in ("squeeze", "benign/blur-1.0/logits", "benign/noise-0.05/layers/fc/pooled"):
        values = np.asarray(read(open_job(store, job_id, mode="r"), name))
        assert np.isnan(values[failed]).all(), name
        assert np.isfinite(values[:failed]).all(), name


def test_one_sample_screened_now_scores_with_squeezing_as_a_screening_job_does(
    reference: Reference, capsys: pytest.CaptureFixture[str]
) -> None:
    store, path = reference.store, reference.paths[0]
    profile = fit_profile(store, reference.job_id, fpr=0.2)
    found = screen_sample(
        store, None, profile, Path(path).name, Path(path).read_bytes(), ModelCache(), Screeners()
    )
    assert main(["screen", "run", path, "--profile", profile, "--store", store, "--json"]) == 0
    job = open_job(store, _last(capsys)["job_id"], mode="r")
    assert found["score"] == pytest.approx(float(read(job, "screen/score")[0]), abs=1e-5)
