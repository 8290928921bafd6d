"""What else could make `--dtype uint8` maps smaller: lossless transforms and codecs before or
instead of zstd, on the real 8-bit maps of the bundled digits-cnn, and the entropy that bounds
them.

Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/uint8_codecs.py [--digits 1024] [--repeats 3]

The maps are those of `compression.py --uint8`: digits-cnn (trained) over `--digits` MNIST
digits, post-ReLU layers block1 and block2, quantised 32 samples at a time (one batch, one
chunk) by actmap's host encoder (workers.storage.quantised.encode, the device's twin). Each
candidate encodes every chunk on its own through numcodecs, as zarr would; printed: stored
bytes per value per layer and encode CPU nanoseconds per value (best of `--repeats`).
Candidates: zstd at levels 1/3/9, numcodecs' Delta along x, the same along y (a transpose
first), the chunk laid out channel-major (one channel's maps of the 32 samples contiguous;
zarr's TransposeCodec would do it), LZMA and BZ2. For scale, the same maps at float16 (with
and without the channel-major layout) and quantised to fewer levels (lossy: 127 down to 15).

The bound: order-0 entropy, bits per value, of the levels over the whole layer, per channel
of each chunk, per channel of each chunk given whether the left and upper neighbours are
zero, and of the residuals of x-deltas, y-deltas and the MED (LOCO-I) predictor per channel
of each chunk. A coder that codes each byte by such a table cannot beat these; zstd beats the
first ones by its long matches (constant background around a digit).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Python put this script's folder first on sys.path, where a sibling (tests/bench/api.py) would
# shadow a module of that name: take it off before importing anything else.
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import lzma  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numcodecs import BZ2, LZMA, Delta, Zstd  # type: ignore[import-untyped]  # noqa: E402

from tests.bench.compression import CHUNK, POST_RELU, activations, digit_images  # noqa: E402
from workers.extraction.models import load_model  # noqa: E402
from workers.storage.quantised import LEVELS, encode  # noqa: E402

Step = Callable[[np.ndarray], np.ndarray]


def _transposed(order: tuple[int, ...]) -> Step:
    return lambda q: np.ascontiguousarray(q.transpose(order))


CHANNEL_MAJOR = _transposed((1, 0, 2, 3))  # (channel, sample, y, x)
Y_LAST = _transposed((0, 1, 3, 2))  # Delta runs along the last axis: y
DELTA = Delta(dtype="u1")


def _lzma(*filters: dict[str, Any]) -> LZMA:
    return LZMA(format=lzma.FORMAT_RAW, filters=list(filters))


CANDIDATES: dict[str, tuple[tuple[Step, ...], Any]] = {
    "zstd 1 (actmap's)": ((), Zstd(level=1)),
    "zstd 3": ((), Zstd(level=3)),
    "zstd 9": ((), Zstd(level=9)),
    "delta x + zstd 1": ((DELTA.encode,), Zstd(level=1)),
    "delta y + zstd 1": ((Y_LAST, DELTA.encode), Zstd(level=1)),
    "channel-major + zstd 1": ((CHANNEL_MAJOR,), Zstd(level=1)),
    "channel-major + delta x + zstd 1": ((CHANNEL_MAJOR, DELTA.encode), Zstd(level=1)),
    "channel-major + zstd 9": ((CHANNEL_MAJOR,), Zstd(level=9)),
    "lzma 1": ((), _lzma({"id": lzma.FILTER_LZMA2, "preset": 1})),
    "lzma 6": ((), _lzma({"id": lzma.FILTER_LZMA2, "preset": 6})),
    "lzma delta x 1": (
        (),
        _lzma({"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": 1}),
    ),
    "bz2 9": ((), BZ2(level=9)),
}


def maps(n: int) -> dict[str, np.ndarray]:
    """Each post-ReLU layer's float32 maps over n MNIST digits."""
    demo = load_model("digits-cnn")
    prep = demo.info.preprocessing
    scaled = digit_images(n)[:, None].astype(np.float32) * np.float32(prep.scale)
    x = (scaled - np.float32(prep.mean[0])) / np.float32(prep.std[0])
    return activations(demo.module, POST_RELU, torch.from_numpy(x))


def _levels(a: np.ndarray, levels: int) -> np.ndarray:
    """actmap's code with `levels` steps instead of LEVELS (the lossy comparison)."""
    lo, hi = a.min(axis=(0, 2, 3)), a.max(axis=(0, 2, 3))
    step = np.where(hi > lo, (hi - lo) / levels, 1)[None, :, None, None]
    code: np.ndarray = np.floor((a - lo[None, :, None, None]) / step + 0.5)
    out: np.ndarray = np.clip(code, 0, levels).astype(np.uint8)
    return out


