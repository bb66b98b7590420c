"""End-to-end: suspending a number with end_calls while its calls ring, SIPp on both sides,
on 127.0.0.1 only (answered calls: test_kamailio_chain_e2e.py, and through the admin API
in tests/unit/test_admin_api.py)."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from .harness import HOST, E2EStack, SippProcess, free_port, one_caller_csv, suspend_number

pytestmark = pytest.mark.e2e


def test_end_calls_cancels_the_ringing_calls_of_a_suspended_number(stack: E2EStack) -> None:
    """Five calls of one number ring at the core; the number is suspended with end_calls:
    each INVITE is CANCELled toward the core, the caller hears the core's 487, every call
    ends with reason suspended and its slot is freed; a new call of the number hears 403."""
    calls = 5
    admin = free_port()
    uas = stack.uas("uas_ring_no_answer.xml", calls=calls, timeout=40)
    guard, port = stack.sipguard(
        core_port=uas.local_port, listen=("udp",),
        config_extra=(f"admin: {{listen: {HOST}:{admin}}}\n"
                      "rules:\n  concurrency: {per_caller: 10}\n"))
    csv = one_caller_csv(stack.workdir / "one_caller.csv", "+12125550177",
                         (f"+1646555{3000 + 7 * i:04d}" for i in range(calls)))
    uac = SippProcess("uac", "uac_ring_until_ended.xml", stack.workdir, local_port=free_port(),
                      remote=(HOST, port), calls=calls, rate=10, timeout=40, inf=csv).start()
    stack.sipps.append(uac)
    guard.wait_event("invite_decided", calls, timeout=10)
    time.sleep(1.0)  # every call ringing
    body = suspend_number(admin, "+12125550177", end_calls=True)
    res = uac.wait()
    uas_res = stack.finish_uas(uas)
    detail = "\n\n".join([json.dumps(body), res.describe(), uas_res.describe(),
                          guard.diagnostics()])
    assert body.get("calls_ended") == calls, detail
    assert res.successful == calls and res.failed == 0, detail
    assert uas_res.successful == calls and uas_res.failed == 0, detail
    assert guard.settle("dialog_ended", expect=calls) == calls, detail
    ended = [e for e in guard.events if e.get("event") == "dialog_ended"]
    assert {(e["reason"], e.get("status")) for e in ended} == {("suspended", 487)}, ended
    with urllib.request.urlopen(f"http://{HOST}:{admin}/calls?number=%2B12125550177",
                                timeout=5) as answer:
        assert json.loads(answer.read())["counts"]["caller"] == 0
