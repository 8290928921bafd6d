"""Input discovery, labels and decoders (workers/extraction/inputs.py): what each accepts, and
the one-line error for what it refuses.

Expected arrays are built independently here (numpy + Pillow) and compared with `decode`.
"""

from __future__ import annotations

import builtins
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workers.errors import InputError, SampleCode, SpecError
from workers.extraction.inputs import (
    MAX_INPUT_BYTES,
    Source,
    decode,
    discover,
    labels_from_csv,
    labels_from_dirs,
    nataraj_width,
)
from workers.jobs import Preprocessing

# Height 6, width 10: not square, so a swapped (W, H) or a transposed array shows up.
H, W = 6, 10
KIB = 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_prep(
    channels: int = 1,
    size: tuple[int, int] = (H, W),
    scale: float = 1.0 / 255.0,
    mean: tuple[float, ...] = (0.0,),
    std: tuple[float, ...] = (1.0,),
) -> Preprocessing:
    return Preprocessing(size=size, channels=channels, scale=scale, mean=mean, std=std)  # type: ignore[arg-type]


def normalised(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """(x * scale - mean) / std per channel of a (C, H, W) array, in float64."""
    mean = np.broadcast_to(np.asarray(prep.mean, np.float64), (prep.channels,))
    std = np.broadcast_to(np.asarray(prep.std, np.float64), (prep.channels,))
    x = pixels.astype(np.float64) * prep.scale
    return (x - mean[:, None, None]) / std[:, None, None]


def chw(image: Image.Image) -> np.ndarray:
    """A Pillow image as a (C, H, W) uint8 array."""
    array = np.asarray(image)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def assert_decoded(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    assert actual.flags.c_contiguous
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-5)


def decode_error(
    path: Path, prep: Preprocessing, code: SampleCode, max_bytes: int | None = None
) -> InputError:
    """Decode `path`, expecting InputError `code` with a one-line message naming the file."""
    limit = MAX_INPUT_BYTES if max_bytes is None else max_bytes
    with pytest.raises(InputError) as info:
        decode(str(path), prep, limit)
    error = info.value
    message = str(error)
    assert error.code == code, message
    assert "\n" not in message
    assert "\r" not in message
    assert message.strip()
    assert path.name in message
    return error


def random_pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png(path: Path, shape: tuple[int, ...] = (H, W), seed: int = 0) -> Path:
    Image.fromarray(random_pixels(shape, seed)).save(path)
    return path


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def valid_sample(path: Path) -> Path:
    """A sample that decodes, of the kind its suffix says, for the model of `make_prep()`."""
    if path.suffix == ".npy":
        np.save(path, np.zeros((1, H, W), np.float32))
        return path
    if path.suffix == ".png":
        return png(path)
    return touch(path, bytes(range(1, 200)))


# --------------------------------------------------------------------------- Nataraj width

_BOUNDARIES = [  # (upper bound in KiB, width below it, width from it on)
    (10, 32, 64),
    (30, 64, 128),
    (60, 128, 256),
    (100, 256, 384),
    (200, 384, 512),
    (500, 512, 768),
    (1000, 768, 1024),
]
_WIDTH_CASES = [
    case for kib, below, at in _BOUNDARIES for case in ((kib * KIB - 1, below), (kib * KIB, at))
] + [(1, 32), (10 * 1024**3, 1024)]


@pytest.mark.parametrize(("size", "width"), _WIDTH_CASES, ids=[str(s) for s, _ in _WIDTH_CASES])
def test_nataraj_width_switches_exactly_at_each_kib_boundary(size: int, width: int) -> None:
    assert nataraj_width(size) == width


# --------------------------------------------------------------------------- raw binaries


def _binary_expected(data: bytes, width: int, prep: Preprocessing) -> np.ndarray:
    rows = -(-len(data) // width)
    grid = np.zeros((rows, width), np.uint8)
    grid.reshape(-1)[: len(data)] = np.frombuffer(data, np.uint8)
    height, out_width = prep.size
    gray = np.asarray(Image.fromarray(grid).resize((out_width, height), Image.Resampling.BILINEAR))
    return normalised(np.repeat(gray[None], prep.channels, axis=0), prep)


def _pattern(n: int) -> bytes:
    # Never zero, so a padding other than zeros would show.
    return bytes((i * 7) % 255 + 1 for i in range(n))


def test_binary_at_its_own_grid_size_is_the_bytes_row_major_with_the_last_row_zero_padded(
    tmp_path: Path,
) -> None:
    data = _pattern(100)  # < 10 KiB: width 32, four rows, the last with 100 - 96 = 4 bytes
    path = touch(tmp_path / "sample.exe", data)
    prep = make_prep(size=(4, 32), scale=1.0)
    out = decode(str(path), prep)
    grid = np.zeros(4 * 32, np.float32)
    grid[:100] = np.frombuffer(data, np.uint8)
    assert out.shape == (1, 4, 32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], grid.reshape(4, 32))
    np.testing.assert_array_equal(out[0, 3, 4:], 0)


@pytest.mark.parametrize(
    ("n", "width", "name"),
    [
        (100, 32, "tiny.bin"),
        (10 * KIB + 5, 64, "no_suffix"),
        (30 * KIB + 3, 128, "upper.BIN"),
        (60 * KIB + 1, 256, "program.dll"),
    ],
)
def test_binary_is_reshaped_at_the_nataraj_width_resized_bilinear_and_normalised(
    tmp_path: Path, n: int, width: int, name: str
) -> None:
    data = _pattern(n)
    path = touch(tmp_path / name, data)
    prep = make_prep(mean=(0.5,), std=(0.25,))
    assert_decoded(decode(str(path), prep), _binary_expected(data, width, prep))


def test_binary_with_three_channels_replicates_the_gray_and_normalises_each_channel(
    tmp_path: Path,
) -> None:
    data = _pattern(3000)
    path = touch(tmp_path / "sample.bin", data)
    prep = make_prep(channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = decode(str(path), prep)
    assert_decoded(out, _binary_expected(data, 32, prep))
    # The same gray in each channel: undoing each channel's normalisation gives one image.
    raw = out * np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    raw += np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    np.testing.assert_allclose(raw[0], raw[1], atol=1e-5)
    np.testing.assert_allclose(raw[0], raw[2], atol=1e-5)


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("suffix", "mode"),
    [
        (".png", "L"),
        (".png", "RGB"),
        (".bmp", "RGB"),
        (".bmp", "L"),
        (".tif", "RGB"),
        (".tiff", "L"),
        (".PNG", "RGB"),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_lossless_image_at_model_size_decodes_to_its_pixels_in_the_models_channels(
    tmp_path: Path, suffix: str, mode: str, channels: int
) -> None:
    shape = (H, W) if mode == "L" else (H, W, 3)
    source = Image.fromarray(random_pixels(shape), mode=mode)
    path = tmp_path / f"sample{suffix}"
    source.save(path)
    prep = make_prep(channels=channels)
    expected = chw(source.convert("L" if channels == 1 else "RGB"))
    assert_decoded(decode(str(path), prep), normalised(expected, prep))


def test_gray_image_for_a_three_channel_model_repeats_the_gray(tmp_path: Path) -> None:
    gray = random_pixels((H, W))
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)
    out = decode(str(path), make_prep(channels=3, scale=1.0))
    for channel in out:
        np.testing.assert_array_equal(channel, gray.astype(np.float32))


def test_image_is_resized_bilinear_to_the_models_height_and_width(tmp_path: Path) -> None:
    source = Image.fromarray(random_pixels((20, 30, 3)))
    path = tmp_path / "big.png"
    source.save(path)
    prep = make_prep(channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = decode(str(path), prep)
    assert out.shape == (3, H, W)
    expected = chw(source.resize((W, H), Image.Resampling.BILINEAR))
    assert_decoded(out, normalised(expected, prep))


def test_rgba_image_is_converted_to_rgb_dropping_alpha(tmp_path: Path) -> None:
    rgba = random_pixels((H, W, 4))
    rgba[..., 3] = np.arange(W, dtype=np.uint8) * 25  # alpha varies, some fully transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    out = decode(str(path), make_prep(channels=3, scale=1.0))
    assert out.shape == (3, H, W)
    np.testing.assert_array_equal(out, rgba[..., :3].transpose(2, 0, 1).astype(np.float32))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_decodes_close_to_its_source_and_exactly_as_pillow_reads_it(
    tmp_path: Path, mode: str
) -> None:
    # A smooth gradient, so JPEG loss stays small.
    ramp = np.add.outer(np.arange(16) * 8, np.arange(24) * 5).astype(np.uint8)
    pixels = ramp if mode == "L" else np.stack([ramp, 255 - ramp, ramp // 2], axis=-1)
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels, mode=mode).save(path, quality=95)
    channels = 1 if mode == "L" else 3
    prep = make_prep(channels=channels, size=(16, 24), scale=1.0)
    out = decode(str(path), prep)
    with Image.open(path) as img:
        read = chw(img.convert("L" if channels == 1 else "RGB"))
    assert_decoded(out, read.astype(np.float64))
    source = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
    assert np.abs(out - source.astype(np.float32)).mean() < 4


def test_animated_gif_uses_its_first_frame(tmp_path: Path) -> None:
    first = np.tile(np.arange(0, 16 * W, 16, dtype=np.uint8), (H, 1))
    second = 255 - first
    path = tmp_path / "anim.gif"
    frames = [Image.fromarray(first), Image.fromarray(second)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as img:
        assert getattr(img, "n_frames", 1) == 2
    out = decode(str(path), make_prep(scale=1.0))
    np.testing.assert_array_equal(out[0], first.astype(np.float32))
    assert not np.array_equal(out[0], second.astype(np.float32))


def test_normalisation_uses_each_channels_mean_and_std_in_rgb_order(tmp_path: Path) -> None:
    pixels = random_pixels((H, W, 3))
    pixels[..., 0] //= 4  # red dark, blue bright: a channel mix-up changes the values
    pixels[..., 2] = 192 + pixels[..., 2] // 4
    path = tmp_path / "colour.png"
    Image.fromarray(pixels).save(path)
    prep = make_prep(channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = decode(str(path), prep)
    x = pixels.transpose(2, 0, 1).astype(np.float64) / 255.0
    for c in range(3):
        expected = (x[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        np.testing.assert_allclose(out[c], expected, rtol=1e-6, atol=1e-5)


def test_normalisation_applies_the_models_scale_and_a_single_mean_to_every_channel(
    tmp_path: Path,
) -> None:
    pixels = random_pixels((H, W, 3))
    path = png(tmp_path / "colour.png", (H, W, 3))
    prep = make_prep(channels=3, scale=1.0, mean=(127.5,), std=(127.5,))
    out = decode(str(path), prep)
    expected = (pixels.transpose(2, 0, 1).astype(np.float64) - 127.5) / 127.5
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert out.min() >= -1.0
    assert out.max() <= 1.0


# --------------------------------------------------------------------------- .npy arrays


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int16, np.uint8])
def test_npy_of_the_input_shape_is_used_as_is_cast_to_float32(tmp_path: Path, dtype: type) -> None:
    array: np.ndarray = (np.random.default_rng(1).standard_normal((3, H, W)) * 50).astype(dtype)
    path = tmp_path / "x.npy"
    np.save(path, array)
    # Mean, std and scale that would change the values if they were applied.
    prep = make_prep(channels=3, scale=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    out = decode(str(path), prep)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, array.astype(np.float32))


@pytest.mark.parametrize("shape", [(3, H, W), (H, W), (1, W, H), (1, 1, H, W)])
def test_npy_of_another_shape_is_wrong_shape_naming_both_shapes(
    tmp_path: Path, shape: tuple[int, ...]
) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(shape, np.float32))
    error = decode_error(path, make_prep(), SampleCode.WRONG_SHAPE)
    assert str(shape) in str(error)
    assert str((1, H, W)) in str(error)


def test_pickled_object_npy_is_corrupt_and_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "obj.npy"
    array = np.empty((1, H, W), dtype=object)
    array.fill(None)
    np.save(path, array, allow_pickle=True)
    decode_error(path, make_prep(), SampleCode.CORRUPT)


@pytest.mark.parametrize(
    "data",
    [b"this is not an array at all", bytes(range(256)) * 4],
    ids=["text", "bytes"],
)
def test_garbage_named_npy_is_corrupt(tmp_path: Path, data: bytes) -> None:
    decode_error(touch(tmp_path / "junk.npy", data), make_prep(), SampleCode.CORRUPT)


def test_truncated_npy_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "cut.npy"
    np.save(path, np.ones((1, H, W), np.float32))
    path.write_bytes(path.read_bytes()[:-40])
    decode_error(path, make_prep(), SampleCode.CORRUPT)


# --------------------------------------------------------------------------- per-sample errors


@pytest.mark.parametrize("name", ["empty.png", "empty.npy", "empty.bin", "empty"])
def test_empty_file_is_empty(tmp_path: Path, name: str) -> None:
    decode_error(touch(tmp_path / name, b""), make_prep(), SampleCode.EMPTY)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif", ".tif"])
def test_image_cut_in_half_is_corrupt(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    Image.fromarray(random_pixels((64, 64))).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    decode_error(path, make_prep(), SampleCode.CORRUPT)


@pytest.mark.parametrize("suffix", [".png", ".jpeg", ".bmp", ".tiff", ".gif"])
def test_random_bytes_named_as_an_image_are_corrupt(tmp_path: Path, suffix: str) -> None:
    data = np.random.default_rng(7).bytes(2000)
    decode_error(touch(tmp_path / f"noise{suffix}", data), make_prep(), SampleCode.CORRUPT)


@pytest.mark.parametrize("name", ["gone.png", "gone.npy", "gone.bin"])
def test_nonexistent_path_is_unreadable(tmp_path: Path, name: str) -> None:
    decode_error(tmp_path / name, make_prep(), SampleCode.UNREADABLE)


@pytest.mark.parametrize("name", ["link.png", "link.npy", "link.bin"])
def test_dangling_symlink_is_unreadable(tmp_path: Path, name: str) -> None:
    link = tmp_path / name
    link.symlink_to(tmp_path / "missing-target")
    decode_error(link, make_prep(), SampleCode.UNREADABLE)


@pytest.mark.parametrize(
    "name",
    [
        "folder.bin",
        "folder.png",
        "folder.npy",
    ],
)
def test_directory_given_where_a_file_is_expected_is_unreadable(tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "inside.png").write_bytes(b"x")
    decode_error(folder, make_prep(), SampleCode.UNREADABLE)


def _deny_open(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """Make opening `denied` fail as chmod 000 would for a non-root user."""
    real_open = builtins.open

    def guarded(file: object, *args: object, **kwargs: object) -> object:
        if isinstance(file, (str, os.PathLike)) and Path(file).absolute() == denied.absolute():
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)


@pytest.mark.parametrize(
    "name",
    [
        "locked.bin",
        "locked.png",
        "locked.npy",
    ],
)
def test_file_that_cannot_be_opened_for_permission_is_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    path = valid_sample(tmp_path / name)
    _deny_open(monkeypatch, path)
    decode_error(path, make_prep(), SampleCode.UNREADABLE)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file anyway")
def test_chmod_000_binary_is_unreadable(tmp_path: Path) -> None:
    path = touch(tmp_path / "locked.bin", b"abc")
    path.chmod(0)
    try:
        decode_error(path, make_prep(), SampleCode.UNREADABLE)
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize("name", ["big.png", "big.npy", "big.bin"])
def test_file_over_max_bytes_is_too_large_and_one_at_the_limit_is_not(
    tmp_path: Path, name: str
) -> None:
    path = valid_sample(tmp_path / name)
    size = path.stat().st_size
    error = decode_error(path, make_prep(), SampleCode.TOO_LARGE, max_bytes=size - 1)
    assert str(size) in str(error)
    assert decode(str(path), make_prep(), max_bytes=size).shape == (1, H, W)


@pytest.mark.parametrize(
    ("pixels", "side"),
    [(100, 11), (100, 30)],  # over the limit (a warning), over twice the limit (an error)
    ids=["warning", "error"],
)
def test_decompression_bomb_is_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pixels: int, side: int
) -> None:
    path = png(tmp_path / "bomb.png", (side, side))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)
    with warnings.catch_warnings():
        # Not pytest's "error" filter: decode itself must stop the bomb warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        decode_error(path, make_prep(), SampleCode.TOO_LARGE)


# --------------------------------------------------------------------------- discover


def test_directory_is_read_recursively_sorted_with_relative_posix_ids(tmp_path: Path) -> None:
    root = tmp_path / "data"
    # Created out of order: the result must not follow creation or directory order.
    for rel in ["b/z.png", "c.bin", "a/y.png", "a/x/2.png", "a/x/1.png"]:
        touch(root / rel)
    sources = discover([str(root)])
    assert [s.id for s in sources] == ["a/x/1.png", "a/x/2.png", "a/y.png", "b/z.png", "c.bin"]
    for source in sources:
        assert source.path == str((root / source.id).absolute())
    assert discover([str(root)]) == sources


def test_directory_ids_do_not_depend_on_how_the_directory_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "data"
    touch(root / "cls" / "s.png")
    monkeypatch.chdir(tmp_path)
    for given in [str(root), "data", "./data/", str(root) + "/"]:
        assert [s.id for s in discover([given])] == ["cls/s.png"]


def test_hidden_files_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    touch(root / "a.png")
    touch(root / ".DS_Store")
    touch(root / "cls" / ".hidden.png")
    touch(root / "cls" / "b.png")
    assert [s.id for s in discover([str(root)])] == ["a.png", "cls/b.png"]


def test_files_inside_hidden_directories_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    touch(root / "cat" / "a.png")
    touch(root / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png")
    touch(root / ".git" / "config")
    assert [s.id for s in discover([str(root)])] == ["cat/a.png"]


def test_files_given_directly_keep_the_path_as_given_for_their_id(tmp_path: Path) -> None:
    first = touch(tmp_path / "one.png")
    second = touch(tmp_path / "sub" / "two.bin")
    sources = discover([str(second), str(first)])
    assert sources == [
        Source(second.as_posix(), str(second.absolute())),
        Source(first.as_posix(), str(first.absolute())),
    ]


def test_list_file_skips_comments_and_blank_lines_and_strips_spaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = touch(tmp_path / "a.png")
    touch(tmp_path / "sub" / "b.bin")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# samples\n\n{a}\n   \n  sub/b.bin  \n  # indented comment\n")
    monkeypatch.chdir(tmp_path)
    sources = discover([f"@{listing}"])
    assert [s.id for s in sources] == [str(a), "sub/b.bin"]
    assert [s.path for s in sources] == [str(a), str(tmp_path / "sub" / "b.bin")]


def test_list_file_mixes_with_directories_and_files(tmp_path: Path) -> None:
    a = touch(tmp_path / "loose.png")
    touch(tmp_path / "dir" / "in.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{a}\n")
    ids = [s.id for s in discover([str(tmp_path / "dir"), f"@{listing}", str(a)])]
    assert ids == ["in.png", str(a), f"{a}~2"]


def _spec_error(inputs: list[str]) -> str:
    with pytest.raises(SpecError) as info:
        discover(inputs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_input_is_a_spec_error_naming_it(tmp_path: Path) -> None:
    touch(tmp_path / "there.png")
    missing = tmp_path / "not-there"
    message = _spec_error([str(tmp_path / "there.png"), str(missing)])
    assert str(missing) in message
    assert "does not exist" in message


def test_missing_list_file_is_a_spec_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    message = _spec_error([f"@{missing}"])
    assert str(missing) in message
    assert "does not exist" in message


@pytest.mark.parametrize("hidden_only", [False, True], ids=["empty", "hidden-only"])
def test_directory_without_samples_is_a_spec_error(tmp_path: Path, hidden_only: bool) -> None:
    root = tmp_path / "empty"
    (root / "nested").mkdir(parents=True)
    if hidden_only:
        touch(root / ".keep")
    message = _spec_error([str(root)])
    assert "no input files" in message
    assert str(root) in message


def test_list_file_with_only_comments_is_a_spec_error(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("# nothing yet\n\n")
    _spec_error([f"@{listing}"])


def test_duplicated_ids_get_a_numbered_suffix(tmp_path: Path) -> None:
    for part in ("one", "two", "three"):
        touch(tmp_path / part / "a.png")
    touch(tmp_path / "two" / "b.png")
    sources = discover([str(tmp_path / p) for p in ("one", "two", "three")])
    assert [s.id for s in sources] == ["a.png", "a.png~2", "b.png", "a.png~3"]
    assert [s.path for s in sources] == [
        str(tmp_path / "one" / "a.png"),
        str(tmp_path / "two" / "a.png"),
        str(tmp_path / "two" / "b.png"),
        str(tmp_path / "three" / "a.png"),
    ]


def test_ids_stay_unique_when_a_suffixed_id_is_also_a_real_name(tmp_path: Path) -> None:
    touch(tmp_path / "one" / "a.png")
    touch(tmp_path / "two" / "a.png")
    touch(tmp_path / "three" / "a.png~2")
    sources = discover([str(tmp_path / p) for p in ("one", "two", "three")])
    ids = [s.id for s in sources]
    assert len(set(ids)) == len(ids) == 3


def test_dangling_symlink_given_directly_becomes_an_unreadable_sample(tmp_path: Path) -> None:
    link = tmp_path / "broken.png"
    link.symlink_to(tmp_path / "missing")
    (source,) = discover([str(link)])
    decode_error(Path(source.path), make_prep(), SampleCode.UNREADABLE)


# --------------------------------------------------------------------------- labels


def test_labels_from_dirs_look_folder_names_up_in_the_models_classes(tmp_path: Path) -> None:
    for rel in ["dog/1.png", "ant/2.png", "cat/3.png", "dog/4.png", "ant/5.png"]:
        touch(tmp_path / rel)
    sources = discover([str(tmp_path)])
    declared = ("bee", "dog", "ant", "cat")
    labels, classes = labels_from_dirs(sources, declared, 4)
    assert classes == list(declared)
    by_id = dict(zip([s.id for s in sources], labels, strict=True))
    assert by_id == {"ant/2.png": 2, "ant/5.png": 2, "cat/3.png": 3, "dog/1.png": 1, "dog/4.png": 1}
    # The model's order, whichever folders are there and in whatever order they come.
    shuffled = sources[::-1][:2]
    labels, _ = labels_from_dirs(shuffled, declared, 4)
    assert labels == [by_id[s.id] for s in shuffled]


def _sources(*ids: str) -> list[Source]:
    return [Source(i, f"/data/{i}") for i in ids]


def _csv(tmp_path: Path, text: str) -> str:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return str(path)


ZOO = ("bee", "zebra", "ant", "moose")


@pytest.mark.parametrize(
    "header", ["sample_id,label\n", "", "sample_id,label\r\n"], ids=["header", "none", "crlf"]
)
def test_labels_csv_names_are_looked_up_in_the_models_classes(tmp_path: Path, header: str) -> None:
    path = _csv(tmp_path, f"{header}a.png,zebra\nb.png,ant\nc.png,moose\nd.png,ant\n")
    labels, classes = labels_from_csv(path, _sources("a.png", "b.png", "c.png", "d.png"), ZOO, 4)
    assert classes == list(ZOO)
    assert labels == [1, 2, 3, 2]  # the model's order, not the names sorted


def test_labels_csv_names_the_model_does_not_declare_are_refused(tmp_path: Path) -> None:
    path = _csv(tmp_path, "a.png,zebra\nb.png,yak\n")
    with pytest.raises(SpecError, match="'yak' is not one of the model's classes"):
        labels_from_csv(path, _sources("a.png", "b.png"), ZOO, 4)
    with pytest.raises(SpecError, match="declares no class names"):
        labels_from_csv(path, _sources("a.png", "b.png"), None, 4)


def test_labels_csv_integer_labels_must_be_model_outputs(tmp_path: Path) -> None:
    path = _csv(tmp_path, "a.png,3\nb.png,10\n")
    with pytest.raises(SpecError, match="label 10 .* not a class index below 10"):
        labels_from_csv(path, _sources("a.png", "b.png"), None, 10)


@pytest.mark.parametrize("header", ["sample_id,label\n", ""], ids=["header", "none"])
def test_labels_csv_integer_labels_are_kept(tmp_path: Path, header: str) -> None:
    path = _csv(tmp_path, f"{header}a.png,7\nb.png, 0\n c.png ,-1\nd.png,12\n")
    labels, classes = labels_from_csv(path, _sources("a.png", "b.png", "c.png", "d.png"), None, 13)
    assert classes is None
    assert labels == [7, 0, -1, 12]


@pytest.mark.parametrize("kind", ["names", "integers"])
def test_labels_csv_samples_it_does_not_list_get_minus_one(tmp_path: Path, kind: str) -> None:
    first, second = ("cat", "dog") if kind == "names" else ("3", "5")
    path = _csv(tmp_path, f"sample_id,label\nb.png,{first}\nother.png,{second}\n")
    declared = ("dog", "cat") if kind == "names" else None
    labels, classes = labels_from_csv(path, _sources("a.png", "b.png", "c.png"), declared, 9)
    if kind == "names":
        assert classes == ["dog", "cat"]
        assert labels == [-1, 1, -1]
    else:
        assert classes is None
        assert labels == [-1, 3, -1]


def test_labels_csv_matches_suffixed_and_nested_ids(tmp_path: Path) -> None:
    path = _csv(tmp_path, 'cls/a.png,x\n"a.png~2",y\n')
    sources = _sources("a.png~2", "cls/a.png", "a.png")
    labels, classes = labels_from_csv(path, sources, ("x", "y"), 2)
    assert classes == ["x", "y"]
    assert labels == [1, 0, -1]


@pytest.mark.parametrize(
    "text",
    ["a.png,cat\nb.png,dog,extra\n", "a.png,cat\nb.png\n", "sample_id,label,note\na.png,cat,x\n"],
    ids=["three-columns", "one-column", "wide-header"],
)
def test_labels_csv_malformed_row_is_a_spec_error(tmp_path: Path, text: str) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(SpecError) as info:
        labels_from_csv(path, _sources("a.png", "b.png"), ZOO, 4)
    assert path in str(info.value)
    assert "\n" not in str(info.value)


def test_labels_csv_that_does_not_exist_is_a_spec_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.csv")
    with pytest.raises(SpecError, match="does not exist"):
        labels_from_csv(missing, _sources("a.png"), ZOO, 4)


@pytest.mark.parametrize(
    "header", ["sample_id, label\n", "\ufeffsample_id,label\n"], ids=["space", "bom"]
)
def test_labels_csv_header_written_by_spreadsheets_is_recognised(
    tmp_path: Path, header: str
) -> None:
    path = _csv(tmp_path, f"{header}a.png,3\nb.png,5\n")
    labels, classes = labels_from_csv(path, _sources("a.png", "b.png"), None, 10)
    assert classes is None
    assert labels == [3, 5]


def test_directory_order_compares_path_parts_not_strings(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for rel in ["a-b/1.png", "a/b/2.png", "a.png", "a/3.png"]:
        touch(root / rel)
    # "a" < "a-b" < "a.png" part by part, though "a-b/..." < "a/..." as strings
    assert [s.id for s in discover([str(root)])] == ["a/3.png", "a/b/2.png", "a-b/1.png", "a.png"]


def test_linked_folders_are_not_followed_and_linked_files_are_read(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    touch(outside / "o.png")
    root = tmp_path / "data"
    touch(root / "a.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "link.png").symlink_to(outside / "o.png")
    (root / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    assert [s.id for s in discover([str(root)])] == ["a.png", "dangling.png", "link.png"]
