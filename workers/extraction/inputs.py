"""Input discovery and labels: the samples of a job, listed beneath the tenant's roots, and
their labels from folders or a CSV. The decoders live in decoders.py and are re-exported here,
the one module of extraction the API and the pictures may import.
"""

from __future__ import annotations

import csv
import os
import stat
from pathlib import Path

from workers.errors import SpecError
from workers.extraction.beneath import (
    OutsideRoots,
    fd_path,
    opened,
    walk_beneath,
)
from workers.extraction.decoders import (
    MAX_INPUT_BYTES,
    decode,
    decode_bytes,
    skipped_line,
)
from workers.jobs import (
    IMAGE_SUFFIXES,
    ExtractionSpec,
    Listing,
    ModelInfo,
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
    "decode_bytes",
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
