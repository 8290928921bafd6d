"""Write-behind: batches are written (and marked done) by one background thread while the
caller decodes and computes the next. A bounded queue keeps memory to a few batches."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

from workers.storage.rows import BatchRows

__all__ = ["WriteBehind"]


class WriteBehind:
    """`put` hands a batch to the writer thread, blocking while `depth` wait. Leaving the
    block waits for every write and re-raises the first error the writer met."""

    def __init__(self, write: Callable[[int, BatchRows], None], depth: int = 2) -> None:
        self._write = write
        self._queue: queue.Queue[tuple[int, BatchRows] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="actmap-writer", daemon=True)

    def __enter__(self) -> WriteBehind:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:  # after a failure, drain without writing
                    self._write(*item)
            except BaseException as exc:  # re-raised in the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()

    def put(self, batch: int, rows: BatchRows) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((batch, rows))

    def flush(self) -> None:
        """Wait until every batch put so far is written."""
        self._queue.join()
        if self._error is not None:
            raise self._error

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._queue.put(None)
        try:
            self._thread.join()
        except BaseException:
            # Raised into this thread while it waits (Celery's soft time limit): the caller
            # may give up these batches next, so no write may still be going on behind it.
            self._thread.join()
            raise
        if self._error is not None and error is None:
            raise self._error
