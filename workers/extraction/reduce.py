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
    the device (workers/storage/quantised.py says the format; its `encode` is the twin)."""
    x = acts.float()
    finite = torch.isfinite(x)
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
    ok = finite.transpose(0, 1).reshape(x.shape[1], -1)
    inf = torch.tensor(float("inf"), device=x.device)
    if per_channel.shape[1]:
        lo = torch.where(ok, per_channel, inf).amin(dim=1)
        hi = torch.where(ok, per_channel, -inf).amax(dim=1)
    else:
        lo = hi = torch.zeros(x.shape[1], device=x.device)
    empty = ~torch.isfinite(lo)
    nan = torch.tensor(float("nan"), device=x.device)
    lo = torch.where(empty, nan, lo)
    scale = torch.where(empty, nan, (hi - lo) / LEVELS)
    positive = scale > 0
    inv = torch.where(positive, 1 / torch.where(positive, scale, 1.0), 0.0)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    levels = ((x - lo.view(shape)) * inv.view(shape)).round_()
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
