"""Grad-CAM in the extraction pass: the stored maps agree with Captum's LayerGradCam, are
stored as the layout says, and leave the model as found on every path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from captum.attr import LayerGradCam

from tests.oracle import planned, run_job
from workers.demo.digits import PREPROCESSING
from workers.errors import LayerError, SampleCode, SpecError
from workers.extraction.cache import ModelCache
from workers.extraction.gradcam import keeping
from workers.extraction.inputs import decode
from workers.extraction.models import LoadedModel, load_model
from workers.jobs import ExtractionSpec, Listing
from workers.lifecycle.plan import plan
from workers.pipeline import Decoded, compute_batch
from workers.storage.layout import open_job, read

DEMO = Path(__file__).parents[2] / "workers" / "demo" / "samples"
HAND = "tests.extraction.gradcam_net:hand_net"


def _scan(store: Path, spec: ExtractionSpec) -> str:
    models = ModelCache()
    job = planned(str(store), spec, models.get(spec).info)
    run_job(str(store), job.job_id, models)
    return job.job_id


def _arrays(directory: Path, n: int) -> list[Path]:
    """n `.npy` inputs of the hand-built net's shape (1, 16, 16)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(3)
    paths = [directory / f"{i:02d}.npy" for i in range(n)]
    for path in paths:
        np.save(path, rng.standard_normal((1, 16, 16)).astype(np.float32))
    return paths


