"""Fixtures for the SIPp end-to-end tests (see harness.py for the process handling)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import E2EStack, sipp_binary


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip every e2e test cleanly when SIPp is not installed."""
    if sipp_binary() is not None:
        return
    skip = pytest.mark.skip(
        reason="sipp not on PATH: install SIPp (Debian package sip-tester, `make sipp`)"
    )
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(skip)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[E2EStack]:
    """A per-test process stack; every SIPp / sipguard it started is stopped by PID at
    teardown, whether the test passed or failed.  Traces stay in tmp_path."""
    s = E2EStack(tmp_path)
    try:
        yield s
    finally:
        s.close()
