"""The link between the workers on one host (``workers`` > 1): the operator's changes every
worker applies (either ``worker_spread``), and with ``worker_spread: caller`` the datagrams
handed from one worker to another.

Every worker binds the public UDP address with SO_REUSEPORT, and the kernel picks the socket
by the datagram's source address and port: one trunk (one address, one port) would land on
one worker whatever the number of workers. So the worker that reads a datagram on the public
address runs the flood guard on it (the flood counts stay per source, as with one process),
then picks the worker that owns it:

- an in-dialog request (a To tag) whose top Route names a worker's own port (the
  Record-Route that worker wrote: a party that sends every request to one outbound-proxy
  address, the public one, with the route set in Route) goes to that worker, whichever side
  of the call sends it — a BYE from the core carries the *callee* in From, and would
  otherwise hash to a worker that does not hold the dialog (481); a response whose top Via
  names a worker's own port likewise. Never an initial request: a caller that wrote a worker's
  port in its own Route would otherwise pick the worker that decides each of its calls, and
  split its calls from the dialer analytics kept per worker;
- anything else by its *caller*: the user part of the From URI, hashed with CRC-32, modulo
  the number of workers (the Call-ID when there is no From user) — of a number (a user
  starting with ``+``, a digit, ``(`` or ``%``), its last eight digits, so the spellings the
  rules read as one caller (``+12125551402``, ``2125551402``) have one owner. Every message of a call
  the caller's side sends to the public address — the INVITE, its retransmissions, its
  CANCEL, the ACK of a failure answer, an ACK or BYE without Route — carries the same From,
  so they all reach the owner.

What follows Via and Record-Route to the address they name comes to the owner's own port
without a hand-over. A caller's calls stay on one worker, so the dialer's per-caller
analytics (sequential runs, short calls) see all of them; the limits counted across workers
live in the shared state store (``state.backend: shared_memory`` or ``redis``).

The hand-over is a UDP socket per worker on 127.0.0.1 (an ephemeral port, published as
``worker-<i>.port`` in the directory the supervisor made for this host's workers, mode 0700).
Not a Unix datagram socket: Linux queues at most ``net.unix.max_dgram_qlen`` (10 by default)
datagrams on one, and a burst of a few dozen INVITEs overflowed it. Any local process can send
to a loopback port, so every envelope carries the group's 16-byte secret (``token``, made by
the supervisor, 0600), compared in constant time; an envelope without it is counted
(``worker_handover_bad``) and dropped. An envelope is::

    b"SGW2" | secret (16) | kind: b"B" datagrams, b"C" change, b"H" hello | ...
    B: the sender's lag (2 bytes, ms) | records, each: local socket index (1 byte) |
       port (2 bytes) | address length (1) | datagram length (2) | address | datagram
    C: a JSON object — an operator's change (below)
    H: the sender's index (1 byte) and hand-over port (2 bytes), sent at its start

The datagrams handed to one worker during one pass of the event loop travel together, in one
envelope per destination (up to ``BATCH_BYTES``), sent when the server flushes its answers at
the end of the pass: one send and one receive per pass instead of per datagram.

A worker starting reads the others' port files after writing its own and says hello to each
it found; one started later says hello to it in turn, so every pair learns the other's port
however they start, and a restarted worker's new port replaces the old one at once.

The same sockets carry the operator's changes that every worker must apply at once: a
suspension added or lifted, a flood ban lifted, through the admin API of any one worker, is
applied there and then sent to every other worker, which applies it too — without Redis,
that is how ``sipguard suspend`` reaches the calls on every worker. With ``worker_spread:
source`` the sockets are opened for these changes alone (``handover=False``): the kernel's
choice is kept, nothing is handed over, and a ``B`` envelope is refused
(``worker_handover_bad``).

A worker (re)started, or not up yet, when a change is sent misses it: the change went to its
old port, or to none. It reads the suspensions from the workers' directory at its start, but
a change sent just before may not be written there yet (the sender writes it after sending).
So every worker keeps the changes it sent in the last ``REPLAY_S`` seconds (at most
``REPLAY_MAX``) and sends them again to a worker whose hello brings a new port; and a
starting worker holds the changes it receives (at most ``HELD_MAX``) until it has read the
directory (:meth:`WorkerLink.start_control`), then applies them in the order they were
made (each change carries ``at``, the host's monotonic clock when it was sent: one clock for
every worker) — a lift that arrived first is not undone by the file read after it, and one
worker's change sent again is not applied after a later change another worker made. Beyond
``HELD_MAX`` a change is dropped (``worker_control_dropped``). A suspension sent again
carries what is left of its ``ttl``.

A datagram that cannot be handed over (the owner's port is not known: it is starting) is
handled where it was read (``worker_handover_failed``): the call still gets an answer. While
the reading worker is overloaded (behind in reading its queues), a new call it reads is not
handed over but shed where it was read, 503 + Retry-After, like the calls it owns: it has
waited in this worker's queue, and handed over late it would only add to the owner's load.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import re
import socket
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, Final

from sipguard.contract import Flow
from sipguard.transport.udp import (
    SO_RCVBUFFORCE,
    WATCH_EVERY,
    arrival_delay,
    enable_arrival_stamps,
    queue_reading,
    set_buffer,
)

MAGIC: Final = b"SGW2"
SECRET_BYTES: Final = 16
TOKEN_FILE: Final = "token"
_RECORD: Final = struct.Struct("!BHBH")
BATCH_BYTES: Final = 60_000  # an envelope's records at most (a UDP datagram holds 65,507)
_HELLO: Final = struct.Struct("!BH")
_LAG: Final = struct.Struct("!H")
READS_PER_WAKE: Final = 64  # envelopes read per wake-up before the loop runs other work
RECEIVE_BUFFER: Final = 8 * 1024 * 1024
MAX_ENVELOPE: Final = 65536 + 128
REPLAY_S: Final = 30.0  # the changes sent this recently are sent again to a worker (re)started
REPLAY_MAX: Final = 256  # ... at most this many (the older ones are in the directory by then)
HELD_MAX: Final = 1024  # changes a starting worker holds until it has read the directory

# Where a header line starts (the name, then its value up to the line's end): the scans below
# read the first such line of the header block, its folds joined. Enough to pick an owner, not
# a parse — but read as the parser reads it where that picks the worker: the URI inside <>
# (not a quoted display name), a tag among the header's own parameters (not the URI's).
_FROM: Final = re.compile(rb"\n(?:from|f)[ \t]*:([^\r\n]*)", re.IGNORECASE)
_TO: Final = re.compile(rb"\n(?:to|t)[ \t]*:([^\r\n]*)", re.IGNORECASE)
_CALL_ID = re.compile(rb"\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE)
_TAG_PARAM: Final = re.compile(rb";[ \t]*tag[ \t]*=", re.IGNORECASE)

# The first Route line of a request, the first Via line of a response: their first value.
_TOP_ROUTE = re.compile(rb"\nroute[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE)
_TOP_VIA = re.compile(rb"\n(?:via|v)[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE)
_VIA_PORT = re.compile(rb"SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*\w+[ \t]+(?:\[[^\]]*\]|[^:;,\s]+)"
                       rb"[ \t]*:[ \t]*(\d{1,5})", re.IGNORECASE)


def _head_end(data: bytes) -> int:
    """Where the header block ends (its empty line), or what the scans below read: the first
    8192 bytes, or the whole datagram when shorter (a header block without its empty line)."""
    end = data.find(b"\r\n\r\n", 0, 8192)
    return min(8192, len(data)) if end < 0 else end


def _header(data: bytes, line: re.Pattern[bytes], end: int) -> bytes | None:
    """The value of the first header ``line`` matches before ``end``, its folds (lines that
    start with a space or tab, RFC 3261 §7.3.1) joined; None when there is none."""
    m = line.search(data, 0, end)
    if m is None:
        return None
    value = m.group(1)
    at = m.end()
    while at + 2 < end and data[at:at + 2] == b"\r\n" and data[at + 2] in b" \t":
        nl = data.find(b"\r\n", at + 2, end)
        stop = end if nl < 0 else nl
        value += b" " + data[at + 2:stop].strip()
        at = stop
    return value


def _addr_parts(value: bytes) -> tuple[bytes, bytes]:
    """A From / To value as (its URI, its header parameters): the URI between < and > after
    any quoted display name, else (addr-spec, RFC 3261 §20) the whole value, whose
    parameters are then the header's."""
    rest = value.lstrip()
    if rest.startswith(b'"'):
        i = 1
        while i < len(rest) and rest[i] != 0x22:  # the closing quote; \" is escaped
            i += 2 if rest[i] == 0x5C else 1
        rest = rest[i + 1:]
    lt = rest.find(b"<")
    if lt < 0:
        return rest, rest
    gt = rest.find(b">", lt)
    if gt < 0:
        return rest[lt + 1:], b""
    return rest[lt + 1:gt], rest[gt + 1:]


