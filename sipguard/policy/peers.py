"""Who is sending: source address → peer, and the caller numbers each peer may present.

:class:`PeerTable` answers "which peer owns this source address?" with one dict lookup per
distinct prefix length in the config (a handful), not a scan over networks; the most specific
network wins. :class:`NumberSet` answers "may this peer present this number?" in O(length of the
number): exact numbers live in a set, ``+1212555*`` prefix patterns in a set of prefixes, and a
number is checked against each of its own prefixes.

Both are built once per config load (off the event loop for large ``numbers_file`` lists) and
never change afterwards: a reload builds new ones and swaps the reference. Compiled code never
lets go of the GIL on its own, so a build in a thread would hold the event loop for its whole
length (~0.5 s for a million lines): the loops over a list's lines call the shell's ``pause``
(``RuleState.pause``: it lets go of the GIL) every ``YIELD_EVERY`` entries, and a list that is
replaced is emptied the same way (:meth:`NumberSet.drain`) instead of being freed at once on
the loop.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final

from sipguard.addresses import unmapped

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# entries of a number list handled between two calls of ``pause`` (~1 ms of work)
YIELD_EVERY: Final = 4096
BAD_LINES_SHOWN: Final = 20  # a number list's bad lines named in its error, at most
CHUNK_CHARS: Final = 1 << 18  # of a list's text split into lines between two calls
Pause = Callable[[], None] | None  # see RuleState.pause


class NumberSet:
    """Exact numbers and prefix patterns (``+1555200*``), matched in O(len(number))."""

    __slots__ = ("exact", "prefixes", "_lengths", "match_all", "national")

    def __init__(self, patterns: Iterable[str] = (), pause: Pause = None) -> None:
        self.exact: set[str] = set()
        self.prefixes: set[str] = set()
        self.match_all = False
        self.national = False  # an entry not written in E.164 (2125550100, 0201234*)
        self._lengths: list[int] = []  # distinct prefix lengths, ascending
        self.extend(patterns, pause)

    def extend(self, patterns: Iterable[str], pause: Pause = None) -> None:
        """:meth:`add` each of ``patterns``, calling ``pause`` every ``YIELD_EVERY``."""
        for n, raw in enumerate(patterns, 1):
            self.add(raw)
            if pause is not None and n % YIELD_EVERY == 0:
                pause()

    def add(self, raw: str) -> None:
        """Add one number or ``prefix*``; a pattern without a digit is ignored (never a
        match-all by accident: only a lone ``*`` matches every number)."""
        pattern = raw.strip()
        if not pattern:
            return
        if pattern == "*":
            self.match_all = True
            return
        prefix = pattern.endswith("*")
        text = normalise_pattern(pattern[:-1] if prefix else pattern)
        if not text.lstrip("+"):
            return
        if not text.startswith("+"):
            self.national = True
        if not prefix:
            self.exact.add(text)
            return
        self.prefixes.add(text)
        if len(text) not in self._lengths:
            bisect.insort(self._lengths, len(text))

    def drain(self, pause: Pause = None) -> None:
        """Empty the set a few thousand entries at a time, calling ``pause`` between (from a
        thread, once nothing reads the set any more): a million numbers freed at once would
        hold the GIL ~50 ms."""
        for entries in (self.exact, self.prefixes):
            while entries:
                for _ in range(YIELD_EVERY):
                    if not entries:
                        break
                    entries.pop()
                if pause is not None:
                    pause()

    def __contains__(self, number: object) -> bool:
        if not isinstance(number, str):
            return False
        if self.match_all or number in self.exact:
            return True
        for n in self._lengths:
            if n > len(number):
                break
            if number[:n] in self.prefixes:
                return True
        return False

    def __len__(self) -> int:
        return len(self.exact) + len(self.prefixes)

    def __bool__(self) -> bool:
        return self.match_all or bool(self.exact) or bool(self.prefixes)


def normalise_pattern(text: str) -> str:
    """Drop visual separators from a configured number or prefix (``+1 (212) 555-`` →
    ``+1212555``)."""
    return "".join(c for c in text if c.isdigit() or c == "+")


# A configured number or pattern: "+12125550100", "+1 (212) 555-0100", "+1212555*", "*".
NUMBER_PATTERN = re.compile(r"\+?[0-9 ().-]*[0-9][0-9 ().-]*\*?|\*")


def read_number_file(path: Path, pause: Pause = None) -> list[str]:
    """One number or ``prefix*`` per line (any line ending); ``#`` starts a comment; blank
    lines ignored; ``pause`` called every ``YIELD_EVERY`` lines.

    Raises ValueError naming ``FILE:LINE`` for each line that is not a number or pattern (a
    typo in a block list must not pass unnoticed; the first :data:`BAD_LINES_SHOWN`, then how
    many more), OSError when the file cannot be read.
    """
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a number list file") from None
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[:exc.start]
        lines = before.splitlines()
        at = len(lines) + 1 if not lines or before.endswith((b"\n", b"\r")) else len(lines)
        raise ValueError(f"{path}:{at}: not UTF-8 text (a number list is one number or "
                         "prefix* per line)") from None
    out = []
    bad: list[str] = []  # the first bad lines, said
    bad_count = 0
    for lineno, line in enumerate(_lines(content, pause), 1):
        if pause is not None and lineno % YIELD_EVERY == 0:
            pause()
        text = line.split("#", 1)[0].strip()
        if text:
            if NUMBER_PATTERN.fullmatch(text) is None:
                bad_count += 1
                if len(bad) < BAD_LINES_SHOWN:
                    bad.append(f"{path}:{lineno}: {text[:40]!r} is not a number or a prefix "
                               "pattern like '+1212555*'")
                continue
            out.append(text)
    if bad:
        if bad_count > len(bad):
            bad.append(f"{path}: and {bad_count - len(bad)} more such lines")
        raise ValueError("\n".join(bad))
    return out


def _lines(content: str, pause: Pause) -> Iterator[str]:
    """``content.splitlines()`` a quarter of a MiB at a time (cut after a line feed), calling
    ``pause`` between: one call over a million lines holds the GIL ~30 ms."""
    if pause is None:
        yield from content.splitlines()
        return
    pos, size = 0, len(content)
    while pos < size:
        end = content.find("\n", pos + CHUNK_CHARS)
        end = size if end < 0 else end + 1
        yield from content[pos:end].splitlines()
        pos = end
        pause()


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    networks: tuple[IPNetwork, ...]
    numbers: NumberSet | None  # None: may present any number
    default_region: str | None
    trust_pai: bool
    # "international": traffic arriving over an international interconnection (rule national_cli)
    interconnect: str = "domestic"
    # set: the peer must also present a verified TLS client certificate naming this
    tls_subject: str | None = None


class PeerTable:
    """Source address → :class:`Peer`, most specific network first."""

    __slots__ = ("peers", "_by_len", "_seen")

    # Source addresses are few (a peer's SBCs), so answers are remembered per address string;
    # the memo is emptied when it reaches this size (an address spray cannot grow it).
    SEEN_MAX: ClassVar[int] = 4096

    def __init__(self, peers: Iterable[Peer]) -> None:
        self.peers: dict[str, Peer] = {}
        self._seen: dict[str, Peer | None] = {}
        by_len: dict[tuple[int, int], dict[int, Peer]] = {}
        for peer in peers:
            self.peers[peer.name] = peer
            for net in peer.networks:
                table = by_len.setdefault((net.version, net.prefixlen), {})
                table.setdefault(int(net.network_address), peer)
        # Longest prefixes first so the most specific network wins.
        self._by_len = sorted(by_len.items(), key=lambda kv: -kv[0][1])

    def __bool__(self) -> bool:
        return bool(self.peers)

    def lookup(self, address: str) -> Peer | None:
        """The peer owning ``address`` (IPv4, IPv6 or IPv4-mapped IPv6), or None."""
        seen = self._seen
        if address in seen:
            return seen[address]
        peer = self._lookup(address)
        if len(seen) >= self.SEEN_MAX:
            seen.clear()
        seen[address] = peer
        return peer

    def _lookup(self, address: str) -> Peer | None:
        try:
            ip = unmapped(ipaddress.ip_address(address))
        except ValueError:
            return None
        value = int(ip)
        bits = 32 if ip.version == 4 else 128
        for (version, length), table in self._by_len:
            if version != ip.version:
                continue
            key = value >> (bits - length) << (bits - length) if length else 0
            peer = table.get(key)
            if peer is not None:
                return peer
        return None
