"""Rule ``concurrency`` end to end: SIPp callers -> a real sipguard -> a SIPp core, on 127.0.0.1.

Which calls were admitted is read three ways: the UAS's received INVITEs (what reached the
core), the callers' received final responses, and sipguard's ``invite_decided`` lines.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from .harness import HOST, E2EStack, SipguardProcess, SippProcess, SippResult, free_port

pytestmark = pytest.mark.e2e

NO_EXTRA = "X-Extra: none"


def start_caller(
    stack: E2EStack,
    name: str,
    port: int,
    rows: list[tuple[str, str]],
    *,
    hold_ms: int,
    extra: str = NO_EXTRA,
    scenario: str = "uac_limit.xml",
    rate: float = 100,
) -> SippProcess:
    """Start a SIPp caller in the background: one call per (caller, callee) row."""
    csv = stack.workdir / f"{name}.csv"
    csv.write_text("SEQUENTIAL\n" + "".join(f"{a};{b};\n" for a, b in rows))
    proc = SippProcess(
        name, scenario, stack.workdir, local_port=free_port(), remote=(HOST, port),
        calls=len(rows), rate=rate, duration_ms=hold_ms, timeout=20, inf=csv,
        extra=["-key", "extra", extra],
    ).start()
    stack.sipps.append(proc)
    return proc


def finals(res: SippResult, status: int) -> list[str]:
    """The INVITE final responses with ``status`` the caller received, as message texts."""
    text = res.message_log.read_text(errors="replace") if res.message_log.exists() else ""
    out = []
    for block in re.split(r"^-{20,} .*$", text, flags=re.M):
        lines = [ln for ln in block.strip().splitlines() if ln.strip()]
        if (len(lines) >= 2 and "message received" in lines[0]
                and lines[1].startswith(f"SIP/2.0 {status} ")
                and any(re.match(r"CSeq:\s*1 INVITE", ln, re.I) for ln in lines)):
            out.append("\n".join(lines[1:]))
    return out


def decisions(guard: SipguardProcess, verdict: str | None = None) -> list[dict[str, Any]]:
    return [e for e in guard.events if e.get("event") == "invite_decided"
            and (verdict is None or e.get("verdict") == verdict)]


def guard_with(stack: E2EStack, core_port: int, yaml: str) -> tuple[SipguardProcess, int]:
    return stack.sipguard(core_port=core_port, core_transport="udp", listen=("udp",),
                          config_extra=yaml)


def ok(res: SippResult, calls: int) -> None:
    assert not res.timed_out and res.successful == calls and res.failed == 0, res.describe()


@pytest.mark.parametrize(("limit", "status"), [("per_caller", 403), ("per_callee", 486)])
def test_five_simultaneous_calls_two_admitted_then_one_more_after_a_hangup(
    stack: E2EStack, limit: str, status: int
) -> None:
    """With a limit of 2, of five simultaneous long calls on one number exactly two reach the
    core and three hear the configured status; after one hangs up a new call is accepted."""
    uas = stack.uas("uas_basic.xml", calls=3, timeout=30)
    guard, port = guard_with(stack, uas.local_port, f"rules:\n  concurrency: {{{limit}: 2}}\n")
    number = "+12125557000" if limit == "per_caller" else "+16465557000"
    others = [f"+1718555{i:04d}" for i in range(6)]
    rows = [(number, o) if limit == "per_caller" else (o, number) for o in others]
    first = start_caller(stack, "uac_first", port, rows[:1], hold_ms=1200)
    guard.wait_event("invite_decided", 1)
    burst = start_caller(stack, "uac_burst", port, rows[1:5], hold_ms=3500)
    guard.wait_event("invite_decided", 5)
    assert len(decisions(guard, "accept")) == 2, guard.diagnostics()
    rejected = decisions(guard, "reject")
    assert len(rejected) == 3
    for line in rejected:
        assert line["rule"] == "concurrency" and line["reason"] == f"{limit}_exceeded"
        assert line["status"] == status
        assert line["detail"] == {"limit": limit, "number": number, "count": 2, "max": 2}
    ok(first.wait(), 1)  # the first caller hangs up
    guard.wait_event("dialog_ended", 1)
    later = start_caller(stack, "uac_later", port, rows[5:], hold_ms=100)
    ok(later.wait(), 1)
    guard.wait_event("invite_decided", 6)  # log lines are written every 100 ms
    assert len(decisions(guard, "accept")) == 3
    burst_res = burst.wait()
    ok(burst_res, 4)
    assert len(finals(burst_res, status)) == 3 and len(finals(burst_res, 200)) == 1
    uas_res = stack.finish_uas(uas)
    assert uas_res.received("INVITE") == 3, uas_res.describe()


DIVERTER = "+13125559000"
HEADERS = {
    "diversion": f"Diversion: <sip:{DIVERTER}@pbx.example.com>;reason=unconditional",
    "history_info": (f"History-Info: <sip:{DIVERTER}@pbx.example.com>;index=1, "
                     "<sip:+16465550001@127.0.0.1;cause=302>;index=1.1"),
}


@pytest.mark.parametrize("header", sorted(HEADERS))
def test_per_diverter_rejects_another_call_forwarded_by_the_same_number(
    stack: E2EStack, header: str
) -> None:
    """With per_diverter 1, a second call forwarded by a number that already has one live
    forwarded call (read from Diversion, or from History-Info) is refused with 403."""
    uas = stack.uas("uas_basic.xml", calls=1, timeout=30)
    guard, port = guard_with(stack, uas.local_port, "rules:\n  concurrency: {per_diverter: 1}\n")
    first = start_caller(stack, "uac_first", port, [("+12125551000", "+16465550001")],
                         hold_ms=1500, extra=HEADERS[header])
    guard.wait_event("invite_decided", 1)
    second = start_caller(stack, "uac_second", port, [("+12125551001", "+16465550002")],
                          hold_ms=100, extra=HEADERS[header])
    second_res = second.wait()
    ok(second_res, 1)
    refused = finals(second_res, 403)
    assert len(refused) == 1 and "per_diverter" in refused[0]
    guard.wait_event("invite_decided", 2)  # log lines are written every 100 ms
    (line,) = decisions(guard, "reject")
    assert line["detail"] == {"limit": "per_diverter", "number": DIVERTER, "count": 1, "max": 1}
    assert line["diverters"] == [DIVERTER]
    ok(first.wait(), 1)
    assert stack.finish_uas(uas).received("INVITE") == 1


def test_max_diversions_refuses_a_longer_forwarding_chain(stack: E2EStack) -> None:
    """With max_diversions 1, a call forwarded twice is refused 403 with a Reason naming the
    limit, and a call forwarded once goes through."""
    uas = stack.uas("uas_basic.xml", calls=1, timeout=30)
    guard, port = guard_with(stack, uas.local_port, "rules:\n  concurrency: {max_diversions: 1}\n")
    twice = "Diversion: <sip:+13125559001@a.example.com>, <sip:+13125559002@b.example.com>"
    res = start_caller(stack, "uac_twice", port, [("+12125552000", "+16465552000")],
                       hold_ms=100, extra=twice).wait()
    ok(res, 1)
    (refused,) = finals(res, 403)
    assert re.search(r"^Reason:.*max_diversions", refused, re.M | re.I), refused
    once = "Diversion: <sip:+13125559001@a.example.com>"
    ok(start_caller(stack, "uac_once", port, [("+12125552001", "+16465552001")],
                    hold_ms=100, extra=once).wait(), 1)
    guard.wait_event("invite_decided", 2)
    assert [d["verdict"] for d in decisions(guard)] == ["reject", "accept"]
    assert stack.finish_uas(uas).received("INVITE") == 1


def test_lost_bye_slot_is_freed_by_the_maximum_dialog_lifetime(stack: E2EStack) -> None:
    """A call whose caller vanishes without BYE holds its per_caller slot until the dialog's
    maximum lifetime passes; then the number can call again."""
    uas = stack.uas("uas_basic.xml", calls=2, timeout=30)
    guard, port = guard_with(
        stack, uas.local_port,
        "sip: {max_dialog_lifetime_s: 2}\nrules:\n  concurrency: {per_caller: 1}\n",
    )
    caller = "+12125553000"
    ok(start_caller(stack, "uac_vanish", port, [(caller, "+16465553000")], hold_ms=0,
                    scenario="uac_abandon.xml").wait(), 1)
    blocked = start_caller(stack, "uac_blocked", port, [(caller, "+16465553001")],
                           hold_ms=100).wait()
    ok(blocked, 1)
    assert len(finals(blocked, 403)) == 1
    guard.wait_event("dialog_ended", 1, timeout=6.0)
    ended = [e for e in guard.events if e.get("event") == "dialog_ended"]
    assert [e["reason"] for e in ended] == ["lifetime"]
    again = start_caller(stack, "uac_again", port, [(caller, "+16465553002")], hold_ms=100)
    again_res = again.wait()
    ok(again_res, 1)
    assert len(finals(again_res, 200)) == 1
    guard.wait_event("invite_decided", 3)
    assert [d["verdict"] for d in decisions(guard)] == ["accept", "reject", "accept"]
