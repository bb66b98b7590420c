"""End-to-end: a core that challenges every INVITE with a digest (RFC 3261 §22), SIPp on both
sides, sipguard between them, on 127.0.0.1 only.

A challenged call is one call in two INVITE transactions: the 407 is ACKed hop by hop, the
caller sends the INVITE again with credentials (same Call-ID and From tag, CSeq + 1). Cores
behind a contact-center edge often challenge; the rules that count calls must not see the
challenge as a failed call.
"""

from __future__ import annotations

import pytest

from .harness import E2EStack
from .test_rate_e2e import counters, start_uac

pytestmark = pytest.mark.e2e


def test_challenged_calls_complete_and_do_not_count_as_failed_calls(stack: E2EStack) -> None:
    """One caller's 12 calls, each challenged once by the core, all complete through sipguard
    with the ASR analytic set to block below 60 % answered: a challenge is not a failed
    call, so the caller keeps an ASR of 100 % and is never blocked."""
    calls = 12
    uas = stack.uas("uas_auth.xml", calls=calls)
    guard, port = stack.sipguard(
        core_port=uas.local_port,
        config_extra="rules:\n  dialer: {block_s: 60, short_calls: null, "
                     "asr: {tag: 0.6, block: 0.6, min_calls: 4}}\n",
    )
    rows = [("+12125550100", f"+1646555{1000 + 7 * i:04d}") for i in range(calls)]
    res = start_uac(stack, "caller", rows, port=port, calls=calls, rate=10, hold_ms=200,
                    scenario="uac_auth.xml").wait()
    uas_res = stack.finish_uas(uas, grace=2.0)
    assert not res.timed_out and res.failed == 0 and res.successful == calls, (
        res.describe(), uas_res.describe(), guard.diagnostics())
    assert uas_res.successful == calls and uas_res.failed == 0, uas_res.describe()
    c = counters(guard)
    ended = [e for e in guard.events if e.get("event") == "dialog_ended"]
    assert not c.get("rule_dialer_asr") and not c.get("invites_reject"), c
    assert c.get("invites_accept") == 2 * calls, c
    # each call: the challenged attempt (its 407 ACKed hop by hop, absorbed), then the call
    assert sorted((e["reason"], e["status"]) for e in ended) == sorted(
        [("failed", 407)] * calls + [("bye_caller", 200)] * calls), ended
    assert not c.get("dropped_ack_refused"), c
    assert res.retransmissions == 0 and uas_res.retransmissions == 0, (
        res.describe(), uas_res.describe())
