"""Decoders: one sample, from a file or from the bytes a request sent, as the float32
(C, H, W) array the model wants: images, `.npy` arrays and raw binaries (drawn as images).

Each returns the array, read-only where it maps a float32 `.npy`, or raises InputError with
the per-sample code; the caller records it and goes on with the other samples.
"""

from __future__ import annotations

import io
import math
import os
import stat
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from workers.errors import InputError, SampleCode
from workers.extraction.beneath import OutsideRoots, fd_path, open_beneath
from workers.jobs import IMAGE_SUFFIXES, InputKind, Preprocessing, kind_of, nataraj_width

__all__ = ["MAX_INPUT_BYTES", "decode", "decode_bytes", "skipped_line"]

MAX_INPUT_BYTES = 256 << 20
# np.load parses the header with ast.literal_eval, and CPython before 3.11.8 and 3.12.2
# kept the AST constructor's depth in one struct for all threads (cpython#106905): two
# decode threads parsing at once failed a good file with SystemError (seen here, 3.11.7).
_NPY_HEADER = threading.Lock()


_KIND_WORDS = {"image": "an image", "array": "a .npy array"}
# What a model of each kind reads. A `.npy` array of the input shape is the model's input
# already, whatever files it decodes, so an image model takes one too.
_READS: dict[str, tuple[InputKind, ...]] = {
    "image": ("image", "array"),
    "array": ("array",),
    "binary": ("image", "array", "binary"),
}


def skipped_line(kind: InputKind, n: int) -> str:
    """The summary's line for `n` files skipped as not of `kind`."""
    what = _KIND_WORDS.get(kind, kind)
    plural = what.replace("an ", "").replace("a ", "") + "s"
    return f"{n} file{'s' if n != 1 else ''} skipped: not {what if n == 1 else plural}"


def decode(
    path: str,
    prep: Preprocessing,
    max_bytes: int = MAX_INPUT_BYTES,
    *,
    roots: tuple[str, ...] | None = None,
    kind: InputKind | None = None,
) -> np.ndarray:
    """Read one sample as the model's float32 (C, H, W) input. With `roots` (a tenant's
    job), the file is opened beneath them and read from that open file only: one that now
    lies outside them, or is reached through a link, is refused with OUTSIDE_ROOTS. With
    `kind` (the model's, or the job's override), a file it does not read (`_READS`) is
    skipped with WRONG_KIND, unread."""
    _check_kind(Path(path).name, kind)
    if roots is None:
        return _decode(Path(path), Path(path).name, prep, max_bytes)
    name = Path(path).name
    try:
        fd = open_beneath(path, roots)
    except OutsideRoots as exc:
        raise InputError(SampleCode.OUTSIDE_ROOTS, f"{name} {exc}; it is not read") from None
    except OSError as exc:
        raise InputError(SampleCode.UNREADABLE, f"cannot read {name}: {exc.strerror}") from exc
    try:
        return _decode(Path(fd_path(fd)), name, prep, max_bytes, Path(path).suffix)
    finally:
        os.close(fd)


def _check_kind(name: str, kind: InputKind | None) -> None:
    if kind is not None and kind_of(name) not in _READS[kind]:
        raise InputError(
            SampleCode.WRONG_KIND,
            f"{name} is not {_KIND_WORDS[kind]}, the kind of input the model "
            "reads; it is skipped (--input-kind overrides the model's)",
        )


def decode_bytes(
    data: bytes,
    name: str,
    prep: Preprocessing,
    max_bytes: int = MAX_INPUT_BYTES,
    *,
    kind: InputKind | None = None,
) -> np.ndarray:
    """Decode one sample a request sent as bytes, by the suffix of `name` as `decode` reads
    a file of that name: the same checks (kind, size, pixels, shape) and the same codes."""
    _check_kind(name, kind)
    _check_size(len(data), name, max_bytes)
    return _by_suffix(io.BytesIO(data), name, prep, Path(name).suffix)


def _check_size(size: int, name: str, max_bytes: int) -> None:
    if size == 0:
        raise InputError(SampleCode.EMPTY, f"{name} is empty")
    if size > max_bytes:
        raise InputError(SampleCode.TOO_LARGE, f"{name} is {size} bytes, over {max_bytes}")


