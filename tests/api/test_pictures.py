"""The picture routes: PNGs under the same tenant rules as every other route."""

from __future__ import annotations

import io

from PIL import Image

from tests.api.conftest import Api


def test_activation_pngs_are_served_to_their_tenant_only(api: Api) -> None:
    model_id = api.register()
    job_id = api.submit(model_id).json()["job_id"]
    sample = api.client.get(f"/v1/jobs/{job_id}/samples", headers=api.as_("acme")).json()[
        "samples"
    ][0]
    path = f"/v1/jobs/{job_id}/layers/conv1/activations.png"
    mine = api.client.get(path, params={"sample": sample}, headers=api.as_("acme"))
    assert mine.status_code == 200
    assert mine.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(mine.content)) as picture:
        assert picture.width > 0
    theirs = api.client.get(path, params={"sample": sample}, headers=api.as_("other"))
    assert theirs.status_code == 404
    unknown = api.client.get(
        f"/v1/jobs/{job_id}/layers/conv_1/activations.png", params={"sample": sample},
        headers=api.as_("acme"),
    )  # fmt: skip
    assert unknown.status_code == 404


def test_filter_weight_pngs_come_from_safetensors_without_torch(api: Api) -> None:
    model_id = api.register()
    job_id = api.submit(model_id).json()["job_id"]
    weights = api.client.get(f"/v1/jobs/{job_id}/weights/conv1.png", headers=api.as_("acme"))
    assert weights.status_code == 200
    assert weights.content.startswith(b"\x89PNG")
    assert (
        api.client.get(f"/v1/jobs/{job_id}/weights/conv1.png", headers=api.as_("other")).status_code
        == 404
    )


def test_gradcam_pngs_are_served_to_their_tenant_only_for_known_samples(api: Api) -> None:
    model_id = api.register()
    job_id = api.submit(model_id, layers=["conv1", "conv3"], gradcam=["conv3"]).json()["job_id"]
    sample = api.client.get(f"/v1/jobs/{job_id}/samples", headers=api.as_("acme")).json()[
        "samples"
    ][0]
    path = f"/v1/jobs/{job_id}/layers/conv3/gradcam.png"
    mine = api.client.get(path, params={"sample": sample}, headers=api.as_("acme"))
    assert mine.status_code == 200
    assert mine.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(mine.content)) as picture:
        assert picture.mode == "RGB"
        assert picture.width > picture.height  # the input and the overlay side by side
    theirs = api.client.get(path, params={"sample": sample}, headers=api.as_("other"))
    assert theirs.status_code == 404
    unknown = api.client.get(path, params={"sample": "nope.png"}, headers=api.as_("acme"))
    assert unknown.status_code == 404
    assert "no sample 'nope.png'" in unknown.json()["detail"]
    missing = api.client.get(path, headers=api.as_("acme"))
    assert missing.status_code == 422
    plain = api.client.get(
        f"/v1/jobs/{job_id}/layers/conv1/gradcam.png", params={"sample": sample},
        headers=api.as_("acme"),
    )  # fmt: skip
    assert plain.status_code == 404
    assert "no Grad-CAM maps" in plain.json()["detail"]
    assert "\n" not in plain.json()["detail"]
