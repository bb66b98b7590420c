"""Set-up shared by the unit tests that run a real Server over loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

from .udp_peer import Peer


@pytest.fixture
def reset_structlog() -> Iterator[None]:
    """structlog's defaults back after the test (a Server, or the test, configured logging);
    a module that needs it says ``pytestmark = pytest.mark.usefixtures("reset_structlog")``."""
    yield
    structlog.reset_defaults()


@pytest.fixture
async def peers() -> AsyncIterator[tuple[Peer, Peer]]:
    """A caller and a core: two UDP sockets on 127.0.0.1, closed after the test."""
    caller, core = Peer(), Peer()
    yield caller, core
    caller.sock.close()
    core.sock.close()
