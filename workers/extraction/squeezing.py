"""Feature squeezing (Xu, Evans and Qi 2018, "Feature Squeezing: Detecting Adversarial
Examples in Deep Neural Networks") and the benign corruptions a screening profile is fitted
against.

Owns torch transforms of images in [0, 1] pixel space (N, C, H, W):

* the two squeezers of the paper, bit-depth reduction and a 2 x 2 median filter, and
  `squeeze_distance`: the L1 distance between the softmax of an input and of each squeezed
  copy (the paper scores the maximum over squeezers). An attack's perturbation is fragile:
  squeezing undoes it and the prediction moves; noise of the same size leaves it put.
* `squeeze_distances`: the same two distances for a batch as extraction decodes it
  (normalised by the model's Preprocessing), which a job stores with `squeeze`.
* `benign_corruptions`: copies that are not attacks (Gaussian noise of several L2 sizes, a
  Gaussian blur, JPEG-like 8 x 8 DCT quantisation), so that a profile learns which scores
  rise for any input far from clean and do not tell an attack; `benign_copy` makes one of
  them for rows of a job, each sample's noise seeded by its row.

A model is a callable from pixels in [0, 1] to logits (its normalisation inside it), except
for `squeeze_distances`, whose callable takes the normalised input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.jobs import BENIGN_COPIES, Preprocessing

__all__ = [
    "benign_copy",
    "benign_corruptions",
    "bit_depth",
    "median_filter",
    "normalised",
    "pixels",
    "squeeze_distance",
    "squeeze_distances",
    "squeezers_for",
]

Model = Callable[[Tensor], Tensor]
# Per-pixel standard deviations of the benign noise, in [0, 1] pixel units: the L2 size of a
# copy is this times sqrt(pixels), so it scales with the input like a perturbation does.
NOISE_STDS = (0.05, 0.1, 0.2, 0.3)
BLUR_SIGMA = 1.0
JPEG_STEP = 0.25  # quantisation step of the orthonormal 8 x 8 DCT coefficients
# A job's benign noise: sample row r's draw for NOISE_STDS[j] comes from a generator seeded
# ROW_SEED + r * len(NOISE_STDS) + j, whatever batch the row runs in.
ROW_SEED = 1 << 32


def squeezers_for(channels: int) -> tuple[int, int]:
    """(bits, median window) as the paper chose them: 1 bit and 2 x 2 for grayscale digits
    (MNIST), 5 bits and 2 x 2 for colour images (CIFAR-10, ImageNet)."""
    return (1, 2) if channels == 1 else (5, 2)


def bit_depth(x: Tensor, bits: int) -> Tensor:
    """Pixels rounded to 2**bits levels in [0, 1]."""
    levels = 2**bits - 1
    squeezed: Tensor = torch.round(x * levels) / levels
    return squeezed


def median_filter(x: Tensor, size: int) -> Tensor:
    """Median over a size x size window (the lower middle for even sizes), same shape;
    edges padded by reflection, extra padding on the right and bottom for even sizes."""
    if size < 2:
        return x
    left, right = (size - 1) // 2, size // 2
    padded = F.pad(x, (left, right, left, right), mode="reflect")
    windows = padded.unfold(2, size, 1).unfold(3, size, 1)
    median: Tensor = windows.reshape(*windows.shape[:4], -1).median(dim=-1).values
    return median


@torch.inference_mode()
def squeeze_distance(
    model: Model, x: Tensor, bits: int, median: int, logits: Tensor | None = None
) -> Tensor:
    """(n, 2): L1 distance between softmax(model(x)) and softmax(model(squeezed x)), for
    bit-depth reduction then the median filter; `logits`, when given, are model(x)'s."""
    p = (model(x) if logits is None else logits).float().softmax(dim=1)
    out = [
        (model(squeezed).float().softmax(dim=1) - p).abs().sum(dim=1)
        for squeezed in (bit_depth(x, bits), median_filter(x, median))
    ]
    return torch.stack(out, dim=1)


