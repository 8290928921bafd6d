"""Analysis jobs on real stored jobs: results under analyses/{id}, opened with xarray.

The jobs are extracted with the bundled digits model from the 40 demo PNGs (labels from their
folders), from shifted and noisy copies of them (a clean reference, and fresh copies mixed
with planted noise images), and with two test
factories below: `dead_net`, the bundled model with one filter killed, and `narrow_net`, an
unrelated model whose `conv1` has another width.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from tests.oracle import planned, run_job
from workers.analysis.analyses import run_compare, run_health, run_signatures
from workers.analysis.compare import COMPARE_BUDGET, compare
from workers.analysis.profiles import fit_profile, load_profile, score_job
from workers.analysis.screening import LOGITS, ScreeningProfile
from workers.analysis.signatures import family_signatures
from workers.demo.digits import PREPROCESSING, WEIGHTS, DigitsNet
from workers.errors import LayerError, NotFound, SpecError
from workers.extraction.cache import ModelCache
from workers.jobs import AnalysisState, ExtractionSpec
from workers.storage.analyses import open_analysis, placeholder
from workers.storage.layout import attrs, open_job, read
from workers.storage.stored_job import Selection

DIGITS = "workers.demo.digits:digits_cnn"
SAMPLES = Path(__file__).parents[2] / "workers" / "demo" / "samples"
LAYERS = ("conv1", "block1", "conv2", "block2", "conv3", "fc")
DEAD = 3  # the block1 channel that dead_net kills


def dead_net() -> DigitsNet:
    """The bundled model with block1's channel 3 dead: a very negative shift right before
    block1's final ReLU (its convs have no bias; the BatchNorm shift plays that part)."""
    model = DigitsNet()
    model.load_state_dict(load_file(str(WEIGHTS)))
    with torch.no_grad():
        model.block1.bn2.bias[DEAD] = -1e4
    return model


class Narrow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(self.pool(self.conv1(x)).flatten(1))
        return out


def narrow_net() -> Narrow:
    """Another model with a `conv1` of 8 channels, not 16."""
    torch.manual_seed(0)
    return Narrow()


dead_net.preprocessing = PREPROCESSING  # type: ignore[attr-defined]
narrow_net.preprocessing = PREPROCESSING  # type: ignore[attr-defined]


def _normalised(pixels: np.ndarray) -> np.ndarray:
    x = (pixels / 255.0 - PREPROCESSING.mean[0]) / PREPROCESSING.std[0]
    return x[None].astype(np.float32)


def _digit_inputs(root: Path, copies: int, seed: int) -> Path:
    """Copies of each demo digit, shifted by up to a pixel and with pixel noise, as
    model-ready .npy in label folders: clean samples from one distribution."""
    rng = np.random.default_rng(seed)
    for png in sorted(SAMPLES.glob("*/*.png")):
        pixels = np.asarray(Image.open(png), dtype=np.float64)
        for i in range(copies):
            shift = tuple(int(v) for v in rng.integers(-1, 2, size=2))
            moved = np.roll(pixels, shift, axis=(0, 1)) + rng.normal(0, 8, pixels.shape)
            path = root / png.parent.name / f"{png.stem}-{i}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, _normalised(moved.clip(0, 255)))
    return root


def _outlier_inputs(root: Path, n: int) -> Path:
    """Uniform noise images: nothing like a digit."""
    rng = np.random.default_rng(1)
    folder = root / "noise"
    folder.mkdir(parents=True)
    for i in range(n):
        np.save(folder / f"{i:02d}.npy", _normalised(rng.uniform(0, 255, (28, 28))))
    return root


class Jobs:
    """The module's store and jobs, extracted once."""

    def __init__(self, root: Path) -> None:
        self.store = str(root / "store")
        self.models = ModelCache()
        self.demo = self.extract([SAMPLES])
        self.dead = self.extract([SAMPLES], model="tests.analysis.test_results:dead_net")
        self.reference = self.extract([_digit_inputs(root / "reference", 6, seed=0)])
        fresh = _digit_inputs(root / "fresh", 1, seed=1)
        # Unlabelled: "noise" is none of the model's classes.
        self.mixed = self.extract([fresh, _outlier_inputs(root / "outliers", 8)], labelled=False)

    def extract(
        self,
        inputs: Sequence[Path],
        model: str = DIGITS,
        layers: Sequence[str] = LAYERS,
        labelled: bool = True,
    ) -> str:
        spec = ExtractionSpec(
            model=model,
            weights=str(WEIGHTS) if model == DIGITS else None,
            layers=tuple(layers),
            inputs=tuple(str(p) for p in inputs),
            batch_size=16,
            dtype="float32",
            labels_from_dirs=labelled,
        )
        job = planned(self.store, spec, self.models.get(spec).info)
        run_job(self.store, job.job_id, self.models, decode_threads=2)
        return job.job_id

    def stored(self, job_id: str, name: str) -> np.ndarray:
        return read(open_job(self.store, job_id, mode="r"), name)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    return Jobs(tmp_path_factory.mktemp("results"))


