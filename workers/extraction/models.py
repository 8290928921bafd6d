"""Model formats, fingerprints and the layer catalogue.

Models load only from torch.export archives, safetensors, or state dicts read with
`weights_only=True`; a pickled whole model is refused, never unpickled. An archive is read
into memory once and checked entry by entry (`archive.inspect_archive`) before torch sees
those same bytes (its sample inputs emptied, so torch unpickles nothing), and its graph may
call torch operators only.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import math
import operator
import pickle
import warnings
import zipfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.errors import LayerError, ModelError
from workers.extraction.archive import inspect_archive
from workers.extraction.hooks import Forward
from workers.extraction.receptive import FieldTracker
from workers.jobs import LayerInfo, ModelInfo, Preprocessing

__all__ = ["REGISTERED", "LoadedModel", "conv_weights", "load_model"]

log = logging.getLogger("actmap")

# Registered names: name -> (factory, weights file).
REGISTERED: dict[str, tuple[str, Path]] = {
    "digits-cnn": (
        "workers.demo.digits:digits_cnn",
        Path(__file__).parents[1] / "demo" / "digits_cnn.safetensors",
    ),
}
PREPROCESSING_FILE = "actmap/preprocessing.json"  # inside a .pt2 archive
_EXPORT_HOWTO = (
    "export it with torch.export.save(torch.export.export(model.eval(), (example,), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'model.pt2'), "
    "or save model.state_dict() with safetensors and pass --model package.module:factory"
)
# What an exported graph may call besides aten and prims operators and higher-order
# operators: the symbolic-shape arithmetic torch itself writes into graphs.
_SHAPE_OPS = frozenset({
    operator.eq, operator.ne, operator.le, operator.ge, operator.lt, operator.gt,
    operator.neg, operator.pos, operator.mul, operator.add, operator.sub, operator.floordiv,
    operator.mod, operator.pow, operator.truediv, operator.and_, operator.or_,
    operator.getitem, math.trunc, torch.sym_not, torch.sym_int, torch.sym_float,
    torch.sym_ite, torch.sym_max, torch.sym_min, torch.sym_sqrt,
})  # fmt: skip
_OP_NAMESPACES = ("aten", "prims")
_FILE_ARGUMENTS = {"filename", "file", "path"}  # aten.from_file reads any file on the host


@dataclass
class LoadedModel:
    """A model ready for forward passes: the module, what registration knows of it, and
    the frozen batch size of a naive export (run in slices of that size)."""

    module: nn.Module
    info: ModelInfo
    _warned: bool = field(default=False, repr=False)

    def run(
        self, forward: Forward, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward of `x` through `forward` (see hooks.capture), sliced when frozen."""
        frozen = self.info.frozen_batch
        if frozen is None or x.shape[0] == frozen:
            return forward(x)
        if not self._warned:
            self._warned = True
            log.warning(
                "model %s was exported with a frozen batch size of %d; running in slices of "
                "that size. Re-export with dynamic_shapes=({0: torch.export.Dim('batch')},) "
                "for full batches.",
                self.info.name,
                frozen,
            )
        n = x.shape[0]
        pad = (-n) % frozen
        if pad:
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
        parts = [forward(x[i : i + frozen]) for i in range(0, len(x), frozen)]
        logits = torch.cat([p[0] for p in parts])[:n]
        captured = {k: torch.cat([p[1][k] for p in parts])[:n] for k in parts[0][1]}
        return logits, captured


def load_model(
    ref: str,
    weights: str | None = None,
    preprocessing: Preprocessing | None = None,
    factories: Collection[str] | None = None,
    device: str = "cpu",
    check: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load `ref`: a `.pt2` path, `package.module:factory` (with `weights`), or a registered
    name. `factories`, when given, is the allow-list of factory references. `check`, when
    given, is called with the sha256 of the file's bytes before torch reads them (a worker
    passes one that loads a model it has not seen in a child process first)."""
    if ref in REGISTERED:
        ref, default_weights = REGISTERED[ref]
        weights = weights or str(default_weights)
        factories = None  # registered names are trusted by construction
    path = Path(ref)
    if path.suffix == ".pt2" or path.is_file():
        if weights:
            raise ModelError(f"--weights is for factories; {ref} is a file that holds its weights")
        module, info = _load_archive(path, preprocessing, check)
    elif ":" in ref:
        module, info = _load_factory(ref, weights, preprocessing, factories, check)
    else:
        raise ModelError(
            f"model {ref!r} is not a file, a package.module:factory or a registered name "
            f"({', '.join(sorted(REGISTERED))})"
        )
    return LoadedModel(module.to(device).eval(), info)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _refuse_pickle(path: Path) -> ModelError:
    """The message for a file that is not an export archive, after a safe look inside."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError):
        return ModelError(
            f"{path} holds a pickled model, which actmap never unpickles; {_EXPORT_HOWTO}"
        )
    if isinstance(obj, dict):
        return ModelError(
            f"{path} holds weights only; pass the architecture as --model package.module:factory "
            f"--weights {path}"
        )
    return ModelError(f"{path} is not a torch.export archive; {_EXPORT_HOWTO}")


