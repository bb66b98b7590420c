"""The RFC 3261 proxy core in memory: bytes in, bytes and events out, a fake clock."""

from __future__ import annotations

import pytest

from sipguard.contract import (
    CallInfo,
    DialogEnded,
    DialogStarted,
    Dropped,
    Flow,
    InviteDecided,
    Local,
    Verdict,
)
from tests.unit.dialog_helpers import in_dialog
from tests.unit.proxy_helpers import (
    CALLER,
    CORE,
    Harness,
    answer,
    invite,
    reject_all,
    settings,
)


def _to(out, addr):  # type: ignore[no-untyped-def]
    return [m for f, m in out if f.addr == addr]


def test_invite_gets_100_and_is_forwarded_with_via_rr_and_max_forwards() -> None:
    """An initial INVITE is answered 100 at once and forwarded to the core with our edits."""
    h = Harness()
    out = h.send(invite())
    trying = _to(out, CALLER)
    assert [m.status for m in trying] == [100]
    fwd = _to(out, CORE)
    assert len(fwd) == 1
    req = fwd[0]
    assert req.method == "INVITE"
    assert req.top_via.branch and req.top_via.branch.startswith("z9hG4bKsg")
    assert req.top_via.host == "192.0.2.1"
    assert len(req.vias) == 2 and req.vias[1].branch == "z9hG4bK-caller-1"
    assert req.max_forwards == 69
    assert req.values("record-route") == ["<sip:192.0.2.1:5060;lr>"]
    raw = h.raw[1]
    assert b"\r\nX-Custom:   kept   exactly\r\n" in raw
    assert req.body.startswith(b"v=0")


def test_response_with_vias_in_one_line_loses_ours_and_keeps_the_rest_as_sent() -> None:
    """RFC 3261 §16.7 step 3: a core that puts every Via in one comma-separated line gets the
    line back upstream without sipguard's value; the others byte for byte, spacing too."""
    h = Harness()
    req = _to(h.send(invite()), CORE)[0]
    ours, caller = req.values("via")
    line = f"Via: {ours} ,  {caller} , SIP/2.0/UDP 203.0.113.9;branch=z9hG4bK-x\r\n"
    resp = answer(req, 180, "Ringing").replace(
        f"Via: {ours}\r\nVia: {caller}\r\n".encode(), line.encode())
    assert line.encode() in resp
    up = _to(h.send(resp, src=CORE), CALLER)
    assert [m.status for m in up] == [180]
    assert up[0].values("via") == [f"{caller} , SIP/2.0/UDP 203.0.113.9;branch=z9hG4bK-x"]
    rest = f"Via: {caller} , SIP/2.0/UDP 203.0.113.9;branch=z9hG4bK-x\r\n"
    assert h.raw[0] == resp.replace(line.encode(), rest.encode())  # the rest byte for byte


def test_retransmitted_invite_never_reaches_core_twice() -> None:
    """INVITE retransmissions are absorbed by the server transaction."""
    h = Harness()
    h.send(invite())
    for _ in range(3):
        out = h.send(invite())
        assert _to(out, CORE) == []
        assert [m.status for m in _to(out, CALLER)] == [100]


def test_invite_without_max_forwards_gets_70() -> None:
    """A request without Max-Forwards is forwarded with Max-Forwards: 70 (RFC 3261 §16.6)."""
    h = Harness()
    fwd = _to(h.send(invite(max_forwards=None)), CORE)[0]
    assert fwd.max_forwards == 70


def test_full_call_flows_both_ways_and_dialog_ends_on_bye() -> None:
    """180/200 go back without our Via, ACK and BYE follow the Record-Route, dialog ends once."""
    h = Harness()
    req = _to(h.send(invite()), CORE)[0]
    assert _to(h.send(answer(req, 100, "Trying"), src=CORE), CALLER) == []
    ringing = _to(h.send(answer(req, 180, "Ringing"), src=CORE), CALLER)
    assert [m.status for m in ringing] == [180]
    assert len(ringing[0].vias) == 1 and ringing[0].top_via.branch == "z9hG4bK-caller-1"
    ok = _to(h.send(answer(req, 200, "OK"), src=CORE), CALLER)
    assert [m.status for m in ok] == [200]
    assert ok[0].values("record-route") == ["<sip:192.0.2.1:5060;lr>"]
    # Retransmitted 200 from the core is forwarded again (RFC 6026 Accepted state).
    assert [m.status for m in _to(h.send(answer(req, 200, "OK"), src=CORE), CALLER)] == [200]
    ack = (
        b"ACK sip:core@10.0.0.10:5080 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-ack-1\r\n"
        b"Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\n"
        b"From: <sip:+12125550100@198.51.100.7>;tag=ftag1\r\n"
        b"To: <sip:+18005550199@192.0.2.1>;tag=ttag9\r\nCall-ID: call-1@caller\r\n"
        b"CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
    )
    fwd_ack = _to(h.send(ack), CORE)
    assert len(fwd_ack) == 1 and fwd_ack[0].method == "ACK"
    assert not fwd_ack[0].has("route")
    assert fwd_ack[0].uri_text == "sip:core@10.0.0.10:5080"
    bye = ack.replace(b"ACK sip", b"BYE sip").replace(b"CSeq: 1 ACK", b"CSeq: 2 BYE")
    bye = bye.replace(b"z9hG4bK-ack-1", b"z9hG4bK-bye-1")
    fwd_bye = _to(h.send(bye), CORE)
    assert [m.method for m in fwd_bye] == ["BYE"]
    # The call ends when the core has taken the BYE, not on the caller's word alone.
    assert [e for e in h.events if isinstance(e, DialogEnded)] == []
    ok_bye = _to(h.send(answer(fwd_bye[0], 200, "OK"), src=CORE), CALLER)
    assert [m.status for m in ok_bye] == [200]
    ended = [e for e in h.events if isinstance(e, DialogEnded)]
    assert [e.reason for e in ended] == ["bye_caller"]
    # A late BYE retransmission is answered from the transaction, and ends nothing again.
    again = h.send(bye)
    assert [m.status for m in _to(again, CALLER)] == [200]
    assert len([e for e in h.events if isinstance(e, DialogEnded)]) == 1