def _cut(text: bytes, stops: bytes) -> bytes:
    """``text`` up to the first of the bytes in ``stops``."""
    for stop in stops:
        at = text.find(bytes((stop,)))
        if at >= 0:
            text = text[:at]
    return text


_NUMBER_START = frozenset(b"+0123456789(%")
_NOT_DIGITS = bytes(c for c in range(256) if not 48 <= c <= 57)


def _uri_user(uri: bytes) -> bytes | None:
    """The user part of a sip/sips URI (None without one) or a tel URI's number."""
    uri = uri.strip()
    head = uri[:5].lower()
    if head.startswith(b"tel:"):
        user = _cut(uri[4:], b";>? \t")
    elif head.startswith(b"sips:") or head.startswith(b"sip:"):
        rest = uri[5:] if head.startswith(b"sips:") else uri[4:]
        at = rest.find(b"@")
        user = _cut(rest[:at], b";:") if at >= 0 else b""
    else:
        return None
    return user or None


def _has_to_tag(data: bytes, end: int) -> bool:
    value = _header(data, _TO, end)
    return value is not None and _TAG_PARAM.search(_addr_parts(value)[1]) is not None


def _route_port(line: bytes) -> int | None:
    """The port the first URI of a Route line names (None: none), read in linear time."""
    lt = line.find(b"<")
    if lt >= 0:
        gt = line.find(b">", lt)
        uri = line[lt + 1:gt] if gt >= 0 else line[lt + 1:]
    else:
        uri = line.split(b",", 1)[0].strip()
    head = uri[:5].lower()
    if head.startswith(b"sips:"):
        rest = uri[5:]
    elif head.startswith(b"sip:"):
        rest = uri[4:]
    else:
        return None
    rest = _cut(rest[rest.rfind(b"@") + 1:], b";?> \t")
    if rest.startswith(b"["):
        close = rest.find(b"]")
        tail = rest[close + 1:] if close >= 0 else b""
    else:
        colon = rest.rfind(b":")
        tail = rest[colon:] if colon >= 0 else b""
    digits = tail[1:]
    if tail[:1] != b":" or not 0 < len(digits) <= 5 or not digits.isdigit():
        return None
    return int(digits)


