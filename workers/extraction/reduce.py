"""Reductions applied on the device, before the copy to the host."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.errors import LayerError
from workers.jobs import ExtractionSpec, cap_spatial

__all__ = ["Reduced", "Reduction", "quantise"]

_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


@dataclass(frozen=True)
class Reduced:
    """What is stored for one layer and one batch, still on the device."""

    acts: torch.Tensor
    pooled: torch.Tensor
    top_index: torch.Tensor | None
    # uint8 storage: each stored channel's scale and offset over the batch, (C,) float32.
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None


# The levels of workers/storage/quantised.py (not imported: extraction imports no zarr).
LEVELS = 254
MISSING = 255


def quantise(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, C, ...) as uint8 levels with a per-channel scale and offset over the batch, on
    the device (workers/storage/quantised.py says the format; its `encode` is the twin).
    Maps of finite values, the usual case, take four passes: min, max, scale, cast."""
    x = acts.float()
    axes = (0, *range(2, x.dim()))
    if x.numel() and x.shape[0]:
        lo, hi = x.amin(dim=axes), x.amax(dim=axes)  # NaN or inf here: some value is not finite
    else:
        lo = hi = torch.full((x.shape[1],), float("nan"), device=x.device)
    finite = bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()) and x.numel() > 0
    if not finite:
        return _quantise_some_missing(x)
    scale = (hi - lo) / LEVELS
    inv = torch.where(scale > 0, 1 / torch.where(scale > 0, scale, 1.0), 0.0)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    # x * inv + (0.5 - lo * inv), truncated: round half up of (x - lo) / scale.
    levels = torch.addcmul((0.5 - lo * inv).view(shape), x, inv.view(shape))
    return levels.clamp_(0, LEVELS).to(torch.uint8), scale, lo


def _quantise_some_missing(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantise` where some values are NaN or infinite: those become MISSING, and each
    channel's range is that of its finite values (NaN scale and offset when it has none)."""
    finite = torch.isfinite(x)
    axes = (0, *range(2, x.dim()))
    if x.numel():
        lo = torch.where(finite, x, float("inf")).amin(dim=axes)
        hi = torch.where(finite, x, float("-inf")).amax(dim=axes)
    else:
        lo = hi = torch.zeros(x.shape[1], device=x.device)
    empty = ~torch.isfinite(lo)
    lo = torch.where(empty, float("nan"), lo)
    scale = torch.where(empty, float("nan"), (hi - lo) / LEVELS)
    inv = torch.where(scale > 0, 1 / torch.where(scale > 0, scale, 1.0), 0.0)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    levels = torch.addcmul((0.5 - lo * inv).view(shape), x, inv.view(shape))
    q = levels.nan_to_num_(0.0).clamp_(0, LEVELS).to(torch.uint8)
    q.masked_fill_(~finite, MISSING)
    return q, scale, lo


@dataclass(frozen=True)
class Reduction:
    channels: tuple[int, ...] | None = None
    top_k: int | None = None
    max_size: tuple[int, int] | None = None
    dtype: torch.dtype = torch.float16

    @classmethod
    def from_spec(cls, spec: ExtractionSpec) -> Reduction:
        dtype = {"float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}
        return cls(spec.channels, spec.top_k, spec.max_size, dtype[spec.dtype])

    def __call__(self, name: str, output: torch.Tensor) -> Reduced:
        spatial = output.dim() - 2
        # The per-channel spatial mean over all channels, always kept in float32.
        pooled = (
            output.float()
            if spatial == 0
            else output.float().mean(dim=tuple(range(2, 2 + spatial)))
        )
        acts = output
        top_index = None
        width = output.shape[1]
        if self.channels is not None:
            if max(self.channels) >= width:
                raise LayerError(
                    f"channel {max(self.channels)} asked of layer {name!r}, which has {width}"
                )
            index = torch.tensor(self.channels, device=output.device)
            acts = acts.index_select(1, index)
        elif self.top_k is not None:
            if self.top_k > width:
                raise LayerError(f"top_k={self.top_k} asked of layer {name!r}, which has {width}")
            top_index = pooled.topk(self.top_k, dim=1).indices
            shape = top_index.shape + (1,) * spatial
            acts = acts.gather(1, top_index.view(shape).expand(-1, -1, *acts.shape[2:]))
        if self.max_size is not None and spatial > 0:
            target = cap_spatial(tuple(acts.shape[2:]), self.max_size)
            if target != tuple(acts.shape[2:]):
                acts = _POOL[spatial](acts.float(), target)  # type: ignore[arg-type]
        if self.dtype == torch.uint8:
            q, scale, offset = quantise(acts)
            return Reduced(q, pooled, top_index, scale, offset)
        return Reduced(acts.to(self.dtype), pooled, top_index)
