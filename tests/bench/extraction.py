"""Extraction throughput: actmap end to end against the bare forward pass and the naive
per-image way.

Run from the repository root:

    .venv/bin/python tests/bench/extraction.py [--images 256] [--repeats 3] [--stages]

On one set of seeded random 112 x 112 RGB PNGs and one ResNet-18-shaped model with random
weights (tests/bench/resnet.py), it measures images per second, interleaved and repeated
(A B C A B C ...) so that the noise of a shared machine falls on every method alike:

- bare:   the bar, which actmap should reach to 0.85x: the model's forward pass at batch 32
          under torch.inference_mode on tensors decoded beforehand; no decode, no hooks, no
          storage.
- seed:   the naive per-image way, which actmap should beat 4x: decode the PNG with Pillow
          once, then for each of layer1..layer4 register a forward hook on that layer, run
          the image alone (batch 1, torch.no_grad), remove the hook and np.save the output
          (float32) to a .npy file.
- actmap: workers.execution.embedded.scan (`--actmap runner`: plan + tests.oracle.run_job instead)
          into a fresh Zarr store each repeat, float16, batch 32, layers layer1..layer4:
          decode, forward, reduction, compression and writes. Shown twice: the whole call
          (model load, catalogue and plan included) and its run phase alone (from the plan
          callback to the call's return).

The CPU column is this process's CPU time (every thread) per run: with torch on every
core, each CPU-second that decoding and writing take shows up in the wall time. Inputs and
stores live under `--dir`, /dev/shm by default: the shared disk's writeback otherwise lands
on the writing method alone, at random (`--dir /tmp` measures with the disk).

Then the `actmap scan` CLI once as a subprocess (Python and torch startup included), the
store's bytes on disk per image and the compression ratio of the stored acts and pooled
arrays. `--gpu-host-model N` (3 by default, 0 skips) adds extra lines, labelled as such:
bare and actmap interleaved again with torch on one intra-op thread for both, a model of a
GPU host, whose forward leaves the host cores to decoding and writes. They are
information, not the target: the target is the main comparison. `--stages` adds each
pipeline stage timed alone, serially, in this thread, on the same inputs; `--profile` a
cProfile of that serial pass. Ratios come from one run; nothing here is an assertion.
Threads: torch's default (the machine's cores). A full garbage collection runs, untimed,
before every run. The load average is printed before and after: other processes on the
machine skew every figure.
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
import cProfile  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from tests.oracle import planned  # noqa: E402
from workers.execution.embedded import scan  # noqa: E402
from workers.extraction.cache import ModelCache  # noqa: E402
from workers.extraction.inputs import decode  # noqa: E402
from workers.jobs import ExtractionSpec, Preprocessing  # noqa: E402
from workers.pipeline import compute_batch, decode_batch, spec_of, store_batch  # noqa: E402
from workers.settings import Settings  # noqa: E402
from workers.storage.layout import open_job  # noqa: E402


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
FACTORY: str = resnet.FACTORY
LAYERS: tuple[str, ...] = resnet.LAYERS
PREPROCESSING: Preprocessing = resnet.PREPROCESSING

BATCH = 32


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n RGB PNGs of smooth random colour fields plus pixel noise, seeded."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    height, width = PREPROCESSING.size
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
        pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.png"
        Image.fromarray(pixels, "RGB").save(path)
        paths.append(path)
    return paths


def disk_bytes(path: Path) -> tuple[int, int]:
    """(apparent size, allocated size as du counts it) of every file under path."""
    apparent = allocated = 0
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


# --- the three methods -------------------------------------------------------------------


def run_bare(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), BATCH):
            model(x[i : i + BATCH])
    return time.perf_counter() - start


def _seed_decode(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.float32)
    mean = np.asarray(PREPROCESSING.mean, np.float32)
    std = np.asarray(PREPROCESSING.std, np.float32)
    array = (array * np.float32(PREPROCESSING.scale) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]


def run_seed(model: nn.Module, paths: list[Path], out: Path) -> float:
    """One hook, one batch-1 forward and one .npy per (image, layer)."""
    out.mkdir(parents=True, exist_ok=True)
    modules = dict(model.named_modules())
    start = time.perf_counter()
    for i, path in enumerate(paths):
        x = _seed_decode(path)
        for layer in LAYERS:
            captured: list[torch.Tensor] = []

            def hook(_m: nn.Module, _i: object, output: torch.Tensor) -> None:
                captured.append(output.detach().cpu())  # noqa: B023 (runs inside this iteration)

            handle = modules[layer].register_forward_hook(hook)
            try:
                with torch.no_grad():
                    model(x)
            finally:
                handle.remove()
            np.save(out / f"{i:05d}_{layer}.npy", captured[0][0].numpy())
    return time.perf_counter() - start


def actmap_spec(inputs: str, layers: tuple[str, ...] = LAYERS) -> ExtractionSpec:
    return ExtractionSpec(
        model=FACTORY, layers=layers, inputs=(inputs,), batch_size=BATCH, dtype="float16"
    )


def _field(result: Any, name: str) -> Any:
    """A field of the job's result: a Status dataclass, or a summary dict."""
    return result[name] if isinstance(result, dict) else getattr(result, name)


