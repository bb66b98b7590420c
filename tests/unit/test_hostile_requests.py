"""Requests and answers crafted to slip past the policy or to leave state behind: a strict
route that changes the called number, a Request-URI the policy cannot read as a number, a
decision that waited and then meets a bad header, a callee's 2xx with a To that does not
parse, verstat written so that the plain text does not say "verstat", and the verdict headers
of rules a peer's traffic never runs."""

from __future__ import annotations

from sipguard.contract import (
    Anonymise,
    CallInfo,
    DialogEnded,
    Dropped,
    InviteDecided,
    Noticed,
    Verdict,
)
from sipguard.ops.config_load import parse_config
from sipguard.policy import callerid
from sipguard.server import owned_headers
from sipguard.sip.parser import parse_message
from tests.unit.dialog_helpers import PolicyHarness, to
from tests.unit.proxy_helpers import CORE, Harness, answer, invite
from tests.unit.rule_calls import MINIMAL

REMOTE = ("203.0.113.50", 5060)


def statuses(out: list) -> list[int]:  # type: ignore[type-arg]
    return [m.status for _, m in out if m.status is not None]


def test_a_strict_routed_initial_invite_from_outside_is_refused() -> None:
    """Request-URI = sipguard's own address with lr, the real target in the last Route: the
    policy would check the To / Request-URI number while the core got the Route's. 400, and
    nothing reaches the core; the same number dialled directly is refused by the policy."""
    h = PolicyHarness(extra_yaml='suspended: ["+19005550000"]\n')
    strict = invite(uri="sip:192.0.2.1:5060;lr", callee="+18005550123",
                    extra="Route: <sip:+19005550000@10.0.0.10:5080;user=phone>\r\n")
    out = h.send(strict)
    assert to(out, CORE) == [] and statuses(out) == [100, 400]
    assert any(isinstance(e, Dropped) and e.kind == "strict_routed_initial" for e in h.events)
    out = h.send(invite(branch="z9hG4bK-direct", call_id="direct", callee="+19005550000"))
    assert to(out, CORE) == [] and statuses(out) == [100, 403]


def test_the_callee_is_the_request_uris_number_never_tos_instead() -> None:
    """A Request-URI user that is no number (a '#' after it, a *67 before it) leaves the call
    with no called number — not To's, which the caller writes freely; a Request-URI without a
    user part still takes To's number."""
    h = PolicyHarness()
    for i, uri in enumerate(["sip:+19005550000#@192.0.2.1:5060", "sip:*67+19005550000@192.0.2.1",
                             "sip:192.0.2.1:5060", "sip:+19005550000@192.0.2.1"]):
        h.send(invite(branch=f"z9hG4bK-u{i}", call_id=f"u{i}", uri=uri, callee="+18005550123"))
    callees = [e.call.callee for e in h.events if isinstance(e, InviteDecided)]
    assert callees == [None, None, "+18005550123", "+19005550000"]


def test_a_decision_that_waited_then_meets_a_bad_contact_ends_the_call_it_started() -> None:
    """The verdict of a decision that waited for I/O anonymises the caller; the Contact to
    edit does not parse. The caller hears 400 on its transaction, the dialog it started ends
    and its slots go back (before: 100 Trying, then nothing, the transaction, dialog and slot
    kept for hours)."""
    calls: list[CallInfo] = []

    def later(call: CallInfo, now: float) -> Verdict | None:
        calls.append(call)
        return None

    h = Harness(decide=later)
    bad = invite().replace(b"Contact: <sip:+12125550100@198.51.100.7:5062>",
                           b"Contact: <sip:a@198.51.100.7>;;")
    assert statuses(h.send(bad)) == [100]
    h.proxy.resolve(calls[0], Verdict("accept", anonymise=Anonymise()), h.now)
    out = h._drain()
    assert to(out, CORE) == [] and statuses(out) == [400]
    assert h.admission is not None and len(h.admission.ended) == 1
    assert any(isinstance(e, DialogEnded) and e.reason == "failed" for e in h.events)
    assert not h.proxy.dialogs
    h.advance(40)  # the 400's timers end the transaction
    assert not h.proxy.servers


