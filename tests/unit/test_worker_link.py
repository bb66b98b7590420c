"""The workers' hand-over (sipguard/transport/worker_link.py) over real loopback sockets: the
owner of a datagram by its caller, the envelope both ways, hellos between workers started in
either order, an envelope without the group's secret refused, a change broadcast, and a
hand-over to a worker whose port is not known refused (handled where it was read); a link
for changes only (worker_spread: source); the recent changes sent again to a worker
restarted, held until it has read its suspensions."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sipguard.contract import Flow
from sipguard.transport.worker_link import (
    _RECORD,
    BATCH_BYTES,
    MAGIC,
    REPLAY_S,
    TOKEN_FILE,
    WorkerLink,
    make_token,
    named_port,
    owner_of,
    port_file,
    unpack,
)


def _crc(number: str) -> int:
    """The hash a number is handed over by: of its last eight digits."""
    return zlib.crc32(number.lstrip("+")[-8:].encode())


def _invite(caller: str, call_id: str = "abc@host") -> bytes:
    return (f"INVITE sip:+18005550199@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5;"
            f"branch=z9hG4bK1\r\nFrom: \"X\" <sip:{caller}@127.0.0.1>;tag=1\r\n"
            f"To: <sip:+18005550199@127.0.0.1>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def test_owner_is_the_callers_crc_and_the_same_for_cancel_and_compact_form() -> None:
    invite = _invite("+12125550100")
    want = _crc("+12125550100") % 4  # a number: its last eight digits
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


def _bye_from_core(route: str, callee: str = "+18005550199") -> bytes:
    """The core's BYE for a call from +12125550100, sent to the public address with the
    route set the worker recorded."""
    return (f"BYE sip:+12125550100@127.0.0.1:5062 SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.10:5080;"
            f"branch=z9hG4bKcore1\r\nRoute: {route}\r\nMax-Forwards: 70\r\n"
            f"From: <sip:{callee}@10.0.0.10>;tag=core1\r\n"
            f"To: <sip:+12125550100@127.0.0.1>;tag=f1\r\nCall-ID: abc@host\r\n"
            "CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n").encode()


@pytest.mark.parametrize("route, port", [  # (the BYE carries a To tag: in dialog)
    ("<sip:127.0.0.1:40001;lr>", 40001),
    ("<sip:sipguard@[::1]:40002;lr;transport=udp>", 40002),
    ('"edge" <sips:edge.example.net:40003;lr>, <sip:10.0.0.1:5060;lr>', 40003),
    ("sip:192.0.2.1:40004;lr", 40004),
    ("<sip:127.0.0.1;lr>", None),  # no port named: not one of a worker's
])
def test_named_port_of_a_request_is_its_top_routes(route: str, port: int | None) -> None:
    assert named_port(_bye_from_core(route)) == port


def test_named_port_of_a_response_is_its_top_vias() -> None:
    ok = (b"SIP/2.0 200 OK\r\nv: SIP/2.0/UDP 127.0.0.1:40001;branch=z9hG4bKsg1, "
          b"SIP/2.0/UDP 10.0.0.10:5080;branch=z9hG4bKcore1\r\nVia: SIP/2.0/UDP 10.9.9.9:7\r\n"
          b"From: <sip:+18005550199@10.0.0.10>;tag=core1\r\nCall-ID: abc@host\r\n"
          b"CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n")
    assert named_port(ok) == 40001
    # a Route or Via only in the body is not read; nor a Route in a response
    body = b"INVITE sip:x@h SIP/2.0\r\nContent-Length: 30\r\n\r\nRoute: <sip:127.0.0.1:40001>\r\n"
    assert named_port(body) is None


def test_owner_of_an_in_dialog_request_is_the_worker_its_route_names() -> None:
    """A BYE from the core to the public address names the callee in From: it goes to the
    worker whose own port is in its Route, not to the callee's hash."""
    own_ports = {40000: 0, 40001: 1, 40002: 0, 40003: 1}  # two listeners, two workers
    callee = next(f"+1800555{i:04d}" for i in range(100)
                  if _crc(f"+1800555{i:04d}") % 2 == 0)
    bye = _bye_from_core("<sip:127.0.0.1:40001;lr>", callee)
    assert owner_of(bye, 2) == 0  # by From, as before: the wrong worker
    assert owner_of(bye, 2, own_ports) == 1
    assert owner_of(_bye_from_core("<sip:127.0.0.1:40002;lr>", callee), 2, own_ports) == 0
    # a Route naming another port (the public one, a preloaded route): by the caller again
    assert owner_of(_bye_from_core("<sip:127.0.0.1:5060;lr>", callee), 2, own_ports) == 0
    invite = _invite("+12125550100")
    assert owner_of(invite, 2, own_ports) == _crc("+12125550100") % 2
    # an initial request naming a worker's port in its own Route still goes by its caller:
    # a caller does not pick the worker that decides its calls
    for port in own_ports:
        routed = invite.replace(b"\r\nFrom:", f"\r\nRoute: <sip:127.0.0.1:{port};lr>\r\nFrom:"
                                .encode())
        assert named_port(routed) is None
        assert owner_of(routed, 2, own_ports) == _crc("+12125550100") % 2


