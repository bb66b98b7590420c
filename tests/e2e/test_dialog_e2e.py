"""Dialogs end to end, with a scripted core on 127.0.0.1: keep-alives free the slot of a call
whose BYE the core lost, a TCP caller gets the core's BYE on its own connection, and a core
response with no Via left is not forwarded."""

from __future__ import annotations

import re
import socket
import time
import uuid

import pytest

from .harness import HOST, E2EStack, events_total, free_port
from .scripted import Caller, Core, header

pytestmark = pytest.mark.e2e


def _tag(value: str) -> str:
    m = re.search(r"tag=([^;>\s]+)", value)
    assert m is not None, value
    return m.group(1)


def test_keepalive_frees_the_slot_of_a_call_whose_bye_the_core_lost(stack: E2EStack) -> None:
    """per_caller 1, dialog_keepalive_s 10: the core loses the caller's BYE and forgets the
    call; its 481 to sipguard's next in-dialog OPTIONS ends the call, and the caller's next
    call is accepted within 3 x 10 s of the BYE."""
    core = Core(lose_byes=True)
    _, port = stack.sipguard(
        core_port=core.port, listen=("udp",),
        config_extra="sip: {dialog_keepalive_s: 10}\nrules:\n  concurrency: {per_caller: 1}\n",
    )
    caller = Caller(port)
    try:
        caller.send(caller.request("INVITE", "ka-1"))
        [ok] = caller.finals()
        to_tag = _tag(header(ok, "To"))
        route = f"Route: {header(ok, 'Record-Route')}\r\n"
        caller.send(caller.request("ACK", "ka-1", to_tag=to_tag, extra=route))
        caller.send(caller.request("BYE", "ka-1", cseq=2, to_tag=to_tag, extra=route))
        bye_at = time.monotonic()
        n = 0
        while True:
            n += 1
            caller.send(caller.request("INVITE", f"ka-next-{n}"))
            finals = caller.finals(2.0, call_id=f"ka-next-{n}")
            if finals and finals[0].startswith(b"SIP/2.0 200 "):
                break
            assert finals and finals[0].startswith(b"SIP/2.0 403 "), finals
            assert time.monotonic() - bye_at < 30.0, "the slot was not freed in 3 intervals"
            time.sleep(1.0)
        assert "OPTIONS" in core.methods("ka-1")
    finally:
        caller.close()
        core.close()


