"""One worker process per GPU: discovery, pinning, device choice.

The launcher imports this module and must never initialise CUDA, so torch is imported only
inside the functions that run in a worker child.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from workers.errors import UserError

__all__ = ["Slot", "device", "list_gpus", "slots"]


@dataclass(frozen=True)
class Slot:
    """One worker process: its Celery hostname and the GPU it is pinned to (None: CPU)."""

    name: str
    gpu: int | None
    threads: int | None = None  # CPU workers share the cores instead of each taking all

    def environment(self) -> dict[str, str]:
        # An empty CUDA_VISIBLE_DEVICES hides every GPU from a CPU worker.
        env = {"CUDA_VISIBLE_DEVICES": "" if self.gpu is None else str(self.gpu)}
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env


def _nvidia_smi(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout


def list_gpus(run: Callable[[list[str]], str] = _nvidia_smi) -> list[int]:
    """GPU indices from nvidia-smi, without touching CUDA in this process."""
    if run is _nvidia_smi and shutil.which("nvidia-smi") is None:
        return []
    try:
        out = run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"])
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(line) for line in out.split() if line.strip().isdigit()]


def slots(
    gpus: str | None, cpus: int | None, available: list[int], host: str | None = None
) -> list[Slot]:
    """The worker processes `actmap worker --gpus ... | --cpu N` starts."""
    host = host or socket.gethostname()
    if (gpus is None) == (cpus is None):
        raise UserError("give either --gpus all|0,2 or --cpu N")
    if cpus is not None:
        if cpus < 1:
            raise UserError("--cpu needs at least 1 worker")
        threads = max(1, (os.cpu_count() or 1) // cpus)
        return [Slot(f"actmap-cpu{i}@{host}", None, threads) for i in range(cpus)]
    if not available:
        raise UserError("no NVIDIA GPU found on this host (nvidia-smi lists none); use --cpu N")
    if gpus == "all":
        chosen = available
    else:
        try:
            chosen = [int(g) for g in str(gpus).split(",") if g.strip()]
        except ValueError:
            raise UserError(f"--gpus takes 'all' or indices like 0,2, not {gpus!r}") from None
        missing = sorted(set(chosen) - set(available))
        if missing:
            raise UserError(f"GPU {missing[0]} is not on this host; it has {available}")
    return [Slot(f"actmap-gpu{g}@{host}", g) for g in chosen]


def device() -> str:
    """In a worker child: the one GPU it was pinned to, else the CPU."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"
