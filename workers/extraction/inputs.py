"""Input discovery, labels and decoders: images, `.npy` arrays and raw binaries.

Decoders return a float32 (C, H, W) array as the model wants it, read-only where it maps
a float32 `.npy`, or raise InputError with the per-sample code; the caller records it and
goes on with the other samples.
"""

from __future__ import annotations

import csv
import math
import os
import stat
import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from workers.errors import InputError, SampleCode, SpecError
from workers.extraction.beneath import (
    OutsideRoots,
    fd_path,
    open_beneath,
    opened,
    walk_beneath,
)
from workers.jobs import (
    IMAGE_SUFFIXES,
    ExtractionSpec,
    InputKind,
    Listing,
    ModelInfo,
    Preprocessing,
    Source,
    kind_of,
    nataraj_width,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_INPUT_BYTES",
    "OutsideRoots",
    "Source",
    "decode",
    "discover",
    "fd_path",
    "labels_from_csv",
    "kind_of",
    "labels_from_dirs",
    "list_inputs",
    "nataraj_width",
    "opened",
    "skipped_line",
]

MAX_INPUT_BYTES = 256 << 20
# np.load parses the header with ast.literal_eval, and CPython before 3.11.8 and 3.12.2
# kept the AST constructor's depth in one struct for all threads (cpython#106905): two
# decode threads parsing at once failed a good file with SystemError (seen here, 3.11.7).
_NPY_HEADER = threading.Lock()


def _walk(root: str) -> list[str]:
    """The files under `root` as sorted relative POSIX paths: files and dangling links
    (reported per sample), not hidden ones, nor anything in a hidden or linked folder.
    os.walk rather than Path.rglob: a directory of a million samples is planned in one
    submitting request, and pathlib took five times as long."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):  # linked folders are listed, not followed
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for name in files:
            full = os.path.join(folder, name)
            if not name.startswith(".") and (
                os.path.isfile(full) or (os.path.islink(full) and not os.path.exists(full))
            ):
                found.append(prefix + name)
    return sorted(found, key=lambda rel: rel.split("/"))  # by parts, as paths compare


def _walk_beneath(root: str, roots: tuple[str, ...]) -> list[str]:
    """`_walk` for a tenant's folder: opened beneath `roots`, no link followed, a folder
    swapped for a link mid-walk skipped. Regular files and links are listed (a link is
    refused when it is checked or opened), not hidden ones, nor anything in a hidden or
    linked folder."""
    found: list[str] = []
    try:
        for folder, dirs, files, fd in walk_beneath(root, roots):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            prefix = "" if folder == "." else folder + "/"
            for name in files:
                if not name.startswith(".") and _file_or_link(name, fd):
                    found.append(prefix + name)
    except OutsideRoots as exc:
        raise SpecError(f"input {root} {exc}; give folders beneath your allowed roots") from None
    return sorted(found, key=lambda rel: rel.split("/"))


def _file_or_link(name: str, dir_fd: int) -> bool:
    try:
        mode = os.lstat(name, dir_fd=dir_fd).st_mode
    except OSError:  # gone since it was listed
        return False
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)


def discover(
    inputs: list[str] | tuple[str, ...], roots: tuple[str, ...] | None = None
) -> list[Source]:
    """Expand files, directories (recursive, sorted) and `@list.txt` into samples with
    stable ids: the path under a directory, else the path as given. With `roots` (a
    tenant's), directories are walked beneath them as `beneath` says."""
    found: list[tuple[str, Path]] = []
    for item in inputs:
        if item.startswith("@"):
            listing = Path(item[1:])
            if not listing.is_file():
                raise SpecError(f"list file {listing} does not exist")
            lines = [ln.strip() for ln in listing.read_text().splitlines()]
            # Relative entries are read from the list's own folder, wherever it is run from.
            found.extend((ln, listing.parent / ln) for ln in lines if ln and not ln.startswith("#"))
            continue
        path = Path(item)
        if path.is_dir():
            listed = _walk(str(path)) if roots is None else _walk_beneath(str(path), roots)
            found.extend((rel, path / rel) for rel in listed)
        elif path.exists() or path.is_symlink():
            found.append((path.as_posix(), path))
        else:
            raise SpecError(f"input {item} does not exist; give files, directories or @list.txt")
    if not found:
        raise SpecError(f"no input files found in {', '.join(inputs)}")
    given: set[str] = set()
    next_suffix: dict[str, int] = {}  # so many repeats of one id stay linear
    sources = []
    for sid, path in found:
        unique, n = sid, next_suffix.get(sid, 1)
        while unique in given:
            n += 1
            unique = f"{sid}~{n}"
        next_suffix[sid] = n
        given.add(unique)
        sources.append(Source(unique, str(path.absolute())))
    return sources


_DECLARE = (
    "declare the model's class names (`classes` in its preprocessing JSON, a factory's "
    "`classes` attribute, or at registration)"
)


def labels_from_dirs(
    sources: list[Source], classes: tuple[str, ...] | None, outputs: int
) -> tuple[list[int], list[str] | None]:
    """Each sample's label from its parent folder's name: its index among the model's
    `classes` when declared, else the folder's integer, below `outputs`. Folders that say
    neither are refused before any work, with how to declare the classes."""
    names = [Path(s.path).parent.name for s in sources]
    if classes is not None:
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise SpecError(
                f"--labels-from-dirs: folder {unknown[0]!r} is not one of the model's classes "
                f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}); name the "
                "folders after them, or give --labels CSV"
            )
        return [index[n] for n in names], list(classes)
    odd = sorted({n for n in names if not n.isdigit() or int(n) >= outputs})
    if odd:
        raise SpecError(
            f"--labels-from-dirs: folder {odd[0]!r} is not a class index below {outputs} and "
            f"the model declares no class names; {_DECLARE}, or give --labels CSV"
        )
    return [int(n) for n in names], None