def test_a_2xx_with_a_to_that_does_not_parse_changes_nothing() -> None:
    """The core places a call; the callee answers 200 with a To that does not parse. The
    answer is dropped before any state changes: the proper 200 that follows still reaches
    the core, and the core's transaction ends."""
    h = PolicyHarness()
    inv = invite(branch="z9hG4bK-out", call_id="out-1", uri="sip:+447700900123@203.0.113.50",
                 via_host="10.0.0.10:5080")
    [req] = to(h.send(inv, src=CORE), REMOTE)
    bad = answer(req, 200, "OK", to_tag="x;;")
    assert to(h.send(bad, src=REMOTE), CORE) == []
    good = [m for m in to(h.send(answer(req, 200, "OK", to_tag="r1"), src=REMOTE), CORE)]
    assert [m.status for m in good] == [200]
    h.advance(40)
    assert not h.proxy.servers


def test_verstat_folded_or_escaped_is_removed_too() -> None:
    """verstat on a folded line, or with %-escaped letters (which the URI grammar reads as
    verstat), never reaches the core from outside."""
    h = PolicyHarness()
    forged = ("P-Asserted-Identity: <tel:+12125550100;ver%73tat=TN-Validation-Passed>\r\n"
              "P-Asserted-Identity: <tel:+12125550100;%56ERSTAT=TN-Validation-Passed>\r\n")
    data = invite(extra=forged).replace(
        b"From: <sip:+12125550100@198.51.100.7>;tag=ftag1",
        b"From: <sip:+12125550100@198.51.100.7;user=phone>;tag=ftag1;\r\n verstat=TN-Validation-Passed")
    [fwd] = [m for m in to(h.send(data), CORE) if m.method == "INVITE"]
    for name in ("from", "p-asserted-identity"):
        for value in fwd.values(name):
            assert "validation" not in value.lower(), value


def test_verstat_behind_an_escaped_semicolon_in_a_user_part_is_removed() -> None:
    """<sip:+1212…%3Bverstat%3DTN-Validation-Passed@…>: the number reader un-escapes the user
    part, so such a verstat goes too, from outside and when a rule rewrites the PAI."""
    h = PolicyHarness()
    forged = ("P-Asserted-Identity: <sip:+12125550100%3Bverstat%3DTN-Validation-Passed"
              "@198.51.100.7;user=phone>\r\n")
    [fwd] = [m for m in to(h.send(invite(extra=forged)), CORE) if m.method == "INVITE"]
    assert "validation" not in (fwd.get("p-asserted-identity") or "").lower()
    msg = parse_message(invite(extra=forged))
    line = callerid.pai_with_verstat(msg, "No-TN-Validation", "+12125550100", True)
    assert "Passed" not in line and "verstat=No-TN-Validation" in line


FORGED_URIS = [
    # a URI parameter after the host (where many receivers read it), a URI header, both
    "<sip:+12125550100@198.51.100.7;user=phone;verstat=TN-Validation-Passed>",
    "<sip:+12125550100@198.51.100.7;verstat=TN-Validation-Passed;user=phone>",
    "<sip:+12125550100@198.51.100.7;user=phone?verstat=TN-Validation-Passed>",
    "<sip:+12125550100@198.51.100.7;user=phone?x=1&Verstat=TN-Validation-Passed&y=2>",
    "<sip:+12125550100@198.51.100.7;user=phone?verstat=TN-Validation-Passed&x=1>",
    # two in a row: one pass of the pattern took the first only
    "<sip:+12125550100@198.51.100.7;user=phone?verstat=x&verstat=TN-Validation-Passed>",
    "<sip:+12125550100@198.51.100.7;user=phone?VERSTAT=a&Verstat=TN-Validation-Passed&x=1>",
]


def test_verstat_as_a_uri_parameter_or_uri_header_is_removed() -> None:
    """A forged verstat after the host or in the URI's headers never reaches the core: not
    through the plain proxy, not when a rule rewrites the P-Asserted-Identity with its own
    verstat (the rewrite cleaned the user part only, and the peer's value reached the core
    beside sipguard's)."""
    for i, uri in enumerate(FORGED_URIS):
        h = PolicyHarness()
        data = invite(branch=f"z9hG4bK-v{i}", call_id=f"v{i}",
                      extra=f"P-Asserted-Identity: {uri}\r\n")
        [fwd] = [m for m in to(h.send(data), CORE) if m.method == "INVITE"]
        pai = fwd.get("p-asserted-identity") or ""
        assert "validation" not in pai.lower() and "@198.51.100.7" in pai, pai
        msg = parse_message(data)
        line = callerid.pai_with_verstat(msg, "No-TN-Validation", "+12125550100", True)
        assert line is not None and "Passed" not in line, line
        assert line.count("verstat") == 1 and "@198.51.100.7" in line, line
        assert "?x=1" in line if "x=1" in uri else "?" not in line, line
        assert "&y=2" in line if "y=2" in uri else True, line


