"""Session-wide checks: the tests run the code that is in the tree.

The hot-path modules may be compiled (``make native``, see ``sipguard/native.py``); a compiled
module shadows its source, so after editing a source without rebuilding, the tests would run
the old code. That stops the session at once with the fix named.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sipguard import native

from .redis_server import RedisServer


def pytest_sessionstart(session: pytest.Session) -> None:
    _, stale = native.status()
    if stale:
        raise pytest.UsageError(
            "compiled modules are older than their sources: "
            + ", ".join(stale)
            + " — run `make native` (or `python -m sipguard.native build`)"
        )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole run, on a free loopback port, stopped by PID."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL, emptied for this test."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url