def test_a_request_from_the_core_goes_by_the_party_outside_it() -> None:
    """Without a worker's port in its Route, a request from the core goes by its To: the core's
    BYE of a caller's call (the callee in From, the caller in To) meets the caller's worker,
    and a call the core places (its INVITE and CANCEL, To: the number called) meets that
    party's own requests (From: that number). Responses still go by From (and by the worker's
    port in their top Via first)."""
    caller, external = "+12125550100", "+18005550199"
    want = _crc(caller) % 4
    callee = next(f"+1800555{i:04d}" for i in range(100)
                  if _crc(f"+1800555{i:04d}") % 4 != want)
    bye = _bye_from_core("<sip:127.0.0.1;lr>", callee)  # names no worker's port
    assert owner_of(bye, 4) == _crc(callee) % 4  # by From: another worker
    assert owner_of(bye, 4, from_core=True) == want
    placed = _invite("+31201234567")  # the core's call to `external` (To)
    outside = _crc(external) % 4
    assert owner_of(placed, 4, from_core=True) == outside
    cancel = placed.replace(b"INVITE sip", b"CANCEL sip").replace(b"1 INVITE", b"1 CANCEL")
    assert owner_of(cancel, 4, from_core=True) == outside
    theirs = (f"BYE sip:+31201234567@10.0.0.10 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.9:5060;"
              f"branch=z9hG4bKx\r\nFrom: <sip:{external}@192.0.2.9>;tag=9\r\n"
              f"t: <sip:+31201234567@10.0.0.10>;tag=1\r\nCall-ID: abc@host\r\n"
              "CSeq: 5 BYE\r\nContent-Length: 0\r\n\r\n").encode()
    assert owner_of(theirs, 4) == outside
    ringing = (f"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKsg1\r\n"
               f"From: <sip:{caller}@127.0.0.1>;tag=1\r\nTo: <sip:{callee}@10.0.0.10>;tag=2\r\n"
               "Call-ID: abc@host\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n").encode()
    assert owner_of(ringing, 4, from_core=True) == want


def test_batch_records_and_cut_short_ones() -> None:
    flow = Flow("udp", ("192.0.2.1", 5070), 1)
    one = _RECORD.pack(1, 5070, 9, 3) + b"192.0.2.1" + b"abc"
    assert unpack(b"B" + one + one, 1) == [(b"abc", flow), (b"abc", flow)]
    assert unpack(b"B" + one + one[:-1], 1) == [(b"abc", flow)]  # the cut record is dropped
    assert unpack(b"B\x00\x00\x05\x09", 1) == []


