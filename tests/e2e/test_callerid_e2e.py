"""End-to-end caller-ID checks: SIPp UAC -> sipguard (peers, suspended, callerid) -> SIPp UAS,
on 127.0.0.1. One sipguard serves every case; the rejected callers run side by side."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from .harness import E2EStack, SippProcess, SippResult, free_port

pytestmark = pytest.mark.e2e

CALLEE = "+16465552000"
OWNED = [f"+1212555{1000 + i}" for i in range(5)]
SPOOFED = ["+13125550100", "+13125550101", "+13125550102"]  # valid, not the peer's
DNO = ["+12125559999", "+12125559999"]
SUSPENDED = ["+12125558888", "+12125558888"]

CONFIG = """
peers:
  - name: lab
    networks: [127.0.0.0/8]
    numbers: ["+1212555*"]
suspended: ["+12125558888"]
rules:
  callerid:
    dno_file: dno.txt
    redress: {url: "https://example.com/blocked"}
"""
BLOCKED_REASON = (
    'Reason: SIP;cause=603;text="v=analytics1;url=https://example.com/blocked";location=RPN'
)


def write_csv(path: Path, callers: list[str]) -> Path:
    path.write_text("SEQUENTIAL\n" + "".join(f"{c};{CALLEE};\n" for c in callers))
    return path


def start_uac(stack: E2EStack, name: str, scenario: str, port: int, callers: list[str]) -> SippProcess:
    csv = write_csv(stack.workdir / f"{name}.csv", callers)
    uac = SippProcess(name, scenario, stack.workdir, local_port=free_port(),
                      remote=("127.0.0.1", port), calls=len(callers), rate=20,
                      duration_ms=100, timeout=30, inf=csv)
    stack.sipps.append(uac)
    return uac.start()


def final_responses(res: SippResult) -> list[str]:
    """Status line and Reason header of every final response the UAC logged as received."""
    text = res.message_log.read_text(errors="replace")
    out = []
    for block in re.split(r"^-{20,} .*$", text, flags=re.M):
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if len(lines) < 2 or "message received" not in lines[0]:
            continue
        if re.match(r"SIP/2\.0 [2-6]\d\d ", lines[1]):
            reason = next((ln for ln in lines if ln.lower().startswith("reason:")), "")
            out.append(f"{lines[1]} | {reason}")
    return out


def test_callerid_rules_end_to_end(stack: E2EStack) -> None:
    """Owned callers reach the core with verstat; a spoofed caller hears 603 Network Blocked with the 603+ Reason, a DNO caller 603, a suspended one 403, and none of those reach the core."""
    (stack.workdir / "dno.txt").write_text("# inbound-only numbers\n+12125559999\n")
    uas = stack.uas("uas_basic.xml", calls=len(OWNED))
    guard, port = stack.sipguard(core_port=uas.local_port, listen=("udp",), config_extra=CONFIG)
    owned = start_uac(stack, "owned", "uac_basic.xml", port, OWNED)
    rejected = {
        name: start_uac(stack, name, "uac_rejected.xml", port, callers)
        for name, callers in (("spoofed", SPOOFED), ("dno", DNO), ("suspended", SUSPENDED))
    }
    results = {name: p.wait() for name, p in rejected.items()}
    owned_res = owned.wait()
    uas_res = stack.finish_uas(uas)
    detail = "\n\n".join(r.describe() for r in (owned_res, *results.values(), uas_res))
    detail += "\n" + guard.diagnostics()

    assert owned_res.successful == len(OWNED) and owned_res.failed == 0, detail
    for name, res in results.items():
        assert res.successful == res.created > 0 and res.failed == 0, f"{name}\n{detail}"
    assert uas_res.received("INVITE") == len(OWNED), detail
    core_log = uas_res.message_log.read_text(errors="replace")
    for number in OWNED:
        assert f"P-Asserted-Identity: <tel:{number};verstat=TN-Validation-Passed>" in core_log

    spoofed = final_responses(results["spoofed"])
    assert spoofed and set(spoofed) == {f"SIP/2.0 603 Network Blocked | {BLOCKED_REASON}"}, detail
    assert set(final_responses(results["dno"])) == {
        'SIP/2.0 603 Decline | Reason: SIP;cause=603;text="Do Not Originate"'}, detail
    assert set(final_responses(results["suspended"])) == {
        'SIP/2.0 403 Forbidden | Reason: SIP;cause=403;text="Caller number suspended"'}, detail

    total = len(OWNED) + len(SPOOFED) + len(DNO) + len(SUSPENDED)
    assert guard.settle("invite_decided", expect=total) == total, detail
    decided = Counter(
        (e.get("rule"), e.get("reason"), e.get("status"))
        for e in guard.events if e.get("event") == "invite_decided"
    )
    assert decided == Counter({
        (None, None, None): len(OWNED),
        ("callerid", "caller_not_owned", 603): len(SPOOFED),
        ("callerid", "caller_dno", 603): len(DNO),
        ("suspended", "caller_suspended", 403): len(SUSPENDED),
    }), detail


def test_monitor_mode_forwards_everything_and_logs_what_would_have_happened(
    stack: E2EStack,
) -> None:
    """With mode: monitor the spoofed, DNO and suspended callers all reach the core, the core sees verstat=TN-Validation-Failed and the would-be reason, and the log names each rule."""
    (stack.workdir / "dno.txt").write_text("+12125559999\n")
    callers = SPOOFED[:2] + DNO[:1] + SUSPENDED[:1]
    uas = stack.uas("uas_basic.xml", calls=len(callers))
    guard, port = stack.sipguard(core_port=uas.local_port, listen=("udp",),
                                 config_extra="mode: monitor\n" + CONFIG)
    res = start_uac(stack, "monitored", "uac_basic.xml", port, callers).wait()
    uas_res = stack.finish_uas(uas)
    detail = f"{res.describe()}\n{uas_res.describe()}\n{guard.diagnostics()}"
    assert res.successful == len(callers) and res.failed == 0, detail
    assert uas_res.received("INVITE") == len(callers), detail
    core_log = uas_res.message_log.read_text(errors="replace")
    assert f"P-Asserted-Identity: <tel:{SPOOFED[0]};verstat=TN-Validation-Failed>" in core_log
    assert "X-Sipguard-Verdict: callerid.caller_not_owned;monitored" in core_log
    assert "X-Sipguard-Verdict: callerid.caller_dno;monitored" in core_log
    assert guard.settle("invite_decided", expect=len(callers)) == len(callers), detail
    decided = Counter(
        (e.get("rule"), e.get("reason"), e.get("verdict"), e.get("monitored"))
        for e in guard.events if e.get("event") == "invite_decided"
    )
    assert decided == Counter({
        ("callerid", "caller_not_owned", "accept", True): 2,
        ("callerid", "caller_dno", "accept", True): 1,
        ("suspended", "caller_suspended", "accept", True): 1,
    }), detail


STRICT = """
peers:
  - name: lab
    networks: [127.0.0.1/32]
    numbers: ["+1212555*"]
