"""A tenant swaps one of its own files for a symlink to another tenant's, after the API
checked it: through a real `actmap serve`, a real `actmap worker` and a private Redis, the
swapped file is refused where it is opened (a per-sample code, a 404), and the other
tenant's bytes are never read."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from api.client import Client
from tests.integration.conftest import ROOT, Cluster, serving
from tests.oracle import planned, run_job
from workers.demo.digits import WEIGHTS
from workers.extraction.cache import ModelCache
from workers.jobs import ExtractionSpec
from workers.storage.layout import attrs, open_job, read

pytestmark = pytest.mark.integration

FACTORY = "workers.demo.digits:digits_cnn"
SAMPLES = ROOT / "workers" / "demo" / "samples"
EVE, VIC = "eve-token", "vic-token"


@dataclass
class Tenants:
    """The API's URL, the attacker's root `eve` (its images in `eve/digits`) and the
    victim's root `vic`."""

    url: str
    eve: Path
    vic: Path
    cluster: Cluster

    @property
    def images(self) -> Path:
        return self.eve / "digits"

    def client(self) -> Client:
        return Client(self.url, EVE)

    def picture(self, path: str, **params: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {EVE}"}
        return httpx.get(f"{self.url}{path}", params=params, headers=headers, timeout=60)


@pytest.fixture
def tenants(cluster: Cluster, tmp_path: Path) -> Iterator[Tenants]:
    """`actmap serve` with two tenants; no worker yet (each test starts it when it wants)."""
    eve, vic = tmp_path / "eve", tmp_path / "vic"
    shutil.copytree(SAMPLES / "1", eve / "digits")
    shutil.copytree(SAMPLES / "8", vic)
    auth = {
        "tenants": {
            "eve": {"tokens": [EVE], "roots": [str(eve)]},
            "vic": {"tokens": [VIC], "roots": [str(vic)]},
        }
    }
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    cluster.env["ACTMAP_AUTH_FILE"] = str(tmp_path / "auth.json")
    cluster.env["ACTMAP_FACTORIES"] = json.dumps([FACTORY])
    with serving(cluster.env) as url:
        yield Tenants(url, eve, vic, cluster)


def _swap(mine: Path, theirs: Path) -> None:
    """What the attacker does between the check and the open."""
    mine.unlink()
    mine.symlink_to(theirs)


def _logits_of(path: Path, tmp_path: Path) -> np.ndarray:
    """The logits an in-process run stores for one file: what a leak would store."""
    store = str(tmp_path / "reference")
    spec = ExtractionSpec(
        model=FACTORY, weights=str(WEIGHTS), layers=("conv1",), inputs=(str(path),), batch_size=1
    )
    models = ModelCache(factories=(FACTORY,))
    job = planned(store, spec, models.get(spec).info)
    run_job(store, job.job_id, models)
    found: np.ndarray = read(open_job(store, job.job_id, mode="r"), "logits")[0]
    return found


def test_a_file_swapped_for_a_link_while_queued_is_refused_and_the_others_extracted(
    tenants: Tenants, tmp_path: Path
) -> None:
    tenants.cluster.start(workers=1)
    with tenants.client() as client:
        model_id = client.register_model("digits", weights=WEIGHTS, factory=FACTORY)
    tenants.cluster.stop()  # planned by the API alone; no worker reads it yet
    with tenants.client() as client:
        job = client.submit_extraction(model_id, [str(tenants.images)], ["conv1"], batch_size=2)
    victim = tenants.vic / "4003.png"
    _swap(tenants.images / "0502.png", victim)
    tenants.cluster.start(workers=1)
    tenants.cluster.wait(job.id)

    group = open_job(tenants.cluster.store, job.id, mode="r")
    samples = [str(s) for s in read(group, "sample")]
    names = attrs(group)["error_codes"]
    codes = {s: names[str(c)] for s, c in zip(samples, read(group, "error_code"), strict=True)}
    messages = dict(zip(samples, read(group, "error_message").tolist(), strict=True))
    assert codes == {
        "0502.png": "outside_roots", "0507.png": "ok", "0510.png": "ok", "0514.png": "ok"
    }  # fmt: skip
    assert len(str(messages["0502.png"]).splitlines()) == 1
    assert "symbolic link" in str(messages["0502.png"])
    refused = read(group, "logits")[samples.index("0502.png")]
    assert not np.array_equal(refused, _logits_of(victim, tmp_path))
    assert np.isnan(read(group, "layers/conv1/acts")[samples.index("0502.png")]).all()
    assert client_state(tenants, job.id) == "partial"


def client_state(tenants: Tenants, job_id: str) -> str:
    with tenants.client() as client:
        state: str = client.job(job_id).status()["state"]
    return state


def test_activations_png_answers_404_once_the_source_is_swapped_for_a_link(
    tenants: Tenants,
) -> None:
    tenants.cluster.start(workers=1)
    with tenants.client() as client:
        model_id = client.register_model("digits", weights=WEIGHTS, factory=FACTORY)
        job = client.submit_extraction(model_id, [str(tenants.images)], ["conv1"], batch_size=4)
        assert job.wait(timeout=120)["state"] == "succeeded"
    path = f"/v1/jobs/{job.id}/layers/conv1/activations.png"
    before = tenants.picture(path, sample="0507.png")
    assert before.status_code == 200
    _swap(tenants.images / "0507.png", tenants.vic / "4025.png")
    after = tenants.picture(path, sample="0507.png")
    assert after.status_code == 404
    assert not after.content.startswith(b"\x89PNG")
    assert len(after.json()["detail"].splitlines()) == 1
    assert "0507.png" in after.json()["detail"]
    # Without the input beside them, the maps the job stored are still drawn.
    maps_only = tenants.picture(path, sample="0507.png", image="false")
    assert maps_only.status_code == 200


def test_weights_registered_by_path_are_copied_and_a_later_swap_is_never_read(
    tenants: Tenants,
) -> None:
    mine, theirs = tenants.eve / "w.safetensors", tenants.vic / "w.safetensors"
    shutil.copy(WEIGHTS, mine)
    other = load_file(str(WEIGHTS))
    other["conv1.weight"] = -other["conv1.weight"][::-1].copy()
    save_file(other, str(theirs))
    tenants.cluster.start(workers=1)
    with tenants.client() as client:
        model_id = client.register_model("digits", factory=FACTORY, path=str(mine))
        first = client.submit_extraction(model_id, [str(tenants.images)], ["conv1"], batch_size=4)
        assert first.wait(timeout=120)["state"] == "succeeded"
        picture = f"/v1/jobs/{first.id}/weights/conv1.png"
        before = tenants.picture(picture)
        assert before.status_code == 200
        _swap(mine, theirs)
        assert tenants.picture(picture).content == before.content
        second = client.submit_extraction(model_id, [str(tenants.images)], ["conv1"], batch_size=4)
        assert second.wait(timeout=120)["state"] == "succeeded"
        assert tenants.picture(f"/v1/jobs/{second.id}/weights/conv1.png").content == (
            before.content
        )
    store = tenants.cluster.store
    logits = [read(open_job(store, j.id, mode="r"), "logits") for j in (first, second)]
    np.testing.assert_array_equal(logits[0], logits[1])


def test_a_path_registration_through_a_link_is_refused_in_one_line(tenants: Tenants) -> None:
    mine = tenants.eve / "w.safetensors"
    mine.symlink_to(WEIGHTS)  # WEIGHTS lies outside eve's root
    inside = tenants.eve / "inside.safetensors"
    shutil.copy(WEIGHTS, tenants.eve / "real.safetensors")
    inside.symlink_to(tenants.eve / "real.safetensors")  # a link that stays inside
    headers = {"Authorization": f"Bearer {EVE}"}
    for given in (mine, inside):
        refused = httpx.post(
            f"{tenants.url}/v1/models", headers=headers, timeout=60,
            data={"name": "x", "factory": FACTORY, "path": str(given)},
        )  # fmt: skip
        assert refused.status_code == 422, refused.text
        assert len(refused.json()["detail"].splitlines()) == 1
