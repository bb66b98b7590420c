"""UDP endpoint: datagrams in, straight to the proxy; datagrams out on the same socket.

Each datagram is processed inline in ``datagram_received`` — no per-datagram task or queue.
The kernel's receive buffer (``sip.udp_receive_buffer``) is the bounded queue: under overload
the kernel drops and counts datagrams, which is the cheapest place to shed load, and the proxy
never holds more than one datagram at a time.

Datagrams out leave either from the loop (one ``sendto`` each) or, with a send thread
(:class:`SendThread`, ``sip.udp_send_thread``), from a C thread beside it: the loop queues a
copy and wakes the thread once per flush; the thread sends them in order with ``sendmmsg``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from sipguard.contract import Flow

if sys.platform == "linux":
    from fcntl import ioctl

Handler = Callable[[bytes, Flow], None]  # a datagram and where it came from

# Sources whose Flow an endpoint keeps (see UdpEndpoint._flows); emptied when full.
FLOWS_MAX = 4096

# Besides its 50 ms timer, the overload watcher looks at the queues after every this many
# datagrams read: a burst that fills the queue between two ticks is noticed within one read
# pass (the loop reads up to 32 datagrams per wake-up), not after a tick's worth of calls.
WATCH_EVERY = 32

# Linux getsockopt(SOL_SOCKET, SO_MEMINFO): nine u32, [0] receive queue bytes in use,
# [1] receive buffer size, [8] datagrams dropped (queue full). Not in the socket module.
SO_MEMINFO = 55
_MEMINFO = struct.Struct("9I")
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # Linux: past net.core.[rw]mem_max (CAP_NET_ADMIN)
# Linux ioctl SIOCGSTAMP: when the kernel received the datagram read last (struct timeval,
# wall clock). The first call turns the socket's receive timestamps on.
SIOCGSTAMP = 0x8906
_TIMEVAL = struct.Struct("@ll")  # time_t, suseconds_t: C longs
_NO_STAMP = bytes(_TIMEVAL.size)


# Datagrams, and bytes of them, queued for the send thread at most (another queue's worth may be
# in the thread's hands); beyond, the loop sends them itself and counts ``udp_send_queue_full``.
SEND_QUEUE = 65536
SEND_QUEUE_BYTES = 32 * 1024 * 1024


def _send_extension() -> ModuleType | None:
    try:
        return importlib.import_module("sipguard.transport._udp_send")
    except ImportError:  # not built (no C compiler at build time): every send in the loop
        return None


_udp_send = _send_extension()


def send_thread_wanted(mode: bool | str, workers: int = 1) -> bool:
    """``sip.udp_send_thread``: true, false, or ``auto`` — a thread when this process may run
    on more CPUs (its affinity) than there are worker processes, i.e. when a CPU is left for
    the thread. Pinned to one CPU, or with a worker per CPU, a thread would only add context
    switches to the work it takes off the loop (measured: 2 workers on 2 CPUs, 0.72 ms of CPU
    per call with threads, 0.62 without)."""
    if mode == "auto":
        return hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) > workers
    return mode is True


class SendThread:
    """The UDP send thread (``sipguard/transport/_udp_send.c``) and its counts.

    A ``sendto`` on a busy host is mostly the kernel's work for the receiver: delivering the
    datagram and waking the process that reads it (~11 % of the event loop's time under load,
    the largest item of its profile). With the thread, the loop's part of a send is a copy
    into a queue; :meth:`kick`, once per flush, wakes the thread, which sends what is queued
    in order, one ``sendmmsg`` per run of datagrams for one socket. The queue holds
    ``SEND_QUEUE`` datagrams and ``SEND_QUEUE_BYTES`` bytes at most: beyond, the loop sends
    (``udp_send_queue_full``).

    Waking the thread costs CPU of its own (a futex wake, an inter-processor interrupt on a
    VM, the thread's switch in and out): worth it only when the loop's time is what limits the
    rate. So with ``auto`` (:attr:`adaptive`), while the server says the loop is not busy
    (``kick(here=True)``), a flush finding the thread asleep is sent by the loop itself with
    the same ``sendmmsg`` — measured at 1,000 and 3,000 calls/s, 8–16 % and 5–9 % less CPU per
    call than waking the thread; what a full socket buffer refuses is left to the thread. A
    thread set by ``true`` takes every flush.
    Counters, added by :meth:`sync`: ``udp_sent_threaded`` (datagrams the thread sent),
    ``udp_sent_in_loop`` (datagrams ``auto`` sent from the loop, the thread asleep),
    ``udp_send_errors`` (datagrams lost to a send error, from the thread or the loop).
    """

    def __init__(self) -> None:
        self.queue: Any = (_udp_send.Sender(SEND_QUEUE, SEND_QUEUE_BYTES) if _udp_send is not None
                           else None)
        self.active = False
        self.adaptive = False  # ``auto``: the loop sends a flush itself while it is not busy
        self._sent = 0  # the queue's counts at the last sync
        self._here = 0
        self._errors = 0

    @staticmethod
    def available() -> bool:
        return _udp_send is not None

    def configure(self, mode: bool | str, endpoints: list[UdpEndpoint], workers: int = 1) -> bool:
        """Start or stop the thread for ``mode`` and point the endpoints at it; True when
        it runs. Stopping sends what is queued first (the order holds)."""
        queue = self.queue
        want = queue is not None and send_thread_wanted(mode, workers)
        self.adaptive = mode == "auto"
        if want and not self.active:
            queue.start()
            self.active = True
        elif not want and self.active:
            queue.stop()
            self.active = False
        for ep in endpoints:
            ep.sender = queue if self.active else None
        return self.active

    def kick(self, busy: bool = True) -> None:
        """Wake the thread for the datagrams queued since the last kick; with ``auto`` and the
        loop not ``busy``, send them from here while the thread sleeps."""
        if self.active:
            self.queue.kick(not busy and self.adaptive)

    def waiting(self) -> int:
        return int(self.queue.queued) if self.active else 0

    def sync(self, counters: Any, endpoints: list[UdpEndpoint]) -> None:
        """Add the sends made since the last call to ``counters``."""
        queue = self.queue
        if queue is not None:
            sent, here, errors = int(queue.sent), int(queue.sent_here), int(queue.errors)
            if sent - here > self._sent - self._here:
                counters["udp_sent_threaded"] += (sent - here) - (self._sent - self._here)
            if here > self._here:
                counters["udp_sent_in_loop"] += here - self._here
            if errors > self._errors:
                counters["udp_send_errors"] += errors - self._errors
            self._sent, self._here, self._errors = sent, here, errors
        for ep in endpoints:
            if ep.send_errors:
                counters["udp_send_errors"] += ep.send_errors
                ep.send_errors = 0
            if ep.queue_full:
                counters["udp_send_queue_full"] += ep.queue_full
                ep.queue_full = 0

    def close(self, endpoints: list[UdpEndpoint]) -> None:
        """Send what is queued and end the thread (before the sockets close)."""
        self.configure(False, endpoints)


def enable_arrival_stamps(sock: socket.socket) -> bool:
    """Ask the kernel to note when each datagram arrives (read by
    :meth:`UdpEndpoint.arrival_delay`); False where it cannot (not Linux)."""
    if sys.platform != "linux":
        return False
    with contextlib.suppress(OSError):  # ENOENT: nothing read yet; stamps are on from now
        ioctl(sock.fileno(), SIOCGSTAMP, _NO_STAMP)
    return True


def arrival_delay(sock: socket.socket) -> float:
    """Seconds the datagram read last from ``sock`` waited between its arrival in the kernel
    and now (arrival stamps on: :func:`enable_arrival_stamps`); 0.0 if the kernel cannot
    tell."""
    try:
        sec, usec = _TIMEVAL.unpack(ioctl(sock.fileno(), SIOCGSTAMP, _NO_STAMP))
    except OSError:
        return 0.0
    return max(0.0, time.time() - (float(sec) + float(usec) * 1e-6))


def queue_reading(sock: socket.socket, delay: float,
                  measured: bool) -> tuple[tuple[float, int] | None, float]:
    """One look at ``sock``'s receive queue for the overload watcher: (share of the buffer in
    use, datagrams the kernel dropped so far), or None where the kernel cannot tell (not
    Linux); and the queue's wait ``delay`` as it stands after the look — an empty queue, seen
    by a check that did not just measure the wait (``measured``), resets it: nothing waits."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    except OSError:
        return None, delay
    used, size, *_, drops = _MEMINFO.unpack(raw)
    if not used and not measured:
        delay = 0.0
    return ((used / size if size else 0.0), drops), delay


class UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, index: int, handler: Handler, sock: socket.socket) -> None:
        self.index = index
        self.handler = handler
        self.sock = sock
        self.transport: asyncio.DatagramTransport | None = None
        self.send_errors = 0  # datagrams the loop could not send (since the last sync)
        self.queue_full = 0  # datagrams the loop sent because the send thread's queue was full
        # The send thread's queue (SendThread), or None: every datagram leaves from the loop.
        self.sender: Any = None
        self._fd = sock.fileno()
        self._family = int(sock.family)
        self.watch: Callable[[], None] | None = None  # the overload check, see WATCH_EVERY
        self._unwatched = 0  # datagrams read since the last overload check
        # How long the datagram read at the last overload check had waited in the receive
        # queue, seconds (0.0 once the queue was seen empty, or without arrival stamps).
        self.delay = 0.0
        self._measured = False  # delay was measured for the check under way
        self.stamped = enable_arrival_stamps(sock)
        # Source address -> its Flow, made once per source: a new Flow and address tuple per
        # datagram would be two more objects per message, held by the transactions, for the
        # garbage collector's young passes (sipguard/ops/collector.py) to examine; a peer sends
        # from one address. Bounded by FLOWS_MAX: a scan from many ports empties it, at worst.
        self._flows: dict[tuple[Any, ...], Flow] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        # (an IPv6 source is a 4-tuple: the compiled module checks the declared type)
        self._unwatched += 1
        if self._unwatched >= WATCH_EVERY and self.watch is not None:
            self._unwatched = 0
            if self.stamped:
                self.delay = self.arrival_delay()
                self._measured = True
            self.watch()
        flow = self._flows.get(addr)
        if flow is None:  # (IPv6 addresses come with flow info and scope: kept out of Flow)
            flows = self._flows
            if len(flows) >= FLOWS_MAX:
                flows.clear()
            flow = flows[addr] = Flow("udp", (addr[0], addr[1]), self.index)
        self.handler(data, flow)

    def arrival_delay(self) -> float:
        """Seconds the datagram read last waited between its arrival in the kernel and now:
        the queue delay that new datagrams face too. 0.0 if the kernel cannot tell."""
        return arrival_delay(self.sock)

    @property
    def receive_buffer(self) -> int:
        """The receive buffer the kernel granted, bytes (Linux: twice the size set)."""
        return int(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def receive_queue(self) -> tuple[float, int] | None:
        """(share of the receive buffer in use, datagrams the kernel dropped so far), or None
        where the kernel cannot tell (not Linux). An empty queue, seen by a check that did not
        just measure :attr:`delay` (the 50 ms timer's), resets it: nothing is waiting."""
        state, self.delay = queue_reading(self.sock, self.delay, self._measured)
        self._measured = False
        return state

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: nothing to do for a datagram proxy.
        pass

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        """Queue it for the send thread; without one (or with its queue full), send at once
        with one syscall; when the socket buffer is full, let the transport queue it (it then
        drains on writability, in order)."""
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():  # type: ignore[attr-defined]
            transport.sendto(data, addr)  # keep order behind what is already queued
            return
        sender = self.sender
        if sender is not None:
            if sender.push(self._fd, self._family, data, addr[0], addr[1]):
                return
            self.queue_full += 1  # (or an address that is no literal: not from _send)
        try:
            self.sock.sendto(data, addr)
        except BlockingIOError:
            transport.sendto(data, addr)
        except OSError:
            self.send_errors += 1  # unreachable address, ICMP error: a datagram is lost


def set_buffer(sock: socket.socket, option: int, force: int, size: int) -> None:
    """Set a socket buffer; the kernel caps SO_RCVBUF/SO_SNDBUF at net.core.rmem_max /
    wmem_max, so when capped and allowed (root), force the configured size."""
    sock.setsockopt(socket.SOL_SOCKET, option, size)
    if sock.getsockopt(socket.SOL_SOCKET, option) < size:  # Linux reports twice the size set
        # Not permitted: the capped size stays (see UdpEndpoint.receive_buffer).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, force, size)


async def open_udp(
    loop: asyncio.AbstractEventLoop, host: str, port: int, index: int, handler: Handler,
    rcvbuf: int, reuse_port: bool = False,
) -> UdpEndpoint:
    """Bind a UDP endpoint. ``reuse_port``: SO_REUSEPORT, so the worker processes of one
    sipguard share the address and the kernel spreads datagrams over them by source address
    and port (one source always reaches the same socket while the group is unchanged)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, rcvbuf)
        set_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, rcvbuf)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    _, protocol = await loop.create_datagram_endpoint(lambda: UdpEndpoint(index, handler, sock), sock=sock)
    return protocol
