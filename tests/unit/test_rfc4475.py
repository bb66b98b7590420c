"""RFC 4475 torture messages through the proxy: what an RFC 3261 proxy must do with each one.

Every message is fed, as one UDP datagram from ``CALLER``, to a fresh proxy. A valid request
must leave exactly once, towards the core (or the next hop its Route names), with every header
the proxy does not own byte for byte and the body cut to Content-Length; an invalid request gets
the status RFC 4475 names and is never forwarded; a response no transaction of ours sent is
dropped. The files are the RFC's bit-exact archive (CRLF, NULs and all), kept in the repository
under ``tests/data/rfc4475`` (see its README); a missing file fails the tests, never skips them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sipguard.contract import Dialog, Flow, ParseFailed
from sipguard.proxy.core import _from_key
from sipguard.proxy.dialogs import dialog_key
from sipguard.sip.errors import SipParseError
from sipguard.sip.message import Message
from sipguard.sip.parser import parse_message
from tests.unit.proxy_helpers import CALLER, CORE, PROXY, Harness, answer

TORTURE = Path(__file__).resolve().parents[1] / "data" / "rfc4475"
# The corpus exercises every method (REGISTER, MESSAGE, unknown ones): the proxy here is a
# general RFC 3261 proxy, not sipguard's trunk default (INVITE and OPTIONS from outside).
ANY_METHOD = frozenset({"*"})

FORWARD = "forward"  # forwarded once to the given next hop, nothing but 100 Trying back
ANSWER = "answer"  # answered with exactly the given statuses, never forwarded
DROP = "drop"  # nothing sent at all


# file -> (outcome, next hop or statuses)
CASES: dict[str, tuple[str, Any]] = {
    # 3.1.1 Valid messages
    "wsinv": (FORWARD, CORE),  # §3.1.1.1 short tortuous INVITE: valid; a re-INVITE from the caller of a call sipguard set up: to the core (never elsewhere)
    "intmeth": (FORWARD, CORE),  # §3.1.1.2 wide range of valid characters: valid, unknown method proxied
    "esc01": (FORWARD, CORE),  # §3.1.1.3 valid use of % escaping: valid
    "escnull": (FORWARD, CORE),  # §3.1.1.4 escaped NULs in URIs: valid
    "esc02": (FORWARD, CORE),  # §3.1.1.5 % not an escape: unknown method RE%47IST%45R, "proxy would forward"
    "lwsdisp": (FORWARD, CORE),  # §3.1.1.6 no LWS between display name and <: valid
    "longreq": (FORWARD, CORE),  # §3.1.1.7 long values in header fields: valid
    "dblreq": (FORWARD, CORE),  # §3.1.1.8 extra trailing octets in a UDP datagram: REGISTER only, INVITE octets ignored
    "semiuri": (FORWARD, CORE),  # §3.1.1.9 semicolon-separated parameters in URI user part: valid
    "transports": (FORWARD, CORE),  # §3.1.1.10 varied and unknown transport types: valid
    "mpart01": (FORWARD, CORE),  # §3.1.1.11 multipart MIME MESSAGE: valid; a preloaded Route from outside is not followed (no open relay)
    "unreason": (DROP, None),  # §3.1.1.12 unusual reason phrase: valid response, but no transaction of ours (RFC 3261 §16.7, §18.1.2)
    "noreason": (DROP, None),  # §3.1.1.13 empty reason phrase: valid response, no transaction of ours
    # 3.1.2 Invalid messages
    "badinv01": (ANSWER, [400]),  # §3.1.2.1 extraneous header field separators: 400
    "clerr": (ANSWER, [400]),  # §3.1.2.2 Content-Length larger than the datagram: 400
    "ncl": (ANSWER, [400]),  # §3.1.2.3 negative Content-Length: an error
    "scalar02": (ANSWER, [400]),  # §3.1.2.4 overlarge request scalars: 400 for the CSeq
    "scalarlg": (DROP, None),  # §3.1.2.5 overlarge response scalars: the response is discarded
    "quotbal": (ANSWER, [400]),  # §3.1.2.6 unterminated quoted display name: 400
    "ltgtruri": (ANSWER, [400]),  # §3.1.2.7 <> around the Request-URI: 400
    "lwsruri": (ANSWER, [400]),  # §3.1.2.8 LWS inside the Request-URI: 400
    "lwsstart": (ANSWER, [400]),  # §3.1.2.9 several SP between Request-Line elements: 400
    "trws": (ANSWER, [400]),  # §3.1.2.10 SP at the end of the Request-Line: rejecting as malformed is acceptable
    "escruri": (ANSWER, [400]),  # §3.1.2.11 escaped headers in the Request-URI: 400 acceptable; must never be forwarded
    "baddate": (FORWARD, CORE),  # §3.1.2.12 non-GMT Date: reject only if the Date matters; a proxy ignores it
    "regbadct": (FORWARD, CORE),  # §3.1.2.13 name-addr URI not in <>: 400 or liberal; the proxy never interprets a REGISTER Contact
    "badaspec": (ANSWER, [400]),  # §3.1.2.14 spaces within addr-spec (To): 400 reasonable
    "baddn": (ANSWER, [400]),  # §3.1.2.15 non-token display names (and no empty line): 400; a proxy must not propagate it
    "badvers": (ANSWER, [505]),  # §3.1.2.16 unknown protocol version SIP/7.0: 505
    "mismatch01": (ANSWER, [400]),  # §3.1.2.17 start line and CSeq method mismatch: 400
    "mismatch02": (ANSWER, [400]),  # §3.1.2.18 unknown method with CSeq mismatch: 501 or 400
    "bigcode": (DROP, None),  # §3.1.2.19 overlarge response code: drop it
    # 3.2 Transaction layer
    "badbranch": (FORWARD, CORE),  # §3.2.1 bare z9hG4bK branch: 400 or fall back to RFC 2543 matching (we fall back)
    # 3.3 Application layer
    "insuf": (ANSWER, [400]),  # §3.3.1 missing Call-ID, From, To: 400
    "unkscm": (ANSWER, [416]),  # §3.3.2 unknown Request-URI scheme: 416
    "novelsc": (ANSWER, [416]),  # §3.3.3 soap.beep Request-URI: 416 when never meaningful here
    "unksm2": (FORWARD, CORE),  # §3.3.4 unknown schemes in To/From/Contact (R-URI is sip:): proxies treat it like any other request
    "bext01": (ANSWER, [420]),  # §3.3.5 Proxy-Require: 420 with Unsupported listing the Proxy-Require tags
    "invut": (FORWARD, CORE),  # §3.3.6 unknown Content-Type: 415 is for a UAS; a proxy forwards
    "regaut01": (FORWARD, CORE),  # §3.3.7 unknown Authorization scheme: for the registrar (401); a proxy forwards
    "multi01": (ANSWER, [400]),  # §3.3.8 several values in single-value fields: 400
    "mcl01": (ANSWER, [400]),  # §3.3.9 several Content-Length values: 400, never forwarded
    "bcast": (DROP, None),  # §3.3.10 200 OK with a broadcast Via: proxies drop it, never send to 255.255.255.255
    "zeromf": (ANSWER, [200]),  # §3.3.11 Max-Forwards 0: never forwarded; an OPTIONS may be answered (RFC 3261 §16.3 step 3), else 483
    "cparam01": (FORWARD, CORE),  # §3.3.12 REGISTER with a Contact header parameter: valid
    "cparam02": (FORWARD, CORE),  # §3.3.13 REGISTER with a url-parameter: valid
    "regescrt": (FORWARD, CORE),  # §3.3.14 REGISTER with an escaped header in a <> Contact URI: valid
    "sdp01": (FORWARD, CORE),  # §3.3.15 Accept without application/sdp: a UAS question (406/400); a proxy forwards
    # 3.4 Backward compatibility
    "inv2543": (FORWARD, CORE),  # §3.4.1 RFC 2543 INVITE (no branch, tag, Max-Forwards, Content-Length): accepted and forwarded
    # Not one of the RFC's sections, but in its archive
    "test": (DROP, None),  # Request-Line without SIP-Version and no Via (RFC 3261 §7.1, §8.1.1.7): nowhere to answer
}

# Headers the proxy itself edits when forwarding (RFC 3261 §16.6): everything else stays as is.
PROXY_EDITED = frozenset({"via", "max-forwards", "record-route"})


def _edited(msg: Message) -> frozenset[str]:
    """What sipguard edits in ``msg``: PROXY_EDITED, and Route in a new request from outside
    (a pre-loaded route the core is not to follow: removed)."""
    return PROXY_EDITED | {"route"} if msg.to_tag is None else PROXY_EDITED


def _files() -> list[str]:
    return sorted(p.stem for p in TORTURE.glob("*.dat"))


def _load(name: str) -> bytes:
    path = TORTURE / f"{name}.dat"
    assert path.is_file(), f"RFC 4475 torture message missing: {path}"
    return path.read_bytes()


def _dest(flow: Any) -> tuple[str, int]:
    """Where a send goes, whatever the shape of the proxy's destination."""
    addr = getattr(flow, "addr", None)
    return tuple(addr) if addr is not None else (flow.host, flow.port)  # type: ignore[return-value]


