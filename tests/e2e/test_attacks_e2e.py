"""Attacks on the policy, end to end: a real sipguard on 127.0.0.1, a scripted core that
answers INVITE and BYE with 200, and third-party listeners on other loopback addresses. Each
test asserts what the core and the third party received: nothing the policy did not allow.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest

from .harness import HOST, E2EStack
from .scripted import THIRD, Caller, Core, Listener, header

pytestmark = pytest.mark.e2e

STRANGER = "127.0.0.2"  # an address no peer owns


@pytest.fixture
def core() -> Iterator[Core]:
    c = Core()
    yield c
    c.close()


@pytest.fixture
def third() -> Iterator[Listener]:
    t = Listener()
    yield t
    t.close()


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


def _call_up(caller: Caller, call_id: str) -> tuple[str, str]:
    """INVITE answered 200 by the core, ACKed: (the core's To tag, the Route to use)."""
    caller.send(caller.request("INVITE", call_id))
    [ok] = caller.finals()
    assert _status(ok) == 200, ok
    to_tag = re.search(r"tag=([^;>\s]+)", header(ok, "To")).group(1)  # type: ignore[union-attr]
    route = f"Route: {header(ok, 'Record-Route')}\r\n"
    caller.send(caller.request("ACK", call_id, to_tag=to_tag, extra=route))
    return to_tag, route


def test_a_forged_bye_from_another_port_reaches_nobody_and_frees_no_slot(
    stack: E2EStack, core: Core, third: Listener
) -> None:
    """per_caller 1, a call up: a BYE with its Call-ID and tags from another source port,
    aimed at a third party, reaches neither the third party nor the core, and the caller's
    next call is still refused while the first is up."""
    _, port = stack.sipguard(core_port=core.port, listen=("udp", "tcp"),
                             config_extra="rules:\n  concurrency: {per_caller: 1}\n")
    caller = Caller(port)
    attacker = Caller(port)
    try:
        to_tag, route = _call_up(caller, "victim-1")
        bye = attacker.request("BYE", "victim-1", cseq=2, to_tag=to_tag, extra=route,
                               ruri=f"sip:x@{THIRD}:{third.port}")
        attacker.send(bye)
        [refused] = attacker.finals()
        assert _status(refused) == 403
        assert third.heard(1.0) == []
        assert "BYE" not in core.methods("victim-1")
        caller.send(caller.request("INVITE", "victim-2"))
        [second] = caller.finals()
        assert _status(second) == 403
    finally:
        caller.close()
        attacker.close()


def test_in_dialog_requests_never_relay_to_a_third_party(
    stack: E2EStack, core: Core, third: Listener
) -> None:
    """The caller's INFO with a Route to a third party over TCP, and its BYE naming a third
    party: both go to the core, the third party gets no packet and no connection."""
    _, port = stack.sipguard(core_port=core.port, listen=("udp", "tcp"))
    caller = Caller(port)
    try:
        to_tag, route = _call_up(caller, "relay-1")
        info = caller.request(
            "INFO", "relay-1", cseq=2, to_tag=to_tag,
            extra=route + f"Route: <sip:{THIRD}:{third.port};transport=tcp;lr>\r\n",
        )
        caller.send(info)
        bye = caller.request("BYE", "relay-1", cseq=3, to_tag=to_tag, extra=route,
                             ruri=f"sip:x@{THIRD}:{third.port}")
        caller.send(bye)
        assert third.heard(1.5) == []
        methods = core.methods("relay-1")
        assert "INFO" in methods and "BYE" in methods
    finally:
        caller.close()


def test_out_of_dialog_requests_from_unknown_sources_never_reach_the_core(
    stack: E2EStack, core: Core
) -> None:
    """With peers configured, MESSAGE, SUBSCRIBE and INVITE from an address no peer owns get
    one 403 each and the core receives none of them."""
    _, port = stack.sipguard(
        core_port=core.port, listen=("udp",),
        config_extra=f"peers:\n  - name: lab\n    networks: [{HOST}/32]\n",
    )
    stranger = Caller(port, host=STRANGER)
    try:
        for method in ("MESSAGE", "SUBSCRIBE", "INVITE"):
            stranger.send(stranger.request(method, f"u-{method}"))
            [resp] = stranger.finals()
            assert _status(resp) == 403, method
        time.sleep(0.3)
        assert core.received == []
    finally:
        stranger.close()


def test_forged_verdicts_are_stripped_whatever_rules_are_on(
    stack: E2EStack, core: Core
) -> None:
    """With no rule on, sipguard's own headers, verstat and the identity headers no rule
    checks (Remote-Party-ID, P-Preferred-Identity) sent by a peer never reach the core, on
    the initial INVITE and on a re-INVITE."""
    _, port = stack.sipguard(core_port=core.port, listen=("udp",))
    caller = Caller(port)
    forged = ("X-Sipguard-Identity: TN-Validation-Passed;attest=A\r\n"
              "X-Sipguard-Verdict: passed\r\n"
              f"P-Asserted-Identity: <sip:+12125550100;verstat=TN-Validation-Passed@{HOST}>\r\n"
              "Remote-Party-ID: <sip:+19005550199@x>;party=calling\r\n"
              "P-Preferred-Identity: <sip:+19005550199@x>\r\n")
    try:
        caller.send(caller.request("INVITE", "forge-1", extra=forged))
        [ok] = caller.finals()
        to_tag = re.search(r"tag=([^;>\s]+)", header(ok, "To")).group(1)  # type: ignore[union-attr]
        route = f"Route: {header(ok, 'Record-Route')}\r\n"
        caller.send(caller.request("INVITE", "forge-1", cseq=2, to_tag=to_tag,
                                   extra=route + forged))
        caller.finals()
        invites = [d for d in core.received if d.startswith(b"INVITE")]
        assert len(invites) >= 2
        for data in invites:
            low = data.lower()
            assert b"x-sipguard-identity" not in low and b"x-sipguard-verdict" not in low
            assert b"verstat" not in low
            assert b"remote-party-id" not in low and b"p-preferred-identity" not in low
    finally:
        caller.close()


def test_headers_embedded_in_a_refer_to_cannot_assert_an_identity_for_the_core(
    stack: E2EStack, core: Core
) -> None:
    """Over real sockets: the caller's in-dialog REFER whose Refer-To and Referred-By URIs
    embed P-Asserted-Identity, From (percent-encoded name, compact form), sipguard's verdict
    header and a Subject whose value decodes to a second header line reaches the core with
    those taken out and its Replaces kept byte for byte."""
    _, port = stack.sipguard(core_port=core.port, listen=("udp",))
    caller = Caller(port)
    replaces = "Replaces=abc%40h%3Bto-tag%3D1%3Bfrom-tag%3D2"
    refer_to = (f"Refer-To: <sip:+18005550111@{HOST}?{replaces}"
                "&P-Asserted-Identity=%3Csip:%2B19005550199@x%3E&P%2DAsserted-Identity=x"
                "&f=sip:%2B19005550199@x&X-Sipguard-Verdict=passed"
                "&Subject=hi%0D%0AIdentity:%20forged>\r\n"
                f"Referred-By: <sip:+12125550100@{HOST}?From=sip:%2B19005550199@x>\r\n")
    try:
        to_tag, route = _call_up(caller, "refer-1")
        caller.send(caller.request("REFER", "refer-1", cseq=2, to_tag=to_tag,
                                   extra=route + refer_to))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not any(
                d.startswith(b"REFER") for d in core.received):
            time.sleep(0.05)
        [got] = [d for d in core.received if d.startswith(b"REFER")]
        assert f"Refer-To: <sip:+18005550111@{HOST}?{replaces}>\r\n".encode() in got
        assert f"Referred-By: <sip:+12125550100@{HOST}>\r\n".encode() in got
        low = got.lower()
        for gone in (b"asserted", b"%2dasserted", b"19005550199", b"x-sipguard", b"forged"):
            assert gone not in low, gone
    finally:
        caller.close()


def test_a_callers_later_from_shows_the_checked_number_and_keeps_its_quotes(
    stack: E2EStack, core: Core
) -> None:
    """Over real sockets: a call's re-INVITE whose From shows another country's number ending
    with the caller's digits hears 403 and the core gets no second INVITE; an INVITE whose
    display name spells ';verstat=' before a quoted parameter naming another number reaches
    the core with its quotes whole (the URI outside quotes still the checked one)."""
    _, port = stack.sipguard(core_port=core.port, listen=("udp",))
    caller = Caller(port)
    ours = f"From: <sip:+12125550100@{HOST}>".encode()
    try:
        caller.send(caller.request("INVITE", "from-1"))
        [ok] = caller.finals()
        to_tag = re.search(r"tag=([^;>\s]+)", header(ok, "To")).group(1)  # type: ignore[union-attr]
        route = f"Route: {header(ok, 'Record-Route')}\r\n"
        other = caller.request("INVITE", "from-1", cseq=2, to_tag=to_tag, extra=route).replace(
            ours, f"From: <sip:+4412125550100@{HOST}>".encode())
        caller.send(other)
        [refused] = caller.finals()
        assert refused.startswith(b"SIP/2.0 403 ")
        quoted = caller.request("INVITE", "from-2").replace(
            ours, f'From: "a;verstat=" <sip:+12125550100@{HOST}>;p=" <sip:+19005550199@x>"'
                  .encode())
        caller.send(quoted)
        [answered] = caller.finals(call_id="from-2")
        assert answered.startswith(b"SIP/2.0 200 ")
        time.sleep(0.2)
        assert len([d for d in core.received if d.startswith(b"INVITE") and b"from-1" in d]) == 1
        [got] = [d for d in core.received if d.startswith(b"INVITE") and b"from-2" in d]
        assert f'From: "a" <sip:+12125550100@{HOST}>;p=" <sip:+19005550199@x>";tag=c1'.encode() \
            in got
    finally:
        caller.close()


def test_an_unknown_source_is_not_a_reflector(stack: E2EStack, core: Core) -> None:
    """An INVITE from an unknown address whose Via names a victim port: the victim gets one
    403 no larger than the INVITE plus a little, no 100 Trying and no retransmission; with
    unknown_source: drop, nothing."""
    for mode, expected in (("reject", 1), ("drop", 0)):
        _, port = stack.sipguard(
            core_port=core.port, listen=("udp",),
            config_extra=(f"peers:\n  - name: lab\n    networks: [{HOST}/32]\n"
                          f"unknown_source: {mode}\n"),
        )
        victim = Listener(STRANGER)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind((STRANGER, 0))
        try:
            invite = Caller(port, host=STRANGER).request(
                "INVITE", f"refl-{mode}", port=victim.port).replace(b";rport", b"")
            sender.sendto(invite, (HOST, port))
            heard = victim.heard(3.0)  # Timer G would have resent a 403 at 0.5, 1.5 s
            assert len(heard) == expected, (mode, heard)
            if heard:
                assert heard[0].startswith(b"SIP/2.0 403 ")
                assert len(heard[0]) <= len(invite) + 100
        finally:
            sender.close()
            victim.close()
        assert core.received == []


def test_an_answer_is_taken_only_from_where_its_request_went_with_our_via(
    stack: E2EStack, core: Core
) -> None:
    """A call rings at the core. A 200 for it with sipguard's branch — the core's own answer
    as sipguard would get it — sent from another address, and one from the core with the
    branch under another sent-by (RFC 3261 §18.1.2), both carrying an attacker's Contact:
    the caller hears neither; the core's real 200 then reaches it."""
    _, port = stack.sipguard(core_port=core.port, listen=("udp",))
    caller = Caller(port)
    injector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    injector.bind((STRANGER, 0))
    core.ring = frozenset({"inj-1"})
    try:
        caller.send(caller.request("INVITE", "inj-1"))
        deadline = time.monotonic() + 3.0
        while "INVITE" not in core.methods("inj-1") and time.monotonic() < deadline:
            time.sleep(0.02)
        [invite] = [d for d in core.received if d.startswith(b"INVITE") and b"inj-1" in d]
        assert core.invite_from is not None
        real = core.response(invite, 200, "OK")
        evil = real.replace(f"<sip:core@{HOST}:{core.port}>".encode(),
                            f"<sip:evil@{STRANGER}:5099>".encode())
        assert evil != real
        injector.sendto(evil, core.invite_from)
        ours = header(invite, "Via").split(";", 1)[0]  # "SIP/2.0/UDP 127.0.0.1:port"
        core.sock.sendto(evil.replace(ours.encode(), b"SIP/2.0/UDP 127.0.0.2:5099"),
                         core.invite_from)
        assert caller.finals(1.0) == []
        core.sock.sendto(real, core.invite_from)
        [ok] = caller.finals()
        assert _status(ok) == 200 and b"evil@" not in ok
    finally:
        injector.close()
        caller.close()