async def _until(check: Any) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_hand_over_changes_and_hellos(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    make_token(tmp_path)
    assert oct(os.stat(tmp_path / TOKEN_FILE).st_mode & 0o777) == "0o600"
    got: list[tuple[bytes, Flow]] = []
    changes: list[dict[str, Any]] = []
    counters: Counter[str] = Counter()
    a = WorkerLink(tmp_path, 0, 3, lambda d, f: None, counters)
    b = WorkerLink(tmp_path, 1, 3, lambda d, f: got.append((d, f)), counters)
    b.start_control(changes.append)
    a.open(loop)  # a first: it finds nobody, b greets it
    b.open(loop)
    try:
        await _until(lambda: a.ports[1] is not None)
        assert a.ports[1] == b.ports[1] == int((tmp_path / "worker-1.port").read_text())
        data = _invite("+12125550100")
        for flow in (Flow("udp", ("127.0.0.1", 5070), 1), Flow("udp", ("::1", 5071), 1)):
            assert a.hand_over(1, data, flow)
        assert not got
        a.flush()  # both in one envelope
        assert a.broadcast({"op": "suspend", "key": "+1212"}) == 1  # worker 2 is not up
        assert counters["worker_control_failed"] == 1
        assert not a.hand_over(2, data, Flow("udp", ("127.0.0.1", 5070), 1))
        assert counters["worker_handover_failed"] == 1
        # envelopes from a local process that does not know the secret: counted, dropped
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        port = b.ports[1]
        assert port is not None
        for junk in (b"garbage", MAGIC + b"\x00" * 16 + b"B" + data, b"INVITE sip:x SIP/2.0"):
            raw.sendto(junk, ("127.0.0.1", port))
        raw.close()
        await _until(lambda: len(got) == 2 and changes and counters["worker_handover_bad"] == 3)
        assert got == [(data, Flow("udp", ("127.0.0.1", 5070), 1)),
                       (data, Flow("udp", ("::1", 5071), 1))]
        assert [(c["op"], c["key"]) for c in changes] == [("suspend", "+1212")]
        assert counters["worker_handed_over"] == counters["worker_received_over"] == 2
        assert counters["worker_handover_bad"] == 3
        # b restarts on another port: its hello replaces the old one at a
        b.close()
        b2 = WorkerLink(tmp_path, 1, 3, lambda d, f: got.append((d, f)), counters)
        b2.open(loop)
        try:
            await _until(lambda: a.ports[1] == b2.ports[1])
            assert a.ports[1] == b2.ports[1] == int(Path(port_file(tmp_path, 1)).read_text())
            assert a.hand_over(1, data, Flow("udp", ("127.0.0.1", 5072), 1))
            a.flush()
            await _until(lambda: len(got) == 3)
            assert got[2][1].addr == ("127.0.0.1", 5072)
        finally:
            b2.close()
    finally:
        a.close()
        b.close()


def test_a_worker_without_the_secret_does_not_start(tmp_path: Path) -> None:
    link = WorkerLink(tmp_path, 0, 2, lambda d, f: None, Counter())
    with pytest.raises(OSError):
        link.open(None)
    (tmp_path / TOKEN_FILE).write_bytes(b"short")
    with pytest.raises(OSError):
        link.open(None)


@pytest.mark.asyncio
async def test_a_pass_larger_than_one_envelope_goes_in_several(tmp_path: Path) -> None:
    """200 datagrams of 1 kB handed over in one pass: several envelopes under BATCH_BYTES,
    every datagram delivered once, in order; one too large for any envelope is refused."""
    loop = asyncio.get_running_loop()
    make_token(tmp_path)
    got: list[bytes] = []
    counters: Counter[str] = Counter()
    a = WorkerLink(tmp_path, 0, 2, lambda d, f: None, counters)
    b = WorkerLink(tmp_path, 1, 2, lambda d, f: got.append(d), counters)
    a.open(loop)
    b.open(loop)
    try:
        await _until(lambda: a.ports[1] is not None)
        sent = [b"%04d" % i + b"x" * 1000 for i in range(200)]
        flow = Flow("udp", ("127.0.0.1", 5070), 1)
        for d in sent:
            assert a.hand_over(1, d, flow)
        assert not a.hand_over(1, b"y" * BATCH_BYTES, flow)
        a.flush()
        await _until(lambda: len(got) == 200)
        assert got == sent
        assert counters["worker_handover_failed"] == 1
        assert counters["worker_received_over"] == 200
    finally:
        a.close()
        b.close()


@pytest.mark.asyncio
async def test_a_control_only_link_carries_changes_and_refuses_datagrams(tmp_path: Path) -> None:
    """``handover=False`` (worker_spread: source): hellos and changes go both ways, a
    hand-over is refused where it would be made, and a ``B`` envelope sent to it anyway is
    dropped as bad, never delivered."""
    loop = asyncio.get_running_loop()
    make_token(tmp_path)
    got: list[bytes] = []
    changes: list[dict[str, Any]] = []
    counters: Counter[str] = Counter()
    a = WorkerLink(tmp_path, 0, 2, lambda d, f: got.append(d), counters, handover=False)
    b = WorkerLink(tmp_path, 1, 2, lambda d, f: got.append(d), counters, handover=False)
    a.start_control(changes.append)
    b.start_control(changes.append)
    a.open(loop)
    b.open(loop)
    try:
        await _until(lambda: a.ports[1] is not None)
        assert b.broadcast({"op": "lift_ban", "source": "192.0.2.7"}) == 1
        assert not a.hand_over(1, _invite("+12125550100"), Flow("udp", ("127.0.0.1", 5070), 1))
        assert counters["worker_handover_failed"] == 1 and counters["worker_handed_over"] == 0
        record = _RECORD.pack(1, 5070, 9, 3) + b"192.0.2.1" + b"abc"
        secret = (tmp_path / TOKEN_FILE).read_bytes()
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        port = b.ports[1]
        assert port is not None
        raw.sendto(MAGIC + secret + b"B\x00\x00" + record, ("127.0.0.1", port))
        raw.close()
        await _until(lambda: changes and counters["worker_handover_bad"] == 1)
        assert [(c["op"], c["source"]) for c in changes] == [("lift_ban", "192.0.2.7")]
        assert not got and counters["worker_received_over"] == 0
    finally:
        a.close()
        b.close()


@pytest.mark.asyncio
async def test_a_restarted_worker_is_sent_the_recent_changes_and_holds_them(
        tmp_path: Path) -> None:
    """Worker 1 down while workers 0 and 2 send changes (to its old port: lost); started
    again, its hello brings them back from both — a suspension with what is left of its ttl
    — and it holds them until start_control (it has read the suspensions file by then), then
    applies them in the order they were made, whichever worker sent them first: worker 2's
    suspension, then worker 0's lift of it. A change older than REPLAY_S is not sent again."""
    loop = asyncio.get_running_loop()
    make_token(tmp_path)
    counters: Counter[str] = Counter()
    now = [1000.0]
    a = WorkerLink(tmp_path, 0, 3, lambda d, f: None, counters, clock=lambda: now[0])
    b = WorkerLink(tmp_path, 1, 3, lambda d, f: None, counters)
    c = WorkerLink(tmp_path, 2, 3, lambda d, f: None, counters, clock=lambda: now[0])
    for link in (a, b, c):
        link.open(loop)
    try:
        await _until(lambda: a.ports[1] is not None and c.ports[1] is not None)
        b.close()
        a.broadcast({"op": "suspend", "key": "+1303", "ttl": None})  # too old, below
        now[0] += REPLAY_S - 5
        c.broadcast({"op": "suspend", "key": "+1212", "ttl": 60.0})
        now[0] += 4
        a.broadcast({"op": "unsuspend", "key": "+1212"})
        now[0] += 2  # the first is now REPLAY_S + 1 old
        changes: list[dict[str, Any]] = []
        b2 = WorkerLink(tmp_path, 1, 3, lambda d, f: None, counters)
        b2.open(loop)
        try:
            await _until(lambda: counters["worker_control_replayed"] == 2)
            await asyncio.sleep(0.05)  # (arrived, held)
            assert counters["worker_control_replayed"] == 2
            assert not changes and counters["worker_control_received"] == 0
            b2.start_control(changes.append)
            assert changes == [{"op": "suspend", "key": "+1212", "ttl": 54.0, "at": 1025.0},
                               {"op": "unsuspend", "key": "+1212", "at": 1029.0}]
            assert counters["worker_control_received"] == 2
            assert a.broadcast({"op": "lift_ban", "source": "192.0.2.7"}) == 2  # at once
            await _until(lambda: len(changes) == 3)
            assert changes[2]["op"] == "lift_ban"
        finally:
            b2.close()
    finally:
        for link in (a, b, c):
            link.close()


@pytest.mark.asyncio
async def test_the_hand_over_queue_is_watched_like_a_public_socket(tmp_path: Path) -> None:
    """Envelopes waiting for a busy worker: its hand-over socket's queue shows in
    ``receive_queue`` (what the overload watcher reads), and once it reads again the overload
    check runs every WATCH_EVERY datagrams with the wait they had in the queue, plus the
    sender's lag (how far behind its own sockets were)."""
    from sipguard.transport.udp import WATCH_EVERY

    loop = asyncio.get_running_loop()
    make_token(tmp_path)
    counters: Counter[str] = Counter()
    a = WorkerLink(tmp_path, 0, 2, lambda d, f: None, counters)
    b = WorkerLink(tmp_path, 1, 2, lambda d, f: None, counters)
    checks: list[float] = []
    b.watch = lambda: checks.append(b.delay)
    a.open(loop)
    b.open(loop)
    try:
        await _until(lambda: a.ports[1] is not None)
        assert b.receive_queue() == (0.0, 0)
        loop.remove_reader(b.sock.fileno())  # b is busy: nothing read
        flow = Flow("udp", ("127.0.0.1", 5070), 1)
        for i in range(2 * WATCH_EVERY):
            assert a.hand_over(1, b"INVITE %d" % i, flow)
            a.flush()  # one envelope each
        await asyncio.sleep(0.25)
        fill, drops = b.receive_queue()
        assert fill > 0 and drops == 0
        loop.add_reader(b.sock.fileno(), b._readable)
        await _until(lambda: counters["worker_received_over"] == 2 * WATCH_EVERY)
        assert len(checks) == 2
        assert 0.2 < checks[0] < 5.0  # the first watched envelope had waited ~0.25 s
        state = b.receive_queue()
        assert state == (0.0, 0)
        # what a sender hands over waited in its own queues first: its lag counts too
        a.lag = 1.5
        for i in range(WATCH_EVERY):
            assert a.hand_over(1, b"BYE %d" % i, flow)
        a.flush()  # one envelope of WATCH_EVERY datagrams: one check
        await _until(lambda: len(checks) == 3)
        assert 1.5 <= checks[2] < 2.5
    finally:
        a.close()
        b.close()


def test_a_tag_inside_the_uri_or_the_display_name_is_no_to_tag() -> None:
    """Only a tag among To's own parameters makes a request in-dialog for the hand-over, as
    for the parser: one in the URI (<sip:x@h;tag=1>) or in a quoted display name does not let
    a caller's INVITE pick a worker through its Route."""
    own_ports = {40000: 0, 40001: 1}
    invite = _invite("+12125550100")
    want = _crc("+12125550100") % 2
    for to in (b"To: <sip:+18005550199@127.0.0.1;tag=1>", b'To: "a;tag=b" <sip:x@127.0.0.1>'):
        for port in own_ports:
            forged = invite.replace(b"To: <sip:+18005550199@127.0.0.1>", to).replace(
                b"\r\nFrom:", f"\r\nRoute: <sip:127.0.0.1:{port};lr>\r\nFrom:".encode())
            assert named_port(forged) is None, to
            assert owner_of(forged, 2, own_ports) == want
    in_dialog = invite.replace(b"To: <sip:+18005550199@127.0.0.1>",
                               b'To: "a" <sip:x@127.0.0.1>;tag=b').replace(
        b"\r\nFrom:", b"\r\nRoute: <sip:127.0.0.1:40001;lr>\r\nFrom:")
    assert named_port(in_dialog) == 40001


def test_the_owner_is_the_from_uris_user_whatever_the_display_name_or_folding() -> None:
    """A display name holding "sip:..." or a From folded onto a second line hashes like the
    plain From: a caller cannot spread its calls over the workers by how it writes From."""
    invite = _invite("+12125550100")
    want = _crc("+12125550100") % 4
    for variant in (invite.replace(b'From: "X" <', b'From: "sip:rnd1" <'),
                    invite.replace(b'From: "X" <', b'From: "\\"sip:rnd2" <'),
                    invite.replace(b'From: "X" <', b'From:\r\n  "X" <'),
                    invite.replace(b'From: "X" <sip:', b'From: "X"\r\n\t<sip:')):
        assert owner_of(variant, 4) == want, variant


def test_a_number_in_any_spelling_has_one_owner() -> None:
    """The rules read +12125550100, 2125550100, %2B1-212-555-0100 and tel:+1(212)5550100 as
    one caller: so does the hand-over — a dialer writing From otherwise each call does not
    spread its calls over the workers, out of sight of each one's dialer analytics. Names
    keep their own hash."""
    want = owner_of(_invite("+12125550100"), 7)
    for spelling in ("2125550100", "12125550100", "%2B1-212-555-0100", "(212)555.0100",
                     "+12125550100;user=phone"):
        assert owner_of(_invite(spelling), 7) == want, spelling
    tel = _invite("+12125550100").replace(b"<sip:+12125550100@127.0.0.1>",
                                          b"<tel:+1-212-555-0100>")
    assert owner_of(tel, 7) == want
    assert owner_of(_invite("agenta"), 7) == zlib.crc32(b"agenta") % 7


def test_a_route_line_built_to_make_a_pattern_backtrack_costs_linear_time() -> None:
    """An in-dialog request whose first Route line is ~8 KB of "sip:sip:sip:..." (quadratic
    work for a backtracking pattern: ~60 ms each): named_port reads it in linear time — 200 of
    them well within a second — and finds no port."""
    bye = _bye_from_core("<" + "sip:" * 2000 + ">")
    started = time.process_time()
    for _ in range(200):
        assert named_port(bye) is None
    assert time.process_time() - started < 1.0


def test_a_header_block_cut_short_after_a_line_is_owned_without_an_error() -> None:
    """A datagram whose header block ends right after From's CRLF (no To, no empty line):
    the scans stop at its end (they read past it and raised IndexError in the loop's
    callback, the datagram unanswered)."""
    data = (b"INVITE sip:+18005550199@192.0.2.1 SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-cut\r\n"
            b"From: <sip:+12125550100@198.51.100.7>;tag=a\r\n")
    assert owner_of(data, 4) == owner_of(data + b"To: <sip:b@x>\r\n\r\n", 4)
    assert owner_of(data[:-1], 4) is not None
