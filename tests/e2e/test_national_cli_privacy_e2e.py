"""End-to-end: rule national_cli on an international peer with every other rule on, log.numbers: masked; SIPp UAC -> sipguard -> SIPp UAS on 127.0.0.1."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from .harness import E2EStack
from .test_callerid_e2e import final_responses, start_uac

pytestmark = pytest.mark.e2e

DUTCH_FIXED = [f"+3120123{4500 + i}" for i in range(3)]  # blocked
DUTCH_MOBILE = [f"+3161234{5600 + i}" for i in range(3)]  # anonymised
FOREIGN = [f"+1212555{1000 + i}" for i in range(3)]  # not a home number: accepted

CONFIG = """
log: {numbers: masked}
peers:
  - name: intl
    networks: [127.0.0.1/32]
    interconnect: international
rules:
  national_cli:
    home_countries: ["31"]
    fixed: block
    mobile: anonymise
  callerid: {}
  concurrency: {per_caller: 5}
  rate: {per_caller: {rate: 100, burst: 100}}
  dialer: {mode: monitor}
  flood: {}
"""


def test_masked_log_of_a_run_with_every_rule_on_has_no_full_number(stack: E2EStack) -> None:
    """Dutch fixed callers hear 603, Dutch mobiles reach the core anonymised (no number in the INVITE), foreign callers pass, and no full number appears in sipguard's stdout."""
    accepted = DUTCH_MOBILE + FOREIGN
    uas = stack.uas("uas_basic.xml", calls=len(accepted))
    guard, port = stack.sipguard(core_port=uas.local_port, listen=("udp",), config_extra=CONFIG)
    ok = start_uac(stack, "accepted", "uac_basic.xml", port, accepted)
    blocked = start_uac(stack, "blocked", "uac_rejected.xml", port, DUTCH_FIXED)
    ok_res, blocked_res = ok.wait(), blocked.wait()
    uas_res = stack.finish_uas(uas)
    detail = "\n\n".join(r.describe() for r in (ok_res, blocked_res, uas_res))
    detail += "\n" + guard.diagnostics()

    assert ok_res.successful == len(accepted) and ok_res.failed == 0, detail
    assert blocked_res.successful == len(DUTCH_FIXED), detail
    assert {r.split(" | ")[0] for r in final_responses(blocked_res)} == {
        "SIP/2.0 603 Network Blocked"}, detail
    core_log = uas_res.message_log.read_text(errors="replace")
    assert core_log.count('From: "Anonymous" <sip:anonymous@anonymous.invalid>;tag=') >= len(
        DUTCH_MOBILE), detail
    assert "Privacy: id" in core_log, detail
    # Every message of an anonymised call at the core — INVITE, ACK, BYE — is free of the
    # caller's number.
    blocks = re.split(r"^-{20,} .*$", core_log, flags=re.M)
    invites = [b for b in blocks if re.search(r"^\s*INVITE sip:", b, flags=re.M)]
    assert len(invites) >= len(accepted), detail
    withheld = {m.group(1) for b in invites if "anonymous.invalid" in b
                and (m := re.search(r"^\s*Call-ID:\s*(\S+)", b, flags=re.M | re.I))}
    assert len(withheld) == len(DUTCH_MOBILE), detail
    checked = 0
    for block in blocks:
        m = re.search(r"^\s*Call-ID:\s*(\S+)", block, flags=re.M | re.I)
        if m is None or m.group(1) not in withheld:
            continue
        checked += 1
        for number in DUTCH_MOBILE:
            assert number not in block and number[1:] not in block, block
    assert checked >= 3 * len(DUTCH_MOBILE), detail  # INVITE, ACK, BYE at least

    total = len(accepted) + len(DUTCH_FIXED)
    assert guard.settle("invite_decided", expect=total) == total, detail
    assert guard.settle("dialog_ended") >= len(accepted), detail
    labels = Counter(e.get("national_cli") for e in guard.events
                     if e.get("event") == "invite_decided")
    assert labels["blocked"] == len(DUTCH_FIXED) and labels["anonymised"] == len(DUTCH_MOBILE)
    callers = {e.get("caller") for e in guard.events if e.get("event") == "invite_decided"}
    assert "+31******600" in callers, callers
    stdout = "\n".join(guard.lines)
    for number in DUTCH_FIXED + DUTCH_MOBILE + FOREIGN:
        assert number not in stdout and number[1:] not in stdout, number
