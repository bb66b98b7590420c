"""No way around the policy: in-dialog requests, every initial request, sipguard's own
headers, responses — through the in-memory edge core with a real Policy."""

from __future__ import annotations

import dataclasses

import pytest

from sipguard.contract import DialogEnded, Dropped, Flow, InviteDecided, Local, Noticed, Screened
from sipguard.proxy.routing import flow_is_core
from sipguard.sip.message import Message
from sipguard.sip.parser import parse_message
from tests.unit.dialog_helpers import PolicyHarness, in_dialog, to
from tests.unit.proxy_helpers import CALLER, CORE, answer, invite, settings

PEERS = "peers:\n  - name: carrier-a\n    networks: [198.51.100.0/24]\n"
STRANGER = ("203.0.113.5", 5060)
THIRD = ("203.0.113.99", 5060)
OTHER_PORT = (CALLER[0], CALLER[1] + 1)


def statuses(out: list[tuple[Flow, Message]]) -> list[int]:
    """The statuses of every response sipguard sent, wherever it went."""
    return [m.status for _, m in out if m.status is not None]


def up(h: PolicyHarness, n: int = 1) -> Message:
    """Call ``n`` from CALLER answered 200 and ACKed; the INVITE as the core got it."""
    _, fwd = h.call(n)
    assert fwd is not None
    h.answer(fwd, 200, "OK")
    h.send(in_dialog("ACK", call_id=f"call-{n}", cseq=1, branch=f"z9hG4bK-a{n}"))
    return fwd