def test_a_response_without_content_length_is_forwarded_with_one() -> None:
    """A party answers over UDP with no Content-Length (allowed on a datagram) and a body that
    is a whole SIP request: forwarded, the answer says its Content-Length, so on a stream to
    the core the body stays a body and is never read as a request of its own."""
    h = Harness()
    req = _to(h.send(bye_from_core(), src=CORE), CALLER)[0]
    smuggled = (b"INVITE sip:+19005550000@10.0.0.10 SIP/2.0\r\nVia: SIP/2.0/TCP x;branch=z9hG4bK-s"
                b"\r\nContent-Length: 0\r\n\r\n")
    ok = answer(req, 200, "OK").replace(b"Content-Length: 0\r\n\r\n", b"\r\n" + smuggled)
    assert b"Content-Length" not in ok.split(b"\r\n\r\n", 1)[0]
    [fwd] = _to(h.send(ok, src=CALLER), CORE)
    assert fwd.status == 200 and fwd.content_length == len(smuggled)
    assert fwd.body == smuggled
    assert fwd.values("via") == req.values("via")[1:]


def bye_from_core() -> bytes:
    return (
        b"BYE sip:+12125550100@198.51.100.7:5062 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.10:5080;branch=z9hG4bK-core-bye\r\n"
        b"Max-Forwards: 70\r\n"
        b"From: <sip:+18005550199@192.0.2.1>;tag=ttag9\r\n"
        b"To: <sip:+12125550100@198.51.100.7>;tag=ftag1\r\nCall-ID: call-1@caller\r\n"
        b"CSeq: 7 BYE\r\nContent-Length: 0\r\n\r\n"
    )


def test_timer_c_starts_again_at_every_provisional() -> None:
    """RFC 3261 §16.7 step 2: a 183 at 0 s and a 180 at 150 s — no CANCEL at 185 s (Timer C
    started again at 150 s); one at 335 s, 185 s after the last provisional."""
    h = Harness()
    req = _to(h.send(invite()), CORE)[0]
    h.send(answer(req, 183, "Session Progress"), src=CORE)
    h.advance(150.0)
    h.send(answer(req, 180, "Ringing"), src=CORE)
    assert [m.method for m in _to(h.advance(100.0), CORE)] == []
    cancels = [m.method for m in _to(h.advance(90.0), CORE)]  # sent, and retransmitted
    assert cancels and set(cancels) == {"CANCEL"}


