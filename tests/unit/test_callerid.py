"""Rule callerid through the real Policy and the in-memory proxy: bytes in, answers and forwarded bytes out."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import phonenumbers
import pytest

from sipguard.contract import CallInfo, Flow, InviteDecided
from sipguard.ops.config_load import ConfigError, parse_config
from sipguard.policy import callerid, numbers
from sipguard.policy.engine import Policy
from sipguard.policy.state import RuleState
from sipguard.sip.message import Message
from sipguard.sip.parser import parse_message
from tests.unit.dialog_helpers import in_dialog, to
from tests.unit.proxy_helpers import CALLER, CORE, Harness, answer, invite

BASE = "listen: [udp://192.0.2.1:5060]\ncore: udp://10.0.0.10:5080\n"
PEERS = """
peers:
  - name: carrier-a
    networks: [198.51.100.0/24]
    numbers: ["+1212555*"]
  - name: pbx-b
    networks: [203.0.113.0/24]
"""
PBX = ("203.0.113.5", 5060)
NETWORK_BLOCKED_REASON = 'SIP;cause=603;text="v=analytics1";location=RPN'
_ids = itertools.count()


def make_policy(text: str, base_dir: Path | None = None, state: RuleState | None = None) -> Policy:
    return Policy(parse_config(BASE + textwrap.dedent(text), base_dir=base_dir), state)


class Call:
    """One INVITE through a Harness: what the caller heard and what the core got."""

    def __init__(self, h: Harness, src: tuple[str, int] = CALLER, **kw: str) -> None:
        n = next(_ids)
        out = h.send(invite(branch=f"z9hG4bK-t{n}", call_id=f"t{n}@test", **kw), src=src)
        self.answers = [m for f, m in out if f.addr != CORE]  # to src IP, Via port
        self.forwarded = [m for f, m in out if f.addr == CORE]
        decided = [e for e in h.events if isinstance(e, InviteDecided)]
        self.decision = decided[-1]

    @property
    def status(self) -> int:
        """The final status the caller heard (0: forwarded)."""
        finals = [m.status for m in self.answers if m.status >= 200]
        return finals[-1] if finals else 0

    @property
    def final(self) -> Message:
        return [m for m in self.answers if m.status >= 200][-1]

    @property
    def core(self) -> Message:
        assert len(self.forwarded) == 1, self.answers
        return self.forwarded[0]


def harness(text: str, base_dir: Path | None = None) -> Harness:
    return Harness(make_policy(text, base_dir).decide)  # type: ignore[arg-type]


# ------------------------------------------------------------------ ownership and verstat


def test_owned_caller_is_forwarded_with_verstat_passed_on_an_added_pai() -> None:
    """A caller the peer owns reaches the core with P-Asserted-Identity tel URI verstat=TN-Validation-Passed."""
    h = harness(PEERS + "rules: {callerid: {}}\n")
    call = Call(h, caller="+12125550100")
    assert call.status == 0
    assert call.core.values("p-asserted-identity") == [
        "<tel:+12125550100;verstat=TN-Validation-Passed>"
    ]
    assert not call.core.has("x-sipguard-verdict")
    assert call.decision.call.labels["verstat"] == "passed"


def test_not_owned_caller_hears_603_network_blocked_with_the_603plus_reason() -> None:
    """A caller number outside the peer's numbers gets 603 Network Blocked + ATIS-1000099 Reason and never reaches the core."""
    h = harness(PEERS + "rules: {callerid: {}}\n")
    call = Call(h, caller="+16465550100")
    assert call.status == 603 and call.forwarded == []
    assert call.final.start_line == b"SIP/2.0 603 Network Blocked"
    assert call.final.values("reason") == [NETWORK_BLOCKED_REASON]
    v = call.decision.verdict
    assert (v.rule, v.reason, v.action) == ("callerid", "caller_not_owned", "reject")


def test_redress_contacts_and_location_go_into_the_reason_text() -> None:
    """redress url, tel, email and location are rendered as the 603+ text AVPs and location parameter."""
    h = harness(PEERS + textwrap.dedent("""
        rules:
          callerid:
            redress: {url: "https://example.com/redress", tel: "+18005550100",
                      email: blocks@example.com, location: RLN}
        """))
    call = Call(h, caller="+16465550100")
    assert call.final.values("reason") == [
        'SIP;cause=603;text="v=analytics1;url=https://example.com/redress;tel=+18005550100;'
        'email=blocks@example.com";location=RLN'
    ]


def test_answer_status_phrase_and_headers_are_configurable() -> None:
    """answers.not_owned can turn the answer into 608 Rejected with its own headers and no 603+ Reason."""
    h = harness(PEERS + textwrap.dedent("""
        rules:
          callerid:
            answers: {not_owned: {status: 608, phrase: Rejected, headers: ["X-Why: not yours"]}}
        """))
    call = Call(h, caller="+16465550100")
    assert call.final.start_line == b"SIP/2.0 608 Rejected"
    assert call.final.values("x-why") == ["not yours"] and not call.final.has("reason")


def test_peer_without_numbers_may_present_any_number_without_verstat_passed() -> None:
    """A peer with no numbers list is not checked for ownership; verstat says No-TN-Validation."""
    h = harness(PEERS + "rules: {callerid: {}}\n")
    call = Call(h, src=PBX, caller="+16465550100")
    assert call.status == 0
    assert call.core.values("p-asserted-identity") == [
        "<tel:+16465550100;verstat=No-TN-Validation>"
    ]


def test_ownership_off_lets_any_valid_number_through() -> None:
    """ownership: false accepts a caller outside the peer's numbers."""
    h = harness(PEERS + "rules: {callerid: {ownership: false}}\n")
    assert Call(h, caller="+16465550100").status == 0


def test_numbers_file_with_thousands_of_entries(tmp_path: Path) -> None:
    """A numbers_file of 5000 exact numbers and prefixes (with comments) decides ownership."""
    lines = ["# carrier-a DIDs", ""]
    lines += [f"+1718555{i:04d}   # line {i}" for i in range(0, 5000, 2)]
    lines += [f"+1917{i:03d}*" for i in range(2500)]
    (tmp_path / "a-numbers.txt").write_text("\n".join(lines) + "\n")
    h = harness("""
        peers:
          - name: carrier-a
            networks: [198.51.100.0/24]
            numbers_file: a-numbers.txt
        rules: {callerid: {}}
        """, base_dir=tmp_path)
    assert Call(h, caller="+17185550998").status == 0  # exact entry
    assert Call(h, caller="+19172495555").status == 0  # prefix +1917249*
    assert Call(h, caller="+17185550999").status == 603  # odd: not listed
    assert Call(h, caller="+12125550100").status == 603