def test_verstat_in_a_user_part_is_removed_and_the_host_kept() -> None:
    """The 3GPP form <sip:+1…;verstat=…@host;user=phone> from outside: the verstat goes, the
    host stays (the value's pattern ran on through the "@" and took the host with it)."""
    h = PolicyHarness()
    data = invite().replace(
        b"From: <sip:+12125550100@198.51.100.7>",
        b"From: <sip:+12125550100;verstat=TN-Validation-Passed@198.51.100.7;user=phone>")
    data = data.replace(b"\r\n\r\n", b"\r\nP-Asserted-Identity: <sip:+12125550100;"
                        b"verstat=TN-Validation-Passed@carrier.example;user=phone>\r\n\r\n", 1)
    [fwd] = [m for m in to(h.send(data), CORE) if m.method == "INVITE"]
    assert fwd.get("from").startswith("<sip:+12125550100@198.51.100.7;user=phone>;tag="), \
        fwd.get("from")
    assert fwd.get("p-asserted-identity") == "<sip:+12125550100@carrier.example;user=phone>"


def test_a_rules_own_verstat_replaces_an_escaped_one() -> None:
    """Rule callerid puts its verstat on the PAI; a %-escaped one the peer sent goes."""
    msg = parse_message(invite(extra="P-Asserted-Identity: <tel:+12125550100;ver%73tat=TN-Validation-Passed>\r\n"))
    line = callerid.pai_with_verstat(msg, "No-TN-Validation", "+12125550100", True)
    assert line == "P-Asserted-Identity: <tel:+12125550100;verstat=No-TN-Validation>"


def test_long_p_asserted_identities_are_not_memoised() -> None:
    callerid._PAI_LINES.clear()
    long = '"' + "a" * 2000 + '" <tel:+12125550100>'
    msg = parse_message(invite(extra=f"P-Asserted-Identity: {long}\r\n"))
    assert callerid.pai_with_verstat(msg, "No-TN-Validation", "+12125550100", True)
    assert not callerid._PAI_LINES
    msg = parse_message(invite(extra="P-Asserted-Identity: <tel:+12125550100>\r\n"))
    callerid.pai_with_verstat(msg, "No-TN-Validation", "+12125550100", True)
    assert len(callerid._PAI_LINES) == 1


def test_every_rules_verdict_header_is_stripped_from_outside_even_where_the_rule_is_off() -> None:
    """A custom verdict header of rule national_cli or dialer is sipguard's, also on traffic
    from a peer for which that rule is never built."""
    cfg = parse_config(MINIMAL + "rules:\n  national_cli: {home_countries: ['31'], "
                       "verdict_header: X-NatCli}\n  dialer: {verdict_header: X-Dialer}\n")
    assert {"x-natcli", "x-dialer"} <= owned_headers(cfg)
    h = PolicyHarness(strip_headers=owned_headers(cfg))
    _, fwd = h.call(1, extra="X-NatCli: national_cli.anonymised;mobile\r\nX-Dialer: ok\r\n")
    assert fwd is not None and not fwd.has("x-natcli") and not fwd.has("x-dialer")


def test_identity_headers_no_rule_checks_are_removed_unless_the_config_passes_them() -> None:
    """Remote-Party-ID and P-Preferred-Identity name a caller no rule looked at (a DNO number
    behind an anonymous From reached the core): removed from outside by default
    (sip.unchecked_identity: strip), passed on with pass."""
    extra = ("Remote-Party-ID: <sip:+19005550199@x>;party=calling\r\n"
             "P-Preferred-Identity: <sip:+19005550199@x>\r\n")
    for setting, kept in (("", False), ("sip: {unchecked_identity: strip}\n", False),
                          ("sip: {unchecked_identity: pass}\n", True)):
        cfg = parse_config(MINIMAL + setting)
        h = PolicyHarness(strip_headers=owned_headers(cfg))
        _, fwd = h.call(1, extra=extra)
        assert fwd is not None
        assert fwd.has("remote-party-id") is kept and fwd.has("p-preferred-identity") is kept


