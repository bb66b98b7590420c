"""``sip.udp_send_thread`` end to end: SIPp calls through sipguard with its UDP sends on the
C thread and in the event loop give the same calls, the counters say which sent them, and
switching the thread on and off by reload while calls are up loses none."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from sipguard import native
from sipguard.transport.udp import SendThread

from .harness import HOST, E2EStack, SippProcess, events_total, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not SendThread.available(), reason="C extension not built"),
]

# What sipguard sends per call of uac_basic / uas_basic: INVITE, ACK and BYE to the core;
# 100, 180, 200 and the BYE's 200 to the caller.
SENT_PER_CALL = 7


def _threaded(metrics_port: int, at_least: float) -> dict[str, float]:
    """The events counters once the thread's sends reached ``at_least`` (they are added to
    the counters every 0.1 s), or after 3 s."""
    end = time.monotonic() + 3
    while True:
        events = events_total(metrics_port)
        if events.get("udp_sent_threaded", 0) >= at_least or time.monotonic() > end:
            return events
        time.sleep(0.1)


@pytest.mark.parametrize("thread", [True, False])
def test_calls_with_sends_on_the_thread_or_in_the_loop(stack: E2EStack, thread: bool) -> None:
    calls = 200
    metrics_port = free_port()
    uas = stack.uas("uas_basic.xml", calls=calls)
    guard, port = stack.sipguard(
        core_port=uas.local_port, listen=("udp",),
        config_extra=f"sip: {{udp_send_thread: {str(thread).lower()}}}\n"
                     f"metrics: {{listen: {HOST}:{metrics_port}}}\n")
    uac = stack.uac("uac_basic.xml", remote_port=port, calls=calls, rate=100)
    uas_res = stack.finish_uas(uas)
    detail = f"{uac.describe()}\n{uas_res.describe()}\n{guard.diagnostics()}"
    assert uac.successful == calls and uac.failed == 0, detail
    assert uas_res.received("INVITE") == calls and uas_res.received("BYE") == calls, detail
    started = [e for e in guard.events if e.get("event") == "sipguard_started"]
    assert started and started[0]["udp_send_thread"] is thread, started
    assert started[0]["python"] == native.interpreter(), started  # the venv's, as the tests'
    events = _threaded(metrics_port, calls * SENT_PER_CALL if thread else 0)
    if thread:
        assert events.get("udp_sent_threaded", 0) >= calls * SENT_PER_CALL, events
    else:
        assert events.get("udp_sent_threaded", 0) == 0, events
    assert events.get("udp_send_errors", 0) == 0, events
    assert events.get("udp_send_queue_full", 0) == 0, events


def test_switching_the_thread_by_reload_loses_no_call(stack: E2EStack) -> None:
    """300 calls at 100 calls/s of 0.5 s each; the send thread is switched on, off and on
    again by reload while they run: every call completes, and both ways of sending were used."""
    calls = 300
    admin_port = free_port()  # the admin API serves /metrics and /reload
    uas = stack.uas("uas_basic.xml", calls=calls, duration_ms=500, timeout=60)
    base = f"admin: {{listen: {HOST}:{admin_port}}}\n"
    guard, port = stack.sipguard(core_port=uas.local_port, listen=("udp",),
                                 config_extra=base + "sip: {udp_send_thread: false}\n")
    uac = SippProcess("uac", "uac_basic.xml", stack.workdir, local_port=free_port(),
                      remote=(HOST, port), calls=calls, rate=100, duration_ms=500,
                      timeout=60).start()
    stack.sipps.append(uac)
    answers = []
    for on in (True, False, True):
        time.sleep(0.8)
        guard.config.write_text(f"listen: [udp://{HOST}:{port}]\ncore: udp://{HOST}:{uas.local_port}\n"
                                + base + f"sip: {{udp_send_thread: {str(on).lower()}}}\n")
        req = urllib.request.Request(f"http://{HOST}:{admin_port}/reload", method="POST",
                                     data=b"{}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            answers.append(json.loads(resp.read()))
    res = uac.wait(60)
    uas_res = stack.finish_uas(uas)
    detail = f"{res.describe()}\n{uas_res.describe()}\n{guard.diagnostics()}"
    assert not res.timed_out and res.successful == calls and res.failed == 0, detail
    assert uas_res.received("BYE") == calls, detail
    assert [a["applied"] for a in answers] == [True] * 3, answers
    assert all("sip" in a["changed"] for a in answers), answers
    events = _threaded(admin_port, 1)
    threaded = events.get("udp_sent_threaded", 0)
    # some but not all of the ~7 per call went through the thread
    assert 0 < threaded < calls * SENT_PER_CALL, events
    assert events.get("udp_send_errors", 0) == 0, events