def test_national_format_is_read_with_the_peer_default_region() -> None:
    """With default_region US a national 2125550100 caller is +12125550100: owned, logged and asserted in E.164."""
    h = harness("""
        peers:
          - name: carrier-a
            networks: [198.51.100.0/24]
            numbers: ["+1212555*"]
            default_region: US
        rules: {callerid: {}}
        """)
    call = Call(h, caller="2125550100", callee="8005550199")
    assert call.status == 0
    assert call.decision.call.caller == "+12125550100"
    assert call.decision.call.callee == "+18005550199"
    assert call.core.values("p-asserted-identity") == [
        "<tel:+12125550100;verstat=TN-Validation-Passed>"
    ]


def test_national_format_without_a_region_is_not_e164() -> None:
    """Without default_region a national number is caller_not_e164 (603)."""
    h = harness(PEERS + "rules: {callerid: {}}\n")
    call = Call(h, caller="2125550100")
    assert call.status == 603 and call.decision.verdict.reason == "caller_not_e164"


def test_require_e164_off_accepts_a_non_e164_caller_without_verstat_pai() -> None:
    """require_e164 and reject_invalid off accept an extension; no PAI is invented for it."""
    h = harness(PEERS + "rules: {callerid: {require_e164: false, reject_invalid: false}}\n")
    call = Call(h, src=PBX, caller="4711")
    assert call.status == 0 and not call.core.has("p-asserted-identity")


def test_caller_without_any_number_is_not_e164() -> None:
    """A From of sip:alice@host (no number) is rejected as caller_not_e164."""
    h = harness(PEERS + "rules: {callerid: {}}\n")
    call = Call(h, src=PBX, caller="alice")
    assert call.status == 603 and call.decision.verdict.reason == "caller_not_e164"


@pytest.mark.parametrize(
    "number",
    ["+12115550100", "+19115550100", "+1212911", "+4420718387500", "+0012125550100"],
)
def test_invalid_numbers_are_rejected(number: str) -> None:
    """N11 area codes, impossible lengths and a zero country code are caller_not_e164 / caller_invalid (603)."""
    h = harness(PEERS + "rules: {callerid: {}}\n")
    call = Call(h, src=PBX, caller=number)
    assert call.status == 603
    assert call.decision.verdict.reason in ("caller_invalid", "caller_not_e164")
    assert call.final.values("reason") == [NETWORK_BLOCKED_REASON]


def test_reject_invalid_off_accepts_a_possible_but_unallocated_number() -> None:
    """With reject_invalid: false an N11 number of the right length passes (it is still E.164)."""
    h = harness(PEERS + "rules: {callerid: {reject_invalid: false}}\n")
    assert Call(h, src=PBX, caller="+12115550100").status == 0


# ------------------------------------------------------------------ Do-Not-Originate


def test_dno_number_hears_603_with_the_dno_reason(tmp_path: Path) -> None:
    """Numbers on the inline dno list or in dno_file (exact or prefix, '#' comments) get 603 Decline."""
    (tmp_path / "dno.txt").write_text(
        "# our inbound-only numbers\n+18005550100\n\n+1212555099*  # a whole block\n"
    )
    h = harness(PEERS + textwrap.dedent("""
        rules:
          callerid: {dno: ["+12125550123"], dno_file: dno.txt}
        """), base_dir=tmp_path)
    for number in ("+12125550123", "+12125550991"):
        call = Call(h, caller=number)
        assert call.status == 603 and call.decision.verdict.reason == "caller_dno"
        assert call.final.start_line == b"SIP/2.0 603 Decline"
        assert call.final.values("reason") == ['SIP;cause=603;text="Do Not Originate"']
    call = Call(h, src=PBX, caller="+18005550100")
    assert call.decision.verdict.reason == "caller_dno"
    assert Call(h, caller="+12125550100").status == 0


def test_dno_file_is_shared_across_peers_and_reread_only_when_changed(tmp_path: Path) -> None:
    """load_list returns the same NumberSet while the file is unchanged and a new one after it
    changes — in the next build: one build keeps one list per file (another rule of it
    reading the file after a change gets the same list, never one that retires it)."""
    path = tmp_path / "dno.txt"
    path.write_text("+18005550100\n")
    state = RuleState()
    build = make_policy("", state=state)
    first = callerid.load_list(build.ctx, path)
    assert callerid.load_list(build.ctx, path) is first  # another peer in the same build
    build.activate()
    reload = make_policy("", state=state)  # a reload on the same RuleState
    assert callerid.load_list(reload.ctx, path) is first
    path.write_text("+18005550100\n+18005550101\n")
    assert callerid.load_list(reload.ctx, path) is first  # changed during that build
    second = callerid.load_list(make_policy("", state=state).ctx, path)  # the next one
    assert second is not first and "+18005550101" in second


def test_dno_file_with_a_bad_line_names_file_and_line(tmp_path: Path) -> None:
    """A dno_file line that is not a number fails the build with FILE:LINE in the message."""
    (tmp_path / "dno.txt").write_text("+18005550100\nnot-a-number\n")
    with pytest.raises(ValueError, match=r"dno.txt:2: 'not-a-number'"):
        make_policy("rules: {callerid: {dno_file: dno.txt}}\n", base_dir=tmp_path)


def test_missing_dno_file_and_bad_settings_are_config_errors(tmp_path: Path) -> None:
    """A missing dno_file, a bad dno entry and a non-https redress url are reported with their paths."""
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + textwrap.dedent("""
            rules:
              callerid:
                dno_file: absent.txt
                dno: ["call me"]
                redress: {url: "http://example.com"}
            """), base_dir=tmp_path)
    paths = {i.path for i in caught.value.issues}
    assert paths == {"rules.callerid.dno_file", "rules.callerid.dno", "rules.callerid.redress.url"}


# ------------------------------------------------------------------ PAI and From


def pai(value: str) -> str:
    return f"P-Asserted-Identity: {value}\r\n"


@pytest.mark.parametrize(
    ("mode", "status", "tag"),
    [("reject", 603, None), ("tag", 0, "callerid.pai_mismatch"), ("ignore", 0, None)],
)
def test_pai_from_mismatch_reject_tag_ignore(mode: str, status: int, tag: str | None) -> None:
    """PAI and From with different numbers: reject answers 603, tag forwards with the verdict header, ignore forwards silently."""
    h = harness(PEERS + f"rules: {{callerid: {{pai_mismatch: {mode}}}}}\n")
    call = Call(h, caller="+12125550100", extra=pai("<tel:+12125550111>"))
    assert call.status == status
    if status:
        assert call.decision.verdict.reason == "pai_mismatch"
        assert call.final.values("reason") == [NETWORK_BLOCKED_REASON]
    else:
        assert call.core.values("x-sipguard-verdict") == ([tag] if tag else [])


