"""`actmap worker`: one Celery worker process per GPU (or N on the CPU), supervised.

This process never imports torch, so it can never initialise CUDA: each child is a fresh
`celery worker` with its own `CUDA_VISIBLE_DEVICES`. A child that dies is restarted; SIGTERM
and SIGINT are passed on so that the children shut down softly.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from workers.errors import UserError
from workers.execution.slots import Slot, list_gpus, slots
from workers.jobs import QUEUES
from workers.settings import Settings

__all__ = ["Supervisor", "command", "launch"]

log = logging.getLogger("actmap")


def command(slot: Slot, queues: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers.execution.worker_main", "worker",
        "--pool", "prefork", "--concurrency", "1", "--prefetch-multiplier", "1",
        "--hostname", slot.name, "--queues", ",".join(queues),
        "--without-gossip", "--without-mingle", "--loglevel", "INFO",
    ]  # fmt: skip


class Supervisor:
    """Start every slot, restart the ones that die, stop them all on request."""

    def __init__(self, slots: list[Slot], queues: list[str]) -> None:
        self.slots = slots
        self.queues = queues
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.stopping = False

    def _start(self, i: int) -> None:
        env = {**os.environ, **self.slots[i].environment()}
        self.procs[i] = subprocess.Popen(command(self.slots[i], self.queues), env=env)
        self.started[i] = time.monotonic()
        log.info("started %s (pid %d)", self.slots[i].name, self.procs[i].pid)

    def stop(self, signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:  # noqa: ARG002 (the signature the caller requires)
        self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # Celery's warm, soft shutdown

    def run(self) -> int:
        for i in range(len(self.slots)):
            self._start(i)
        while self.procs:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            found = [k for k, p in self.procs.items() if p.pid == pid]
            if not found:
                continue
            i = found[0]
            self.procs[i].returncode = os.waitstatus_to_exitcode(status)  # reaped here
            if self.stopping:
                del self.procs[i]
                continue
            quick = time.monotonic() - self.started[i] < 10
            self.failures[i] = self.failures.get(i, 0) + 1 if quick else 0
            delay = min(2.0 ** self.failures[i], 30.0) if quick else 0.0
            log.warning(
                "%s exited with %s; restarting in %.0f s",
                self.slots[i].name, self.procs[i].returncode, delay,
            )  # fmt: skip
            time.sleep(delay)
            if not self.stopping:
                self._start(i)
            else:
                del self.procs[i]
        return 0


def launch(settings: Settings, gpus: str | None, cpus: int | None, queues: str) -> int:
    if settings.broker_url is None:
        raise UserError("`actmap worker` needs ACTMAP_BROKER_URL (redis://...) and ACTMAP_STORE")
    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(chosen) - set(QUEUES))
    if unknown or not chosen:
        raise UserError(
            f"unknown queue {unknown[0] if unknown else '(none)'}; use {', '.join(QUEUES)}"
        )
    supervisor = Supervisor(slots(gpus, cpus, list_gpus() if gpus else []), chosen)
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)
    return supervisor.run()