def out_of_dialog(method: str, *, call_id: str = "ood-1", extra: str = "") -> bytes:
    return (
        f"{method} sip:+18005550199@192.0.2.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-{call_id}\r\nMax-Forwards: 70\r\n"
        f"From: <sip:+12125550100@203.0.113.5>;tag=o1\r\nTo: <sip:+18005550199@192.0.2.1>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 {method}\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode()


def test_bye_from_another_port_naming_a_third_party_is_refused() -> None:
    """A BYE with a live call's Call-ID and tags, from another source port and aimed at a third
    party: 403, nothing reaches the third party or the core, the call and its slot stay."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    up(h)
    bye = in_dialog("BYE", call_id="call-1", cseq=2, branch="z9hG4bK-evil")
    bye = bye.replace(b"BYE sip:core@10.0.0.10:5080", b"BYE sip:victim@203.0.113.99:5060")
    out = h.send(bye, src=OTHER_PORT)
    assert to(out, THIRD) == [] and to(out, CORE) == []
    assert statuses(out) == [403]  # to the Via's port (RFC 3261 §18.2.2)
    assert h.ended() == [] and h.count("caller", "+12125550100") == 1
    resp, fwd = h.call(2)
    assert fwd is None and [m.status for m in resp if m.status and m.status >= 200] == [403]


def test_a_request_too_big_for_udp_may_come_over_tcp_from_the_callers_host() -> None:
    """A caller that came in over UDP sends a big in-dialog request over TCP (RFC 3261
    §18.1.1: over 1,300 bytes, a congestion-controlled transport) from its own host: it goes
    to the core. Over TCP from another host, or over UDP from another port, it is refused."""
    h = PolicyHarness()
    up(h)
    reinvite = in_dialog("INVITE", call_id="call-1", cseq=2, branch="z9hG4bK-big",
                         extra="X-Pad: " + "p" * 1400 + "\r\n")
    out = h.send(reinvite.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP", 1),
                 src=(CALLER[0], 40123), transport="tcp", conn=7)
    assert [(f.addr, m.method) for f, m in out if m.method] == [(CORE, "INVITE")]
    stranger = in_dialog("INFO", call_id="call-1", cseq=3, branch="z9hG4bK-tcp3")
    out = h.send(stranger.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP", 1),
                 src=("198.51.100.8", 40124), transport="tcp", conn=8)
    assert to(out, CORE) == [] and statuses(out) == [403]
    out = h.send(in_dialog("INFO", call_id="call-1", cseq=4, branch="z9hG4bK-u4"),
                 src=OTHER_PORT)
    assert to(out, CORE) == [] and statuses(out) == [403]


def test_in_dialog_requests_from_the_caller_go_to_the_core_whatever_their_route() -> None:
    """The caller's INFO with a Route to a third party over TCP, and its BYE naming a third
    party, both go to the core and nowhere else."""
    h = PolicyHarness()
    up(h)
    info = in_dialog("INFO", call_id="call-1", cseq=2, branch="z9hG4bK-i",
                     extra="Route: <sip:203.0.113.99:5060;transport=tcp;lr>\r\n")
    out = h.send(info)
    assert [(f.addr, m.method) for f, m in out if m.method] == [(CORE, "INFO")]
    bye = in_dialog("BYE", call_id="call-1", cseq=3, branch="z9hG4bK-b")
    bye = bye.replace(b"BYE sip:core@10.0.0.10:5080", b"BYE sip:victim@203.0.113.99:5060")
    out = h.send(bye)
    assert [(f.addr, m.method) for f, m in out if m.method] == [(CORE, "BYE")]


def test_the_call_ends_when_the_core_answers_the_bye_not_before() -> None:
    """The caller's BYE frees the slot only once the core has answered it; a BYE the core
    refuses (e.g. 403) frees nothing."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    up(h)
    out = h.send(in_dialog("BYE", call_id="call-1", cseq=2, branch="z9hG4bK-b1"))
    fwd = [m for m in to(out, CORE) if m.method == "BYE"]
    assert h.count("caller", "+12125550100") == 1
    h.send(answer(fwd[0], 403, "Forbidden"), src=CORE)
    assert h.ended() == [] and h.count("caller", "+12125550100") == 1
    out = h.send(in_dialog("BYE", call_id="call-1", cseq=3, branch="z9hG4bK-b2"))
    fwd = [m for m in to(out, CORE) if m.method == "BYE"]
    h.send(answer(fwd[0], 200, "OK"), src=CORE)
    assert h.ended() == ["bye_caller"] and h.count("caller", "+12125550100") == 0


def test_unknown_dialog_and_core_side_tags_from_outside_are_refused() -> None:
    """An in-dialog request for a dialog sipguard did not set up gets 481; one from outside
    that speaks with the core's tag gets 403; neither reaches the core."""
    h = PolicyHarness()
    up(h)
    out = h.send(in_dialog("BYE", call_id="nope", cseq=2, branch="z9hG4bK-n"))
    assert to(out, CORE) == [] and statuses(out) == [481]
    reversed_tags = in_dialog("BYE", call_id="call-1", cseq=9, branch="z9hG4bK-r",
                              from_callee=True)
    out = h.send(reversed_tags, src=CALLER)
    assert to(out, CORE) == [] and statuses(out) == [403]


def test_another_address_of_the_same_peer_speaks_for_the_call() -> None:
    """A carrier's second SBC (same peer networks) may send the BYE; a stranger may not."""
    h = PolicyHarness(extra_yaml=PEERS)
    up(h)
    bye = in_dialog("BYE", call_id="call-1", cseq=2, branch="z9hG4bK-s")
    assert [m.method for m in to(h.send(bye, src=("198.51.100.8", 5060)), CORE)] == ["BYE"]


def test_out_of_dialog_requests_from_unknown_sources_are_refused_once() -> None:
    """With peers configured, MESSAGE and SUBSCRIBE from an unknown address get one 403 each,
    statelessly (no retransmission), and nothing reaches the core; an INVITE gets no 100."""
    h = PolicyHarness(extra_yaml=PEERS)
    for i, method in enumerate(("MESSAGE", "SUBSCRIBE", "INVITE")):
        out = h.send(out_of_dialog(method, call_id=f"u{i}"), src=STRANGER)
        assert to(out, CORE) == []
        assert [m.status for m in to(out, STRANGER)] == [403], method
    assert h.proxy.servers == {}
    assert to(h.advance(10.0), STRANGER) == []
    screened = [e for e in h.events if isinstance(e, Screened)]
    assert [(e.method, e.verdict.reason) for e in screened] == [
        ("MESSAGE", "unknown_source"), ("SUBSCRIBE", "unknown_source"),
        ("INVITE", "unknown_source")]


def test_unknown_source_drop_sends_nothing_at_all() -> None:
    """unknown_source: drop — not even 100 Trying goes back to an unknown address."""
    h = PolicyHarness(extra_yaml=PEERS + "unknown_source: drop\n")
    out = h.send(out_of_dialog("INVITE"), src=STRANGER)
    assert out == []


def test_unknown_source_drop_stays_silent_to_bad_requests_live_calls_and_while_shedding() -> None:
    """unknown_source: drop — an unknown source hears nothing for a request that does not
    parse, for an in-dialog request naming a live call (no 403 telling the call exists), and
    for an INVITE while sipguard sheds load (no 503 reflected to a spoofed address); a peer
    still hears them (and with reject, an unknown source its 403)."""
    h = PolicyHarness(extra_yaml=PEERS + "unknown_source: drop\n")
    up(h)
    bad = out_of_dialog("OPTIONS").replace(b"Max-Forwards: 70", b"Max-Forwards: many")
    assert h.send(bad, src=STRANGER) == []
    assert statuses(h.send(bad.replace(b"203.0.113.5", b"198.51.100.7"))) == [400]
    bye = in_dialog("BYE", call_id="call-1", cseq=5, branch="z9hG4bK-forged")
    assert h.send(bye, src=STRANGER) == []
    rejecting = PolicyHarness(extra_yaml=PEERS)
    up(rejecting)
    assert statuses(rejecting.send(bye, src=STRANGER)) == [403]
    h.core.overloaded = True
    assert h.send(out_of_dialog("INVITE", call_id="shed-1"), src=STRANGER) == []
    shed = h.send(invite(branch="z9hG4bK-shed", call_id="shed-2"))
    assert statuses(shed) == [503]


def test_monitor_mode_still_sheds_unknown_sources_while_overloaded() -> None:
    """mode: monitor lets an unknown source's INVITE through, tagged — but not while sipguard
    sheds load: then it hears the stateless 503 like everyone else, nothing is kept."""
    h = PolicyHarness(extra_yaml=PEERS + "mode: monitor\n")
    h.core.overloaded = True
    out = h.send(out_of_dialog("INVITE", call_id="mon-1"), src=STRANGER)
    assert statuses(out) == [503] and to(out, CORE) == []
    assert not h.proxy.servers and not h.proxy.dialogs


def test_methods_a_trunk_does_not_use_get_405_with_allow() -> None:
    """A peer's out-of-dialog MESSAGE is answered 405 with Allow; OPTIONS and INVITE pass."""
    h = PolicyHarness(extra_yaml=PEERS)
    out = h.send(out_of_dialog("MESSAGE").replace(b"203.0.113.5", b"198.51.100.7"))
    [resp] = [m for _, m in out if m.status]
    assert resp.status == 405 and resp.get("allow") == "ACK, CANCEL, INVITE, OPTIONS"
    assert to(out, CORE) == []


def test_suspended_numbers_apply_to_every_initial_request() -> None:
    """A MESSAGE from a suspended caller is refused like its INVITE would be."""
    h = PolicyHarness(extra_yaml="suspended: ['+12125550100']\n",
                      allow_methods=frozenset({"INVITE", "OPTIONS", "MESSAGE"}))
    out = h.send(out_of_dialog("MESSAGE"), src=STRANGER)
    assert [m.status for m in to(out, STRANGER)] == [403] and to(out, CORE) == []


def test_a_cancel_from_another_source_cancels_nothing() -> None:
    """Only the INVITE's sender may cancel it (RFC 3261 §9.2): others get 481."""
    h = PolicyHarness()
    _, fwd = h.call(1)
    assert fwd is not None
    h.answer(fwd, 180, "Ringing")
    from tests.unit.dialog_helpers import cancel

    out = h.send(cancel(call_id="call-1", branch="z9hG4bK-c1"), src=OTHER_PORT)
    assert statuses(out) == [481]
    assert [m for m in to(out, CORE) if m.method == "CANCEL"] == []


def test_sipguards_own_headers_and_verstat_never_come_from_outside() -> None:
    """With no rule on, forged verdict headers and verstat in From / P-Asserted-Identity are
    removed from the initial INVITE and from a re-INVITE."""
    h = PolicyHarness()
    forged = (
        "X-Sipguard-Identity: TN-Validation-Passed;attest=A\r\n"
        "X-Sipguard-Verdict: passed\r\n"
        "P-Asserted-Identity: <sip:+12125550100;verstat=TN-Validation-Passed@198.51.100.7;"
        "user=phone>\r\n"
    )
    _, fwd = h.call(1, extra=forged)
    assert fwd is not None
    assert not fwd.has("x-sipguard-identity") and not fwd.has("x-sipguard-verdict")
    assert "verstat" not in (fwd.get("p-asserted-identity") or "").lower()
    h.answer(fwd, 200, "OK")
    reinvite = in_dialog("INVITE", call_id="call-1", cseq=2, branch="z9hG4bK-re",
                         extra=forged.replace("<sip:+1212", "<sip:+1212"))
    reinvite = reinvite.replace(b"From: <sip:+12125550100@198.51.100.7>",
                                b"From: <sip:+12125550100@198.51.100.7;VerStat=TN-Validation-Passed>")
    fwd2 = [m for m in to(h.send(reinvite), CORE) if m.method == "INVITE"]
    assert fwd2 and not fwd2[0].has("x-sipguard-identity")
    assert "verstat" not in (fwd2[0].get("from") or "").lower()
    assert "verstat" not in (fwd2[0].get("p-asserted-identity") or "").lower()


def test_a_response_with_no_via_left_is_not_forwarded() -> None:
    """RFC 3261 §16.7 step 3: a core response carrying only sipguard's Via goes nowhere; the
    caller hears 502 for the INVITE instead of nothing at all."""
    h = PolicyHarness()
    _, fwd = h.call(1)
    assert fwd is not None
    ours = fwd.values("via")[0]
    data = answer(fwd, 486, "Busy Here")
    head, _, rest = data.partition(b"\r\n")
    lines = [ln for ln in rest.split(b"\r\n") if not ln.startswith(b"Via:")]
    data = b"\r\n".join([head, b"Via: " + ours.encode(), *lines])
    out = h.send(data, src=CORE)
    assert [m.status for m in to(out, CALLER)] == [502]
    assert any(isinstance(e, Dropped) and e.kind == "no_via_left" for e in h.events)


def test_a_2xx_without_our_record_route_is_noticed() -> None:
    """A core that drops sipguard's Record-Route is a deployment error: reported once."""
    h = PolicyHarness()
    _, fwd = h.call(1)
    assert fwd is not None
    data = answer(fwd, 200, "OK")
    data = b"".join(ln for ln in data.splitlines(keepends=True)
                    if not ln.startswith(b"Record-Route"))
    h.send(data, src=CORE)
    assert [e.kind for e in h.events if isinstance(e, Noticed)] == ["core_without_record_route"]


def test_a_full_transaction_table_sheds_new_calls_with_503() -> None:
    """Past sip.max_dialogs new INVITEs hear 503 + Retry-After; the calls up go on."""
    h = PolicyHarness(max_dialogs=2)
    up(h, 1)
    up(h, 2)
    resp, fwd = h.call(3)
    assert fwd is None
    [busy] = [m for m in resp if m.status == 503]
    assert busy.get("retry-after") is not None
    out = h.send(in_dialog("BYE", call_id="call-1", cseq=2, branch="z9hG4bK-b"))
    assert [m.method for m in to(out, CORE)] == ["BYE"]


def test_calls_the_core_places_pass_no_policy_and_are_tracked() -> None:
    """With peers configured, an INVITE from the core goes out (no unknown-source 403), and
    the remote party's BYE from where the INVITE went is routed back to the core."""
    h = PolicyHarness(extra_yaml=PEERS)
    remote = ("203.0.113.50", 5060)
    inv = invite(branch="z9hG4bK-out1", call_id="out-1", uri="sip:+447700900123@203.0.113.50:5060",
                 via_host="10.0.0.10:5080")
    out = h.send(inv, src=CORE)
    reqs = [m for f, m in out if m.method == "INVITE" and f.addr == remote]
    assert len(reqs) == 1
    assert not [e for e in h.events if isinstance(e, Screened)]
    ok = answer(reqs[0], 200, "OK", to_tag="rt1")
    h.send(ok, src=remote)
    bye = (
        b"BYE sip:+12125550100@10.0.0.10:5080 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bK-rb\r\n"
        b"Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\n"
        b"From: <sip:+18005550199@192.0.2.1>;tag=rt1\r\n"
        b"To: <sip:+12125550100@198.51.100.7>;tag=ftag1\r\n"
        b"Call-ID: out-1\r\nCSeq: 5 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    out = h.send(bye, src=remote)
    [fwd_bye] = [m for m in to(out, CORE) if m.method == "BYE"]
    h.send(answer(fwd_bye, 200, "OK"), src=CORE)
    assert any(isinstance(e, DialogEnded) for e in h.events)
    # it took no slot, so its end frees none: the must-stay-zero count stays 0 (it rose by
    # one for every call the core placed)
    assert h.core.policy.state.tracker.leaks()["concurrency_unmatched_ends"] == 0


def test_requests_from_the_core_reuse_a_tcp_callers_connection() -> None:
    """A BYE from the core to a caller that came in over TCP goes out on the caller's own
    connection (a phone behind NAT accepts nothing else)."""
    h = PolicyHarness()
    out = h.send(invite(call_id="call-7", branch="z9hG4bK-t7"), transport="tcp", conn=42)
    fwd = [m for m in to(out, CORE) if m.method == "INVITE"][0]
    h.send(answer(fwd, 200, "OK"), src=CORE)
    bye = in_dialog("BYE", call_id="call-7", cseq=5, branch="z9hG4bK-cb", from_callee=True)
    out = h.send(bye, src=CORE)
    flows: list[Flow] = [f for f, m in out if m.method == "BYE"]
    assert [(f.transport, f.conn) for f in flows] == [("tcp", 42)]
    assert any(isinstance(e, DialogEnded) for e in h.events)


def test_keepalive_frees_the_slot_of_a_call_whose_bye_the_core_lost() -> None:
    """dialog_keepalive 30 s: the core lost the caller's BYE (never answered it) and no
    longer knows the call; its 481 to the next keep-alive ends the call and frees the slot
    within 3 x 30 s. The caller's side is probed too, in the dialog, on its own flow."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n", dialog_keepalive=30.0)
    up(h)
    h.send(in_dialog("BYE", call_id="call-1", cseq=2, branch="z9hG4bK-lost"))
    assert h.count("caller", "+12125550100") == 1
    out = h.advance(30.0)
    probes = [(f.addr, m) for f, m in out if m.method == "OPTIONS"]
    assert sorted(a for a, _ in probes) == sorted([CORE, CALLER])
    for _, m in probes:
        assert m.call_id == "call-1" and m.to_tag and m.from_tag
        assert m.cseq[1] == "OPTIONS"
    to_core = [m for a, m in probes if a == CORE][0]
    h.send(answer(to_core, 481, "Call/Transaction Does Not Exist"), src=CORE)
    assert h.ended() == ["keepalive_failed"]
    assert h.count("caller", "+12125550100") == 0


def test_keepalive_keeps_a_live_call_and_a_silent_side_ends_it() -> None:
    """A side that answers (200, or 405/500) keeps the call; a side that never answers ends
    it when the OPTIONS times out (Timer F)."""
    h = PolicyHarness(dialog_keepalive=30.0)
    up(h)
    out = h.advance(30.0)
    for f, m in out:
        if m.method == "OPTIONS":
            h.send(answer(m, 200 if f.addr == CORE else 405, "X"), src=f.addr)
    assert h.ended() == []
    h.advance(30.0 + 33.0)  # the next round gets no answer at all
    assert h.ended() == ["keepalive_failed"]


def test_end_calls_sends_bye_to_both_sides_and_frees_the_slot() -> None:
    """Ending a number's calls at once: a BYE in the dialog to the core and to the caller
    (above the CSeqs each side used), the call ends as `suspended`, its slot is free."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    up(h)
    h.send(in_dialog("INFO", call_id="call-1", cseq=7, branch="z9hG4bK-i7"))
    n = h.core.end_calls(lambda number: number == "+12125550100", "suspended", h.now)
    out = h._drain()
    byes = {f.addr: m for f, m in out if m.method == "BYE"}
    assert set(byes) == {CORE, CALLER} and n == 1
    assert byes[CORE].cseq[0] == 8 and byes[CORE].from_tag == "ftag1"
    assert byes[CALLER].to_tag == "ftag1" and byes[CALLER].from_tag == "ttag9"
    assert h.ended() == ["suspended"] and h.count("caller", "+12125550100") == 0
    assert h.core.end_calls(lambda number: True, "suspended", h.now) == 0


def test_the_bye_sipguard_sends_goes_above_the_invites_and_early_cseqs() -> None:
    """The INVITE had CSeq 102 and a PRACK before the 2xx CSeq 104: the BYE sipguard sends to
    the core when it ends the call has CSeq 105 (RFC 3261 §12.2.2: a lower one is 500)."""
    h = PolicyHarness()
    out = h.send(invite(branch="z9hG4bK-c1", call_id="call-1", cseq=102))
    [fwd] = to(out, CORE)
    h.answer(fwd, 183, "Session Progress")
    h.send(in_dialog("PRACK", call_id="call-1", cseq=104, branch="z9hG4bK-pr"))
    h.answer(fwd, 200, "OK")
    h.send(in_dialog("ACK", call_id="call-1", cseq=102, branch="z9hG4bK-a1"))
    assert h.core.end_calls(lambda number: number == "+12125550100", "suspended", h.now) == 1
    byes = {f.addr: m for f, m in h._drain() if m.method == "BYE"}
    assert byes[CORE].cseq[0] == 105
    assert h.proxy.early_cseqs == {}


def test_the_byes_sipguard_sends_carry_each_sides_route_set() -> None:
    """The caller's carrier SBC and a proxy in front of the core both record-route: the BYE
    sipguard sends toward the core carries Route: the core-side proxy; toward the caller,
    Route: the SBC (RFC 3261 §12.2.1.1) — so neither proxy is passed by."""
    h = PolicyHarness()
    out = h.send(invite(branch="z9hG4bK-c1", call_id="call-1",
                        extra="Record-Route: <sip:sbc.carrier.example;lr>\r\n"))
    [fwd] = to(out, CORE)
    ok = answer(fwd, 200, "OK").replace(
        b"Record-Route:", b"Record-Route: <sip:core-proxy.example;lr>\r\nRecord-Route:", 1)
    h.send(ok, src=CORE)
    h.send(in_dialog("ACK", call_id="call-1", cseq=1, branch="z9hG4bK-a1"))
    assert h.core.end_calls(lambda number: number == "+12125550100", "suspended", h.now) == 1
    byes = {f.addr: m for f, m in h._drain() if m.method == "BYE"}
    assert byes[CORE].values("route") == ["<sip:core-proxy.example;lr>"]
    assert byes[CALLER].values("route") == ["<sip:sbc.carrier.example;lr>"]


REMOTE = ("203.0.113.50", 5060)


def test_a_call_the_core_sends_back_out_is_a_second_leg_and_both_end() -> None:
    """A proxy core sends a call that came in back out through sipguard, with its Call-ID and
    From tag (a spiral, RFC 3261 §16.3): a leg of its own, beside the first, which it does
    not replace — the caller's BYE still ends the first leg and frees its slot, the core's
    BYE goes out on the second."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    _, fwd = h.call(1)
    assert fwd is not None
    out_again = bytes(fwd.serialize(prepend=[b"Via: SIP/2.0/UDP 10.0.0.10:5080;branch=z9hG4bK-p1"]))
    out_again = out_again.replace(b"INVITE sip:+18005550199@192.0.2.1:5060;user=phone",
                                  b"INVITE sip:+18005550199@203.0.113.50:5060", 1)
    out = h.send(out_again, src=CORE)
    [leg2] = [m for m in to(out, REMOTE) if m.method == "INVITE"]
    assert len(h.proxy.dialogs) == 2
    h.send(answer(leg2, 200, "OK", to_tag="rt1"), src=REMOTE)
    h.answer(fwd, 200, "OK")
    h.send(in_dialog("ACK", call_id="call-1", cseq=1, branch="z9hG4bK-a1"))
    assert h.count("caller", "+12125550100") == 1
    out = h.bye(1)
    assert [m.method for m in to(out, CORE)] == ["BYE"]
    assert h.count("caller", "+12125550100") == 0
    bye_out = in_dialog("BYE", call_id="call-1", cseq=2, branch="z9hG4bK-pb",
                        to_tag="rt1").replace(b"Via: SIP/2.0/UDP 198.51.100.7:5062",
                                              b"Via: SIP/2.0/UDP 10.0.0.10:5080")
    bye_out = bye_out.replace(b"BYE sip:core@10.0.0.10:5080", b"BYE sip:callee@203.0.113.50:5060")
    out = h.send(bye_out, src=CORE)
    assert [m.method for m in to(out, REMOTE)] == ["BYE"]
    assert len(h.proxy.dialogs) == 0
    assert h.ended() == ["bye_caller", "bye_caller"]  # each leg ended by its own caller


def test_an_invite_with_a_live_calls_id_and_sipguards_via_replaces_nothing() -> None:
    """A caller that copies sipguard's Via from a request the core sent it (a re-INVITE) into
    a new INVITE with its live call's Call-ID and From tag gets 482 (a merged request); its
    call is not replaced, so its BYE still ends it and frees the slot."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    up(h)
    out = h.send(in_dialog("INVITE", call_id="call-1", cseq=7, branch="z9hG4bK-cre",
                           from_callee=True), src=CORE)
    [reinvite] = [m for m in to(out, CALLER) if m.method == "INVITE"]
    ours = reinvite.values("via")[0]
    for n in range(3):
        forged = invite(branch=f"z9hG4bK-x{n}", call_id="call-1", cseq=100 + n,
                        callee=f"+1800555020{n}", extra=f"Via: {ours}\r\n")
        out = h.send(forged)
        assert to(out, CORE) == [] and statuses(out) == [100, 482]
    assert len(h.proxy.dialogs) == 1 and h.count("caller", "+12125550100") == 1
    out = h.bye(1)
    assert [m.method for m in to(out, CORE)] == ["BYE"]
    assert h.count("caller", "+12125550100") == 0 and len(h.proxy.dialogs) == 0


def test_made_up_dialogs_and_cancels_get_one_stateless_answer_and_hold_no_transaction() -> None:
    """In-dialog requests for no live call and CANCELs for no INVITE get one 481 each, sent
    once, and keep nothing: a stream of them cannot fill the transaction table, and the next
    call still goes through."""
    h = PolicyHarness(max_transactions=5)
    for i in range(20):
        made_up = in_dialog("MESSAGE", call_id=f"nope-{i}", cseq=1, branch=f"z9hG4bK-m{i}")
        out = h.send(made_up)
        assert to(out, CORE) == [] and statuses(out) == [481]
        out = h.send(invite(branch=f"z9hG4bK-k{i}", call_id=f"gone-{i}").replace(
            b"INVITE sip:", b"CANCEL sip:", 1).replace(b"1 INVITE", b"1 CANCEL", 1))
        assert to(out, CORE) == [] and statuses(out) == [481]
    assert h.proxy.servers == {}
    assert to(h.advance(10.0), CALLER) == []
    _, fwd = h.call(1)
    assert fwd is not None
    dropped = [e.kind for e in h.events if isinstance(e, Dropped)]
    assert dropped.count("in_dialog_refused") == 20 and dropped.count("cancel_unmatched") == 20


def test_an_unknown_source_hears_nothing_for_made_up_dialogs_and_cancels() -> None:
    """With peers and unknown_source: drop, a stranger's To-tagged request and CANCEL get no
    answer at all (they are screened like any out-of-dialog request) and keep nothing."""
    h = PolicyHarness(extra_yaml=PEERS + "unknown_source: drop\n")
    bye = in_dialog("BYE", call_id="x-1", cseq=2, branch="z9hG4bK-sb")
    assert h.send(bye, src=STRANGER) == []
    cancel = invite(branch="z9hG4bK-sc", call_id="x-2").replace(
        b"INVITE sip:", b"CANCEL sip:", 1).replace(b"1 INVITE", b"1 CANCEL", 1)
    assert h.send(cancel, src=STRANGER) == []
    assert h.proxy.servers == {}
    assert [e.verdict.reason for e in h.events if isinstance(e, Screened)] == [
        "unknown_source", "unknown_source"]


def test_the_party_of_a_call_the_core_places_to_a_host_name_is_the_address_that_answered() -> None:
    """The core calls sip:...@gw.carrier.example: the INVITE leaves for the name (the shell
    resolves it); the 200 comes from an address, and the party's BYE from that address is
    routed to the core, while the same BYE from elsewhere is refused."""
    h = PolicyHarness()
    inv = invite(branch="z9hG4bK-outh", call_id="out-h",
                 uri="sip:+447700900123@gw.carrier.example:5060", via_host="10.0.0.10:5080")
    out = h.send(inv, src=CORE)
    [req] = [m for f, m in out if m.method == "INVITE" and f.addr == ("gw.carrier.example", 5060)]
    h.send(answer(req, 200, "OK", to_tag="rh1"), src=REMOTE)
    bye = (
        b"BYE sip:+12125550100@10.0.0.10:5080 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bK-hb\r\n"
        b"Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\n"
        b"From: <sip:+447700900123@gw.carrier.example>;tag=rh1\r\n"
        b"To: <sip:+12125550100@198.51.100.7>;tag=ftag1\r\n"
        b"Call-ID: out-h\r\nCSeq: 5 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    out = h.send(bye, src=THIRD)
    assert to(out, CORE) == [] and statuses(out) == [403]
    out = h.send(bye.replace(b"branch=z9hG4bK-hb", b"branch=z9hG4bK-hb2"), src=REMOTE)
    assert [m.method for m in to(out, CORE)] == ["BYE"]


def test_the_byes_sipguard_sends_follow_a_target_refresh() -> None:
    """A re-INVITE answered 2xx moves each side's target (RFC 3261 §12.2.1.2): the caller's
    re-INVITE gives its new Contact, the core's 2xx its own; later the core's re-INVITE and
    the caller's 2xx move them again. The BYEs of end_calls go to the targets of the last
    refresh; a refresh that failed (488) moved nothing."""
    h = PolicyHarness()
    up(h)
    moved = "Contact: <sip:+12125550100@198.51.100.7:6000>\r\n"
    out = h.send(in_dialog("INVITE", call_id="call-1", cseq=2, branch="z9hG4bK-r1", extra=moved))
    [fwd] = [m for m in to(out, CORE) if m.method == "INVITE"]
    h.send(answer(fwd, 200, "OK").replace(b"sip:core@10.0.0.10:5080", b"sip:core-b@10.0.0.10:5080"),
           src=CORE)
    h.send(in_dialog("ACK", call_id="call-1", cseq=2, branch="z9hG4bK-r1a"))
    # the core's refresh fails at the caller: nothing moves
    out = h.send(in_dialog("INVITE", call_id="call-1", cseq=5, branch="z9hG4bK-c1", from_callee=True,
                           extra="Contact: <sip:core-x@10.0.0.10:5080>\r\n"), src=CORE)
    [reinvite] = [m for m in to(out, CALLER) if m.method == "INVITE"]
    h.send(answer(reinvite, 488, "Not Acceptable Here", to_tag=None).replace(
        b"sip:core@10.0.0.10:5080", b"sip:+12125550100@198.51.100.7:7777"))
    byes = _end_and_collect(h)
    assert byes[CALLER].start_line.split()[1] == b"sip:+12125550100@198.51.100.7:6000"
    assert byes[CORE].start_line.split()[1] == b"sip:core-b@10.0.0.10:5080"


def test_the_core_s_refresh_moves_the_targets_too() -> None:
    """The core's re-INVITE (its new Contact) answered 2xx by the caller (its new Contact)."""
    h = PolicyHarness()
    up(h)
    out = h.send(in_dialog("INVITE", call_id="call-1", cseq=5, branch="z9hG4bK-c2", from_callee=True,
                           extra="Contact: <sip:core-c@10.0.0.10:5080>\r\n"), src=CORE)
    [reinvite] = [m for m in to(out, CALLER) if m.method == "INVITE"]
    h.send(answer(reinvite, 200, "OK", to_tag=None).replace(
        b"sip:core@10.0.0.10:5080", b"sip:+12125550100@198.51.100.7:7000"))
    byes = _end_and_collect(h)
    assert byes[CALLER].start_line.split()[1] == b"sip:+12125550100@198.51.100.7:7000"
    assert byes[CORE].start_line.split()[1] == b"sip:core-c@10.0.0.10:5080"


def _end_and_collect(h: PolicyHarness) -> dict[tuple[str, int], Message]:
    assert h.core.end_calls(lambda number: number == "+12125550100", "suspended", h.now) == 1
    return {f.addr: m for f, m in h._drain() if m.method == "BYE"}


def test_a_bye_with_a_made_up_to_tag_frees_no_slot() -> None:
    """The caller's BYE with the call's Call-ID and From tag but a To tag the core never
    answered with hears 481 from sipguard and reaches nothing; the call stays up and keeps its
    slot: a second call still hears 403, and the real BYE then reaches the core and frees it."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    up(h)
    out = h.send(in_dialog("BYE", call_id="call-1", cseq=2, branch="z9hG4bK-bogus",
                           to_tag="bogus"))
    assert to(out, CORE) == [] and [m.status for m in to(out, CALLER)] == [481]
    assert h.count("caller", "+12125550100") == 1 and len(h.proxy.dialogs) == 1
    assert h.ended() == []
    replies, fwd = h.call(2)
    assert fwd is None and [m.status for m in replies if m.status >= 200] == [403]
    out = h.bye(1)
    assert [m.method for m in to(out, CORE)] == ["BYE"]
    assert h.count("caller", "+12125550100") == 0 and h.ended() == ["bye_caller"]


def test_a_callers_in_dialog_requests_leave_with_the_cores_target_and_route_set() -> None:
    """RFC 3261 §12.2.1.1: the caller's in-dialog requests go where the core's answer said —
    its Contact as Request-URI, its route set — whatever Request-URI and Route they carry: a
    core that routes them on by those would relay a party's re-INVITE, INFO or ACK to a host
    of its choosing. A target refresh (the core's re-INVITE with a new Contact, answered 2xx)
    moves the target; the caller's own requests that name it need no change."""
    h = PolicyHarness()
    up(h)
    evil = "Route: <sip:192.0.2.1:5060;lr>, <sip:203.0.113.99;lr>\r\n"
    for method, cseq in (("INFO", 2), ("INVITE", 3), ("ACK", 3)):
        data = in_dialog(method, call_id="call-1", cseq=cseq, branch=f"z9hG4bK-e{cseq}{method}")
        data = data.replace(b"INFO sip:core@10.0.0.10:5080", b"INFO sip:x@203.0.113.99:5060")
        data = data.replace(b"Route: <sip:192.0.2.1:5060;lr>\r\n", evil.encode())
        [sent] = [m for m in to(h.send(data), CORE) if m.method == method]
        assert sent.start_line == f"{method} sip:core@10.0.0.10:5080 SIP/2.0".encode()
        assert sent.get("route") is None and not [ln for ln in sent.lines if b"203.0.113" in ln]
    assert len([e for e in h.events if getattr(e, "kind", "") == "in_dialog_rerouted"]) == 3
    # the core moves its target (re-INVITE, new Contact, answered 2xx by the caller)
    out = h.send(in_dialog("INVITE", call_id="call-1", cseq=5, branch="z9hG4bK-cr",
                           from_callee=True, extra="Contact: <sip:moved@10.0.0.11:5080>\r\n"),
                 src=CORE)
    [reinvite] = [m for m in to(out, CALLER) if m.method == "INVITE"]
    h.send(answer(reinvite, 200, "OK", to_tag=None), src=CORE)  # (the harness's caller)
    h.send(answer(reinvite, 200, "OK", to_tag=None))
    data = in_dialog("INFO", call_id="call-1", cseq=6, branch="z9hG4bK-mv").replace(
        b"sip:core@10.0.0.10:5080", b"sip:moved@10.0.0.11:5080")
    before = len(h.events)
    [sent] = [m for m in to(h.send(data), CORE) if m.method == "INFO"]
    assert sent.start_line == b"INFO sip:moved@10.0.0.11:5080 SIP/2.0"
    assert not [e for e in h.events[before:] if getattr(e, "kind", "") == "in_dialog_rerouted"]


def test_a_core_side_route_set_is_put_back_on_the_callers_requests() -> None:
    """A record-routing core (its entry above sipguard's in the 2xx): the caller's requests
    reach it with that entry as their Route, also when the caller left it out or put another
    there."""
    h = PolicyHarness()
    _, fwd = h.call(1)
    assert fwd is not None
    ours = b"Record-Route: <sip:192.0.2.1:5060;lr>\r\n"
    h.send(answer(fwd, 200, "OK").replace(
        ours, b"Record-Route: <sip:10.0.0.10:5080;lr;ftag=x>, <sip:192.0.2.1:5060;lr>\r\n"),
        src=CORE)
    for n, route in enumerate(("", ", <sip:10.0.0.10:5080;lr;ftag=x>",
                               ", <sip:203.0.113.99;lr>")):
        data = in_dialog("INFO", call_id="call-1", cseq=2 + n, branch=f"z9hG4bK-r{n}").replace(
            b"Route: <sip:192.0.2.1:5060;lr>\r\n",
            f"Route: <sip:192.0.2.1:5060;lr>{route}\r\n".encode())
        [sent] = [m for m in to(h.send(data), CORE) if m.method == "INFO"]
        assert sent.values("route") == ["<sip:10.0.0.10:5080;lr;ftag=x>"]


@pytest.mark.parametrize("method", ["REGISTER", "PUBLISH", "FOO"])
def test_methods_of_no_call_do_not_ride_a_calls_tags(method: str) -> None:
    """A REGISTER, PUBLISH or unknown method with a live call's Call-ID and tags is no
    request of that call: 405 with the Allow of calls, nothing reaches the core."""
    h = PolicyHarness()
    up(h)
    out = h.send(in_dialog(method, call_id="call-1", cseq=2, branch="z9hG4bK-m",
                           extra="Contact: <sip:agent1001@203.0.113.99>\r\n"))
    assert to(out, CORE) == []
    [refusal] = to(out, CALLER)
    assert refusal.status == 405 and "UPDATE" in (refusal.get("allow") or "")
    assert [m.method for m in to(h.send(in_dialog(
        "MESSAGE", call_id="call-1", cseq=3, branch="z9hG4bK-msg")), CORE)] == ["MESSAGE"]


def test_the_cores_bye_ends_the_call_even_when_the_callers_contact_is_unreachable() -> None:
    """The caller's Contact names sipguard itself (or a transport it has no listener for): the
    core's BYE cannot be routed on (404 / 416 to the core), yet the core has ended the call —
    so does sipguard, and the caller's slot is free at once, not 4 hours later."""
    for contact in ("sip:+12125550100@192.0.2.1:5060", "sip:+12125550100@198.51.100.7;transport=ws"):
        h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
        inv = invite(branch="z9hG4bK-u", call_id="call-1").replace(
            b"<sip:+12125550100@198.51.100.7:5062>", f"<{contact}>".encode())
        [fwd] = [m for m in to(h.send(inv), CORE) if m.method == "INVITE"]
        h.answer(fwd, 200, "OK")
        h.send(in_dialog("ACK", call_id="call-1", cseq=1, branch="z9hG4bK-ua"))
        assert h.count("caller", "+12125550100") == 1
        bye = in_dialog("BYE", call_id="call-1", cseq=7, branch="z9hG4bK-ub", from_callee=True)
        out = h.send(bye.replace(b"sip:+12125550100@198.51.100.7:5062", contact.encode()),
                     src=CORE)
        assert [m.status for m in to(out, CORE)] in ([404], [416])
        assert h.count("caller", "+12125550100") == 0 and h.ended() == ["bye_callee"]


def test_a_callers_later_request_showing_another_from_is_refused() -> None:
    """From does not change within a dialog (RFC 3261 §12.2.1.1): a caller's re-INVITE or
    INFO whose From shows another number than the INVITE was checked with hears 403 and
    reaches nothing — a core may read the caller from it; the same number in another
    spelling (an SBC normalising only INVITEs, escapes, user=phone) or a new display name is
    no change; the call's ACK and BYE pass whatever From shows (refused, the call would stay
    up at the core)."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    up(h)
    for n, (method, shown) in enumerate((("INVITE", "+19005550199"), ("INFO", "+13125550100"))):
        data = in_dialog(method, call_id="call-1", cseq=2 + n, branch=f"z9hG4bK-fc{n}",
                         caller=shown).replace(b"To: <sip:" + shown.encode(), b"To: <sip:")
        out = h.send(data)
        assert to(out, CORE) == [] and [m.status for m in to(out, CALLER)] == [403]
    for n, spelling in enumerate(("12125550100", "%2B1-212-555-0100;user=phone",
                                  "+%312125550100")):
        data = in_dialog("INFO", call_id="call-1", cseq=4 + n, branch=f"z9hG4bK-sp{n}",
                         caller=spelling).replace(b"To: <sip:" + spelling.encode(), b"To: <sip:")
        assert [m.method for m in to(h.send(data), CORE)] == ["INFO"], spelling
    renamed = in_dialog("INFO", call_id="call-1", cseq=8, branch="z9hG4bK-dn").replace(
        b"From: <sip:", b'From: "Agent 7" <sip:')
    assert [m.method for m in to(h.send(renamed), CORE)] == ["INFO"]
    h.bye(1, cseq=9, caller="+19005550199")
    assert h.count("caller", "+12125550100") == 0


def test_a_callers_later_from_is_one_number_not_one_that_ends_the_same_way() -> None:
    """Another country's number ending with the caller's digits, the caller's number behind a
    DNO prefix, a shorter run of its digits, a decoy added after it, or a display name showing
    another number: each is another caller, 403 on a re-INVITE or UPDATE, nothing reaches the
    core (each passed before: numbers were one when either one's digits ended the other's).
    The national spelling of the checked number, the display number the INVITE showed and one
    showing the caller itself still pass."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    out = h.send(invite(branch="z9hG4bK-d0", call_id="call-1").replace(
        b"From: <sip:", b'From: "+1 212 555 0100" <sip:'))
    [fwd] = [m for m in to(out, CORE) if m.method == "INVITE"]
    h.answer(fwd, 200, "OK")
    refused = ["+4412125550100", "+190012125550100", "550100", "+12125550100x19005550199"]
    for n, shown in enumerate(refused):
        for k, method in enumerate(("INVITE", "UPDATE")):
            out = h.send(in_dialog(method, call_id="call-1", cseq=2 + 2 * n + k,
                                   branch=f"z9hG4bK-r{n}{k}", caller=shown))
            assert to(out, CORE) == [] and [m.status for m in to(out, CALLER)] == [403], shown
    display = in_dialog("INFO", call_id="call-1", cseq=20, branch="z9hG4bK-dd").replace(
        b"From: <sip:", b'From: "+1 900 555 0199" <sip:')
    out = h.send(display)
    assert to(out, CORE) == [] and [m.status for m in to(out, CALLER)] == [403]
    for n, (name, user) in enumerate((("+1 212 555 0100", "+12125550100"),
                                      ("(212) 555-0100", "2125550100"), ("Agent 7", "+12125550100"))):
        data = in_dialog("INFO", call_id="call-1", cseq=21 + n, branch=f"z9hG4bK-ok{n}",
                         caller=user).replace(b"From: <sip:", f'From: "{name}" <sip:'.encode())
        assert [m.method for m in to(h.send(data), CORE)] == ["INFO"], (name, user)


def test_only_the_calls_own_answers_from_its_core_pin_its_route() -> None:
    """The pins come from the answers to the call's own INVITE, from the core it went to: a
    2xx sent again (a late ACK) or forged — to the core's re-INVITE, on the branch the caller
    saw, naming the call's Call-ID and tags, from the caller or another host — moves neither
    target nor route set; the caller's own Record-Route entries, one made to look like
    sipguard's, never join the core side's."""
    h = PolicyHarness()
    ours = b"Record-Route: <sip:192.0.2.1:5060;lr>\r\n"
    decoy = b"Record-Route: <sip:203.0.113.99;lr>, <sip:192.0.2.1:5060;lr;decoy>\r\n"
    out = h.send(invite(branch="z9hG4bK-c1", call_id="call-1").replace(
        b"Max-Forwards:", decoy + b"Max-Forwards:"))
    [fwd] = to(out, CORE)
    assert fwd.values("record-route") == [
        "<sip:192.0.2.1:5060;lr>", "<sip:203.0.113.99;lr>, <sip:192.0.2.1:5060;lr;decoy>"]
    h.send(answer(fwd, 200, "OK").replace(
        ours, b"Record-Route: <sip:10.0.0.10:5080;lr>\r\n" + ours, 1), src=CORE)
    out = h.send(in_dialog("INVITE", call_id="call-1", cseq=5, branch="z9hG4bK-cr",
                           from_callee=True), src=CORE)
    [reinvite] = [m for m in to(out, CALLER) if m.method == "INVITE"]
    forged = answer(reinvite, 200, "OK", to_tag=None).replace(
        b"Contact: <sip:core@10.0.0.10:5080>", b"Contact: <sip:x@203.0.113.99>")
    for src in (CALLER, CALLER, ("203.0.113.99", 5060)):
        h.send(forged.replace(b"SIP/2.0 200 OK\r\n",
                              b"SIP/2.0 200 OK\r\nRecord-Route: <sip:203.0.113.99;lr>\r\n"),
               src=src)
    h.send(answer(fwd, 200, "OK").replace(b"Contact: <sip:core@10.0.0.10:5080>",
                                          b"Contact: <sip:y@203.0.113.99>"), src=CORE)
    [info] = [m for m in to(h.send(in_dialog("INFO", call_id="call-1", cseq=2,
                                              branch="z9hG4bK-i")), CORE) if m.method == "INFO"]
    assert info.start_line == b"INFO sip:core@10.0.0.10:5080 SIP/2.0"
    assert info.values("route") == ["<sip:10.0.0.10:5080;lr>"]


def test_a_ringing_fork_without_a_target_pins_nothing_and_an_answering_one_always_does() -> None:
    """A 183 with a tag but no Contact sets up no dialog (RFC 3261 §12.1.1): the caller's
    requests naming its tag hear 481 until one with a Contact comes. With nine forks
    ringing, every one answering gets its pin (a ringing one makes room), and so do answers
    of forks that never rang."""
    h = PolicyHarness()
    _, fwd = h.call(1)
    assert fwd is not None
    no_contact = answer(fwd, 183, "Session Progress", to_tag="e1").replace(
        b"Contact: <sip:core@10.0.0.10:5080>\r\n", b"")
    h.send(no_contact, src=CORE)
    info = in_dialog("INFO", call_id="call-1", cseq=2, branch="z9hG4bK-e1", to_tag="e1")
    info = info.replace(b"INFO sip:core@10.0.0.10:5080", b"INFO sip:x@203.0.113.99")
    assert [m.status for m in to(h.send(info), CALLER)] == [481]
    h.send(answer(fwd, 183, "Session Progress", to_tag="e1"), src=CORE)
    [sent] = [m for m in to(h.send(info.replace(b"z9hG4bK-e1", b"z9hG4bK-e2")), CORE)
              if m.method == "INFO"]
    assert sent.start_line == b"INFO sip:core@10.0.0.10:5080 SIP/2.0"
    for n in range(2, 10):
        h.send(answer(fwd, 180, "Ringing", to_tag=f"e{n}"), src=CORE)
    for n in range(9, 1, -1):  # ringing forks answer, the last ringing one first
        h.send(answer(fwd, 200, "OK", to_tag=f"e{n}"), src=CORE)
    for n in range(13, 20):  # and more than ever rang
        h.send(answer(fwd, 200, "OK", to_tag=f"e{n}"), src=CORE)
    for n in (*range(2, 10), *range(13, 20)):
        ack = in_dialog("ACK", call_id="call-1", cseq=1, branch=f"z9hG4bK-a{n}",
                        to_tag=f"e{n}")
        assert [m.method for m in to(h.send(ack), CORE)] == ["ACK"], n
    assert [m.method for m in to(h.bye(1, to_tag="e9"), CORE)] == ["BYE"]


def _answered_twice(h: PolicyHarness) -> None:
    """Call 1 answered by two forks of the core (tags e1, then e2), each 200 ACKed."""
    _, fwd = h.call(1)
    assert fwd is not None
    for n in (1, 2):
        h.send(answer(fwd, 200, "OK", to_tag=f"e{n}"), src=CORE)
        ack = in_dialog("ACK", call_id="call-1", cseq=1, branch=f"z9hG4bK-a{n}", to_tag=f"e{n}")
        assert [m.method for m in to(h.send(ack), CORE)] == ["ACK"], n


def test_a_call_answered_by_two_forks_lasts_while_either_leg_does() -> None:
    """A forking core's ring group answers twice (RFC 3261 §13.2.2.4: the caller ACKs both and
    hangs up the one it does not keep). Hanging up the first answer keeps the call, its slot
    held, on the second leg: that leg's INFO and BYE go on (not 481), and its BYE ends the
    call. Hanging up the second leg first leaves the call as it was; the core's BYE of a leg
    counts the same."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    _answered_twice(h)
    h.bye(1, to_tag="e1")
    assert h.ended() == [] and h.count("caller", "+12125550100") == 1
    assert [e for e in h.events if getattr(e, "kind", "") == "call_kept_on_fork"]
    assert h.call(2)[1] is None  # the slot is still held: per_caller 1
    info = in_dialog("INFO", call_id="call-1", cseq=3, branch="z9hG4bK-i2", to_tag="e2")
    assert [m.method for m in to(h.send(info), CORE)] == ["INFO"]
    stale = in_dialog("INFO", call_id="call-1", cseq=4, branch="z9hG4bK-i1", to_tag="e1")
    assert [m.status for m in to(h.send(stale), CALLER)] == [481]  # the leg that ended
    h.bye(1, cseq=5, to_tag="e2")
    assert h.ended() == ["bye_caller"] and h.count("caller", "+12125550100") == 0

    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    _answered_twice(h)
    h.bye(1, to_tag="e2")  # the extra answer hung up: the call is the first leg's
    assert h.ended() == [] and h.count("caller", "+12125550100") == 1
    core_bye = in_dialog("BYE", call_id="call-1", cseq=7, branch="z9hG4bK-cb", to_tag="e1",
                         from_callee=True)
    h.send(core_bye, src=CORE)
    assert h.ended() == ["bye_callee"] and h.count("caller", "+12125550100") == 0


def _leg_byes(out: list[tuple[Flow, Message]]) -> list[tuple[str, str]]:
    """(where, the core side's tag) of each BYE sipguard sent: to the core (To tag) or to
    the caller (From tag)."""
    return sorted(("core", m.to_tag or "") if f.addr == CORE else ("caller", m.from_tag or "")
                  for f, m in out if m.method == "BYE")


def test_ending_a_forked_call_at_once_ends_every_answered_leg() -> None:
    """end_calls (and so the lifetime, a drain) on a call two forks answered: a BYE each way
    in each leg — and, once the call is kept on the second leg, in that leg."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    _answered_twice(h)
    n = h.core.end_calls(lambda number: number == "+12125550100", "suspended", h.now)
    assert n == 1 and _leg_byes(h._drain()) == [("caller", "e1"), ("caller", "e2"),
                                                 ("core", "e1"), ("core", "e2")]
    assert h.count("caller", "+12125550100") == 0
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    _answered_twice(h)
    h.bye(1, to_tag="e1")
    n = h.core.end_calls(lambda number: number == "+12125550100", "suspended", h.now)
    assert n == 1 and _leg_byes(h._drain()) == [("caller", "e2"), ("core", "e2")]


def test_a_forked_call_kept_on_a_leg_acked_only_there_lives_on() -> None:
    """The caller's ACK of the first answer is lost, the second leg's passes; it hangs up the
    first and keeps the second: no ack_timeout 64*T1 on (an ACK of any answered leg counts)."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    _, fwd = h.call(1)
    assert fwd is not None
    for n in (1, 2):
        h.send(answer(fwd, 200, "OK", to_tag=f"e{n}"), src=CORE)
    h.send(in_dialog("ACK", call_id="call-1", cseq=1, branch="z9hG4bK-a2", to_tag="e2"))
    h.bye(1, to_tag="e1")
    h.advance(40.0)
    assert h.ended() == [] and h.count("caller", "+12125550100") == 1


def test_a_forked_call_kept_on_a_leg_never_acked_ends_64_t1_on() -> None:
    """The caller ACKs the first answer only, then hangs it up; the core never ends the
    second leg. The call kept on that leg, whose 2xx nobody ACKed, ends as an un-ACKed call
    does: 64*T1 on, a BYE each way in that leg, the slot free (it was held for the call's
    whole lifetime, 4 h). An ACK of the second leg coming late keeps the call."""
    for late_ack in (False, True):
        h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
        _, fwd = h.call(1)
        assert fwd is not None
        h.send(answer(fwd, 200, "OK", to_tag="e1"), src=CORE)
        h.send(in_dialog("ACK", call_id="call-1", cseq=1, branch="z9hG4bK-a1", to_tag="e1"))
        h.send(answer(fwd, 200, "OK", to_tag="e2"), src=CORE)
        h.bye(1, to_tag="e1")
        assert h.ended() == [] and h.count("caller", "+12125550100") == 1
        if late_ack:
            h.send(in_dialog("ACK", call_id="call-1", cseq=1, branch="z9hG4bK-a2", to_tag="e2"))
        out = h.advance(40.0)
        if late_ack:
            assert h.ended() == [] and h.count("caller", "+12125550100") == 1
            continue
        assert h.ended() == ["ack_timeout"] and h.count("caller", "+12125550100") == 0
        assert sorted(set(_leg_byes(out))) == [("caller", "e2"), ("core", "e2")]  # (and resent)


def test_one_legs_unanswered_bye_or_failed_keepalive_ends_that_leg_only() -> None:
    """The caller's BYE of the first leg gets no answer: after Timer F sipguard asks the core
    in that leg, and its 481 ends that leg, not the call kept up by the second. With
    keep-alives on, the caller answering 481 in the first leg (it hung it up; the core has
    not answered the BYE yet) ends that leg — a BYE to the core in it — not the call."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    _answered_twice(h)
    h.bye(1, to_tag="e1", answered=False)
    asked = [m for f, m in h.advance(33.0) if m.method == "OPTIONS" and f.addr == CORE]
    assert {m.to_tag for m in asked} == {"e1"}, asked  # (and its retransmissions)
    h.send(answer(asked[0], 481, "Call/Transaction Does Not Exist"), src=CORE)
    assert h.ended() == [] and h.count("caller", "+12125550100") == 1
    h.bye(1, cseq=3, to_tag="e2")
    assert h.ended() == ["bye_caller"]

    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n", dialog_keepalive=30.0)
    _answered_twice(h)
    [slow] = [m for m in to(h.bye(1, to_tag="e1", answered=False), CORE) if m.method == "BYE"]
    out = h.advance(30.0)
    [to_caller] = [m for f, m in out if m.method == "OPTIONS" and f.addr == CALLER]
    [to_core] = [m for f, m in out if m.method == "OPTIONS" and f.addr == CORE]
    assert to_caller.from_tag == "e1" and to_core.to_tag == "e1"
    h.send(answer(to_core, 200, "OK"), src=CORE)  # the core's BYE answer is what is slow
    out = h.send(answer(to_caller, 481, "Call/Transaction Does Not Exist"), src=CALLER)
    assert _leg_byes(out) == [("core", "e1")]
    assert h.ended() == [] and h.count("caller", "+12125550100") == 1
    h.send(answer(slow, 200, "OK"), src=CORE)  # the BYE's answer at last: that leg is over
    assert h.ended() == [] and h.count("caller", "+12125550100") == 1
    out = h.advance(30.0)  # the keep-alive goes on, in the kept leg
    assert {(f.addr == CORE, m.to_tag if f.addr == CORE else m.from_tag)
            for f, m in out if m.method == "OPTIONS"} == {(False, "e2"), (True, "e2")}


def test_a_resent_2xx_of_an_ended_leg_brings_it_not_back() -> None:
    """The caller hangs up the second leg; the core resends that leg's 200 (its ACK lost):
    the leg stays ended — the first leg's BYE then ends the call and frees its slot."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    _, fwd = h.call(1)
    assert fwd is not None
    for n in (1, 2):
        h.send(answer(fwd, 200, "OK", to_tag=f"e{n}"), src=CORE)
        h.send(in_dialog("ACK", call_id="call-1", cseq=1, branch=f"z9hG4bK-a{n}",
                         to_tag=f"e{n}"))
    h.bye(1, to_tag="e2")
    h.send(answer(fwd, 200, "OK", to_tag="e2"), src=CORE)  # resent
    h.bye(1, cseq=3, to_tag="e1")
    assert h.ended() == ["bye_caller"] and h.count("caller", "+12125550100") == 0


def test_a_late_answer_to_a_keepalive_in_an_ended_leg_ends_nothing() -> None:
    """Keep-alives on: sipguard's OPTIONS in the first leg crosses the caller's BYE of that
    leg; the call is kept on the second; the caller's 481 to that OPTIONS comes after — it
    ends nothing (no BYE in the second leg, the slot held)."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n", dialog_keepalive=30.0)
    _answered_twice(h)
    out = h.advance(30.0)
    [to_caller] = [m for f, m in out if m.method == "OPTIONS" and f.addr == CALLER]
    h.bye(1, to_tag="e1")
    out = h.send(answer(to_caller, 481, "Call/Transaction Does Not Exist"), src=CALLER)
    assert _leg_byes(out) == []
    assert h.ended() == [] and h.count("caller", "+12125550100") == 1


def test_in_dialog_requests_of_a_call_go_on_past_the_byte_budget_only_a_quarter() -> None:
    """sip.max_transaction_bytes full: a request within a call in progress still goes on, up
    to a quarter more bytes; beyond, it hears 503 too — one call cannot hold unbounded bytes."""
    h = PolicyHarness()
    up(h)
    h.proxy.settings = dataclasses.replace(h.proxy.settings, max_transaction_bytes=40_000)
    pad = "X-Pad: " + "p" * 9000 + "\r\n"
    statuses = []
    for n in range(8):
        out = h.send(in_dialog("INFO", call_id="call-1", cseq=2 + n, branch=f"z9hG4bK-p{n}",
                               extra=pad))
        statuses.append("core" if to(out, CORE) else to(out, CALLER)[0].status)
    assert statuses[:4] == ["core"] * 4 and statuses[-1] == 503, statuses
    assert h.proxy.held_bytes <= 50_000


def test_one_calls_requests_hold_no_more_than_the_calls_own_allowance() -> None:
    """sip.max_call_request_bytes: a caller's large INFOs within its call go on until the
    bytes their live transactions hold would pass it; the next hears 503 + Retry-After
    (dropped limit_call_bytes) and reaches no core, the call's BYE still goes on, another
    call's requests are not held back, and once those transactions end (32 s after their
    answers) the call's allowance is back."""
    h = PolicyHarness()
    up(h, 1)
    up(h, 2)
    h.proxy.settings = dataclasses.replace(h.proxy.settings, max_call_request_bytes=30_000)
    pad = "X-Pad: " + "p" * 9000 + "\r\n"

    def info(n: int, cseq: int) -> list[tuple[Flow, Message]]:
        out = h.send(in_dialog("INFO", call_id=f"call-{n}", cseq=cseq,
                               branch=f"z9hG4bK-i{n}-{cseq}", extra=pad))
        for m in to(out, CORE):
            out += h.send(answer(m, 200, "OK"), src=CORE)
        return out

    statuses = []
    for cseq in range(2, 6):
        out = info(1, cseq)
        statuses.append(to(out, CALLER)[-1].status)
        if to(out, CALLER)[-1].status == 503:
            assert not to(out, CORE)
            assert to(out, CALLER)[-1].get("retry-after")
    assert statuses == [200, 200, 200, 503], statuses
    dropped = [e for e in h.events if isinstance(e, Dropped)]
    assert [e.kind for e in dropped] == ["limit_call_bytes"], dropped
    assert to(info(2, 2), CALLER)[-1].status == 200  # another call: its own allowance
    [bye] = [m for m in to(h.bye(1, cseq=9, extra=pad), CORE) if m.method == "BYE"]
    assert bye.method == "BYE"
    h.advance(33.0)
    assert [to(info(2, c), CALLER)[-1].status for c in range(3, 6)] == [200] * 3
    assert h.proxy.held_bytes < 40_000


@pytest.mark.parametrize("contact", ['"Sales Queue" <sip:core@10.0.0.10:5080>',
                                     "Agent <sip:core@10.0.0.10:5080>",
                                     '"A <1>" <sip:core@10.0.0.10:5080>;expires=60'])
def test_a_display_name_in_the_cores_contact_is_no_target(contact: str) -> None:
    """The core's 2xx names its Contact with a display name (RFC 3261 §20.10): the target is
    the URI inside the brackets — the caller's requests naming it go on untouched."""
    h = PolicyHarness()
    _, fwd = h.call(1)
    assert fwd is not None
    h.send(answer(fwd, 200, "OK").replace(b"Contact: <sip:core@10.0.0.10:5080>",
                                          f"Contact: {contact}".encode()), src=CORE)
    before = len(h.events)
    for method, cseq in (("ACK", 1), ("INFO", 2)):
        [sent] = [m for m in to(h.send(in_dialog(method, call_id="call-1", cseq=cseq,
                                                 branch=f"z9hG4bK-d{cseq}")), CORE)
                  if m.method == method]
        assert sent.start_line == f"{method} sip:core@10.0.0.10:5080 SIP/2.0".encode()
    assert not [e for e in h.events[before:] if getattr(e, "kind", "") == "in_dialog_rerouted"]


def test_early_dialogs_follow_a_later_1xx_and_an_update_that_moves_the_target() -> None:
    """In an early dialog the caller's PRACK goes to the Contact of the latest 1xx of that
    tag, and an UPDATE answered 2xx (either side's, RFC 3311 §5.1) moves the target on."""
    h = PolicyHarness()
    _, fwd = h.call(1)
    assert fwd is not None
    h.send(answer(fwd, 180, "Ringing", to_tag="e1"), src=CORE)
    h.send(answer(fwd, 183, "Session Progress", to_tag="e1").replace(
        b"sip:core@10.0.0.10:5080", b"sip:media@10.0.0.10:5080"), src=CORE)

    def target_of(method: str, cseq: int) -> bytes:
        data = in_dialog(method, call_id="call-1", cseq=cseq, branch=f"z9hG4bK-u{cseq}",
                         to_tag="e1")
        [sent] = [m for m in to(h.send(data), CORE) if m.method == method]
        return sent.start_line.split()[1]

    assert target_of("PRACK", 2) == b"sip:media@10.0.0.10:5080"
    out = h.send(in_dialog("UPDATE", call_id="call-1", cseq=7, branch="z9hG4bK-cu",
                           from_callee=True, to_tag="e1",
                           extra="Contact: <sip:moved@10.0.0.11:5080>\r\n"), src=CORE)
    [update] = [m for m in to(out, CALLER) if m.method == "UPDATE"]
    h.send(answer(update, 200, "OK", to_tag=None))
    assert target_of("UPDATE", 3) == b"sip:moved@10.0.0.11:5080"


def test_a_bye_for_another_fork_of_a_forking_core_ends_nothing() -> None:
    """A forking core answers twice (tags ttag9, then fork2); both 200s reach the caller,
    which keeps the first and hangs up the second (RFC 3261 §13.2.2.4): that BYE goes to the
    core, the call and its slot stay, and the first dialog's BYE ends them."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    fwd = up(h)
    out = h.send(answer(fwd, 200, "OK", to_tag="fork2"), src=CORE)
    assert [m.status for m in to(out, CALLER)] == [200]
    out = h.send(in_dialog("BYE", call_id="call-1", cseq=2, branch="z9hG4bK-f2",
                           to_tag="fork2"))
    [bye] = [m for m in to(out, CORE) if m.method == "BYE"]
    h.send(answer(bye, 200, "OK", to_tag=None), src=CORE)
    assert h.count("caller", "+12125550100") == 1 and h.ended() == []
    h.bye(1, cseq=3)
    assert h.count("caller", "+12125550100") == 0 and h.ended() == ["bye_caller"]


def test_a_subscription_is_record_routed_and_its_refresh_hears_481() -> None:
    """An allowed SUBSCRIBE reaches the core with sipguard's Record-Route (the core's NOTIFYs
    come back through sipguard to a party behind NAT); sipguard keeps dialogs for calls only,
    so the subscriber's in-dialog refresh hears 481 and reaches nothing."""
    h = PolicyHarness(allow_methods=frozenset({"INVITE", "OPTIONS", "SUBSCRIBE"}))
    out = h.send(out_of_dialog("SUBSCRIBE", extra="Event: dialog\r\nExpires: 600\r\n"))
    [sub] = [m for m in to(out, CORE) if m.method == "SUBSCRIBE"]
    assert sub.values("record-route") != []
    refresh = in_dialog("SUBSCRIBE", call_id="ood-1", cseq=2, branch="z9hG4bK-sr",
                        extra="Event: dialog\r\nExpires: 600\r\n")
    out = h.send(refresh)
    assert to(out, CORE) == [] and statuses(out) == [481]


def test_a_call_the_core_placed_hears_another_address_of_the_peer_it_went_to() -> None:
    """The core places a call to a carrier (peer networks 203.0.113.50/31), answered from
    .50; the carrier's BYE from its other SBC (.51) speaks for the call, a stranger's does
    not."""
    h = PolicyHarness(extra_yaml="peers:\n  - name: carrier-b\n    networks: [203.0.113.50/31]\n")
    out_call = invite(branch="z9hG4bK-oc1", call_id="out-1", via_host="10.0.0.10:5080",
                      uri="sip:+12125550100@203.0.113.50:5060")
    out = h.send(out_call, src=CORE)
    [leg] = [m for m in to(out, REMOTE) if m.method == "INVITE"]
    h.send(answer(leg, 200, "OK", to_tag="rt1"), src=REMOTE)
    assert len(h.proxy.dialogs) == 1
    bye = (
        b"BYE sip:+18005550199@10.0.0.10:5080 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 203.0.113.51:5060;branch=z9hG4bK-ob1\r\nMax-Forwards: 70\r\n"
        b"From: <sip:+12125550100@203.0.113.50>;tag=rt1\r\n"
        b"To: <sip:+18005550199@198.51.100.7>;tag=ftag1\r\n"
        b"Call-ID: out-1\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n")
    stranger = h.send(bye.replace(b"z9hG4bK-ob1", b"z9hG4bK-ob0"), src=STRANGER)
    assert to(stranger, CORE) == [] and statuses(stranger) == [403]
    out = h.send(bye, src=("203.0.113.51", 5060))
    assert [m.method for m in to(out, CORE)] == ["BYE"]


def test_a_call_the_core_placed_is_answered_by_the_peer_not_by_a_stranger() -> None:
    """The core's INVITE to a carrier (peer networks 203.0.113.50/31) went to .50: a 200 with
    its branch from an unknown source, or from another peer, is dropped (``response_source``)
    and never reaches the core; the carrier's other SBC (.51) may answer for .50."""
    h = PolicyHarness(extra_yaml="peers:\n  - name: carrier-b\n    networks: [203.0.113.50/31]\n"
                      "  - name: carrier-c\n    networks: [203.0.113.60/32]\n")
    out_call = invite(branch="z9hG4bK-oc2", call_id="out-2", via_host="10.0.0.10:5080",
                      uri="sip:+12125550100@203.0.113.50:5060")
    [leg] = [m for m in to(h.send(out_call, src=CORE), REMOTE) if m.method == "INVITE"]
    forged = answer(leg, 200, "OK", to_tag="evil")
    for src in (STRANGER, ("203.0.113.60", 5060)):
        assert to(h.send(forged, src=src), CORE) == []
    assert [e.kind for e in h.events if isinstance(e, Dropped)
            and e.kind == "response_source"] == ["response_source"] * 2
    [dialog] = h.proxy.dialogs.values()
    assert dialog.callee_tag is None  # no answer taken
    out = h.send(answer(leg, 200, "OK", to_tag="rt2"), src=("203.0.113.51", 5060))
    assert [m.status for m in to(out, CORE)] == [200] and dialog.callee_tag == "rt2"


def test_end_calls_cancels_a_suspended_numbers_ringing_calls() -> None:
    """end_calls while a call of the number rings: a CANCEL goes to the core, whose 487
    reaches the caller, and the call ends (reason suspended, slot freed). A second ringing
    call whose 200 crosses that CANCEL gets its 200 through, and once the caller's ACK has
    reached the core, a BYE each way."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 5}\n")
    _, fwd1 = h.call(1)
    _, fwd2 = h.call(2)
    assert fwd1 is not None and fwd2 is not None
    h.answer(fwd1, 180, "Ringing")
    h.answer(fwd2, 180, "Ringing")
    assert h.core.end_calls(lambda number: number == "+12125550100", "suspended", h.now) == 2
    cancels = {m.call_id: m for f, m in h._drain() if f.addr == CORE and m.method == "CANCEL"}
    assert set(cancels) == {"call-1", "call-2"}
    h.send(answer(cancels["call-1"], 200, "OK", to_tag=None), src=CORE)
    assert [m.status for m in h.answer(fwd1, 487, "Request Terminated")] == [487]
    h.send(answer(cancels["call-2"], 200, "OK", to_tag=None), src=CORE)
    out = h.send(answer(fwd2, 200, "OK"), src=CORE)
    assert [(f.addr, m.status) for f, m in out] == [(CALLER, 200)]  # the 2xx goes through
    assert h.ended() == ["suspended"]
    out = h.send(in_dialog("ACK", call_id="call-2", cseq=1, branch="z9hG4bK-a2"))
    assert [(f.addr, m.method) for f, m in out] == [(CORE, "ACK"), (CORE, "BYE"),
                                                    (CALLER, "BYE")] or \
        sorted((f.addr, m.method) for f, m in out) == sorted(
            [(CORE, "ACK"), (CORE, "BYE"), (CALLER, "BYE")])
    assert [m.method for f, m in out][0] == "ACK"  # the core gets its ACK before the BYE
    assert h.ended() == ["suspended", "suspended"]
    assert h.count("caller", "+12125550100") == 0 and h.proxy.doomed == {}


def test_end_calls_matches_the_number_from_shows_behind_an_asserted_caller() -> None:
    """A call whose P-Asserted-Identity names another caller than its From: a suspension of
    the number From shows refuses such calls, so end_calls of that number ends them too (and
    /calls lists them); the asserted caller's own other calls stay up."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 5}\n")
    pai = "P-Asserted-Identity: <sip:+19175550100@198.51.100.7>\r\n"
    _, fwd1 = h.call(1, extra=pai)
    _, fwd2 = h.call(2, caller="+19175550100")
    assert fwd1 is not None and fwd2 is not None
    for n, fwd in ((1, fwd1), (2, fwd2)):
        h.answer(fwd, 200, "OK")
        h.send(in_dialog("ACK", call_id=f"call-{n}", cseq=1, branch=f"z9hG4bK-ack{n}"))
    dialogs = {d.call_id: d for d in h.proxy.dialogs.values()}
    assert (dialogs["call-1"].caller, dialogs["call-1"].shown) == ("+19175550100",
                                                                   "+12125550100")
    assert dialogs["call-2"].shown is None  # From and the caller agree
    assert h.core.end_calls(lambda number: number == "+12125550100", "suspended", h.now) == 1
    byes = [(f.addr, m.call_id) for f, m in h._drain() if m.method == "BYE"]
    assert sorted(byes) == sorted([(CORE, "call-1"), (CALLER, "call-1")])
    assert [d.call_id for d in h.proxy.dialogs.values()] == ["call-2"]


def test_a_cancelled_ringing_call_whose_core_stays_silent_ends_after_64_t1() -> None:
    """end_calls CANCELs a ringing call; the core answers neither the CANCEL nor the INVITE,
    and a 180 after the CANCEL starts no Timer C again: 32 s (64*T1) later the caller hears
    408, the call ends with reason suspended and its slot is free."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 5}\n")
    _, fwd = h.call(1)
    assert fwd is not None
    h.answer(fwd, 180, "Ringing")
    assert h.core.end_calls(lambda number: number == "+12125550100", "suspended", h.now) == 1
    assert [m.method for f, m in h._drain() if f.addr == CORE] == ["CANCEL"]
    h.advance(20)
    h.answer(fwd, 180, "Ringing")  # the core goes on ringing, deaf to the CANCEL
    out = h.advance(12.5)
    assert {m.status for f, m in out if f.addr == CALLER and m.status} == {408}  # (and again)
    assert h.ended() == ["suspended"] and h.count("caller", "+12125550100") == 0


def test_a_bye_of_a_call_without_from_tag_ends_it() -> None:
    """An RFC 2543 caller sends no From tag: its dialog keeps "" as the caller's tag, and its
    BYE (no From tag either) still names the call, ends it and frees the slot."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    out = h.send(invite(branch="z9hG4bK-nt", call_id="call-1").replace(b";tag=ftag1", b""))
    [fwd] = to(out, CORE)
    h.answer(fwd, 200, "OK")
    h.send(in_dialog("ACK", call_id="call-1", cseq=1, branch="z9hG4bK-nta").replace(
        b";tag=ftag1", b""))
    assert h.count("caller", "+12125550100") == 1
    out = h.send(in_dialog("BYE", call_id="call-1", cseq=2, branch="z9hG4bK-ntb").replace(
        b";tag=ftag1", b""))
    [bye] = [m for m in to(out, CORE) if m.method == "BYE"]
    h.send(answer(bye, 200, "OK", to_tag=None), src=CORE)
    assert h.ended() == ["bye_caller"] and h.count("caller", "+12125550100") == 0


def test_another_forks_refresh_moves_that_legs_targets_only() -> None:
    """A forking core answered twice; a re-INVITE on the second fork (To tag fork2) with a new
    Contact, answered 2xx, moves neither target of the first leg: ending the call, the first
    leg's BYEs go to its own targets, the second leg's to the refreshed ones."""
    h = PolicyHarness()
    fwd = up(h)
    h.send(answer(fwd, 200, "OK", to_tag="fork2"), src=CORE)
    out = h.send(in_dialog("INVITE", call_id="call-1", cseq=2, branch="z9hG4bK-f2r",
                           to_tag="fork2",
                           extra="Contact: <sip:+12125550100@198.51.100.7:6001>\r\n"))
    [reinvite] = [m for m in to(out, CORE) if m.method == "INVITE"]
    h.send(answer(reinvite, 200, "OK", to_tag=None).replace(b"sip:core@10.0.0.10:5080",
                                                           b"sip:fork2@10.0.0.10:5080"),
           src=CORE)
    assert h.core.end_calls(lambda number: number == "+12125550100", "suspended", h.now) == 1
    byes = {(f.addr, m.from_tag if f.addr == CALLER else m.to_tag): m.start_line.split()[1]
            for f, m in h._drain() if m.method == "BYE"}
    assert byes == {(CALLER, "ttag9"): b"sip:+12125550100@198.51.100.7:5062",
                    (CORE, "ttag9"): b"sip:core@10.0.0.10:5080",
                    (CALLER, "fork2"): b"sip:+12125550100@198.51.100.7:6001",
                    (CORE, "fork2"): b"sip:fork2@10.0.0.10:5080"}, byes


def test_an_outside_party_that_answers_a_keepalive_481_ends_the_call_at_the_core() -> None:
    """dialog_keepalive 30 s: the caller answers sipguard's OPTIONS 481 (it claims not to
    know the call): the core gets a BYE, so the caller cannot free its slot with a 481 while
    its call goes on there."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n", dialog_keepalive=30.0)
    up(h)
    out = h.advance(30.0)
    [to_caller] = [m for f, m in out if m.method == "OPTIONS" and f.addr == CALLER]
    out = h.send(answer(to_caller, 481, "Call/Transaction Does Not Exist", to_tag=None))
    assert [m.method for m in to(out, CORE) if m.method] == ["BYE"]
    assert h.ended() == ["keepalive_failed"] and h.count("caller", "+12125550100") == 0


def test_monitor_mode_runs_the_rules_for_an_unknown_source_and_a_suspended_number() -> None:
    """Top-level mode: monitor, a rate rule in mode: enforce and concurrency monitored. An
    unknown source's INVITE and a suspended caller's are forwarded (monitored) but the rules
    still run: the rate rule refuses the second call of the caller (503), concurrency's
    objection rides along in also; each INVITE is reported once (no Screened beside its
    decision)."""
    h = PolicyHarness(
        "rules:\n  concurrency: {per_caller: 1}\n"
        "  rate: {mode: enforce, per_caller: {rate: 0.01, burst: 1}}\n",
        extra_yaml="mode: monitor\nsuspended: ['+12125550177']\n" + PEERS)
    _, fwd = h.call(1, src=STRANGER)
    assert fwd is not None
    out, fwd = h.call(2, src=STRANGER)
    assert fwd is None and [m.status for m in out][-1] == 503
    _, fwd = h.call(3, caller="+12125550177")
    assert fwd is not None
    decided = [e.verdict for e in h.events if isinstance(e, InviteDecided)]
    assert [(v.rule, v.reason, v.monitored, [a.rule for a in v.also]) for v in decided] == [
        ("peers", "unknown_source", True, []),
        ("rate", "per_caller", False, ["peers", "concurrency"]),
        ("suspended", "caller_suspended", True, []),
    ]
    assert decided[0].sample == ""  # each such call its own invite_decided line
    assert not [e for e in h.events if isinstance(e, Screened)]
    # refused before any decision (483): reported by the screen, once
    h.send(invite(branch="z9hG4bK-mf0", call_id="call-mf0", max_forwards=0), src=STRANGER)
    screened = [e.verdict for e in h.events if isinstance(e, Screened)]
    assert [(v.rule, v.reason, v.monitored) for v in screened] == [
        ("peers", "unknown_source", True)]
    assert len([e for e in h.events if isinstance(e, InviteDecided)]) == 3


def test_a_dropped_unknown_source_is_logged_without_a_status() -> None:
    """unknown_source: drop sends nothing, so its verdict carries no status to log."""
    h = PolicyHarness(extra_yaml="unknown_source: drop\n" + PEERS)
    out, fwd = h.call(1, src=STRANGER)
    assert fwd is None and out == []
    (screened,) = [e for e in h.events if isinstance(e, Screened)]
    assert screened.verdict.action == "drop" and screened.verdict.status == 0


def _bye_sent_unanswered(h: PolicyHarness) -> Message:
    """Call 1 answered; the caller's BYE reaches the core, which never answers it: 32 s
    later (Timer F) sipguard asks the core with an in-dialog OPTIONS; returns it."""
    up(h)
    out = h.send(in_dialog("BYE", call_id="call-1", cseq=2, branch="z9hG4bK-byeu"))
    assert [m.method for m in to(out, CORE)] == ["BYE"]
    out = h.advance(33)
    asks = [m for m in to(out, CORE) if m.method == "OPTIONS"]
    # one OPTIONS (and its retransmission), in the call
    assert asks and len({m.get("via") for m in asks}) == 1 and asks[0].call_id == "call-1"
    assert h.ended() == []
    assert h.count("caller", "+12125550100") == 1  # not yet: the core may still have it
    return asks[0]


def test_a_bye_the_core_never_answers_ends_the_call_when_the_core_does_not_know_it() -> None:
    """The core's 200 for the caller's BYE is lost and it never answers again (RFC 3261
    §15.1.1: for the caller the call is over): sipguard's OPTIONS hears 481 and the call
    ends, reason bye_unanswered, its slot freed."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    ask = _bye_sent_unanswered(h)
    h.send(answer(ask, 481, "Call/Transaction Does Not Exist", to_tag=None), src=CORE)
    assert h.ended() == ["bye_unanswered"] and h.count("caller", "+12125550100") == 0


def test_a_bye_the_core_drops_frees_no_slot_while_the_core_still_has_the_call() -> None:
    """A BYE the core drops without a word: its OPTIONS answer (200) says the call is up
    there, so the slot stays held (a caller cannot free it with BYEs the core ignores); a
    core that answers nothing at all ends it 32 s later."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    ask = _bye_sent_unanswered(h)
    h.send(answer(ask, 200, "OK", to_tag=None), src=CORE)
    assert h.ended() == [] and h.count("caller", "+12125550100") == 1
    assert h.call(2)[1] is None  # still at its limit
    h2 = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    _bye_sent_unanswered(h2)
    h2.advance(33)  # the OPTIONS unanswered too: the core is gone
    assert h2.ended() == ["bye_unanswered"] and h2.count("caller", "+12125550100") == 0


def test_a_bye_answered_408_ends_the_call() -> None:
    """RFC 3261 §15.1.1: a BYE answered 408 ends the dialog for its sender; sipguard ends
    the call too (reason bye_caller) and frees the slot."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 1}\n")
    up(h)
    out = h.send(in_dialog("BYE", call_id="call-1", cseq=2, branch="z9hG4bK-bye408"))
    [bye] = to(out, CORE)
    out = h.send(answer(bye, 408, "Request Timeout", to_tag=None), src=CORE)
    assert [m.status for m in to(out, CALLER)] == [408]
    assert h.ended() == ["bye_caller"] and h.count("caller", "+12125550100") == 0