def test_pai_is_the_caller_for_a_trusted_peer() -> None:
    """From a trusted peer the PAI number is the caller: an owned PAI passes though From is foreign."""
    h = harness(PEERS + "rules: {callerid: {pai_mismatch: ignore}}\n")
    call = Call(h, caller="+16465550100", extra=pai("<sip:+12125550100@carrier.example;user=phone>"))
    assert call.status == 0
    assert call.core.values("p-asserted-identity") == [
        "<sip:+12125550100;verstat=TN-Validation-Passed@carrier.example;user=phone>"
    ]


def test_pai_of_an_untrusted_peer_is_replaced_by_the_from_number() -> None:
    """With trust_pai: false the From number is the caller and the peer's PAI is replaced by it."""
    h = harness("""
        peers:
          - name: carrier-a
            networks: [198.51.100.0/24]
            numbers: ["+1212555*"]
            trust_pai: false
        rules: {callerid: {pai_mismatch: ignore}}
        """)
    spoof = Call(h, caller="+16465550100", extra=pai("<tel:+12125550100>"))
    assert spoof.status == 603 and spoof.decision.verdict.reason == "caller_not_owned"
    assert spoof.decision.call.caller == "+16465550100"
    ok = Call(h, caller="+12125550100", extra=pai("<tel:+16465550100>"))
    assert ok.core.values("p-asserted-identity") == [
        "<tel:+12125550100;verstat=TN-Validation-Passed>"
    ]


def test_same_number_in_two_formats_is_not_a_mismatch() -> None:
    """PAI +12125550100 and From 2125550100 (peer region US) are the same caller."""
    h = harness("""
        peers:
          - name: carrier-a
            networks: [198.51.100.0/24]
            default_region: US
        rules: {callerid: {pai_mismatch: reject}}
        """)
    assert Call(h, caller="2125550100", extra=pai("<tel:+1-212-555-0100>")).status == 0


def test_forged_verstat_and_verdict_header_from_a_peer_are_replaced() -> None:
    """A peer's own verstat (URI or header parameter) and X-Sipguard-Verdict never reach the core."""
    h = harness(PEERS + "rules: {callerid: {}}\n")
    extra = (
        '"Alice" <sip:+16465550100;verstat=TN-Validation-Passed@x.example;user=phone>;'
        "verstat=TN-Validation-Passed, tel:+16465550100;verstat=TN-Validation-Passed"
    )
    call = Call(h, src=PBX, caller="+16465550100",
                extra=pai(extra) + "X-Sipguard-Verdict: all good\r\n")
    assert call.core.values("p-asserted-identity") == [
        '"Alice" <sip:+16465550100;verstat=No-TN-Validation@x.example;user=phone>, '
        "<tel:+16465550100;verstat=No-TN-Validation>"
    ]
    assert not call.core.has("x-sipguard-verdict")


def test_verstat_goes_only_on_the_checked_number_and_a_second_number_is_not_forwarded() -> None:
    """Two P-Asserted-Identity values with different numbers: the first number is the caller
    checked and gets verstat; the other is not forwarded at all — nobody checked it (it went
    on to the core without verstat before; RFC 3325 §9.1: two values are one identity). The
    same number as a SIP and a tel URI, or in another spelling, stays."""
    h = harness(PEERS + "rules: {callerid: {pai_mismatch: ignore}}\n")
    call = Call(h, caller="+12125550100", extra=pai(
        "<sip:+12125550100@carrier.example;user=phone>, "
        "<tel:+13125550111;verstat=TN-Validation-Passed>"))
    assert call.status == 0
    assert call.core.values("p-asserted-identity") == [
        "<sip:+12125550100;verstat=TN-Validation-Passed@carrier.example;user=phone>"
    ]
    pair = Call(h, caller="+12125550100", extra=pai(
        "<sip:+1-212-555-0100@carrier.example;user=phone>, <tel:12125550100>"))
    assert len(pair.core.values("p-asserted-identity")[0].split(", ")) == 2



def test_a_second_number_in_p_asserted_identity_never_reaches_the_core() -> None:
    """Whatever rules run (none here, or only national_cli), a P-Asserted-Identity value of
    another number than the first — the one checked — is removed from what reaches the core;
    a value without a number (sip:gw@carrier) stays."""
    h = harness(PEERS)
    call = Call(h, caller="+12125550100", extra=pai(
        "<sip:gw@carrier.example>, <tel:+442071838750>, <sip:+31201234567@x.example;user=phone>"))
    assert call.core.values("p-asserted-identity") == [
        "<tel:+442071838750>, <sip:gw@carrier.example>"]  # the checked number first
    two_lines = Call(h, caller="+12125550100",
                     extra=pai("<tel:+442071838750>") + pai("<tel:+31201234567>"))
    assert two_lines.core.values("p-asserted-identity") == ["<tel:+442071838750>"]
    # a national spelling is another number here: its country code cannot be told
    forged = Call(h, caller="+12125550100", extra=pai(
        "<sip:0301234567@p.example;user=phone>, <tel:+33301234567>"))
    assert forged.core.values("p-asserted-identity") == ["<sip:0301234567@p.example;user=phone>"]


def test_an_untrusted_peers_p_asserted_identity_never_reaches_the_core() -> None:
    """A peer with trust_pai: false: its P-Asserted-Identity is removed whatever rules run
    (RFC 3325 §5) — it reached the core when rule callerid was not on."""
    h = harness("""
        peers:
          - name: intl
            networks: [198.51.100.0/24]
            trust_pai: false
        rules: {concurrency: {per_caller: 5}}
        """)
    call = Call(h, caller="+12125550100", extra=pai("<sip:+31201234567@intl.example;user=phone>"))
    assert call.status == 0 and not call.core.has("p-asserted-identity")
    assert call.decision.call.caller == "+12125550100"
    # nor in the call's later requests (an UPDATE)
    h.send(answer(call.core, 200, "OK"), src=CORE)
    update = in_dialog("UPDATE", call_id=call.core.call_id, cseq=2, branch="z9hG4bK-upd",
                       extra=pai("<tel:+31201234567>")).replace(
                           b";tag=ftag1", f";tag={call.core.from_tag}".encode())
    [sent] = [m for m in to(h.send(update), CORE) if m.method == "UPDATE"]
    assert not sent.has("p-asserted-identity")


