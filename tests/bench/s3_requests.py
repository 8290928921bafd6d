"""Count the S3 requests this process makes, by operation and by what they name.

Every s3fs instance (ours and zarr's) talks through an aiobotocore session; while
`counting()` is open, each session created registers botocore's `before-send` and
`after-call` hooks, so every request is seen whatever instance or thread sends it. A
session made before `counting()` is entered is not seen: enter it before the first store
call of the process (s3fs caches its instances).

A request is classified by its operation and the store path it names, with job ids and
index keys replaced by `J` and `K`, so that the same work at two store sizes gives the
same classes and only a count that grows with the store differs.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["Requests", "count_each", "counting", "print_counts", "print_moto", "time_moto"]

_JOB = re.compile(r"(?<![0-9a-z])[0-9]{8}-[0-9]{6}-[0-9a-f]{6}(?![0-9a-z])")  # new_id()
_KEY = re.compile(r"(?<![0-9])[0-9]{17}_J\.json")


def _shape(path: str) -> str:
    """The path with job ids and index keys replaced by placeholders."""
    return _KEY.sub("K", _JOB.sub("J", path))


@dataclass
class Requests:
    """What was sent: requests per class, keys listed, bytes each way."""

    calls: Counter[str] = field(default_factory=Counter)
    listed: int = 0  # keys and common prefixes that ListObjectsV2 replies named
    sent: int = 0  # request body bytes
    received: int = 0  # reply body bytes (Content-Length)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def clear(self) -> None:
        with self.lock:
            self.calls.clear()
            self.listed = self.sent = self.received = 0

    def copy(self) -> Requests:
        with self.lock:
            return Requests(Counter(self.calls), self.listed, self.sent, self.received)

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def by_operation(self) -> Counter[str]:
        found: Counter[str] = Counter()
        for name, n in self.calls.items():
            found[name.split(" ", 1)[0]] += n
        return found

    def _sent(self, request: Any, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        url = urlsplit(request.url)
        bucket, _slash, key = unquote(url.path).lstrip("/").partition("/")
        query = parse_qs(url.query)
        if operation == "ListObjectsV2":
            prefix = query.get("prefix", [""])[0]
            what = f"prefix={_shape(prefix)!r}"
            if "delimiter" in query:
                what += " delimiter"
            if "start-after" in query:
                what += " start-after"
            if "max-keys" in query:
                what += f" max-keys={query['max-keys'][0]}"
        else:
            what = _shape(key) or bucket
        body = request.body
        with self.lock:  # sent from s3fs's and zarr's event loop threads
            self.calls[f"{operation} {what}"] += 1
            self.sent += len(body) if isinstance(body, bytes | bytearray) else 0

    def _replied(self, http_response: Any, parsed: dict[str, Any], **_: Any) -> None:
        listed = len(parsed.get("Contents") or []) + len(parsed.get("CommonPrefixes") or [])
        with self.lock:
            self.received += int(http_response.headers.get("content-length") or 0)
            self.listed += listed


@contextmanager
def counting() -> Iterator[Requests]:
    """Count the requests of every aiobotocore session created while this is open."""
    from aiobotocore.session import AioSession

    found = Requests()
    original = AioSession.__init__

    def init(self: AioSession, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.register("before-send.s3", found._sent)
        self.register("after-call.s3", found._replied)

    AioSession.__init__ = init
    try:
        yield found
    finally:
        AioSession.__init__ = original


def count_each(ops: dict[str, Callable[[], Any]], seen: Requests) -> dict[str, Requests]:
    """Run each operation once and keep what it sent."""
    found = {}
    for name, fn in ops.items():
        seen.clear()
        fn()
        found[name] = seen.copy()
    return found


def time_moto(store: str, job_id: str, rounds: int = 15) -> dict[str, float]:
    """Seconds (median of `rounds`) of single requests to the server, made with boto3 and
    nothing of actmap: two listings of one fixed prefix (an index page and a job's folder),
    a HEAD and a GET of one small object as the O(1) control; and the bucket's key count."""
    import boto3

    client = boto3.client("s3")  # endpoint and keys from the environment, as s3fs's
    bucket, _, root = store.removeprefix("s3://").partition("/")
    doc = f"{root}/jobs/{job_id}/zarr.json"
    calls: dict[str, Callable[[], Any]] = {
        "list index page (51)": lambda: client.list_objects_v2(
            Bucket=bucket, Prefix=f"{root}/index/all/", Delimiter="/", MaxKeys=51
        ),
        "list one job's folder": lambda: client.list_objects_v2(
            Bucket=bucket, Prefix=f"{root}/jobs/{job_id}/", Delimiter="/"
        ),
        "HEAD zarr.json": lambda: client.head_object(Bucket=bucket, Key=doc),
        "GET zarr.json": lambda: client.get_object(Bucket=bucket, Key=doc)["Body"].read(),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):  # interleaved
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - began)
    found = {name: statistics.median(t) for name, t in times.items()}
    keys = 0
    for reply in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += reply.get("KeyCount", 0)
    found["keys in the bucket"] = keys
    return found


def print_counts(rows: list[tuple[int, dict[str, Requests]]]) -> None:
    """Per operation: requests by S3 operation, keys listed and bytes at each size, every
    listing's class, and any class whose count differs between sizes."""
    sizes = [size for size, _ in rows]
    head = "".join(f"{f'{s} jobs':>12}" for s in sizes)
    for name in rows[0][1]:
        seen = [found[name] for _, found in rows]
        print(f"\nrequests of one {name}{'':<48}"[:60] + head)
        ops = sorted(set().union(*(s.by_operation() for s in seen)))
        for op in ops:
            print(f"  {op:<58}" + "".join(f"{s.by_operation()[op]:>12}" for s in seen))
        totals: tuple[tuple[str, Callable[[Requests], int]], ...] = (
            ("all requests", lambda s: s.total),
            ("keys and prefixes listed", lambda s: s.listed),
            ("bytes sent", lambda s: s.sent),
            ("bytes received", lambda s: s.received),
        )
        for label, value in totals:
            print(f"  {label:<58}" + "".join(f"{value(s):>12}" for s in seen))
        classes = sorted(set().union(*(s.calls for s in seen)))
        for c in classes:
            counts = [s.calls[c] for s in seen]
            if c.startswith("ListObjectsV2") or len(set(counts)) > 1:
                # The class whole on a line of its own: prefixes are longer than a column.
                print(f"    {c}\n    {'':<56}" + "".join(f"{n:>12}" for n in counts))


def print_moto(rows: list[tuple[int, dict[str, float]]]) -> None:
    sizes = [size for size, _ in rows]
    print(f"\nmoto alone (boto3), median ms{'':<31}" + "".join(f"{f'{s} jobs':>12}" for s in sizes)
          + f"{'ratio':>10}")  # fmt: skip
    for name in rows[0][1]:
        values = [found[name] for _, found in rows]
        shown = [f"{v:>12.0f}" if name.startswith("keys") else f"{v * 1e3:>12.1f}" for v in values]
        print(f"  {name:<58}" + "".join(shown) + f"{values[-1] / values[0]:>9.2f}x")
