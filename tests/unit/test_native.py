"""The compiled hot path: what `sipguard.native` reports and that it runs the same code."""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

import pytest

from sipguard import native


def test_status_tells_compiled_and_stale_modules_by_the_file_they_were_loaded_from(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """status() reports a hot module as compiled exactly when it was loaded from a file other
    than its .py source, and as stale exactly when that file is older than the source."""
    fresh, old, plain = native.HOT_MODULES[:3]
    for name, offset in ((fresh, 60.0), (old, -60.0)):
        built = tmp_path / (name + native._ext_suffix())
        built.write_bytes(b"")
        when = native._source(name).stat().st_mtime + offset
        os.utime(built, (when, when))
        module = types.ModuleType(name)
        module.__file__ = str(built)
        monkeypatch.setitem(sys.modules, name, module)
    module = types.ModuleType(plain)
    module.__file__ = str(native._source(plain))
    monkeypatch.setitem(sys.modules, plain, module)
    compiled, stale = native.status()
    assert fresh in compiled and old in compiled and plain not in compiled
    assert old in stale and fresh not in stale and plain not in stale


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


def test_a_build_for_another_interpreter_is_made_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """needs_build() asks for a rebuild when the build was made for another interpreter (a
    venv made again from another python3) or when the record of it is missing."""
    record = tmp_path / "built-for"
    monkeypatch.setattr(native, "BUILT_FOR", record)
    assert native.needs_build()  # no record: built by an older sipguard, or not at all
    record.write_text("3.11.0 /somewhere/else\n")
    assert native.needs_build()
    record.write_text(native.interpreter() + "\n")
    compiled, stale = native.status()
    if len(compiled) == len(native.HOT_MODULES) + len(native.C_MODULES) and not stale:
        assert not native.needs_build()  # the same interpreter, every module built and fresh
    assert native.interpreter() == f"{sys.version.split()[0]} {sys.base_prefix}"