def test_a_tcp_caller_gets_the_cores_bye_on_its_own_connection(stack: E2EStack) -> None:
    """A caller on TCP whose Contact names a port where nothing listens: the core's BYE
    reaches it on the connection it called on."""
    core = Core()
    _, port = stack.sipguard(core_port=core.port, listen=("udp", "tcp"))
    conn = socket.create_connection((HOST, port), timeout=5)
    try:
        local = conn.getsockname()[1]
        nowhere = free_port()
        call_id = f"tcp-{uuid.uuid4().hex[:8]}"
        invite = (
            f"INVITE sip:+18005550199@{HOST}:{port};transport=tcp SIP/2.0\r\n"
            f"Via: SIP/2.0/TCP {HOST}:{local};branch=z9hG4bK-{call_id}\r\nMax-Forwards: 70\r\n"
            f"From: <sip:+12125550100@{HOST}>;tag=tc1\r\nTo: <sip:+18005550199@{HOST}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:+12125550100@{HOST}:{nowhere};transport=tcp>\r\n"
            f"Content-Length: 0\r\n\r\n"
        ).encode()
        conn.sendall(invite)
        got = b""
        deadline = time.monotonic() + 3
        while b"SIP/2.0 200" not in got and time.monotonic() < deadline:
            got += conn.recv(65535)
        assert b"SIP/2.0 200" in got
        inv = next(d for d in core.received if d.startswith(b"INVITE"))
        routes = re.findall(rb"^Record-Route:\s*([^\r\n]+)", inv, re.M | re.I)
        bye = (
            f"BYE sip:+12125550100@{HOST}:{nowhere};transport=tcp SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{core.port};branch=z9hG4bK-corebye-{call_id}\r\n"
            + "".join(f"Route: {r.decode()}\r\n" for r in routes)
            + f"Max-Forwards: 70\r\nFrom: <sip:+18005550199@{HOST}>;tag=core1\r\n"
            f"To: <sip:+12125550100@{HOST}>;tag=tc1\r\nCall-ID: {call_id}\r\n"
            f"CSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        core.send(bye)
        got = b""
        deadline = time.monotonic() + 3
        conn.settimeout(0.2)
        while b"BYE sip:" not in got and time.monotonic() < deadline:
            try:
                got += conn.recv(65535)
            except TimeoutError:
                continue
        assert b"BYE sip:" in got and call_id.encode() in got
    finally:
        conn.close()
        core.close()


def test_a_core_answer_with_no_via_left_is_not_forwarded(stack: E2EStack) -> None:
    """A core that answers with only sipguard's Via: the caller hears 502, not that answer."""
    core = Core(only_top_via=True)
    _, port = stack.sipguard(core_port=core.port, listen=("udp",))
    caller = Caller(port)
    try:
        caller.send(caller.request("INVITE", "novia-1"))
        [final] = caller.finals()
        assert final.startswith(b"SIP/2.0 502 ")
    finally:
        caller.close()
        core.close()


def test_a_call_two_agents_answer_lasts_while_either_does(stack: E2EStack) -> None:
    """A forking core whose ring group answers twice (To tags core1, core2), per_caller 1: the
    caller ACKs both and hangs up the first answer, keeping the second (RFC 3261 §13.2.2.4).
    The call stays up on that leg — its slot held (a second call hears 403), its INFO reaches
    the second agent's Contact, counted noticed_call_kept_on_fork — and its BYE frees the
    slot (a new call goes through)."""
    core = Core(forks=2)
    metrics_port = free_port()
    _, port = stack.sipguard(
        core_port=core.port, listen=("udp",),
        config_extra=f"metrics: {{listen: {HOST}:{metrics_port}}}\n"
                     "rules:\n  concurrency: {per_caller: 1}\n",
    )
    caller = Caller(port)
    try:
        caller.send(caller.request("INVITE", "fork-1"))
        answers = caller.finals(want=2, call_id="fork-1")
        legs = sorted(_tag(header(ok, "To")) for ok in answers)
        assert legs == ["core1", "core2"], answers
        route = f"Route: {header(answers[0], 'Record-Route')}\r\n"
        for leg in legs:
            caller.send(caller.request("ACK", "fork-1", to_tag=leg, extra=route))
        caller.send(caller.request("BYE", "fork-1", cseq=2, to_tag="core1", extra=route))
        assert caller.finals(call_id="fork-1")[0].startswith(b"SIP/2.0 200 ")
        caller.send(caller.request("INVITE", "fork-2"))
        assert caller.finals(call_id="fork-2")[0].startswith(b"SIP/2.0 403 ")
        caller.send(caller.request("INFO", "fork-1", cseq=3, to_tag="core2", extra=route))
        assert caller.finals(call_id="fork-1")[0].startswith(b"SIP/2.0 200 ")
        [info] = [d for d in core.received if d.startswith(b"INFO ")]
        assert info.startswith(f"INFO sip:agent2@{HOST}:{core.port} ".encode()), info[:60]
        caller.send(caller.request("BYE", "fork-1", cseq=4, to_tag="core2", extra=route))
        assert caller.finals(call_id="fork-1")[0].startswith(b"SIP/2.0 200 ")
        caller.send(caller.request("INVITE", "fork-3"))
        assert caller.finals(call_id="fork-3")[0].startswith(b"SIP/2.0 200 ")
        assert events_total(metrics_port).get("noticed_call_kept_on_fork") == 1
    finally:
        caller.close()
        core.close()


def test_a_call_kept_on_a_leg_the_caller_never_acked_frees_its_slot(stack: E2EStack) -> None:
    """The forking core answers twice; the caller ACKs the first answer only and hangs it up,
    and the core never ends the second leg. The call kept on that un-ACKed leg ends 64*T1 on
    (T1 50 ms here: 3.2 s) with a BYE to the core in that leg, and the caller's slot is free
    again — it was held for the call's whole lifetime (4 h)."""
    core = Core(forks=2)
    _, port = stack.sipguard(
        core_port=core.port, listen=("udp",),
        config_extra="sip: {t1_ms: 50, t2_ms: 400}\nrules:\n  concurrency: {per_caller: 1}\n",
    )
    caller = Caller(port)
    try:
        caller.send(caller.request("INVITE", "unacked-1"))
        answers = caller.finals(want=2, call_id="unacked-1")
        assert sorted(_tag(header(ok, "To")) for ok in answers) == ["core1", "core2"], answers
        route = f"Route: {header(answers[0], 'Record-Route')}\r\n"
        caller.send(caller.request("ACK", "unacked-1", to_tag="core1", extra=route))
        caller.send(caller.request("BYE", "unacked-1", cseq=2, to_tag="core1", extra=route))
        assert caller.finals(call_id="unacked-1")[0].startswith(b"SIP/2.0 200 ")
        caller.send(caller.request("INVITE", "unacked-2"))
        assert caller.finals(call_id="unacked-2")[0].startswith(b"SIP/2.0 403 ")
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline and not any(
                d.startswith(b"BYE ") and b"tag=core2" in d for d in core.received):
            time.sleep(0.1)
        assert any(d.startswith(b"BYE ") and b"tag=core2" in d for d in core.received)
        caller.send(caller.request("INVITE", "unacked-3"))
        assert caller.finals(call_id="unacked-3")[0].startswith(b"SIP/2.0 200 ")
    finally:
        caller.close()
        core.close()