def test_a_malformed_identity_on_a_request_screened_for_suspensions_is_a_400() -> None:
    """With a suspended list, an OPTIONS / MESSAGE is screened for a suspended caller before it
    gets a transaction; a P-Asserted-Identity there that does not parse is a stateless 400 —
    it was a 500 and an internal error (a bug report) per message."""
    h = PolicyHarness(extra_yaml='suspended: ["+19005550000"]\n')
    for n, value in enumerate(("<sip:+13125550000@x.example", "<\x1csip:+13125550000@x>")):
        data = (f"OPTIONS sip:192.0.2.1 SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-bad{n}\r\nMax-Forwards: 70\r\n"
                f"From: <sip:+12125550100@198.51.100.7>;tag=a\r\nTo: <sip:192.0.2.1>\r\n"
                f"Call-ID: bad-{n}\r\nCSeq: 1 OPTIONS\r\nP-Asserted-Identity: {value}\r\n"
                f"Content-Length: 0\r\n\r\n").encode()
        out = h.send(data)
        assert to(out, CORE) == [] and statuses(out) == [400]
    assert not [e for e in h.events if type(e).__name__ == "Failed"]


def test_a_verstat_inside_quotes_never_takes_the_closing_quote_along() -> None:
    """A ';verstat=' spelled inside a quoted display name loses its text up to the closing
    quote, never the quote: the header reaches the core with the structure sipguard checked
    (before, '"a;verstat=" <sip:A>;p=" <sip:B>"' reached it as '"a <sip:A>;p=" <sip:B>"', whose
    only URI outside quotes is B, a number nobody checked). A verstat outside quotes whose
    value is a quoted string goes whole."""
    h = PolicyHarness()
    cases = {
        b'From: "a;verstat=" <sip:+12125550100@198.51.100.7>;p=" <sip:+19005550199@evil>";'
        b'tag=ftag1': '"a" <sip:+12125550100@198.51.100.7>;p=" <sip:+19005550199@evil>";tag=ftag1',
        b'From: "x;verstat=TN-Validation-Passed" <sip:+12125550100@198.51.100.7>;tag=ftag1':
            '"x" <sip:+12125550100@198.51.100.7>;tag=ftag1',
        b'From: <sip:+12125550100@198.51.100.7>;verstat="TN-Validation-Passed";tag=ftag1':
            "<sip:+12125550100@198.51.100.7>;tag=ftag1",
        b'From: "q\\"x;verstat=y" <sip:+12125550100@198.51.100.7>;tag=ftag1':
            '"q\\"x" <sip:+12125550100@198.51.100.7>;tag=ftag1',
    }
    for i, (line, expected) in enumerate(cases.items()):
        data = invite(branch=f"z9hG4bK-q{i}", call_id=f"q{i}").replace(
            b"From: <sip:+12125550100@198.51.100.7>;tag=ftag1", line)
        [fwd] = [m for m in to(h.send(data), CORE) if m.method == "INVITE"]
        assert fwd.get("from") == expected, line
        assert fwd.from_.uri.number == "+12125550100"


def test_a_rewritten_pai_leaves_out_a_display_name_that_spells_verstat() -> None:
    """Rule callerid rewrites P-Asserted-Identity with its own verstat: a display name
    '"x;verstat=TN-Validation-Passed"' is left out (a receiver searching the text for
    'verstat=' would read it before sipguard's); an ordinary display name stays."""
    msg = parse_message(invite(extra='P-Asserted-Identity: "x;verstat=TN-Validation-Passed" '
                                     "<tel:+12125550100>\r\n"))
    line = callerid.pai_with_verstat(msg, "No-TN-Validation", "+12125550100", True)
    assert line == "P-Asserted-Identity: <tel:+12125550100;verstat=No-TN-Validation>"
    msg = parse_message(invite(extra='P-Asserted-Identity: "Alice" <tel:+12125550100>\r\n'))
    line = callerid.pai_with_verstat(msg, "No-TN-Validation", "+12125550100", True)
    assert line == 'P-Asserted-Identity: "Alice" <tel:+12125550100;verstat=No-TN-Validation>'


def test_headers_embedded_in_an_answers_contact_never_reach_the_core() -> None:
    """The core places a call; the party outside redirects it (302) to a Contact whose URI
    embeds a P-Asserted-Identity, a From and a Subject whose value decodes to a header line:
    the core, which may recurse on it with those copied into its new INVITE, gets the 302 with
    only the harmless Subject left; so does the caller's own INVITE's Contact (the remote
    target a core may build a callback from)."""
    h = Harness()
    party = ("198.51.100.7", 5062)
    out = h.send(invite(via_host="10.0.0.10:5080", call_id="out-1", caller="+18005550199",
                        callee="+12125550100", uri="sip:+12125550100@198.51.100.7:5062"),
                 src=CORE)
    [fwd] = to(out, party)
    moved = answer(fwd, 302, "Moved Temporarily", extra=(
        "Contact: <sip:+19005550199@203.0.113.9?P-Asserted-Identity=%3Csip:%2B18005550100"
        "@x%3E&f=sip:a@b&Subject=hi&Subject=x%0D%0AIdentity:%20y>;q=0.5\r\n"))
    [back] = to(h.send(moved, src=party), CORE)
    assert back.status == 302
    assert back.values("contact") == ["<sip:core@10.0.0.10:5080>",
                                      "<sip:+19005550199@203.0.113.9?Subject=hi>;q=0.5"]
    assert [e.detail for e in h.events if isinstance(e, Noticed)
            and e.kind == "uri_headers_removed"] == ["3 from contact out-1"]
    h2 = Harness()
    contact = "Contact: <sip:+12125550100@198.51.100.7:5062?Subject=a&From=b>"
    [fwd2] = to(h2.send(invite(call_id="in-1").replace(
        b"Contact: <sip:+12125550100@198.51.100.7:5062>", contact.encode())), CORE)
    assert b"Contact: <sip:+12125550100@198.51.100.7:5062?Subject=a>\r\n" in fwd2.serialize()


