"""DESIGN.md's dependency rule: which packages may load torch, celery or zarr."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _modules(package: str) -> list[str]:
    path = ROOT / package.replace(".", "/")
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)])]


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return set(done.stdout.split())


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("api", {"torch", "celery"}),
        ("workers.storage", {"torch", "celery"}),
        ("workers.analysis", {"torch", "celery"}),
        ("workers.extraction", {"celery", "zarr"}),
    ],
)
def test_a_package_never_loads_what_the_design_forbids(package: str, forbidden: set[str]) -> None:
    extra = ["workers.jobs", "workers.errors", "workers.settings"] if package == "api" else []
    loaded = _loaded_after_import(_modules(package) + extra)
    assert not loaded & forbidden, f"{package} loads {loaded & forbidden}"


def test_the_worker_launcher_and_job_control_never_load_torch() -> None:
    """The launcher must not initialise CUDA before it forks workers; job control runs in
    the API process."""
    loaded = _loaded_after_import(
        [
            "workers.execution.launcher",
            "workers.execution.slots",
            "workers.lifecycle.state",
            "workers.lifecycle.counters",
            "workers.lifecycle.plan",
            "api.cli.main",
        ]  # fmt: skip
    )
    assert "torch" not in loaded
