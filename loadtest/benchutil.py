"""Helpers shared by the micro-benchmark scripts in loadtest/ (run as `python loadtest/x.py`)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Time without the cyclic GC: its passes cost by total heap size, whatever is timed."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


SDP = (
    "v=0\r\no=- 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\n"
    "m=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
)


def invite(i: int, caller: str, callee: str) -> bytes:
    """Initial INVITE number ``i`` from ``caller`` to ``callee`` (a peer at 198.51.100.7)."""
    return (
        f"INVITE sip:{callee}@192.0.2.1:5060;user=phone SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-{i}-a;rport\r\nMax-Forwards: 70\r\n"
        f"From: <sip:{caller}@198.51.100.7>;tag=f{i}\r\nTo: <sip:{callee}@192.0.2.1>\r\n"
        f"Call-ID: {i}-bench@198.51.100.7\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:{caller}@198.51.100.7:5062>\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(SDP)}\r\n\r\n{SDP}"
    ).encode()
