"""A job's storage options through the HTTP API: `dtype` uint8 and `compression`."""

from __future__ import annotations

import io

import numpy as np
from zarr.codecs import BloscCodec

from tests.api.conftest import Api
from workers.storage.layout import array, attrs, open_job
from workers.storage.stored_job import StoredJob


def test_a_uint8_lz4_extraction_stores_that_and_serves_decoded_float_maps(api: Api) -> None:
    model_id = api.register()
    accepted = api.submit(model_id, batch_size=3, dtype="uint8", compression="lz4")
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    group = open_job(str(api.store), job_id, mode="r")
    assert attrs(group)["spec"]["compression"] == "lz4"
    stored = array(group, "layers/conv1/acts")
    assert stored.dtype == np.uint8
    assert isinstance(stored.compressors[0], BloscCodec)
    got = api.client.get(
        f"/v1/jobs/{job_id}/layers/conv1/activations",
        params={"channels": "0,5"}, headers=api.as_("acme"),
    )  # fmt: skip
    assert got.status_code == 200
    served = np.load(io.BytesIO(got.content), allow_pickle=False)
    assert served.dtype == np.float32
    decoded = np.asarray(StoredJob(str(api.store), job_id).acts("conv1")[:])
    np.testing.assert_array_equal(served, decoded[:, [0, 5]])


def test_an_extraction_names_zstd_when_it_names_no_codec(api: Api) -> None:
    job_id = api.submit(api.register()).json()["job_id"]
    assert attrs(open_job(str(api.store), job_id, mode="r"))["spec"]["compression"] == "zstd"


def test_an_unknown_codec_or_dtype_is_a_422_with_one_line(api: Api) -> None:
    model_id = api.register()
    sent_before = len(api.broker.sent)
    for body in ({"compression": "gzip"}, {"dtype": "int8"}):
        bad = api.submit(model_id, **body)
        assert bad.status_code == 422, body
        detail = bad.json()["detail"]
        assert detail.startswith(f"invalid {next(iter(body))}"), detail
        assert "\n" not in detail
    assert len(api.broker.sent) == sent_before
