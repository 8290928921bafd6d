"""Uploads are written under temporary names and renamed once whole: an upload that fails
part-way (a disk error, a dropped client) leaves no file that looks like an input."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.datastructures import UploadFile

from tests.api.conftest import make_api


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
