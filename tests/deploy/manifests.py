"""The worker as the deployment files define it: command, environment, probes and grace
period, read from the rendered kustomize overlays and from the compose files, so that the
tests run what an operator would."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker" / "compose.yaml"
COMPOSE_GPU = ROOT / "docker" / "compose.gpu.yaml"
OVERLAYS = ("dev-cpu", "gpu", "gpu-keda")


def kubectl() -> str | None:
    """kubectl on PATH, else the one `.ci/run` installs beside the validators."""
    found = shutil.which("kubectl")
    local = ROOT / ".ci-venv" / "deploy-tools" / "bin" / "kubectl"
    return found or (str(local) if local.exists() else None)


def render(overlay: str) -> list[dict[str, Any]]:
    tool = kubectl()
    assert tool is not None, "kubectl is needed to render the overlays"
    out = subprocess.run(
        [tool, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in the rendered overlay")


@dataclass
class Worker:
    """A worker container: argv, environment (secrets left as `secret:<key>`), probes as
    exec commands with their timings, and the seconds the platform waits after SIGTERM."""

    argv: list[str]
    env: dict[str, str]
    grace_s: int
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)


def k8s_worker(overlay: str) -> Worker:
    docs = render(overlay)
    pod = find(docs, "Deployment", "actmap-worker")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = "secret:" + var["valueFrom"]["secretKeyRef"]["key"]
    probes = {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    argv = container["command"] + container["args"]
    return Worker(argv, env, int(pod["terminationGracePeriodSeconds"]), probes)


def _seconds(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(value[:-1]) * units[value[-1]]


def compose_services(*files: Path) -> dict[str, Any]:
    """The services of the compose files merged as compose does for the keys used here."""
    services: dict[str, Any] = {}
    for path in files:
        for name, spec in yaml.safe_load(path.read_text())["services"].items():
            services[name] = {**services.get(name, {}), **spec}
    return services


def compose_worker(service: str = "worker", *files: Path) -> Worker:
    spec = compose_services(*(files or (COMPOSE,)))[service]
    env = {k: str(v) for k, v in spec["environment"].items()}
    if "ACTMAP_BROKER_URL" in env:
        env["ACTMAP_BROKER_URL"] = "secret:broker-url"
    test = spec["healthcheck"]["test"]
    probes = {"livenessProbe": {"exec": {"command": test[1:]}}}
    return Worker(spec["entrypoint"] + spec["command"], env, _seconds(spec["stop_grace_period"]),
                  probes)  # fmt: skip
