"""Uploads are written under temporary names and renamed once whole: an upload that fails
part-way (a disk error, a dropped client) leaves no file that looks like an input."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from starlette.datastructures import UploadFile

from api.quotas import STALE_UPLOAD_S
from tests.api.conftest import SAMPLES, make_api


def test_an_upload_failing_part_way_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = make_api(tmp_path)
    real = UploadFile.read
    calls = {"n": 0}

    async def failing(self: UploadFile, size: int = -1) -> bytes:
        calls["n"] += 1
        if self.filename == "b.bin" and calls["n"] > 3:
            raise OSError("No space left on device")
        return await real(self, size)

    monkeypatch.setattr(UploadFile, "read", failing)
    with pytest.raises(OSError, match="No space left"):
        api.client.post(
            "/v1/inputs", headers=api.as_("acme"),
            files=[("files", ("a.bin", b"x" * 600, "application/octet-stream")),
                   ("files", ("b.bin", b"y" * (3 << 20), "application/octet-stream"))],
        )  # fmt: skip
    left = list((api.store / "uploads" / "acme").rglob("*"))
    assert left == [], left


def _png(digit: str) -> bytes:
    return next((SAMPLES / digit).glob("*.png")).read_bytes()


def test_uploads_keep_their_folders_so_folder_labels_work(tmp_path: Path) -> None:
    from api.client import Client
    from workers.storage.layout import open_job, read

    api = make_api(tmp_path)
    local = tmp_path / "mine"
    for digit in ("3", "7"):
        (local / digit).mkdir(parents=True)
        (local / digit / f"x{digit}.png").write_bytes(_png(digit))
    client = Client("http://testserver", api.tokens["acme"])
    # The in-process app, reached as the CLI's `--upload` reaches a server.
    client._http = api.client  # type: ignore[assignment]
    client._http.headers.update(api.as_("acme"))
    set_id = client.upload([local / "3" / "x3.png", local / "7" / "x7.png"])
    folder = api.store / "uploads" / "acme" / set_id
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == [
        "3/x3.png", "7/x7.png",
    ]  # fmt: skip
    model_id = api.register()
    job = api.submit(model_id, inputs=[], input_set=set_id, labels_from_dirs=True).json()
    group = open_job(str(api.store), job["job_id"], mode="r")
    assert list(read(group, "sample")) == ["3/x3.png", "7/x7.png"]
    assert list(read(group, "label")) == [3, 7]


@pytest.mark.parametrize(
    "name", ["../x.png", "a/../../x.png", "/etc/x.png", "a//x.png", "./x.png", "a/./x.png"]
)
def test_an_upload_path_that_climbs_or_is_absolute_is_refused(tmp_path: Path, name: str) -> None:
    api = make_api(tmp_path)
    answer = api.client.post(
        "/v1/inputs", headers=api.as_("acme"), files=[("files", (name, _png("3"), "image/png"))]
    )
    assert answer.status_code == 422, answer.text
    assert "relative path" in answer.json()["detail"]
    folder = api.store / "uploads" / "acme"
    assert not folder.exists() or not any(folder.iterdir())


def test_a_path_uploaded_twice_is_refused(tmp_path: Path) -> None:
    api = make_api(tmp_path)
    twice = [("files", ("3/a.png", _png("3"), "image/png"))] * 2
    answer = api.client.post("/v1/inputs", headers=api.as_("acme"), files=twice)
    assert answer.status_code == 422, answer.text
    assert "twice" in answer.json()["detail"]


def test_a_file_and_a_folder_of_one_name_are_refused(tmp_path: Path) -> None:
    api = make_api(tmp_path)
    both = [("files", ("3", _png("3"), "image/png")), ("files", ("3/a.png", _png("3"), "x/y"))]
    answer = api.client.post("/v1/inputs", headers=api.as_("acme"), files=both)
    assert answer.status_code == 422, answer.text


def test_a_set_left_by_a_server_that_died_mid_upload_is_swept_and_its_bytes_given_back(
    tmp_path: Path,
) -> None:
    api = make_api(tmp_path, quotas={"upload_bytes": 1000})
    dead = api.store / "uploads" / "acme" / ".in-0123456789ab.part"
    (dead / "3").mkdir(parents=True)
    (dead / "3" / "a.bin").write_bytes(b"x" * 800)
    live = api.store / "uploads" / "acme" / ".in-ba9876543210.part"
    live.mkdir()
    (live / "b.bin").write_bytes(b"y" * 100)  # being written now: left alone
    old = time.time() - STALE_UPLOAD_S - 60
    os.utime(dead / "3" / "a.bin", (old, old))
    upload = [("files", ("c.bin", b"z" * 600, "application/octet-stream"))]
    answered = api.client.post("/v1/inputs", headers=api.as_("acme"), files=upload)
    assert answered.status_code == 201, answered.text  # 800 + 100 + 600 would be over 1000
    assert not dead.exists()
    assert (live / "b.bin").exists()