def test_strip_headers_p_asserted_identity_removes_every_value() -> None:
    """sip.strip_headers naming P-Asserted-Identity removes it, also when it holds two
    numbers (the one-identity rewrite put the first back)."""
    h = Harness(make_policy(PEERS).decide,  # type: ignore[arg-type]
                strip_headers=frozenset({"p-asserted-identity", "x-sipguard-verdict"}))
    call = Call(h, caller="+12125550100",
                extra=pai("<tel:+12125550100>, <tel:+442071838750>") + pai("<tel:+1>"))
    assert not call.core.has("p-asserted-identity")


def test_a_first_pai_without_a_number_does_not_hide_the_caller() -> None:
    """PAI <sip:gw@carrier>, <tel:+1212...>: the caller is the second value's number for
    every rule — concurrency and the suspended list included — as for rule callerid."""
    h = harness(PEERS + "suspended: ['+12125550199']\n"
                "rules: {callerid: {}, concurrency: {per_caller: 1}}\n")
    extra = pai("<sip:gw@carrier.example>, <tel:+12125550100>")
    first = Call(h, caller="+12125550100", extra=extra)
    assert first.status == 0 and first.decision.call.caller == "+12125550100"
    second = Call(h, caller="+12125550100", extra=extra)
    assert second.status != 0 and second.decision.verdict.rule == "concurrency"
    suspended = Call(h, caller="+12125550199",
                     extra=pai("<sip:gw@carrier.example>, <tel:+12125550199>"))
    assert (suspended.status, suspended.decision.verdict.reason) == (403, "caller_suspended")
    no_number = Call(h, caller="+12125550199", extra=pai("<sip:gw@carrier.example>"))
    assert no_number.decision.call.caller == "+12125550199" and no_number.status == 403


def test_a_dno_or_suspended_number_shown_in_from_is_refused_behind_another_pai() -> None:
    """From shows a Do-Not-Originate number (first or after a decoy run of digits) and
    P-Asserted-Identity another: 603 caller_dno; From shows a suspended number behind another PAI: 403 caller_suspended."""
    h = harness(PEERS + "suspended: ['+12125550177']\n"
                "rules: {callerid: {dno: ['+18005550123'], pai_mismatch: ignore}}\n")
    dno = Call(h, caller="+18005550123", extra=pai("<tel:+12125550100>"))
    assert (dno.status, dno.decision.verdict.reason) == (603, "caller_dno")
    suspended = Call(h, caller="+12125550177", extra=pai("<tel:+12125550100>"))
    assert (suspended.status, suspended.decision.verdict.reason) == (403, "caller_suspended")
    assert Call(h, caller="+12125550100", extra=pai("<tel:+12125550100>")).status == 0
    # a decoy run of digits before the DNO number: a receiver skipping it reads the second
    decoy = Call(h, caller="123456x+18005550123", extra=pai("<tel:+12125550100>"))
    assert (decoy.status, decoy.decision.verdict.reason) == (603, "caller_dno")
    # decoy after decoy: more runs than a rule reads is no identity at all
    decoys = Call(h, caller="x1234567x1234567x1234567x1234567x+18005550123",
                  extra=pai("<tel:+12125550100>"))
    assert (decoys.status, decoys.decision.verdict.reason) == (603, "caller_invalid")


def test_verstat_off_leaves_the_pai_alone() -> None:
    """verstat: false forwards a trusted PAI byte for byte and adds none."""
    h = harness(PEERS + "rules: {callerid: {verstat: false}}\n")
    call = Call(h, caller="+12125550100", extra=pai("<tel:+12125550100>;foo=bar"))
    assert call.core.values("p-asserted-identity") == ["<tel:+12125550100>;foo=bar"]
    assert not Call(h, caller="+12125550100").core.has("p-asserted-identity")


# ------------------------------------------------------------------ anonymous callers


@pytest.mark.parametrize(
    ("caller", "extra"),
    [
        ("+12125550100", "Privacy: id\r\n"),
        ("+12125550100", "Privacy: user;critical\r\n"),
        ("anonymous", ""),  # sip:anonymous@198.51.100.7
        ("Restricted", ""),
    ],
)
def test_anonymous_callers_hear_433_when_rejected(caller: str, extra: str) -> None:
    """Privacy id/user and anonymous From users are answered 433 Anonymity Disallowed with anonymous: reject."""
    h = harness(PEERS + "rules: {callerid: {anonymous: reject}}\n")
    call = Call(h, caller=caller, extra=extra)
    assert call.final.start_line == b"SIP/2.0 433 Anonymity Disallowed"
    assert call.decision.verdict.reason == "caller_anonymous"


def test_anonymous_invalid_from_host_is_anonymous() -> None:
    """From "Anonymous" <sip:anonymous@anonymous.invalid> (RFC 3323) is anonymous: 433 with reject, forwarded with allow."""
    msg = invite().replace(b"<sip:+12125550100@198.51.100.7>",
                           b'"Anonymous" <sip:anonymous@anonymous.invalid>')
    for mode, status in (("reject", 433), ("allow", 0)):
        h = harness(PEERS + f"rules: {{callerid: {{anonymous: {mode}}}}}\n")
        out = h.send(msg)
        finals = [m.status for f, m in out if f.addr == CALLER and m.status >= 200]
        assert finals == ([status] if status else [])
        if not status:
            (fwd,) = [m for f, m in out if f.addr == CORE]
            assert not fwd.has("p-asserted-identity")


def test_privacy_none_is_not_anonymous() -> None:
    """Privacy: none does not make a caller anonymous."""
    h = harness(PEERS + "rules: {callerid: {anonymous: reject}}\n")
    assert Call(h, caller="+12125550100", extra="Privacy: none\r\n").status == 0


def test_allowed_anonymous_caller_with_a_pai_is_still_checked() -> None:
    """Under Privacy: id the trusted PAI number is checked like any caller (owned passes, foreign gets 603)."""
    h = harness(PEERS + "rules: {callerid: {}}\n")
    ok = Call(h, caller="anonymous", extra="Privacy: id\r\n" + pai("<tel:+12125550100>"))
    assert ok.status == 0
    assert ok.core.values("p-asserted-identity") == [
        "<tel:+12125550100;verstat=TN-Validation-Passed>"
    ]
    assert ok.core.values("privacy") == ["id"]
    bad = Call(h, caller="anonymous", extra="Privacy: id\r\n" + pai("<tel:+16465550100>"))
    assert bad.status == 603 and bad.decision.verdict.reason == "caller_not_owned"


# ------------------------------------------------------------------ neighbor spoofing


