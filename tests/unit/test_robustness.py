"""Property tests: whatever bytes arrive, parsing fails only with SipParseError, the proxy never
raises and never forwards what does not parse, and the TCP framer never raises."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipguard.contract import Flow
from sipguard.sip.errors import SipParseError
from sipguard.sip.framing import PING, StreamFramer
from sipguard.sip.message import Message
from sipguard.sip.parser import parse_message
from tests.unit.proxy_helpers import CALLER, Harness, invite

SETTINGS = settings(
    # SIPGUARD_FUZZ_EXAMPLES=20000 for a deeper run than the ~5 s per test of the default.
    max_examples=int(os.environ.get("SIPGUARD_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,  # no .hypothesis directory in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

RESPONSE = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKsg1.2;rport=5060\r\n"
    b"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-caller-1;received=198.51.100.7\r\n"
    b"Record-Route: <sip:192.0.2.1:5060;lr>\r\n"
    b"From: <sip:+12125550100@198.51.100.7>;tag=ftag1\r\nTo: <sip:+18005550199@192.0.2.1>;tag=t\r\n"
    b"Call-ID: call-1@caller\r\nCSeq: 1 INVITE\r\nContact: <sip:core@10.0.0.10:5080>\r\n"
    b"Content-Length: 0\r\n\r\n"
)
REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\nv: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-r\r\n"
    b"f: <sip:a@example.com>;tag=1\r\nt: <sip:a@example.com>\r\ni: r1\r\nCSeq: 3 REGISTER\r\n"
    b"m: <sip:a@198.51.100.7:5062>;expires=60, *\r\nRoute: <sip:192.0.2.1;lr>\r\nl: 0\r\n\r\n"
)
HISTORY = invite(extra=(
    "P-Asserted-Identity: \"A\" <sip:+12125550100@example.com>\r\n"
    "Diversion: <sip:+18005550111@example.com>;reason=user-busy\r\n"
    "History-Info: <sip:bob@example.com>;index=1, <sip:vm@example.com;cause=486>;index=1.1\r\n"
    "Identity: eyJhIjoxfQ.eyJiIjoyfQ.c2ln;info=<https://c.example.org/c.pem>;alg=ES256;ppt=shaken\r\n"
    "Subject: folded\r\n  subject line\r\n"
))
SEEDS = [invite(), RESPONSE, REGISTER, HISTORY]
_TORTURE = Path(__file__).resolve().parents[1] / "data" / "rfc4475"  # RFC 4475 messages
SEEDS += [p.read_bytes() for p in sorted(_TORTURE.glob("*.dat"))]
assert len(SEEDS) > 50, f"the RFC 4475 seeds are missing from {_TORTURE}"

# Bytes that matter to a SIP parser, inserted more often than chance would.
INTERESTING = [b"\r\n", b"\r\n ", b"\r\n\r\n", b":", b" ", b"\t", b";", b",", b"<", b">", b'"',
               b"\\", b"%", b"=", b"@", b"\x00", b"\n", b"\r", b"\xff", b"9999999999", b"SIP/2.0"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed message with a few random byte flips, insertions, deletions or duplications."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "dup", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.sampled_from(INTERESTING) | st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "dup":
            end = data.find(b"\r\n", pos)
            data[pos:pos] = data[pos : end + 2 if end >= 0 else pos + 8]
        else:
            del data[pos:]
    return bytes(data)


any_bytes = st.binary(max_size=2048)
inputs = mutated() | any_bytes


def _exercise(msg: Message, *, whole: bool = True) -> None:
    """Touch every accessor: each may fail, but only with SipParseError. A message that parsed
    (``whole``) serializes to bytes that parse to the same headers."""
    for name in ("vias", "top_via", "from_", "to", "from_tag", "to_tag", "contacts", "routes",
                 "record_routes", "p_asserted_identities", "diversions", "history_info",
                 "identities", "request_uri", "call_id", "cseq", "max_forwards",
                 "content_length"):
        with contextlib.suppress(SipParseError):
            getattr(msg, name)
    for i in range(len(msg.lines)):
        msg.value_at(i)
    msg.option_tags("supported")
    with contextlib.suppress(SipParseError):
        msg.check_request()
    data = msg.serialize()
    if whole:
        assert parse_message(data, max_size=1 << 20).names == msg.names


def _parses(data: bytes, **kw: Any) -> bool:
    try:
        parse_message(data, **kw)
    except SipParseError:
        return False
    return True


@SETTINGS
@given(data=any_bytes)
def test_parse_random_bytes_raises_only_sip_parse_error(data: bytes) -> None:
    """Random bytes either parse or raise SipParseError, for UDP and for TCP framing rules."""
    for datagram in (True, False):
        try:
            msg = parse_message(data, datagram=datagram)
        except SipParseError as err:
            assert err.status in (400, 505, 513)
        else:
            _exercise(msg)


@SETTINGS
@given(data=mutated())
def test_parse_mutated_messages_raises_only_sip_parse_error(data: bytes) -> None:
    """Valid messages with random damage either parse (and every accessor works or raises
    SipParseError) or raise SipParseError."""
    try:
        msg = parse_message(data)
    except SipParseError as err:
        assert err.status in (400, 505, 513)
        partial = getattr(err, "partial", None)
        if partial is not None:
            _exercise(partial, whole=False)
    else:
        _exercise(msg)


@SETTINGS
@given(data=inputs, tcp=st.booleans())
def test_proxy_never_raises_and_never_forwards_what_does_not_parse(data: bytes, tcp: bool) -> None:
    """Proxy.receive swallows any input; whatever does not parse never goes anywhere as a
    request, and every request it sends parses."""
    h = Harness()
    flow = Flow("tcp", CALLER, 1, 7) if tcp else Flow("udp", CALLER, 0)
    h.proxy.receive(data, flow, h.now)
    sent = [d for _, d in h.proxy.outbox]
    requests = [d for d in sent if not d.startswith(b"SIP/2.0 ")]
    if not _parses(data, datagram=not tcp):
        assert requests == []
    for d in requests:
        assert _parses(d)
    # Timers fire without raising too.
    h.advance(200.0)


@SETTINGS
@given(chunks=st.lists(st.binary(max_size=300) | mutated(), max_size=12),
       max_size=st.sampled_from([256, 4096, 65535]))
def test_framer_never_raises(chunks: list[bytes], max_size: int) -> None:
    """Random chunks frame into bytes and PINGs, and at worst leave a 400 or 513 in ``error``
    (nothing raises); the buffer never exceeds max_size plus the last chunk."""
    f = StreamFramer(max_size)
    for chunk in chunks:
        for item in f.feed(chunk):
            assert item is PING or (isinstance(item, bytes) and len(item) <= max_size)
        assert f.buffered <= max_size + len(chunk)
    assert f.error is None or f.error.status in (400, 513)


@SETTINGS
@given(data=st.lists(st.sampled_from(SEEDS[:4]), min_size=1, max_size=4), cuts=st.data())
def test_framer_gives_back_well_formed_streams_at_any_split(data: list[bytes], cuts: Any) -> None:
    """Valid messages (all with Content-Length) and pings, cut anywhere, come out intact."""
    stream = b"".join(b"\r\n\r\n" + d for d in data)
    points = sorted(cuts.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    f = StreamFramer()
    out: list[bytes | object] = []
    for a, b in zip([0, *points], [*points, len(stream)], strict=True):
        out.extend(f.feed(stream[a:b]))
    assert [x for x in out if x is not PING] == data
    assert sum(1 for x in out if x is PING) == len(data)
