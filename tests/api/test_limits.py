"""Input a client controls is a 4xx with one line, never a 500; refused requests leave
nothing behind; request bodies are strict; `/metrics` shows only what its setting allows;
the input drawn beside the maps obeys the worker's pixel limit."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import FACTORY, Api, make_api
from workers.demo.digits import WEIGHTS
from workers.storage.layout import open_job, read


def _one_line_4xx(response: Any) -> str:
    assert 400 <= response.status_code < 500, response.text
    detail: str = response.json()["detail"]
    assert detail
    assert "\n" not in detail
    return detail


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": ["{root}/3\x00y.png"]},
        {"channels": [-1]},
        {"channels": [0, 0]},
        {"max_size": [0, 0]},
        {"batch_size": True},
        {"labels_from_dirs": "yes"},
    ],
    ids=["nul-in-input", "negative-channel", "repeated-channel", "zero-size", "bool", "str"],
)
def test_a_bad_extraction_request_is_a_one_line_4xx(api: Api, body: dict[str, Any]) -> None:
    model_id = api.register()
    root = str(api.roots["acme"])
    given: dict[str, Any] = {
        k: [i.format(root=root) for i in v] if k == "inputs" else v for k, v in body.items()
    }
    _one_line_4xx(api.submit(model_id, **given))


def test_a_nul_byte_in_a_model_path_is_a_one_line_4xx(api: Api) -> None:
    registered = api.client.post(
        "/v1/models",
        headers=api.as_("acme"),
        data={"name": "m", "path": f"{api.roots['acme']}/m\x00.pt2"},
    )
    _one_line_4xx(registered)


@pytest.mark.parametrize("analysis_id", ["a" * 5000, "..", "a..b", "%2e%2e%2fjobs"])
def test_an_unusable_analysis_id_is_a_one_line_404(api: Api, analysis_id: str) -> None:
    found = api.client.get(f"/v1/analyses/{analysis_id}", headers=api.as_("acme"))
    assert found.status_code == 404
    _one_line_4xx(found)


@pytest.mark.parametrize("profile_id", ["../jobs/x", "a/b", "..", "p" * 5000])
def test_a_profile_id_with_a_path_in_it_is_a_one_line_4xx(api: Api, profile_id: str) -> None:
    screened = api.client.post(
        "/v1/jobs/screenings", headers=api.as_("acme"),
        json={"profile_id": profile_id, "inputs": [str(api.roots["acme"])]},
    )  # fmt: skip
    _one_line_4xx(screened)


def test_an_over_long_upload_file_name_is_a_4xx_and_leaves_no_input_set(api: Api) -> None:
    uploaded = api.client.post(
        "/v1/inputs", headers=api.as_("acme"),
        files=[("files", ("n" * 300 + ".png", b"x" * 10, "image/png"))],
    )  # fmt: skip
    _one_line_4xx(uploaded)
    folder = api.store / "uploads" / "acme"
    assert not folder.exists() or not any(folder.iterdir())


def _registry_folders(api: Api) -> list[Path]:
    root = api.store / "registry" / "acme"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def test_a_refused_registration_leaves_no_folder_behind(tmp_path: Path) -> None:
    api = make_api(tmp_path, quotas={"upload_bytes": 1000})
    with api.client:
        weights = ("w.safetensors", b"x" * 10, "application/octet-stream")
        without_factory = api.client.post(
            "/v1/models", headers=api.as_("acme"), data={"name": "m"}, files={"weights": weights}
        )
        _one_line_4xx(without_factory)
        too_big = api.client.post(
            "/v1/models", headers=api.as_("acme"), data={"name": "m"},
            files={"archive": ("m.pt2", b"x" * 5000, "application/octet-stream")},
        )  # fmt: skip
        assert too_big.status_code == 413
        outside = api.client.post(
            "/v1/models", headers=api.as_("acme"), data={"name": "m", "path": "/etc/passwd"}
        )
        _one_line_4xx(outside)
        assert _registry_folders(api) == []


def _png_header_only_bomb(path: Path, side: int) -> None:
    """A grayscale PNG of side x side zero pixels: a few KB on disk, side**2 bytes decoded."""
    squeeze = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    compressed = b"".join(squeeze.compress(row) for _ in range(side)) + squeeze.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed)
        + chunk(b"IEND", b"")
    )  # fmt: skip


@pytest.mark.parametrize("side", [12000, 20000])
def test_an_input_over_the_workers_pixel_limit_is_not_decoded_for_a_picture(
    api: Api, side: int
) -> None:
    model_id = api.register()
    job_id = api.submit(model_id).json()["job_id"]
    group = open_job(str(api.store), job_id, mode="r")
    sample, source = str(read(group, "sample")[0]), Path(str(read(group, "source")[0]))
    _png_header_only_bomb(source, side)  # the file changed after the job ran
    assert source.stat().st_size < 600_000
    assert struct.unpack(">II", source.read_bytes()[16:24]) == (side, side)
    drawn = api.client.get(
        f"/v1/jobs/{job_id}/layers/conv1/activations.png", headers=api.as_("acme"),
        params={"sample": sample},
    )  # fmt: skip
    detail = _one_line_4xx(drawn)
    assert "pixel" in detail
    assert "image=false" in detail


def test_metrics_are_off_by_default_with_an_auth_file(api: Api) -> None:
    assert api.client.get("/metrics").status_code == 404
    assert api.client.get("/metrics", headers=api.as_("acme")).status_code == 404


def test_metrics_behind_their_own_token_and_never_per_tenant(tmp_path: Path) -> None:
    api = make_api(tmp_path, metrics="token", metrics_token="scrape-secret")
    with api.client:
        model_id = api.register()
        api.submit(model_id)
        assert api.client.get("/metrics").status_code == 401
        assert api.client.get("/metrics", headers=api.as_("acme")).status_code == 401
        scraped = api.client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert scraped.status_code == 200
        assert 'actmap_jobs{state="succeeded"} 1.0' in scraped.text
        assert "acme" not in scraped.text


def test_metrics_open_when_the_operator_says_so(tmp_path: Path) -> None:
    api = make_api(tmp_path, metrics="open")
    with api.client:
        assert api.client.get("/metrics").status_code == 200


def test_registering_counts_toward_the_cumulative_upload_quota(tmp_path: Path) -> None:
    size = WEIGHTS.stat().st_size
    api = make_api(tmp_path, quotas={"upload_bytes": size + 100})
    with api.client:
        api.register()
        again = api.client.post(
            "/v1/models", headers=api.as_("acme"), data={"name": "d2", "factory": FACTORY},
            files={"weights": ("w.safetensors", WEIGHTS.read_bytes(), "application/octet-stream")},
        )  # fmt: skip
        assert again.status_code == 413
        assert "upload_bytes" in again.json()["detail"]
        assert len(_registry_folders(api)) == 1
