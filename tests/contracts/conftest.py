"""Each twin pair runs the same suite: the in-process twin and the Redis one, the latter on a
private redis-server started for the module on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import RedisServer


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()