PUBLIC = ("44.1.2.5", 5062)  # a caller at a public address (198.51.100/24 is documentation's)


def _core_bye_goes_to(contact: str, n: int,
                      src: tuple[str, int] = PUBLIC) -> list[tuple[str, int]]:
    """Call ``n`` from ``src`` over UDP with ``contact`` as its Contact, answered; then the
    core's BYE to that Contact: where sipguard sends it."""
    h = PolicyHarness()
    data = invite(branch=f"z9hG4bK-c{n}", call_id=f"call-{n}").replace(
        b"Contact: <sip:+12125550100@198.51.100.7:5062>", f"Contact: {contact}".encode())
    fwd = to(h.send(data, src=src), CORE)
    assert fwd, "INVITE not forwarded"
    h.answer(fwd[0], 200, "OK")
    h.send(in_dialog("ACK", call_id=f"call-{n}", cseq=1, branch=f"z9hG4bK-a{n}"), src=src)
    target = contact.strip("<>").split(";")[0]
    bye = in_dialog("BYE", call_id=f"call-{n}", cseq=5, branch=f"z9hG4bK-cb{n}",
                    from_callee=True).replace(b"BYE sip:+12125550100@198.51.100.7:5062 ",
                                              f"BYE {target} ".encode())
    out = h.send(bye, src=CORE)
    return [f.addr for f, m in out if m.method == "BYE"]


