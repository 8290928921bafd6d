"""Bytes a request sent (workers/extraction/decoders.py `decode_bytes`) decode exactly as the
same bytes in a file of that name, and are refused with the same codes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.extraction.test_inputs import make_prep
from workers.errors import InputError, SampleCode
from workers.extraction.inputs import decode, decode_bytes


def _png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (9, 13), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["x.png", "x.npy", "x.exe", "x"])
def test_bytes_decode_as_a_file_of_the_same_name_does(tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(3)
    prep = make_prep(channels=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    data = {
        ".png": _png(rng),
        ".npy": _npy(rng.standard_normal(prep.input_shape).astype(np.float32)),
    }.get(Path(name).suffix, rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    file = tmp_path / name
    file.write_bytes(data)
    np.testing.assert_array_equal(decode_bytes(data, name, prep), decode(str(file), prep))


@pytest.mark.parametrize(
    ("data", "name", "code"),
    [
        (b"", "x.png", SampleCode.EMPTY),
        (b"not a png at all", "x.png", SampleCode.CORRUPT),
        (_npy(np.array([{"a": 1}], dtype=object)), "x.npy", SampleCode.CORRUPT),
        (_npy(np.zeros((2, 2), np.float32)), "x.npy", SampleCode.WRONG_SHAPE),
        (b"\x00" * 1001, "x.bin", SampleCode.TOO_LARGE),
    ],
)
def test_bytes_that_cannot_be_a_sample_get_the_code_a_file_would(
    data: bytes, name: str, code: SampleCode
) -> None:
    with pytest.raises(InputError) as raised:
        decode_bytes(data, name, make_prep(), max_bytes=1000)
    assert raised.value.code == code
    assert "\n" not in str(raised.value)


def test_bytes_of_a_kind_the_model_does_not_read_are_wrong_kind() -> None:
    with pytest.raises(InputError) as raised:
        decode_bytes(b"MZ" * 10, "x.exe", make_prep(), kind="image")
    assert raised.value.code == SampleCode.WRONG_KIND