def test_own_answers_follow_rfc_3581_and_8_2_6_1() -> None:
    """received is added with rport even when sent-by is the source address (RFC 3581 §4);
    100 Trying copies Timestamp (RFC 3261 §8.2.6.1); a local OPTIONS 200 says Allow."""
    h = Harness()
    out = h.send(invite(extra="Timestamp: 54\r\n").replace(
        b"branch=z9hG4bK-caller-1", b"branch=z9hG4bK-caller-1;rport"))
    [trying] = _to(out, CALLER)
    assert trying.status == 100 and trying.get("timestamp") == "54"
    assert trying.values("via")[0].endswith(";rport=5062;received=198.51.100.7")
    [fwd] = _to(out, CORE)
    assert fwd.values("via")[1].endswith(";rport=5062;received=198.51.100.7")
    options = (
        b"OPTIONS sip:192.0.2.1:5060 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-opt2\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:ping@198.51.100.7>;tag=a\r\nTo: <sip:192.0.2.1>\r\n"
        b"Call-ID: opt-2\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    [ok] = _to(h.send(options), CALLER)
    # what it takes out of dialog and what passes within a call (UPDATE, PRACK ...)
    assert ok.status == 200 and ok.get("allow") == \
        "ACK, BYE, CANCEL, INFO, INVITE, NOTIFY, OPTIONS, PRACK, REFER, UPDATE"


def test_received_and_rport_the_sender_wrote_are_replaced_by_its_source() -> None:
    """A sender's own ``received`` / ``rport`` values name an address it chose: the Via the
    core gets (and the one sipguard answers with) names the real source instead (RFC 3261
    §18.2.1, RFC 3581 §4). Values that already name the source are kept as they are."""
    h = Harness()
    cases = [
        (b";rport=5555;received=6.6.6.6", ";rport=5062;received=198.51.100.7"),
        (b";received=6.6.6.6;RECEIVED=7.7.7.7", ""),  # sent-by is the source: none needed
        (b";rport = 5555 ;x=1", ";x=1;rport=5062;received=198.51.100.7"),
        (b";rport=5062;received=198.51.100.7", ";rport=5062;received=198.51.100.7"),
        # a second value behind one that names the source is the sender's choice too
        (b";received=198.51.100.7;received=10.9.9.9", ""),
        (b";rport=5062;rport=1234", ";rport=5062;received=198.51.100.7"),
        (b";rport;rport=1234", ";rport=5062;received=198.51.100.7"),
    ]
    for n, (params, stamped) in enumerate(cases):
        data = invite(call_id=f"rcv-{n}", branch=f"z9hG4bK-rcv-{n}").replace(
            f"branch=z9hG4bK-rcv-{n}".encode(), f"branch=z9hG4bK-rcv-{n}".encode() + params)
        out = h.send(data)
        [trying] = _to(out, CALLER)
        [fwd] = _to(out, CORE)
        for via in (trying.values("via")[0], fwd.values("via")[1]):
            assert via == f"SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-rcv-{n}" + stamped, via


def test_bye_from_core_reaches_caller_contact() -> None:
    """A BYE sent by the core (Route: us) goes to the caller's Contact and ends the dialog."""
    h = Harness()
    req = _to(h.send(invite()), CORE)[0]
    h.send(answer(req, 200, "OK"), src=CORE)
    bye = (
        b"BYE sip:+12125550100@198.51.100.7:5062 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.10:5080;branch=z9hG4bK-core-bye\r\n"
        b"Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\n"
        b"From: <sip:+18005550199@192.0.2.1>;tag=ttag9\r\n"
        b"To: <sip:+12125550100@198.51.100.7>;tag=ftag1\r\nCall-ID: call-1@caller\r\n"
        b"CSeq: 7 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    out = h.send(bye, src=CORE)
    fwd = _to(out, CALLER)
    assert [m.method for m in fwd] == ["BYE"]
    assert [e.reason for e in h.events if isinstance(e, DialogEnded)] == ["bye_callee"]


def test_core_busy_is_acked_hop_by_hop_and_passed_back() -> None:
    """A 486 from the core is ACKed by sipguard and forwarded; the caller's ACK is absorbed."""
    h = Harness()
    req = _to(h.send(invite()), CORE)[0]
    out = h.send(answer(req, 486, "Busy Here"), src=CORE)
    acks = _to(out, CORE)
    assert [m.method for m in acks] == ["ACK"]
    assert acks[0].top_via.branch == req.top_via.branch
    assert acks[0].to_tag == "ttag9"
    busy = _to(out, CALLER)
    assert [m.status for m in busy] == [486]
    # The core retransmits the 486: ACKed again, not forwarded again.
    out = h.send(answer(req, 486, "Busy Here"), src=CORE)
    assert [m.method for m in _to(out, CORE)] == ["ACK"] and _to(out, CALLER) == []
    # Until the caller ACKs, the 486 is retransmitted on Timer G.
    assert [m.status for m in _to(h.advance(0.6), CALLER)] == [486]
    ack = invite().replace(b"INVITE sip", b"ACK sip", 1).replace(b"CSeq: 1 INVITE", b"CSeq: 1 ACK")
    ack = ack.replace(b"To: <sip:+18005550199@192.0.2.1>", b"To: <sip:+18005550199@192.0.2.1>;tag=ttag9")
    assert h.send(ack) == []
    assert _to(h.advance(10), CALLER) == []
    assert [e.reason for e in h.events if isinstance(e, DialogEnded)] == ["failed"]


def test_cancel_waits_for_provisional_then_487_flows_back() -> None:
    """CANCEL is answered 200, sent to the core after its first provisional, and 487 returns."""
    h = Harness()
    req = _to(h.send(invite()), CORE)[0]
    cancel = (
        b"CANCEL sip:+18005550199@192.0.2.1:5060;user=phone SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-caller-1\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:+12125550100@198.51.100.7>;tag=ftag1\r\n"
        b"To: <sip:+18005550199@192.0.2.1>\r\nCall-ID: call-1@caller\r\n"
        b"CSeq: 1 CANCEL\r\nReason: SIP;cause=200;text=\"Call completed elsewhere\"\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    out = h.send(cancel)
    assert [(m.status, m.cseq[1]) for m in _to(out, CALLER)] == [(200, "CANCEL")]
    assert _to(out, CORE) == []  # no provisional yet: RFC 3261 §9.1
    out = h.send(answer(req, 180, "Ringing"), src=CORE)
    fwd_cancel = [m for m in _to(out, CORE) if m.method == "CANCEL"]
    assert len(fwd_cancel) == 1 and fwd_cancel[0].top_via.branch == req.top_via.branch
    # the caller's Reason goes with it (RFC 3326): the core's ACD keeps the clearing cause
    assert fwd_cancel[0].get("reason") == 'SIP;cause=200;text="Call completed elsewhere"'
    h.send(answer(fwd_cancel[0], 200, "OK"), src=CORE)
    out = h.send(answer(req, 487, "Request Terminated"), src=CORE)
    assert [m.status for m in _to(out, CALLER)] == [487]
    assert [e.reason for e in h.events if isinstance(e, DialogEnded)] == ["cancelled"]


def test_cancel_for_unknown_transaction_gets_481() -> None:
    """A CANCEL that matches no INVITE is answered 481."""
    h = Harness()
    cancel = invite().replace(b"INVITE sip", b"CANCEL sip", 1).replace(b"1 INVITE", b"1 CANCEL")
    out = h.send(cancel)
    assert [m.status for m in _to(out, CALLER)] == [481]


def test_policy_reject_is_answered_locally_and_retransmitted_until_ack() -> None:
    """A rejected INVITE never reaches the core; its answer repeats on Timer G until ACK."""
    h = Harness(decide=reject_all(603))
    out = h.send(invite())
    assert _to(out, CORE) == []
    assert [m.status for m in _to(out, CALLER)] == [100, 603]
    rej = _to(out, CALLER)[1]
    assert rej.to_tag
    assert [m.status for m in _to(h.advance(0.5), CALLER)] == [603]
    assert [m.status for m in _to(h.advance(1.0), CALLER)] == [603]
    assert [m.status for m in _to(h.send(invite()), CALLER)] == [603]
    decided = [e for e in h.events if isinstance(e, InviteDecided)]
    assert len(decided) == 1 and decided[0].verdict.status == 603
    assert not [e for e in h.events if isinstance(e, DialogStarted)]


def test_pending_decision_absorbs_retransmissions_and_forwards_once() -> None:
    """While a decision is pending, retransmissions wait; the resolved call is forwarded once."""
    calls: list[CallInfo] = []

    def later(call: CallInfo, now: float) -> Verdict | None:
        calls.append(call)
        return None

    h = Harness(decide=later)
    h.send(invite())
    for _ in range(2):
        assert _to(h.send(invite()), CORE) == []
    assert len(calls) == 1
    h.proxy.resolve(calls[0], Verdict("accept"), h.now)
    assert len([m for m in h._drain() if m[0].addr == CORE]) == 1


def test_pending_decision_goes_to_the_core_in_force_when_it_resolves() -> None:
    """A reload that moves the core while a decision waits for I/O: the call goes to the new
    core; a decision made at once goes where the core was when the INVITE arrived."""
    calls: list[CallInfo] = []

    def later(call: CallInfo, now: float) -> Verdict | None:
        calls.append(call)
        return None

    h = Harness(decide=later)
    h.send(invite())
    moved = ("10.0.0.20", 5080)
    h.proxy.configure(settings(core=Flow("udp", moved, 0)))
    h.proxy.resolve(calls[0], Verdict("accept"), h.now)
    assert [f.addr for f, m in h._drain() if m.method == "INVITE"] == [moved]


def test_validation_statuses() -> None:
    """Max-Forwards 0 → 483, Proxy-Require → 420, unknown scheme → 416, OPTIONS to us → 200."""
    h = Harness()
    out = h.send(invite(max_forwards=0))
    assert [m.status for m in _to(out, CALLER)] == [100, 483]
    out = h.send(invite(branch="z9hG4bK-2", extra="Proxy-Require: foo, bar\r\n"))
    statuses = _to(out, CALLER)
    assert [m.status for m in statuses] == [100, 420]
    assert statuses[1].get("unsupported") == "foo, bar"
    out = h.send(invite(branch="z9hG4bK-3", uri="name:John_Doe"))
    assert [m.status for m in _to(out, CALLER)] == [100, 416]
    options = (
        b"OPTIONS sip:192.0.2.1:5060 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-opt;rport\r\n"
        b"Max-Forwards: 70\r\nFrom: <sip:ping@198.51.100.7>;tag=a\r\nTo: <sip:192.0.2.1>\r\n"
        b"Call-ID: opt-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    out = h.send(options)
    assert [m.status for m in _to(out, CALLER)] == [200]
    assert _to(out, CALLER)[0].top_via.rport == CALLER[1]


def test_a_loop_and_a_call_coming_back_in_get_482() -> None:
    """A request carrying our own Via with the same loop hash gets 482 (RFC 3261 §16.3 step
    4); so does one that comes back in from outside with the Call-ID and From tag of the call
    in progress (a merged request, §8.2.2.2): a second dialog under the same key could not be
    told from the first."""
    h = Harness()
    h.send(invite())
    fwd_raw = h.raw[1]
    # The core sends the very same request back to us: a loop.
    out = h.send(fwd_raw, src=CORE)
    assert [m.status for m in _to(out, CORE)] == [100, 482]
    # Retargeted (new Request-URI) and sent back by another hop (its Via on top of ours).
    back_in = fwd_raw.replace(b"INVITE sip:+18005550199@192.0.2.1:5060;user=phone",
                              b"INVITE sip:+18005550100@192.0.2.1:5060;user=phone", 1)
    back_in = back_in.replace(b"\r\nVia: ", b"\r\nVia: SIP/2.0/UDP 203.0.113.5:5060;branch=z9hG4bK-hop1"
                              b"\r\nVia: ", 1)
    out = h.send(back_in, src=("203.0.113.5", 5060))
    assert [m.status for m in _to(out, ("203.0.113.5", 5060))] == [100, 482]
    assert [m.method for m in _to(out, CORE)] == []
    assert len(h.proxy.dialogs) == 1


def test_timer_b_answers_408_when_core_is_silent() -> None:
    """With no answer at all, the INVITE is retransmitted on Timer A and 408 sent at Timer B."""
    h = Harness()
    h.send(invite())
    out = h.advance(31.0)
    assert len(_to(out, CORE)) == 5  # retransmitted at 0.5, 1.5, 3.5, 7.5, 15.5 s
    out = h.advance(1.0)
    assert [m.status for m in _to(out, CALLER)] == [408]
    assert [e.reason for e in h.events if isinstance(e, DialogEnded)] == ["timeout"]


def test_dialog_lifetime_frees_a_lost_call() -> None:
    """A confirmed dialog whose BYE is lost ends at its maximum lifetime, with a BYE to each
    side: were it only forgotten, a call still up would stay up at both ends and its own BYE
    would later hear 481 from sipguard instead of reaching the core."""
    h = Harness(max_dialog_lifetime=60.0)
    req = _to(h.send(invite()), CORE)[0]
    h.send(answer(req, 200, "OK"), src=CORE)
    h.send(in_dialog("ACK", call_id="call-1@caller", cseq=1, branch="z9hG4bK-ack1"))
    h.advance(59.0)
    assert not [e for e in h.events if isinstance(e, DialogEnded)]
    out = h.advance(2.0)
    assert [e.reason for e in h.events if isinstance(e, DialogEnded)] == ["lifetime"]
    assert h.proxy.live_dialogs() == 0
    assert {m.method for m in _to(out, CORE)} == {m.method for m in _to(out, CALLER)} == {"BYE"}


def test_calls_reaching_their_lifetime_together_end_a_batch_a_pass() -> None:
    """1,200 calls set up in one second reach their maximum lifetime in one second: the
    sweep ends SWEEP_BATCH of them a pass, the next passes SWEEP_PAUSE_S apart, until all
    have ended with a BYE to each side; a call whose caller hangs up while it waits is
    passed over (one end, one BYE pair)."""
    from sipguard.proxy.core import SWEEP_BATCH, SWEEP_PAUSE_S

    h = Harness(max_dialog_lifetime=60.0)
    calls = 1_200
    for n in range(calls):
        ids = {"call_id": f"burst-{n}@caller", "branch": f"z9hG4bK-b{n}"}
        req = _to(h.send(invite(**ids)), CORE)[0]
        h.send(answer(req, 200, "OK"), src=CORE)
        h.send(in_dialog("ACK", call_id=ids["call_id"], cseq=1, branch=f"z9hG4bK-a{n}"))
    assert h.proxy.live_dialogs() == calls
    h.take_events()
    h.advance(59.0)
    deadline = h.proxy.next_deadline()
    assert deadline is not None
    h.now = max(h.now, deadline)
    h.fire_timers()  # the first pass at the lifetime's second
    h._drain()
    ended = [e for e in h.events if isinstance(e, DialogEnded)]
    assert len(ended) == SWEEP_BATCH and {e.reason for e in ended} == {"lifetime"}
    assert h.proxy.live_dialogs() == calls - SWEEP_BATCH
    assert h.proxy.next_deadline() == pytest.approx(h.now + SWEEP_PAUSE_S)
    # the caller of a call still waiting hangs up meanwhile: that call ends by its BYE
    waiting = next(n for n in range(calls) if f"burst-{n}@caller" not in
                   {e.dialog.call_id for e in ended})
    bye = _to(h.send(in_dialog("BYE", call_id=f"burst-{waiting}@caller", cseq=2,
                               branch="z9hG4bK-bye")), CORE)[0]
    h.send(answer(bye, 200, "OK"), src=CORE)
    out = h.advance(1.0)
    ended = [e for e in h.events if isinstance(e, DialogEnded)]
    assert len(ended) == calls and h.proxy.live_dialogs() == 0
    assert len({e.dialog.call_id for e in ended}) == calls
    first = {e.dialog.call_id for e in ended[:SWEEP_BATCH]}
    rest = {f"burst-{n}@caller" for n in range(calls)} - first - {f"burst-{waiting}@caller"}
    to_caller = {m.call_id for m in _to(out, CALLER) if m.method == "BYE" and not m.status}
    to_core = {m.call_id for m in _to(out, CORE) if m.method == "BYE" and not m.status}
    assert rest <= to_caller and f"burst-{waiting}@caller" not in to_caller
    assert rest <= to_core and f"burst-{waiting}@caller" not in to_core


def test_a_refused_invite_holds_the_byte_budget_for_its_answer_only() -> None:
    """An INVITE sipguard refuses itself keeps its server transaction 32 s (to resend the
    answer until the ACK) but lets the request go: from the answer on, the transaction-byte
    budget is charged the answer's size, not the request's — one peer's large refused
    INVITEs cannot fill the budget every peer's calls share. A forwarded INVITE keeps its
    charge (its request is still held for the core)."""
    pad = "".join(f"X-Pad-{i}: {'p' * 14_000}\r\n" for i in range(3))
    h = Harness(decide=reject_all(603))
    out = h.send(invite(extra=pad))
    final = [m for f, m in out if f.addr == CALLER and m.status >= 200]
    assert [m.status for m in final] == [603]
    assert 0 < h.proxy.held_bytes == len(h.raw[-1]) < 1_000
    h.advance(40.0)
    assert h.proxy.held_bytes == 0
    h = Harness()
    req = _to(h.send(invite(extra=pad)), CORE)[0]
    h.send(answer(req, 486, "Busy Here"), src=CORE)
    assert h.proxy.held_bytes > 40_000


def test_stray_response_is_dropped_and_reported() -> None:
    """A response for no transaction of ours is dropped and reported."""
    h = Harness()
    resp = (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKsgdead.beef\r\n"
        b"From: <sip:a@b>;tag=1\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert h.send(resp, src=CORE) == []
    assert [e.kind for e in h.events if isinstance(e, Dropped)] == ["stray_response"]


def test_a_response_with_our_branch_under_another_sent_by_is_discarded() -> None:
    """RFC 3261 §18.1.2: a response whose top Via sent-by is not what sipguard wrote is
    discarded, even with its branch; the same Via written with other spacing, case, a compact
    name or a parameter moved before the branch is still ours."""
    h = Harness()
    req = _to(h.send(invite()), CORE)[0]
    ours = req.values("via")[0]
    assert ours.startswith("SIP/2.0/UDP 192.0.2.1:5060;branch=")
    branch = ours[ours.index(";branch="):]
    ring = answer(req, 180, "Ringing")
    for forged in ("SIP/2.0/UDP 10.9.9.9:5060", "SIP/2.0/UDP 192.0.2.1:5061",
                   "SIP/2.0/TCP 192.0.2.1:5060", "SIP/2.0/UDP 192.0.2.11:5060"):
        stray = ring.replace(f"Via: {ours}".encode(), f"Via: {forged}{branch}".encode())
        assert stray != ring
        assert h.send(stray, src=CORE) == []
    # our branch in the second value of the top line: the top value is someone else's
    second = ring.replace(f"Via: {ours}".encode(),
                          f"Via: SIP/2.0/UDP 10.9.9.9;branch=z9hG4bK-x, {ours}".encode())
    assert h.send(second, src=CORE) == []
    assert [e.kind for e in h.events if isinstance(e, Dropped)] == ["stray_response"] * 5
    respaced = ring.replace(f"Via: {ours}".encode(),
                            f"v: sip / 2.0 / udp  192.0.2.1 : 5060 ;x=1{branch}".encode())
    assert [m.status for m in _to(h.send(respaced, src=CORE), CALLER)] == [180]
    assert [m.status for m in _to(h.send(answer(req, 200, "OK"), src=CORE), CALLER)] == [200]


def test_an_answer_from_another_host_than_its_request_went_to_is_dropped() -> None:
    """An answer with the right branch and Via from a host the INVITE was not sent to (one
    that saw the request on its way and answers with its own Contact) is dropped as
    ``response_source``; the host it went to may answer from another port."""
    h = Harness()
    req = _to(h.send(invite()), CORE)[0]
    forged = answer(req, 200, "OK").replace(b"\r\nContent-Length",
                                             b"\r\nContact: <sip:evil@203.0.113.66>\r\nContent-Length")
    assert h.send(forged, src=("203.0.113.66", 5080)) == []
    assert h.send(forged, src=CALLER) == []
    assert [e.kind for e in h.events if isinstance(e, Dropped)] == ["response_source"] * 2
    ring = _to(h.send(answer(req, 180, "Ringing"), src=(CORE[0], 6000)), CALLER)
    assert [m.status for m in ring] == [180]
    assert [m.status for m in _to(h.send(answer(req, 200, "OK"), src=CORE), CALLER)] == [200]


def test_a_request_too_large_for_udp_once_forwarded_gets_513() -> None:
    """An INVITE just under the size limit that sipguard's Via and Record-Route would push
    past what one UDP datagram carries: 513 to the caller at once (not 408 after Timer B),
    nothing to the core; one a little smaller passes."""
    h = Harness()
    for n, (size, forwarded) in enumerate(((65_500, False), (65_000, True))):
        ids = {"branch": f"z9hG4bK-big{n}", "call_id": f"big-{n}"}
        lines = "".join(f"X-Pad-{i}: {'p' * 15000}\r\n" for i in range(4))  # each under a line's limit
        base = len(invite(extra=lines + "X-Pad: \r\n", **ids))
        data = invite(extra=lines + "X-Pad: " + "p" * (size - base) + "\r\n", **ids)
        assert len(data) == size
        out = h.send(data)
        assert (len(_to(out, CORE)) == 1) is forwarded
        finals = [m.status for m in _to(out, CALLER) if m.status >= 200]
        assert finals == ([] if forwarded else [513])


def test_max_forwards_with_leading_zeros_is_read_as_its_number() -> None:
    """Max-Forwards is 1*DIGIT: "00000000000070" is 70 — forwarded with 69, not refused."""
    h = Harness()
    data = invite(max_forwards=None, extra="Max-Forwards: 00000000000070\r\n")
    [fwd] = _to(h.send(data), CORE)
    assert fwd.get("max-forwards") == "69"


def test_malformed_request_gets_400_and_is_not_forwarded() -> None:
    """A request with two CSeq headers is answered 400 statelessly and never forwarded."""
    h = Harness()
    bad = invite().replace(b"CSeq: 1 INVITE\r\n", b"CSeq: 1 INVITE\r\nCSeq: 2 INVITE\r\n")
    out = h.send(bad)
    assert [m.status for m in _to(out, CALLER)] == [400]
    assert _to(out, CORE) == []


def test_tcp_responses_go_back_on_the_same_connection() -> None:
    """Over TCP the 100 and the forwarded answer use the connection the INVITE came on."""
    h = Harness()
    data = invite().replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
    out = h.send(data, transport="tcp", conn=42)
    assert [(f.transport, f.conn, m.status) for f, m in out if m.status] == [("tcp", 42, 100)]
    req = _to(out, CORE)[0]
    # Double Record-Route: caller side TCP listener, core side UDP listener.
    assert req.values("record-route") == [
        "<sip:192.0.2.1:5060;lr>",
        "<sip:192.0.2.1:5060;transport=tcp;lr>",
    ]
    out = h.send(answer(req, 200, "OK"), src=CORE)
    assert [(f.transport, f.conn) for f, m in out] == [("tcp", 42)]


def test_outside_requests_never_relay_through_a_foreign_route() -> None:
    """A preloaded Route goes to the core only, and not in the request either: a core that
    follows it would carry the call on to where the peer chose (also behind sipguard's own
    entry); a request for a dialog sipguard did not set up is refused (481) and goes
    nowhere."""
    h = Harness()
    for n, route in enumerate(("<sip:203.0.113.99:5060;lr>",
                               "<sip:192.0.2.1:5060;lr>, <sip:203.0.113.99:5060;lr>")):
        out = h.send(invite(extra=f"Route: {route}\r\nRoute: <sip:10.0.0.10;lr>\r\n",
                            call_id=f"pre-{n}", branch=f"z9hG4bK-pre{n}"))
        [fwd] = [m for m in _to(out, CORE) if m.method == "INVITE"]
        assert not fwd.has("route")
        assert _to(out, ("203.0.113.99", 5060)) == []
    # an entry naming the core itself (a Service-Route, RFC 3608) stays — not one whose maddr
    # or user part would send the core elsewhere
    out = h.send(invite(extra="Route: <sip:203.0.113.99:5060;lr>, <sip:10.0.0.10:5080;lr>, "
                        "<sip:10.0.0.10:5080;lr;maddr=203.0.113.66>, <sip:x@10.0.0.10:5080;lr>\r\n",
                        call_id="pre-core", branch="z9hG4bK-precore"))
    [fwd] = [m for m in _to(out, CORE) if m.method == "INVITE"]
    assert fwd.values("route") == ["<sip:10.0.0.10:5080;lr>"]
    bye = (
        b"BYE sip:victim@203.0.113.99:5060 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-fake-bye\r\n"
        b"Route: <sip:203.0.113.99:5060;lr>\r\nMax-Forwards: 70\r\n"
        b"From: <sip:a@198.51.100.7>;tag=nope\r\nTo: <sip:b@192.0.2.1>;tag=nope2\r\n"
        b"Call-ID: unknown-dialog\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    )
    out = h.send(bye)
    assert _to(out, CORE) == []
    assert [m.status for m in _to(out, CALLER)] == [481]
    assert _to(out, ("203.0.113.99", 5060)) == []


def test_error_found_after_the_transaction_exists_is_answered_and_cleaned_up() -> None:
    """An INVITE whose Route names an unsupported transport gets 416 and leaves no state."""
    h = Harness()
    req = invite(extra="Route: <sip:192.0.2.1:5060;lr>, <sip:10.9.9.9;transport=sctp;lr>\r\n",
                 to_tag=True, via_host="10.0.0.10:5080")
    out = h.send(req, src=CORE)  # the core's route set is followed, and this one is bad
    assert [m.status for m in _to(out, CORE)] == [100, 416]
    h.advance(100.0)
    assert h.proxy.servers == {}


def test_an_answered_transaction_keeps_only_what_retransmissions_take() -> None:
    """After its final answer a server transaction lets its request, call and dialog go (it
    lives 64*T1 more): a retransmitted INVITE is still absorbed, a retransmitted 2xx still
    goes upstream, and a call rejected with a 4xx still has its ACK built for a retransmitted
    final — that client transaction keeps what it sent."""
    h = Harness()
    fwd = _to(h.send(invite()), CORE)[0]
    h.send(answer(fwd, 180, "Ringing"), src=CORE)
    ok = answer(fwd, 200, "OK")
    assert [m.status for m in _to(h.send(ok, src=CORE), CALLER)] == [200]
    st = next(t for k, t in h.proxy.servers.items() if k.startswith("INVITE "))
    assert st.state == "accepted"
    assert st.msg is None and st.call is None and st.dialog is None and st.next_hop is None
    ct = st.client
    assert ct is not None and ct.data == b"" and ct.sent is None
    assert h.proxy.live_dialogs() == 1  # the dialog lives on in the dialog table
    assert h.send(invite()) == []  # a retransmitted INVITE: absorbed
    assert [m.status for m in _to(h.send(ok, src=CORE), CALLER)] == [200]  # 2xx again: upstream

    h2 = Harness()
    fwd = _to(h2.send(invite(call_id="busy-1")), CORE)[0]
    busy = answer(fwd, 486, "Busy Here")
    out = h2.send(busy, src=CORE)
    assert [m.method for m in _to(out, CORE)] == ["ACK"]
    st = next(iter(h2.proxy.servers.values()))
    assert st.state == "completed" and st.msg is None and st.last is not None
    assert [m.method for m in _to(h2.send(busy, src=CORE), CORE)] == ["ACK"]  # built again
    assert [m.status for m in _to(h2.send(invite(call_id="busy-1"), src=CALLER), CALLER)] \
        == [486]  # the INVITE retransmitted: the last answer resent


def test_a_full_transaction_table_keeps_bounded_headroom_for_calls_in_progress() -> None:
    """max_transactions 1, max_dialogs 2: with the table full (the call's answered INVITE),
    in-dialog requests of the call up go on until the table holds 1 + 2; beyond, they hear
    503 like a new call, and nothing reaches the core; an in-dialog request for no live call
    hears its stateless 481, full table or not. The headroom is bounded: a party cannot grow
    the table past it."""
    h = Harness(max_transactions=1, max_dialogs=2)
    fwd = _to(h.send(invite()), CORE)[0]
    h.send(answer(fwd, 200, "OK"), src=CORE)
    assert len(h.proxy.servers) == 1

    def info(n: int, call_id: str = "call-1@caller") -> list[int | str | None]:
        out = h.send(in_dialog("INFO", call_id=call_id, cseq=1 + n, branch=f"z9hG4bK-i{n}"))
        return [m.method or m.status for _, m in out]

    assert info(1) == ["INFO"] and info(2) == ["INFO"]  # to the core: 1 + 2 held now
    assert len(h.proxy.servers) == 3
    assert info(3) == [503]  # the headroom is used up
    assert info(4, call_id="no-such-call") == [481]
    assert [m.status for _, m in h.send(invite(call_id="call-2", branch="z9hG4bK-c2"))] == [503]
    assert len(h.proxy.servers) == 3


def test_retransmission_timers_wait_for_a_receive_queue_that_is_behind() -> None:
    """With the shell 0.3 s behind in reading (``lag``, the overload watcher's measured wait),
    Timer A waits 0.3 s more before retransmitting the INVITE: the core's 100 read meanwhile
    ends the retransmissions without any sent. Unanswered, the INVITE goes once the queue has
    caught up, and the next interval is doubled as usual; while the lag lasts a timer waits T2
    (4 s) at most; below HOLD_MIN_S of lag nothing changes."""
    h = Harness()
    h.proxy.lag = 0.3
    req = _to(h.send(invite()), CORE)[0]
    assert _to(h.advance(0.79), CORE) == []  # Timer A (0.5 s) held until 0.8 s
    assert h.proxy.held_retransmissions == 1
    h.send(answer(req, 100, "Trying"), src=CORE)  # it was in the queue all along
    assert _to(h.advance(5.0), CORE) == []

    h = Harness()
    h.proxy.lag = 0.3
    h.send(invite())
    assert _to(h.advance(0.79), CORE) == []
    h.proxy.lag = 0.0  # caught up, and no answer came: the INVITE goes at 0.8 s
    assert [m.method for m in _to(h.advance(0.02), CORE)] == ["INVITE"]
    assert _to(h.advance(0.98), CORE) == []  # the next interval is 1.0 s
    assert [m.method for m in _to(h.advance(0.02), CORE)] == ["INVITE"]
    assert h.proxy.held_retransmissions == 1

    h = Harness()
    h.proxy.lag = 0.3  # behind all along: held again and again, T2 (4 s) at most
    h.send(invite())
    assert _to(h.advance(4.49), CORE) == []
    assert [m.method for m in _to(h.advance(0.02), CORE)] == ["INVITE"]
    assert h.proxy.held_retransmissions == 1

    h = Harness()
    h.proxy.lag = 0.01  # normal running: the timers as RFC 3261 has them
    h.send(invite())
    assert [m.method for m in _to(h.advance(0.51), CORE)] == ["INVITE"]
    assert h.proxy.held_retransmissions == 0


def test_timer_g_waits_for_a_receive_queue_that_is_behind() -> None:
    """A 603 sipguard answered waits for its ACK the lag longer before it is repeated."""
    h = Harness(decide=reject_all(603))
    h.proxy.lag = 0.4
    assert [m.status for m in _to(h.send(invite()), CALLER)] == [100, 603]
    assert _to(h.advance(0.89), CALLER) == []  # Timer G (0.5 s) held until 0.9 s
    h.proxy.lag = 0.0
    assert [m.status for m in _to(h.advance(0.02), CALLER)] == [603]


def test_a_2xx_never_acked_ends_the_call_64_t1_later() -> None:
    """The caller never ACKs the 2xx (gone, or holding a number's slots on purpose), and the
    core never sends the BYE RFC 3261 §13.3.1.4 asks of it: 64*T1 (32 s) after the 2xx the
    call ends (``ack_timeout``) with a BYE to each side. An ACKed call stays."""
    h = Harness()
    req = _to(h.send(invite()), CORE)[0]
    h.send(answer(req, 200, "OK"), src=CORE)
    h.advance(31.0)
    assert not [e for e in h.events if isinstance(e, DialogEnded)]
    out = h.advance(2.0)
    assert [e.reason for e in h.events if isinstance(e, DialogEnded)] == ["ack_timeout"]
    assert {m.method for m in _to(out, CORE)} == {m.method for m in _to(out, CALLER)} == {"BYE"}
    acked = Harness()
    req = _to(acked.send(invite(call_id="call-2@caller", branch="z9hG4bK-c2")), CORE)[0]
    acked.send(answer(req, 200, "OK"), src=CORE)
    acked.advance(20.0)  # a late ACK still counts
    acked.send(in_dialog("ACK", call_id="call-2@caller", cseq=1, branch="z9hG4bK-ack2"))
    acked.advance(600.0)
    assert not [e for e in acked.events if isinstance(e, DialogEnded)]
    assert acked.proxy.live_dialogs() == 1


def test_only_the_calls_own_ack_lifts_the_ack_timeout() -> None:
    """An ACK sent before the answer, or one with another To tag, is no ACK of the 2xx: the
    call still ends 64*T1 after it."""
    h = Harness()
    req = _to(h.send(invite()), CORE)[0]
    h.send(answer(req, 180, "Ringing"), src=CORE)
    h.send(in_dialog("ACK", call_id="call-1@caller", cseq=1, branch="z9hG4bK-early"))
    h.send(answer(req, 200, "OK"), src=CORE)
    h.send(in_dialog("ACK", call_id="call-1@caller", cseq=1, branch="z9hG4bK-other",
                     to_tag="not-the-callee"))
    h.advance(33.0)
    assert [e.reason for e in h.events if isinstance(e, DialogEnded)] == ["ack_timeout"]


def test_no_ack_timeout_when_the_ack_does_not_come_through_sipguard() -> None:
    """record_route off (or a core that drops sipguard's Record-Route): the ACK and the
    BYE go around sipguard, so a missing ACK means nothing and no BYE is sent when the call's
    lifetime ends: it is only forgotten."""
    h = Harness(record_route=False, max_dialog_lifetime=120.0)
    req = _to(h.send(invite()), CORE)[0]
    h.send(answer(req, 200, "OK"), src=CORE)
    h.advance(60.0)
    assert not [e for e in h.events if isinstance(e, DialogEnded)]
    out = h.advance(61.0)
    assert [e.reason for e in h.events if isinstance(e, DialogEnded)] == ["lifetime"]
    assert [m for _, m in out if m.method == "BYE"] == []


def test_two_listeners_advertised_alike_write_one_record_route() -> None:
    """Public and internal UDP listeners both advertised as sg.example.net:5060
    (``sip.advertise``): a call in on one and out on the other wrote the RFC 5658 pair as two
    identical entries — and the core's in-dialog requests, whose route set then named
    sipguard twice alike, had one taken off per pass and came back to sipguard. One entry:
    the core's BYE reaches the caller."""
    locals_ = (Local(0, "udp", "sg.example.net", 5060), Local(1, "udp", "sg.example.net", 5060))
    h = Harness(locals=locals_)
    h.proxy.receive(invite(), Flow("udp", CALLER, 1), h.now)
    [req] = [m for m in _to(h._drain(), CORE) if m.method == "INVITE"]
    assert req.values("record-route") == ["<sip:sg.example.net:5060;lr>"]
    h.send(answer(req, 200, "OK"), src=CORE)
    route = ("Route: " + ", ".join(req.values("record-route"))).encode()  # the core's set
    bye = in_dialog("BYE", call_id=req.call_id, cseq=2, branch="z9hG4bK-adv-bye",
                    from_callee=True).replace(b"Route: <sip:192.0.2.1:5060;lr>", route)
    out = h.send(bye, src=CORE)
    assert [m.method for m in _to(out, CALLER)] == ["BYE"]


def test_a_request_line_version_in_lower_case_leaves_in_upper_case() -> None:
    """RFC 3261 §7.1: the version is read in any case and sent upper-case."""
    h = Harness()
    out = h.send(invite().replace(b";user=phone SIP/2.0\r\n", b";user=phone sip/2.0\r\n", 1))
    [fwd] = [m for m in _to(out, CORE) if m.method == "INVITE"]
    assert fwd.start_line == b"INVITE sip:+18005550199@192.0.2.1:5060;user=phone SIP/2.0"


def test_a_cores_503_goes_upstream_as_it_is_or_as_a_500() -> None:
    """The core answers 503: passed to the caller as it is by default (a carrier fails over
    on it), as 500 with sip.relay_core_503 false (RFC 3261 §16.7 step 6); the core gets its ACK
    either way."""
    for relay, status in ((True, 503), (False, 500)):
        h = Harness(relay_core_503=relay)
        [fwd] = [m for m in _to(h.send(invite()), CORE) if m.method == "INVITE"]
        out = h.send(answer(fwd, 503, "Service Unavailable", extra="Retry-After: 30\r\n"), src=CORE)
        [final] = [m for m in _to(out, CALLER) if m.status >= 200]
        assert final.status == status and final.get("retry-after") == "30"
        assert [m.method for m in _to(out, CORE)] == ["ACK"]