def _tree(store: str, analysis_id: str) -> xr.DataTree:
    # Both entry points must open without warnings (pytest turns them into errors).
    xr.open_zarr(f"{store}/analyses/{analysis_id}").close()
    return xr.open_datatree(f"{store}/analyses/{analysis_id}", engine="zarr")


def test_health_streamed_in_small_blocks_equals_numpy_over_the_whole_array(jobs: Jobs) -> None:
    analysis = run_health(jobs.store, jobs.demo, block=7)
    tree = _tree(jobs.store, analysis)
    assert tree.attrs["kind"] == "health"
    assert tree.attrs["inputs"]["job_id"] == jobs.demo
    assert tree.attrs["inputs"]["n_samples"] == 40
    for layer in LAYERS:
        acts = jobs.stored(jobs.demo, f"layers/{layer}/acts").astype(np.float64)
        axes = (0, *range(2, acts.ndim))
        result = tree[f"layers/{layer}"].dataset
        assert result["mean"].dims == ("channel",)
        np.testing.assert_allclose(result["mean"], acts.mean(axis=axes), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(result["std"], acts.std(axis=axes), rtol=1e-7, atol=1e-9)
        np.testing.assert_array_equal(result["max"], acts.max(axis=axes))
        np.testing.assert_allclose(result["apoz"], (acts <= 0).mean(axis=axes))
        assert np.isnan(result["extreme_rate"]).all()  # neither clip nor a reference given
        assert tree.attrs["layers"][layer]["n_dead"] == int(result["dead"].sum())


def test_health_of_a_selection_reads_only_the_selected_samples(jobs: Jobs) -> None:
    analysis = run_health(jobs.store, jobs.demo, ["conv3"], Selection(jobs.demo, label=(2, 7)))
    labels = jobs.stored(jobs.demo, "label")
    acts = jobs.stored(jobs.demo, "layers/conv3/acts")[np.isin(labels, [2, 7])]
    result = _tree(jobs.store, analysis)["layers/conv3"].dataset
    np.testing.assert_allclose(result["mean"], acts.astype(np.float64).mean(axis=(0, 2, 3)))
    assert list(_tree(jobs.store, analysis).children["layers"].children) == ["conv3"]


def test_health_finds_the_filter_killed_by_a_negative_bias_before_a_relu(jobs: Jobs) -> None:
    dead = attrs(open_analysis(jobs.store, run_health(jobs.store, jobs.dead, ["block1"])))
    healthy = attrs(open_analysis(jobs.store, run_health(jobs.store, jobs.demo, ["block1"])))
    assert DEAD in dead["layers"]["block1"]["dead"]
    assert DEAD not in healthy["layers"]["block1"]["dead"]
    assert dead["layers"]["block1"]["n_dead"] == healthy["layers"]["block1"]["n_dead"] + 1


def test_health_counts_extremes_above_a_reference_jobs_99th_percentile(jobs: Jobs) -> None:
    analysis = run_health(jobs.store, jobs.mixed, ["conv1"], reference_job=jobs.reference)
    rate = _tree(jobs.store, analysis)["layers/conv1"].dataset["extreme_rate"].values
    assert ((rate >= 0) & (rate <= 1)).all()
    assert rate.max() > 0.01  # the noise images exceed the clean digits' percentile


# The default budget holds everything at once; 600 bytes reads a row and a few channels
# at a time.
@pytest.mark.parametrize("budget", [COMPARE_BUDGET, 600], ids=["default", "tiny"])
def test_compare_equals_the_in_memory_comparison_and_ranks_every_channel(
    jobs: Jobs, budget: int
) -> None:
    a, b = Selection(jobs.demo, label=0), Selection(jobs.demo, label=1)
    analysis = run_compare(jobs.store, a, b, ["conv3", "fc"], budget=budget)
    tree = _tree(jobs.store, analysis)
    labels = jobs.stored(jobs.demo, "label")
    for layer in ("conv3", "fc"):
        pooled = jobs.stored(jobs.demo, f"layers/{layer}/pooled")
        expected = compare(pooled[labels == 0], pooled[labels == 1])
        result = tree[f"layers/{layer}"].dataset
        for name in ("mean_a", "mean_b", "mean_difference", "cohen_d", "t", "p", "q", "auroc"):
            np.testing.assert_allclose(
                result[name], getattr(expected, name), rtol=1e-12, atol=1e-12, err_msg=name
            )
        assert tree.attrs["layers"][layer]["auroc_error"] == 0.0
        rank = result["rank"].values
        assert sorted(rank.tolist()) == list(range(pooled.shape[1]))
        best = int(np.argmin(rank))
        assert abs(expected.auroc[best] - 0.5) == np.abs(expected.auroc - 0.5).max()
    assert tree.attrs["inputs"]["a"] == {"job_id": jobs.demo, "label": 0}
    assert tree.attrs["inputs"]["n_a"] == tree.attrs["inputs"]["n_b"] == 4


def test_paired_compare_matches_sample_ids_and_measures_each_pair(jobs: Jobs) -> None:
    analysis = run_compare(
        jobs.store, Selection(jobs.dead), Selection(jobs.demo, label=(3, 4)), paired=True
    )
    tree = _tree(jobs.store, analysis)
    ids = np.asarray(jobs.stored(jobs.demo, "sample").tolist())
    labels = jobs.stored(jobs.demo, "label")
    assert list(tree.dataset["pair"].values) == ids[np.isin(labels, [3, 4])].tolist()
    # dead_net changes block1 onwards: conv1 is identical, block1 is not.
    block1 = tree["layers/block1"].dataset.sel(pair=ids[labels == 3][0])
    assert float(block1["l2"]) > 0
    np.testing.assert_array_equal(tree["layers/conv1"].dataset["l2"], 0.0)
    rows = np.flatnonzero(np.isin(labels, [3, 4]))
    a = jobs.stored(jobs.dead, "layers/block1/acts")[rows].reshape(rows.size, -1)
    b = jobs.stored(jobs.demo, "layers/block1/acts")[rows].reshape(rows.size, -1)
    np.testing.assert_allclose(
        tree["layers/block1"].dataset["l2"], np.linalg.norm(a - b, axis=1), rtol=1e-6
    )


def test_compare_refuses_unknown_jobs_empty_selections_and_mismatched_layers(
    jobs: Jobs,
) -> None:
    with pytest.raises(NotFound, match="no job 'nope'"):
        run_compare(jobs.store, Selection("nope"), Selection(jobs.demo))
    with pytest.raises(SpecError, match="selection B of job .*: no sample meets the selection"):
        run_compare(jobs.store, Selection(jobs.demo), Selection(jobs.demo, label=42))
    narrow = jobs.extract([SAMPLES], "tests.analysis.test_results:narrow_net", ["conv1", "fc"])
    with pytest.raises(LayerError, match=f"job {narrow} stores no layer 'block1'"):
        run_compare(jobs.store, Selection(jobs.demo), Selection(narrow))
    with pytest.raises(SpecError, match="'conv1' has 16 channels in job .* and 8 in job"):
        run_compare(jobs.store, Selection(jobs.demo), Selection(narrow), layers=["conv1"])


def test_signatures_equal_the_in_memory_ones_with_labels_as_families(jobs: Jobs) -> None:
    analysis = run_signatures(jobs.store, jobs.reference, ["conv3"], block=11)
    tree = _tree(jobs.store, analysis)
    pooled = jobs.stored(jobs.reference, "layers/conv3/pooled")
    expected = family_signatures(pooled, jobs.stored(jobs.reference, "label"))
    assert tree.dataset["family"].values.tolist() == list(range(10))
    assert tree.dataset["n_samples"].values.tolist() == [24] * 10
    share = tree["layers/conv3"].dataset["share"]
    assert share.dims == ("family", "channel")
    np.testing.assert_array_equal(share, expected.share)
    assert tree.attrs["layers"]["conv3"]["4"] == expected.channels(4).tolist()


def test_a_stored_profile_scores_as_the_fitted_one_and_flags_planted_outliers(
    jobs: Jobs,
) -> None:
    profile_id = fit_profile(jobs.store, jobs.reference, ["block2", "conv3"], fpr=0.05)
    tree = _tree(jobs.store, profile_id)
    assert tree.attrs["kind"] == "screening-profile"
    assert (
        tree.attrs["model"]["sha256"] == attrs(open_job(jobs.store, jobs.demo))["model"]["sha256"]
    )
    pooled = {n: jobs.stored(jobs.reference, f"layers/{n}/pooled") for n in ("block2", "conv3")}
    pooled[LOGITS] = jobs.stored(jobs.reference, "logits")
    fitted = ScreeningProfile.fit(pooled, jobs.stored(jobs.reference, "label"), fpr=0.05)
    mixed = {n: jobs.stored(jobs.mixed, f"layers/{n}/pooled") for n in ("block2", "conv3")}
    mixed[LOGITS] = jobs.stored(jobs.mixed, "logits")
    loaded = load_profile(jobs.store, profile_id)
    np.testing.assert_allclose(loaded.score(mixed), fitted.score(mixed), rtol=1e-12)

    scores, flags = score_job(jobs.store, jobs.mixed, profile_id)
    outlier = np.char.startswith(np.asarray(jobs.stored(jobs.mixed, "sample").tolist()), "noise/")
    assert flags[outlier].all()
    assert flags[~outlier].mean() <= 0.15
    job = xr.open_datatree(f"{jobs.store}/jobs/{jobs.mixed}", engine="zarr")
    screen = job["screen"].dataset
    assert screen["flag"].dims == ("sample",)
    np.testing.assert_array_equal(screen["flag"], flags)
    np.testing.assert_array_equal(screen["score"], scores.astype(np.float32))


def test_a_queued_analysis_is_never_removed_while_its_results_are_saved(
    jobs: Jobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll between a delete and a create would answer 404 for an analysis that exists."""
    import zarr.storage

    removed: list[str] = []
    for name in ("delete", "delete_dir"):
        original = getattr(zarr.storage.LocalStore, name)

        async def recorded(self: object, key: str, _original: object = original) -> None:
            removed.append(key)
            await _original(self, key)  # type: ignore[operator]

        monkeypatch.setattr(zarr.storage.LocalStore, name, recorded)
    analysis_id = "queued-health"
    placeholder(jobs.store, analysis_id, "health", "local", AnalysisState.QUEUED)
    placeholder(jobs.store, analysis_id, "health", "local", AnalysisState.RUNNING)
    run_health(jobs.store, jobs.demo, ["fc"], analysis_id=analysis_id)
    group = f"analyses/{analysis_id}"
    assert [key for key in removed if key in (group, f"{group}/zarr.json")] == []
    assert attrs(open_analysis(jobs.store, analysis_id))["state"] == "succeeded"


def test_a_profile_fitted_on_another_model_is_refused(jobs: Jobs) -> None:
    profile_id = fit_profile(jobs.store, jobs.reference, ["conv3"])
    with pytest.raises(SpecError, match=f"profile {profile_id} was fitted on another model"):
        score_job(jobs.store, jobs.dead, profile_id)
    with pytest.raises(SpecError, match="adversarial job .* ran another model"):
        fit_profile(jobs.store, jobs.reference, ["conv3"], adversarial_job=jobs.dead)
    assert "screen" not in open_job(jobs.store, jobs.dead, mode="r")


def test_unknown_or_wrong_kinds_of_analysis_and_unfinished_jobs_are_refused(
    jobs: Jobs,
) -> None:
    with pytest.raises(NotFound, match="no analysis 'nope'"):
        load_profile(jobs.store, "nope")
    health = run_health(jobs.store, jobs.demo, ["fc"])
    with pytest.raises(SpecError, match="is a health, not a screening profile"):
        load_profile(jobs.store, health)
    spec = ExtractionSpec(
        model=DIGITS, weights=str(WEIGHTS), layers=("fc",), inputs=(str(SAMPLES),)
    )
    queued = planned(jobs.store, spec, jobs.models.get(spec).info).job_id
    with pytest.raises(SpecError, match=f"job {queued} is queued; analyse it once"):
        run_health(jobs.store, queued)