def _load_archive(
    path: Path, override: Preprocessing | None, check: Callable[[str], None] | None
) -> tuple[nn.Module, ModelInfo]:
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    # One read: the bytes checked are the bytes hashed and the bytes torch loads, whatever
    # happens to the file meanwhile.
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if check is not None:  # before any parsing of bytes not seen to load cleanly
        check(digest)
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise _refuse_pickle(path)
    inspection = inspect_archive(data, str(path))
    if inspection is None:  # a torch.save file is a zip too; never hand it to the loader
        raise _refuse_pickle(path)
    data = _emptied(data, inspection.pickles)
    extra = {PREPROCESSING_FILE: ""}
    try:
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception as exc:  # torch raises many types for a broken archive
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path} cannot be read as a torch.export archive: {reason}") from exc
    _check_operators(program, path)
    user_inputs = program.graph_signature.user_inputs
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    if len(user_inputs) != 1:
        raise ModelError(f"{path} takes {len(user_inputs)} inputs; actmap needs one image tensor")
    shape = placeholders[user_inputs[0]].meta["val"].shape
    frozen = shape[0] if isinstance(shape[0], int) else None
    declared = _declared_preprocessing(path, extra[PREPROCESSING_FILE])
    prep = override or declared or _guess_preprocessing(path, shape)
    types = {
        fqn: cls.rsplit(".", 1)[-1]
        for node in program.graph.nodes
        for fqn, cls in (node.meta.get("nn_module_stack") or {}).values()
    }
    with warnings.catch_warnings():
        # torch 2.13's own unflatten trips its LeafSpec deprecation; not ours to act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        module = torch.export.unflatten(program)
    info = _catalogue(module, path.stem, "pt2", digest, prep, frozen, types)
    return module, info


def _emptied(data: bytes, names: tuple[str, ...]) -> bytes:
    """The archive with the entries `names` emptied. Torch reads an empty sample-inputs entry
    as none; so it unpickles nothing of the archive, not even with its weights-only
    unpickler, which has had its own code-execution bugs."""
    if not names:
        return data
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target,
    ):
        for info in source.infolist():
            target.writestr(info.filename, b"" if info.filename in names else source.read(info))
    return out.getvalue()


def _check_operators(program: torch.export.ExportedProgram, path: Path) -> None:
    """The graph may call aten and prims operators, higher-order operators and shape
    arithmetic; a graph node can name any callable reachable from `torch`, run on forward."""
    for graph_module in program.graph_module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        for node in graph_module.graph.nodes:
            if node.op in ("call_method", "call_module"):
                raise ModelError(f"{path} is refused: its graph has a {node.op} node")
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, torch._ops.HigherOrderOperator) or target in _SHAPE_OPS:
                continue
            if (
                isinstance(target, torch._ops.OpOverload)
                and target.namespace in _OP_NAMESPACES
                and not {a.name for a in target._schema.arguments} & _FILE_ARGUMENTS
            ):
                continue
            raise ModelError(
                f"{path} is refused: its graph calls {target!r}, which is not a torch operator "
                "actmap runs; export the model with torch.export.export from standard modules"
            )


def _declared_preprocessing(path: Path, inside: str) -> Preprocessing | None:
    beside = path.with_suffix(".preprocessing.json")
    text = inside or (beside.read_text() if beside.is_file() else "")
    if not text:
        return None
    try:
        return Preprocessing.model_validate_json(text)
    except ValueError as exc:
        raise ModelError(f"bad preprocessing declared for {path}: {exc}".splitlines()[0]) from exc


def _guess_preprocessing(path: Path, shape: Any) -> Preprocessing:
    channels, height, width = (int(s) for s in shape[1:4])
    if channels not in (1, 3):
        raise ModelError(f"{path} takes {channels} channels; declare its preprocessing")
    log.warning("%s declares no preprocessing; using [0, 1] scaling at %dx%d", path, height, width)
    return Preprocessing(size=(height, width), channels=channels)  # type: ignore[arg-type]