def _run_job(spec: ExtractionSpec, store: str, on_plan: Callable[[Any], None]) -> Any:
    """The in-process pipelined runner, without the embedded broker around it."""
    from tests.oracle import run_job

    settings = Settings()
    models = ModelCache(settings.device)
    job = planned(store, spec, models.get(spec).info)
    on_plan(job)
    return run_job(store, job.job_id, models, None, settings.decode_threads)


def run_actmap(kind: str, inputs: str, store: Path, timeout: float) -> tuple[float, float, str]:
    """Seconds for the whole call, seconds from the job's plan to the call's end (the run
    phase: model load, catalogue and plan excluded), and the job id. The call runs in a
    thread so that a job that never finishes ends the benchmark instead of hanging it."""
    plan_done: list[float] = []
    outcome: dict[str, Any] = {}

    def call() -> None:
        spec = actmap_spec(inputs)
        mark = lambda _plan: plan_done.append(time.perf_counter())  # noqa: E731
        try:
            if kind == "scan":
                outcome["result"] = scan(spec, str(store), Settings(), mark)
            else:
                outcome["result"] = _run_job(spec, str(store), mark)
        except BaseException as exc:  # re-raised below, in the main thread
            outcome["error"] = exc

    start = time.perf_counter()
    worker = threading.Thread(target=call, name="bench-actmap", daemon=True)
    worker.start()
    worker.join(timeout)
    end = time.perf_counter()
    if worker.is_alive():
        raise TimeoutError(f"actmap {kind} did not finish within {timeout:.0f} s (hung?)")
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    if _field(result, "state") != "succeeded":
        raise RuntimeError(f"actmap job ended {_field(result, 'state')}: {result}")
    return end - start, end - plan_done[0], str(_field(result, "job_id"))