def test_neighbor_spoofing_is_off_by_default_and_tags_when_enabled() -> None:
    """A caller sharing the callee's NPA-NXX is untouched by default and tagged with neighbor_spoofing enabled."""
    off = harness(PEERS + "rules: {callerid: {}}\n")
    assert not Call(off, caller="+12125550100", callee="+12125550177").core.has(
        "x-sipguard-verdict")
    on = harness(PEERS + "rules: {callerid: {neighbor_spoofing: {enabled: true}}}\n")
    call = Call(on, caller="+12125550100", callee="+12125550177")
    assert call.core.values("x-sipguard-verdict") == ["callerid.neighbor_spoofing"]
    assert not Call(on, caller="+12125550100", callee="+12135550177").core.has(
        "x-sipguard-verdict")


def test_neighbor_spoofing_reject_and_digits() -> None:
    """action: reject answers 603; digits: 3 compares the area code only."""
    h = harness(PEERS + textwrap.dedent("""
        rules: {callerid: {neighbor_spoofing: {enabled: true, action: reject, digits: 3}}}
        """))
    call = Call(h, caller="+12125550100", callee="+12124440177")
    assert call.status == 603 and call.decision.verdict.reason == "neighbor_spoofing"
    assert Call(h, caller="+12125550100", callee="+16465550177").status == 0


# ------------------------------------------------------------------ monitor mode and peers


def test_rule_in_monitor_mode_forwards_and_reports_what_it_would_do() -> None:
    """mode: monitor on the rule forwards a not-owned caller, marked monitored, with verstat Failed and the would-be reason."""
    h = harness(PEERS + "rules: {callerid: {mode: monitor}}\n")
    call = Call(h, caller="+16465550100")
    assert call.status == 0
    v = call.decision.verdict
    assert (v.action, v.monitored, v.rule, v.reason, v.status) == (
        "accept", True, "callerid", "caller_not_owned", 603)
    assert call.core.values("p-asserted-identity") == [
        "<tel:+16465550100;verstat=TN-Validation-Failed>"
    ]
    assert call.core.values("x-sipguard-verdict") == ["callerid.caller_not_owned;monitored"]
    assert call.decision.call.labels["verstat"] == "failed"


def test_global_monitor_mode_applies_to_the_rule() -> None:
    """The top-level mode: monitor makes the rule forward what it would reject."""
    h = harness("mode: monitor\n" + PEERS + "rules: {callerid: {anonymous: reject}}\n")
    call = Call(h, caller="anonymous")
    assert call.status == 0 and call.decision.verdict.monitored
    assert call.decision.verdict.reason == "caller_anonymous"
    assert call.core.values("x-sipguard-verdict") == ["callerid.caller_anonymous;monitored"]


def test_enforce_rule_overrides_global_monitor() -> None:
    """A rule with mode: enforce rejects even when the top-level mode is monitor."""
    h = harness("mode: monitor\n" + PEERS + "rules: {callerid: {mode: enforce}}\n")
    assert Call(h, caller="+16465550100").status == 603


def test_per_peer_override_merges_over_the_top_level_rule() -> None:
    """peers[].rules changes the rule for that peer only: reject mismatches there, switch it off elsewhere."""
    h = harness("""
        peers:
          - name: carrier-a
            networks: [198.51.100.0/24]
            numbers: ["+1212555*"]
            rules: {callerid: {pai_mismatch: reject}}
          - name: pbx-b
            networks: [203.0.113.0/24]
            rules: {callerid: {enabled: false}}
        rules: {callerid: {pai_mismatch: tag}}
        """)
    extra = pai("<tel:+12125550111>")
    assert Call(h, caller="+12125550100", extra=extra).status == 603
    off = Call(h, src=PBX, caller="not-a-number", extra=extra)
    assert off.status == 0 and off.core.values("p-asserted-identity") == ["<tel:+12125550111>"]


def test_identity_outcome_from_an_earlier_rule_sets_verstat() -> None:
    """A STIR/SHAKEN outcome left in CallInfo.labels by rule identity decides verstat when the number is not otherwise vouched for."""
    policy = make_policy(PEERS + "rules: {callerid: {}}\n")
    rule = policy.by_peer["pbx-b"].rules[0]
    assert isinstance(rule, callerid.CallerId)
    for label, verstat in (("passed", "TN-Validation-Passed"), ("failed", "TN-Validation-Failed"),
                           ("none", "No-TN-Validation")):
        call = CallInfo(parse_message(invite(caller="+16465550100")), Flow("udp", PBX, 0), 0.0)
        call.labels["identity"] = label
        verdict = rule.decide(call, 0.0)
        assert verdict.accepted
        assert dict(verdict.replace_headers)["p-asserted-identity"] == (
            f"P-Asserted-Identity: <tel:+16465550100;verstat={verstat}>")


def test_no_peers_configured_checks_every_source_with_pai_trusted() -> None:
    """Without peers the rule still checks number plausibility, trusting PAI from any source."""
    h = harness("rules: {callerid: {}}\n")
    assert Call(h, caller="+12115550100").status == 603
    call = Call(h, caller="+16465550100", extra=pai("<tel:+12125550100>"))
    assert call.status == 0
    assert call.core.values("p-asserted-identity") == [
        "<tel:+12125550100;verstat=No-TN-Validation>"
    ]
    assert call.core.values("x-sipguard-verdict") == ["callerid.pai_mismatch"]


# ------------------------------------------------------------------ numbers