def named_port(data: bytes) -> int | None:
    """The port sipguard's own entry would name: an in-dialog request's top Route URI (the
    Record-Route a worker wrote, sent back by a party that sends every request to one
    outbound-proxy address), a response's top Via (the one a worker wrote on the request).
    Only the header block's first such line is read; None when it names no port, and for a
    request without a To tag (it opens a call: the caller's worker decides it)."""
    end = _head_end(data)
    if data.startswith(b"SIP/"):
        m = _TOP_VIA.search(data, 0, end)
        found = _VIA_PORT.match(m.group(1)) if m is not None else None
        return int(found.group(1)) if found is not None else None
    if not _has_to_tag(data, end):
        return None
    m = _TOP_ROUTE.search(data, 0, end)
    return _route_port(m.group(1)) if m is not None else None


def opens_call(data: bytes) -> bool:
    """An INVITE without a To tag: a new call (what overload protection sheds)."""
    if not data.startswith(b"INVITE "):
        return False
    return not _has_to_tag(data, _head_end(data))


def owner_of(data: bytes, workers: int, own_ports: dict[int, int] | None = None,
             from_core: bool = False) -> int | None:
    """The worker owning a datagram: the worker whose own port (``own_ports``: port -> worker)
    its top Route (a request) or top Via (a response) names — the dialog's, whichever side
    sends; else by the user part of the party outside the core — the From URI's, or for a
    request from the core (``from_core``) the To URI's — else by Call-ID; None when the
    datagram has none of them (it is handled where it was read).

    Hashing the outside party keeps a call on one worker whoever sends: a caller's INVITE and
    the core's requests in that call (To: the caller) meet, and so do a call the core places
    (To: the number it calls) and that party's requests in it (From: that number)."""
    if own_ports:
        port = named_port(data)
        if port is not None:
            worker = own_ports.get(port)
            if worker is not None:
                return worker
    end = _head_end(data)
    value = _header(data, _TO if from_core and not data.startswith(b"SIP/2.0 ") else _FROM,
                    end)
    key = _uri_user(_addr_parts(value)[0]) if value is not None else None
    if key is not None and key[0] in _NUMBER_START:
        # a number in any spelling the rules read as one (+12125551402, 2125551402,
        # %2B1-212-555-1402): its last digits, so a caller cannot spread its calls over the
        # workers — out of sight of each one's dialer analytics — by writing From otherwise
        digits = key.translate(None, _NOT_DIGITS)
        if len(digits) >= 6:
            key = digits[-8:]
    if key is None:
        m = _CALL_ID.search(data, 0, end)
        if m is None:
            return None
        key = m.group(1)
    return zlib.crc32(key) % workers


