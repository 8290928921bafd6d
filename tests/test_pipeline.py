"""The pipeline end to end into a real Zarr store on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from tests.conftest import FACTORY
from tests.oracle import planned, run_job
from workers.errors import LayerError, SampleCode
from workers.extraction.cache import ModelCache
from workers.extraction.models import LoadedModel
from workers.jobs import ExtractionSpec
from workers.lifecycle.counters import MemoryCounters
from workers.lifecycle.delivery import Outcome, Runtime, execute_batch
from workers.pipeline import Extraction
from workers.storage.layout import open_job, read
from workers.storage.ledger import pending_batches

LAYERS = ("conv1", "block1", "block2.conv2", "conv3", "fc")


def _spec(paths: list[Path], weights: Path, **options: object) -> ExtractionSpec:
    return ExtractionSpec(
        model=FACTORY,
        weights=str(weights),
        layers=options.pop("layers", LAYERS),  # type: ignore[arg-type]
        inputs=tuple(str(p) for p in paths),
        batch_size=options.pop("batch_size", 5),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


def _scan(store: Path, spec: ExtractionSpec) -> tuple[str, zarr.Group]:
    models = ModelCache()
    job = planned(str(store), spec, models.get(spec).info)
    run_job(str(store), job.job_id, models)
    return job.job_id, open_job(str(store), job.job_id, mode="r")


def _reference(model: LoadedModel, paths: list[Path], batch: int) -> dict[str, np.ndarray]:
    """A direct forward of the same batches, with plain hooks."""
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in LAYERS}
    modules = dict(model.module.named_modules())
    x_all = torch.from_numpy(np.stack([np.load(p) for p in paths]))
    for start in range(0, len(paths), batch):
        seen: dict[str, torch.Tensor] = {}
        handles = [
            modules[n].register_forward_hook(
                lambda _m, _i, o, n=n, seen=seen: seen.__setitem__(n, o)
            )
            for n in LAYERS
        ]
        with torch.inference_mode():
            model.module.eval()(x_all[start : start + batch])
        for h in handles:
            h.remove()
        for name in LAYERS:
            outputs[name].append(seen[name].numpy())
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


def test_stored_float32_activations_equal_a_direct_forward_exactly(
    tmp_path: Path, arrays: list[Path], random_weights: Path, model: LoadedModel
) -> None:
    _, group = _scan(tmp_path / "store", _spec(arrays, random_weights, dtype="float32"))
    reference = _reference(model, arrays, batch=5)
    for name in LAYERS:
        stored = read(group, f"layers/{name}/acts")
        assert stored.dtype == np.float32
        np.testing.assert_array_equal(stored, reference[name], err_msg=name)
        spatial = tuple(range(2, reference[name].ndim))
        pooled = reference[name].mean(axis=spatial) if spatial else reference[name]
        np.testing.assert_allclose(
            read(group, f"layers/{name}/pooled"), pooled, rtol=1e-5, atol=1e-7
        )
    assert read(group, "done").all()
    assert group.attrs["state"] == "succeeded"


def test_stored_float16_activations_equal_a_direct_forward_within_rounding(
    tmp_path: Path, arrays: list[Path], random_weights: Path, model: LoadedModel
) -> None:
    _, group = _scan(tmp_path / "store", _spec(arrays, random_weights, dtype="float16"))
    reference = _reference(model, arrays, batch=5)
    for name in LAYERS:
        stored = read(group, f"layers/{name}/acts")
        assert stored.dtype == np.float16
        np.testing.assert_array_equal(stored, reference[name].astype(np.float16), err_msg=name)


def test_logits_predictions_and_labels_are_stored_per_sample(
    tmp_path: Path, arrays: list[Path], random_weights: Path, model: LoadedModel
) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "sample_id,label\n" + "".join(f"{p.as_posix()},{i % 3}\n" for i, p in enumerate(arrays))
    )
    spec = _spec(arrays, random_weights, labels_csv=str(labels))
    _, group = _scan(tmp_path / "store", spec)
    x = torch.from_numpy(np.stack([np.load(p) for p in arrays]))
    with torch.inference_mode():
        logits = model.module.eval()(x).numpy()
    np.testing.assert_allclose(read(group, "logits"), logits, atol=1e-5)
    np.testing.assert_array_equal(read(group, "pred"), logits.argmax(axis=1))
    np.testing.assert_array_equal(read(group, "label"), [i % 3 for i in range(len(arrays))])
    assert list(read(group, "sample")) == [p.as_posix() for p in arrays]


def test_a_bad_sample_gets_its_code_and_the_good_samples_still_land(
    tmp_path: Path, arrays: list[Path], random_weights: Path
) -> None:
    broken = tmp_path / "inputs" / "0002.npy"
    broken.write_bytes(b"not an array")
    empty = tmp_path / "inputs" / "0007.npy"
    empty.write_bytes(b"")
    _, group = _scan(tmp_path / "store", _spec(arrays, random_weights))
    codes = read(group, "error_code")
    messages = read(group, "error_message")
    assert codes[2] == SampleCode.CORRUPT
    assert "0002.npy" in messages[2]
    assert codes[7] == SampleCode.EMPTY
    assert "empty" in messages[7]
    good = np.ones(len(arrays), bool)
    good[[2, 7]] = False
    assert (codes[good] == 0).all()
    assert all(m == "" for m in messages[good])
    acts = read(group, "layers/conv1/acts")
    assert np.isnan(acts[~good]).all()
    assert np.isfinite(acts[good]).all()
    assert (read(group, "pred")[~good] == -1).all()
    assert group.attrs["state"] == "partial"
    assert group.attrs["n_failed"] == 2


def test_a_job_whose_every_sample_fails_is_failed(tmp_path: Path, random_weights: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"\x89PNG garbage")
    _, group = _scan(tmp_path / "store", _spec([bad], random_weights))
    assert group.attrs["state"] == "failed"
    assert (read(group, "error_code") == SampleCode.CORRUPT).all()


def test_running_a_batch_again_leaves_identical_bytes(
    tmp_path: Path, arrays: list[Path], random_weights: Path
) -> None:
    store = tmp_path / "store"
    job_id, _ = _scan(store, _spec(arrays, random_weights))

    def digest() -> dict[str, str]:
        """Every file but the job's attrs (the batch, last again, finalizes it again)."""
        root = store / "jobs" / job_id
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p != root / "zarr.json"
        }

    before = digest()
    group = open_job(str(store), job_id)
    group["done"][2] = False  # type: ignore[index]
    assert pending_batches(group) == [2]
    runtime = Runtime(Extraction(ModelCache()), MemoryCounters())
    assert execute_batch(str(store), job_id, 2, runtime) is Outcome.RAN
    assert execute_batch(str(store), job_id, 2, runtime) is Outcome.SKIPPED  # the ledger has it
    assert digest() == before