def test_the_cores_requests_reach_a_udp_caller_behind_nat_where_it_sends_from() -> None:
    """A UDP caller whose Contact is a private address (behind NAT) or an RFC 5626 ``ob`` URI
    gets the core's BYE at the address and port it sent from; one whose Contact is a public
    address, or its own, at that Contact; one on a private network itself (an SBC pair whose
    Contact names the pair's shared address) at its Contact too."""
    assert _core_bye_goes_to("<sip:+12125550100@192.168.1.20:5060>", 1) == [PUBLIC]
    assert _core_bye_goes_to("<sip:+12125550100@10.1.2.3:5099;transport=udp>", 2) == [PUBLIC]
    assert _core_bye_goes_to("<sip:+12125550100@44.1.2.3:5070;ob>", 3) == [PUBLIC]
    assert _core_bye_goes_to("<sip:+12125550100@44.1.2.3:5070>", 4) == [
        ("44.1.2.3", 5070)]
    assert _core_bye_goes_to("<sip:+12125550100@44.1.2.5:5060>", 5) == [("44.1.2.5", 5060)]
    assert _core_bye_goes_to("<sip:+12125550100@10.0.0.10:5060>", 6,
                             src=("10.0.0.11", 40000)) == [("10.0.0.10", 5060)]


def test_a_caller_behind_nat_whose_port_is_remapped_mid_call_is_followed() -> None:
    """A UDP caller behind NAT whose NAT re-maps the call's flow to another port (a binding
    that timed out during a long call): its in-dialog requests with the call's own tags pass
    from the new port, and the core's requests follow it there. Made-up tags from another
    port, or a caller that is not behind NAT sending from another port, are still refused."""
    h = PolicyHarness()
    data = invite(branch="z9hG4bK-n1", call_id="call-nat").replace(
        b"Contact: <sip:+12125550100@198.51.100.7:5062>",
        b"Contact: <sip:+12125550100@192.168.1.20:5060>")
    fwd = to(h.send(data, src=PUBLIC), CORE)
    assert fwd
    h.answer(fwd[0], 200, "OK")
    h.send(in_dialog("ACK", call_id="call-nat", cseq=1, branch="z9hG4bK-na"), src=PUBLIC)
    remapped = (PUBLIC[0], 61001)
    made_up = in_dialog("INFO", call_id="call-nat", cseq=2, branch="z9hG4bK-n2",
                        to_tag="other")
    out = h.send(made_up, src=remapped)
    assert to(out, CORE) == [] and statuses(out) == [403]
    out = h.send(in_dialog("INFO", call_id="call-nat", cseq=3, branch="z9hG4bK-n3"),
                 src=remapped)
    assert [m.method for m in to(out, CORE)] == ["INFO"]
    assert [e.kind for e in h.events if isinstance(e, Noticed)] == ["nat_rebound"]
    bye = in_dialog("BYE", call_id="call-nat", cseq=5, branch="z9hG4bK-nb",
                    from_callee=True).replace(b"BYE sip:+12125550100@198.51.100.7:5062 ",
                                              b"BYE sip:+12125550100@192.168.1.20:5060 ")
    out = h.send(bye, src=CORE)
    assert [f.addr for f, m in out if m.method == "BYE"] == [remapped]
    # a caller not behind NAT (its Contact its own address) from another port: refused
    h = PolicyHarness()
    up(h)
    out = h.send(in_dialog("INFO", call_id="call-1", cseq=2, branch="z9hG4bK-n4"),
                 src=OTHER_PORT)
    assert to(out, CORE) == [] and statuses(out) == [403]