def test_an_outside_answer_cannot_rewrite_the_cores_route_set() -> None:
    """The core places a call (its INVITE carries its own Record-Route); the party outside
    answers with a Record-Route list of its own making — an entry below sipguard's (on the
    core's side), sipguard's left out, none at all. The core, whose route set is that list
    reversed, always gets the entries its INVITE left with at the bottom (sipguard's, then
    its own): its ACK and BYE go through sipguard, never first to a host the party chose. An
    answer as it should be passes untouched; each rewrite is counted."""
    core_rr = "<sip:front@10.0.0.10:5080;lr>"
    ours = "<sip:192.0.2.1:5060;lr>"
    far = "<sip:proxy.carrier.example;lr>"
    for i, (answered, expected) in enumerate((
        (f"{far}, {ours}, {core_rr}", f"{far}, {ours}, {core_rr}"),
        (f"{far}, {ours}, <sip:10.0.0.5:5060;lr>, {core_rr}", f"{far}, {ours}, {core_rr}"),
        (f"{far}, <sip:10.0.0.5:5060;lr>", f"{far}, <sip:10.0.0.5:5060;lr>, {ours}, {core_rr}"),
        (None, f"{ours}, {core_rr}"),
    )):
        h = Harness()
        party = ("198.51.100.7", 5062)
        out = h.send(invite(via_host="10.0.0.10:5080", call_id=f"rr-{i}",
                            caller="+18005550199", callee="+12125550100",
                            uri="sip:+12125550100@198.51.100.7:5062",
                            extra=f"Record-Route: {core_rr}\r\n"), src=CORE)
        [fwd] = to(out, party)
        assert fwd.values("record-route") == [ours, core_rr]
        vias = "".join(f"Via: {v}\r\n" for v in fwd.values("via"))
        rr = f"Record-Route: {answered}\r\n" if answered is not None else ""
        for status in (183, 200):
            reply = (f"SIP/2.0 {status} X\r\n{vias}{rr}From: {fwd.get('from')}\r\n"
                     f"To: {fwd.get('to')};tag=far1\r\nCall-ID: rr-{i}\r\nCSeq: 1 INVITE\r\n"
                     f"Contact: <sip:+12125550100@198.51.100.7:5062>\r\n"
                     f"Content-Length: 0\r\n\r\n").encode()
            [back] = to(h.send(reply, src=party), CORE)
            assert ", ".join(back.values("record-route")) == expected, (i, status)
        repaired = [e for e in h.events if isinstance(e, Noticed)
                    and e.kind == "record_route_repaired"]
        assert len(repaired) == (0 if i == 0 else 2), i
        assert not [e for e in h.events if isinstance(e, Noticed)
                    and e.kind == "core_without_record_route"]


def test_a_rules_rewritten_p_asserted_identity_keeps_no_embedded_header() -> None:
    """Rule callerid puts verstat on the INVITE's P-Asserted-Identity, rebuilt from the URI the
    caller wrote: the headers embedded there (sipguard's own verdict, a From) stay off it."""
    h = PolicyHarness("rules:\n  callerid: {verstat: true}\n")
    pai = ("P-Asserted-Identity: <sip:+12125550100@198.51.100.7?X-Sipguard-Verdict=callerid."
           "passed&From=%3Csip:%2B19005550199@x%3E&Subject=hi>\r\n")
    [got] = to(h.send(invite(extra=pai)), CORE)
    [value] = got.values("p-asserted-identity")
    assert "verstat=" in value and "Sipguard" not in value and "19005550199" not in value, value
    assert value.endswith("?Subject=hi>"), value