def _known_dialog(h: Harness, data: bytes) -> None:
    """An in-dialog torture request (a To tag) is fed as part of a call sipguard set up with
    CALLER, whose core side answered with its To tag, target and route set — from outside, sipguard refuses in-dialog requests for dialogs it does not know."""
    try:
        msg = parse_message(data)
        if msg.method is None or msg.to_tag is None or msg.method == "ACK":
            return
        caller_tag = msg.from_tag or ""
    except SipParseError:
        return  # malformed: the proxy answers it before any dialog matters
    if dialog_key(msg.call_id, caller_tag) in h.proxy.dialogs:
        return
    dialog = Dialog(msg.call_id, caller_tag, msg.to_tag, None, None, (), None, CALLER, h.now,
                    h.now + 3600, party=Flow("udp", CALLER, 0))
    # the core side answered with this tag, its target and route set what the request names
    routes = tuple(r for r in msg.routes if not h.proxy.router.is_ours(r.uri)) \
        if msg.has("route") else ()
    dialog.pin_tag, dialog.pin_target, dialog.pin_routes = msg.to_tag, msg.request_uri.raw, routes
    dialog.pin_final = True
    dialog.from_user = _from_key(msg.from_.uri)
    h.proxy.table.add(dialog)


def _run(data: bytes, h: Harness | None = None) -> tuple[Harness, list[tuple[Flow, bytes]]]:
    """Feed one datagram from CALLER; return the raw bytes the proxy sent (not re-parsed: an
    answer to a broken request may itself echo broken headers)."""
    h = h or Harness(allow_methods=ANY_METHOD)
    _known_dialog(h, data)
    h.proxy.receive(data, Flow("udp", CALLER, 0), h.now)
    out = list(h.proxy.outbox)
    h.proxy.outbox.clear()
    h.events.extend(h.proxy.events)
    h.proxy.events.clear()
    return h, out


