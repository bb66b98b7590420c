"""A verdict's header edits on the forwarded INVITE: replace_headers in place, forward_headers appended."""

from __future__ import annotations

from sipguard.contract import CallInfo, Verdict
from tests.unit.proxy_helpers import CORE, Harness, invite


def forwarded(verdict: Verdict, extra: str) -> bytes:
    def decide(call: CallInfo, now: float) -> Verdict:
        return verdict

    h = Harness(decide)
    out = h.send(invite(extra=extra))
    (data,) = [raw for (flow, _), raw in zip(out, h.raw, strict=True) if flow.addr == CORE]
    return data


def header_lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]


def test_replace_takes_the_place_of_the_first_line_and_removes_the_others() -> None:
    """Every received line of the header goes; the new line sits where the first one was."""
    extra = "P-Asserted-Identity: <tel:+1>\r\nX-A: 1\r\nP-Asserted-Identity: <tel:+2>\r\n"
    data = forwarded(
        Verdict("accept", replace_headers=(("p-asserted-identity", "P-Asserted-Identity: <tel:+3>"),)),
        extra,
    )
    lines = header_lines(data)
    assert lines.count(b"P-Asserted-Identity: <tel:+3>") == 1
    assert b"P-Asserted-Identity: <tel:+1>" not in lines and b"P-Asserted-Identity: <tel:+2>" not in lines
    assert lines.index(b"P-Asserted-Identity: <tel:+3>") == lines.index(b"X-A: 1") - 1


def test_none_removes_and_absent_header_is_appended_before_forward_headers() -> None:
    """None strips a header; a replacement for an absent header is appended, then forward_headers."""
    data = forwarded(
        Verdict(
            "accept",
            replace_headers=(("x-forged", None), ("x-new", "X-New: yes")),
            forward_headers=("X-Tag: t",),
        ),
        "X-Forged: a\r\nx-forged: b\r\n",
    )
    lines = header_lines(data)
    assert not [ln for ln in lines if ln.lower().startswith(b"x-forged")]
    assert lines[-2:] == [b"X-New: yes", b"X-Tag: t"]
    assert b"\r\n\r\nv=0" in data  # the body is untouched


def test_headers_the_proxy_owns_cannot_be_replaced() -> None:
    """Edits naming Via, From, Max-Forwards or Content-Length are ignored."""
    data = forwarded(
        Verdict("accept", replace_headers=(("via", None), ("from", "From: <sip:x@y>"),
                                           ("max-forwards", None), ("content-length", None))),
        "",
    )
    lines = header_lines(data)
    assert sum(ln.startswith(b"Via:") for ln in lines) == 2
    assert b"From: <sip:+12125550100@198.51.100.7>;tag=ftag1" in lines
    assert b"Max-Forwards: 69" in lines
    assert any(ln.startswith(b"Content-Length:") for ln in lines)