rules:
  callerid:
    pai_mismatch: reject
    anonymous: reject
    redress: {url: "https://example.com/blocked"}
"""


def test_invalid_mismatched_anonymous_and_unknown_callers_are_turned_away(
    stack: E2EStack,
) -> None:
    """An invalid number and a PAI/From mismatch hear 603, an anonymous caller 433, a source outside every peer 403; the core sees only the legitimate call."""
    uas = stack.uas("uas_basic.xml", calls=1)
    guard, port = stack.sipguard(core_port=uas.local_port, listen=("udp",), config_extra=STRICT)
    cases = {
        "invalid": ("+12120555100", ""),
        "mismatch": ("+12125551001", "P-Asserted-Identity: <sip:+12125551002@127.0.0.1>"),
        "anonymous": ("anonymous", "Privacy: id"),
    }
    procs = {}
    for name, (caller, header) in cases.items():
        csv = stack.workdir / f"{name}.csv"
        csv.write_text(f"SEQUENTIAL\n{caller};{CALLEE};{header};\n")
        procs[name] = SippProcess(
            name, "uac_rejected_hdr.xml", stack.workdir, local_port=free_port(),
            remote=("127.0.0.1", port), calls=1, rate=5, duration_ms=100, timeout=20, inf=csv,
        )
    # A caller from 127.0.0.2: loopback, but in no peer's networks.
    outsider = SippProcess(
        "outsider", "uac_rejected.xml", stack.workdir, local_port=free_port(),
        remote=("127.0.0.1", port), calls=1, rate=5, duration_ms=100, timeout=20,
        inf=write_csv(stack.workdir / "outsider.csv", [OWNED[0]]),
    )
    outsider.cmd[outsider.cmd.index("-i") + 1] = "127.0.0.2"
    procs["outsider"] = outsider
    legit = start_uac(stack, "legit", "uac_basic.xml", port, [OWNED[1]])
    for p in procs.values():
        stack.sipps.append(p)
        p.start()
    results = {name: p.wait() for name, p in procs.items()}
    legit_res = legit.wait()
    uas_res = stack.finish_uas(uas)
    detail = "\n\n".join(r.describe() for r in (*results.values(), legit_res, uas_res))
    detail += "\n" + guard.diagnostics()
    assert legit_res.successful == 1, detail
    assert uas_res.received("INVITE") == 1, detail
    status = {name: [line.split(" | ")[0] for line in final_responses(res)]
              for name, res in results.items()}
    assert status == {
        "invalid": ["SIP/2.0 603 Network Blocked"],
        "mismatch": ["SIP/2.0 603 Network Blocked"],
        "anonymous": ["SIP/2.0 433 Anonymity Disallowed"],
        "outsider": ["SIP/2.0 403 Forbidden"],
    }, detail
    guard.settle("invite_decided")
    reasons = Counter(
        (e.get("rule"), e.get("reason"))
        for e in guard.events if e.get("event") == "invite_decided"
    )
    assert reasons == Counter({
        (None, None): 1,
        ("callerid", "caller_invalid"): 1,
        ("callerid", "pai_mismatch"): 1,
        ("callerid", "caller_anonymous"): 1,
        ("peers", "unknown_source"): 1,
    }), detail
