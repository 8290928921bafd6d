"""How a job stores its maps: `--dtype uint8` (per-channel scale and offset per batch,
decoded by actmap's reader and by xarray as the README says) and `--compression`, into a
real Zarr store through the real pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from tests.conftest import FACTORY
from tests.oracle import planned, run_job
from workers.analysis.analyses import run_health
from workers.analysis.filter_atlas import run_atlas
from workers.errors import SampleCode
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.pictures.report import write_report
from workers.storage.quantised import MISSING, SCALE
from workers.storage.stored_job import StoredJob

LAYERS = ("conv1", "block1", "conv3", "fc")
BATCH = 5


def _scan(store: Path, paths: list[Path], weights: Path, **options: Any) -> StoredJob:
    spec = ExtractionSpec(
        model=FACTORY, weights=str(weights), layers=LAYERS, batch_size=BATCH,
        inputs=tuple(str(p) for p in paths), **options,
    )  # fmt: skip
    models = ModelCache()
    job = planned(str(store), spec, models.get(spec).info)
    run_job(str(store), job.job_id, models)
    return StoredJob(str(store), job.job_id)


def test_uint8_maps_decode_within_half_a_step_of_their_channel_in_their_batch(
    tmp_path: Path, arrays: list[Path], random_weights: Path
) -> None:
    exact = _scan(tmp_path / "store", arrays, random_weights, dtype="float32")
    small = _scan(tmp_path / "store", arrays, random_weights, dtype="uint8")
    for layer in LAYERS:
        truth = np.asarray(exact.acts(layer)[:])
        decoded = np.asarray(small.acts(layer)[:])
        assert decoded.dtype == np.float32
        assert small.layer(layer, "acts").dtype == np.uint8
        scale = np.asarray(small.layer(layer, SCALE)[:])
        assert scale.shape == (-(-len(arrays) // BATCH), truth.shape[1])
        per_row = np.repeat(scale, BATCH, axis=0)[: len(arrays)]
        bound = per_row.reshape(per_row.shape + (1,) * (truth.ndim - 2)) / 2
        error = np.abs(decoded - truth)
        assert (error <= bound * (1 + 1e-5) + 1e-6).all(), layer
        # A finer scale is what each batch earns: the bound is not trivially loose.
        assert np.ptp(scale, axis=0).max() > 0, layer


def test_uint8_pooled_means_stay_float32_from_the_maps_before_quantisation(
    tmp_path: Path, arrays: list[Path], random_weights: Path
) -> None:
    exact = _scan(tmp_path / "store", arrays, random_weights, dtype="float32")
    small = _scan(tmp_path / "store", arrays, random_weights, dtype="uint8")
    for layer in LAYERS:
        pooled = np.asarray(small.layer(layer, "pooled")[:])
        assert pooled.dtype == np.float32
        np.testing.assert_array_equal(pooled, np.asarray(exact.layer(layer, "pooled")[:]))


def test_a_failed_samples_uint8_rows_read_back_as_nan_and_the_others_as_numbers(
    tmp_path: Path, arrays: list[Path], random_weights: Path
) -> None:
    arrays[6].write_bytes(b"not an array")  # batch 1, beside four good samples
    job = _scan(tmp_path / "store", arrays, random_weights, dtype="uint8")
    assert job.column("error_code")[6] == SampleCode.CORRUPT
    for layer in LAYERS:
        raw = np.asarray(job.layer(layer, "acts")[6])
        assert (raw == MISSING).all()
        decoded = np.asarray(job.acts(layer)[5:8])
        assert np.isnan(decoded[1]).all()
        assert np.isfinite(decoded[[0, 2]]).all()
        assert np.isnan(np.asarray(job.layer(layer, "pooled")[6])).all()


def test_a_channel_constant_over_a_batch_gets_scale_zero_and_decodes_exactly(
    tmp_path: Path, random_weights: Path
) -> None:
    # Zero inputs: conv1's output is its bias, the same value at every pixel of a channel.
    folder = tmp_path / "zeros"
    folder.mkdir()
    paths = []
    for i in range(BATCH):
        paths.append(folder / f"{i}.npy")
        np.save(paths[-1], np.zeros((1, 28, 28), np.float32))
    exact = _scan(tmp_path / "store", paths, random_weights, dtype="float32")
    small = _scan(tmp_path / "store", paths, random_weights, dtype="uint8")
    scale = np.asarray(small.layer("conv1", SCALE)[:])
    truth = np.asarray(exact.acts("conv1")[:])
    constant = np.ptp(truth, axis=(0, 2, 3)) == 0
    assert constant.any()
    assert (scale[0, constant] == 0).all()
    np.testing.assert_array_equal(
        np.asarray(small.acts("conv1")[:])[:, constant], truth[:, constant]
    )


def test_the_uint8_reader_indexes_as_zarr_does(
    tmp_path: Path, arrays: list[Path], random_weights: Path
) -> None:
    job = _scan(tmp_path / "store", arrays, random_weights, dtype="uint8")
    acts = job.acts("block1")
    whole = np.asarray(acts[:])
    np.testing.assert_array_equal(acts[3:9, 2], whole[3:9, 2])
    np.testing.assert_array_equal(acts[7, 1:4], whole[7, 1:4])
    np.testing.assert_array_equal(acts[12, 0], whole[12, 0])
    picked = acts.oindex[np.asarray([1, 9, 17]), np.asarray([0, 5])]
    np.testing.assert_array_equal(picked, whole[np.ix_([1, 9, 17], [0, 5])])
    np.testing.assert_array_equal(
        acts.get_orthogonal_selection((np.asarray([4, 20]), slice(None))), whole[[4, 20]]
    )


def test_xarray_opens_a_uint8_job_and_decodes_it_as_the_readme_says(
    tmp_path: Path, arrays: list[Path], random_weights: Path
) -> None:
    store = tmp_path / "store"
    arrays[6].write_bytes(b"not an array")  # its row decodes to NaN
    job = _scan(store, arrays, random_weights, dtype="uint8")
    tree = xr.open_datatree(f"{store}/jobs/{job.id}", engine="zarr")
    # The README's snippet, word for word but for the layer's name.
    layer = tree["layers/block1"].dataset
    q = layer.acts
    rows = q.attrs["quantisation"]["rows_per_batch"]
    batch = xr.DataArray(np.arange(q.sizes["sample"]) // rows, dims="sample")
    scale, offset = layer.acts_scale.isel(batch=batch), layer.acts_offset.isel(batch=batch)
    values = (q * scale + offset).where(q != 255)  # float values, NaN where none
    expected = np.asarray(job.acts("block1")[:])
    assert np.isnan(expected[6]).all()
    np.testing.assert_allclose(values.values, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("compression", "codec"),
    [("zstd", ZstdCodec), ("lz4", BloscCodec), ("none", None)],
)
def test_each_compression_writes_every_array_with_its_codec_and_reads_back_equal_values(
    tmp_path: Path,
    arrays: list[Path],
    random_weights: Path,
    compression: str,
    codec: type | None,
) -> None:
    plain = _scan(tmp_path / "store", arrays, random_weights, dtype="float16", compression="none")
    job = _scan(
        tmp_path / "store", arrays, random_weights, dtype="float16", compression=compression
    )
    assert job.attrs["spec"]["compression"] == compression
    paths = [name for name, _ in job.group.arrays()]
    for layer in LAYERS:
        paths += [f"layers/{layer}/{name}" for name, _ in job.group[f"layers/{layer}"].arrays()]  # type: ignore[union-attr]
    assert len(paths) > 8
    for path in paths:
        arr, same = job.group[path], plain.group[path]
        assert isinstance(arr, zarr.Array)
        assert isinstance(same, zarr.Array)
        if codec is None:
            assert arr.compressors == (), path
        else:
            assert len(arr.compressors) == 1, path
            assert isinstance(arr.compressors[0], codec), path
            if isinstance(arr.compressors[0], BloscCodec):
                assert arr.compressors[0].cname.value == "lz4", path
        np.testing.assert_array_equal(np.asarray(arr[...]), np.asarray(same[...]), err_msg=path)


def test_health_and_the_report_read_a_uint8_job_as_the_float_maps_it_stores(
    tmp_path: Path, arrays: list[Path], random_weights: Path
) -> None:
    store = tmp_path / "store"
    exact = _scan(store, arrays, random_weights, dtype="float32")
    small = _scan(store, arrays, random_weights, dtype="uint8")
    means = {}
    for job in (exact, small):
        found = run_health(str(store), job.id, ["block1"])
        result = zarr.open_group(str(store), path=f"analyses/{found}", mode="r")
        means[job.id] = np.asarray(result["layers/block1/mean"][:])  # type: ignore[index]
    step = np.nanmax(np.asarray(small.layer("block1", SCALE)[:]), axis=0)
    assert (np.abs(means[small.id] - means[exact.id]) <= step / 2 + 1e-6).all()
    html = write_report(str(store), small.id, tmp_path / "report").read_text()
    assert "uint8" in html


def test_the_atlas_ranks_a_uint8_jobs_decoded_responses(
    tmp_path: Path, arrays: list[Path], random_weights: Path
) -> None:
    store = tmp_path / "store"
    exact = _scan(store, arrays, random_weights, dtype="float32")
    small = _scan(store, arrays, random_weights, dtype="uint8")
    best = {}
    for job in (exact, small):
        found = run_atlas(str(store), job.id, "block1", top=3)
        result = zarr.open_group(str(store), path=f"analyses/{found}", mode="r")
        best[job.id] = np.asarray(result["layers/block1/value"][:])[:, 0]  # type: ignore[index]
    step = np.nanmax(np.asarray(small.layer("block1", SCALE)[:]), axis=0)
    assert (np.abs(best[small.id] - best[exact.id]) <= step / 2 + 1e-6).all()
