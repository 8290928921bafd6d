"""What a torch.export archive holds, read before any of torch touches it.

`torch.export.load` unpickles some entries with `weights_only=False` (a weights or constants
entry marked `use_pickle`, custom and opaque objects, the legacy `data/weights/model.pt`
layout and the pre-2.7 zip layout), falls back to `weights_only=False` when sample inputs fail
the weights-only unpickler, loads compiled AOTInductor libraries, and evaluates the symbolic
shape expressions and guard code of `models/*.json` as Python. So every entry of the zip is
classified here, default-deny, and an archive holding anything of that is refused; the sample
inputs, which every archive has and actmap does not need, are named for the loader to empty.
Torch-free: this module imports no torch, so the check runs before torch sees the bytes.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from workers.errors import ModelError

__all__ = ["Inspection", "inspect_archive"]

_REEXPORT = "re-export the model with torch.export.save from a current torch and register that"
_MODEL = "model"  # the one program name torch.export.save writes and torch.export.load returns

# Entries a genuine torch.export.save writes, relative to the archive's root folder.
_METADATA = {"archive_format", "archive_version", "byteorder", ".data/version",
             ".data/serialization_id"}  # fmt: skip
_PROGRAM = f"models/{_MODEL}.json"
_WEIGHTS_CONFIG = f"data/weights/{_MODEL}_weights_config.json"
_CONSTANTS_CONFIG = f"data/constants/{_MODEL}_constants_config.json"
_SAMPLE_INPUTS = f"data/sample_inputs/{_MODEL}.pt"
_WEIGHT = re.compile(r"data/weights/(weight_\d+)")
_CONSTANT = re.compile(r"data/constants/(tensor_\d+)")
_EXTRA = re.compile(r"extra/[A-Za-z0-9._/-]+")

# Entries torch would unpickle or run, with what to say about each.
_REFUSED = (
    (re.compile(r"data/constants/custom_obj_"), "a pickled custom object"),
    (re.compile(r"data/constants/opaque_obj_"), "a pickled opaque object"),
    (re.compile(r"data/(weights|constants)/[^/]+\.pt"), "pickled weights in the legacy layout"),
    (re.compile(r"data/aotinductor/"), "compiled AOTInductor code"),
    (re.compile(r"models/"), "a second exported program"),
)

# Symbolic shapes are stored as sympy source text, which torch hands to `sympy.sympify` (an
# eval). What a genuine export writes: numbers, symbol names such as `s77`, a few sympy and
# torch shape functions, arithmetic and comparisons. No attribute access, subscripts or
# names outside this list, so the text cannot reach anything else.
_SYMPY_WORDS = (
    "Symbol Integer Float Rational True False oo zoo nan positive integer real nonnegative "
    "negative finite Abs Max Min Eq Ne Lt Le Gt Ge And Or Not floor ceiling sqrt Pow Mod "
    "Piecewise FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt IntTrueDiv "
    "FloatTrueDiv LShift RShift IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt "
    "RoundToInt RoundDecimal ToFloat Identity PowByNatural FloatPow BitwiseFn_bitwise_and "
    "BitwiseFn_bitwise_or OpaqueUnaryFn_sqrt OpaqueUnaryFn_exp OpaqueUnaryFn_log"
)
_SYMPY_NAMES = frozenset(_SYMPY_WORDS.split())
_SYMBOL = re.compile(r"[a-z]{1,4}\d+")
_SYMPY_TOKEN = re.compile(
    r"\s+|(?P<num>\d+(\.\d+)?(e[+-]?\d+)?)|(?P<name>[A-Za-z][A-Za-z0-9_]*)|(?P<str>'[A-Za-z0-9_]*')"
    r"|(?P<op>\*\*|//|==|!=|<=|>=|[-+*/%(),<>=&|~])"
)


@dataclass(frozen=True)
class Inspection:
    """An archive that passed: its root folder, and the entries torch would unpickle trying
    the weights-only unpickler first and `weights_only=False` after (the sample inputs, which
    actmap does not need: the loader empties them, so torch unpickles nothing)."""

    root: str
    pickles: tuple[str, ...]


def inspect_archive(data: bytes, label: str) -> Inspection | None:
    """Check the zip in `data` entry by entry. None when it is a zip but not a torch.export
    archive at all (no `archive_format`: e.g. a torch.save file); ModelError when it is one
    that torch would run code from, or one whose layout could read differently to torch."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelError(f"{label} is not a readable zip archive: {exc}") from exc
    with archive:
        infos = archive.infolist()
        root = _check_layout(data, archive, infos, label)
        names = {info.filename[len(root) + 1 :] for info in infos}
        if "archive_format" not in names:
            return None
        _check_format(archive, root, label)
        pickles = _classify(names, label)
        for config, folder, entry in (
            (_WEIGHTS_CONFIG, "data/weights/", _WEIGHT),
            (_CONSTANTS_CONFIG, "data/constants/", _CONSTANT),
        ):
            _check_payload_config(
                _json(archive, f"{root}/{config}", label), folder, entry, names, label
            )
        _check_program(_json(archive, f"{root}/{_PROGRAM}", label), label)
    return Inspection(root, tuple(f"{root}/{n}" for n in pickles))