def _load_factory(
    ref: str,
    weights: str | None,
    override: Preprocessing | None,
    factories: Collection[str] | None,
    check: Callable[[str], None] | None,
) -> tuple[nn.Module, ModelInfo]:
    if factories is not None and ref not in factories:
        raise ModelError(f"factory {ref} is not on this server's allow-list")
    module_name, _, attr = ref.partition(":")
    try:
        factory: Callable[[], nn.Module] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import factory {ref}: {exc}") from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {ref} returned a {type(model).__name__}, not a torch module")
    if weights:
        if Path(weights).is_file() and check is not None:
            check(_sha256(Path(weights)))
        state = _read_weights(Path(weights))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise ModelError(f"weights {weights} do not fit {ref}: {first}") from exc
        digest = _sha256(Path(weights))
    else:
        digest = _state_digest(model)
    declared = getattr(factory, "preprocessing", None)
    if weights and declared is None:
        declared = _declared_preprocessing(Path(weights), "")
    prep = override or declared
    if prep is None:
        raise ModelError(
            f"factory {ref} declares no preprocessing; set {attr}.preprocessing or pass "
            "--input-size and --input-channels"
        )
    prep = _factory_declarations(factory, ref, prep)
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    return model, _catalogue(model, attr, "factory", digest, prep, None, types)


def _factory_declarations(factory: object, ref: str, prep: Preprocessing) -> Preprocessing:
    """A factory's `classes` and `input_kind` attributes, where its preprocessing (or the
    override) leaves them unsaid."""
    found = {
        key: getattr(factory, key)
        for key in ("classes", "input_kind")
        if getattr(prep, key) is None and getattr(factory, key, None) is not None
    }
    if not found:
        return prep
    try:
        return Preprocessing.model_validate({**prep.model_dump(), **found})
    except ValueError as exc:
        raise ModelError(f"bad declaration on factory {ref}: {exc}".splitlines()[0]) from exc


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise ModelError(f"{path} is not a valid safetensors file: {exc}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise _refuse_pickle(path) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} is not a state dict of tensors")
    return state


def _state_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _catalogue(
    model: nn.Module,
    name: str,
    fmt: str,
    digest: str,
    prep: Preprocessing,
    frozen: int | None,
    types: dict[str, str],
) -> ModelInfo:
    """One dry run at the declared input shape, recording every module's output."""
    x = torch.zeros(frozen or 1, *prep.input_shape)
    tracker = FieldTracker(x)
    rows: dict[str, LayerInfo] = {}
    calls: dict[str, int] = {}
    modules = {n: m for n, m in model.named_modules() if n}

    def record(layer: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, _inputs: object, output: object) -> None:
            calls[layer] = calls.get(layer, 0) + 1
            if layer in rows or not isinstance(output, torch.Tensor):
                return
            rf = tracker.field(output)
            rows[layer] = LayerInfo(
                name=layer,
                type=types.get(layer, type(module).__name__),
                output_shape=tuple(output.shape[1:]),
                params=sum(p.numel() for p in module.parameters()),
                receptive_field=rf[0] if rf else None,
                rf_stride=rf[1] if rf else None,
                rf_offset=rf[2] if rf else None,
            )

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in modules.items()]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.inference_mode(), tracker:
            out = model(x)
    except Exception as exc:
        shape = "x".join(map(str, prep.input_shape))
        raise ModelError(f"a dry run of {name} at input {shape} failed: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
        for module, flag in flags:
            module.training = flag
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{name} must return logits of shape (batch, classes); it returned {got}")
    return ModelInfo(
        name=name,
        format=fmt,  # type: ignore[arg-type]
        sha256=digest,
        preprocessing=prep,
        frozen_batch=frozen,
        classes=out.shape[1],
        layers=tuple(rows[n].model_copy(update={"calls": calls[n]}) for n in modules if n in rows),
    )


def conv_weights(model: LoadedModel, layer: str) -> torch.Tensor:
    """The weight tensor (out, in, *kernel) of a Conv1d/2d/3d layer, on the CPU."""
    modules = dict(model.module.named_modules())
    if layer not in modules:
        raise LayerError(f"unknown layer {layer!r}")
    kind = model.info.layer(layer).type if layer in model.info.layer_names() else ""
    weight = getattr(modules[layer], "weight", None)
    if kind not in ("Conv1d", "Conv2d", "Conv3d") or not isinstance(weight, torch.Tensor):
        raise LayerError(
            f"layer {layer!r} is a {kind or 'module'}, not a conv layer; "
            "filter weights exist for Conv1d, Conv2d and Conv3d"
        )
    return weight.detach().to("cpu", copy=True)  # a copy: callers may edit it in place
