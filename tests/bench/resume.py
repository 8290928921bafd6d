"""Embedded `actmap jobs resume` against a fresh `actmap scan` of as many batches.

Run from the repository root (about a minute on 2 cores):

    .venv/bin/python tests/bench/resume.py [--samples 2000] [--batch-size 32] [--at 0.3]
        [--repeats 2] [--layers conv1,block1.conv1,conv3]

Writes `--samples` PNG digits (the bundled samples, repeated) into a temporary folder, then
for each repeat: starts `actmap scan` of all of them in a subprocess (embedded, the bundled
model `digits-cnn`), sends it SIGINT (Ctrl-C) once `--at` of its batches are in the ledger,
and times `actmap jobs resume` of the k batches left against `actmap scan` of k batches'
worth of the same files (an `@list.txt` of the first k * batch-size of them). Both are
whole commands in a new process, as a user runs them: imports, model load and all.
Printed: k, both times and resume/fresh per repeat (the issue's target: about 1.0 or
less).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers.lifecycle.state import status

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "workers" / "demo" / "samples"


def _files(folder: Path, n: int) -> list[Path]:
    bundled = sorted(SAMPLES.glob("*/*.png"))
    out = []
    for i in range(n):
        source = bundled[i % len(bundled)]
        target = folder / source.parent.name / f"{i:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        out.append(target)
    return out


def _env(store: Path) -> dict[str, str]:
    return {**os.environ, "ACTMAP_STORE": str(store), "PYTHONPATH": str(ROOT)}


def _interrupted(store: Path, inputs: list[str], at: float) -> str:
    """A job stopped by SIGINT once `at` of its batches are done; its id."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli.main", "scan", *inputs, "--json"],
        env=_env(store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    job = None
    while proc.poll() is None:
        time.sleep(0.05)
        jobs = store / "jobs"
        if job is None:
            found = [p.name for p in jobs.iterdir()] if jobs.is_dir() else []
            job = found[0] if found else None
            continue
        try:
            current = status(str(store), job)
        except Exception:  # noqa: BLE001 - planned part-way; read again
            continue
        if current.batches_done >= at * current.n_batches:
            proc.send_signal(signal.SIGINT)
            break
    proc.wait()
    if job is None:
        raise SystemExit("the scan finished before it could be interrupted")
    return job


def _timed(args: list[str], store: Path) -> float:
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "api.cli.main", *args, "--json"],
        env=_env(store),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--at", type=float, default=0.3, help="interrupt after this part")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers", default="conv1,block1.conv1,conv3")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="actmap-bench-resume-") as tmp:
        folder = Path(tmp) / "digits"
        files = _files(folder, args.samples)
        model = ["--model", "digits-cnn", "--layers", args.layers]
        model += ["--batch-size", str(args.batch_size)]
        print(f"{'k':>4} {'resume s':>9} {'fresh s':>8} {'resume/fresh':>13}")
        for r in range(args.repeats):
            store = Path(tmp) / f"store-{r}"
            job = _interrupted(store, [str(folder), *model], args.at)
            current = status(str(store), job)
            k = current.n_batches - current.batches_done
            resume = _timed(["jobs", "resume", job], store)
            listing = Path(tmp) / f"first-{r}.txt"
            listing.write_text("\n".join(map(str, files[: k * args.batch_size])) + "\n")
            fresh = _timed(["scan", f"@{listing}", *model], Path(tmp) / f"fresh-{r}")
            print(f"{k:>4} {resume:>9.1f} {fresh:>8.1f} {resume / fresh:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
