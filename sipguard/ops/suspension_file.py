"""The API's suspensions on disk (``state_dir``): a snapshot and an append-only journal.

    suspensions.json      {"suspensions": [entry, ...]}   the state at the last compaction
    suspensions.journal   one JSON object a line, in order: {"add": entry} or {"lift": key}

An entry is :meth:`sipguard.policy.suspensions.SuspensionStore.dump`'s: key, reason, by, and
``created`` / ``expires`` as Unix times. A change appends its line and syncs it before the
operator hears it was saved: one short write, however many suspensions there are (rewriting
the whole file for each change made a thousand suspensions one by one cost a thousand whole
files). Once the journal outgrows the snapshot (and COMPACT_MIN_BYTES), the snapshot is
rebuilt from the two files themselves — never from a process's memory: with several workers
each appends the changes it took — and the journal emptied. Every step holds an exclusive
``flock`` on the journal, so workers' appends and a compaction never interleave. A crash
between the snapshot's replacement and the journal's truncation replays lines the snapshot
already holds, which changes nothing (the last line for a key decides).

Loading replays the journal over the snapshot. A line that cannot be read — one a crash cut
short, whose change was never confirmed — is skipped and reported with its line number;
entries that ran out are dropped.
Blocking file I/O: call from a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

SNAPSHOT: Final = "suspensions.json"
JOURNAL: Final = "suspensions.journal"
COMPACT_MIN_BYTES: Final = 256 * 1024  # a journal this small is never worth a rewrite


class StateFileError(ValueError):
    """A state file sipguard cannot read: the message names the file (and line)."""


class SuspensionFile:
    """The files of one ``state_dir``; see the module docstring."""

    def __init__(self, state_dir: Path) -> None:
        self.snapshot = state_dir / SNAPSHOT
        self.journal = state_dir / JOURNAL

    # ------------------------------------------------------------------ reading
    def read(self) -> tuple[list[dict[str, Any]], list[int]]:
        """The entries in force (snapshot plus journal, the expired left out) and the
        numbers of the journal lines skipped as unreadable (cut short by a crash). Raises OSError when the folder
        cannot be used (made if missing; it must be writable), StateFileError for a file
        that is not sipguard's."""
        folder = self.snapshot.parent
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable by this user", str(folder))
        with self._locked():
            return self._replayed()

    def check(self) -> None:
        """What :meth:`read` would refuse, found without making, locking or changing
        anything (``check-config``): OSError when the folder is no folder, or it (or, while
        missing, the folder it would be made in) is not writable; StateFileError for a
        snapshot that is not sipguard's."""
        folder = self.snapshot.parent
        existing = folder
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a folder", str(existing))
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable by this user", str(existing))
        if folder.exists():
            self._replayed()

    def _replayed(self) -> tuple[list[dict[str, Any]], list[int]]:
        entries: dict[str, dict[str, Any]] = {}
        try:
            text = self.snapshot.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = None
        if text is not None:
            try:
                items = json.loads(text)["suspensions"]
                for item in items:
                    entries[_key_of(item)] = item
            except (ValueError, KeyError, TypeError) as exc:
                raise StateFileError(f"cannot read suspensions from {self.snapshot}: "
                                     f"{exc}") from None
        skipped: list[int] = []
        try:
            with self.journal.open("rb") as fh:
                for number, line in enumerate(fh, 1):
                    try:
                        change = json.loads(line)
                        if "add" in change:
                            entries[_key_of(change["add"])] = change["add"]
                        else:
                            lifted = change["lift"]
                            if not isinstance(lifted, str):
                                raise TypeError("lift takes a key")
                            entries.pop(lifted, None)
                    except (ValueError, KeyError, TypeError):
                        skipped.append(number)
        except FileNotFoundError:
            pass
        now = time.time()
        live = [e for e in entries.values() if e["expires"] is None or e["expires"] > now]
        return live, skipped

    # ------------------------------------------------------------------ writing
    def append(self, changes: list[dict[str, Any]]) -> None:
        """Append ``changes`` (``{"add": entry}`` / ``{"lift": key}``) and sync them; then
        compact if the journal has outgrown the snapshot. Raises OSError."""
        data = b"".join(json.dumps(c, separators=(",", ":")).encode() + b"\n" for c in changes)
        self.snapshot.parent.mkdir(parents=True, exist_ok=True)
        with self._locked() as fd:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a line cut short by a crash stays a line of its own
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fdatasync(fd)
            size = os.fstat(fd).st_size
            try:
                snapshot_size = self.snapshot.stat().st_size
            except FileNotFoundError:
                snapshot_size = 0
            if size > max(COMPACT_MIN_BYTES, snapshot_size):
                self._compact(fd)

    def compact(self) -> None:
        """Rebuild the snapshot from the files and empty the journal. Raises OSError,
        StateFileError."""
        self.snapshot.parent.mkdir(parents=True, exist_ok=True)
        with self._locked() as fd:
            self._compact(fd)

    def _compact(self, fd: int) -> None:
        entries, _ = self._replayed()
        # a temporary file left by a writer killed mid-write (they are made under the lock
        # held here, so none is in use): it holds numbers, and nothing else removes it
        for stale in self.snapshot.parent.glob(glob.escape(SNAPSHOT) + "*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
        write_atomic(self.snapshot, {"suspensions": entries})
        os.ftruncate(fd, 0)
        os.fsync(fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """The journal open for appending, under an exclusive flock."""
        fd = os.open(self.journal, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # (the lock goes with it)


def write_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file in its folder, synced, and
    os.replace: a reader sees the old file or the new one, never part of one."""
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _key_of(entry: Any) -> str:
    """An entry's key, once its fields are checked (KeyError / TypeError otherwise)."""
    key = entry["key"]
    if not isinstance(key, str) or not isinstance(entry["reason"], str) \
            or not isinstance(entry["by"], str):
        raise TypeError("key, reason and by must be strings")
    for name in ("created", "expires"):
        value = entry[name]
        if isinstance(value, bool) or not (isinstance(value, int | float) or
                                           (value is None and name == "expires")):
            raise TypeError(f"{name} must be a number")
    return key
