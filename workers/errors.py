"""The one error root of actmap.

::

    ActmapError                   Raised for anything actmap reports on purpose.
    ├── UserError                 Raised when the caller can fix it; never retried.
    │   ├── SpecError             Raised when a job spec or option is impossible.
    │   ├── LayerError            Raised when a layer is unknown or unusable as asked.
    │   ├── ModelError            Raised when a model file, factory or weights cannot be used.
    │   ├── InputError            Raised when one sample cannot be decoded (a per-sample code).
    │   ├── NotFound              Raised when a job, analysis, model or layer asked for does not
    │   │                         exist for this caller (HTTP 404).
    │   └── Conflict              Raised when the request clashes with the object's state: a job
    │                             already finished, a quota or lock held (HTTP 409).
    └── TransientError            Raised when a retry may succeed (connection, CUDA OOM).

Every message is one line a person can act on. Tracebacks are for bugs.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ActmapError",
    "Conflict",
    "InputError",
    "LayerError",
    "ModelError",
    "REFUSALS",
    "NotFound",
    "SampleCode",
    "SpecError",
    "TransientError",
    "UserError",
]


class ActmapError(Exception):
    """Raised for anything actmap reports on purpose; the root of the tree."""


class UserError(ActmapError):
    """Raised when the caller can fix the cause; retrying would not help."""


class SpecError(UserError):
    """Raised when a job spec or an option is impossible."""


class LayerError(UserError):
    """Raised when a layer is unknown or cannot be used as asked."""


class ModelError(UserError):
    """Raised when a model file, factory or weights file cannot be loaded safely."""


class NotFound(UserError):
    """Raised when a job, analysis, model, layer or store asked for does not exist here."""


class Conflict(UserError):
    """Raised when a request clashes with the state of what it names; retrying as is won't help."""


class SampleCode(IntEnum):
    """Per-sample error codes stored in `error_code`; the table goes into the job's attrs."""

    OK = 0
    UNREADABLE = 1
    EMPTY = 2
    CORRUPT = 3
    WRONG_SHAPE = 4
    UNSUPPORTED = 5
    TOO_LARGE = 6
    COMPUTE = 7
    BATCH_FAILED = 8
    OUTSIDE_ROOTS = 9  # reached through a link, or no longer beneath the tenant's roots
    WRONG_KIND = 10  # not the kind of input the model reads (a README.txt among images)

    @classmethod
    def table(cls) -> dict[str, str]:
        return {str(int(c)): c.name.lower() for c in cls}


class InputError(UserError):
    """Raised when one sample cannot be decoded; carries the code stored for it."""

    def __init__(self, code: SampleCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class TransientError(ActmapError):
    """Raised when the same call may succeed later: a lost connection, CUDA out of memory."""


# What a worker answers instead of a result when the caller's request was refused (a task
# returns its refusal as data, by kind), and the error the caller raises for each.
REFUSALS: dict[str, type[ActmapError]] = {
    "not_found": NotFound,
    "user": UserError,
    "transient": TransientError,
}