def labels_from_csv(
    path: str,
    sources: list[Source],
    classes: tuple[str, ...] | None,
    outputs: int,
    roots: tuple[str, ...] | None = None,
) -> tuple[list[int], list[str] | None]:
    """`sample_id,label` rows: a label is a class index below `outputs` or one of the
    model's `classes`, looked up as folder names are. Samples the file does not list get
    -1. With `roots`, the file is opened beneath them."""
    try:
        with opened(path, roots) as fd:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SpecError(f"labels file {path} is not a regular file")
            text = Path(fd_path(fd)).read_text(encoding="utf-8-sig")
    except OutsideRoots as exc:
        raise SpecError(f"labels file {path} {exc}") from None
    except OSError:
        raise SpecError(f"labels file {path} does not exist") from None
    rows = [r for r in csv.reader(text.splitlines()) if r]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["sample_id", "label"]:
        rows = rows[1:]
    if any(len(r) != 2 for r in rows):
        raise SpecError(f"labels file {path} needs two columns per row: sample_id,label")
    given = {sid.strip(): label.strip() for sid, label in rows}
    if all(v.lstrip("-").isdigit() for v in given.values()):
        odd = sorted({int(v) for v in given.values() if not -1 <= int(v) < outputs})
        if odd:
            raise SpecError(
                f"labels file {path}: label {odd[0]} is not a class index below {outputs} "
                "(or -1 for unknown)"
            )
        return [int(given.get(s.id, -1)) for s in sources], None
    if classes is None:
        raise SpecError(
            f"labels file {path} names classes but the model declares no class names; "
            f"{_DECLARE}, or give class indices"
        )
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(given.values()) - set(index))
    if unknown:
        raise SpecError(
            f"labels file {path}: {unknown[0]!r} is not one of the model's classes "
            f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''})"
        )
    return [index[given[s.id]] if s.id in given else -1 for s in sources], list(classes)


def _classes(spec: ExtractionSpec, info: ModelInfo) -> tuple[str, ...] | None:
    """The model's class names: the job's preprocessing override, else the model's."""
    prep = spec.preprocessing or info.preprocessing
    return prep.classes if prep.classes is not None else info.preprocessing.classes


def list_inputs(
    spec: ExtractionSpec, info: ModelInfo, sources: list[Source] | None = None
) -> Listing:
    """The job's samples (`sources` when the caller listed them already, else discovered
    beneath the spec's roots) with the labels the spec asks for."""
    sources = sources if sources is not None else discover(spec.inputs, spec.roots)
    if spec.labels_from_dirs:
        labels, classes = labels_from_dirs(sources, _classes(spec, info), info.classes)
    elif spec.labels_csv:
        labels, classes = labels_from_csv(
            spec.labels_csv, sources, _classes(spec, info), info.classes, spec.roots
        )
    else:
        labels, classes = [-1] * len(sources), None
    return Listing(sources, labels, classes)


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
    if kind is not None and kind_of(path) not in _READS[kind]:
        raise InputError(
            SampleCode.WRONG_KIND,
            f"{Path(path).name} is not {_KIND_WORDS[kind]}, the kind of input the model "
            "reads; it is skipped (--input-kind overrides the model's)",
        )
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
    size = info.st_size
    if size == 0:
        raise InputError(SampleCode.EMPTY, f"{name} is empty")
    if size > max_bytes:
        raise InputError(SampleCode.TOO_LARGE, f"{name} is {size} bytes, over {max_bytes}")
    suffix = (file.suffix if suffix is None else suffix).lower()
    try:
        if suffix == ".npy":
            return _array(file, name, prep)
        if suffix in IMAGE_SUFFIXES:
            return _normalise(_image(file, name, prep), prep)
        return _normalise(_binary(file.read_bytes(), prep), prep)
    except PermissionError as exc:
        raise InputError(SampleCode.UNREADABLE, f"cannot read {name}: permission denied") from exc


def _array(file: Path, name: str, prep: Preprocessing) -> np.ndarray:
    try:
        with _NPY_HEADER:  # the header only: the data is mapped, and copied below
            array = np.load(file, mmap_mode="r", allow_pickle=False)
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


def _image(file: Path, name: str, prep: Preprocessing) -> np.ndarray:
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
