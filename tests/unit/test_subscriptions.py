"""Subscriptions across sipguard (RFC 6665, RFC 3515): the in-dialog requests of a
SUBSCRIBE's or REFER's dialog from outside are let through while the subscription lasts, from
its outside party's host only; anything else stays a 481 (sipguard/proxy/subscriptions.py)."""

from __future__ import annotations

from sipguard.contract import Noticed
from sipguard.proxy.subscriptions import Subscriptions
from tests.unit.dialog_helpers import PolicyHarness, in_dialog, to
from tests.unit.proxy_helpers import CALLER, CORE, answer

REMOTE = ("203.0.113.50", 5060)  # a PBX peer whose extension the core watches (BLF)
OTHER = ("203.0.113.77", 5060)


def core_subscribe(call_id: str = "blf-1", expires: int = 600) -> bytes:
    return (
        f"SUBSCRIBE sip:ext100@203.0.113.50:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 10.0.0.10:5080;branch=z9hG4bK-{call_id}\r\nMax-Forwards: 70\r\n"
        f"From: <sip:agent7@10.0.0.10>;tag=coretag\r\nTo: <sip:ext100@203.0.113.50>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 SUBSCRIBE\r\nEvent: dialog\r\nExpires: {expires}\r\n"
        f"Contact: <sip:agent7@10.0.0.10:5080>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def notify(call_id: str = "blf-1", cseq: int = 1, state: str = "active;expires=600",
           to_tag: str = "coretag") -> bytes:
    return (
        f"NOTIFY sip:agent7@10.0.0.10:5080 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 203.0.113.50:5060;branch=z9hG4bK-n-{call_id}-{cseq}\r\n"
        f"Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\n"
        f"From: <sip:ext100@203.0.113.50>;tag=pbxtag\r\nTo: <sip:agent7@10.0.0.10>;tag={to_tag}\r\n"
        f"Call-ID: {call_id}\r\nCSeq: {cseq} NOTIFY\r\nEvent: dialog\r\n"
        f"Subscription-State: {state}\r\nContact: <sip:ext100@203.0.113.50:5060>\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def subscribed(h: PolicyHarness, call_id: str = "blf-1", expires: int = 600,
               status: int = 200) -> None:
    """The core's SUBSCRIBE, forwarded, and the PBX's answer to it."""
    [sub] = [m for m in to(h.send(core_subscribe(call_id, expires), src=CORE), REMOTE)
             if m.method == "SUBSCRIBE"]
    h.send(answer(sub, status, "OK" if status < 300 else "No", to_tag="pbxtag"), src=REMOTE)


