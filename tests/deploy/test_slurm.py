"""deploy/slurm's array script on a real one-node Slurm (Debian's slurmctld and slurmd with
munge, on loopback, started here as root): a CPU worker per element gets its signal before
the time limit, stops softly, the element ends COMPLETED, and the next element finishes the
actmap job."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.manifests import ROOT
from tests.deploy.test_worker_lifecycle import MODEL, _inputs, _submit
from tests.integration.conftest import RedisServer, free_port, until
from workers.jobs import ExtractionSpec, JobState
from workers.lifecycle.state import status
from workers.storage.layout import open_job, read

pytestmark = pytest.mark.integration

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
if any(shutil.which(d) is None for d in DAEMONS) or os.geteuid() != 0:
    pytest.skip(
        "needs root and Debian's slurmctld slurmd slurm-client munge", allow_module_level=True
    )

SAMPLES = 240
ARRAY = ROOT / "deploy" / "slurm" / "worker-array.sbatch"
CONF = """\
ClusterName=actmap-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.sock
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=30
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Slurm:
    directory: Path
    env: dict[str, str]

    def run(self, *argv: str) -> str:
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60,
                              check=False)  # fmt: skip
        assert done.returncode == 0, f"{argv}: {done.stderr}"
        return done.stdout

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line]


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[Slurm]:
    where = tmp_path / "slurm"
    for sub in ("state", "spool"):
        (where / sub).mkdir(parents=True)
    key = where / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (where / "slurm.conf").write_text(
        CONF.format(dir=where, ctld_port=free_port(), d_port=free_port())
    )
    # A GPU the scheduler can hand out (the script asks for one); nothing uses it.
    (where / "gres.conf").write_text("Name=gpu File=/dev/null\n")
    env = {**os.environ, "SLURM_CONF": str(where / "slurm.conf")}
    started: list[Path] = []
    try:
        for argv, pidfile in (
            (["munged", "-f", f"--key-file={key}", f"--socket={where}/munge.sock",
              f"--pid-file={where}/munged.pid", f"--log-file={where}/munged.log",
              f"--seed-file={where}/munged.seed"], "munged.pid"),
            (["slurmctld", "-c", "-i"], "slurmctld.pid"),
            (["slurmd", "-c"], "slurmd.pid"),
        ):  # fmt: skip
            subprocess.run(argv, env=env, check=True, timeout=60, capture_output=True)
            started.append(where / pidfile)
            until((where / pidfile).exists, 30, f"{argv[0]} to start")
        cluster = Slurm(where, env)
        until(lambda: "idle" in cluster.run("sinfo", "-h", "-o", "%T"), 60, "the node idle")
        yield cluster
    finally:
        for path in reversed(started):  # the daemons this fixture started, by their pid files
            pid = path.read_text().strip() if path.exists() else ""
            if pid.isdigit():
                with suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGTERM)


def test_the_array_script_stops_softly_before_its_limit_and_the_next_element_finishes(
    slurm: Slurm, redis_server: RedisServer, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    inputs = _inputs(tmp_path / "inputs", SAMPLES)  # about 90 s of work for one worker
    spec = ExtractionSpec(model=MODEL, layers=("conv1", "fc"), inputs=(str(inputs),),
                          batch_size=1)  # fmt: skip
    job = _submit(redis_server, store, spec)
    # Short limits, in the same order as the defaults: hard limit 20 s < soft shutdown 30 s
    # < signal lead 45 s < visibility timeout 100 s; an element lives 120 s at most.
    env = {
        **slurm.env, "ACTMAP_BROKER_URL": redis_server.url, "ACTMAP_STORE": str(store),
        "ACTMAP_TASK_SOFT_TIME_LIMIT": "10", "ACTMAP_TASK_TIME_LIMIT": "20",
        "ACTMAP_SOFT_SHUTDOWN_S": "30", "ACTMAP_TASK_BUDGET_S": "2", "ACTMAP_QUEUES": "extract",
        "ACTMAP_CELERY": f"{Path(sys.executable).parent}/celery", "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--array=0-3%1", "--time=2", "--signal=B:TERM@45",
         "--cpus-per-task=1", "--mem=100", f"--chdir={tmp_path}",
         f"--output={tmp_path}/element-%a.out", str(ARRAY)],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    array_id = submitted.split(";")[0]
    began = time.monotonic()

    def finished() -> bool:
        return JobState(status(str(store), job.job_id).state).finished  # stalled is not finished

    until(finished, 420, "the actmap job to finish across the array", every=1.0)
    took = time.monotonic() - began
    slurm.run("scancel", array_id)  # the elements still waiting or idling

    def settled() -> list[dict[str, str]]:
        found = slurm.jobs(array_id)
        return found if all(j["JobState"] not in ("RUNNING", "COMPLETING") for j in found) else []

    elements = until(settled, 120, "the array to settle", every=1.0)
    ended = [e for e in elements if e["JobState"] not in ("PENDING", "CANCELLED")]
    logs = {e["ArrayTaskId"]: (tmp_path / f"element-{e['ArrayTaskId']}.out").read_text()
            for e in ended}  # fmt: skip
    signalled = [e for e in ended if "Warm shutdown" in logs[e["ArrayTaskId"]]]
    tasks = {k: v.count("succeeded in") for k, v in logs.items()}
    print(
        f"slurm: actmap job finished {took:.0f} s after sbatch; elements "
        + ", ".join(f"{e['ArrayTaskId']}:{e['JobState']}:{e['RunTime']}" for e in elements)
        + f"; tasks run per element {tasks}"
    )
    assert signalled, "no element's worker got the early signal"
    for element in signalled:
        assert element["JobState"] == "COMPLETED", element
        assert element["ExitCode"] == "0:0", element
    assert not [e for e in elements if e["JobState"] in ("TIMEOUT", "FAILED")]
    result = status(str(store), job.job_id)
    assert result.state == "succeeded"
    assert result.n_failed == 0
    assert result.samples_done == SAMPLES
    done = read(open_job(str(store), job.job_id, mode="r"), "done")
    assert bool(done.all())