def _refuse(label: str, what: str) -> ModelError:
    return ModelError(f"{label} is refused: it holds {what}, which actmap never loads; {_REEXPORT}")


def _check_layout(
    data: bytes, archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], label: str
) -> str:
    """One root folder, plain unique names, stored entries laid end to end from byte 0: what
    torch.export.save writes, and nothing two zip readers could read differently."""
    if not infos:
        raise ModelError(f"{label} is an empty zip archive")
    seen: set[str] = set()
    roots: set[str] = set()
    for info in infos:
        name = info.filename
        parts = name.split("/")
        if (
            "\\" in name
            or "\0" in name
            or name.startswith("/")
            or len(parts) < 2
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise ModelError(f"{label} has an entry with an unsafe name {name!r}; {_REEXPORT}")
        if name.lower() in seen:  # torch's zip reader may match names ignoring case
            raise ModelError(f"{label} has the entry {name!r} twice; {_REEXPORT}")
        seen.add(name.lower())
        roots.add(parts[0])
        if info.flag_bits & 0x1 or info.compress_type != zipfile.ZIP_STORED:
            raise ModelError(f"{label} has a compressed or encrypted entry {name!r}; {_REEXPORT}")
    if len(roots) != 1:
        raise ModelError(f"{label} has entries outside one root folder; {_REEXPORT}")
    if archive.comment:
        raise ModelError(f"{label} carries a zip comment; {_REEXPORT}")
    end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        if info.header_offset != end:
            raise ModelError(f"{label} has gaps or overlaps between its entries; {_REEXPORT}")
        end = _local_end(data, info, label)
    if end != archive.start_dir:
        raise ModelError(f"{label} has bytes between its entries and its directory; {_REEXPORT}")
    return roots.pop()


def _local_end(data: bytes, info: zipfile.ZipInfo, label: str) -> int:
    """Where the entry's stored bytes end, after checking its local header names it."""
    start = info.header_offset
    header = data[start : start + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise ModelError(f"{label} has a broken entry {info.filename!r}; {_REEXPORT}")
    name_len, extra_len = (int(n) for n in struct.unpack("<HH", header[26:30]))
    local_name = data[start + 30 : start + 30 + name_len]
    if local_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
        raise ModelError(f"{label} names {info.filename!r} two ways; {_REEXPORT}")
    end = start + 30 + name_len + extra_len + info.compress_size
    if info.flag_bits & 0x8:  # a data descriptor follows the bytes
        signed = data[end : end + 4] == b"PK\x07\x08"
        end += (16 if signed else 12) + (8 if info.compress_size >= 0xFFFFFFFF else 0)
    if end > len(data):
        raise ModelError(f"{label} is truncated at {info.filename!r}")
    return end


def _check_format(archive: zipfile.ZipFile, root: str, label: str) -> None:
    fmt = archive.read(f"{root}/archive_format")
    version = (
        archive.read(f"{root}/archive_version") if _has(archive, root, "archive_version") else b""
    )
    if fmt != b"pt2" or version != b"0":
        raise ModelError(
            f"{label} is a torch.export archive of format {fmt[:20]!r} version {version[:20]!r}; "
            f"actmap reads format b'pt2' version b'0'; {_REEXPORT}"
        )


def _has(archive: zipfile.ZipFile, root: str, name: str) -> bool:
    try:
        archive.getinfo(f"{root}/{name}")
    except KeyError:
        return False
    return True


def _classify(names: set[str], label: str) -> list[str]:
    """Every entry is one torch.export.save writes, or the archive is refused. Returns the
    entries that torch unpickles weights-only first."""
    pickles = []
    for name in sorted(names):
        if name == _SAMPLE_INPUTS:
            pickles.append(name)
        elif (
            name in _METADATA
            or name in (_PROGRAM, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG)
            or _WEIGHT.fullmatch(name)
            or _CONSTANT.fullmatch(name)
            or _EXTRA.fullmatch(name)
        ):
            continue
        else:
            what = next((w for pattern, w in _REFUSED if pattern.match(name)), None)
            raise _refuse(
                label, f"{what} ({name})" if what else f"an entry it cannot classify ({name})"
            )
    for required in (_PROGRAM, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG):
        if required not in names:
            raise ModelError(f"{label} lacks {required}; {_REEXPORT}")
    return pickles


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a key is given twice")
    return found


def _json(archive: zipfile.ZipFile, name: str, label: str) -> Any:
    try:
        return json.loads(archive.read(name), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{label} has an unreadable {name.split('/', 1)[1]}: {exc}") from exc


def _check_payload_config(
    config: Any, folder: str, entry: re.Pattern[str], names: set[str], label: str
) -> None:
    """Each weight and constant is raw tensor bytes described by its metadata; none pickled."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ModelError(f"{label} has a payload config of an unknown shape; {_REEXPORT}")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _refuse(label, f"a pickled weight or constant ({fqn})")
        path = meta.get("path_name")
        if not isinstance(path, str) or not isinstance(meta.get("tensor_meta"), dict):
            raise ModelError(f"{label} describes {fqn} without a tensor; {_REEXPORT}")
        if not entry.fullmatch(f"{folder}{path}") or f"{folder}{path}" not in names:
            raise _refuse(label, f"{fqn} stored as {path!r}, which is not a raw tensor entry")


def _check_program(program: Any, label: str) -> None:
    if not isinstance(program, dict):
        raise ModelError(f"{label} has a program of an unknown shape; {_REEXPORT}")
    if program.get("guards_code"):
        raise _refuse(label, "guard code, which torch runs as Python")
    for text in _values_of(program, "expr_str"):
        _check_sympy(text, label)


def _values_of(node: Any, key: str) -> Iterator[Any]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if k == key:
                    yield v
                else:
                    stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)


def _check_sympy(text: Any, label: str) -> None:
    if not isinstance(text, str) or len(text) > 10_000:
        raise _refuse(label, "a symbolic shape that is not a short expression")
    pos = 0
    while pos < len(text):
        token = _SYMPY_TOKEN.match(text, pos)
        if token is None:
            raise _refuse(label, f"a symbolic shape torch would evaluate as Python ({text[:60]!r})")
        name = token.group("name")
        if name is not None and name not in _SYMPY_NAMES and not _SYMBOL.fullmatch(name):
            raise _refuse(label, f"a symbolic shape naming {name!r}, which torch would evaluate")
        pos = token.end()
