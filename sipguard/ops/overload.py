"""Overload protection: how full the UDP receive queues are, how long datagrams wait in them,
and how long a TCP/TLS reader has been behind; read every 50 ms, after every 32 datagrams and,
while a stream reader is behind, every 10 ms.

A queue that fills means sipguard reads datagrams slower than they come. Past
``sip.overload_shed_above`` (share of the buffer), or once a datagram has waited longer than
``sip.overload_delay_ms`` between its arrival in the kernel and its reading, the watcher sets
``EdgeCore.overloaded``: new calls are answered 503 + Retry-After straight away (no rules, no
dialog, nothing sent to the core), which costs a fraction of a call, so the calls already up
keep getting their ACKs, BYEs and answers through instead of losing them to kernel drops or to
retransmission timers. The delay mark matters because a large buffer holds far more than T1
(500 ms) of work: filled halfway, the callers' retransmissions would start before shedding
did. Over TCP and TLS flow control keeps the backlog in the senders' buffers, out of sight,
so the same mark applies to time instead: a connection that still has bytes waiting after
every read for longer than the delay mark (:class:`sipguard.transport.tcp.TcpPool`,
``behind_for``) starts overload too (cause ``stream_behind``). Overload ends when every queue
is below ``sip.overload_resume_below``, waits under a quarter of the delay mark, and no
stream reader has been behind for that long. The kernel's drops are counted as
``udp_receive_dropped``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol


class ReceiveQueue(Protocol):
    """A UDP endpoint as the watcher sees it (:class:`sipguard.transport.udp.UdpEndpoint`)."""

    delay: float  # seconds the datagram read at the last look had waited in the queue

    def receive_queue(self) -> tuple[float, int] | None:
        """(share of the receive buffer in use, datagrams the kernel dropped), or None."""
        ...


class OverloadWatcher:
    """Reads the queues on :meth:`check`; says whether sipguard is overloaded."""

    def __init__(self, counters: Counter[str], log: Any) -> None:
        self.counters = counters
        self.log = log
        self.overloaded = False
        self.queue_fill = 0.0  # the fullest UDP receive queue, share of its buffer
        self.queue_delay = 0.0  # the longest wait measured in one, seconds
        self.stream_behind = 0.0  # the longest a TCP/TLS reader has been behind, seconds
        self._drops = 0  # the kernel's drop count at the last look

    def check(
        self, endpoints: Iterable[ReceiveQueue], shed_above: float | None, resume_below: float,
        delay_mark: float | None = None, stream_behind: float = 0.0,
    ) -> bool:
        """Look at every queue once; True while overloaded. ``delay_mark``: seconds of queue
        delay, or of a stream reader behind (``stream_behind``, seconds), past which new calls
        are shed too (None: off)."""
        fill = 0.0
        delay = 0.0
        drops = 0
        for ep in endpoints:
            state = ep.receive_queue()
            if state is not None:
                fill = max(fill, state[0])
                drops += state[1]
            delay = max(delay, ep.delay)
        self.queue_fill = fill
        self.queue_delay = delay
        self.stream_behind = stream_behind
        if drops > self._drops:
            self.counters["udp_receive_dropped"] += drops - self._drops
        self._drops = drops
        full = shed_above is not None and fill > shed_above
        late = delay_mark is not None and delay > delay_mark
        behind = delay_mark is not None and stream_behind > delay_mark
        if not self.overloaded and (full or late or behind):
            self.overloaded = True
            self.counters["overload_started"] += 1
            self.log.warning("overload_started", queue_ratio=round(fill, 3),
                             queue_delay_ms=round(delay * 1000, 1),
                             stream_behind_ms=round(stream_behind * 1000, 1),
                             cause="queue_full" if full else "queue_delay" if late
                             else "stream_behind",
                             udp_receive_dropped=self.counters["udp_receive_dropped"])
        elif self.overloaded and (shed_above is None or fill < resume_below) and (
            delay_mark is None or max(delay, stream_behind) < delay_mark / 4
        ):
            self.overloaded = False
            self.log.info("overload_ended", queue_ratio=round(fill, 3),
                          queue_delay_ms=round(delay * 1000, 1),
                          stream_behind_ms=round(stream_behind * 1000, 1),
                          rejected=self.counters["overload_rejected"])
        return self.overloaded
