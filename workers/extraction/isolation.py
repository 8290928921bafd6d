"""A model's first load, in a child process with a memory and a time limit.

Registration, and a worker's first load of model bytes it has not seen load cleanly, run
`load_model` in a fresh interpreter (`python -m workers.extraction.isolation`: started by
fork and exec, so safe while the worker holds threads; nothing of the worker's state or
main module is re-run in it) whose address space is capped (RLIMIT_AS) before torch is
imported, and which is killed at the deadline. A loader bug, an allocation bomb or a hang
costs that child; the caller gets a ModelError. Request and answer are JSON, never a
pickle, so a child that went wrong cannot reach the caller.

This module imports no torch.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

from workers.errors import ModelError, UserError
from workers.jobs import ModelInfo, Preprocessing

__all__ = ["ChildLimits", "Verdicts", "load_in_child"]

_ANSWER_BYTES = 16 << 20  # a catalogue is kilobytes; more is a child gone wrong


@dataclass(frozen=True)
class ChildLimits:
    """The child's address-space cap and its deadline."""

    memory_mb: int = 8192
    timeout_s: float = 120.0


@dataclass(frozen=True)
class _Request:
    ref: str
    weights: str | None
    preprocessing: str | None  # JSON
    factories: list[str] | None
    memory_mb: int


def load_in_child(
    ref: str,
    weights: str | None,
    preprocessing: Preprocessing | None,
    factories: list[str] | tuple[str, ...] | None,
    limits: ChildLimits,
) -> ModelInfo:
    """The catalogue of `ref` as `load_model` gives it, computed in a child with `limits`.
    Raises ModelError with one line when the model is refused, or the child dies or runs out
    of time."""
    request = _Request(
        ref, weights, preprocessing.model_dump_json() if preprocessing else None,
        list(factories) if factories is not None else None, limits.memory_mb,
    )  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),  # the same code as ours
        "CUDA_VISIBLE_DEVICES": "",  # CUDA reserves more address space than any cap
        # Every torch.load in the child is weights-only, whatever its caller asks for.
        "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1",
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", __name__], input=json.dumps(asdict(request)).encode(),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            timeout=limits.timeout_s, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:  # run() has killed and reaped the child
        raise ModelError(
            f"loading {ref} took longer than {limits.timeout_s:g} s, the limit for a first "
            "load (ACTMAP_MODEL_CHECK_TIMEOUT_S); it was stopped"
        ) from None
    lines = done.stdout[-_ANSWER_BYTES:].splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise ModelError(_died(ref, done.returncode, limits)) from None
    if not isinstance(answer, dict) or not ("error" in answer or "info" in answer):
        raise ModelError(_died(ref, done.returncode, limits))
    if "error" in answer:
        raise ModelError((str(answer["error"]).splitlines() or ["refused"])[0])
    return ModelInfo.model_validate(answer["info"])


def _died(ref: str, code: int, limits: ChildLimits) -> str:
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    return (
        f"loading {ref} stopped the loader ({how}); it may need more than the "
        f"{limits.memory_mb} MiB a first load may use (ACTMAP_MODEL_CHECK_MEMORY_MB)"
    )


def _child_main() -> None:
    """In the child: cap the address space, then load; one JSON answer on stdout."""
    request = _Request(**json.loads(sys.stdin.buffer.read()))
    cap = request.memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    answer: dict[str, Any]
    try:
        from workers.extraction.models import load_model

        prep = request.preprocessing
        info = load_model(
            request.ref,
            request.weights,
            Preprocessing.model_validate_json(prep) if prep else None,
            request.factories,
        ).info
        answer = {"info": info.model_dump(mode="json")}
    except UserError as exc:
        answer = {"error": str(exc)}
    except MemoryError:
        answer = {"error": f"loading {request.ref} needed more than {request.memory_mb} MiB"}
    except Exception as exc:  # a loader failure on hostile bytes is the model's fault
        text = str(exc).strip().splitlines()
        if text and "alloc" in text[0].lower():
            answer = {"error": f"loading {request.ref} needed more than {request.memory_mb} MiB"}
        else:
            reason = text[0] if text else type(exc).__name__
            answer = {"error": f"loading {request.ref} failed: {reason}"}
    sys.stdout.write("\n" + json.dumps(answer) + "\n")
    sys.stdout.flush()


@dataclass
class Verdicts:
    """The model bytes (by sha256) this process has seen load cleanly in a child."""

    limits: ChildLimits
    _clean: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._clean

    def check(
        self,
        digest: str,
        ref: str,
        weights: str | None,
        preprocessing: Preprocessing | None,
        factories: list[str] | tuple[str, ...] | None,
    ) -> None:
        """Return when `digest` is known clean, after a child load if it is new. Raises
        ModelError when the child refuses it, or loaded other bytes than `digest`."""
        with self._lock:
            if digest in self._clean:
                return
        info = load_in_child(ref, weights, preprocessing, factories, self.limits)
        if info.sha256 != digest:
            raise ModelError(f"{ref} changed while it was being checked; submit again")
        with self._lock:
            self._clean.add(digest)


if __name__ == "__main__":
    _child_main()
