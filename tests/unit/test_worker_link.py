"""The workers' hand-over (sipguard/transport/worker_link.py) over real Unix sockets: the
owner of a datagram by its caller, the envelope both ways, a malformed envelope counted, and a
hand-over to a worker that is not there refused (handled where it was read)."""

from __future__ import annotations

import asyncio
import os
import socket
import zlib
from collections import Counter
from pathlib import Path

import pytest

from sipguard.contract import Flow
from sipguard.transport.worker_link import WorkerLink, owner_of, socket_path, unpack


def _invite(caller: str, call_id: str = "abc@host") -> bytes:
    return (f"INVITE sip:+18005550199@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5;"
            f"branch=z9hG4bK1\r\nFrom: \"X\" <sip:{caller}@127.0.0.1>;tag=1\r\n"
            f"To: <sip:+18005550199@127.0.0.1>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def test_owner_is_the_callers_crc_and_the_same_for_cancel_and_compact_form() -> None:
    invite = _invite("+12125550100")
    want = zlib.crc32(b"+12125550100") % 4
    assert owner_of(invite, 4) == want
    cancel = invite.replace(b"INVITE sip", b"CANCEL sip").replace(b"1 INVITE", b"1 CANCEL")
    assert owner_of(cancel, 4) == want
    compact = invite.replace(b"\r\nFrom:", b"\r\nf :")
    assert owner_of(compact, 4) == want
    tel = invite.replace(b"<sip:+12125550100@127.0.0.1>", b"<tel:+12125550100>")
    assert owner_of(tel, 4) == want
    # no From user: by Call-ID; neither: None (handled where it was read)
    anonymous = invite.replace(b"<sip:+12125550100@127.0.0.1>", b"<sip:127.0.0.1>")
    assert owner_of(anonymous, 4) == zlib.crc32(b"abc@host") % 4
    assert owner_of(b"\r\n\r\n", 4) is None
    owners = {owner_of(_invite(f"+1212555{i:04d}"), 2) for i in range(40)}
    assert owners == {0, 1}


def test_envelope_round_trip_and_malformed() -> None:
    assert unpack(b"nonsense") is None
    assert unpack(b"SGW1\x00\x00\x05\x09abc") is None  # address longer than the envelope


@pytest.mark.asyncio
async def test_hand_over_between_two_workers(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    got: list[tuple[bytes, Flow]] = []
    counters: Counter[str] = Counter()
    a = WorkerLink(tmp_path, 0, 2, lambda d, f: None, counters)
    b = WorkerLink(tmp_path, 1, 2, lambda d, f: got.append((d, f)), counters)
    a.open(loop)
    b.open(loop)
    try:
        assert oct(os.stat(socket_path(tmp_path, 1)).st_mode & 0o777) == "0o600"
        data = _invite("+12125550100")
        for flow in (Flow("udp", ("127.0.0.1", 5070), 1), Flow("udp", ("::1", 5071), 1)):
            assert a.hand_over(1, data, flow)
        # a malformed envelope, from another socket of this user: counted, not delivered
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        raw.sendto(b"garbage", socket_path(tmp_path, 1))
        raw.close()
        for _ in range(100):
            if len(got) == 2 and counters["worker_handover_bad"] == 1:
                break
            await asyncio.sleep(0.01)
        assert got == [(data, Flow("udp", ("127.0.0.1", 5070), 1)),
                       (data, Flow("udp", ("::1", 5071), 1))]
        assert counters["worker_handed_over"] == counters["worker_received_over"] == 2
        assert counters["worker_handover_bad"] == 1
        b.close()
        assert not os.path.exists(socket_path(tmp_path, 1))
        # worker 1 gone (restarting): refused, counted; the caller handles it itself
        assert not a.hand_over(1, data, Flow("udp", ("127.0.0.1", 5070), 1))
        assert counters["worker_handover_failed"] == 1
    finally:
        a.close()
        b.close()