def run_cli(inputs: Path, store: Path, timeout: float) -> float:
    """`actmap scan` in a subprocess; the factory's module is copied alone into a folder on
    its PYTHONPATH (not tests/bench, whose scripts would shadow standard modules)."""
    actmap = Path(sys.executable).with_name("actmap")
    factory_dir = store.parent / "factory"
    factory_dir.mkdir(exist_ok=True)
    shutil.copy(BENCH / "resnet.py", factory_dir / f"{resnet.MODULE}.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTMAP_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(factory_dir), env.get("PYTHONPATH")]))
    command = [
        str(actmap), "scan", str(inputs), "--model", FACTORY, "--layers", ",".join(LAYERS),
        "--out", str(store), "--batch-size", str(BATCH), "--dtype", "float16", "--json",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, check=False, timeout=timeout
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"actmap scan failed ({done.returncode}): {done.stderr.strip()}")
    state = json.loads(done.stdout.strip().splitlines()[-1])["state"]
    if state != "succeeded":
        raise RuntimeError(f"actmap scan ended {state}")
    return seconds


# --- what the store holds ----------------------------------------------------------------


def store_figures(store: Path, job_id: str, n: int) -> list[tuple[str, str]]:
    job = store / "jobs" / job_id
    apparent, allocated = disk_bytes(job)
    group = zarr.open_group(str(store), path=f"jobs/{job_id}", mode="r", use_consolidated=False)
    rows = [
        ("job dir, du (allocated) / image", f"{allocated / n / 1024:,.1f} KiB"),
        ("job dir, apparent size / image", f"{apparent / n / 1024:,.1f} KiB"),
    ]
    raw_total = stored_total = 0
    for layer in LAYERS:
        raw = stored = 0
        for name in ("acts", "pooled"):
            arr = group[f"layers/{layer}/{name}"]
            assert isinstance(arr, zarr.Array)
            raw += arr.nbytes
            stored += disk_bytes(job / "layers" / layer / name)[0]
        raw_total += raw
        stored_total += stored
        rows.append((f"  {layer} acts+pooled: raw / on disk", f"{raw / stored:.2f}x"))
    rows.append(("acts+pooled, all layers: raw / on disk", f"{raw_total / stored_total:.2f}x"))
    rows.append(("acts+pooled raw (float16 acts, float32 pooled) / image",
                 f"{raw_total / n / 1024:,.1f} KiB"))  # fmt: skip
    return rows


# --- optional diagnostics ----------------------------------------------------------------


def stages(
    inputs: str, store: Path, repeats: int, profiler: cProfile.Profile | None = None
) -> list[tuple[str, float]]:
    """Each stage of the pipeline alone, serially in this thread, over every batch (best
    of `repeats`); the first pass under `profiler` when given."""
    settings = Settings()
    models = ModelCache(settings.device)
    spec = actmap_spec(inputs)
    t0 = time.perf_counter()
    model = models.get(spec)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    job = planned(str(store), spec, model.info)
    plan_s = time.perf_counter() - t0
    group = open_job(str(store), job.job_id)
    spec = spec_of(group)
    best: dict[str, float] = {}
    for r in range(repeats):
        times = {"decode_batch (1 thread)": 0.0, "compute_batch": 0.0, "store_batch": 0.0}
        if profiler is not None and r == 0:
            profiler.enable()
        for b in range(job.n_batches):
            t0 = time.perf_counter()
            decoded = decode_batch(group, spec, model.info, b)
            t1 = time.perf_counter()
            rows = compute_batch(model, spec, decoded)
            t2 = time.perf_counter()
            store_batch(group, b, rows)
            t3 = time.perf_counter()
            times["decode_batch (1 thread)"] += t1 - t0
            times["compute_batch"] += t2 - t1
            times["store_batch"] += t3 - t2
        if profiler is not None and r == 0:
            profiler.disable()
        for k, v in times.items():
            best[k] = min(best.get(k, float("inf")), v)
    serial = sum(best.values())
    return [("model load + catalogue", load), ("plan", plan_s), *best.items(), ("sum", serial)]


def gpu_host_model(model: nn.Module, x: torch.Tensor, inputs: str, tmp: Path, args: Any) -> str:
    """Extra information, not the target: bare and actmap interleaved again with torch on
    one intra-op thread for both, so that the forward leaves a core to decoding and writes,
    as a GPU host's forward leaves its host cores. On this machine the main lines above
    are the target: there the forward takes every core, and every CPU-second that decoding
    and writing take shows up in the wall time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"bare": [], "actmap": [], "actmap run": []}
    try:
        run_bare(model, x[:BATCH])  # warm the one-thread primitives
        for r in range(args.gpu_host_model):
            gc.collect()  # as in the main loop
            times["bare"].append(run_bare(model, x))
            gc.collect()
            total, run, _ = run_actmap(args.actmap, inputs, tmp / f"store-1t-{r}", args.timeout)
            times["actmap"].append(total)
            times["actmap run"].append(run)
    finally:
        torch.set_num_threads(before)
    n = len(x)
    best = {name: n / min(t) for name, t in times.items()}
    rows: list[tuple[str, ...]] = [
        ("GPU-host model (extra, not the target): torch 1 thread", "best img/s", "runs (s)")
    ]
    labels = {
        "bare": "bare forward, 1 torch thread",
        "actmap": f"actmap ({args.actmap}), whole call, 1 torch thread",
        "actmap run": f"actmap ({args.actmap}), run phase, 1 torch thread",
    }
    for name, label in labels.items():
        rows.append((label, f"{best[name]:,.1f}", " ".join(f"{t:.2f}" for t in times[name])))
    for name in ("actmap", "actmap run"):
        rows.append((f"  {name} / bare, both 1 thread", f"{best[name] / best['bare']:.2f}x", ""))
    return _table(rows)


# --- dtype x compression against Captum (`--grid`) ------------------------------------------

GRID = tuple((d, c) for d in ("float16", "uint8") for c in ("zstd", "lz4", "none"))


def make_arrays(folder: Path, n: int) -> list[Path]:
    """n `.npy` inputs: the images of make_images, decoded and normalised once, so that
    both sides read the same float32 arrays and neither pays for PNG decoding."""
    images = make_images(folder.parent / "grid-png", n)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for png in images:
        path = folder / f"{png.stem}.npy"
        np.save(path, decode(str(png), PREPROCESSING))
        paths.append(path)
    shutil.rmtree(folder.parent / "grid-png")
    return paths


def run_captum(model: nn.Module, paths: list[Path], out: Path) -> float:
    """Captum's LayerActivation on the four layers, batch 32, each batch's layer written as
    one float16 `.npy` (the cheapest per-file way a Captum user would store them)."""
    from captum.attr import LayerActivation

    modules = dict(model.named_modules())
    method = LayerActivation(model, [modules[name] for name in LAYERS])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i in range(0, len(paths), BATCH):
        x = torch.from_numpy(np.stack([np.load(p) for p in paths[i : i + BATCH]]))
        found = method.attribute(x)
        for name, acts in zip(LAYERS, found, strict=True):
            assert isinstance(acts, torch.Tensor)
            np.save(out / f"{i // BATCH:05d}_{name}.npy", acts.detach().half().numpy())
    return time.perf_counter() - start


def grid_spec(inputs: str, dtype: str, compression: str) -> ExtractionSpec:
    return ExtractionSpec(
        model=FACTORY, layers=LAYERS, inputs=(inputs,), batch_size=BATCH, input_kind="array",
        dtype=dtype, compression=compression,  # type: ignore[arg-type]
    )  # fmt: skip


def run_grid_scan(spec: ExtractionSpec, store: Path) -> tuple[float, float]:
    """An embedded scan: (seconds of the whole call, seconds from its plan to its end)."""
    planned: list[float] = []
    start = time.perf_counter()
    result = scan(spec, str(store), Settings(), lambda _p: planned.append(time.perf_counter()))
    end = time.perf_counter()
    if result.state != "succeeded":
        raise RuntimeError(f"actmap job ended {result.state}")
    return end - start, end - planned[0]


def grid(args: argparse.Namespace, tmp: Path) -> None:
    """Every {float16, uint8} x {zstd, lz4, none} scan beside Captum and the bare forward,
    interleaved, on the same `.npy` inputs; then, with `--grid-profile D,C`, a cProfile
    of that configuration's pipeline stages run serially."""
    n = args.images
    paths = make_arrays(tmp / "arrays", n)
    inputs = str(tmp / "arrays")
    model = resnet.resnet18()
    x = torch.from_numpy(np.stack([np.load(p) for p in paths]))
    warm = tmp / "warm-list.txt"
    warm.write_text("\n".join(map(str, paths[:BATCH])))
    run_bare(model, x[:BATCH])
    run_captum(model, paths[:BATCH], tmp / "captum-warm")
    run_grid_scan(grid_spec(f"@{warm}", "float16", "zstd"), tmp / "store-warm")
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}  # this process's CPU seconds, every thread
    sizes: dict[str, float] = {}

    def timed(name: str, method: Callable[[], float]) -> None:
        gc.collect()
        start = time.process_time()
        times.setdefault(name, []).append(method())
        cpu.setdefault(name, []).append(time.process_time() - start)

    for r in range(args.repeats):
        timed("bare", lambda: run_bare(model, x))
        timed("captum", lambda: run_captum(model, paths, tmp / "captum"))
        sizes["captum"] = disk_bytes(tmp / "captum")[0] / n
        shutil.rmtree(tmp / "captum")
        for dtype, codec in GRID:
            name, store = f"actmap {dtype} {codec}", tmp / f"store-{dtype}-{codec}"
            gc.collect()
            start = time.process_time()
            total, after_plan = run_grid_scan(grid_spec(inputs, dtype, codec), store)
            cpu.setdefault(name, []).append(time.process_time() - start)
            times.setdefault(name, []).append(total)
            times.setdefault(f"{name} run", []).append(after_plan)
            sizes[name] = sizes[f"{name} run"] = disk_bytes(store / "jobs")[0] / n
            shutil.rmtree(store)
        print(f"round {r + 1} done, load average {_load()}", flush=True)
    best = {name: n / min(t) for name, t in times.items()}
    median = {name: n / statistics.median(t) for name, t in times.items()}
    # CPU per image: steadier than wall time on a loaded machine, and what a CPU host's
    # forward, on every core, loses to everything else.
    per_image = {name: 1000 * statistics.median(c) / n for name, c in cpu.items()}
    rows: list[tuple[str, ...]] = [
        ("method", "best img/s", "/ bare", "/ captum", "median /captum", "CPU ms/img",
         "captum CPU / this", "KB / image", "runs (s)")
    ]  # fmt: skip
    for name, t in times.items():
        used = per_image.get(name)
        rows.append((
            name, f"{best[name]:,.1f}", f"{best[name] / best['bare']:.2f}x",
            f"{best[name] / best['captum']:.2f}x", f"{median[name] / median['captum']:.2f}x",
            "" if used is None else f"{used:.1f}",
            "" if used is None else f"{per_image['captum'] / used:.2f}x",
            f"{sizes[name] / 1000:,.1f}" if name in sizes else "",
            " ".join(f"{v:.2f}" for v in t),
        ))  # fmt: skip
    print()
    print(_table(rows))
    if args.grid_profile:
        dtype, codec = args.grid_profile.split(",")
        profile_stages(grid_spec(inputs, dtype, codec), tmp / "store-profile", n)