def make_token(directory: str | Path) -> None:
    """The group's secret (the supervisor's, before it starts the workers)."""
    path = os.path.join(directory, TOKEN_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(SECRET_BYTES))


def port_file(directory: str | Path, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.port")


class WorkerLink:
    """This worker's end of the hand-over: its own loopback socket and the others' ports."""

    __slots__ = ("index", "count", "directory", "deliver", "control", "counters", "sock",
                 "ports", "own_ports", "sender", "watch", "delay", "lag", "_stamped",
                 "_measured", "_unwatched", "_head", "_secret", "_loop", "_batches", "_sizes",
                 "_pending", "handover", "clock", "_sent", "_held")

    def __init__(self, directory: str | Path, index: int, count: int,
                 deliver: Callable[[bytes, Flow], None],
                 counters: MutableMapping[str, int],
                 own_ports: dict[int, int] | None = None, handover: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.index = index
        self.count = count
        # False (worker_spread: source): the operator's changes only, no datagram handed over
        self.handover = handover
        self.clock = clock
        # the changes this worker sent (when, the change): sent again to a worker
        # (re)started within REPLAY_S
        self._sent: deque[tuple[float, dict[str, Any]]] = deque(maxlen=REPLAY_MAX)
        # the changes received before start_control (None once it ran)
        self._held: list[dict[str, Any]] | None = []
        # every worker's own ports (Via, Record-Route) -> its index: a dialog's later requests
        # name their worker in Route, whichever side sends them
        self.own_ports = own_ports or {}
        self.directory = str(directory)
        self.deliver = deliver  # a handed-over datagram, as if read from its flow
        # an operator's change another worker applied (a JSON object), to apply here too
        # (set by start_control, once this worker has read the workers' directory)
        self.control: Callable[[dict[str, Any]], None] | None = None
        self.counters = counters
        self.sock: socket.socket | None = None
        self.ports: list[int | None] = [None] * count  # each worker's hand-over port
        # the UDP send thread's queue (transport/_udp_send.c) while it runs: sends leave the
        # loop; the server kicks it once per flush
        self.sender: Any = None
        # The overload check (the server's), run every WATCH_EVERY datagrams handed over to
        # this worker, and the wait measured then, as for a public socket (UdpEndpoint): work
        # queued here is this worker's backlog as much as what waits on its own sockets.
        self.watch: Callable[[], None] | None = None
        self.delay = 0.0
        # How far behind this worker's own sockets are (seconds; the server sets it at every
        # overload check): sent with what it hands over, since those datagrams waited in its
        # queue first, and the owner's wait is on top of that.
        self.lag = 0.0
        self._stamped = False
        self._measured = False
        self._unwatched = 0
        self._secret = b""
        self._head = b""
        self._loop: Any = None
        # records waiting for flush(), per destination, and their bytes
        self._batches: list[list[bytes]] = [[] for _ in range(count)]
        self._sizes = [0] * count
        self._pending = False

    # ------------------------------------------------------------------ start and stop
    def open(self, loop: Any) -> None:
        """Read the secret, bind the socket, publish its port, greet the workers already up,
        and start reading on ``loop``. Raises OSError."""
        with open(os.path.join(self.directory, TOKEN_FILE), "rb") as fh:
            self._secret = fh.read()
        if len(self._secret) != SECRET_BYTES:
            raise OSError(f"{TOKEN_FILE} in {self.directory} is not a {SECRET_BYTES}-byte secret")
        self._head = MAGIC + self._secret
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if self.handover:  # (a few changes need no room for bursts of datagrams)
                set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, RECEIVE_BUFFER)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self._stamped = enable_arrival_stamps(sock)
            port = sock.getsockname()[1]
            self.ports[self.index] = port
            mine = port_file(self.directory, self.index)
            with open(mine + ".tmp", "w", encoding="ascii") as fh:
                fh.write(str(port))
            os.replace(mine + ".tmp", mine)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._loop = loop
        loop.add_reader(sock.fileno(), self._readable)
        hello = self._head + b"H" + _HELLO.pack(self.index, port)
        for i in range(self.count):
            if i == self.index:
                continue
            try:
                with open(port_file(self.directory, i), encoding="ascii") as fh:
                    self.ports[i] = int(fh.read().strip())
            except (OSError, ValueError):
                continue  # not up yet: it greets us when it is
            self._send(hello, i)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock.fileno())
        sock.close()

    # ------------------------------------------------------------------ sending
    def owner(self, data: bytes, from_core: bool = False) -> int:
        try:
            found = owner_of(data, self.count, self.own_ports, from_core)
        except Exception:  # noqa: BLE001 — bytes the scans did not foresee: parsed (and
            found = None  # answered 400, or dropped) here, as on one process
        return self.index if found is None else found

    def _send(self, envelope: bytes, to: int, queue: bool = False) -> bool:
        """Send one envelope; ``queue``: through the send thread when it runs (the server
        kicks it at its next flush; a hand-over is always followed by one)."""
        port, sock = self.ports[to], self.sock
        if port is None or sock is None:
            return False
        sender = self.sender
        if queue and sender is not None and sender.push(sock.fileno(), socket.AF_INET, envelope,
                                              "127.0.0.1", port):
            return True
        try:
            sock.sendto(envelope, ("127.0.0.1", port))
        except OSError:  # a full socket buffer, or the ICMP of a worker gone
            return False
        return True

    def hand_over(self, to: int, data: bytes, flow: Flow) -> bool:
        """Queue ``data``, read from ``flow`` on the public address, for worker ``to`` (sent
        at the next :meth:`flush`); False when it cannot go (then handle it here)."""
        host = flow.addr[0].encode()
        size = _RECORD.size + len(host) + len(data)
        if self.ports[to] is None or self.sock is None or size > BATCH_BYTES or \
                not self.handover:
            self.counters["worker_handover_failed"] += 1
            return False
        if self._sizes[to] + size > BATCH_BYTES:
            self._send_batch(to)
        self._batches[to].append(
            _RECORD.pack(flow.local, flow.addr[1], len(host), len(data)) + host + data)
        self._sizes[to] += size
        self._pending = True
        self.counters["worker_handed_over"] += 1
        return True

    def flush(self) -> None:
        """Send what this pass handed over: one envelope per destination."""
        if not self._pending:
            return
        self._pending = False
        for to in range(self.count):
            if self._batches[to]:
                self._send_batch(to)

    def _send_batch(self, to: int) -> None:
        records = self._batches[to]
        lag = _LAG.pack(min(int(self.lag * 1000), 65535))
        envelope = self._head + b"B" + lag + b"".join(records)
        if not self._send(envelope, to, queue=True):  # lost like a datagram: resent by its sender
            self.counters["worker_handover_lost"] += len(records)
        self._batches[to] = []
        self._sizes[to] = 0

    def broadcast(self, change: dict[str, Any]) -> int:
        """Send an operator's change to every other worker; to how many it went. Kept
        REPLAY_S for a worker that (re)starts meanwhile (:meth:`_replay`)."""
        now = self.clock()
        # when (the host's monotonic clock, one for every worker): a starting worker applies
        # what it held in this order, whichever worker sent it
        change = {**change, "at": now}
        envelope = self._envelope(change)
        sent_before = self._sent
        while sent_before and sent_before[0][0] < now - REPLAY_S:
            sent_before.popleft()
        sent_before.append((now, change))
        sent = 0
        for i in range(self.count):
            if i == self.index:
                continue
            if self._send(envelope, i):
                sent += 1
            else:  # a worker starting: its hello brings the change again (_replay)
                self.counters["worker_control_failed"] += 1
        return sent

    def _envelope(self, change: dict[str, Any]) -> bytes:
        return self._head + b"C" + json.dumps(change, separators=(",", ":")).encode()

    def _replay(self, to: int) -> None:
        """The changes sent in the last REPLAY_S, again, to worker ``to`` (its hello brought a
        new port: it (re)started, and may have missed them); a suspension with what is left
        of its ttl, one run out meanwhile left out."""
        now = self.clock()
        for at, change in self._sent:
            if at < now - REPLAY_S:
                continue
            ttl = change.get("ttl") if change.get("op") == "suspend" else None
            if isinstance(ttl, (int, float)):
                left = ttl - (now - at)
                if left <= 0:
                    continue
                change = {**change, "ttl": left}
            if self._send(self._envelope(change), to):
                self.counters["worker_control_replayed"] += 1

    def start_control(self, control: Callable[[dict[str, Any]], None]) -> None:
        """From now on apply the changes received with ``control``; first those held since
        the link opened (this worker has read the workers' directory meanwhile), in the order
        they were made (``at``: several workers may have sent them again)."""
        held, self._held = self._held or [], None
        held.sort(key=_made_at)
        self.control = control
        for change in held:
            self.counters["worker_control_received"] += 1
            control(change)

    # ------------------------------------------------------------------ receiving
    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        n = len(self._head)
        secret_at = len(MAGIC)
        for _ in range(READS_PER_WAKE):
            try:
                envelope = sock.recv(MAX_ENVELOPE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the ICMP of an earlier send to a worker gone
                continue
            if len(envelope) <= n or not envelope.startswith(MAGIC) or not hmac.compare_digest(
                    envelope[secret_at:n], self._secret):
                self.counters["worker_handover_bad"] += 1
                continue
            kind = envelope[n]
            if kind == 0x42 and self.handover:  # B
                records = unpack(envelope, n + 1 + _LAG.size)
                got = len(records)
                self._unwatched += got  # datagrams, as a public socket counts them
                if self._unwatched >= WATCH_EVERY and self.watch is not None:
                    self._unwatched = 0
                    if self._stamped and got:
                        # their wait: in this queue, and first in the sender's
                        (lag_ms,) = _LAG.unpack_from(envelope, n + 1)
                        self.delay = arrival_delay(sock) + lag_ms / 1000
                        self._measured = True
                    self.watch()
                for data, flow in records:
                    self.deliver(data, flow)
                if got:
                    self.counters["worker_received_over"] += got
                else:
                    self.counters["worker_handover_bad"] += 1
            elif kind == 0x43:  # C
                self._control(envelope[n + 1:])
            elif kind == 0x48 and len(envelope) == n + 1 + _HELLO.size:  # H
                index, port = _HELLO.unpack_from(envelope, n + 1)
                if index < self.count and index != self.index:
                    known, self.ports[index] = self.ports[index], port
                    if known != port:  # (re)started: what it may have missed
                        self._replay(index)
            else:
                self.counters["worker_handover_bad"] += 1

    def receive_queue(self) -> tuple[float, int] | None:
        """The hand-over socket's receive queue as the overload watcher reads a public
        socket's (:meth:`sipguard.transport.udp.UdpEndpoint.receive_queue`): (share of the
        buffer in use, envelopes the kernel dropped so far), or None."""
        if self.sock is None:
            return None
        state, self.delay = queue_reading(self.sock, self.delay, self._measured)
        self._measured = False
        return state

    def _control(self, body: bytes) -> None:
        try:
            change = json.loads(body)
        except ValueError:
            change = None
        if not isinstance(change, dict):
            self.counters["worker_handover_bad"] += 1
            return
        held = self._held
        if held is not None:  # still starting: applied by start_control
            if len(held) < HELD_MAX:
                held.append(change)
            else:
                self.counters["worker_control_dropped"] += 1
            return
        if self.control is None:
            self.counters["worker_handover_bad"] += 1
            return
        self.counters["worker_control_received"] += 1
        self.control(change)


def _made_at(change: dict[str, Any]) -> float:
    at = change.get("at")
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else 0.0


def unpack(envelope: bytes, at: int) -> list[tuple[bytes, Flow]]:
    """The datagrams of a ``B`` envelope whose records start at ``at``, each with the flow it
    was read from. The envelope carried the secret, so it came from a worker; a record cut
    short (which a worker never writes) ends the list."""
    out: list[tuple[bytes, Flow]] = []
    end = len(envelope)
    while at + _RECORD.size <= end:
        local, port, n, size = _RECORD.unpack_from(envelope, at)
        at += _RECORD.size
        if at + n + size > end:
            break
        try:
            host = envelope[at:at + n].decode("ascii")
        except UnicodeDecodeError:
            break
        at += n
        out.append((envelope[at:at + size], Flow("udp", (host, port), local)))
        at += size
    return out
