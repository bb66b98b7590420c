"""Overload protection: how full the UDP receive queues are, read every 50 ms.

A queue that fills means sipguard reads datagrams slower than they come. Past
``sip.overload_shed_above`` the watcher sets ``EdgeCore.overloaded``: new calls are answered
503 + Retry-After straight away (no rules, no dialog, nothing sent to the core), which costs a
fraction of a call, so the calls already up keep getting their ACKs, BYEs and answers through
instead of losing them to kernel drops. It ends when every queue is below
``sip.overload_resume_below``. The kernel's drops are counted as ``udp_receive_dropped``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, Protocol


class ReceiveQueue(Protocol):
    """A UDP endpoint as the watcher sees it (:class:`sipguard.transport.udp.UdpEndpoint`)."""

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
        self._drops = 0  # the kernel's drop count at the last look

    def check(
        self, endpoints: Iterable[ReceiveQueue], shed_above: float | None, resume_below: float
    ) -> bool:
        """Look at every queue once; True while overloaded."""
        fill = 0.0
        drops = 0
        for ep in endpoints:
            state = ep.receive_queue()
            if state is not None:
                fill = max(fill, state[0])
                drops += state[1]
        self.queue_fill = fill
        if drops > self._drops:
            self.counters["udp_receive_dropped"] += drops - self._drops
        self._drops = drops
        if not self.overloaded and shed_above is not None and fill > shed_above:
            self.overloaded = True
            self.counters["overload_started"] += 1
            self.log.warning("overload_started", queue_ratio=round(fill, 3),
                             udp_receive_dropped=self.counters["udp_receive_dropped"])
        elif self.overloaded and (shed_above is None or fill < resume_below):
            self.overloaded = False
            self.log.info("overload_ended", queue_ratio=round(fill, 3),
                          rejected=self.counters["overload_rejected"])
        return self.overloaded