def _status(raw: bytes) -> int:
    assert raw.startswith(b"SIP/2.0 "), raw[:40]
    return int(raw.split(b" ", 2)[1])


def _expected_body(data: bytes, msg: Message) -> bytes:
    """The body as RFC 3261 §18.3 defines it for a datagram, computed apart from the parser."""
    start = data.index(b"\r\n\r\n") + 4
    length = msg.content_length
    return data[start:] if length is None else data[start : start + length]


def test_table_covers_every_file() -> None:
    """Every file of the archive has an expected outcome, and every outcome a file."""
    assert _files() == sorted(CASES)
    assert len(CASES) == 50


@pytest.mark.parametrize("name", sorted(CASES))
def test_torture_message(name: str) -> None:
    """The proxy does with the message what RFC 4475 says an element in its role should."""
    outcome, expected = CASES[name]
    data = _load(name)
    h, out = _run(data)
    responses = [(f, d) for f, d in out if d.startswith(b"SIP/2.0 ")]
    requests = [(f, d) for f, d in out if not d.startswith(b"SIP/2.0 ")]
    assert all(_dest(f)[0] != "255.255.255.255" for f, _ in out)
    # Whatever we answer goes back to where the request came from.
    assert all(_dest(f)[0] == CALLER[0] for f, _ in responses)
    if outcome == DROP:
        assert out == []
        return
    if outcome == ANSWER:
        assert requests == [], "an invalid request must never be forwarded"
        assert [_status(d) for _, d in responses] == expected
        if expected[0] >= 400:
            fails = [e for e in h.events if isinstance(e, ParseFailed)]
            assert not fails or fails[-1].answered
        return
    # FORWARD
    orig = parse_message(data)
    assert [_dest(f) for f, _ in requests] == [expected], "exactly one forwarded copy"
    assert [_status(d) for _, d in responses] == ([100] if orig.method == "INVITE" else [])
    sent = requests[0][1]
    fwd = parse_message(sent)
    assert fwd.start_line == orig.start_line
    # Every header the proxy does not own leaves byte for byte, in order.
    edited = _edited(orig)
    kept = [line for n, line in zip(orig.names, orig.lines, strict=True) if n not in edited]
    left = [line for n, line in zip(fwd.names, fwd.lines, strict=True) if n not in edited]
    if orig.to_tag is None:
        assert not fwd.has("route")
    if orig.content_length is None:  # RFC 2543 style: the proxy adds it at the end
        assert left[-1] == f"Content-Length: {len(orig.body)}".encode()
        left = left[:-1]
    assert left == kept
    # Via: ours prepended; the caller's lines below the top one untouched.
    orig_vias = [line for n, line in zip(orig.names, orig.lines, strict=True) if n == "via"]
    fwd_vias = [line for n, line in zip(fwd.names, fwd.lines, strict=True) if n == "via"]
    assert fwd_vias[2:] == orig_vias[1:]
    assert fwd.body == _expected_body(data, orig)


