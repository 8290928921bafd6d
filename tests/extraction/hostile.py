"""Hostile .pt2 archives for the loading tests: a genuine torch.export.save of a tiny model,
rewritten so that loading it with torch alone would run a payload that creates a marker file.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.demo.digits import PREPROCESSING as DIGITS_PREPROCESSING
from workers.demo.digits import digits_cnn
from workers.extraction.models import PREPROCESSING_FILE
from workers.jobs import Preprocessing

__all__ = ["KINDS", "TRICKS", "genuine", "hostile", "trick"]

PREP = Preprocessing(size=(8, 8), channels=1)


class TinyNet(nn.Module):
    """A conv, a lifted tensor constant (so the archive has a constants entry) and logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(self.conv(x).mean((2, 3)) + torch.tensor([1.0, 2.0]))
        return logits


class _Payload:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def payload(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker), protocol=2)


def genuine(path: Path) -> Path:
    """A real torch.export.save of TinyNet with a dynamic batch and its preprocessing."""
    torch.manual_seed(0)
    program = torch.export.export(
        TinyNet().eval(), (torch.zeros(2, 1, 8, 8),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )  # fmt: skip
    torch.export.save(program, path, extra_files={PREPROCESSING_FILE: PREP.model_dump_json()})
    return path


Entries = dict[str, bytes]  # relative to the archive's root folder, in order


def _read(path: Path) -> tuple[str, Entries]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = names[0].split("/", 1)[0]
        return root, {n.split("/", 1)[1]: archive.read(n) for n in names}


def _write(path: Path, root: str, entries: Entries) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(f"{root}/{name}", data)
    return path


def _config(entries: Entries, name: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(entries[name])
    return config


WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"


def _weights_use_pickle(entries: Entries, evil: bytes) -> None:
    config = _config(entries, WEIGHTS_CONFIG)
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    entries[f"data/weights/{first['path_name']}"] = evil
    entries[WEIGHTS_CONFIG] = json.dumps(config).encode()


def _constants_use_pickle(entries: Entries, evil: bytes) -> None:
    config = _config(entries, CONSTANTS_CONFIG)
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    entries[f"data/constants/{first['path_name']}"] = evil
    entries[CONSTANTS_CONFIG] = json.dumps(config).encode()


def _object(prefix: str) -> Callable[[Entries, bytes], None]:
    def edit(entries: Entries, evil: bytes) -> None:
        config = _config(entries, CONSTANTS_CONFIG)
        config["config"]["evil"] = {
            "path_name": f"{prefix}0", "is_param": False, "use_pickle": True, "tensor_meta": None,
        }  # fmt: skip
        entries[f"data/constants/{prefix}0"] = evil
        entries[CONSTANTS_CONFIG] = json.dumps(config).encode()

    return edit


def _sample_inputs(entries: Entries, evil: bytes) -> None:
    entries["data/sample_inputs/model.pt"] = evil


def _legacy_weights(entries: Entries, evil: bytes) -> None:
    del entries[WEIGHTS_CONFIG]
    entries["data/weights/model.pt"] = evil


def _legacy_constants(entries: Entries, evil: bytes) -> None:
    del entries[CONSTANTS_CONFIG]
    entries["data/constants/model.pt"] = evil


def _program(edit: Callable[[dict[str, Any], Path], None]) -> Callable[[Entries, Path], None]:
    def apply(entries: Entries, marker: Path) -> None:
        program = json.loads(entries["models/model.json"])
        edit(program, marker)
        entries["models/model.json"] = json.dumps(program).encode()

    return apply


def _sympy(program: dict[str, Any], marker: Path) -> None:
    """Symbolic shapes are sympy text that torch evaluates."""
    code = f"__import__('os').system('touch {marker}')"
    text = json.dumps(program).replace("Symbol('s", f"{code} or Symbol('s", 1)
    program.clear()
    program.update(json.loads(text))


def _guards(program: dict[str, Any], marker: Path) -> None:
    program["guards_code"] = [f"__import__('os').system('touch {marker}')"]


def _graph_target(program: dict[str, Any], marker: Path) -> None:
    """A node calling os.system through the `torch.os` attribute, run on forward."""
    graph = program["graph_module"]["graph"]
    node: dict[str, Any] = {
        "target": "torch.os.system",
        "inputs": [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}],
        "outputs": [{"as_none": True}],
        "metadata": {},
        "is_hop_single_tensor_return": None,
        "name": "evil",
    }  # fmt: skip
    graph["nodes"].insert(0, node)


# kind -> how the archive is rewritten; each, loaded by torch.export.load alone, runs the payload
# (the sympy and graph kinds: torch evaluates text; the others: torch unpickles the payload).
_PICKLE_KINDS: dict[str, Callable[[Entries, bytes], None]] = {
    "weights marked use_pickle": _weights_use_pickle,
    "constants marked use_pickle": _constants_use_pickle,
    "sample inputs": _sample_inputs,
    "a custom object": _object("custom_obj_"),
    "an opaque object": _object("opaque_obj_"),
    "legacy pickled weights": _legacy_weights,
    "legacy pickled constants": _legacy_constants,
}
_TEXT_KINDS: dict[str, Callable[[Entries, Path], None]] = {
    "a symbolic shape": _program(_sympy),
    "guard code": _program(_guards),
    "a graph node calling os.system": _program(_graph_target),
}
KINDS = [*_PICKLE_KINDS, *_TEXT_KINDS]


def hostile(kind: str, path: Path, marker: Path) -> Path:
    """A genuine archive at `path`, rewritten to carry the `kind` payload."""
    root, entries = _read(genuine(path.with_suffix(".genuine.pt2")))
    if kind in _PICKLE_KINDS:
        _PICKLE_KINDS[kind](entries, payload(marker))
    else:
        _TEXT_KINDS[kind](entries, marker)
    return _write(path, root, entries)


def _legacy_format(path: Path, marker: Path) -> None:
    """The pre-2.7 layout: top-level files, the state dict a torch.save pickle."""
    root, entries = _read(genuine(path.with_suffix(".genuine.pt2")))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{root}/archive_format", b"pt2")
        archive.writestr("version", b"8.0")
        archive.writestr("serialized_exported_program.json", entries["models/model.json"])
        archive.writestr("serialized_state_dict.pt", payload(marker))
        archive.writestr("serialized_constants.pt", payload(marker))
        archive.writestr("serialized_example_inputs.pt", payload(marker))


def _rewrite(edit: Callable[[str, Entries, zipfile.ZipFile], None]) -> Callable[[Path, Path], None]:
    def build(path: Path, _marker: Path) -> None:  # the payload is in the edit, not a file
        root, entries = _read(genuine(path.with_suffix(".genuine.pt2")))
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            edit(root, entries, archive)

    return build


def _duplicate(root: str, entries: Entries, archive: zipfile.ZipFile) -> None:
    """Two weights configs: one reader takes the first, another the last."""
    for name, data in entries.items():
        archive.writestr(f"{root}/{name}", data)
    evil = dict(entries)
    _weights_use_pickle(evil, payload(Path("/nonexistent/marker")))
    archive.writestr(f"{root}/{WEIGHTS_CONFIG.upper()}", evil[WEIGHTS_CONFIG])


def _named(bad: str) -> Callable[[str, Entries, zipfile.ZipFile], None]:
    def edit(root: str, entries: Entries, archive: zipfile.ZipFile) -> None:
        for name, data in entries.items():
            archive.writestr(f"{root}/{name}", data)
        archive.writestr(bad.format(root=root), b"x")

    return edit


def _compressed(root: str, entries: Entries, archive: zipfile.ZipFile) -> None:
    for name, data in entries.items():
        archive.writestr(f"{root}/{name}", data, compress_type=zipfile.ZIP_DEFLATED)


def _aoti(root: str, entries: Entries, archive: zipfile.ZipFile) -> None:
    for name, data in entries.items():
        archive.writestr(f"{root}/{name}", data)
    archive.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")


# trick -> what it builds: archives that must be refused before torch reads them.
TRICKS: dict[str, Callable[[Path, Path], None]] = {
    "the pre-2.7 layout": _legacy_format,
    "a name given twice": _rewrite(_duplicate),
    "a '..' name": _rewrite(_named("{root}/extra/../models/x.json")),
    "an absolute name": _rewrite(_named("/{root}/x")),
    "an entry outside the root folder": _rewrite(_named("elsewhere/x")),
    "an entry it cannot classify": _rewrite(_named("{root}/data/weights/notes.bin")),
    "compressed entries": _rewrite(_compressed),
    "AOTInductor code": _rewrite(_aoti),
}


def trick(kind: str, path: Path, marker: Path) -> Path:
    TRICKS[kind](path, marker)
    return path


def hungry_net() -> nn.Module:
    """The bundled model carrying 2 GiB more: a loader that allocates what it is told to.
    Its weights are the bundled model's; the ballast is not part of its state."""
    net = digits_cnn()
    net.register_buffer("ballast", torch.ones(1 << 29), persistent=False)
    return net


hungry_net.preprocessing = DIGITS_PREPROCESSING  # type: ignore[attr-defined]


def sleepy_net() -> nn.Module:
    """A factory that never finishes: a loader stuck in a loop."""
    while True:
        time.sleep(1)