def test_a_caller_behind_a_record_routing_proxy_is_reached_through_its_route() -> None:
    """A private Contact behind a proxy that record-routes (the INVITE carries its
    Record-Route): the core's BYE follows the route set, whatever the Contact says."""
    h = PolicyHarness()
    data = invite(branch="z9hG4bK-rr1", call_id="call-rr").replace(
        b"Contact: <sip:+12125550100@198.51.100.7:5062>",
        b"Record-Route: <sip:44.1.2.9:5060;lr>\r\nContact: <sip:+12125550100@192.168.1.20>")
    fwd = to(h.send(data), CORE)
    assert fwd
    h.answer(fwd[0], 200, "OK")
    bye = in_dialog("BYE", call_id="call-rr", cseq=5, branch="z9hG4bK-rrb", from_callee=True)
    bye = bye.replace(b"BYE sip:+12125550100@198.51.100.7:5062 ",
                      b"BYE sip:+12125550100@192.168.1.20 ")
    bye = bye.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\r\nRoute: <sip:44.1.2.9:5060;lr>\r\n")
    out = h.send(bye, src=CORE)
    assert [f.addr for f, m in out if m.method == "BYE"] == [("44.1.2.9", 5060)]


def test_a_call_that_came_over_tls_takes_its_requests_over_tls_only() -> None:
    """A caller on TLS: an in-dialog request from its host over plain TCP is refused (no
    downgrade of the transport the call was set up on); over TLS it passes."""
    h = PolicyHarness(locals=(Local(0, "udp", "192.0.2.1", 5060),
                              Local(1, "tls", "192.0.2.1", 5061),
                              Local(2, "tcp", "192.0.2.1", 5060)))
    data = invite(branch="z9hG4bK-t1", call_id="call-tls").replace(
        b"SIP/2.0/UDP", b"SIP/2.0/TLS", 1)
    fwd = to(h.send(data, transport="tls", conn=3), CORE)
    assert fwd
    h.answer(fwd[0], 200, "OK")
    info = in_dialog("INFO", call_id="call-tls", cseq=2, branch="z9hG4bK-t2").replace(
        b"SIP/2.0/UDP", b"SIP/2.0/TCP", 1)
    out = h.send(info, src=(CALLER[0], 40200), transport="tcp", conn=4)
    assert to(out, CORE) == [] and statuses(out) == [403]
    info = in_dialog("INFO", call_id="call-tls", cseq=3, branch="z9hG4bK-t3").replace(
        b"SIP/2.0/UDP", b"SIP/2.0/TLS", 1)
    out = h.send(info, src=(CALLER[0], 40201), transport="tls", conn=5)
    assert [m.method for m in to(out, CORE)] == ["INFO"]
    # with the caller's peer configured: another address of the peer may speak in the call,
    # but over TLS only, as the call came
    h = PolicyHarness(extra_yaml=PEERS, locals=(Local(0, "udp", "192.0.2.1", 5060),
                                                Local(1, "tls", "192.0.2.1", 5061)))
    fwd = to(h.send(data, transport="tls", conn=3), CORE)
    assert fwd
    h.answer(fwd[0], 200, "OK")
    info = in_dialog("INFO", call_id="call-tls", cseq=2, branch="z9hG4bK-p2")
    out = h.send(info, src=("198.51.100.8", 5060))
    assert to(out, CORE) == [] and statuses(out) == [403]