def _decode(
    file: Path, name: str, prep: Preprocessing, max_bytes: int, suffix: str | None = None
) -> np.ndarray:
    """Decode `file`, named `name` in messages; `suffix` when `file` has none of its own."""
    try:
        info = file.stat()
    except OSError as exc:
        raise InputError(SampleCode.UNREADABLE, f"cannot read {name}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise InputError(SampleCode.UNREADABLE, f"cannot read {name}: not a regular file")
    _check_size(info.st_size, name, max_bytes)
    try:
        return _by_suffix(file, name, prep, file.suffix if suffix is None else suffix)
    except PermissionError as exc:
        raise InputError(SampleCode.UNREADABLE, f"cannot read {name}: permission denied") from exc


def _by_suffix(file: Path | BinaryIO, name: str, prep: Preprocessing, suffix: str) -> np.ndarray:
    suffix = suffix.lower()
    if suffix == ".npy":
        return _array(file, name, prep)
    if suffix in IMAGE_SUFFIXES:
        return _normalise(_image(file, name, prep), prep)
    data = file.read_bytes() if isinstance(file, Path) else file.read()
    return _normalise(_binary(data, prep), prep)


def _array(file: Path | BinaryIO, name: str, prep: Preprocessing) -> np.ndarray:
    try:
        with _NPY_HEADER:  # a file's header only: its data is mapped, and copied below
            if isinstance(file, Path):
                array = np.load(file, mmap_mode="r", allow_pickle=False)
            else:  # bytes a request sent: read whole
                array = np.load(file, allow_pickle=False)
    except PermissionError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(SampleCode.CORRUPT, f"{name} is not a valid .npy array") from exc
    if not isinstance(array, np.ndarray):  # an .npz archive under a .npy name
        array.close()
        raise InputError(SampleCode.CORRUPT, f"{name} is an archive, not one .npy array")
    if array.shape != prep.input_shape:
        shape = array.shape
        raise InputError(
            SampleCode.WRONG_SHAPE,
            f"{name} has shape {shape}, the model takes {prep.input_shape}",
        )
    if not np.issubdtype(array.dtype, np.number):
        raise InputError(SampleCode.WRONG_SHAPE, f"{name} holds {array.dtype}, not numbers")
    # A view of the map for float32 (the caller copies it into its batch; the file is
    # closed already, the map goes with the view), else one converted copy.
    return np.asarray(array, dtype=np.float32)


def _image(file: Path | BinaryIO, name: str, prep: Preprocessing) -> np.ndarray:
    """The image's pixels as uint8 (C, H, W), a view; `_normalise` makes the float copy."""
    mode = "L" if prep.channels == 1 else "RGB"
    limit = Image.MAX_IMAGE_PIXELS
    height, width = prep.size
    try:
        with Image.open(file) as img:
            # Checked before decoding, here rather than through Pillow's warning, which
            # would need a process-wide filter while other threads decode.
            if limit is not None and img.width * img.height > limit:
                raise InputError(
                    SampleCode.TOO_LARGE,
                    f"{name} is {img.width}x{img.height} pixels, over the {limit} limit",
                )
            img.seek(0)  # the first frame of an animated GIF
            # Already in the model's mode: read as it is, without convert's copy.
            frame = img.convert(mode) if img.mode != mode else img
            if frame.size != (width, height):
                frame = frame.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(frame)  # inside the block: a closed image has no pixels
    except Image.DecompressionBombError as exc:
        raise InputError(SampleCode.TOO_LARGE, f"{name} is too many pixels to decode") from exc
    except PermissionError:
        raise
    except UnidentifiedImageError as exc:
        raise InputError(SampleCode.CORRUPT, f"{name} is not a readable image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(SampleCode.CORRUPT, f"{name} is corrupt or truncated: {exc}") from exc
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _binary(data: bytes, prep: Preprocessing) -> np.ndarray:
    width = nataraj_width(len(data))
    rows = math.ceil(len(data) / width)
    pixels = np.zeros(rows * width, dtype=np.uint8)  # the last row zero-padded
    pixels[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    height, out_width = prep.size
    image = Image.fromarray(pixels.reshape(rows, width), mode="L")
    array = np.asarray(image.resize((out_width, height), Image.Resampling.BILINEAR), np.float32)
    return np.repeat(array[None], prep.channels, axis=0)


def _normalise(array: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """(x * scale - mean) / std in float32, into one new C-ordered array: the same
    arithmetic, step by step, without a temporary per step."""
    mean = np.asarray(prep.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(prep.std, np.float32).reshape(-1, 1, 1)
    out = np.empty(array.shape, np.float32)
    np.multiply(array, np.float32(prep.scale), out=out, dtype=np.float32)
    out -= mean
    out /= std
    return out
