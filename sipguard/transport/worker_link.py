"""Datagrams handed from one worker to another on one host (``workers`` > 1,
``worker_spread: caller``).

Every worker binds the public UDP address with SO_REUSEPORT, and the kernel picks the socket
by the datagram's source address and port: one trunk (one address, one port) would land on
one worker whatever the number of workers. So the worker that reads a datagram on the public
address runs the flood guard on it (the flood counts stay per source, as with one process),
then picks the worker that owns it by its *caller*: the user part of the From URI, hashed with
CRC-32, modulo the number of workers (the Call-ID when there is no From user). Every message
of a call the caller's side sends to the public address — the INVITE, its retransmissions,
its CANCEL, the ACK of a failure answer, responses — carries the same From, so they all reach
the owner; everything later comes to the owner's own port anyway (its Via and Record-Route
name it). A caller's calls stay on one worker, so the dialer's per-caller analytics
(sequential runs, short calls) see all of them; the limits counted across workers live in the
shared state store (``state.backend: shared_memory`` or ``redis``).

The hand-over is a Unix datagram socket per worker, ``worker-<i>.sock`` in the directory the
supervisor made for this host's workers (mode 0700: only this user's processes can send to
it; the envelope is trusted, unlike anything on a UDP port). An envelope is::

    b"SGW1" | local socket index (1 byte) | port (2 bytes) | address length (1) | address | datagram

The same sockets carry the operator's changes that every worker must apply at once: a
suspension added or lifted, a flood ban lifted, through the admin API of any one worker, is
applied there and then sent to every other worker (``b"SGC1" | JSON``), which applies it too
— without Redis, that is how ``sipguard suspend`` reaches the calls on every worker.

A datagram that cannot be handed over (the owner's queue is full, the owner is restarting)
is handled here instead and counted (``worker_handover_failed``): the call still gets an
answer, from the worker that read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import zlib
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Final

from sipguard.contract import Flow

MAGIC: Final = b"SGW1"
CONTROL: Final = b"SGC1"
_HEAD: Final = struct.Struct("!4sBHB")
READS_PER_WAKE: Final = 64  # envelopes read per wake-up before the loop runs other work
RECEIVE_BUFFER: Final = 4 * 1024 * 1024
MAX_ENVELOPE: Final = 65536 + 64

# The From header's URI user (or a tel: number): enough to pick an owner, not a parse.
_FROM_USER = re.compile(
    rb"\n(?:from|f)[ \t]*:[^\r\n]*?(?:sips?:|tel:)([^@;>?\s]+)", re.IGNORECASE)
_CALL_ID = re.compile(rb"\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]+)", re.IGNORECASE)


def owner_of(data: bytes, workers: int) -> int | None:
    """The worker owning a datagram: by the From URI's user part, else by Call-ID; None when
    the datagram has neither (it is handled where it was read)."""
    m = _FROM_USER.search(data, 0, 8192) or _CALL_ID.search(data, 0, 8192)
    if m is None:
        return None
    return zlib.crc32(m.group(1)) % workers


def socket_path(directory: str | Path, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.sock")


class WorkerLink:
    """This worker's end of the hand-over: its own Unix socket, and the others' paths."""

    __slots__ = ("index", "count", "directory", "deliver", "counters", "sock", "_paths",
                 "_loop", "control")

    def __init__(self, directory: str | Path, index: int, count: int,
                 deliver: Callable[[bytes, Flow], None],
                 counters: MutableMapping[str, int]) -> None:
        self.index = index
        self.count = count
        self.directory = str(directory)
        self.deliver = deliver  # a handed-over datagram, as if read from its flow
        # an operator's change another worker applied (a JSON object), to apply here too
        self.control: Callable[[dict[str, object]], None] | None = None
        self.counters = counters
        self.sock: socket.socket | None = None
        self._paths = [socket_path(directory, i) for i in range(count)]
        self._loop: object = None

    def open(self, loop: object) -> None:
        """Bind this worker's socket (replacing the one a previous run of this worker left)
        and start reading it on ``loop``."""
        path = self._paths[self.index]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RECEIVE_BUFFER)
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._loop = loop
        loop.add_reader(sock.fileno(), self._readable)  # type: ignore[attr-defined]

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock.fileno())  # type: ignore[attr-defined]
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self._paths[self.index])

    def owner(self, data: bytes) -> int:
        found = owner_of(data, self.count)
        return self.index if found is None else found

    def hand_over(self, to: int, data: bytes, flow: Flow) -> bool:
        """Send ``data``, read from ``flow`` on the public address, to worker ``to``; False
        when it could not be (then handle it here)."""
        sock = self.sock
        if sock is None:
            return False
        host = flow.addr[0].encode()
        head = _HEAD.pack(MAGIC, flow.local, flow.addr[1], len(host))
        try:
            sock.sendto(head + host + data, self._paths[to])
        except OSError:  # full queue (EAGAIN), a worker restarting (ENOENT, ECONNREFUSED)
            self.counters["worker_handover_failed"] += 1
            return False
        self.counters["worker_handed_over"] += 1
        return True

    def broadcast(self, change: dict[str, object]) -> int:
        """Send an operator's change to every other worker; to how many it went."""
        sock = self.sock
        if sock is None:
            return 0
        envelope = CONTROL + json.dumps(change, separators=(",", ":")).encode()
        sent = 0
        for i, path in enumerate(self._paths):
            if i == self.index:
                continue
            try:
                sock.sendto(envelope, path)
                sent += 1
            except OSError:  # a worker restarting: it reads state_dir's file at its start
                self.counters["worker_control_failed"] += 1
        return sent

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        deliver = self.deliver
        for _ in range(READS_PER_WAKE):
            try:
                envelope = sock.recv(MAX_ENVELOPE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters["worker_handover_bad"] += 1
                return
            if envelope.startswith(CONTROL):
                self._control(envelope)
                continue
            parsed = unpack(envelope)
            if parsed is None:
                self.counters["worker_handover_bad"] += 1
                continue
            self.counters["worker_received_over"] += 1
            deliver(*parsed)

    def _control(self, envelope: bytes) -> None:
        try:
            change = json.loads(envelope[len(CONTROL):])
        except ValueError:
            change = None
        if not isinstance(change, dict) or self.control is None:
            self.counters["worker_handover_bad"] += 1
            return
        self.counters["worker_control_received"] += 1
        self.control(change)


def unpack(envelope: bytes) -> tuple[bytes, Flow] | None:
    """An envelope's datagram and the flow it was read from; None when malformed."""
    if len(envelope) < _HEAD.size or not envelope.startswith(MAGIC):
        return None
    _, local, port, n = _HEAD.unpack_from(envelope)
    start = _HEAD.size + n
    if len(envelope) < start:
        return None
    try:
        host = envelope[_HEAD.size:start].decode("ascii")
    except UnicodeDecodeError:
        return None
    return envelope[start:], Flow("udp", (host, port), local)