def test_calls_up_keep_their_core_when_a_reload_names_another() -> None:
    """A reload moves ``core`` from A to B with calls up: the caller's in-dialog requests of
    a call set up through A still go to A (its ACK and BYE included), A's own BYE for its
    call is taken as the core's (not refused as an outside source), and new calls go to B."""
    h = PolicyHarness("rules:\n  concurrency: {per_caller: 5}\n")
    up(h, 1)
    up(h, 2)
    core_b = ("10.0.0.20", 5080)
    h.core.proxy.configure(settings(core=Flow("udp", core_b, 0)))
    # call 1, set up through A: the caller's INFO and BYE go to A, the call ends on A's 200
    out = h.send(in_dialog("INFO", call_id="call-1", cseq=2, branch="z9hG4bK-i1"))
    assert [(f.addr, m.method) for f, m in out if m.method] == [(CORE, "INFO")]
    out = h.bye(1, cseq=3)
    assert [(f.addr, m.method) for f, m in out if m.method] == [(CORE, "BYE")]
    assert h.ended() == ["bye_caller"]
    # call 2: core A hangs up; its BYE reaches the caller
    out = h.bye(2, from_callee=True)
    assert [m.method for m in to(out, CALLER) if m.method] == ["BYE"]
    assert [m.status for _, m in out if m.status] == []  # no 403 to core A
    assert h.ended() == ["bye_caller", "bye_callee"]
    # a new call goes to B; a request from A naming no call of A's is an outside source's
    out = h.send(invite(branch="z9hG4bK-c3", call_id="call-3"))
    assert [(f.addr, m.method) for f, m in out if m.method] == [(core_b, "INVITE")]
    stray = in_dialog("BYE", call_id="call-9", cseq=2, branch="z9hG4bK-s9", from_callee=True)
    out = h.send(stray, src=CORE)
    assert to(out, CALLER) == []
    # the core moves to another port of the same host: the calls up still come from the old
    h = PolicyHarness()
    up(h, 1)
    h.core.proxy.configure(settings(core=Flow("udp", (CORE[0], CORE[1] + 1), 0)))
    out = h.bye(1, from_callee=True)
    assert [m.method for m in to(out, CALLER) if m.method] == ["BYE"]


