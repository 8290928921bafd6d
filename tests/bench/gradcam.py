"""Grad-CAM throughput: a scan with `--gradcam` on one layer against the plain scan and
against Captum's LayerGradCam run batch by batch on the same inputs.

Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/gradcam.py [--images 1024] [--repeats 3]

Two models (`--model`): `digits`, the bundled `digits-cnn` on PNGs copied from its samples
(28 x 28 grey, labelled by folder; layers conv1 and conv3, Grad-CAM at conv3), and `resnet`,
the ResNet-18-shaped model of tests/bench/resnet.py on seeded random 112 x 112 RGB PNGs
(random labels; layers layer3 and layer4, Grad-CAM at layer4), where the forward pass, not
the decoding and writing, is most of a scan. It measures images per second, interleaved
and repeated (A B C D A B C D ...) so that the noise of a shared machine falls on every
method alike:

- plain:    workers.execution.embedded.scan of the two layers, batch 32, float16, into a
            fresh store each repeat: decode, forward (inference mode), writes.
- gradcam:  the same scan with `--gradcam` on the deeper layer (target: the prediction):
            the same pass plus one backward per batch from the logits to that layer, and
            the maps stored.
- captum:   Captum's LayerGradCam(model, layer).attribute(x, target=pred,
            relu_attributions=True) batch by batch (32) on tensors decoded beforehand (no
            decode, no storage: in its favour), the prediction from a forward first, as
            its API needs the target before it runs; the maps copied to numpy float16.
- captum-label: the same with the labels given as targets (no extra forward).

Besides the rates, it prints what Grad-CAM adds to a scan (gradcam time - plain time)
against Captum's time: the cost of the maps for someone who scans anyway.

Both scans are timed in their run phase (from the plan callback to the end: model load,
catalogue and plan excluded, as Captum's model is loaded once beforehand). Ratios come from
one run; nothing here is an assertion. The load average is printed before and after.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from captum.attr import LayerGradCam  # noqa: E402
from PIL import Image  # noqa: E402

from workers.demo.digits import PREPROCESSING  # noqa: E402
from workers.execution.embedded import scan  # noqa: E402
from workers.extraction.inputs import decode  # noqa: E402
from workers.extraction.models import load_model  # noqa: E402
from workers.jobs import ExtractionSpec, Preprocessing  # noqa: E402
from workers.settings import Settings  # noqa: E402

SAMPLES = ROOT / "workers" / "demo" / "samples"
BATCH = 32
# model: (model reference, layers, Grad-CAM layer)
MODELS = {
    "digits": ("digits-cnn", ("conv1", "conv3"), "conv3"),
    "resnet": ("actmap_bench_resnet:resnet18", ("layer3", "layer4"), "layer4"),
}


def _load_resnet() -> Preprocessing:
    """tests/bench/resnet.py under the module name its factory reference imports."""
    name = "actmap_bench_resnet"
    spec = importlib.util.spec_from_file_location(name, BENCH / "resnet.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {BENCH / 'resnet.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    prep: Preprocessing = module.PREPROCESSING
    return prep


def _random_inputs(folder: Path, n: int) -> tuple[list[Path], np.ndarray]:
    """n seeded random 112 x 112 RGB PNGs, and random labels of 10 classes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths, rng.integers(0, 10, n)


def _inputs(folder: Path, n: int) -> tuple[list[Path], np.ndarray]:
    """n PNGs cycled from the demo samples, in class folders, and their labels."""
    found = sorted(SAMPLES.rglob("*.png"))
    paths, labels = [], []
    for i in range(n):
        source = found[i % len(found)]
        target = folder / source.parent.name / f"{i:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        paths.append(target)
        labels.append(int(source.parent.name))
    return paths, np.asarray(labels)


def _scan(model: str, folder: Path, work: Path, gradcam: bool) -> float:
    """Seconds of the run phase of one embedded scan into a fresh store."""
    ref, layers, deep = MODELS[model]
    store = work / f"store-{time.monotonic_ns()}"
    spec = ExtractionSpec(
        model=ref, layers=layers, inputs=(str(folder),), batch_size=BATCH,
        labels_from_dirs=model == "digits", gradcam=(deep,) if gradcam else (),
    )  # fmt: skip
    planned: list[float] = []
    status = scan(spec, str(store), Settings(store=str(store)),
                  on_plan=lambda _job: planned.append(time.perf_counter()))  # fmt: skip
    end = time.perf_counter()
    if status.state != "succeeded":
        raise SystemExit(f"the scan ended {status.state}: {status.reason}")
    shutil.rmtree(store)
    return end - planned[0]


def _captum(
    model: torch.nn.Module, layer: str, x: torch.Tensor, labels: torch.Tensor | None
) -> float:
    explainer = LayerGradCam(model, dict(model.named_modules())[layer])
    kept = []
    start = time.perf_counter()
    for at in range(0, len(x), BATCH):
        batch = x[at : at + BATCH]
        if labels is None:
            with torch.no_grad():
                target = model(batch).argmax(dim=1)
        else:
            target = labels[at : at + BATCH]
        found = explainer.attribute(batch, target=target, relu_attributions=True)
        kept.append(found.detach()[:, 0].to(torch.float16).numpy())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="digits")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    args = p.parse_args(argv)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        f"model: {args.model}, torch threads: {torch.get_num_threads()}, "
        f"images: {args.images}, batch {BATCH}"
    )
    ref, _, deep = MODELS[args.model]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        if args.model == "resnet":
            prep = _load_resnet()
            paths, labels = _random_inputs(work / "in", args.images)
        else:
            prep = PREPROCESSING
            paths, labels = _inputs(work / "in", args.images)
        x = torch.from_numpy(np.stack([decode(str(q), prep) for q in paths]))
        module = load_model(ref, preprocessing=prep).module.eval()
        given = torch.from_numpy(labels)
        methods: dict[str, Callable[[], float]] = {
            "plain": lambda: _scan(args.model, work / "in", work, gradcam=False),
            "gradcam": lambda: _scan(args.model, work / "in", work, gradcam=True),
            "captum": lambda: _captum(module, deep, x, None),
            "captum-label": lambda: _captum(module, deep, x, given),
        }
        for run in methods.values():  # warm up: imports, allocator, model cache
            run()
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, run in methods.items():
                gc.collect()
                times[name].append(run())
    rate = {name: args.images / statistics.median(t) for name, t in times.items()}
    print(f"{'method':<14}  {'images/s (median)':>17}  runs (s)")
    for name, t in times.items():
        print(f"{name:<14}  {rate[name]:>17.0f}  {' '.join(f'{v:.3f}' for v in t)}")
    print(f"gradcam / plain:        {rate['gradcam'] / rate['plain']:.2f}x")
    print(f"gradcam / captum:       {rate['gradcam'] / rate['captum']:.2f}x")
    print(f"gradcam / captum-label: {rate['gradcam'] / rate['captum-label']:.2f}x")
    median = {name: statistics.median(t) for name, t in times.items()}
    added = median["gradcam"] - median["plain"]
    print(
        f"Grad-CAM's added time in the scan / Captum's time: {added / median['captum']:.2f}x "
        f"(captum-label: {added / median['captum-label']:.2f}x)"
    )
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