def test_dblreq_forwards_only_the_register() -> None:
    """RFC 4475 §3.1.1.8: the INVITE after the REGISTER in the datagram is noise, never sent."""
    _, out = _run(_load("dblreq"))
    assert len(out) == 1
    fwd = parse_message(out[0][1])
    assert fwd.method == "REGISTER" and fwd.body == b""
    assert b"INVITE" not in out[0][1]


def test_bext01_unsupported_lists_the_proxy_require_tags() -> None:
    """RFC 4475 §3.3.5 / RFC 3261 §16.3 step 5: a proxy lists Proxy-Require, not Require."""
    _, out = _run(_load("bext01"))
    resp = parse_message(out[0][1])
    assert resp.status == 420
    assert resp.get("unsupported") == "noProxiesSupportThis, norDoAnyProxiesSupportThis"


def test_zeromf_is_answered_locally_or_483() -> None:
    """RFC 3261 §16.3 step 3: Max-Forwards 0 is never forwarded; OPTIONS may be answered (200,
    Accept per §11.2), anything else — or OPTIONS when local answering is off — gets 483."""
    _, out = _run(_load("zeromf"))
    resp = parse_message(out[0][1])
    assert (resp.status, resp.get("accept")) == (200, "application/sdp")
    _, out = _run(_load("zeromf"), Harness(answer_options=False, allow_methods=ANY_METHOD))
    assert [_status(d) for _, d in out] == [483]
    invite = _load("zeromf").replace(b"OPTIONS", b"INVITE")
    _, out = _run(invite)
    assert [_status(d) for _, d in out] == [100, 483]


def test_baddn_with_its_empty_line_is_still_rejected() -> None:
    """RFC 4475 §3.1.2.15: even well framed, unquoted non-token display names get 400, since a
    proxy that forwards headers byte for byte would propagate the error."""
    _, out = _run(_load("baddn") + b"\r\n")
    assert [_status(d) for _, d in out] == [400]


def test_escruri_headers_never_reach_the_next_hop() -> None:
    """RFC 4475 §3.1.2.11: whatever a proxy does, ?Route= must not appear in what it sends."""
    _, out = _run(_load("escruri"))
    assert all(b"?Route=" not in d.split(b"\r\n", 1)[0] for _, d in out)
    assert all(b"Route: <sip:example.com>" not in d for _, d in out)