def test_the_ack_of_a_stateless_refusal_is_absorbed_quietly() -> None:
    """An unknown source's INVITE hears a stateless 403; the ACK for it (RFC 3261 §17.1.1.3,
    the 403's To tag) is absorbed without a 'dropped' report — every refused call would
    otherwise count one. An ACK with a made-up To tag is still reported."""
    h = PolicyHarness(extra_yaml=PEERS)
    data = invite(branch="z9hG4bK-st1", call_id="stateless-1").replace(
        b"198.51.100.7:5062", b"203.0.113.5:5060")
    [refusal] = [m for _, m in h.send(data, src=STRANGER) if m.status]
    assert refusal.status == 403
    ack = (f"ACK sip:+18005550199@192.0.2.1:5060;user=phone SIP/2.0\r\n"
           f"Via: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-st1\r\nMax-Forwards: 70\r\n"
           f"From: <sip:+12125550100@198.51.100.7>;tag=ftag1\r\n"
           f"To: <sip:+18005550199@192.0.2.1>;tag={refusal.to_tag}\r\n"
           f"Call-ID: stateless-1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n").encode()
    assert h.send(ack, src=STRANGER) == []
    assert not [e for e in h.events if isinstance(e, Dropped)]
    h.send(ack.replace(refusal.to_tag.encode(), b"made-up"), src=STRANGER)
    assert [e.kind for e in h.events if isinstance(e, Dropped)] == ["ack_refused"]
    # the core's ACK for a stateless answer of sipguard's (a 503 when a table is full) is
    # absorbed too, not sent on to its Request-URI
    core_ack = in_dialog("ACK", call_id="busy-1", cseq=1, branch="z9hG4bK-busy",
                         from_callee=True, to_tag="x")
    tag = h.core.proxy.ids.to_tag(parse_message(core_ack))
    assert h.send(core_ack.replace(b";tag=ftag1", f";tag={tag}".encode()), src=CORE) == []


def test_a_request_the_transport_cannot_deliver_is_answered_at_once() -> None:
    """A TCP next hop that cannot be connected to (the pool hands back what waited for the
    connection): the core's BYE toward a TCP caller whose connection has closed is answered
    500 to the core at once (a 503 would say sipguard is down); a request toward the core
    itself hears 503 (sipguard can serve no call then)."""
    h = PolicyHarness()
    data = invite(branch="z9hG4bK-tc1", call_id="call-tcp").replace(
        b"SIP/2.0/UDP", b"SIP/2.0/TCP", 1)
    fwd = to(h.send(data, transport="tcp", conn=7), CORE)
    assert fwd
    h.answer(fwd[0], 200, "OK")
    bye = in_dialog("BYE", call_id="call-tcp", cseq=5, branch="z9hG4bK-tcb", from_callee=True)
    out = h.send(bye, src=CORE)
    sent = [raw for (f, m), raw in zip(out, h.raw, strict=True) if m.method == "BYE"]
    assert sent and [f.transport for f, m in out if m.method == "BYE"] == ["tcp"]
    assert h.proxy.undelivered(sent, h.now) == 1
    out = h._drain()
    assert [(f.addr, m.status) for f, m in out if m.status] == [(CORE, 500)]
    assert h.proxy.undelivered(sent, h.now) == 0  # answered once
    # toward the core: 503
    h2 = PolicyHarness()
    h2.feed(invite(branch="z9hG4bK-tc2", call_id="call-tcp2"))
    sent = [d for _, d in h2.proxy.outbox if d.startswith(b"INVITE ")]
    assert h2.proxy.undelivered(sent, h2.now) == 1
    assert [m.status for f, m in h2._drain() if f.addr == CALLER and m.status >= 200] == [503]


def test_the_address_sipguard_advertised_before_a_reload_stays_its_own() -> None:
    """A reload that changes the address sipguard writes into Record-Route (a wildcard
    listener advertises its route toward the core, which a new core can change): the calls
    up still name the old one in their Route, which sipguard still takes for its own."""
    h = PolicyHarness()
    up(h)
    moved = (Local(0, "udp", "192.0.2.77", 5060), Local(1, "tcp", "192.0.2.77", 5060))
    h.core.proxy.configure(settings(locals=moved))
    out = h.send(in_dialog("INFO", call_id="call-1", cseq=2, branch="z9hG4bK-adv"))
    [info] = to(out, CORE)
    assert info.get("route") is None  # its own old entry popped, not passed on
    bye = in_dialog("BYE", call_id="call-1", cseq=5, branch="z9hG4bK-advb", from_callee=True)
    assert [m.method for m in to(h.send(bye, src=CORE), CALLER)] == ["BYE"]


def test_a_route_set_naming_sipguard_twice_alike_loses_one_entry_per_pass() -> None:
    """A call that spirals: in from the caller, out again through sipguard to another party
    by a core that does not record-route. The caller's route set names sipguard twice, the
    same URI (two passes), and each pass through sipguard takes off one: the core gets the
    other and sends the request back through sipguard (RFC 3261 §16.4: the first value only).
    Both were taken at once before, and the core sent the caller's ACK and BYE straight to
    the other party: that leg never saw its ACK and was ended after 32 s. Two different URIs
    of sipguard's own (the pair one pass writes when it changes transport, RFC 5658) still go
    together."""
    h = PolicyHarness()
    ours = b"Record-Route: <sip:192.0.2.1:5060;lr>\r\n"
    twice = "<sip:192.0.2.1:5060;lr>, <sip:192.0.2.1:5060;lr>"
    pair = "<sip:192.0.2.1:5060;transport=tcp;lr>, <sip:192.0.2.1:5060;lr>"
    for n, rr in ((1, twice), (2, pair)):
        _, fwd = h.call(n)
        assert fwd is not None  # the core's 2xx records the route set of the spiral
        h.send(answer(fwd, 200, "OK").replace(ours, f"Record-Route: {rr}\r\n".encode()),
               src=CORE)
    route = f"Route: {twice}\r\n"
    info = in_dialog("INFO", call_id="call-1", cseq=2, branch="z9hG4bK-twice").replace(
        b"Route: <sip:192.0.2.1:5060;lr>\r\n", route.encode())
    [sent] = [m for m in to(h.send(info), CORE) if m.method == "INFO"]
    assert sent.values("route") == ["<sip:192.0.2.1:5060;lr>"]
    route = "Route: <sip:192.0.2.1:5060;lr>, <sip:192.0.2.1:5060;transport=tcp;lr>\r\n"
    info = in_dialog("INFO", call_id="call-2", cseq=3, branch="z9hG4bK-pair").replace(
        b"Route: <sip:192.0.2.1:5060;lr>\r\n", route.encode())
    [sent] = [m for m in to(h.send(info), CORE) if m.method == "INFO"]
    assert sent.get("route") is None
    assert not [e for e in h.events if getattr(e, "kind", "") == "in_dialog_rerouted"]