# Where the pipeline's CPU goes, by the functions that own each part of a batch.
PARTS = {
    "decode (np.load into the batch)": "decode_batch",
    "forward + hooks + reduction (compute_batch)": "compute_batch",
    "  reduction: pooled means, top-k, dtype (Reduction.__call__)": "__call__",
    "  8-bit quantisation (quantise)": "quantise",
    "  copies to the host (_host)": "_host",
    "store_batch (encode + writes + ledger)": "store_batch",
    "  encode: the codecs (_encode)": "_encode",
    "  writes: files (_write)": "_write",
}


def profile_stages(spec: ExtractionSpec, store: Path, n: int) -> None:
    """Each stage of the pipeline serially in this thread under cProfile, summed over the
    job's batches; the cumulative seconds of the functions in PARTS."""
    models = ModelCache(Settings().device)
    model = models.get(spec)
    job = planned(str(store), spec, model.info)
    group = open_job(str(store), job.job_id)
    spec = spec_of(group)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    opened: dict[str, Any] = {}  # the job's arrays opened once, as a worker keeps them
    profiler.enable()
    for b in range(job.n_batches):
        batch = compute_batch(model, spec, decode_batch(group, spec, model.info, b))
        store_batch(group, b, batch, opened)
    profiler.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    cumulative: dict[str, float] = {}
    for (file, _line, func), row in stats.stats.items():  # type: ignore[attr-defined]
        if func in PARTS.values() and "workers" in file:
            cumulative[func] = cumulative.get(func, 0.0) + row[3]
    rows: list[tuple[str, ...]] = [
        (f"serial stages, {spec.dtype} {spec.compression}", "s", "ms / image")
    ]
    for label, func in PARTS.items():
        seconds = cumulative.get(func, 0.0)
        rows.append((label, f"{seconds:.3f}", f"{1000 * seconds / n:.2f}"))
    rows.append(("all, under the profiler (wall)", f"{wall:.3f}", f"{1000 * wall / n:.2f}"))
    print()
    print(_table(rows))
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(15)
    print(text.getvalue())


