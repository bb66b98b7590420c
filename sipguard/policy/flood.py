"""Rule ``flood``: floods and scanners from one address, dropped before parsing.

Not a step of the INVITE pipeline: the shell asks the :class:`FloodGuard` about every UDP
datagram and every framed TCP message *before* it is parsed (``check(addr, data, now)``, a dict
lookup or two), and drops it silently when the guard says so — no answer, because answering a
flood amplifies it and tells a scanner there is something here. Dropped messages are counted
by reason in the shell (``flood_dropped_<reason>``; ``flood_monitored_<reason>`` in monitor
mode); each ban is logged once (``source_banned``).

What it drops
    * ``banned``: anything from a banned source, until its ban ends.
    * ``flood``: a source sending more than ``density`` messages per ``sampling_s`` seconds
      (like Kamailio pike's sampling unit and density; the previous sampling unit counts in
      proportion to its overlap with the last ``sampling_s`` seconds, so a burst across a unit
      boundary is not missed). The message that crosses the line starts a ban of ``ban_s``.
    * ``peer_limited``: the same, from an address in a configured peer's networks: with
      ``ban_peers: false`` (the default) a peer is never banned for a flood, only rate-limited —
      the messages over its density in the sampling unit are dropped, the rest pass. A flood
      with spoofed carrier addresses then costs the carrier what exceeds its density while
      the flood lasts, not its calls for ``ban_s`` after. Dropped messages are not counted, so
      a peer flooded without end still gets ``density`` messages per ``sampling_s`` through.
    * ``scanner``: a message whose ``User-Agent`` contains one of ``scanners``
      (case-insensitive; friendly-scanner, sipvicious, sipcli, sip-scan, iWar, sundayddr,
      VaxSIPUserAgent, …). With ``scanner_ban`` the source is banned too — unless it is a
      configured peer (a carrier passing a scan on is not the scanner).
    * ``register_unknown``: a REGISTER from an address in no peer's networks, when peers are
      configured (``register_from_unknown: drop``). Not banned.

Who is never dropped
    The core (its address; with ``key: ip_port`` its address and port), addresses in
    ``exempt`` (CIDRs), and peers whose own ``rules.flood`` is ``enabled: false``. A peer's
    own ``rules.flood.density`` replaces the default for its addresses (a PBX sending OPTIONS
    for 2,000 extensions); of a peer override only ``enabled`` and ``density`` apply. The peer
    table is consulted only when a source crosses the default density or sends a REGISTER
    (and remembered per address), so the common path is a dict lookup or two (about 1 µs with
    the User-Agent test).

Parameters (``rules.flood``): ``sampling_s`` (2), ``density`` (300), ``ban_s`` (300),
``ban_peers`` (false: configured peers are rate-limited, never banned, for a flood),
``key`` (``ip``: ban addresses, an IPv6 one with its network of ``sip.ipv6_prefix`` bits,
:mod:`sipguard.addresses`; ``ip_port``: address and port, for many parties behind one
address — a lab on 127.0.0.1 — at the price of letting a scanner that changes ports
through), ``scanners``, ``scanner_ban`` (true), ``register_from_unknown`` (``drop``),
``exempt`` (``[]``), ``max_sources`` (100000: sources counted per sampling unit; beyond it new
sources go uncounted until the next unit), ``max_bans`` (100000: the oldest ban is lifted when
full). ``mode: monitor`` decides, bans and counts the same way, but nothing is dropped; a
ban made in monitor mode is not honoured once a reload turns the rule to enforce (the
source is counted afresh), so switching a tuned rule on does not black out the sources it
flagged while being tried.

State (counts and bans) lives in ``RuleState.flood`` (:mod:`sipguard.policy.state`), so a
reload keeps the bans.
:class:`FloodState` holds the ban operations (list, lift, lift all, sweep) for the admin API.

Known limitations
    * Spoofed source addresses: a UDP flood from random addresses is counted per address and
      none may cross the density; the kernel socket buffer (``sip.udp_receive_buffer``) is then
      the only bound. TCP connection floods (many connections, no messages) are not counted.
    * A flood spoofing a peer's address is limited, not told apart: the peer's own messages
      share its ``density`` with the attacker's for as long as the flood lasts.
    * The ``User-Agent`` test reads the header block as bytes; a folded (multi-line)
      User-Agent is only matched on its first line.
    * Only REGISTER is checked against the peer table here; other requests from unknown
      sources are handled by the policy (an INVITE gets 403 or silence, ``unknown_source``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from sipguard.addresses import source_key

if TYPE_CHECKING:
    from sipguard.policy.engine import BuildContext
    from sipguard.policy.flood_settings import Settings
    from sipguard.policy.peers import Peer, PeerTable


BANNED: Final = "banned"
FLOOD: Final = "flood"
SCANNER: Final = "scanner"
# A configured peer over its density (ban_peers: false): dropped, never banned. The edge core
# bans only on FLOOD (and SCANNER), so this is "drop, no new ban" (flood_dropped_peer_limited).
PEER_LIMITED: Final = "peer_limited"
REGISTER_UNKNOWN: Final = "register_unknown"
# What a peer over its density still gets through: the requests that complete or end a call
# and every response (a peer's ACK or BYE dropped for a burst keeps the call, and its slots,
# up until sip.max_dialog_lifetime_s). They stay counted; from others a flood is a flood.
_ENDS_CALLS: Final = (b"ACK ", b"BYE ", b"CANCEL ", b"SIP/2.0 ")
# ... up to this many times its density: beyond, a flood of them (spoofed, or a peer gone
# wrong) is limited like the rest.
EXEMPT_FACTOR: Final = 4

Key = str | tuple[str, int]


class Ban:
    __slots__ = ("since", "until", "reason", "dropped", "monitor")

    def __init__(self, since: float, until: float, reason: str, monitor: bool = False) -> None:
        self.since = since
        self.until = until
        self.reason = reason
        self.dropped = 0  # messages dropped under this ban (monitor: that would have been)
        # made in monitor mode: honoured (as "would drop") only while the rule stays in
        # monitor mode, never by an enforcing guard — as the dialer's monitored cooldowns
        self.monitor = monitor


class FloodState:
    """Counts and bans, kept over reloads; the ban operations of the admin API."""

    __slots__ = ("bans", "cur", "prev", "epoch", "unit", "on_ban", "ipv6_prefix")

    def __init__(self) -> None:
        self.bans: dict[Key, Ban] = {}
        self.cur: dict[Key, int] = {}  # messages per source in the current sampling unit
        self.prev: dict[Key, int] = {}  # ... in the previous one
        self.epoch = 0
        self.unit = 0.0
        # told of every new ban in enforce mode (the shell shares bans between instances);
        # must be O(1)
        self.on_ban: Callable[[Key, Ban], None] | None = None
        self.ipv6_prefix = 64  # the running guard's (sip.ipv6_prefix): how key_of reads an address

    def list_bans(self, now: float, limit: int = 0,
                  source: str | None = None) -> list[dict[str, Any]]:
        """Bans in force: address, reason, since, seconds left, messages dropped (for a ban
        made in monitor mode: ``monitor`` and the messages that would have been,
        ``monitored``); the first ``limit`` (0: all); ``source``: that one's ban only (looked
        up, as :meth:`lift` finds it)."""
        if source is not None:
            key = self.key_of(source)
            ban = self.bans.get(key) if key is not None else None
            return [_ban_entry(key, ban, now)] if ban is not None and ban.until > now else []
        out = []
        for key, ban in self.bans.items():
            if ban.until > now:
                out.append(_ban_entry(key, ban, now))
                if len(out) == limit:
                    break
        return out

    def bans_in_force(self, now: float) -> int:
        return sum([1 for ban in self.bans.values() if ban.until > now])

    def lift(self, source: str) -> bool:
        """Lift the ban on ``source`` (``ip``, or ``ip:port`` / ``[v6]:port`` for ``key:
        ip_port``); False when it was not banned."""
        key = self.key_of(source)
        if key is None:
            return False
        del self.bans[key]
        # a fresh start: the messages that crossed the density do not ban it again at once
        self.cur.pop(key, None)
        self.prev.pop(key, None)
        return True

    def key_of(self, source: str) -> Key | None:
        """The key of the ban ``source`` names (as :meth:`lift` takes it: the key as listed,
        or an IPv6 address inside a banned network); None: not banned."""
        if source in self.bans:
            return source
        network = source_key(source.strip("[]"), self.ipv6_prefix)
        if network in self.bans:
            return network
        host, sep, port = source.rpartition(":")
        if sep and port.isdigit():
            key = (host.strip("[]"), int(port))
            if key in self.bans:
                return key
        return None

    def rekey(self, ipv6_prefix: int) -> None:
        """``sip.ipv6_prefix`` changed (a reload): the bans on IPv6 networks are kept under
        the new networks (merged where several fall into one, the longest kept), and the
        counts start afresh."""
        old = self.ipv6_prefix
        self.ipv6_prefix = ipv6_prefix
        for key in [k for k in self.bans if isinstance(k, str) and ":" in k]:
            if "/" in key:  # a network: the new network of its first address
                new = source_key(key.partition("/")[0], ipv6_prefix)
            elif old >= 128:  # an address counted on its own until now: its network
                new = source_key(key, ipv6_prefix)
            else:
                continue  # a peer's or an exempt address: counted on its own either way
            ban = self.bans.pop(key)
            held = self.bans.get(new)
            if held is None or held.until < ban.until:
                self.bans[new] = ban
        self.cur, self.prev = {}, {}

    def lift_all(self) -> int:
        n = len(self.bans)
        self.bans.clear()
        self.cur, self.prev = {}, {}
        return n

    def sweep(self, now: float) -> int:
        """Forget bans that have ended (the shell calls this now and then)."""
        ended = [key for key, ban in self.bans.items() if ban.until <= now]
        for key in ended:
            del self.bans[key]
        return len(ended)


def _load_line_start() -> Callable[[bytes, bytes, int], int] | None:
    try:
        from sipguard.sip._scan import line_start
    except ImportError:
        return None
    return line_start


# The C search for header lines by their first byte (sipguard/sip/_scan.c); None: not built.
# Not Final, so that the tests can run the Python code too.
LINE_START = _load_line_start()
_LINE_STARTS: Final = (b"\nU", b"\nu")  # where a User-Agent line can start


def _scanner_line(scanner: re.Pattern[bytes], data: bytes) -> bool:
    """A User-Agent line in the header block that names a scanner (``scanner`` matches from
    the line's LF, within the line: the names have no CR or LF, see flood_settings). Only a
    line that starts with "U" or "u" can be one, so the pattern is tried only there. The C
    search finds those lines with one memchr per line (0.1 µs for an INVITE); the Python code
    with one ``find`` per letter (1.7 µs), and the end of the header block only once such a
    line turns up."""
    fast = LINE_START
    if fast is not None:
        pos = fast(data, b"Uu", 0)
        while pos >= 0:
            if scanner.match(data, pos) is not None:
                return True
            pos = fast(data, b"Uu", pos + 1)
        return False
    end = -2  # the end of the header block, -2 until it is looked for
    for start in _LINE_STARTS:
        pos = data.find(start)
        while pos >= 0:
            if end == -2:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    end = len(data)
            if pos >= end:
                break  # in the body
            if scanner.match(data, pos, end) is not None:
                return True
            pos = data.find(start, pos + 2, end)
    return False


class FloodGuard:
    """The pre-parse check the shell runs on every message; built per config."""

    __slots__ = (
        "state", "monitor", "unit", "density", "half", "ban_s", "ban_peers", "by_ip",
        "scanner", "scanner_ban", "register_drop", "trusted", "exempt", "peers", "peer_limits",
        "max_sources", "max_bans", "_sources", "ipv6_prefix", "_v6_keys",
    )

    def __init__(
        self,
        settings: Settings,
        mode: str,
        state: FloodState,
        peers: PeerTable | None = None,
        peer_settings: Iterable[tuple[Peer, Settings | None]] = (),
        trusted: Iterable[tuple[str, int]] = (),
        ipv6_prefix: int = 64,
    ) -> None:
        self.state = state
        self.ipv6_prefix = ipv6_prefix
        self.monitor = mode == "monitor"
        self.unit = settings.sampling_s
        self.density = settings.density
        self.ban_s = settings.ban_s
        self.ban_peers = settings.ban_peers
        self.by_ip = settings.key == "ip"
        names = [re.escape(s.strip().lower().encode()) for s in settings.scanners]
        self.scanner = (
            re.compile(rb"\nuser-agent[ \t]*:[^\r\n]*?(?:" + b"|".join(names) + rb")", re.I)
            if names else None
        )
        self.scanner_ban = settings.scanner_ban
        self.peers = peers if peers else None
        self.register_drop = settings.register_from_unknown == "drop" and self.peers is not None
        # never checked: the core (its address, or address and port with key: ip_port)
        self.trusted: frozenset[Key] = frozenset(
            a[0] if self.by_ip else (a[0], a[1]) for a in trusted
        )
        self.exempt = settings.exempt
        # peer name -> its density (None: exempt)
        self.peer_limits: dict[str, int | None] = {}
        for peer, own in peer_settings:
            self.peer_limits[peer.name] = None if own is None or not own.enabled else own.density
        self.max_sources = settings.max_sources
        self.max_bans = settings.max_bans
        # a source is looked at once it holds half the smallest density that may apply to it
        # (a peer's own may be below the default)
        self.half = min([settings.density, *(d for d in self.peer_limits.values()
                                              if d is not None)]) // 2
        # address -> (density that applies or None when exempt, in a peer's networks): cache
        self._sources: dict[str, tuple[int | None, bool]] = {}
        self._v6_keys: dict[str, str] = {}  # IPv6 address -> the key it is counted under

    def check(self, addr: tuple[str, int], data: bytes, now: float) -> str | None:
        """None to let the message through, else why it is dropped (a reason constant)."""
        ip = addr[0]
        key: Key = ip if self.by_ip else addr
        if key in self.trusted:
            return None
        if ":" in ip and self.by_ip:
            key = self._v6_key(ip)
        state = self.state
        bans = state.bans
        if bans:
            ban = bans.get(key)
            if ban is not None:
                if ban.until <= now:
                    del bans[key]
                elif self.monitor or not ban.monitor:
                    ban.dropped += 1
                    return BANNED
                # else a ban made in monitor mode, now enforcing: counted afresh below
        position = now / self.unit
        epoch = int(position)
        if epoch != state.epoch:
            state.prev = state.cur if epoch == state.epoch + 1 else {}
            state.cur = {}
            state.epoch = epoch
        cur = state.cur
        n = cur.get(key, 0) + 1
        if n > 1 or len(cur) < self.max_sources:
            cur[key] = n
        prev = state.prev
        before = prev.get(key, 0) if prev else 0  # a burst across the boundary counts whole
        if n > self.half or before:
            estimate = n + int(before * (1.0 - (position - epoch)))
            if estimate > self.half:
                limit, peer = self.source(ip)
                if limit is not None and estimate > limit:
                    if not (peer and not self.ban_peers):
                        self._ban(key, now, FLOOD)
                        return FLOOD
                    if not data.startswith(_ENDS_CALLS) or estimate > EXEMPT_FACTOR * limit:
                        # rate-limited: only what passes counts, so a peer flooded without
                        # end still gets `limit` messages per sampling unit through
                        if n > 1:
                            cur[key] = n - 1
                        else:
                            cur.pop(key, None)
                        return PEER_LIMITED
                    # a peer's ACK, BYE, CANCEL or answer goes on over its density: dropped,
                    # a call it ended would stay up (and hold its slots) for hours
        scanner = self.scanner
        if scanner is not None and _scanner_line(scanner, data):
            limit, peer = self.source(ip)
            if limit is None:
                return None  # exempt (or a peer with the rule off): never dropped
            if self.scanner_ban and not peer:
                self._ban(key, now, SCANNER)
            return SCANNER
        if self.register_drop and data.startswith(b"REGISTER "):
            limit, peer = self.source(ip)
            if not peer and limit is not None:
                return REGISTER_UNKNOWN
        return None

    def activate(self) -> None:
        """When the policy that built this guard is swapped in: a new sampling unit starts
        counting afresh (bans are kept)."""
        state = self.state
        if state.ipv6_prefix != self.ipv6_prefix:
            state.rekey(self.ipv6_prefix)
        if state.unit != self.unit:
            state.cur, state.prev, state.epoch, state.unit = {}, {}, 0, self.unit

    def banned(self, addr: tuple[str, int]) -> bool:
        """Whether the source of ``addr`` is banned now (whatever the time)."""
        ip = addr[0]
        key: Key = addr if not self.by_ip else (self._v6_key(ip) if ":" in ip else ip)
        ban = self.state.bans.get(key)
        return ban is not None and (self.monitor or not ban.monitor)

    def _v6_key(self, ip: str) -> str:
        """What an IPv6 source is counted and banned under: its network of ``ipv6_prefix``
        bits — unless it is in a configured peer's or an exempt network, which keeps its own
        address (a peer listed by address must not share a ban or a count with its
        neighbours in the /64). Remembered per address (up to 10,000, then afresh)."""
        keys = self._v6_keys
        key = keys.get(ip)
        if key is None:
            limit, peer = self.source(ip)
            key = ip if peer or limit is None else source_key(ip, self.ipv6_prefix)
            if len(keys) >= 10_000:
                keys.clear()
            keys[ip] = key
        return key

    def peer_of(self, ip: str) -> Peer | None:
        return self.peers.lookup(ip) if self.peers is not None else None

    def limit_for(self, ip: str) -> int | None:
        """The density that applies to ``ip``; None when it is exempt."""
        return self.source(ip)[0]

    def source(self, ip: str) -> tuple[int | None, bool]:
        """What applies to ``ip``: its density (None when exempt) and whether it is in a
        configured peer's networks. Remembered per address (up to 10,000, then afresh)."""
        sources = self._sources
        known = sources.get(ip)
        if known is not None:
            return known
        limit: int | None = self.density
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            address = None
        peer = self.peer_of(ip)
        if address is not None and any(address in net for net in self.exempt):
            limit = None
        elif peer is not None and peer.name in self.peer_limits:
            limit = self.peer_limits[peer.name]
        if len(sources) >= 10_000:
            sources.clear()
        known = sources[ip] = (limit, peer is not None)
        return known

    def _ban(self, key: Key, now: float, reason: str) -> None:
        bans = self.state.bans
        if len(bans) >= self.max_bans and not self.state.sweep(now):
            del bans[next(iter(bans))]
        ban = bans[key] = Ban(now, now + self.ban_s, reason, self.monitor)
        on_ban = self.state.on_ban
        if on_ban is not None and not self.monitor:  # a monitor-mode ban stays here
            on_ban(key, ban)


def guard(
    settings: Settings | None,
    mode: str,
    state: FloodState,
    peers: PeerTable | None = None,
    peer_settings: Iterable[tuple[Peer, Settings | None]] = (),
    trusted: Iterable[tuple[str, int]] = (),
    ipv6_prefix: int = 64,
) -> FloodGuard | None:
    """The edge core's guard for the top-level ``rules.flood`` (None when absent or disabled).

    ``peer_settings`` pairs each configured peer with its merged ``rules.flood``; ``trusted``
    lists (address, port) pairs never checked (the core); ``ipv6_prefix`` (``sip.ipv6_prefix``)
    how many bits of an IPv6 source make its key with ``key: ip``.
    """
    if settings is None or not settings.enabled:
        return None
    return FloodGuard(settings, settings.mode or mode, state, peers, peer_settings,
                      trusted, ipv6_prefix)


def build(settings: Settings, ctx: BuildContext, peer: Peer | None) -> None:
    """Not an INVITE pipeline rule: the edge core runs the :class:`FloodGuard` on every
    message before it is parsed (``Policy.flood``)."""
    return None


def _ban_entry(key: Any, ban: Ban, now: float) -> dict[str, Any]:
    return {
        "source": key if isinstance(key, str) else f"{key[0]}:{key[1]}",
        "reason": ban.reason,
        "banned_s": round(now - ban.since, 1),
        "left_s": round(ban.until - now, 1),
        ("monitored" if ban.monitor else "dropped"): ban.dropped,
        **({"monitor": True} if ban.monitor else {}),
    }