def _captum(model: LoadedModel, layer: str, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Captum's Grad-CAM with ReLU, one call for all samples, float32 (N, y, x)."""
    module = dict(model.module.named_modules())[layer]
    found = LayerGradCam(model.module.eval(), module).attribute(
        torch.from_numpy(x), target=torch.from_numpy(target).long(), relu_attributions=True
    )
    return np.asarray(found.detach().numpy()[:, 0], dtype=np.float32)


def _within_float16(stored: np.ndarray, reference: np.ndarray) -> None:
    """Equal up to float16 rounding: half a unit in the last place of the reference's
    float16, plus float32 summation order (a few ulps of the largest value)."""
    assert stored.dtype == np.float16
    tolerance = np.abs(reference) * 2.0**-10 + np.abs(reference).max() * 1e-5
    error = np.abs(stored.astype(np.float32) - reference)
    assert (error <= tolerance).all(), float((error - tolerance).max())


def test_bundled_digits_model_maps_agree_with_captum_for_the_predicted_class(
    tmp_path: Path,
) -> None:
    paths = sorted(DEMO.rglob("*.png"))[:24]
    spec = ExtractionSpec(
        model="digits-cnn", layers=("block2", "conv3"), inputs=tuple(map(str, paths)),
        batch_size=8, gradcam=("block2", "conv3"),
    )  # fmt: skip
    job_id = _scan(tmp_path / "store", spec)
    group = open_job(str(tmp_path / "store"), job_id, mode="r")
    model = load_model("digits-cnn")
    x = np.stack([decode(str(p), PREPROCESSING) for p in paths])
    pred = read(group, "pred")
    for layer in ("block2", "conv3"):
        np.testing.assert_array_equal(read(group, f"layers/{layer}/gradcam_target"), pred)
        stored = read(group, f"layers/{layer}/gradcam")
        reference = _captum(model, layer, x, pred)
        assert stored.shape == reference.shape == (len(paths), 14 if layer == "block2" else 7,
                                                   14 if layer == "block2" else 7)  # fmt: skip
        assert reference.max() > 0  # the maps are not all zero
        _within_float16(stored, reference)


def test_hand_built_net_maps_agree_with_captum_for_labels_and_a_fixed_class(
    tmp_path: Path,
) -> None:
    arrays = _arrays(tmp_path / "in", 10)
    labels = tmp_path / "labels.csv"
    # Sample 4 is unlabelled: no map, target -1.
    rows = [f"{p.as_posix()},{i % 5}" for i, p in enumerate(arrays) if i != 4]
    labels.write_text("sample_id,label\n" + "\n".join(rows) + "\n")
    x = np.stack([np.load(p) for p in arrays])
    model = load_model(HAND)
    for target, expected in (("label", [i % 5 if i != 4 else -1 for i in range(10)]),
                             ("c", [2] * 10)):  # fmt: skip
        spec = ExtractionSpec(
            model=HAND, layers=("conv1", "act2"), inputs=tuple(map(str, arrays)),
            batch_size=4, gradcam=("conv1", "act2"), gradcam_target=target,
            labels_csv=str(labels),
        )  # fmt: skip
        job_id = _scan(tmp_path / f"store-{target}", spec)
        group = open_job(str(tmp_path / f"store-{target}"), job_id, mode="r")
        chosen = np.asarray(expected)
        for layer in ("conv1", "act2"):
            stored = read(group, f"layers/{layer}/gradcam")
            np.testing.assert_array_equal(read(group, f"layers/{layer}/gradcam_target"), chosen)
            known = chosen >= 0
            assert np.isnan(stored[~known]).all()
            reference = _captum(model, layer, x[known], chosen[known])
            _within_float16(stored[known], reference)


def test_gradcam_is_read_by_xarray_with_the_sample_coordinate_and_failed_samples_stay_blank(
    tmp_path: Path,
) -> None:
    arrays = _arrays(tmp_path / "in", 6)
    arrays[2].write_bytes(b"not an array")
    spec = ExtractionSpec(
        model=HAND, layers=("act2",), inputs=tuple(map(str, arrays)), batch_size=3,
        gradcam=("act2",), input_kind="array",
        preprocessing=PREPROCESSING.model_copy(update={"size": (16, 16), "classes": None}),
    )  # fmt: skip
    job_id = _scan(tmp_path / "store", spec)
    group = open_job(str(tmp_path / "store"), job_id, mode="r")
    assert read(group, "error_code")[2] == SampleCode.CORRUPT
    tree = xr.open_datatree(f"{tmp_path}/store/jobs/{job_id}", engine="zarr")
    layer = tree["layers/act2"]
    assert layer["gradcam"].dims == ("sample", "y", "x")
    assert layer["gradcam_target"].dims == ("sample",)
    one = layer.to_dataset().sel(sample=arrays[2].as_posix())
    assert np.isnan(one["gradcam"].values).all()
    assert int(one["gradcam_target"]) == -1
    good = layer.to_dataset().sel(sample=arrays[1].as_posix())
    assert np.isfinite(good["gradcam"].values).all()
    assert int(good["gradcam_target"]) == int(read(group, "pred")[1])
    chunks = group["layers/act2/gradcam"].chunks  # type: ignore[union-attr]
    assert 3 % chunks[0] == 0  # a batch owns whole chunks


def test_a_failing_batch_leaves_no_hooks_no_kept_graph_and_the_flags_as_found() -> None:
    model = load_model(HAND)
    module = model.module
    for p in module.parameters():
        p.requires_grad_(True)
    spec = ExtractionSpec(
        model=HAND, layers=("act2",), inputs=("x",), batch_size=2, gradcam=("act2",)
    )
    x = np.zeros((2, 1, 16, 16), np.float32)
    decoded = Decoded(0, 0, x, np.zeros(2, np.int16), ["", ""])

    def broken(_m: torch.nn.Module, _i: object, _o: object) -> None:
        raise RuntimeError("the head failed")

    handle = dict(module.named_modules())["head"].register_forward_hook(broken)
    with pytest.raises(RuntimeError, match="the head failed"):
        compute_batch(model, spec, decoded)
    handle.remove()
    every = list(module.modules())
    assert all(not m._forward_hooks for m in every)
    assert all(p.requires_grad for p in module.parameters())
    assert not torch.is_inference_mode_enabled()
    rows = compute_batch(model, spec, decoded)  # the model still works afterwards
    assert rows.layers["act2"].gradcam is not None
    assert all(not m._forward_hooks for m in every)


def test_the_kept_outputs_are_released_when_the_block_ends() -> None:
    module = load_model(HAND).module
    with keeping(module, ["act2"]) as kept:
        module(torch.zeros(1, 1, 16, 16, requires_grad=True))
        assert len(kept.outputs["act2"]) == 1
    assert kept.outputs == {}
    assert all(not m._forward_hooks for m in module.modules())


def test_a_scan_without_gradcam_still_runs_in_inference_mode() -> None:
    model = load_model(HAND)
    seen: list[bool] = []
    module = model.module
    handle = dict(module.named_modules())["act2"].register_forward_hook(
        lambda _m, _i, _o: seen.append(torch.is_inference_mode_enabled())
    )
    x = np.zeros((2, 1, 16, 16), np.float32)
    decoded = Decoded(0, 0, x, np.zeros(2, np.int16), ["", ""])
    plain = ExtractionSpec(model=HAND, layers=("act2",), inputs=("x",))
    compute_batch(model, plain, decoded)
    compute_batch(model, plain.model_copy(update={"gradcam": ("act2",)}), decoded)
    handle.remove()
    assert seen == [True, False]


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"layers": ("act2",), "gradcam": ("act9",)}, LayerError, "close matches: act2"),
        ({"layers": ("act2",), "gradcam": ("conv1",)}, LayerError, "add it to --layers"),
        ({"layers": ("head",), "gradcam": ("head",)}, SpecError, "flat"),
        ({"layers": ("act2",), "gradcam": ("act2",), "gradcam_target": "z"}, SpecError,
         "use pred, label or one of a, b, c, d, e"),
        ({"layers": ("act2",), "gradcam": ("act2",), "gradcam_target": "5"}, SpecError,
         "not a class"),
        ({"layers": ("act2",), "gradcam": ("act2",), "max_size": (2, 2)}, SpecError,
         "drop --max-size"),
        ({"layers": ("act2",), "gradcam_target": "label"}, SpecError, "give --gradcam"),
    ],
)  # fmt: skip
def test_impossible_gradcam_options_are_refused_at_plan_with_one_line(
    tmp_path: Path, options: dict[str, object], error: type[Exception], words: str
) -> None:
    spec = ExtractionSpec.model_validate({"model": HAND, "inputs": ["x.npy"], **options})
    with pytest.raises(error, match=words) as raised:
        plan(str(tmp_path / "store"), spec, load_model(HAND).info, Listing([], []))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "store" / "jobs").exists() or not any(
        (tmp_path / "store" / "jobs").iterdir()
    )