def party_subscribed(h: PolicyHarness, call_id: str, expires: int) -> None:
    """A party outside subscribes to the core (presence), and the core takes it."""
    first = (
        f"SUBSCRIBE sip:+18005550199@192.0.2.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-{call_id}\r\nMax-Forwards: 70\r\n"
        f"From: <sip:+12125550100@198.51.100.7>;tag=ftag1\r\nTo: <sip:+18005550199@192.0.2.1>\r\n"
        f"Call-ID: {call_id}\r\nCSeq: 1 SUBSCRIBE\r\nEvent: presence\r\nExpires: {expires}\r\n"
        f"Contact: <sip:+12125550100@198.51.100.7:5062>\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    [sub] = [m for m in to(h.send(first), CORE) if m.method == "SUBSCRIBE"]
    h.send(answer(sub, 200, "OK"), src=CORE)


def transferred_then_ended() -> PolicyHarness:
    """A call up (call-1), which the core transfers (its REFER, 202 from the caller), then
    the caller's BYE: the REFER's implicit subscription outlives the call."""
    h = PolicyHarness()
    _, fwd = h.call(1)
    assert fwd is not None
    h.answer(fwd, 200, "OK")
    h.send(in_dialog("ACK", call_id="call-1", cseq=1, branch="z9hG4bK-ack1"))
    refer = in_dialog("REFER", call_id="call-1", cseq=1, branch="z9hG4bK-ref1",
                      from_callee=True, extra="Refer-To: <sip:+18005550123@10.0.0.10>\r\n")
    [sent] = [m for m in to(h.send(refer, src=CORE), CALLER) if m.method == "REFER"]
    h.send(answer(sent, 202, "Accepted", to_tag=None), src=CALLER)
    h.bye(1, cseq=2)
    assert not h.proxy.dialogs
    return h


def statuses(out: list, addr: tuple[str, int]) -> list[int]:  # type: ignore[type-arg]
    return [m.status for m in to(out, addr) if m.status is not None]


def test_the_cores_subscription_gets_its_notifies() -> None:
    """The core subscribes to an extension of a PBX outside (BLF): sipguard record-routes the
    SUBSCRIBE, and the PBX's NOTIFYs reach the core — they heard 481 before, so the PBX ended
    the subscription (RFC 6665 §4.2.2). A NOTIFY from another host, or for a subscription
    nobody made, still hears 481 and goes nowhere."""
    h = PolicyHarness()
    [sub] = [m for m in to(h.send(core_subscribe(), src=CORE), REMOTE) if m.method == "SUBSCRIBE"]
    assert "192.0.2.1:5060;lr" in (sub.get("record-route") or "")
    h.send(answer(sub, 200, "OK", to_tag="pbxtag"), src=REMOTE)
    out = h.send(notify(), src=REMOTE)
    assert [m.method for m in to(out, CORE)] == ["NOTIFY"]
    for stranger, data in ((OTHER, notify(cseq=2)), (REMOTE, notify("nobody", cseq=3))):
        out = h.send(data, src=stranger)
        assert to(out, CORE) == [] and statuses(out, stranger) == [481]
    assert len(h.proxy.subscriptions) == 1


def test_a_subscription_ends_with_its_time_or_a_terminated_notify() -> None:
    """The notifier outside may end the core's subscription early, never keep it longer than
    the core asked or was granted (RFC 6665 §4.1.2.1): a NOTIFY's `active;expires=3600` does
    not carry it past the SUBSCRIBE's 600 s — the core's refresh does; `terminated` leaves it
    32 s for the last messages, then its NOTIFYs hear 481. An unanswered one ends when its
    Expires (plus 32 s) has passed."""
    h = PolicyHarness()
    subscribed(h)
    h.advance(500)
    assert to(h.send(notify(cseq=2, state="active;expires=3600"), src=REMOTE), CORE)
    h.advance(140)  # past the SUBSCRIBE's 600 s and the grace: the NOTIFY did not lengthen it
    out = h.send(notify(cseq=3), src=REMOTE)
    assert to(out, CORE) == [] and statuses(out, REMOTE) == [481]
    subscribed(h, "blf-r")
    h.advance(500)
    [refresh] = [m for m in to(h.send(core_subscribe("blf-r", 600).replace(
        b"CSeq: 1 SUBSCRIBE", b"CSeq: 2 SUBSCRIBE").replace(
        b"To: <sip:ext100@203.0.113.50>", b"To: <sip:ext100@203.0.113.50>;tag=pbxtag").replace(
        b"z9hG4bK-blf-r", b"z9hG4bK-blf-r2"), src=CORE), REMOTE) if m.method == "SUBSCRIBE"]
    h.send(answer(refresh, 200, "OK", to_tag=None), src=REMOTE)
    h.advance(500)  # 1,000 s: within the refresh's 600
    assert to(h.send(notify("blf-r", cseq=3), src=REMOTE), CORE)
    assert to(h.send(notify("blf-r", cseq=4, state="terminated;reason=timeout"), src=REMOTE),
              CORE)
    h.advance(40)
    out = h.send(notify("blf-r", cseq=5), src=REMOTE)
    assert to(out, CORE) == [] and statuses(out, REMOTE) == [481]
    subscribed(h, "blf-2", expires=60)
    h.advance(100)
    out = h.send(notify("blf-2"), src=REMOTE)
    assert to(out, CORE) == [] and statuses(out, REMOTE) == [481]


def test_a_subscription_lasts_what_its_2xx_granted_not_what_was_asked() -> None:
    """The core asks for 3,600 s; the PBX's 200 grants 120 (RFC 6665 §4.1.2.1: a notifier
    may shorten it there): with no NOTIFY since, its NOTIFYs hear 481 once 120 s and the 32 s
    grace have passed. A 2xx granting more than was asked does not lengthen it."""
    for asked, grant, ends in ((3600, 120, 152), (60, 600, 92)):
        h = PolicyHarness()
        call_id = f"blf-g{grant}"
        [sub] = [m for m in to(h.send(core_subscribe(call_id, asked), src=CORE), REMOTE)
                 if m.method == "SUBSCRIBE"]
        h.send(answer(sub, 200, "OK", to_tag="pbxtag").replace(
            b"\r\nContent-Length", f"\r\nExpires: {grant}\r\nContent-Length".encode()),
            src=REMOTE)
        [entry] = h.proxy.subscriptions.table.values()
        assert entry.until == h.now + ends, (asked, grant, entry.until - h.now)
        h.advance(ends + 1)
        out = h.send(notify(call_id), src=REMOTE)
        assert to(out, CORE) == [] and statuses(out, REMOTE) == [481]


def test_a_partys_own_subscription_can_be_refreshed() -> None:
    """A party outside subscribes to the core (SUBSCRIBE allowed): its refresh and its
    un-SUBSCRIBE reach the core — they heard 481, and the subscriber had to subscribe anew.
    Another host's refresh in that dialog still hears 481."""
    h = PolicyHarness(allow_methods=frozenset({"INVITE", "OPTIONS", "SUBSCRIBE"}))
    party_subscribed(h, "presence-1", 300)
    refresh = in_dialog("SUBSCRIBE", call_id="presence-1", cseq=2, branch="z9hG4bK-ps2",
                        extra="Event: presence\r\nExpires: 300\r\n")
    assert [m.method for m in to(h.send(refresh), CORE)] == ["SUBSCRIBE"]
    out = h.send(refresh.replace(b"z9hG4bK-ps2", b"z9hG4bK-ps3").replace(b"2 SUBSCRIBE",
                                                                         b"3 SUBSCRIBE"),
                 src=OTHER)
    assert to(out, CORE) == [] and [m.status for _, m in out] == [481]
    h.advance(200)
    gone = in_dialog("SUBSCRIBE", call_id="presence-1", cseq=4, branch="z9hG4bK-ps4",
                     extra="Event: presence\r\nExpires: 0\r\n")
    [unsub] = [m for m in to(h.send(gone), CORE) if m.method == "SUBSCRIBE"]
    h.send(answer(unsub, 200, "OK"), src=CORE)
    h.advance(40)  # Expires: 0, answered 200, leaves 32 s
    late = in_dialog("SUBSCRIBE", call_id="presence-1", cseq=5, branch="z9hG4bK-ps5",
                     extra="Event: presence\r\nExpires: 300\r\n")
    out = h.send(late)
    assert to(out, CORE) == [] and statuses(out, CALLER) == [481]


def test_notifies_of_a_refer_in_a_call_pass_after_the_call_ends() -> None:
    """The core transfers a caller (REFER in the call); the caller hangs up, then reports
    the transfer's progress (NOTIFY, its implicit subscription outliving the call, RFC 3515
    §2.4.4): the NOTIFY reaches the core — it heard 481 before."""
    h = transferred_then_ended()
    sipfrag = in_dialog("NOTIFY", call_id="call-1", cseq=3, branch="z9hG4bK-nt1",
                        extra="Event: refer\r\nSubscription-State: terminated;reason=noresource\r\n")
    assert [m.method for m in to(h.send(sipfrag), CORE)] == ["NOTIFY"]


def test_the_table_is_bounded_oldest_first() -> None:
    h = PolicyHarness(max_subscriptions=3)
    for i in range(5):
        subscribed(h, f"b{i}")
    subs = h.proxy.subscriptions
    assert len(subs) == 3 and [k[1] for k in subs.table] == ["b2", "b3", "b4"]
    assert sum(1 for e in h.events if isinstance(e, Noticed)
               and e.kind == "subscription_forgotten") == 2
    out = h.send(notify("b0"), src=REMOTE)
    assert statuses(out, REMOTE) == [481]
    assert to(h.send(notify("b4"), src=REMOTE), CORE)


def test_expired_entries_make_room_before_live_ones_go() -> None:
    subs = Subscriptions(2)
    subs.add(("core", "a", "t"), "h", 10.0, 0.0)
    subs.add(("core", "b", "t"), "h", 100.0, 0.0)
    subs.add(("core", "c", "t"), "h", 100.0, 50.0)  # "a" has expired: it goes, "b" stays
    assert set(subs.table) == {("core", "b", "t"), ("core", "c", "t")} and subs.forgotten == 0


def test_a_refused_subscribe_or_refer_makes_no_subscription() -> None:
    """Only a 2xx makes a subscription: the PBX refusing the core's SUBSCRIBE (489), or the
    core refusing a party's (405), or a SUBSCRIBE not in sip.allow_methods, lets no NOTIFY
    or refresh through afterwards."""
    h = PolicyHarness()
    subscribed(h, "refused", status=489)
    out = h.send(notify("refused"), src=REMOTE)
    assert to(out, CORE) == [] and statuses(out, REMOTE) == [481]
    assert len(h.proxy.subscriptions) == 0
    # a party's SUBSCRIBE the core refuses
    p = PolicyHarness(allow_methods=frozenset({"INVITE", "OPTIONS", "SUBSCRIBE"}))
    first = in_dialog("SUBSCRIBE", call_id="p-2", cseq=1, branch="z9hG4bK-p2a",
                      extra="Event: presence\r\nExpires: 300\r\n").replace(
                          b";tag=ttag9", b"").replace(b"Route: <sip:192.0.2.1:5060;lr>\r\n", b"")
    [sub] = [m for m in to(p.send(first), CORE) if m.method == "SUBSCRIBE"]
    p.send(answer(sub, 405, "Method Not Allowed", to_tag="c1"), src=CORE)
    assert len(p.proxy.subscriptions) == 0


def test_a_notify_that_overtakes_the_2xx_of_its_subscribe_reaches_the_core() -> None:
    """The PBX sends its first NOTIFY before (or instead of a lost) 200 for the SUBSCRIBE
    (RFC 6665 §4.1.2.4): it reaches the core while the SUBSCRIBE waits for its answer;
    a refusal that follows ends that."""
    h = PolicyHarness()
    [sub] = [m for m in to(h.send(core_subscribe("early"), src=CORE), REMOTE)
             if m.method == "SUBSCRIBE"]
    assert to(h.send(notify("early"), src=REMOTE), CORE)
    h.send(answer(sub, 489, "Bad Event", to_tag="pbxtag"), src=REMOTE)
    out = h.send(notify("early", cseq=2), src=REMOTE)
    assert to(out, CORE) == [] and statuses(out, REMOTE) == [481]
    # unanswered, it lasts 32 s
    h.send(core_subscribe("silent"), src=CORE)
    h.advance(40)
    out = h.send(notify("silent"), src=REMOTE)
    assert to(out, CORE) == [] and statuses(out, REMOTE) == [481]


def test_a_subscribe_never_answered_ends_its_subscription_whatever_notifies_came() -> None:
    """The PBX sends a NOTIFY (expires=3600) but never answers the SUBSCRIBE: when the
    SUBSCRIBE's transaction times out (Timer F, 32 s) its provisional subscription ends —
    the NOTIFY's expires no longer keeps it for an hour."""
    h = PolicyHarness()
    h.send(core_subscribe("unanswered"), src=CORE)
    assert to(h.send(notify("unanswered", state="active;expires=3600"), src=REMOTE), CORE)
    h.advance(40)
    out = h.send(notify("unanswered", cseq=2), src=REMOTE)
    assert to(out, CORE) == [] and statuses(out, REMOTE) == [481]


def test_a_subscription_the_core_sends_to_a_host_name_gets_its_notifies() -> None:
    """The core subscribes to sip:ext100@pbx.example.net: the SUBSCRIBE leaves for the name
    (the shell resolves it); the PBX's answer and NOTIFYs come from an address, and that
    address's NOTIFYs reach the core — another's do not, once it has answered."""
    h = PolicyHarness()
    data = core_subscribe().replace(b"SUBSCRIBE sip:ext100@203.0.113.50:5060",
                                    b"SUBSCRIBE sip:ext100@pbx.example.net:5060")
    out = h.send(data, src=CORE)
    [sub] = [m for f, m in out if m.method == "SUBSCRIBE" and f.addr == ("pbx.example.net", 5060)]
    # a NOTIFY before the answer: no address is known yet (RFC 6665 §4.1.2.4)
    assert [m.method for m in to(h.send(notify(cseq=7), src=OTHER), CORE)] == ["NOTIFY"]
    h.send(answer(sub, 200, "OK", to_tag="pbxtag"), src=REMOTE)
    assert [m.method for m in to(h.send(notify(), src=REMOTE), CORE)] == ["NOTIFY"]
    out = h.send(notify(cseq=2), src=OTHER)
    assert to(out, CORE) == [] and statuses(out, OTHER) == [481]


def test_ended_subscriptions_leave_the_table_and_the_cores_notify_ends_a_partys() -> None:
    """A party's subscription (its SUBSCRIBE to the core) ends with the core's `terminated`
    NOTIFY, 32 s later — it stayed the hour its Expires said; and the housekeeping forgets
    subscriptions past their time, so the gauge is what is live (an entry went only when
    met again or when the table was full)."""
    h = PolicyHarness(allow_methods=frozenset({"INVITE", "OPTIONS", "SUBSCRIBE"}))
    party_subscribed(h, "presence-9", 3600)
    subscribed(h, "blf-9", expires=60)  # the core's, ends by its time
    assert len(h.proxy.subscriptions) == 2
    ended = in_dialog("NOTIFY", call_id="presence-9", cseq=1, branch="z9hG4bK-ptn",
                      from_callee=True, extra="Event: presence\r\n"
                      "Subscription-State: terminated;reason=noresource\r\n")
    assert [m.method for m in to(h.send(ended, src=CORE), CALLER)] == ["NOTIFY"]
    h.advance(100)
    h.core.housekeep(h.now)
    assert len(h.proxy.subscriptions) == 0


def test_notifies_from_outside_go_where_the_core_subscribed_from() -> None:
    """A NOTIFY of the core's subscription leaves with the core's Contact as Request-URI and
    no Route of the party's: the PBX's NOTIFY aimed at a third host, and a transferred
    caller's NOTIFY after the call (a made-up From tag, or the call's own once it ended) with
    the call's target — a core routing on them would relay them where the party chose."""
    h = PolicyHarness()
    subscribed(h)
    evil = notify(cseq=2).replace(b"NOTIFY sip:agent7@10.0.0.10:5080",
                                  b"NOTIFY sip:x@203.0.113.99:5060").replace(
        b"Route: <sip:192.0.2.1:5060;lr>", b"Route: <sip:192.0.2.1:5060;lr>, <sip:203.0.113.99;lr>")
    [sent] = [m for m in to(h.send(evil, src=REMOTE), CORE) if m.method == "NOTIFY"]
    assert sent.start_line == b"NOTIFY sip:agent7@10.0.0.10:5080 SIP/2.0"
    assert sent.get("route") is None
    _, fwd = h.call(1)
    assert fwd is not None
    h.answer(fwd, 200, "OK")
    refer = in_dialog("REFER", call_id="call-1", cseq=1, branch="z9hG4bK-ref1",
                      from_callee=True, extra="Refer-To: <sip:+18005550123@10.0.0.10>\r\n")
    [sent] = [m for m in to(h.send(refer, src=CORE), CALLER) if m.method == "REFER"]
    h.send(answer(sent, 202, "Accepted", to_tag=None), src=CALLER)
    for n, tag in enumerate((b"madeup", b"ftag1")):
        if tag == b"ftag1":
            h.bye(1, cseq=2)
        data = in_dialog("NOTIFY", call_id="call-1", cseq=3 + n, branch=f"z9hG4bK-nx{n}",
                         extra="Event: refer\r\nSubscription-State: active\r\n")
        data = data.replace(b"NOTIFY sip:core@10.0.0.10:5080", b"NOTIFY sip:x@203.0.113.99")
        data = data.replace(b";tag=ftag1", b";tag=" + tag).replace(
            b"Route: <sip:192.0.2.1:5060;lr>", b"Route: <sip:192.0.2.1:5060;lr>, <sip:203.0.113.99;lr>")
        [sent] = [m for m in to(h.send(data), CORE) if m.method == "NOTIFY"]
        assert sent.start_line == b"NOTIFY sip:core@10.0.0.10:5080 SIP/2.0", tag
        assert sent.get("route") is None


def test_notifies_after_the_call_show_the_caller_the_call_was_checked_as() -> None:
    """The core transfers a caller (REFER in the call) and the call ends; the caller's
    NOTIFYs of the transfer still pass, as that caller: one asserting another number in
    P-Asserted-Identity loses it, one whose From shows another number hears 403, and one
    saying `active;expires=86400` does not keep the subscription open past its hour."""
    h = transferred_then_ended()
    forged = in_dialog("NOTIFY", call_id="call-1", cseq=3, branch="z9hG4bK-nt1",
                       extra="Event: refer\r\nSubscription-State: active;expires=86400\r\n"
                             "P-Asserted-Identity: <sip:+19005550199@198.51.100.7>\r\n")
    [got] = [m for m in to(h.send(forged), CORE) if m.method == "NOTIFY"]
    assert not got.has("p-asserted-identity")
    own = forged.replace(b"+19005550199", b"+12125550100").replace(b"nt1", b"nt2").replace(
        b"CSeq: 3", b"CSeq: 4")
    [got] = [m for m in to(h.send(own), CORE) if m.method == "NOTIFY"]
    assert got.get("p-asserted-identity") == "<sip:+12125550100@198.51.100.7>"
    other = in_dialog("NOTIFY", call_id="call-1", cseq=5, branch="z9hG4bK-nt3",
                      extra="Event: refer\r\nSubscription-State: active\r\n").replace(
        b"From: <sip:+12125550100@", b"From: <sip:+19005550199@")
    out = h.send(other)
    assert to(out, CORE) == [] and statuses(out, CALLER) == [403]
    h.advance(3700)  # the REFER's hour and its grace: the NOTIFY's day was not taken
    late = in_dialog("NOTIFY", call_id="call-1", cseq=6, branch="z9hG4bK-nt4",
                     extra="Event: refer\r\nSubscription-State: active\r\n")
    out = h.send(late)
    assert to(out, CORE) == [] and statuses(out, CALLER) == [481]


def test_a_refer_to_a_suspended_number_is_refused() -> None:
    """A caller in a call asks the core (REFER) to call a suspended number — which an INVITE
    of its own could not reach: 403 as for that INVITE, the core never hears of it; another
    target goes on. In monitor mode the REFER goes on, reported."""
    for mode, refused in (("enforce", True), ("monitor", False)):
        h = PolicyHarness(extra_yaml=f'mode: {mode}\nsuspended: ["+19005550199"]\n')
        _, fwd = h.call(1)
        assert fwd is not None
        h.answer(fwd, 200, "OK")
        for n, target in enumerate(("+19005550199", "+18005550123")):
            refer = in_dialog("REFER", call_id="call-1", cseq=2 + n, branch=f"z9hG4bK-r{n}",
                              extra=f"Refer-To: <sip:{target}@192.0.2.1>\r\n")
            out = h.send(refer)
            reached = [m for m in to(out, CORE) if m.method == "REFER"]
            if n == 0 and refused:
                assert reached == [] and statuses(out, CALLER) == [403]
                [final] = [m for m in to(out, CALLER) if m.status == 403]
                assert "Callee number suspended" in (final.get("reason") or "")
            else:
                assert len(reached) == 1, (mode, target)
        screened = [e for e in h.events if type(e).__name__ == "Screened"]
        assert [(e.verdict.reason, e.verdict.action) for e in screened] == \
            [("callee_suspended", "reject" if refused else "accept")]


def test_a_refer_needs_exactly_one_refer_to() -> None:
    """RFC 3515 §2.4.1: a REFER with two Refer-To lines, two values in one, one that does not
    parse or none hears 400 — a target the suspension check never read cannot reach the core."""
    h = PolicyHarness(extra_yaml='suspended: ["+19005550199"]\n')
    _, fwd = h.call(1)
    assert fwd is not None
    h.answer(fwd, 200, "OK")
    for n, extra in enumerate((
        "Refer-To: <sip:+18005550123@192.0.2.1>\r\nRefer-To: <sip:+19005550199@192.0.2.1>\r\n",
        "Refer-To: <sip:+18005550123@192.0.2.1>, <sip:+19005550199@192.0.2.1>\r\n",
        'Refer-To: <sip:+19005550199@192.0.2.1>;x="unterminated\r\n',
        "",
    )):
        refer = in_dialog("REFER", call_id="call-1", cseq=2 + n, branch=f"z9hG4bK-b{n}",
                          extra=extra)
        out = h.send(refer)
        assert [m for m in to(out, CORE) if m.method == "REFER"] == [], n
        assert statuses(out, CALLER) == [400], (n, statuses(out, CALLER))