def test_malformed_requests_leave_no_transaction_behind() -> None:
    """A request rejected for its syntax gets one answer and creates no server transaction."""
    for name, (outcome, _) in CASES.items():
        if outcome != ANSWER or name in ("unkscm", "novelsc", "bext01", "zeromf"):
            continue
        h, _ = _run(_load(name))
        assert h.proxy.servers == {}, name


def test_bcast_response_through_our_transaction_is_not_sent_to_broadcast() -> None:
    """RFC 4475 §3.3.10: even when the response really is for a request we forwarded, with the
    caller's Via naming 255.255.255.255, it goes back to where the request came from."""
    h = Harness()
    data = (
        b"INVITE sip:user@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 255.255.255.255;branch=z9hG4bK1saber23\r\n"
        b"Max-Forwards: 70\r\nFrom: sip:user@example.com;tag=11141343\r\n"
        b"To: sip:user@example.edu\r\nCall-ID: bcast.0384840201234ksdfak3j2erwedfsASdf\r\n"
        b"CSeq: 35 INVITE\r\nContact: <sip:user@host28.example.com>\r\nContent-Length: 0\r\n\r\n"
    )
    out = h.send(data)
    fwd = [m for f, m in out if f.addr == CORE]
    assert len(fwd) == 1
    out = h.send(answer(fwd[0], 200, "OK"), src=CORE)
    assert [(f.addr[0], m.status) for f, m in out] == [(CALLER[0], 200)]
    assert all(f.addr[0] != "255.255.255.255" for f, _ in out)
    # The response arrives with the stray bcast.dat top Via instead: dropped.
    _, out = _run(_load("bcast"), h)
    assert out == []


def test_valid_requests_survive_a_reparse_with_only_proxy_edits() -> None:
    """Re-parsing each forwarded valid request gives the original headers except our own edits:
    our Via on top (and received= on the caller's), Record-Route on dialog-creating requests,
    Max-Forwards minus one (70 when absent) and a Content-Length when absent."""
    for name, (outcome, _) in CASES.items():
        if outcome != FORWARD:
            continue
        data = _load(name)
        orig = parse_message(data)
        _, out = _run(data)
        fwd = parse_message([d for _, d in out if not d.startswith(b"SIP/2.0 ")][0])
        # Via: ours on top, then the original ones, the caller's stamped with received=.
        ours, *theirs = fwd.vias
        assert (ours.host, ours.port) == PROXY and ours.branch.startswith("z9hG4bKsg"), name
        assert ours.has_rport
        assert [(v.transport, v.host, v.port, v.branch) for v in theirs] == [
            (v.transport, v.host, v.port, v.branch) for v in orig.vias
        ], name
        assert theirs[0].received == (orig.top_via.received or CALLER[0]), name
        # Max-Forwards.
        # RFC 3261 §16.6 step 3: minus one, or 70 added when absent.
        assert fwd.max_forwards == (70 if orig.max_forwards is None else orig.max_forwards - 1)
        # Record-Route: ours on top of the request's own for initial dialog-creating requests
        # (wsinv carries a To tag: a mid-dialog request, not recorded).
        initial = orig.to_tag is None and orig.method in ("INVITE", "SUBSCRIBE", "REFER")
        rr_ours = ["<sip:192.0.2.1:5060;lr>"] if initial else []
        assert [str(r) for r in fwd.record_routes] == rr_ours + [
            str(r) for r in orig.record_routes
        ], name
        # Everything else: same names and values, in order.
        def rest(m: Message, edited: frozenset[str] = _edited(orig)) -> list[tuple[str, str]]:
            return [(n, m.value_at(i)) for i, n in enumerate(m.names) if n not in edited]

        expected = rest(orig)
        if orig.content_length is None:
            expected.append(("content-length", str(len(orig.body))))
        assert rest(fwd) == expected, name
        assert (fwd.method, fwd.uri_text, fwd.cseq, fwd.call_id) == (
            orig.method, orig.uri_text, orig.cseq, orig.call_id
        )
        assert (fwd.from_tag, fwd.to_tag) == (orig.from_tag, orig.to_tag)
        assert fwd.body == orig.body