def test_an_untrusted_peers_p_asserted_identity_is_removed_from_every_message() -> None:
    """RFC 3325 §5: a peer with trust_pai: false (or an unknown source) asserts no identity —
    its P-Asserted-Identity never reaches the core: not on an out-of-dialog MESSAGE, not on
    the answers and requests of a call the core placed to it, not on its ACK. A trusted
    peer's stays."""
    h = PolicyHarness(extra_yaml=(
        "peers:\n  - name: intl\n    networks: [198.51.100.0/24]\n    trust_pai: false\n"
        "  - name: home\n    networks: [203.0.113.0/24]\n"), allow_methods=frozenset({"INVITE", "MESSAGE"}))
    pai = "P-Asserted-Identity: <tel:+442071838750>\r\n"

    def message(src: tuple[str, int], branch: str) -> bytes:
        return (
            f"MESSAGE sip:+18005550199@192.0.2.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {src[0]}:{src[1]};branch={branch}\r\nMax-Forwards: 70\r\n"
            f"From: <sip:+12125550100@{src[0]}>;tag=m1\r\nTo: <sip:+18005550199@192.0.2.1>\r\n"
            f"Call-ID: {branch}\r\nCSeq: 1 MESSAGE\r\n{pai}Content-Length: 0\r\n\r\n").encode()

    [untrusted] = to(h.send(message(CALLER, "z9hG4bK-m1")), CORE)
    assert untrusted.method == "MESSAGE" and not untrusted.has("p-asserted-identity")
    [trusted] = to(h.send(message(("203.0.113.9", 5060), "z9hG4bK-m2"), ("203.0.113.9", 5060)),
                   CORE)
    assert trusted.values("p-asserted-identity") == ["<tel:+442071838750>"]
    unknown = ("192.0.2.77", 5060)  # an answer from a source that is no peer
    for remote, tag in ((CALLER, "rt1"), (unknown, "rt2")):
        inv = invite(branch=f"z9hG4bK-o{tag}", call_id=f"out-{tag}", via_host="10.0.0.10:5080",
                     uri=f"sip:+12125550100@{remote[0]}:{remote[1]}")
        [sent] = [m for m in to(h.send(inv, src=CORE), remote) if m.method == "INVITE"]
        ringing = to(h.send(answer(sent, 180, "Ringing", to_tag=tag, extra=pai), src=remote), CORE)
        ok = to(h.send(answer(sent, 200, "OK", to_tag=tag, extra=pai), src=remote), CORE)
        assert [m.status for m in ringing + ok] == [180, 200]
        assert not any(m.has("p-asserted-identity") for m in ringing + ok)
        bye = (
            f"BYE sip:x@10.0.0.10:5080 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {remote[0]}:{remote[1]};branch=z9hG4bK-b{tag}\r\n"
            f"Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\n"
            f"From: <sip:+12125550100@{remote[0]}>;tag={tag}\r\n"
            f"To: <sip:+18005550199@10.0.0.10>;tag=ftag1\r\n"
            f"Call-ID: out-{tag}\r\nCSeq: 2 BYE\r\n{pai}Content-Length: 0\r\n\r\n").encode()
        [fwd] = [m for m in to(h.send(bye, src=remote), CORE) if m.method == "BYE"]
        assert not fwd.has("p-asserted-identity")
    # the ACK of a call from the untrusted peer
    inbound = [m for m in to(h.send(invite(call_id="in-1", branch="z9hG4bK-i1")), CORE)
               if m.method == "INVITE"][0]
    h.send(answer(inbound, 200, "OK"), src=CORE)
    [ack] = to(h.send(in_dialog("ACK", call_id="in-1", cseq=1, branch="z9hG4bK-a1", extra=pai)),
               CORE)
    assert ack.method == "ACK" and not ack.has("p-asserted-identity")
    # mode: monitor lets an unknown source's call through, but not its assertion
    watching = PolicyHarness(extra_yaml="mode: monitor\n" + PEERS)
    stranger = ("192.0.2.77", 5062)
    out = watching.send(invite(via_host="192.0.2.77:5062", extra=pai), src=stranger)
    [fwd] = [m for m in to(out, CORE) if m.method == "INVITE"]
    assert not fwd.has("p-asserted-identity")


def test_a_udp_core_switching_to_tcp_for_a_large_message_is_the_core_with_any_port() -> None:
    """RFC 3261 §18.1.1: a UDP core sends a request over 1,300 bytes over TCP, from a port of
    its own. With sip.core_tcp_any_port it is the core's (a call it places goes out); without,
    an outside source (with peers configured: unknown, 403). UDP from the core's address on
    another port stays an outside source either way (a datagram's source can be forged)."""
    big = invite(branch="z9hG4bK-big", call_id="big-1", via_host="10.0.0.10:5080",
                 uri="sip:+447700900123@203.0.113.50:5060", extra="X-Pad: " + "p" * 1400 + "\r\n")
    for any_port, expected in ((True, ["INVITE"]), (False, [])):
        h = PolicyHarness(extra_yaml=PEERS, core_tcp_any_port=any_port)
        out = h.send(big, src=("10.0.0.10", 40123), transport="tcp", conn=7)
        assert [m.method for f, m in out if f.addr == ("203.0.113.50", 5060)] == expected
        out = h.send(big.replace(b"big-1", b"big-2").replace(b"z9hG4bK-big", b"z9hG4bK-big2"),
                     src=("10.0.0.10", 40124))
        assert [m.method for f, m in out if f.addr == ("203.0.113.50", 5060)] == []


def test_a_callers_later_request_asserting_another_number_loses_its_pai() -> None:
    """A call checked as +12125550100: the caller's re-INVITE / UPDATE asserting another
    number (a core may take it for the caller's new identity) — or a display name showing
    one — goes on without its P-Asserted-Identity; the checked number stays, in E.164, with
    00, or in the national spelling its peer's default_region reads (US here, RU's 8…)."""
    for region, caller, values in (
        (None, "+12125550100", (("<tel:+13125550111>", False),
                                ('"Bank" <sip:+13125550111@x.example>', False),
                                ("<tel:+2125550100>", False),  # Morocco's, not the caller
                                ("<sip:+25550100@x.example;user=phone>", False),
                                ('"+1 900 555 0199" <sip:+12125550100@x.example>', False),
                                ("<tel:+12125550100>", True),
                                ("<sip:0012125550100@x.example>", True),
                                ('"212-555-0100" <sip:+12125550100@x.example>', True),
                                ("<sip:2125550100@x.example;user=phone>", False))),
        ("US", "+12125550100", (("<sip:2125550100@x.example;user=phone>", True),
                                ("<sip:3125550111@x.example;user=phone>", False))),
        ("RU", "+74951234567", (("<sip:84951234567@x.example;user=phone>", True),
                                ("<sip:84951234568@x.example;user=phone>", False))),
    ):
        peers = PEERS + (f"    default_region: {region}\n" if region else "")
        h = PolicyHarness(extra_yaml=peers)
        [fwd] = [m for m in to(h.send(invite(call_id="re-1", branch="z9hG4bK-re1", caller=caller)),
                               CORE) if m.method == "INVITE"]
        h.send(answer(fwd, 200, "OK"), src=CORE)
        for n, (value, kept) in enumerate(values):
            update = in_dialog("UPDATE", call_id="re-1", cseq=2 + n, branch=f"z9hG4bK-up{n}",
                               caller=caller, extra=f"P-Asserted-Identity: {value}\r\n")
            [sent] = [m for m in to(h.send(update), CORE) if m.method == "UPDATE"]
            assert sent.has("p-asserted-identity") == kept, (region, value)


def test_a_callers_answer_asserting_another_number_loses_its_pai() -> None:
    """The core's re-INVITE to the caller of a call that came in: the caller's 200 asserting
    another number goes to the core without its P-Asserted-Identity (a core may update the
    connected identity from it) — also with its To tag changed so that it names no dialog,
    and a second value of another number or a number-like one is dropped; the checked number
    stays. A status line in lower case leaves upper-case."""
    h = PolicyHarness(extra_yaml=PEERS)
    [fwd] = [m for m in to(h.send(invite(call_id="ans-1", branch="z9hG4bK-an1")), CORE)
             if m.method == "INVITE"]
    h.send(answer(fwd, 200, "OK"), src=CORE)
    cases = (('"FBI" <sip:+19005550199@x.example;user=phone>', "ftag1", None),
             ('"FBI" <sip:+19005550199@x.example;user=phone>', "other", None),
             ('<tel:+12125550100>, "FBI" <tel:+19005550199>', "ftag1", "<tel:+12125550100>"),
             ("<sip:+19005550199#@x.example>, <tel:+12125550100>", "ftag1", "<tel:+12125550100>"),
             ("<tel:+12125550100>", "ftag1", "<tel:+12125550100>"))
    for n, (value, tag, kept) in enumerate(cases):
        reinvite = in_dialog("INVITE", call_id="ans-1", cseq=10 + n, branch=f"z9hG4bK-cr{n}",
                             from_callee=True)
        [sent] = [m for m in to(h.send(reinvite, src=CORE), CALLER) if m.method == "INVITE"]
        ok = answer(sent, 200, "OK", extra=f"P-Asserted-Identity: {value}\r\n").replace(
            b"Contact: <sip:core@10.0.0.10:5080>", b"Contact: <sip:+12125550100@198.51.100.7:5062>"
        ).replace(b";tag=ftag1", f";tag={tag}".encode()).replace(b"SIP/2.0 200", b"sip/2.0 200")
        [back] = [m for m in to(h.send(ok), CORE) if m.status == 200]
        assert back.values("p-asserted-identity") == ([kept] if kept else []), value
        assert back.start_line.startswith(b"SIP/2.0 200")


def test_a_withheld_callers_answers_are_anonymised_too() -> None:
    """national_cli anonymised the call (its caller withheld from the core): the caller's
    answer to the core's UPDATE loses its PAI and Remote-Party-ID, and its Contact names
    no number — as its own requests do."""
    h = PolicyHarness("rules:\n  national_cli: {home_countries: ['1'], fixed: anonymise, "
                      "mobile: anonymise}\n",
                      extra_yaml=PEERS + "    interconnect: international\n")
    [fwd] = [m for m in to(h.send(invite(call_id="anon-1", branch="z9hG4bK-ano")), CORE)
             if m.method == "INVITE"]
    assert "anonymous" in (fwd.get("from") or "")
    h.send(answer(fwd, 200, "OK"), src=CORE)
    update = in_dialog("UPDATE", call_id="anon-1", cseq=7, branch="z9hG4bK-cu", from_callee=True)
    [sent] = [m for m in to(h.send(update, src=CORE), CALLER) if m.method == "UPDATE"]
    ok = answer(sent, 200, "OK", extra="P-Asserted-Identity: <tel:+12125550100>\r\n"
                "Remote-Party-ID: <sip:+12125550100@198.51.100.7>;party=calling\r\n").replace(
        b"Contact: <sip:core@10.0.0.10:5080>", b"Contact: <sip:+12125550100@198.51.100.7:5062>")
    [back] = [m for m in to(h.send(ok), CORE) if m.status == 200]
    assert not back.has("p-asserted-identity") and not back.has("remote-party-id")
    assert "12125550100" not in (back.get("contact") or "")

def test_a_tls_core_is_never_plain_tcp_whatever_any_port_says() -> None:
    """sip.core_tcp_any_port takes a stream from the core's address as the core's — over the
    core's own transport, or TCP/TLS beside a UDP core; a tls:// core's plain TCP is not it
    (that would let a downgraded connection speak as the core)."""

    tls_core, udp_core = Flow("tls", CORE, 1), Flow("udp", CORE, 0)
    other_port = ("10.0.0.10", 40000)
    assert flow_is_core(Flow("tls", other_port, 1, 3), tls_core, True)
    assert not flow_is_core(Flow("tcp", other_port, 1, 3), tls_core, True)
    assert flow_is_core(Flow("tcp", other_port, 1, 3), udp_core, True)
    assert not flow_is_core(Flow("tcp", other_port, 1, 3), udp_core, False)
    assert not flow_is_core(Flow("udp", other_port, 0), udp_core, True)


def test_an_answer_from_outside_loses_sipguards_headers_and_strip_headers() -> None:
    """As on requests: the caller's answer to the core's UPDATE loses sipguard's own headers
    and those of sip.strip_headers (Remote-Party-ID, P-Preferred-Identity: the documented way
    to keep them from the core)."""
    h = PolicyHarness(extra_yaml=PEERS, strip_headers=frozenset(
        {"x-sipguard-verdict", "x-sipguard-identity", "remote-party-id", "p-preferred-identity"}))
    [fwd] = [m for m in to(h.send(invite(call_id="st-1", branch="z9hG4bK-st1")), CORE)
             if m.method == "INVITE"]
    h.send(answer(fwd, 200, "OK"), src=CORE)
    update = in_dialog("UPDATE", call_id="st-1", cseq=7, branch="z9hG4bK-su", from_callee=True)
    [sent] = [m for m in to(h.send(update, src=CORE), CALLER) if m.method == "UPDATE"]
    ok = answer(sent, 200, "OK", extra="Remote-Party-ID: <sip:+19005550199@x>;party=calling\r\n"
                "P-Preferred-Identity: <sip:+19005550199@x>\r\nX-Sipguard-Verdict: callerid.ok\r\n"
                "X-Sipguard-Identity: TN-Validation-Passed;attest=A\r\n")
    [back] = [m for m in to(h.send(ok), CORE) if m.status == 200]
    assert not any(back.has(n) for n in ("remote-party-id", "p-preferred-identity",
                                         "x-sipguard-verdict", "x-sipguard-identity"))
    # a verstat the caller wrote goes, as on its requests; strip_headers naming PAI holds
    # for two values too
    for n, (strip, value, kept) in enumerate((
            (False, "<tel:+12125550100;verstat=TN-Validation-Passed>", ["<tel:+12125550100>"]),
            (True, "<tel:+12125550100>, <tel:+19005550199>", []))):
        names = {"x-sipguard-verdict", "x-sipguard-identity"} | (
            {"p-asserted-identity"} if strip else set())
        h2 = PolicyHarness(extra_yaml=PEERS, strip_headers=frozenset(names))
        [fwd] = [m for m in to(h2.send(invite(call_id=f"vs-{n}", branch=f"z9hG4bK-vs{n}")), CORE)
                 if m.method == "INVITE"]
        h2.send(answer(fwd, 200, "OK"), src=CORE)
        update = in_dialog("UPDATE", call_id=f"vs-{n}", cseq=7, branch=f"z9hG4bK-vu{n}",
                           from_callee=True)
        [sent] = [m for m in to(h2.send(update, src=CORE), CALLER) if m.method == "UPDATE"]
        [back] = [m for m in to(h2.send(answer(sent, 200, "OK",
                                               extra=f"P-Asserted-Identity: {value}\r\n")), CORE)
                  if m.status == 200]
        assert back.values("p-asserted-identity") == kept, value


def test_a_request_the_core_never_answers_is_noticed() -> None:
    """An OPTIONS (a trunk's ping with a user part) the core never answers: no 408 upstream
    (RFC 4320), but at Timer F a Noticed no_answer (counted, logged) — before, nothing said
    that the core was silent while the pinging trunk heard nothing."""
    h = PolicyHarness()
    ping = out_of_dialog("OPTIONS", call_id="ping-1").replace(
        b"203.0.113.5", CALLER[0].encode())
    out = h.send(ping)
    assert [m.method for m in to(out, CORE)] == ["OPTIONS"]
    h.advance(33.0)
    assert [(e.kind, e.detail) for e in h.events if isinstance(e, Noticed)] == [
        ("no_answer", "OPTIONS ping-1")]
