"""Liveness and readiness files for a worker under a platform, instead of `celery inspect
ping` (a broadcast that imports the app per probe and leaves reply keys in Redis).

- `heartbeat`: touched on the worker's timer in the main process. A probe reads its age:
  a stopped or wedged main process stops touching it. A long task in the pool child does
  not, which is right: the task's hard time limit bounds the child.
- `ready`: present while the broker connection is up (a consumer step, stopped on a lost
  connection) and the pool child has imported torch and chosen its device, the model
  cache's part that can fail on a bad GPU node.

Once a shutdown begins `ready` goes and the heartbeat stops with the worker's event loop
while the pool finishes its task; the platform is already stopping the container then.
"""

from __future__ import annotations

import logging
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps
from celery.signals import worker_process_init

__all__ = ["HEARTBEAT", "READY", "install"]

HEARTBEAT = "heartbeat"
READY = "ready"
_CHILD = "child-up"  # the pool child has chosen its device

log = logging.getLogger("actmap")


def _touch(path: Path) -> None:
    with suppress(OSError):  # a full or vanished scratch volume must not stop the worker
        path.touch()


def _remove(path: Path) -> None:
    with suppress(OSError):
        path.unlink(missing_ok=True)


def install(app: Celery, directory: str, every_s: float) -> None:
    """Add the heartbeat and readiness steps to `app`'s workers, writing into `directory`."""
    where = Path(directory)
    connected = threading.Event()

    class Heartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
        requires = {"celery.worker.components:Timer", "celery.worker.components:Pool"}

        def __init__(self, worker: Any, **kwargs: Any) -> None:  # noqa: ARG002 (the signature the caller requires)
            # Before the pool forks: files a previous run left (a scratch volume outlives a
            # restarted container) must not pass the probes for this one.
            self.entry: Any = None
            for name in (READY, HEARTBEAT, _CHILD):
                _remove(where / name)

        def start(self, worker: Any) -> None:
            where.mkdir(parents=True, exist_ok=True)
            self.tick()
            self.entry = worker.timer.call_repeatedly(every_s, self.tick)

        def tick(self) -> None:
            _touch(where / HEARTBEAT)
            if connected.is_set() and (where / _CHILD).exists():
                _touch(where / READY)
            else:
                _remove(where / READY)

        def stop(self, worker: Any) -> None:  # noqa: ARG002 (the signature the caller requires)
            # Not ready from now on; the heartbeat goes stale by itself once the loop stops.
            if self.entry is not None:
                self.entry.cancel()
            _remove(where / READY)

    class Connected(bootsteps.StartStopStep):  # type: ignore[misc]
        requires = {"celery.worker.consumer.tasks:Tasks"}

        def start(self, consumer: Any) -> None:  # noqa: ARG002 (the signature the caller requires)
            connected.set()

        def stop(self, consumer: Any) -> None:  # noqa: ARG002 (the signature the caller requires); also on a lost connection, before a retry
            connected.clear()
            _remove(where / READY)

        shutdown = stop

    def child_up(**_: Any) -> None:
        # In a thread: the pool waits only seconds for a new child to report in.
        def warm() -> None:
            from workers.execution.slots import device

            log.info("worker child ready on %s", device())
            _touch(where / _CHILD)

        threading.Thread(target=warm, name="actmap-warm", daemon=True).start()

    worker_process_init.connect(child_up, weak=False)
    app.steps["worker"].add(Heartbeat)
    app.steps["consumer"].add(Connected)
