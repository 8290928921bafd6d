"""Receptive field size and stride of every tensor in one forward, tracked at the aten level.

A dispatch mode sees every operator, the functional ones included (a residual `x + y`,
`torch.flatten`), and the same operators whether the model is eager or a torch.export
archive. Convolutions and pools grow the field; ops that keep the spatial shape pass it on
(the widest input wins, for a residual add); anything else (flatten, global pooling,
upsampling) ends it, since the conv/pool chain no longer defines one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Field", "FieldTracker"]

# (size, stride, offset) per spatial dimension, in input pixels: output position i sees
# input pixels [offset + i * stride, offset + i * stride + size); a negative offset is
# padding, the field reaching past the input's border.
Field = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "convolution_overrideable"}
_MAX_POOL = {
    "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "max_pool1d_with_indices",
}  # fmt: skip
_AVG_POOL = {"avg_pool1d", "avg_pool2d", "avg_pool3d"}


def _per_dim(value: int | Sequence[int], n: int, default: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(value)
    if not values:
        return (default,) * n
    return values * n if len(values) == 1 else values


def _grow(
    field: Field,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dil: tuple[int, ...],
    pad: tuple[int, ...],
) -> Field:
    size, jump, start = field
    grown = tuple(s + (k - 1) * d * j for s, k, d, j in zip(size, kernel, dil, jump, strict=True))
    moved = tuple(o - p * j for o, p, j in zip(start, pad, jump, strict=True))
    return grown, tuple(j * s for j, s in zip(jump, stride, strict=True)), moved


def _padding(value: object, kernel: tuple[int, ...], dil: tuple[int, ...]) -> tuple[int, ...]:
    """The padding before the first position: ints as given, or conv's "valid"/"same"
    (PyTorch pads "same" by half the total, the odd pixel after)."""
    n = len(kernel)
    if value == "same":
        return tuple((k - 1) * d // 2 for k, d in zip(kernel, dil, strict=True))
    if value == "valid" or value is None:
        return (0,) * n
    return _per_dim(value, n, 0)  # type: ignore[arg-type]


class FieldTracker(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Tag tensors with their receptive field while a forward runs inside `with tracker:`."""

    def __init__(self, image: torch.Tensor) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._fields: dict[int, Field] = {}
        self._alive: list[torch.Tensor] = []  # keeps ids unique for the tracker's lifetime
        n = image.dim() - 2
        self._tag(image, ((1,) * n, (1,) * n, (0,) * n))

    def field(self, tensor: torch.Tensor) -> Field | None:
        return self._fields.get(id(tensor))

    def _tag(self, tensor: torch.Tensor, field: Field) -> None:
        self._fields[id(tensor)] = field
        self._alive.append(tensor)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, tuple | list) and out else out
        if isinstance(first, torch.Tensor) and first.dim() >= 3 and args:
            field = self._rule(func._overloadpacket.__name__, _bind(func, args, kwargs), first)
            if field is not None:
                self._tag(first, field)
        return out

    def _rule(self, op: str, bound: dict[str, Any], out: torch.Tensor) -> Field | None:
        src = bound.get("input", bound.get("self"))
        if not isinstance(src, torch.Tensor):
            return None
        field = self.field(src)
        n = out.dim() - 2
        if op in _CONV or op in _MAX_POOL or op in _AVG_POOL:
            if field is None or bound.get("transposed"):  # transposed convs end the chain
                return None
            if op in _CONV:
                kernel = tuple(bound["weight"].shape[2:])
                stride = _per_dim(bound["stride"], n, 1)
            else:
                kernel = _per_dim(bound["kernel_size"], n, 1)
                stride = _per_dim(bound["stride"], n, 0)  # empty means "same as the kernel"
                stride = kernel if 0 in stride else stride
            dil = _per_dim(bound.get("dilation", 1), n, 1)
            pad = _padding(bound.get("padding", 0), kernel, dil)
            return _grow(field, kernel, stride, dil, pad)
        # Shape-keeping ops (activations, norms, residual adds) pass the widest field on.
        fields = [
            f
            for a in bound.values()
            if isinstance(a, torch.Tensor)
            and a.shape[1:] == out.shape[1:]
            and (f := self.field(a)) is not None
        ]
        if not fields or len({f[1] for f in fields}) != 1:
            return None
        return max(fields, key=lambda f: f[0])


def _bind(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The operator's arguments by schema name, defaults filled in."""
    bound: dict[str, Any] = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif kwargs and arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound
