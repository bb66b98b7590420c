"""The compiled hot path: what `sipguard.native` reports and that it runs the same code."""

from __future__ import annotations

import os
import time

import pytest

from sipguard import native


def test_status_lists_only_hot_modules_and_nothing_stale() -> None:
    """Every module reported compiled is a hot-path module, and none is older than its source
    (the session would not have started otherwise)."""
    compiled, stale = native.status()
    assert set(compiled) <= set(native.HOT_MODULES)
    assert stale == []


def test_an_edited_source_makes_its_compiled_module_stale() -> None:
    """Touching a hot source after a build makes status() report it, and needs_build() ask
    for a rebuild; the mtime is put back afterwards."""
    compiled, _ = native.status()
    if not compiled:
        pytest.skip("running as Python: nothing compiled")
    name = compiled[0]
    source = native._source(name)
    before = source.stat()
    try:
        later = time.time() + 5
        os.utime(source, (later, later))
        assert name in native.status()[1]
        assert native.needs_build()
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert name not in native.status()[1]