def bytes_and_cpu(
    chunks: list[np.ndarray], steps: tuple[Step, ...], codec: Any, repeats: int
) -> tuple[float, float]:
    """(stored bytes per value, best encode CPU ns per value) over the chunks."""
    best, size = float("inf"), 0
    for _ in range(repeats):
        start, size = time.process_time(), 0
        for q in chunks:
            for step in steps:
                q = step(q)
            size += len(codec.encode(np.ascontiguousarray(q)))
        best = min(best, time.process_time() - start)
    values = sum(q.size for q in chunks)
    return size / values, best / values * 1e9


def _entropy(v: np.ndarray) -> float:
    counts = np.unique(v, return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _conditional(v: np.ndarray, context: np.ndarray) -> float:
    return float(
        sum(_entropy(v[context == k]) * (context == k).sum() for k in np.unique(context)) / v.size
    )


def _med(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MED residuals (mod 256) of (..., y, x) levels, and each value's left and upper one."""
    q = q.astype(np.int16)
    left, up, corner = np.zeros_like(q), np.zeros_like(q), np.zeros_like(q)
    left[..., 1:] = q[..., :-1]
    up[..., 1:, :] = q[..., :-1, :]
    corner[..., 1:, 1:] = q[..., :-1, :-1]
    high, low = np.maximum(left, up), np.minimum(left, up)
    guess = np.where(corner >= high, low, np.where(corner <= low, high, left + up - corner))
    return (q - guess) % 256, left, up


def entropies(chunks: list[np.ndarray]) -> dict[str, float]:
    """Order-0 entropies, bits per value (see the module's docstring)."""
    whole = np.concatenate(chunks)
    sums = dict.fromkeys(("channel", "channel | zero neighbours", "x-delta", "y-delta", "MED"), 0.0)
    for q in chunks:
        residual, left, up = _med(q)
        dx = np.mod(np.diff(q.astype(np.int16), axis=-1, prepend=0), 256)
        dy = np.mod(np.diff(q.astype(np.int16), axis=-2, prepend=0), 256)
        for c in range(q.shape[1]):
            v, size = q[:, c].ravel(), q[:, c].size
            context = (left[:, c] == 0).ravel() * 2 + (up[:, c] == 0).ravel()
            sums["channel"] += _entropy(v) * size
            sums["channel | zero neighbours"] += _conditional(v, context) * size
            sums["x-delta"] += _entropy(dx[:, c]) * size
            sums["y-delta"] += _entropy(dy[:, c]) * size
            sums["MED"] += _entropy(residual[:, c]) * size
    return {"layer": _entropy(whole)} | {k: s / whole.size for k, s in sums.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digits", type=int, default=1024, help="MNIST digits (whole chunks of 32)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many encodes")
    args = p.parse_args(argv)
    found = maps(args.digits // CHUNK * CHUNK)
    chunks = {
        name: [a[i : i + CHUNK] for i in range(0, len(a), CHUNK)] for name, a in found.items()
    }
    levels = {name: [encode(c)[0] for c in parts] for name, parts in chunks.items()}
    for name, parts in levels.items():
        zeros = np.concatenate(chunks[name]) == 0
        kept = bool((np.concatenate(parts)[zeros] == 0).all())
        print(f"{name}: {zeros.mean():.1%} of values are ReLU zeros; all of them level 0: {kept}")
    print(f"\norder-0 entropy of the {LEVELS}-level maps, bits per value (0.3 bytes = 2.4 bits)")
    table = {name: entropies(parts) for name, parts in levels.items()}
    for key in next(iter(table.values())):
        print(f"  {key:28s}" + "".join(f"  {name} {t[key]:5.2f}" for name, t in table.items()))
    print(
        f"\n{'candidate':44s}"
        + "".join(f"  {n + ' B/val':>13s}" for n in levels)
        + "  encode ns/val"
    )
    rows: list[tuple[str, dict[str, list[np.ndarray]], tuple[Step, ...], Any]] = [
        (label, levels, steps, codec) for label, (steps, codec) in CANDIDATES.items()
    ]
    half = {n: [c.astype(np.float16) for c in parts] for n, parts in chunks.items()}
    rows += [("float16 zstd 1", half, (), Zstd(level=1))]
    rows += [("float16 channel-major + zstd 1", half, (CHANNEL_MAJOR,), Zstd(level=1))]
    for n in (127, 63, 31, 15):
        coarse = {name: [_levels(c, n) for c in parts] for name, parts in chunks.items()}
        rows.append((f"{n} levels (lossy) + zstd 1", coarse, (), Zstd(level=1)))
    for label, data, steps, codec in rows:
        figures = [bytes_and_cpu(parts, steps, codec, args.repeats) for parts in data.values()]
        cpu = sum(
            f[1] * sum(c.size for c in parts)
            for f, parts in zip(figures, data.values(), strict=True)
        )
        cpu /= sum(c.size for parts in data.values() for c in parts)
        print(f"{label:44s}" + "".join(f"  {f[0]:13.3f}" for f in figures) + f"  {cpu:13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
