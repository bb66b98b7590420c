"""state_dir's suspensions on disk: a snapshot and an append-only journal, real files."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sipguard.ops import suspension_file
from sipguard.ops.suspension_file import StateFileError, SuspensionFile


def entry(key: str, expires: float | None = None, reason: str = "fraud") -> dict[str, Any]:
    return {"key": key, "reason": reason, "by": "alice", "created": time.time(),
            "expires": expires}


def keys(file: SuspensionFile) -> set[str]:
    return {e["key"] for e in file.read()[0]}


def test_changes_are_appended_one_line_each_and_replayed_in_order(tmp_path: Path) -> None:
    """Each change is a line of the journal (the snapshot untouched); reading replays them:
    a lift removes, a later add of the same key replaces, an expired entry is left out."""
    file = SuspensionFile(tmp_path / "state")
    file.append([{"add": entry("+31201234567")}])
    file.append([{"add": entry("+3120*")}, {"add": entry("+44207*", expires=time.time() - 1)}])
    file.append([{"lift": "+31201234567"}])
    file.append([{"add": entry("+3120*", reason="ring 12")}])
    assert not file.snapshot.exists()
    assert len(file.journal.read_bytes().splitlines()) == 5
    entries, skipped = file.read()
    assert skipped == []
    assert [(e["key"], e["reason"]) for e in entries] == [("+3120*", "ring 12")]


def test_a_compaction_folds_the_journal_into_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the journal outgrows the snapshot (and the minimum), the snapshot is rebuilt
    from the two files and the journal emptied; nothing is lost, lifted entries are gone."""
    monkeypatch.setattr(suspension_file, "COMPACT_MIN_BYTES", 2_000)
    file = SuspensionFile(tmp_path)
    for n in range(40):
        file.append([{"add": entry(f"+3120{n:07d}")}])
        if n % 4 == 0:
            file.append([{"lift": f"+3120{n:07d}"}])
    assert file.snapshot.exists()
    assert file.journal.stat().st_size <= max(2_000, file.snapshot.stat().st_size)
    assert keys(file) == {f"+3120{n:07d}" for n in range(40) if n % 4}
    in_snapshot = {e["key"] for e in json.loads(file.snapshot.read_text())["suspensions"]}
    assert "+31200000000" not in in_snapshot  # lifted: off the disk once folded
    file.compact()
    assert file.journal.stat().st_size == 0
    assert keys(file) == {f"+3120{n:07d}" for n in range(40) if n % 4}


def test_a_line_cut_short_by_a_crash_is_skipped_and_named(tmp_path: Path) -> None:
    """A crash in the middle of an append leaves part of a line: the next append starts a
    line of its own, and reading skips the torn one, naming its line number."""
    file = SuspensionFile(tmp_path)
    file.append([{"add": entry("+31201234567")}])
    with file.journal.open("ab") as fh:
        fh.write(b'{"add":{"key":"+3140')  # the crash
    file.append([{"add": entry("+31301234567")}])
    entries, skipped = file.read()
    assert skipped == [2]
    assert {e["key"] for e in entries} == {"+31201234567", "+31301234567"}


def test_a_snapshot_that_is_not_sipguards_is_an_error_naming_it(tmp_path: Path) -> None:
    file = SuspensionFile(tmp_path)
    file.snapshot.write_text('{"suspensions": [{"key": 12}]}')
    with pytest.raises(StateFileError, match="suspensions.json"):
        file.read()
    file.snapshot.write_text("not json")
    with pytest.raises(StateFileError, match="suspensions.json"):
        file.read()


def test_writers_appending_and_compacting_at_once_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four writers (as several workers would: each its own open file) append 150 changes
    each while compactions run: every change is on disk afterwards."""
    monkeypatch.setattr(suspension_file, "COMPACT_MIN_BYTES", 3_000)
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        file = SuspensionFile(tmp_path)
        try:
            for n in range(150):
                file.append([{"add": entry(f"+31{worker}{n:08d}")}])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert keys(SuspensionFile(tmp_path)) == {
        f"+31{w}{n:08d}" for w in range(4) for n in range(150)}


def test_a_compaction_removes_what_a_writer_killed_mid_write_left(tmp_path: Path) -> None:
    """A writer killed between making its temporary snapshot and renaming it leaves the
    file behind (numbers in it): the next compaction removes it."""
    file = SuspensionFile(tmp_path)
    file.append([{"add": entry("+31201234567")}])
    stale = tmp_path / "suspensions.jsonab12cd.tmp"
    stale.write_text('{"suspensions": [')
    file.compact()
    assert not stale.exists() and keys(file) == {"+31201234567"}
