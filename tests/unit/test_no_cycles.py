"""The proxy frees every call by reference counting: no reference cycles are left behind.

sipguard disables the cyclic garbage collector's automatic runs (their pauses were the tail
latency); its own young passes freeze what survives them and only a full pass, hours apart, looks at
frozen objects again (sipguard/ops/collector.py). That is only safe while a whole call
lifecycle creates no garbage cycles. This test keeps it that way.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.unit.dialog_helpers import PolicyHarness
from tests.unit.proxy_helpers import CALLER, CORE, Harness, answer, invite


@pytest.fixture
def no_auto_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _calls(h: Harness, n: int) -> None:
    for i in range(n):
        out = h.send(invite(branch=f"z9hG4bK-c{i}", call_id=f"cyc-{i}"))
        req = next(m for f, m in out if f.addr == CORE)
        h.send(answer(req, 180, "Ringing"), src=CORE)
        if i % 3 == 0:
            h.send(answer(req, 486, "Busy Here"), src=CORE)
            continue
        h.send(answer(req, 200, "OK"), src=CORE)
        bye = (
            f"BYE sip:core@10.0.0.10:5080 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-bye{i}\r\n"
            f"Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\n"
            f"From: <sip:+12125550100@198.51.100.7>;tag=ftag1\r\n"
            f"To: <sip:+18005550199@192.0.2.1>;tag=ttag9\r\nCall-ID: cyc-{i}\r\n"
            f"CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        fwd = next(m for f, m in h.send(bye, src=CALLER) if f.addr == CORE)
        h.send(answer(fwd, 200, "OK"), src=CORE)
    h.advance(120.0)  # every transaction timer fires
    h.events.clear()


def test_plain_proxy_calls_leave_no_cycles(no_auto_gc: None) -> None:
    """Answered, busy and hung-up calls through the bare proxy leave nothing for the collector."""
    h = Harness()
    _calls(h, 60)
    assert h.proxy.servers == {} and h.proxy.clients == {} and h.proxy.dialogs == {}
    assert gc.collect() == 0


def test_calls_with_stateful_rules_leave_no_cycles(no_auto_gc: None) -> None:
    """With the concurrency, rate and callerid rules deciding, calls still leave no cycles."""
    # the edge core: the policy decides every INVITE and gets each dialog's start and end
    h = PolicyHarness(
        "rules:\n  concurrency: {per_caller: 100, per_callee: 100}\n"
        "  rate: {per_caller: {rate: 100, burst: 100}}\n  callerid: {}\n"
    )
    assert [r.name for r in h.policy.rules] == ["concurrency", "rate", "callerid"]
    _calls(h, 60)
    assert h.proxy.servers == {} and h.proxy.clients == {} and h.proxy.dialogs == {}
    assert h.tracker.snapshot() == {}  # every slot went back: the events reached the policy
    assert gc.collect() == 0
