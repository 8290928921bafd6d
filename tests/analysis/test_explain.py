"""`run_explain` over a stored job: each sample's top channels by overlap with its Grad-CAM
map, per class counts, streamed in blocks, and a clear refusal where it cannot run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.oracle import planned, run_job
from workers.analysis.explanations import run_explain
from workers.errors import SpecError
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.storage.layout import open_job, read

SAMPLES = Path(__file__).parents[2] / "workers" / "demo" / "samples"


def _scan(store: Path, inputs: list[str], **options: object) -> str:
    spec = ExtractionSpec.model_validate(
        {"model": "digits-cnn", "layers": ["block2", "conv3"], "inputs": inputs,
         "batch_size": 8, "labels_from_dirs": True, **options}
    )  # fmt: skip
    models = ModelCache()
    job = planned(str(store), spec, models.get(spec).info)
    run_job(str(store), job.job_id, models)
    return job.job_id


@pytest.fixture(scope="module")
def explained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    store = tmp_path_factory.mktemp("explain") / "store"
    inputs = [str(SAMPLES)]
    return store, _scan(store, inputs, gradcam=["conv3"], gradcam_target="label")


def _brute_force(store: Path, job_id: str, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Every sample's channels by np.corrcoef, and the per-class counts, in one go."""
    group = open_job(str(store), job_id, mode="r")
    acts = read(group, "layers/conv3/acts").astype(np.float64)
    cams = read(group, "layers/conv3/gradcam").astype(np.float64)
    targets = read(group, "layers/conv3/gradcam_target")
    chosen = np.full((acts.shape[0], top), -1)
    counts = np.zeros((10, acts.shape[1]), dtype=int)
    for i in range(acts.shape[0]):
        g = cams[i].ravel()
        r = [
            0.0 if acts[i, c].std() == 0 or g.std() == 0
            else np.corrcoef(acts[i, c].ravel(), g)[0, 1]
            for c in range(acts.shape[1])
        ]  # fmt: skip
        chosen[i] = np.argsort(-np.asarray(r), kind="stable")[:top]
        counts[targets[i], chosen[i]] += 1
    return chosen, counts


def test_top_channels_and_class_counts_equal_a_brute_force_over_the_whole_job(
    explained: tuple[Path, str],
) -> None:
    store, job_id = explained
    analysis_id = run_explain(str(store), job_id, "conv3", top=3)
    found = xr.open_zarr(f"{store}/analyses/{analysis_id}")
    chosen, counts = _brute_force(store, job_id, 3)
    np.testing.assert_array_equal(found["top_channel"].values, chosen)
    np.testing.assert_array_equal(found["class_count"].values, counts)
    assert found["top_channel"].dims == ("sample", "rank")
    ids = read(open_job(str(store), job_id, mode="r"), "sample")
    one = found.sel(sample=str(ids[5]))
    assert one["correlation"].values[0] >= one["correlation"].values[-1]
    assert ((found["iou"].values >= 0) & (found["iou"].values <= 1)).all()
    np.testing.assert_array_equal(found["class_samples"].values, [4] * 10)


def test_a_budget_of_one_chunk_gives_the_same_result_as_one_read_of_everything(
    explained: tuple[Path, str],
) -> None:
    store, job_id = explained
    small = run_explain(str(store), job_id, "conv3", top=4, budget=1)
    large = run_explain(str(store), job_id, "conv3", top=4, budget=1 << 40)
    a = xr.open_zarr(str(store), group=f"analyses/{small}", consolidated=False)
    b = xr.open_zarr(f"{store}/analyses/{large}")
    xr.testing.assert_equal(a[["top_channel", "correlation", "class_count"]],
                            b[["top_channel", "correlation", "class_count"]])  # fmt: skip


def test_the_summary_names_per_class_channels_and_the_measure(
    explained: tuple[Path, str],
) -> None:
    store, job_id = explained
    analysis_id = run_explain(str(store), job_id, "conv3", top=2)
    group = xr.open_zarr(f"{store}/analyses/{analysis_id}")
    attrs = group.attrs
    assert attrs["kind"] == "explain"
    assert "Pearson correlation" in attrs["measure"]
    assert sorted(attrs["classes"]) == [str(d) for d in range(10)]
    channel, times = attrs["classes"]["3"][0]
    assert times == int(group["class_count"].values[3].max())
    assert group["class_count"].values[3][channel] == times


def test_a_failed_sample_and_an_unlabelled_one_get_no_channels(tmp_path: Path) -> None:
    folder = tmp_path / "in" / "4"
    folder.mkdir(parents=True)
    for png in sorted((SAMPLES / "4").glob("*.png")):
        (folder / png.name).write_bytes(png.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "x.png").write_bytes(next((SAMPLES / "1").glob("*.png")).read_bytes())
    labels = tmp_path / "labels.csv"  # x.png has no label
    rows = [f"4/{p.name},4" for p in sorted(folder.glob("*.png")) if p.name != "x.png"]
    labels.write_text("sample_id,label\n" + "\n".join(rows) + "\n")
    store = tmp_path / "store"
    job_id = _scan(
        store, [str(tmp_path / "in")], gradcam=["conv3"], gradcam_target="label",
        labels_from_dirs=False, labels_csv=str(labels),
    )  # fmt: skip
    analysis_id = run_explain(str(store), job_id, "conv3", top=2)
    found = xr.open_zarr(f"{store}/analyses/{analysis_id}")
    broken = found.sel(sample=next(s for s in found["sample"].values if "broken" in s))
    unlabelled = found.sel(sample=next(s for s in found["sample"].values if "x.png" in s))
    for row in (broken, unlabelled):
        assert (row["top_channel"].values == -1).all()
        assert np.isnan(row["correlation"].values).all()
    assert found.attrs["n_explained"] == 4


def test_a_layer_without_gradcam_is_refused_with_one_line(explained: tuple[Path, str]) -> None:
    store, job_id = explained
    with pytest.raises(SpecError, match="no Grad-CAM maps for layer 'block2'.*--gradcam block2"):
        run_explain(str(store), job_id, "block2")
    with pytest.raises(SpecError, match="--top is between 1 and 64"):
        run_explain(str(store), job_id, "conv3", top=65)