# --- the run -----------------------------------------------------------------------------


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256, help="number of input images")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each method")
    p.add_argument(
        "--actmap", choices=("scan", "runner"), default="scan",
        help="scan: workers.execution.embedded.scan; runner: plan + tests.oracle.run_job",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=600, help="seconds before a job is hung")
    p.add_argument("--stages", action="store_true", help="also time each pipeline stage alone")
    p.add_argument("--profile", action="store_true", help="also cProfile the serial stages")
    p.add_argument("--no-cli", action="store_true", help="skip the `actmap scan` subprocess")
    p.add_argument(
        "--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
        help="where the inputs and stores live (default /dev/shm: a shared disk's writeback "
        "is noise that falls on the writing method only)",
    )  # fmt: skip
    p.add_argument(
        "--gpu-host-model", type=int, default=3, metavar="REPEATS",
        help="extra lines, bare and actmap both on 1 torch thread (0: skip)",
    )  # fmt: skip
    p.add_argument(
        "--grid", action="store_true",
        help="instead: {float16, uint8} x {zstd, lz4, none} against Captum on .npy inputs",
    )  # fmt: skip
    p.add_argument(
        "--grid-profile", metavar="DTYPE,CODEC", help="with --grid: profile that scan's stages"
    )
    args = p.parse_args(argv)
    n = args.images
    if args.grid:
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} "
            f"cores; {n} .npy inputs 3x112x112, batch {BATCH}, layers {','.join(LAYERS)}, "
            f"{args.repeats} repeats; load average {_load()}",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="actmap-grid-", dir=args.dir) as tmp_name:
            grid(args, Path(tmp_name))
        print(f"load average at the end {_load()}")
        return 0

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
        f"zarr {zarr.__version__}; {n} images 112x112 RGB PNG, batch {BATCH}, layers "
        f"{','.join(LAYERS)}, {args.repeats} repeats, actmap via {args.actmap}, files under "
        f"{args.dir or tempfile.gettempdir()}; load average {_load()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="actmap-bench-", dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        paths = make_images(tmp / "images", n)
        inputs = str(tmp / "images")
        model = resnet.resnet18()
        x = torch.from_numpy(np.stack([decode(str(q), PREPROCESSING) for q in paths]))

        # Warm-up: oneDNN primitives, imports, the first Zarr store.
        warm = tmp / "warm-list.txt"
        warm.write_text("\n".join(map(str, paths[: min(n, BATCH)])))
        run_bare(model, x[:BATCH])
        run_seed(model, paths[:2], tmp / "seed-warm")
        run_actmap(args.actmap, f"@{warm}", tmp / "store-warm", args.timeout)

        times: dict[str, list[float]] = {"bare": [], "seed": [], "actmap": [], "actmap run": []}
        cpu: dict[str, list[float]] = {"bare": [], "actmap": []}  # this process, every thread
        job: dict[str, str] = {}

        def bare(_r: int) -> None:
            start = time.process_time()
            times["bare"].append(run_bare(model, x))
            cpu["bare"].append(time.process_time() - start)

        def seed(r: int) -> None:
            times["seed"].append(run_seed(model, paths, tmp / f"seed-{r}"))
            for f in (tmp / f"seed-{r}").iterdir():
                f.unlink()

        def actmap(r: int) -> None:
            start = time.process_time()
            total, run, job_id = run_actmap(args.actmap, inputs, tmp / f"store-{r}", args.timeout)
            cpu["actmap"].append(time.process_time() - start)
            times["actmap"].append(total)
            times["actmap run"].append(run)
            job["store"], job["id"] = str(tmp / f"store-{r}"), job_id

        for r in range(args.repeats):
            for method in (bare, seed, actmap):
                # Each run starts without the garbage of the runs before it (an embedded scan
                # leaves a Celery app behind): a full collection of it would land in whichever
                # run came next. One scan per process, as the CLI runs it, never pays that.
                gc.collect()
                method(r)

        def rate(name: str) -> tuple[float, float]:
            """(best, median) images/s."""
            return n / min(times[name]), n / statistics.median(times[name])

        rows: list[tuple[str, ...]] = [
            ("method", "best img/s", "median img/s", "runs (s)", "CPU s (median)")
        ]
        labels = {
            "bare": "bare forward, pre-decoded, batch 32 (the bar)",
            "seed": "per image: a hook per image x layer + batch 1 + np.save",
            "actmap": f"actmap ({args.actmap}), whole call",
            "actmap run": f"actmap ({args.actmap}), run phase (after plan)",
        }
        for name, label in labels.items():
            best, median = rate(name)
            runs = " ".join(f"{t:.2f}" for t in times[name])
            used = f"{statistics.median(cpu[name]):.2f}" if name in cpu else ""
            rows.append((label, f"{best:,.1f}", f"{median:,.1f}", runs, used))
        print()
        print(_table(rows))

        bare_best, seed_best = rate("bare")[0], rate("seed")[0]
        ratios: list[tuple[str, ...]] = [("ratio (best of each)", "value", "target")]
        for name in ("actmap", "actmap run"):
            ratios.append((f"{name} / bare", f"{rate(name)[0] / bare_best:.2f}x", ">= 0.85x"))
            ratios.append((f"{name} / seed", f"{rate(name)[0] / seed_best:.1f}x", ">= 4x"))
        print()
        print(_table(ratios))

        print()
        print(_table([("store", "value"), *store_figures(Path(job["store"]), job["id"], n)]))

        _optional_lines(args, model, x, tmp, bare_best)
        print(f"load average at the end {_load()}")
    return 0


