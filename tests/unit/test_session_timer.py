"""Session timers (RFC 4028) and dialog expiry in the proxy core, with a fake clock."""

from __future__ import annotations

import pytest

from sipguard.contract import DialogEnded
from sipguard.proxy.dialogs import session_interval
from sipguard.sip.message import Message
from sipguard.sip.parser import parse_message
from tests.unit.dialog_helpers import in_dialog, to
from tests.unit.proxy_helpers import CALLER, CORE, Harness, answer, invite


def ended(h: Harness) -> list[tuple[str, str]]:
    return [(e.dialog.call_id, e.reason) for e in h.events if isinstance(e, DialogEnded)]


def start(h: Harness, n: int = 1, se: str | None = "Session-Expires: 120;refresher=uac") -> Message:
    """An answered call ``call-n`` whose 200 carries ``se`` (None: no Session-Expires)."""
    req = to(h.send(invite(branch=f"z9hG4bK-c{n}", call_id=f"call-{n}")), CORE)[0]
    extra = f"{se}\r\n" if se else ""
    assert [m.status for m in to(h.send(answer(req, 200, "OK", extra=extra), src=CORE), CALLER)] \
        == [200]
    h.send(in_dialog("ACK", call_id=f"call-{n}", cseq=1, branch=f"z9hG4bK-a{n}"))
    return req


def refresh(h: Harness, n: int, cseq: int, method: str = "INVITE", se: str | None = "120",
            from_callee: bool = False, status: int = 200) -> None:
    """A refresh (re-INVITE or UPDATE) in dialog ``call-n`` answered ``status`` with ``se``."""
    data = in_dialog(method, call_id=f"call-{n}", cseq=cseq, branch=f"z9hG4bK-r{n}-{cseq}",
                     from_callee=from_callee)
    fwd = [m for _, m in h.send(data, src=CORE if from_callee else CALLER) if m.method == method]
    assert len(fwd) == 1
    extra = f"Session-Expires: {se};refresher=uac\r\n" if se else ""
    h.send(answer(fwd[0], status, "OK" if status == 200 else "No", extra=extra),
           src=CALLER if from_callee else CORE)


def test_dialog_without_refresh_ends_when_session_expires() -> None:
    """A 2xx with Session-Expires: 120 and no refresh ends the dialog at 120 s, not before."""
    h = Harness()
    start(h)
    h.advance(119)
    assert ended(h) == []
    out = h.advance(2)
    assert ended(h) == [("call-1", "session_expired")]
    assert h.proxy.live_dialogs() == 0
    # both ends hear a BYE (RFC 4028 §10: a session whose refresh never came is over)
    assert {(f.addr, m.method) for f, m in out if m.method} == {(CALLER, "BYE"), (CORE, "BYE")}


@pytest.mark.parametrize(("method", "from_callee"),
                         [("INVITE", False), ("UPDATE", False), ("INVITE", True)])
def test_refresh_pushes_the_expiry_back(method: str, from_callee: bool) -> None:
    """A 2xx to a re-INVITE or UPDATE, from either side, restarts the session interval."""
    h = Harness()
    start(h)
    h.advance(60)
    refresh(h, 1, 2, method, from_callee=from_callee)
    h.advance(119)  # 179 s after the start: past the first interval
    assert ended(h) == []
    h.advance(2)
    assert ended(h) == [("call-1", "session_expired")]


def test_failed_refresh_keeps_the_old_expiry() -> None:
    """A non-2xx answer to a refresh changes nothing: the session still expires on time."""
    h = Harness()
    start(h)
    h.advance(60)
    refresh(h, 1, 2, status=491)
    h.advance(61)
    assert ended(h) == [("call-1", "session_expired")]


def test_refresh_without_session_expires_turns_the_timer_off() -> None:
    """A 2xx refresh without Session-Expires leaves only the maximum lifetime."""
    h = Harness(max_dialog_lifetime=600.0)
    start(h)
    refresh(h, 1, 2, se=None)
    h.advance(590)
    assert ended(h) == []
    h.advance(11)
    assert ended(h) == [("call-1", "lifetime")]