def test_a_class_index_is_a_target_when_the_model_names_no_classes(tmp_path: Path) -> None:
    arrays = _arrays(tmp_path / "in", 2)
    spec = ExtractionSpec(
        model=HAND, layers=("act2",), inputs=tuple(map(str, arrays)), gradcam=("act2",),
        gradcam_target="4", input_kind="array",
        preprocessing=PREPROCESSING.model_copy(update={"size": (16, 16), "classes": None}),
    )  # fmt: skip
    job_id = _scan(tmp_path / "store", spec)
    group = open_job(str(tmp_path / "store"), job_id, mode="r")
    np.testing.assert_array_equal(read(group, "layers/act2/gradcam_target"), [4, 4])


def test_an_in_place_relu_after_the_layer_changes_neither_the_map_nor_the_pass() -> None:
    x = np.random.default_rng(5).standard_normal((4, 1, 16, 16)).astype(np.float32)
    decoded = Decoded(0, 0, x, np.zeros(4, np.int16), [""] * 4)
    found = {}
    for ref in (HAND, f"{HAND}_inplace"):
        spec = ExtractionSpec(model=ref, layers=("conv1", "conv2"), inputs=("x",),
                              gradcam=("conv1", "conv2"))  # fmt: skip
        rows = compute_batch(load_model(ref), spec, decoded)
        found[ref] = rows
    plain, inplace = found[HAND], found[f"{HAND}_inplace"]
    np.testing.assert_array_equal(plain.logits, inplace.logits)
    for layer in ("conv1", "conv2"):
        np.testing.assert_array_equal(plain.layers[layer].gradcam, inplace.layers[layer].gradcam)
