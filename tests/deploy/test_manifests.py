"""What the deployment files promise, read from the rendered overlays and the compose
files: one worker command, the timing rule, GPU requests, probes, hardening, KEDA."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.manifests import (
    COMPOSE,
    COMPOSE_GPU,
    OVERLAYS,
    ROOT,
    compose_services,
    compose_worker,
    find,
    k8s_worker,
    kubectl,
    render,
)
from workers.settings import Settings

SLURM = ROOT / "deploy" / "slurm"

needs_kubectl = pytest.mark.skipif(kubectl() is None, reason="kubectl is not installed")


def _without(argv: list[str], *options: str) -> list[str]:
    """`argv` less the values of `options` (the node name and queues differ by design)."""
    return [a for i, a in enumerate(argv) if i == 0 or argv[i - 1] not in options]


def _settings(env: dict[str, str]) -> Settings:
    fields = {k.removeprefix("ACTMAP_").lower(): v for k, v in env.items()}
    fields.pop("broker_url", None)
    return Settings.model_validate(fields)


def _assert_timing(settings: Settings, grace_s: int, where: str) -> None:
    # task hard limit < soft-shutdown time < grace period < Redis visibility timeout
    chain = [settings.task_time_limit, settings.shutdown_s, grace_s, settings.visibility_timeout]
    assert chain == sorted(set(chain)), f"{where}: timing {chain} is not increasing"


@needs_kubectl
def test_kubernetes_and_compose_run_one_and_the_same_worker_command() -> None:
    compose = compose_worker()
    assert k8s_worker("dev-cpu").argv == compose.argv
    for overlay in ("gpu", "gpu-keda"):
        assert _without(k8s_worker(overlay).argv, "--queues") == _without(compose.argv, "--queues")
    for gpu in ("gpu0", "gpu1"):
        found = compose_worker(gpu, COMPOSE, COMPOSE_GPU).argv
        assert _without(found, "--queues", "--hostname") == _without(
            compose.argv, "--queues", "--hostname"
        )
    assert "--task-events" in compose.argv  # Flower and exporters see the tasks


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_timing_rule_holds_in_every_overlay(overlay: str) -> None:
    worker = k8s_worker(overlay)
    _assert_timing(_settings(worker.env), worker.grace_s, overlay)


@pytest.mark.parametrize("service", ["worker", "gpu0", "gpu1"])
def test_the_timing_rule_holds_in_compose(service: str) -> None:
    worker = compose_worker(service, COMPOSE, COMPOSE_GPU)
    _assert_timing(_settings(worker.env), worker.grace_s, f"compose {service}")


def _sbatch(script: Path, option: str) -> str:
    found = re.search(rf"^#SBATCH --{option}=(\S+)$", script.read_text(), re.MULTILINE)
    assert found, f"{script.name} has no --{option}"
    return found.group(1)


@pytest.mark.parametrize("script", ["worker-array.sbatch", "worker-node.sbatch"])
def test_slurm_signals_the_worker_earlier_than_its_soft_shutdown_takes(script: str) -> None:
    path = SLURM / script
    lead = int(_sbatch(path, "signal").split("@")[1])
    default = re.search(r"ACTMAP_SOFT_SHUTDOWN_S:-(\d+)", path.read_text())
    assert default
    settings = Settings(soft_shutdown_s=int(default.group(1)))
    _assert_timing(settings, lead, script)
    assert _sbatch(path, "signal").startswith("B:") == (script == "worker-array.sbatch")


def _pod(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, "Deployment", name)["spec"]["template"]["spec"]
    return spec


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_are_limits_only_on_tainted_gpu_nodes(overlay: str) -> None:
    pod = _pod(render(overlay), "actmap-worker")
    resources = pod["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources.get("requests", {})
    if overlay == "dev-cpu":
        assert "nvidia.com/gpu" not in resources["limits"]
        assert "tolerations" not in pod
        return
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["nodeSelector"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_restricted_pinned_and_probed_without_inspect_ping(overlay: str) -> None:
    docs = render(overlay)
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            image = container["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), image
            assert not image.endswith(":latest"), image
            hardening = container["securityContext"]
            assert hardening["readOnlyRootFilesystem"] is True
            assert hardening["allowPrivilegeEscalation"] is False
            assert hardening["capabilities"]["drop"] == ["ALL"]
            assert "inspect" not in str(container.get("livenessProbe", ""))
    worker = k8s_worker(overlay)
    assert set(worker.probes) == {"startupProbe", "livenessProbe", "readinessProbe"}
    assert worker.env["ACTMAP_HEALTH_DIR"].startswith("/scratch")


@needs_kubectl
def test_keda_scales_on_running_and_waiting_work_from_zero_with_a_long_cooldown() -> None:
    docs = render("gpu-keda")
    assert "replicas" not in find(docs, "Deployment", "actmap-worker")["spec"]
    scaled = find(docs, "ScaledObject", "actmap-worker")["spec"]
    assert scaled["minReplicaCount"] == 0
    assert scaled["cooldownPeriod"] >= 600
    behaviour = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert behaviour["stabilizationWindowSeconds"] >= 300
    triggers = scaled["triggers"]
    for trigger in triggers:  # the CRD types every metadata value as a string
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger
    running = [t for t in triggers if 'state="running"' in t["metadata"].get("valueLocation", "")]
    assert running, "no trigger counts the work already running"
    for trigger in (t for t in triggers if t["type"] == "redis"):
        keys = set(trigger["metadata"])
        assert {"listName", "listLength", "activationListLength"} <= keys
        assert keys & {"address", "addressFromEnv", "host", "hostFromEnv"}
        assert find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])


def test_compose_waits_for_health_and_keeps_redis_durable_and_flower_private() -> None:
    services = compose_services(COMPOSE, COMPOSE_GPU)
    for name, spec in services.items():
        for dependency, how in spec.get("depends_on", {}).items():
            assert how["condition"] in (
                "service_healthy", "service_completed_successfully"
            ), f"{name} -> {dependency}"  # fmt: skip
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
    redis = " ".join(services["redis"]["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in redis
    assert services["flower"]["profiles"] == ["flower"]
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    for gpu in ("gpu0", "gpu1"):
        (device,) = services[gpu]["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [gpu.removeprefix("gpu")]
        assert "count" not in device


def test_the_deploy_readme_documents_every_setting() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    missing = [
        f"ACTMAP_{name.upper()}" for name in Settings.model_fields
        if f"ACTMAP_{name.upper()}" not in readme
    ]  # fmt: skip
    assert not missing, f"deploy/README.md lacks {missing}"


def test_the_images_are_built_as_the_deployments_run_them() -> None:
    text = (ROOT / "docker" / "worker.Dockerfile").read_text()
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.MULTILINE)
    assert entry
    assert compose_worker().argv[:4] == json.loads(entry.group(1))
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text
    assert re.search(r"^USER 10001", text, re.MULTILINE)