def _affine(prep: Preprocessing, like: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, std) as (1, C, 1, 1) tensors in `like`'s dtype and device, both divided by
    255 * scale: normalised = (pixels - mean) / std, pixels in [0, 1] for 8-bit images."""
    factor = 255.0 * prep.scale
    shape = (1, -1, 1, 1)
    mean = torch.tensor(prep.mean, dtype=like.dtype, device=like.device).reshape(shape)
    std = torch.tensor(prep.std, dtype=like.dtype, device=like.device).reshape(shape)
    return mean / factor, std / factor


def pixels(x: Tensor, prep: Preprocessing) -> Tensor:
    """A batch as decode() returns it (normalised by `prep`) back in pixel space."""
    mean, std = _affine(prep, x)
    return x * std + mean


def normalised(v: Tensor, prep: Preprocessing) -> Tensor:
    """Pixels as decode() would hand them to the model: the inverse of `pixels`."""
    mean, std = _affine(prep, v)
    return (v - mean) / std


@torch.inference_mode()
def squeeze_distances(
    run: Callable[[Tensor], Tensor],
    x: Tensor,
    prep: Preprocessing,
    logits: Tensor | None = None,
) -> Tensor:
    """(n, 2) float32 `squeeze_distance` of a batch x (n, C, H, W) normalised as decode()
    returns it, `run` the model on such input. The squeezers act in pixel space (the
    normalisation undone, then redone for `run`), as the paper's; `logits`, when given, are
    run(x)'s and save a forward. Two forwards, without hooks."""
    bits, median = squeezers_for(x.shape[1])

    def on_pixels(v: Tensor) -> Tensor:
        return run(normalised(v, prep))

    found = squeeze_distance(on_pixels, pixels(x, prep), bits, median, logits)
    return found.float()


def _blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _dct_matrix(n: int) -> Tensor:
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.float()


def _jpeg_like(x: Tensor, step: float, block: int = 8) -> Tensor:
    """Each 8 x 8 block's orthonormal DCT coefficients rounded to multiples of `step`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % block, (-w) % block
    padded = F.pad(x, (0, pw, 0, ph), mode="replicate")
    d = _dct_matrix(block).to(x)
    tiles = padded.unfold(2, block, block).unfold(3, block, block)
    coef = d @ tiles @ d.T
    back = d.T @ (torch.round(coef / step) * step) @ d
    n, c, bh, bw = back.shape[:4]
    image = back.permute(0, 1, 2, 4, 3, 5).reshape(n, c, bh * block, bw * block)
    return image[..., :h, :w].clamp(0.0, 1.0)


def _corrupted(name: str, x: Tensor, noise: Callable[[int], Tensor]) -> Tensor:
    """Copy `name` of BENIGN_COPIES; `noise(j)` draws x's noise for NOISE_STDS[j]."""
    if name == f"blur-{BLUR_SIGMA}":
        return _blur(x, BLUR_SIGMA)
    if name == f"jpeg-{JPEG_STEP}":
        return _jpeg_like(x, JPEG_STEP)
    j = [f"noise-{std}" for std in NOISE_STDS].index(name)
    return (x + NOISE_STDS[j] * noise(j).to(x)).clamp(0.0, 1.0)


def benign_corruptions(x: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
    """Copies of pixels x in [0, 1] that change it without attacking the model: Gaussian
    noise at each of NOISE_STDS (clipped to [0, 1]), a blur and JPEG-like quantisation,
    named as BENIGN_COPIES."""
    return {
        name: _corrupted(name, x, lambda _: torch.randn(x.shape, generator=generator))
        for name in BENIGN_COPIES
    }


def benign_copy(name: str, x: Tensor, rows: Sequence[int]) -> Tensor:
    """Copy `name` of BENIGN_COPIES of pixels x (n, C, H, W), sample i being row rows[i] of
    its job: each sample's noise is drawn from its row's own generator (ROW_SEED), so a copy
    is the same bytes whichever batch, half-batch or neighbours the row runs with."""

    def noise(j: int) -> Tensor:
        seeds = [ROW_SEED + row * len(NOISE_STDS) + j for row in rows]
        shape = x.shape[1:]
        draws = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(draws) if draws else torch.zeros(x.shape)

    return _corrupted(name, x, noise)