def _optional_lines(
    args: argparse.Namespace, model: nn.Module, x: torch.Tensor, tmp: Path, bare_best: float
) -> None:
    """The lines the command line asks for beyond the main table: the CLI run, the GPU-host
    model, the stages alone."""
    n, inputs = args.images, str(tmp / "images")
    if not args.no_cli:
        print()
        try:
            seconds = run_cli(tmp / "images", tmp / "store-cli", args.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"`actmap scan` CLI FAILED: {str(exc).splitlines()[-1][:300]}")
        else:
            print(
                f"`actmap scan` CLI, one subprocess run (startup included): {seconds:.2f} s, "
                f"{n / seconds:,.1f} img/s"
            )
    if args.gpu_host_model:
        print()
        print(gpu_host_model(model, x, inputs, tmp, args))
    if args.stages or args.profile:
        profiler = cProfile.Profile() if args.profile else None
        timed = stages(inputs, tmp / "store-stages", args.repeats, profiler)
        rows: list[tuple[str, ...]] = [("stage, alone and serial", "seconds", "img/s")]
        rows += [(name, f"{s:.3f}", f"{n / s:,.1f}") for name, s in timed]
        rows.append(("bare forward (best, above)", f"{n / bare_best:.3f}", f"{bare_best:,.1f}"))
        print()
        print(_table(rows))
        if profiler is not None:
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            print()
            print(text.getvalue())


if __name__ == "__main__":
    sys.exit(main())