def test_global_number_reading_agrees_with_phonenumbers_parse() -> None:
    """numbers.lookup without parse() gives the same E.164 and validity as phonenumbers.parse for every region's example numbers."""
    checked = 0
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in (phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is None:
                continue
            text = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
            info = numbers.lookup(text)
            assert (info.e164, info.valid) == (text, phonenumbers.is_valid_number(example)), text
            checked += 1
    assert checked > 400


def test_the_kind_of_a_malformed_number_is_other() -> None:
    """Text that is no "+" and digits (a stray "+" inside) is "other", not a ValueError."""
    assert numbers.number_kind("+6+5075291") == "other"
    assert numbers.number_kind("+33612345678") == "mobile"


@pytest.mark.parametrize(
    ("number", "region", "e164"),
    [
        ("+12125550100", None, "+12125550100"),
        ("2125550100", "US", "+12125550100"),
        ("12125550100", "US", "+12125550100"),
        ("02071838750", "GB", "+442071838750"),
        ("2125550100", None, None),
        ("+0123", None, None),
        ("+1", None, None),
        ("+1234567890123456", None, None),
        ("12", "US", None),
    ],
)
def test_lookup_normalises_or_refuses(number: str, region: str | None, e164: str | None) -> None:
    """lookup reads global numbers, national numbers with a region, and refuses bad shapes."""
    assert numbers.lookup(number, region).e164 == e164


def test_a_number_list_that_is_not_utf8_or_a_directory_names_the_setting_and_file(
        tmp_path: Path) -> None:
    """A dno_file with bytes that are not UTF-8 (or a folder given as one), and a peer's
    numbers_file with such bytes: each error names the setting, the file and the line."""
    (tmp_path / "dno.txt").write_bytes(b"+18005550100\n+1800\xff5550101\n")
    with pytest.raises(ValueError, match=r"callerid dno_file: .*dno.txt:2: not UTF-8"):
        make_policy("rules: {callerid: {dno_file: dno.txt}}\n", base_dir=tmp_path)
    (tmp_path / "lists").mkdir()
    with pytest.raises(ConfigError, match=r"rules.callerid.dno_file: a directory, not a file"):
        make_policy("rules: {callerid: {dno_file: lists}}\n", base_dir=tmp_path)
    (tmp_path / "a.txt").write_bytes(b"\xfe\xff+1212\n")
    with pytest.raises(ValueError, match=r"peer carrier-a: numbers_file: .*a.txt:1: not UTF-8"):
        make_policy("peers:\n  - name: carrier-a\n    networks: [198.51.100.0/24]\n"
                    "    numbers_file: a.txt\n", base_dir=tmp_path)


def test_a_number_list_with_any_line_ending_reads_the_same(tmp_path: Path) -> None:
    """CR LF, LF and old-Mac CR line endings: the same numbers."""
    for ending in ("\r\n", "\n", "\r"):
        (tmp_path / "dno.txt").write_bytes(ending.join(
            ["# blocked", "+18005550100", "+1900*"]).encode())
        from sipguard.policy.peers import read_number_file

        assert read_number_file(tmp_path / "dno.txt") == ["+18005550100", "+1900*"], ending


@pytest.mark.parametrize("rules", ["rules: {callerid: {}}\n", ""])
def test_a_pai_value_without_a_readable_number_carries_no_verstat_and_never_comes_first(
        rules: str) -> None:
    """A P-Asserted-Identity value whose user a receiver may read as a number though none is
    read here (*67+1312…, a trailing #) is not forwarded: nobody checked it. A forged verstat
    on a value without a number (sip:gw@carrier;verstat=…) is removed, and the checked number
    goes first — a core takes the first value for the caller. With rule callerid on or off."""
    h = harness(PEERS + rules)
    forged = "verstat=TN-Validation-Passed"
    call = Call(h, caller="+12125557089", extra=pai(
        f"<sip:*67+13125557090;{forged}@h.example;user=phone>, <tel:+12125557089>"))
    assert call.status == 0
    want = f"<tel:+12125557089;{forged}>" if rules else "<tel:+12125557089>"
    assert call.core.values("p-asserted-identity") == [want]
    hashed = Call(h, caller="+12125557089", extra=pai(
        "<sip:+13125557094%23@h.example>, <tel:+12125557089>"))
    assert hashed.core.values("p-asserted-identity") == [want]
    gateway = Call(h, caller="+12125557089", extra=pai(f"<sip:gw@carrier.example;{forged}>"))
    assert gateway.status == 0 and forged not in str(gateway.core.values("p-asserted-identity"))
    alone = Call(h, caller="+12125557089", extra=pai("<sip:*67+13125557090@h.example;user=phone>"))
    assert all("13125557090" not in v for v in alone.core.values("p-asserted-identity"))


def test_a_from_showing_a_number_sipguard_cannot_read_is_a_mismatch() -> None:
    """Behind an asserted number, a From whose user a receiver may read as another number —
    *67+1312…, +1212…# (a DNO number), +1312…, — is taken as not the asserted one:
    pai_mismatch (it passed every From check before, none being read). An escaped control
    character in a number (+1312…%00, which a receiver reading C strings sees as +1312…) is
    a 400 wherever it is."""
    h = harness(PEERS + "rules: {callerid: {dno: ['+12125550666'], pai_mismatch: reject}}\n")
    for shown in ("sip:*67+13125556944@h.example;user=phone", "sip:+12125550666%23@h.example",
                  "sip:+13125556950,@h.example"):
        n = next(_ids)
        data = invite(branch=f"z9hG4bK-s{n}", call_id=f"s{n}@test", caller="+12125556943",
                      extra=pai("<tel:+12125556943>")).replace(
            b"From: <sip:+12125556943@198.51.100.7>", f"From: <{shown}>".encode())
        [final] = [m for m in to(h.send(data), CALLER) if m.status >= 200]
        assert final.status == 603, shown
    assert Call(h, caller="+12125556943", extra=pai("<tel:+12125556943>")).status == 0
    assert Call(h, caller="+13125556944%00", extra=pai("<tel:+12125556943>")).status == 400
    assert Call(h, caller="null-%00-null", extra=pai("<tel:+12125556943>")).status == 0  # RFC 4475


def test_a_display_name_showing_another_number_is_a_display_mismatch() -> None:
    """From's (or PAI's) display name is a telephone number that is neither the caller's nor
    From's: tagged callerid.display_mismatch by default, 603 with display_mismatch: reject.
    The caller's own number there, in another spelling, or a name, is no mismatch."""
    def call(h: Harness, display: str) -> None:
        n = next(_ids)
        h.send(invite(branch=f"z9hG4bK-d{n}", call_id=f"d{n}@test", caller="+12125556920")
               .replace(b"From: <sip:", f"From: {display} <sip:".encode()))

    h = harness(PEERS + "rules: {callerid: {}}\n")
    for display, mismatch in (('"+1 (312) 555-6921"', True), ("+13125556921", True),
                              ('"212-555-6920"', False), ('"+12125556920"', False),
                              ('"Acme Support 24/7"', False), ('"Agent 1234"', False)):
        call(h, display)
        decided = [e for e in h.events if isinstance(e, InviteDecided)][-1]
        assert ("callerid.display_mismatch" in str(decided.verdict.forward_headers)) == mismatch, \
            display
    pai_named = Call(h, caller="+12125556920", extra=pai('"+13125550123" <sip:x@carrier.example>'))
    assert "callerid.display_mismatch" in str(pai_named.core.values("x-sipguard-verdict"))
    strict = harness(PEERS + "rules: {callerid: {display_mismatch: reject}}\n")
    call(strict, '"+13125556921"')
    decided = [e for e in strict.events if isinstance(e, InviteDecided)][-1]
    assert (decided.verdict.status, decided.verdict.reason) == (603, "display_mismatch")


def test_pai_values_with_digits_but_no_number_or_of_another_scheme_are_not_forwarded() -> None:
    """Values a receiver may read a number in that none was read as here — another scheme
    (skp:), a user of digits around other characters — do not reach the core; a SIP URI
    whose user is a name (sip:gw7@carrier, sip:agent7@pbx) does. With rule callerid, a PAI
    left with no value is replaced by the checked caller's, never sent empty."""
    h = harness(PEERS)
    for value in ("<skp:+13125550123@x.example>", "<sip:+13125=50123@x.example>"):
        call = Call(h, caller="+12125550100", extra=pai(f"{value}, <tel:+12125550100>"))
        assert call.core.values("p-asserted-identity") == ["<tel:+12125550100>"], value
    for name in ("sip:gw7@carrier.example", "sip:agent7@pbx.example"):
        kept = Call(h, caller="+12125550100", extra=pai(f"<{name}>, <tel:+12125550100>"))
        assert kept.core.values("p-asserted-identity") == [f"<tel:+12125550100>, <{name}>"]
        alone = Call(h, caller="+12125550100", extra=pai(f"<{name}>"))
        assert alone.core.values("p-asserted-identity") == [f"<{name}>"]
    checked = harness(PEERS + "rules: {callerid: {}}\n")
    for value in ("<sip:*67+13125550100@x.example>", "<skp:+13125550123@x.example>"):
        call = Call(checked, caller="+12125550100", extra=pai(value))
        assert call.core.values("p-asserted-identity") == [
            "<tel:+12125550100;verstat=TN-Validation-Passed>"], value
    bare = Call(h, caller="+12125550100", extra=pai("<sip:*67+13125550100@x.example>"))
    assert not bare.core.has("p-asserted-identity")  # without a rule: removed, not emptied


def test_display_names_of_every_pai_value_and_in_the_usual_spellings() -> None:
    """display_mismatch reads every P-Asserted-Identity value's display name (a second value's
    went first to the core once the checked number is put first), counts no-break spaces and
    dashes as separators, and takes "+44 (0)20 …" and "0044 20 …" for the caller's own number."""
    h = harness(PEERS + "rules: {callerid: {display_mismatch: reject}}\n")
    second = Call(h, caller="+12125550100", extra=pai(
        '<sip:gw1@carrier.example>, "+1 900 555 0199" <sip:+12125550100@carrier.example>'))
    assert (second.status, second.decision.verdict.reason) == (603, "display_mismatch")
    nbsp = Call(h, caller="+12125550100", extra=pai('"+1\u00a0900\u00a0555\u00a00199" <tel:+12125550100>'))
    assert nbsp.status == 603
    uk = harness("""
        peers:
          - name: uk
            networks: [198.51.100.0/24]
        rules: {callerid: {display_mismatch: reject}}
        """)
    for display in ('"+44 (0)20 7183 8750"', '"0044 20 7183 8750"', '"020 7183 8750"'):
        call = Call(uk, caller="+442071838750", extra=pai(f'{display} <tel:+442071838750>'))
        assert call.status == 0, display


def test_a_pai_number_hidden_behind_an_invisible_character_or_a_suffix_is_not_forwarded() -> None:
    """+1900…%E2%80%8B (a zero-width space) or +1900…p1 is no number here and no name either:
    the value is removed, and the caller is From's number, checked (it passed unchecked to
    the core with a DNO number behind it)."""
    h = harness(PEERS + "rules: {callerid: {dno: ['+19005550199']}}\n")
    for value in ("<sip:+19005550199%E2%80%8B@carrier.example;user=phone>",
                  "<sip:+19005550199%C2%A0@carrier.example;user=phone>",
                  "<sip:+19005550199p1@carrier.example>"):
        call = Call(h, caller="+12125550100", extra=pai(value))
        assert call.status == 0 and all("1900" not in v for v in
                                        call.core.values("p-asserted-identity")), value


def test_a_from_showing_the_asserted_number_with_a_suffix_or_an_extension_is_no_mismatch() -> None:
    """Behind PAI +12125550100 (pai_mismatch: reject): a From of the same number with an
    extension or pause suffix, an extension (sip:1000@pbx), a name starting with digits
    (3cx, 1000_agent) or the number in its 00 spelling is no mismatch — only a From that
    shows another telephone number is."""
    h = harness(PEERS + "rules: {callerid: {pai_mismatch: reject}}\n")
    for user, refused in (("+12125550100x12", False), ("+12125550100p1", False),
                          ("1000", False), ("1000a", False), ("3cx", False),
                          ("1000_agent", False), ("0012125550100", False),
                          ("queue_123456", False), ("agent-100-200", False),
                          ("ext.1000.2001", False),
                          ("x13125550111", True), ("+13125550111x12", True)):
        n = next(_ids)
        data = invite(branch=f"z9hG4bK-x{n}", call_id=f"x{n}@test", caller="+12125550100",
                      extra=pai("<tel:+12125550100>")).replace(
            b"From: <sip:+12125550100@198.51.100.7>", f"From: <sip:{user}@pbx.example>".encode())
        finals = [m.status for m in to(h.send(data), CALLER) if m.status >= 200]
        assert (finals == [603]) == refused, user
    named = Call(h, caller="+12125550100", extra=pai("<sip:3cx@pbx.example>, <tel:+12125550100>"))
    assert "<sip:3cx@pbx.example>" in call_values(named)


def call_values(call: Call) -> str:
    return ", ".join(call.core.values("p-asserted-identity"))


def test_display_numbers_in_any_spelling_and_a_real_trunk_0() -> None:
    """A display name's digits are read whatever separates them (a narrow no-break space, a
    word joiner, an underscore) and in full-width form; "+39 035 …" is Bergamo's number, not
    the Italian mobile +39 351 … (a 0 after the country code is a digit there)."""
    h = harness(PEERS + "rules: {callerid: {display_mismatch: reject}}\n")
    for display in ('"+1 900 555 0199\u3164"', '"\uffa0+1 900 555 0199"',
                    '"+\u0661\u0669\u0660\u0660\u0665\u0665\u0665\u0660\u0661\u0669\u0669"',
                    '"+1 900 555 0199 #12345"', '"+1 900 555 0199 / +1 212 555 0100"',
                    '"+1\u202f900\u202f555\u202f0199"', '"+1\u2060900\u20605550199"',
                    '"+1_900_555_0199"', '"\uff0b\uff11\uff19\uff10\uff10\uff15\uff15\uff15\uff10\uff11\uff19\uff19"'):
        call = Call(h, caller="+12125550100", extra=pai(f"{display} <tel:+12125550100>"))
        assert call.status == 603, display
    for display in ('"+1 212 555 0100 #12"', '"212-555-0100, 0101"', '"Agent 007"'):
        assert Call(h, caller="+12125550100",
                    extra=pai(f"{display} <tel:+12125550100>")).status == 0, display
    italy = harness("""
        peers:
          - name: it
            networks: [198.51.100.0/24]
        rules: {callerid: {display_mismatch: reject}}
        """)
    assert Call(italy, caller="+393512345678",
                extra=pai('"+39 035 1234 5678" <tel:+393512345678>')).status == 603
    assert Call(italy, caller="+393512345678",
                extra=pai('"+39 351 234 5678" <tel:+393512345678>')).status == 0


def test_a_pai_number_behind_a_leading_letter_is_no_name() -> None:
    """sip:x19005550199@… holds a number a receiver may read (a DNO number here): the value is
    not forwarded and the checked caller is asserted instead."""
    h = harness(PEERS + "rules: {callerid: {dno: ['+19005550199']}}\n")
    call = Call(h, caller="+12125550100", extra=pai("<sip:x19005550199@carrier.example>"))
    assert call.status == 0 and call_values(call) == "<tel:+12125550100;verstat=TN-Validation-Passed>"


# ------------------------------------------------------------------ audit: national DNO, withheld display, "*"


def _decide(h: Harness, data: bytes, src: tuple[str, int] = CALLER) -> tuple[list[Message], list[Message], InviteDecided]:
    out = h.send(data, src=src)
    decided = [e for e in h.events if isinstance(e, InviteDecided)][-1]
    return [m for f, m in out if f.addr != CORE], [m for f, m in out if f.addr == CORE], decided


def test_a_national_dno_entry_blocks_the_e164_caller_of_that_country() -> None:
    """An industry DNO list holds 10-digit NANP numbers: '2125550111' blocks +12125550111 and
    12125550111 from a peer with default_region US, and from one without a region; it does
    not block +44 20 7946 0111 for an entry '2079460111' from the US peer (another country's
    number) but does from a peer without a region; a trunk-0 prefix matches too."""
    h = harness(PEERS.replace("    numbers: [\"+1212555*\"]\n", "    default_region: US\n")
                + "rules:\n  callerid: {dno: ['2125550111', '2079460111', '0201234*']}\n")
    def reason(src: tuple[str, int], caller: str) -> str:
        return Call(h, src=src, caller=caller).decision.verdict.reason

    for caller in ("+12125550111", "12125550111", "2125550111"):
        assert reason(CALLER, caller) == "caller_dno", caller
    assert reason(PBX, "+12125550111") == "caller_dno"  # (national spellings: not E.164 there)
    assert reason(CALLER, "+12125550122") == reason(PBX, "+12125550122") == ""
    assert reason(CALLER, "+442079460111") == ""  # another country than the peer's
    assert reason(PBX, "+442079460111") == "caller_dno"  # no region: any country
    assert reason(PBX, "+31201234567") == "caller_dno"  # a trunk-0 prefix


def test_a_withheld_callers_display_name_that_is_a_number_is_a_display_mismatch() -> None:
    """'"+1 800 275 2273" <sip:anonymous@anonymous.invalid>' put an unchecked number on the
    agent's screen untagged: now display_mismatch, tagged (and a decision label and counter
    callerid_display_mismatch) or refused; a withheld caller with a name passes."""
    for mode, status in (("tag", 0), ("reject", 603)):
        h = harness(f"rules:\n  callerid: {{display_mismatch: {mode}}}\n")
        data = invite(call_id=f"w-{mode}@t").replace(
            b"From: <sip:+12125550100@198.51.100.7>",
            b'From: "+1 800 275 2273" <sip:anonymous@anonymous.invalid>')
        answers, core, decided = _decide(h, data)
        finals = [m.status for m in answers if m.status >= 200]
        assert (finals[-1] if finals else 0) == status, mode
        if mode == "tag":
            assert core[0].get("x-sipguard-verdict") == "callerid.display_mismatch"
            assert decided.call.labels.get("callerid") == "display_mismatch"
        named = invite(call_id=f"n-{mode}@t", branch=f"z9hG4bK-n{mode}").replace(
            b"From: <sip:+12125550100@198.51.100.7>",
            b'From: "Anonymous" <sip:anonymous@anonymous.invalid>')
        answers, core, _ = _decide(h, named)
        assert len(core) == 1 and not core[0].has("x-sipguard-verdict")


def test_a_lone_star_numbers_list_vouches_for_no_caller() -> None:
    """numbers: ["*"] lets any number through, as no list does, and so gives the core the
    same No-TN-Validation: it vouches for no number in particular (it gave every caller in
    the world TN-Validation-Passed)."""
    h = harness(PEERS.replace('numbers: ["+1212555*"]', 'numbers: ["*"]')
                + "rules:\n  callerid: {}\n")
    call = Call(h, caller="+442079460000")
    assert call.status == 0
    assert "verstat=No-TN-Validation" in (call.core.get("p-asserted-identity") or "")


def test_an_untrusted_pai_is_not_compared_with_from() -> None:
    """With trust_pai: false the peer's PAI is removed and From is the caller: a PAI with
    another number is no pai_mismatch (the tag spoke of a header the core never sees, and
    pai_mismatch: reject refused such a peer's calls for it)."""
    h = harness(PEERS.replace("  - name: pbx-b\n", "  - name: pbx-b\n    trust_pai: false\n")
                + "rules:\n  callerid: {pai_mismatch: reject}\n")
    call = Call(h, src=PBX, caller="+12125550100", extra=pai("<tel:+13125550100>"))
    assert call.status == 0
    assert call.core.get("p-asserted-identity") == "<tel:+12125550100;verstat=No-TN-Validation>"
    assert call.decision.call.labels.get("callerid") is None


def test_a_tag_is_the_decision_lines_callerid_label() -> None:
    """A tagged call's first callerid tag is its decision label (the invite_decided field
    and counter callerid_<tag>), as rule dialer's are."""
    h = harness("rules:\n  callerid: {}\n")
    call = Call(h, caller="+12125550100", extra=pai("<tel:+13125550100>"))
    assert call.status == 0 and call.decision.call.labels.get("callerid") == "pai_mismatch"


def test_a_top_level_default_region_serves_a_config_without_peers_and_peers_without_one() -> None:
    """default_region at the top: without peers a national caller reads as E.164 (it was
    refused caller_not_e164, no region to read it with) and a national DNO entry or
    suspension blocks it in any spelling; a peer without a region of its own inherits it,
    one with its own keeps that."""
    h = harness("default_region: US\nsuspended: ['+12125550177']\n"
                "rules:\n  callerid: {dno: ['2125550111']}\n")
    call = Call(h, caller="2125550100")
    assert call.status == 0 and call.decision.call.caller == "+12125550100"
    assert Call(h, caller="12125550111").decision.verdict.reason == "caller_dno"
    assert Call(h, caller="2125550177").decision.verdict.reason == "caller_suspended"
    cfg = parse_config(BASE + "default_region: us\n" + PEERS.replace(
        "  - name: pbx-b\n", "  - name: pbx-b\n    default_region: GB\n"))
    assert [p.default_region for p in cfg.peers] == ["US", "GB"]
