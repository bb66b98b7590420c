"""Session-wide checks: the tests run the code that is in the tree.

The hot-path modules may be compiled (``make native``, see ``sipguard/native.py``); a compiled
module shadows its source, so after editing a source without rebuilding, the tests would run
the old code. That stops the session at once with the fix named.
"""

from __future__ import annotations

import pytest

from sipguard import native


def pytest_sessionstart(session: pytest.Session) -> None:
    _, stale = native.status()
    if stale:
        raise pytest.UsageError(
            "compiled modules are older than their sources: "
            + ", ".join(stale)
            + " — run `make native` (or `python -m sipguard.native build`)"
        )