def test_session_interval_never_passes_the_maximum_lifetime() -> None:
    """Session expiry beyond the maximum lifetime is capped, and then reported as lifetime."""
    h = Harness(max_dialog_lifetime=100.0)
    start(h, se="Session-Expires: 1800")
    h.advance(101)
    assert ended(h) == [("call-1", "lifetime")]


def test_expiries_out_of_creation_order_each_end_on_time() -> None:
    """An older dialog with a long expiry does not hold back a younger one's session expiry."""
    h = Harness(max_dialog_lifetime=3600.0)
    start(h, 1, se=None)  # lifetime only: 3600 s
    h.advance(10)
    start(h, 2, se="Session-Expires: 90")
    h.advance(91)
    assert ended(h) == [("call-2", "session_expired")]
    h.advance(3600)
    assert ended(h) == [("call-2", "session_expired"), ("call-1", "lifetime")]


def test_bye_after_session_expiry_is_refused_and_ends_nothing_again() -> None:
    """A late BYE after the session expired belongs to no live dialog: 481, nothing reaches
    the core, and no second end is reported."""
    h = Harness()
    start(h)
    h.advance(125)
    bye = in_dialog("BYE", call_id="call-1", cseq=3, branch="z9hG4bK-late")
    out = h.send(bye)
    assert to(out, CORE) == []
    assert [m.status for m in to(out, CALLER)] == [481]
    assert ended(h) == [("call-1", "session_expired")]


def test_bye_before_expiry_leaves_no_timer_behind() -> None:
    """A dialog that ends by BYE is removed from the expiry wheel at once."""
    h = Harness()
    start(h)
    fwd = to(h.send(in_dialog("BYE", call_id="call-1", cseq=2, branch="z9hG4bK-b")), CORE)
    h.send(answer(fwd[0], 200, "OK"), src=CORE)
    assert h.proxy.table.expiries() == 0
    h.advance(200)
    assert ended(h) == [("call-1", "bye_caller")]


@pytest.mark.parametrize(
    ("header", "interval"),
    [
        (None, None),
        ("Session-Expires: 1800", 1800.0),
        ("Session-Expires: 1800;refresher=uas", 1800.0),
        ("x: 600", 600.0),  # compact form
        ("Session-Expires: 30", 90.0),  # below RFC 4028's floor
        ("Session-Expires: soon", None),
        ("Session-Expires: ", None),
        ("Session-Expires: \u0661\u0662\u0660", None),  # non-ASCII digits
    ],
)
def test_session_interval_reads_delta_seconds(header: str | None, interval: float | None) -> None:
    """Session-Expires gives its delta-seconds (at least 90); anything else means no timer."""
    extra = f"{header}\r\n" if header else ""
    msg = parse_message(
        (f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1"
         f"\r\nTo: <sip:c@d>;tag=2\r\nCall-ID: x\r\nCSeq: 1 INVITE\r\n{extra}"
         "Content-Length: 0\r\n\r\n").encode()
    )
    assert session_interval(msg) == interval


def test_a_late_ack_restores_the_expiry_of_a_refresh_that_came_before_it() -> None:
    """A 200 with Session-Expires 120 and no ACK yet; an UPDATE refresh answered at 20 s; the
    ACK at 25 s: the session then ends 120 s after the refresh (140 s), not after the answer."""
    h = Harness()
    req = to(h.send(invite(branch="z9hG4bK-c1", call_id="call-1")), CORE)[0]
    h.send(answer(req, 200, "OK", extra="Session-Expires: 120;refresher=uac\r\n"), src=CORE)
    h.advance(20)
    refresh(h, 1, 2, "UPDATE")
    h.advance(5)
    h.send(in_dialog("ACK", call_id="call-1", cseq=1, branch="z9hG4bK-a1"))
    h.advance(110)  # 135 s: past the answer's 120 s
    assert ended(h) == []
    h.advance(7)
    assert ended(h) == [("call-1", "session_expired")]
