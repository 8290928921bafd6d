"""The lifecycle runs in the API and the CLI as well as in workers: importing any of it,
delivery included (its extractor is injected), loads no torch and no celery, and nothing
of `workers.execution`."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _loaded_after_importing_the_lifecycle() -> set[str]:
    found = pkgutil.iter_modules([str(ROOT / "workers" / "lifecycle")])
    code = (
        "import sys\n"
        + "".join(f"import workers.lifecycle.{m.name}\n" for m in found)
        + "print(' '.join(sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return set(done.stdout.split())


def test_the_lifecycle_loads_no_torch_no_celery_and_nothing_of_execution() -> None:
    loaded = _loaded_after_importing_the_lifecycle()
    assert "workers.lifecycle.delivery" in loaded
    assert not loaded & {"torch", "celery"}, loaded & {"torch", "celery"}
    assert not {m for m in loaded if m.startswith("workers.execution")}
