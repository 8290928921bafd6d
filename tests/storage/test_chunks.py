"""Direct whole-chunk writes leave exactly the files zarr itself writes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from workers.storage.chunks import get_all, get_row, put_rows
from workers.storage.layout import COMPRESSOR

# (dtype, fill value, per-row shape, rows per chunk): activations in float16 and float32,
# codes and predictions, several chunks to a batch, and a batch of one chunk.
CASES = [
    ("float16", np.nan, (3, 5, 5), 2),
    ("float32", np.nan, (7,), 4),
    ("int32", -1, (), 4),
    ("int16", 0, (), 4),
    ("bool", False, (), 1),  # the ledger
    ("str", "", (), 4),  # error messages, given as an object array
]
N, BATCH = 10, 4  # the last batch is 2 rows: the array's last chunk is cut by its end


def _values(dtype: str, row: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random((N, *row)) < 0.5
    if dtype == "str":
        words = ["", "ok", "bad.png is corrupt or truncated: é ✓", "x" * 300]
        return np.asarray([words[i] for i in rng.integers(0, len(words), N)], dtype=object)
    values = (rng.standard_normal((N, *row)) * 100).astype(dtype)
    if values.dtype.kind == "f":
        values[3] = np.nan  # a failed sample
        values[5].flat[0] = -0.0
    return values


def _create(
    folder: Path, dtype: str, fill: Any, row: tuple[int, ...], rows: int
) -> zarr.Array[Any]:
    return zarr.create_array(
        str(folder),
        shape=(N, *row),
        chunks=(rows, *row),
        dtype=dtype,
        fill_value=fill,
        compressors=COMPRESSOR,
        dimension_names=["sample", *"cyx"[3 - len(row) :]] if row else ["sample"],
        config={"write_empty_chunks": True},
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(("dtype", "fill", "row", "rows"), CASES)
@pytest.mark.parametrize("parallel", [False, True])
def test_batches_written_directly_leave_the_bytes_zarr_writes(
    tmp_path: Path, dtype: str, fill: Any, row: tuple[int, ...], rows: int, parallel: bool
) -> None:
    values = _values(dtype, row, seed=1)
    by_zarr = _create(tmp_path / "zarr", dtype, fill, row, rows)
    direct = _create(tmp_path / "direct", dtype, fill, row, rows)
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, N, BATCH):
            by_zarr[start : start + BATCH] = values[start : start + BATCH]
            for future in put_rows(
                direct, start, values[start : start + BATCH], pool if parallel else None
            ):
                future.result()
    assert _files(tmp_path / "direct") == _files(tmp_path / "zarr")
    again = zarr.open_array(str(tmp_path / "direct"), mode="r")
    np.testing.assert_array_equal(again[:], values.astype(again.dtype))


def test_a_batch_of_nothing_but_fill_is_written_like_any_other(tmp_path: Path) -> None:
    by_zarr = _create(tmp_path / "zarr", "float16", np.nan, (4,), 2)
    direct = _create(tmp_path / "direct", "float16", np.nan, (4,), 2)
    empty = np.full((BATCH, 4), np.nan, np.float16)
    by_zarr[:BATCH] = empty
    put_rows(direct, 0, empty)
    assert _files(tmp_path / "direct") == _files(tmp_path / "zarr")
    assert any(name.startswith("c/") for name in _files(tmp_path / "direct"))


def test_writing_a_batch_again_leaves_identical_bytes(tmp_path: Path) -> None:
    direct = _create(tmp_path / "direct", "float16", np.nan, (3, 5, 5), 2)
    values = _values("float16", (3, 5, 5), seed=2)
    put_rows(direct, 8, values[8:])
    before = _files(tmp_path / "direct")
    put_rows(direct, 8, values[8:])
    assert _files(tmp_path / "direct") == before
    assert not [name for name in before if name.endswith(".partial")]


@pytest.mark.parametrize(
    ("start", "stop"),
    [(1, 5), (0, 3), (4, 9)],  # not on a chunk boundary; a cut chunk that is not the last
)
def test_rows_that_are_not_whole_chunks_go_through_zarr(
    tmp_path: Path, start: int, stop: int
) -> None:
    by_zarr = _create(tmp_path / "zarr", "float32", np.nan, (7,), 4)
    direct = _create(tmp_path / "direct", "float32", np.nan, (7,), 4)
    values = _values("float32", (7,), seed=3)
    by_zarr[start:stop] = values[start:stop]
    assert put_rows(direct, start, values[start:stop]) == []
    assert _files(tmp_path / "direct") == _files(tmp_path / "zarr")


def test_another_store_and_another_dtype_go_through_zarr(tmp_path: Path) -> None:
    in_memory = zarr.create_array({}, shape=(N, 7), chunks=(4, 7), dtype="float32", fill_value=0)
    values = _values("float32", (7,), seed=4)
    with ThreadPoolExecutor(1) as pool:
        assert put_rows(in_memory, 0, values[:BATCH], pool) == []
    np.testing.assert_array_equal(in_memory[:BATCH], values[:BATCH])

    local = _create(tmp_path / "local", "float32", np.nan, (7,), 4)
    put_rows(local, 0, values[:BATCH].astype(np.float64))  # zarr casts, as it always has
    np.testing.assert_array_equal(local[:BATCH], values[:BATCH])


@pytest.mark.parametrize(("dtype", "fill", "row", "rows"), [c for c in CASES if c[2] == ()])
def test_a_row_read_directly_is_what_zarr_reads(
    tmp_path: Path, dtype: str, fill: Any, row: tuple[int, ...], rows: int
) -> None:
    stored = _create(tmp_path / "a", dtype, fill, row, rows)
    values = _values(dtype, row, seed=5)
    put_rows(stored, 0, values[:BATCH])  # the rest was never written: fill
    for i in range(N):
        assert get_row(stored, i) == stored[i], i


def test_a_row_of_another_store_is_read_through_zarr() -> None:
    in_memory = zarr.create_array({}, shape=(N,), chunks=(1,), dtype="bool", fill_value=False)
    in_memory[3] = True
    assert [bool(get_row(in_memory, i)) for i in range(5)] == [False, False, False, True, False]


@pytest.mark.parametrize(("dtype", "fill", "row", "rows"), [c for c in CASES if c[2] == ()])
def test_a_whole_array_read_directly_is_what_zarr_reads(
    tmp_path: Path, dtype: str, fill: Any, row: tuple[int, ...], rows: int
) -> None:
    stored = _create(tmp_path / "a", dtype, fill, row, rows)
    values = _values(dtype, row, seed=6)
    put_rows(stored, BATCH, values[BATCH : 2 * BATCH])  # the first chunks never written
    put_rows(stored, 2 * BATCH, values[2 * BATCH :])  # the last chunk, cut by the end
    reopened = zarr.open_array(str(tmp_path / "a"), mode="r")  # status opens read-only
    np.testing.assert_array_equal(get_all(reopened), zarr.open_array(str(tmp_path / "a"))[:])
    assert get_all(reopened).dtype == reopened.dtype


def test_a_whole_array_of_another_store_is_read_through_zarr() -> None:
    in_memory = zarr.create_array({}, shape=(N,), chunks=(1,), dtype="bool", fill_value=False)
    in_memory[3] = True
    assert list(np.flatnonzero(get_all(in_memory))) == [3]


def test_a_zarr_without_synchronous_codecs_gets_zarrs_own_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.storage.chunks as chunks

    values = _values("int16", (), seed=7)
    direct = _create(tmp_path / "direct", "int16", 0, (), 4)
    put_rows(direct, 0, values)
    monkeypatch.setattr(chunks, "SupportsSyncCodec", None)  # as where the import failed
    through = _create(tmp_path / "through", "int16", 0, (), 4)
    put_rows(through, 0, values)
    assert _files(tmp_path / "through") == _files(tmp_path / "direct")
    np.testing.assert_array_equal(get_all(through), values)
    assert get_row(through, 3) == values[3]
