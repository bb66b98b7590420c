"""Who is sending: source address → peer, and the caller numbers each peer may present.

:class:`PeerTable` answers "which peer owns this source address?" with one dict lookup per
distinct prefix length in the config (a handful), not a scan over networks; the most specific
network wins. :class:`NumberSet` answers "may this peer present this number?" in O(length of the
number): exact numbers live in a set, ``+1212555*`` prefix patterns in a set of prefixes, and a
number is checked against each of its own prefixes.

Both are built once per config load (off the event loop for large ``numbers_file`` lists) and
never change afterwards: a reload builds new ones and swaps the reference.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class NumberSet:
    """Exact numbers and prefix patterns (``+1555200*``), matched in O(len(number))."""

    __slots__ = ("exact", "prefixes", "_lengths", "match_all")

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.exact: set[str] = set()
        self.prefixes: set[str] = set()
        self.match_all = False
        for raw in patterns:
            self.add(raw)
        self._lengths = sorted({len(p) for p in self.prefixes})

    def add(self, raw: str) -> None:
        pattern = raw.strip()
        if not pattern:
            return
        if pattern == "*":
            self.match_all = True
        elif pattern.endswith("*"):
            self.prefixes.add(normalise_pattern(pattern[:-1]))
        else:
            self.exact.add(normalise_pattern(pattern))
        self._lengths = sorted({len(p) for p in self.prefixes})

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


def read_number_file(path: Path) -> list[str]:
    """One number or ``prefix*`` per line; ``#`` starts a comment; blank lines ignored."""
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            text = line.split("#", 1)[0].strip()
            if text:
                out.append(text)
    return out


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    networks: tuple[IPNetwork, ...]
    numbers: NumberSet | None  # None: may present any number
    default_region: str | None
    trust_pai: bool


class PeerTable:
    """Source address → :class:`Peer`, most specific network first."""

    __slots__ = ("peers", "_by_len")

    def __init__(self, peers: Iterable[Peer]) -> None:
        self.peers: dict[str, Peer] = {}
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
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
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
