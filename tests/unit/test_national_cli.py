"""Rule national_cli: national caller numbers over international interconnects, roaming, anonymise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from sipguard.contract import CallInfo, Flow, Verdict
from sipguard.policy.engine import Policy
from sipguard.policy.state import RuleState
from sipguard.sip.parser import parse_message
from sipguard.transport.http_get import JsonGetter
from tests.unit.proxy_helpers import CORE, Harness, invite
from tests.unit.rule_calls import SOURCE, decide, make_call, policy

DUTCH_FIXED = "+31201234567"
DUTCH_MOBILE = "+31612345678"


def peers(interconnect: str = "international") -> str:
    return (
        "peers:\n"
        "  - name: carrier-x\n"
        "    networks: [198.51.100.0/24]\n"
        f"    interconnect: {interconnect}\n"
    )


def rules(extra: str = "", mobile: str = "anonymise") -> str:
    return (
        "rules:\n"
        "  national_cli:\n"
        "    home_countries: ['31']\n"
        "    fixed: block\n"
        f"    mobile: {mobile}\n"
        f"{extra}"
    )


def test_international_peer_with_dutch_fixed_number_hears_603_network_blocked() -> None:
    """A Dutch fixed number over an international interconnect is blocked with 603+."""
    call = make_call(DUTCH_FIXED)
    v = decide(policy(rules(), extra=peers()), call, 0.0)
    assert (v.action, v.status, v.phrase, v.rule) == ("reject", 603, "Network Blocked",
                                                        "national_cli")
    assert v.reason == "national_cli_fixed"
    assert any(h.startswith("Reason: SIP;cause=603;text=\"v=analytics1") for h in v.headers)
    assert call.labels["national_cli"] == "blocked"


def test_dutch_mobile_number_follows_its_own_action() -> None:
    """A Dutch mobile number gets the mobile action: anonymise here, allow when so configured."""
    call = make_call(DUTCH_MOBILE)
    v = decide(policy(rules(), extra=peers()), call, 0.0)
    assert v.accepted and v.anonymise is not None and not v.anonymise.keep_pai
    assert "X-Sipguard-Verdict: national_cli.anonymised;mobile" in v.forward_headers
    v = decide(policy(rules(mobile="allow"), extra=peers()), make_call(DUTCH_MOBILE), 0.0)
    assert v.accepted and v.anonymise is None


def test_domestic_peer_and_foreign_numbers_pass() -> None:
    """A domestic peer passes Dutch numbers; an international peer passes non-home numbers."""
    p = policy(rules(), extra=peers("domestic"))
    assert decide(p, make_call(DUTCH_FIXED), 0.0).accepted
    p = policy(rules(), extra=peers())
    assert decide(p, make_call("+4930123456"), 0.0).accepted
    assert decide(p, make_call(None), 0.0).accepted


def test_a_home_number_shown_in_from_behind_a_foreign_pai_is_caught() -> None:
    """From shows a Dutch fixed number, P-Asserted-Identity a British one: the caller is the
    British number, but the national number presented from abroad is blocked all the same."""
    msg = parse_message(invite(caller=DUTCH_FIXED,
                               extra="P-Asserted-Identity: <tel:+442071838750>\r\n"))
    call = CallInfo(msg, Flow("udp", SOURCE, 0), 0.0)
    v = decide(policy(rules(), extra=peers()), call, 0.0)
    assert call.caller == "+442071838750"
    assert (v.action, v.reason) == ("reject", "national_cli_fixed")


@pytest.mark.parametrize("shown", ["sip:0031201234567@h.example",
                                   "sip:+31(0)201234567@h.example;user=phone",
                                   "sip:+31-0-20-1234567@h.example;user=phone"])
def test_a_home_number_shown_in_from_in_another_spelling_is_caught(shown: str) -> None:
    """From shows the Dutch fixed number as 0031… (no region to read 00 by) or with its
    trunk 0 left after the country code (+31(0)20…, which phonenumbers reads as the Dutch
    number): blocked as the plain +3120… is — it passed as a foreign or unknown number."""
    msg = parse_message(invite(caller=DUTCH_FIXED, extra="P-Asserted-Identity: <tel:+442071838750>\r\n")
                        .replace(f"<sip:{DUTCH_FIXED}@198.51.100.7>".encode(), f"<{shown}>".encode()))
    call = CallInfo(msg, Flow("udp", SOURCE, 0), 0.0)
    v = decide(policy(rules(), extra=peers()), call, 0.0)
    assert (v.action, v.reason) == ("reject", "national_cli_fixed")


def test_fixed_or_mobile_takes_the_stricter_action() -> None:
    """A number whose plan does not tell fixed from mobile (NANP) gets the stricter action."""
    rule = rules().replace("['31']", "['1']").replace("fixed: block", "fixed: allow")
    v = decide(policy(rule, extra=peers()), make_call("+12125550100"), 0.0)
    assert v.accepted and v.anonymise is not None


def test_roaming_allow_list_passes() -> None:
    """A number or prefix on roaming_allow passes, labelled roaming."""
    p = policy(rules("    roaming_allow: ['+3120123*']\n"), extra=peers())
    call = make_call(DUTCH_FIXED)
    assert decide(p, call, 0.0).accepted
    assert call.labels["national_cli"] == "roaming"


def test_monitor_mode_reports_but_forwards() -> None:
    """In monitor mode a block is forwarded as monitored and an anonymisation is only reported."""
    p = policy(rules("    mode: monitor\n"), extra=peers())
    v = decide(p, make_call(DUTCH_FIXED), 0.0)
    assert v.accepted and v.monitored and v.rule == "national_cli"
    v = decide(p, make_call(DUTCH_MOBILE), 0.0)
    assert v.accepted and v.anonymise is None
    assert "X-Sipguard-Verdict: national_cli.anonymised;mobile;monitored" in v.forward_headers


def test_config_rejects_bad_home_countries() -> None:
    """A home country that is not digits is a config error (a YAML boolean or float too);
    written unquoted, as the docs show it (`[31, 44]`), it is the country code."""
    for bad in ("['NL']", "[true]", "[31.5]"):
        with pytest.raises(Exception, match="home_countries"):
            policy(rules().replace("['31']", bad), extra=peers())
    p = policy(rules().replace("['31']", "[31, 44]"), extra=peers())
    v = decide(p, make_call(DUTCH_MOBILE), 0.0)
    assert v.accepted and v.anonymise is not None


# ------------------------------------------------------------------ roaming lookup, real HTTP


class Lookup:
    """An aiohttp server on 127.0.0.1 answering the roaming query."""

    def __init__(self) -> None:
        self.roaming = True
        self.delay = 0.0
        self.asked: list[str] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.asked.append(request.query.get("number", ""))
        await asyncio.sleep(self.delay)
        return web.json_response({"roaming": self.roaming})


@pytest.fixture
async def lookup() -> AsyncIterator[Lookup]:
    server = Lookup()
    app = web.Application()
    app.router.add_get("/roaming", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/roaming"
    yield server
    await runner.cleanup()


@pytest.fixture
async def getter() -> AsyncIterator[JsonGetter]:
    g = JsonGetter()
    yield g
    await g.close()


def lookup_policy(url: str, state: RuleState, timeout_ms: int = 300) -> Policy:
    return policy(rules(
        "    roaming_lookup:\n"
        f"      url: {url}\n"
        f"      timeout_ms: {timeout_ms}\n"
        "      on_error: anonymise\n"
        "      cache_s: 60\n"
    ), state, extra=peers())


async def decide_async(p: Policy, call: CallInfo, now: float) -> Verdict:
    answer = p.decide(call, now)
    if isinstance(answer, Verdict):
        return answer
    return await answer


async def test_lookup_answering_roaming_lets_the_call_through_and_is_cached(
    lookup: Lookup, getter: JsonGetter
) -> None:
    """A lookup answering roaming passes the call; the answer is cached for the next one."""
    state = RuleState(http=getter)
    p = lookup_policy(lookup.url, state)
    call = make_call(DUTCH_FIXED)
    pending = p.decide(call, 0.0)
    assert not isinstance(pending, Verdict)  # needs I/O
    v = await pending
    assert v.accepted and call.labels["national_cli"] == "roaming"
    assert lookup.asked[-1] == DUTCH_FIXED
    asked = len(lookup.asked)
    assert isinstance(p.decide(make_call(DUTCH_FIXED), 1.0), Verdict)  # cache hit, no I/O
    assert len(lookup.asked) == asked
    lookup.roaming = False
    v = await decide_async(p, make_call(DUTCH_FIXED), 100.0)  # cache expired: asked again
    assert v.status == 603


async def test_lookup_past_timeout_applies_on_error_within_the_timeout(
    lookup: Lookup, getter: JsonGetter
) -> None:
    """A lookup slower than timeout_ms applies on_error (anonymise) within the timeout."""
    lookup.delay = 2.0
    p = lookup_policy(lookup.url, RuleState(http=getter), timeout_ms=200)
    started = time.monotonic()
    v = await decide_async(p, make_call(DUTCH_FIXED), 0.0)
    elapsed = time.monotonic() - started
    assert v.accepted and v.anonymise is not None
    assert 0.15 < elapsed < 0.6


async def test_lookup_without_a_server_applies_on_error(getter: JsonGetter) -> None:
    """A lookup endpoint that refuses connections applies on_error."""
    p = lookup_policy("http://127.0.0.1:9/roaming", RuleState(http=getter))
    v = await decide_async(p, make_call(DUTCH_FIXED), 0.0)
    assert v.accepted and v.anonymise is not None


# ------------------------------------------------------------------ anonymise, through the proxy


def test_anonymised_invite_reaches_the_core_without_the_number() -> None:
    """The core gets the anonymous From with the tag kept, Privacy: id, no PAI, no Identity
    (its PASSporT's orig.tn), no number."""
    p = policy(rules("    keep_pai_to_core: false\n"), extra=peers())

    def decide_call(call: CallInfo, now: float) -> Verdict:
        return decide(p, call, now)

    h = Harness(decide_call)
    extra = (f"P-Asserted-Identity: <sip:{DUTCH_MOBILE}@198.51.100.7;user=phone>\r\n"
             f'Remote-Party-ID: "{DUTCH_MOBILE}" <sip:{DUTCH_MOBILE}@198.51.100.7>\r\n'
             # a PASSporT names the caller in clear base64 (orig.tn): it goes too
             "Identity: eyJhbGciOiJFUzI1NiJ9.eyJvcmlnIjp7InRuIjoiMzE2MTIzNDU2NzgifX0.c2ln;"
             "info=<https://cert.example.org/a.pem>;alg=ES256;ppt=shaken\r\n"
             "Privacy: none\r\n")
    out = h.send(invite(caller=DUTCH_MOBILE, extra=extra))
    (data,) = [raw for (flow, _), raw in zip(out, h.raw, strict=True) if flow.addr == CORE]
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert b'From: "Anonymous" <sip:anonymous@anonymous.invalid>;tag=ftag1' in head
    assert b"Privacy: id" in head and b"Privacy: none" not in head
    assert not [ln for ln in head if ln.lower().startswith(b"p-asserted-identity")]
    assert not [ln for ln in head if ln.lower().startswith(b"identity")]
    assert b"Contact: <sip:anonymous@198.51.100.7:5062>" in head
    assert b"X-Sipguard-Verdict: national_cli.anonymised;mobile" in head
    assert DUTCH_MOBILE.encode() not in data and DUTCH_MOBILE[1:].encode() not in data


def test_an_anonymised_contact_keeps_no_uri_headers_nor_parameters_naming_the_number() -> None:
    """The anonymous Contact keeps what routes (transport, ob, +sip.instance) and loses URI
    headers (``?P-Asserted-Identity=…``) and any parameter whose value holds the number."""
    p = policy(rules("    keep_pai_to_core: false\n"), extra=peers())

    def decide_call(call: CallInfo, now: float) -> Verdict:
        return decide(p, call, now)

    h = Harness(decide_call)
    contact = (f"Contact: <sip:{DUTCH_MOBILE}@198.51.100.7:5062;transport=udp;ob;"
               "line=0612-345-678?P-Asserted-Identity=%3Csip:%2B31612345678%40h%3E>"
               ';+sip.instance="<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>"'
               f";pub-gruu=\"sip:{DUTCH_MOBILE}@h;gr\";n{DUTCH_MOBILE[1:]}\r\n")
    msg = invite(caller=DUTCH_MOBILE).replace(
        f"Contact: <sip:{DUTCH_MOBILE}@198.51.100.7:5062>\r\n".encode(), contact.encode())
    out = h.send(msg)
    (data,) = [raw for (flow, _), raw in zip(out, h.raw, strict=True) if flow.addr == CORE]
    (line,) = [ln for ln in data.split(b"\r\n") if ln.startswith(b"Contact:")]
    assert line == (b"Contact: <sip:anonymous@198.51.100.7:5062;transport=udp;ob>"
                    b';+sip.instance="<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>"')
    assert DUTCH_MOBILE[3:].encode() not in data
    split = (f"Contact: <sip:{DUTCH_MOBILE}@198.51.100.7:5062;transport=udp;a=0612;b=3-4"
             ";c=5678>;q=0.5;x=abc\r\n")  # the number in pieces, none naming it alone
    out = h.send(invite(caller=DUTCH_MOBILE, call_id="call-2@caller", branch="z9hG4bK-c2").replace(
        f"Contact: <sip:{DUTCH_MOBILE}@198.51.100.7:5062>\r\n".encode(), split.encode()))
    (data,) = [raw for (flow, _), raw in zip(out, h.raw, strict=True)
               if flow.addr == CORE]
    (line,) = [ln for ln in data.split(b"\r\n") if ln.startswith(b"Contact:")]
    assert line == b"Contact: <sip:anonymous@198.51.100.7:5062;transport=udp>;x=abc", line


def test_the_callers_later_requests_are_anonymised_too() -> None:
    """ACK, re-INVITE and BYE of an anonymised call reach the core with the anonymous From
    (tag kept) and Privacy: id; the number is in none of them."""
    from tests.unit.dialog_helpers import in_dialog
    from tests.unit.proxy_helpers import answer

    p = policy(rules("    keep_pai_to_core: false\n"), extra=peers())

    def decide_call(call: CallInfo, now: float) -> Verdict:
        return decide(p, call, now)

    h = Harness(decide_call)
    out = h.send(invite(caller=DUTCH_MOBILE))
    fwd = [m for f, m in out if f.addr == CORE][0]
    h.send(answer(fwd, 200, "OK"), src=CORE)
    for method, cseq in (("ACK", 1), ("INVITE", 2), ("BYE", 3)):
        h.send(in_dialog(method, call_id="call-1@caller", cseq=cseq,
                         branch=f"z9hG4bK-{method}{cseq}", caller=DUTCH_MOBILE))
        sent = [raw for raw in h.raw if raw.startswith(method.encode())]  # to the core
        assert sent, method
        assert b'"Anonymous" <sip:anonymous@anonymous.invalid>;tag=ftag1' in sent[0], method
        assert b"Privacy: id" in sent[0] and DUTCH_MOBILE[1:].encode() not in sent[0], method


def test_anonymise_with_keep_pai_keeps_pai_and_beats_a_later_rule() -> None:
    """keep_pai_to_core keeps PAI; callerid after national_cli cannot put a number back in From."""
    p = policy(rules("    keep_pai_to_core: true\n") + "  callerid: {ownership: false}\n",
               extra=peers())

    def decide_call(call: CallInfo, now: float) -> Verdict:
        return decide(p, call, now)

    h = Harness(decide_call)
    out = h.send(invite(caller=DUTCH_MOBILE,
                        extra=f"P-Asserted-Identity: <tel:{DUTCH_MOBILE}>\r\n"))
    (data,) = [raw for (flow, _), raw in zip(out, h.raw, strict=True) if flow.addr == CORE]
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert b'From: "Anonymous" <sip:anonymous@anonymous.invalid>;tag=ftag1' in head
    assert [ln for ln in head if ln.startswith(b"P-Asserted-Identity: <tel:+31612345678")]
    assert b"Privacy: id" in head