def test_chunks_belong_to_one_batch_each(
    tmp_path: Path, arrays: list[Path], random_weights: Path
) -> None:
    _, group = _scan(tmp_path / "store", _spec(arrays, random_weights, batch_size=8))
    for name in ("sample", "label", "logits", "layers/conv1/acts", "layers/fc/pooled"):
        chunk = group[name].chunks[0]  # type: ignore[union-attr]
        assert 8 % chunk == 0, name
    assert group["done"].shape == (3,)  # type: ignore[union-attr]


def test_xarray_opens_the_table_and_every_layer_by_sample_id(
    tmp_path: Path, arrays: list[Path], random_weights: Path
) -> None:
    store = tmp_path / "store"
    job_id, group = _scan(store, _spec(arrays, random_weights))
    table = xr.open_zarr(f"{store}/jobs/{job_id}")
    assert table["label"].dims == ("sample",)
    assert table["logits"].dims == ("sample", "class")
    assert list(table["sample"].values) == list(read(group, "sample"))
    tree = xr.open_datatree(f"{store}/jobs/{job_id}", engine="zarr")
    sid = arrays[4].as_posix()
    conv = tree["layers/conv1"].dataset.sel(sample=sid)
    assert conv["acts"].dims == ("channel", "y", "x")
    np.testing.assert_array_equal(conv["acts"].values, read(group, "layers/conv1/acts")[4])
    assert tree["layers/fc"]["acts"].dims == ("sample", "channel")


def test_channel_subset_top_k_and_downsampling_are_stored_with_their_indices(
    tmp_path: Path, arrays: list[Path], random_weights: Path, model: LoadedModel
) -> None:
    store = tmp_path / "store"
    subset = _spec(arrays, random_weights, layers=("conv1",), channels=(3, 0, 7), dtype="float32")
    job_id, group = _scan(store, subset)
    reference = _reference(model, arrays, batch=5)["conv1"]
    np.testing.assert_array_equal(read(group, "layers/conv1/acts"), reference[:, [3, 0, 7]])
    tree = xr.open_datatree(f"{store}/jobs/{job_id}", engine="zarr")
    assert list(tree["layers/conv1"].dataset["kept_channel"].values) == [3, 0, 7]

    top = _spec(arrays, random_weights, layers=("conv1",), top_k=4, max_size=(7, 7))
    _, group = _scan(tmp_path / "store2", top)
    chosen = read(group, "layers/conv1/top_channel")
    expected = np.argsort(-reference.mean(axis=(2, 3)), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(np.sort(chosen, axis=1), np.sort(expected, axis=1))
    assert read(group, "layers/conv1/acts").shape == (len(arrays), 4, 7, 7)


def test_an_unknown_layer_is_refused_at_plan_with_close_matches(
    tmp_path: Path, arrays: list[Path], random_weights: Path, model: LoadedModel
) -> None:
    spec = _spec(arrays, random_weights, layers=("block1.conv", "conv1"))
    with pytest.raises(LayerError, match=r"unknown layer 'block1.conv'.*block1\.conv1"):
        planned(str(tmp_path / "store"), spec, model.info)
    assert not (tmp_path / "store" / "jobs").exists()
