"""Numbers suspended by an operator at run time (the admin API), besides the config's list.

A :class:`SuspensionStore` holds exact numbers (``+31201234567``) and prefix patterns
(``+3120*``), each with who made it, why, when, and when it runs out (loop time; ``None``:
until lifted). It is matched the way :class:`~sipguard.policy.peers.NumberSet` matches: a dict
lookup for the exact number, then one per distinct prefix length in the store — cheap enough
for every INVITE. It lives in :class:`~sipguard.policy.state.RuleState`, so it outlives every
reload; the policy consults it together with the config's ``suspended:`` list.

No clock is read here: every method that cares about time is given ``now``. Saving to and
loading from disk is the shell's (:meth:`SuspensionStore.dump` / :meth:`SuspensionStore.load`
give and take plain data with Unix times).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from sipguard.policy.peers import NUMBER_PATTERN, normalise_pattern


@dataclass(frozen=True, slots=True)
class Suspension:
    """One suspended number or prefix. ``key`` is the normalised pattern (``+3120*`` for a
    prefix); ``created`` and ``expires`` are loop times."""

    key: str
    reason: str
    by: str
    created: float
    expires: float | None

    @property
    def prefix(self) -> bool:
        return self.key.endswith("*")

    def live(self, now: float) -> bool:
        return self.expires is None or self.expires > now

    def as_dict(self, now: float) -> dict[str, Any]:
        """For the admin API: ``number`` or ``prefix``, reason, by, age and time left."""
        return {
            ("prefix" if self.prefix else "number"): self.key,
            "reason": self.reason,
            "by": self.by,
            "age_s": round(now - self.created, 1),
            "expires_in_s": None if self.expires is None else round(self.expires - now, 1),
            "source": "api",
        }


MAX_KEY_DIGITS: Final = 32  # E.164 has 15; room for national plans and extensions


def suspension_key(text: str) -> str:
    """The store key for a number or ``prefix*`` as given (separators dropped). Raises
    ValueError for anything else (a lone ``*`` is refused: it would suspend every number)."""
    raw = text.strip()
    if raw == "*" or NUMBER_PATTERN.fullmatch(raw) is None:
        raise ValueError(f"{text[:40]!r} is not a number or a prefix pattern like '+3120*'")
    prefix = raw.endswith("*")
    key = normalise_pattern(raw[:-1] if prefix else raw)
    if len(key) > MAX_KEY_DIGITS + 1:
        raise ValueError(f"{text[:40]!r}: more than {MAX_KEY_DIGITS} digits is no number")
    return key + "*" if prefix else key


class SuspensionStore:
    """Suspended numbers and prefixes, matched in O(len(number)); listed in key order, a page
    at a time (:meth:`page`)."""

    __slots__ = ("exact", "prefixes", "_lengths", "_order", "_added", "_gone")

    def __init__(self) -> None:
        self.exact: dict[str, Suspension] = {}
        self.prefixes: dict[str, Suspension] = {}  # keyed without the trailing "*"
        self._lengths: list[int] = []  # distinct prefix lengths, ascending
        # every key in order, made by the first page asked for (None until then); kept up to
        # date lazily: keys added since go to _added, keys lifted since (still in _order) to
        # _gone, and the next page folds both in — no O(n) list insert or delete per change,
        # so 100,000 suspensions loaded or lifted one by one stay O(1) each
        self._order: list[str] | None = None
        self._added: set[str] = set()
        self._gone: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.exact) or bool(self.prefixes)

    def __len__(self) -> int:
        return len(self.exact) + len(self.prefixes)

    def entries(self) -> list[Suspension]:
        return [*self.exact.values(), *self.prefixes.values()]

    def get(self, key: str) -> Suspension | None:
        if key.endswith("*"):
            return self.prefixes.get(key[:-1])
        return self.exact.get(key)

    def match(self, number: str | None, now: float) -> Suspension | None:
        """The live suspension covering ``number`` (exact first, then the longest prefix)."""
        if number is None:
            return None
        found = self.exact.get(number)
        if found is not None and found.live(now):
            return found
        if self.prefixes:
            best: Suspension | None = None
            for n in self._lengths:
                if n > len(number):
                    break
                entry = self.prefixes.get(number[:n])
                if entry is not None and entry.live(now):
                    best = entry
            return best
        return None

    def add(
        self, key: str, reason: str, by: str, now: float, ttl: float | None = None,
        keep_expiry: bool = False, default_by: str = "",
    ) -> Suspension:
        """Suspend ``key`` (from :func:`suspension_key`); replaces an entry for the same key,
        keeping its age, and its reason and author where the new one gives none (suspend
        again to end the calls, or to change the expiry, and the ticket stays). ``ttl``:
        seconds until it lifts itself (None: never) — or, with ``keep_expiry``, None keeps
        the expiry of the entry it replaces (suspending again to end the calls does not make
        a suspension of an hour permanent). ``default_by``: the author of a new entry given
        none."""
        old = self.prefixes.get(key[:-1]) if key.endswith("*") else self.exact.get(key)
        created = now
        expires = None if ttl is None else now + ttl
        if old is not None and old.live(now):
            reason, by, created = reason or old.reason, by or old.by, old.created
            if keep_expiry and ttl is None:
                expires = old.expires
        entry = Suspension(key, reason, by or default_by, created, expires)
        self._put(entry)
        return entry

    def _put(self, entry: Suspension) -> None:
        if entry.prefix:
            text = entry.key[:-1]
            if self._order is not None and text not in self.prefixes:
                self._note_added(entry.key)
            self.prefixes[text] = entry
            if len(text) not in self._lengths:
                bisect.insort(self._lengths, len(text))
        else:
            if self._order is not None and entry.key not in self.exact:
                self._note_added(entry.key)
            self.exact[entry.key] = entry

    def lift(self, key: str) -> Suspension | None:
        """Remove ``key``; the entry removed, or None when it was not suspended."""
        if not key.endswith("*"):
            found = self.exact.pop(key, None)
        else:
            text = key[:-1]
            found = self.prefixes.pop(text, None)
            if found is not None and all(len(p) != len(text) for p in self.prefixes):
                self._lengths.remove(len(text))
        if found is not None and self._order is not None:
            if key in self._added:
                self._added.discard(key)
            else:
                self._gone.add(key)
        return found

    def _note_added(self, key: str) -> None:
        if key in self._gone:
            self._gone.discard(key)  # lifted and added again: still in _order
        else:
            self._added.add(key)

    def _sorted(self) -> list[str]:
        """Every key, in order (see ``_order``)."""
        order = self._order
        if order is None:
            order = [*self.exact, *(p + "*" for p in self.prefixes)]
            order.sort()
        else:
            if self._gone:
                gone = self._gone
                order = [k for k in order if k not in gone]
            if len(self._added) <= 64:
                for key in self._added:
                    bisect.insort(order, key)
            else:
                order.extend(self._added)
                order.sort()
        self._order = order
        self._added = set()
        self._gone = set()
        return order

    def page(self, after: str | None, limit: int, prefix: str, now: float
             ) -> tuple[list[Suspension], int, bool]:
        """Up to ``limit`` live entries in key order, their keys after ``after`` (None: from
        the first) and starting with ``prefix`` (``""``: every one); how many keys start
        with ``prefix`` (expired ones not yet swept included); whether more follow."""
        order = self._sorted()
        start = bisect.bisect_left(order, prefix)
        end = bisect.bisect_left(order, prefix + "\U0010ffff", start) if prefix else len(order)
        total = end - start
        if after is not None:
            start = max(start, bisect.bisect_right(order, after, 0, end))
        out: list[Suspension] = []
        i = start
        while i < end and len(out) < limit:
            entry = self.get(order[i])
            if entry is not None and entry.live(now):
                out.append(entry)
            i += 1
        return out, total, i < end

    def sweep(self, now: float) -> list[Suspension]:
        """Remove the suspensions that have run out; the ones removed."""
        ended = [e for e in self.entries() if not e.live(now)]
        for entry in ended:
            self.lift(entry.key)
        return ended

    # ------------------------------------------------------------------ persistence (data only)
    def dump(self, wall_offset: float) -> list[dict[str, Any]]:
        """Every entry as plain data with Unix times (``wall_offset`` = Unix time − loop time)."""
        return [dump_entry(e, wall_offset) for e in self.entries()]

    def load(self, items: Iterable[dict[str, Any]], wall_offset: float, now: float) -> int:
        """Add the entries of a :meth:`dump` that have not run out; how many. Raises ValueError
        (or KeyError / TypeError) for data that is not a dump."""
        added = 0
        for item in items:
            expires = item["expires"]
            entry = Suspension(
                suspension_key(str(item["key"])),
                str(item["reason"]),
                str(item["by"]),
                float(item["created"]) - wall_offset,
                None if expires is None else float(expires) - wall_offset,
            )
            if entry.live(now):
                self._put(entry)
                added += 1
        return added


def dump_entry(entry: Suspension, wall_offset: float) -> dict[str, Any]:
    """One entry as :meth:`SuspensionStore.dump` gives it."""
    return {
        "key": entry.key,
        "reason": entry.reason,
        "by": entry.by,
        "created": entry.created + wall_offset,
        "expires": None if entry.expires is None else entry.expires + wall_offset,
    }
