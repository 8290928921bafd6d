"""Walk the README: run every command of its `sh` blocks, in order, on the bundled data.

    python tests/readme_walk.py [README.md]

The first `sh` block (the quick start: install and test suite, run by .ci/run itself) and
blocks preceded by a `<!-- readme-walk: skip (why) -->` line are left out. Commands run
embedded in a scratch folder (the repository's `workers/` linked into it) with their own
store; `JOB` and `PROFILE` are replaced by the last job and profile ids printed before.
Exits 1 at the first command that fails, printing it and its output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
_BLOCK = re.compile(r"(<!-- readme-walk: skip[^>]*-->\s*\n)?```sh\n(.*?)```", re.S)
_JOB = re.compile(r"\bjob (\d{8}-\d{6}-[0-9a-f]{6})\b")
_PROFILE = re.compile(r"^screening-profile (\S+) in ", re.M)


def commands(readme: str) -> list[str]:
    """The commands of the README's `sh` blocks after the quick start, comments cut,
    continued lines joined."""
    found: list[str] = []
    for i, block in enumerate(_BLOCK.finditer(readme)):
        if i == 0 or block.group(1):
            continue
        text = block.group(2).replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def walk(readme: Path) -> int:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("ACTMAP_BROKER_URL", None)
    env.pop("ACTMAP_API_URL", None)
    ids: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="readme-walk-") as scratch:
        (Path(scratch) / "workers").symlink_to(ROOT / "workers")
        env["ACTMAP_STORE"] = str(Path(scratch) / "actmap-store")
        for command in commands(readme.read_text()):
            for name, value in ids.items():
                command = re.sub(rf"\b{name}\b", value, command)
            print(f"+ {command}", flush=True)
            done = subprocess.run(
                command, shell=True, cwd=scratch, env=env, capture_output=True, text=True,
                check=False,
            )  # fmt: skip
            print(done.stdout, end="")
            if done.returncode != 0:
                print(done.stderr, end="", file=sys.stderr)
                print(f"README walk: exit {done.returncode} from: {command}", file=sys.stderr)
                return 1
            if command.startswith("actmap scan") and (job := _JOB.search(done.stdout)):
                ids["JOB"] = job.group(1)
            if profile := _PROFILE.search(done.stdout):
                ids["PROFILE"] = profile.group(1)
    print("README walk: every command ran")
    return 0


if __name__ == "__main__":
    sys.exit(walk(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "README.md"))
