"""Small documents in the store, read and replaced whole, on any fsspec filesystem.

A document is replaced atomically: on a local or shared POSIX directory by writing a
temporary file beside it and renaming it over the old one (rename is atomic within one
filesystem, so a reader sees the old bytes or the new, never half); on an object store by
one PUT, which is atomic there. No locks: each document has one writer at a time, or
writers that all write the same truth (the job's attrs) and may safely overwrite each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from bisect import bisect_right
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["filesystem", "get_json", "list_after", "location", "put_json", "remove"]


def location(store: str) -> str:
    """The store as zarr opens it, and as a local folder: zarr's fsspec store does not
    create local directories, so a file:// URL becomes a plain path."""
    return store.removeprefix("file://")


def filesystem(store: str) -> tuple[Any, str]:
    """The store's filesystem and its root path without a trailing slash. Credentials,
    endpoint and region of an object store come from its library's own conventions
    (for S3, botocore's: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_DEFAULT_REGION, ...)."""
    fs, root = fsspec.core.url_to_fs(store)
    return fs, str(root).rstrip("/")


def get_json(fs: Any, path: str) -> dict[str, Any] | None:
    """The document at `path`, or None when there is none."""
    try:
        found: dict[str, Any] = json.loads(fs.cat_file(path))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return found


def put_json(fs: Any, path: str, doc: dict[str, Any]) -> None:
    """Replace the document at `path` atomically (see the module docstring)."""
    data = json.dumps(doc, separators=(",", ":")).encode()
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove(fs: Any, paths: list[str]) -> None:
    """Delete these documents; one already gone is no error (another writer removed it)."""
    if not paths:
        return
    if not isinstance(fs, LocalFileSystem):
        try:
            fs.rm(paths)  # one bulk request on S3
        except FileNotFoundError:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(path)
        return
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def list_after(fs: Any, prefix: str, after: str | None, limit: int | None) -> list[str]:
    """Up to `limit` names (not paths) directly under `prefix`, in byte order, after `after`.
    On S3 this is one ListObjectsV2 call with StartAfter and MaxKeys, so a page costs a
    page; elsewhere the folder is listed whole and cut (10,000 names: about 5 ms on a local
    disk, listing and sorting; linear in the names, but with a small constant)."""
    prefix = prefix.rstrip("/") + "/"
    if type(fs).__name__ == "S3FileSystem":
        bucket, _, key = prefix.partition("/")
        names: list[str] = []
        start = key + after if after else None
        while limit is None or len(names) < limit:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key, "Delimiter": "/"}
            if start:
                kwargs["StartAfter"] = start
            if limit is not None:
                kwargs["MaxKeys"] = min(1000, limit - len(names))
            reply = fs.call_s3("list_objects_v2", **kwargs)
            contents = reply.get("Contents", [])
            names.extend(item["Key"][len(key) :] for item in contents)
            if not reply.get("IsTruncated") or not contents:
                break
            start = contents[-1]["Key"]
        return names
    try:
        if isinstance(fs, LocalFileSystem):  # several times faster than fsspec's ls here
            found = os.listdir(prefix)
        else:
            found = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(prefix, detail=False)]
    except FileNotFoundError:
        return []
    names = sorted(n for n in found if not n.startswith("."))
    if after is not None:
        names = names[bisect_right(names, after) :]
    return names if limit is None else names[:limit]
