"""Limits hold on a burst, end to end: INVITEs written back to back (UDP) or pipelined in one
write (TCP) to a real sipguard on 127.0.0.1, with a plain UDP socket standing in for the core.

sipguard reads many datagrams in one pass of its event loop when they arrive together; each
admission must take its slot before the next INVITE is looked at, so exactly the limit reaches
the core, whatever the arrival pattern. The core socket never answers: admitted calls stay up
(their INVITE retransmissions are told apart by Call-ID).
"""

from __future__ import annotations

import re
import socket
import time
import uuid

import pytest

from .harness import HOST, E2EStack, free_port

pytestmark = pytest.mark.e2e


def invite(i: int, *, caller: str, callee: str, transport: str, local_port: int,
           target_port: int, tag: str) -> bytes:
    via = f"SIP/2.0/{transport.upper()} {HOST}:{local_port};branch=z9hG4bK-burst-{tag}-{i};rport"
    return (
        f"INVITE sip:{callee}@{HOST}:{target_port} SIP/2.0\r\n"
        f"Via: {via}\r\nMax-Forwards: 70\r\n"
        f"From: <sip:{caller}@{HOST}:{local_port}>;tag=f{tag}{i}\r\n"
        f"To: <sip:{callee}@{HOST}:{target_port}>\r\n"
        f"Call-ID: burst-{tag}-{i}@{HOST}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:{caller}@{HOST}:{local_port}>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


class CoreSocket:
    """A UDP socket that records the distinct INVITEs it receives and answers nothing."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.call_ids: set[str] = set()

    def collect(self, seconds: float) -> set[str]:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            if data.startswith(b"INVITE "):
                m = re.search(rb"^Call-ID:\s*(\S+)", data, re.M | re.I)
                if m:
                    self.call_ids.add(m.group(1).decode())
        return self.call_ids

    def close(self) -> None:
        self.sock.close()


def final_statuses(data: bytes) -> dict[str, int]:
    """Call-ID -> final status of every final INVITE response in ``data``."""
    out: dict[str, int] = {}
    for m in re.finditer(rb"SIP/2\.0 (\d{3}) [^\r\n]*\r\n(.*?)\r\n\r\n", data, re.S):
        status = int(m.group(1))
        head = m.group(2)
        cid = re.search(rb"^Call-ID:\s*(\S+)", head, re.M | re.I)
        if status >= 200 and cid and re.search(rb"^CSeq:\s*1 INVITE", head, re.M | re.I):
            out[cid.group(1).decode()] = status
    return out


def _guard(stack: E2EStack, core: CoreSocket, rules: str, listen: tuple[str, ...]) -> int:
    guard, port = stack.sipguard(core_port=core.port, listen=listen, config_extra=rules)
    return port


@pytest.mark.parametrize(("limit", "status"), [("per_caller", 403), ("per_callee", 486)])
def test_udp_burst_admits_exactly_the_limit(stack: E2EStack, limit: str, status: int) -> None:
    """Twenty INVITEs for one number written back to back from one UDP socket: exactly 2
    reach the core, the other 18 hear the configured answer."""
    core = CoreSocket()
    try:
        port = _guard(stack, core, f"rules:\n  concurrency: {{{limit}: 2}}\n", ("udp",))
        caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        caller.bind((HOST, free_port()))
        local = caller.getsockname()[1]
        tag = uuid.uuid4().hex[:6]
        msgs = [
            invite(i, caller="+12125550100" if limit == "per_caller" else f"+1212555{i:04d}",
                   callee="+18005550199", transport="udp", local_port=local,
                   target_port=port, tag=tag)
            for i in range(20)
        ]
        for m in msgs:  # back to back: sipguard reads them in one or a few loop passes
            caller.sendto(m, (HOST, port))
        reached = core.collect(1.5)
        caller.settimeout(0.2)
        got = b""
        end = time.monotonic() + 2.0
        while time.monotonic() < end and len(final_statuses(got)) < 18:
            try:
                got += caller.recv(65535) + b"\r\n"
            except TimeoutError:
                continue
        caller.close()
        finals = final_statuses(got)
        assert len(reached) == 2, sorted(reached)
        assert sorted(finals.values()) == [status] * 18
        assert not set(finals) & reached
    finally:
        core.close()


def test_tcp_pipelined_burst_admits_exactly_the_limit(stack: E2EStack) -> None:
    """Twenty INVITEs from one caller pipelined in one TCP write: exactly 2 reach the core."""
    core = CoreSocket()
    try:
        port = _guard(stack, core, "rules:\n  concurrency: {per_caller: 2}\n", ("udp", "tcp"))
        conn = socket.create_connection((HOST, port), timeout=5)
        local = conn.getsockname()[1]
        tag = uuid.uuid4().hex[:6]
        data = b"".join(
            invite(i, caller="+12125550100", callee="+18005550199", transport="tcp",
                   local_port=local, target_port=port, tag=tag)
            for i in range(20)
        )
        conn.sendall(data)
        reached = core.collect(1.5)
        conn.settimeout(0.2)
        got = b""
        end = time.monotonic() + 2.0
        while time.monotonic() < end and len(final_statuses(got)) < 18:
            try:
                chunk = conn.recv(65535)
            except TimeoutError:
                continue
            if not chunk:
                break
            got += chunk
        conn.close()
        finals = final_statuses(got)
        assert len(reached) == 2, sorted(reached)
        assert sorted(finals.values()) == [403] * 18
    finally:
        core.close()


def test_udp_burst_rate_limit_admits_the_burst_size(stack: E2EStack) -> None:
    """A per-caller rate of 1/s with burst 3: ten INVITEs back to back let exactly 3 through."""
    core = CoreSocket()
    try:
        port = _guard(stack, core, "rules:\n  rate: {per_caller: {rate: 1, burst: 3}}\n",
                      ("udp",))
        caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        caller.bind((HOST, free_port()))
        local = caller.getsockname()[1]
        tag = uuid.uuid4().hex[:6]
        for i in range(10):
            caller.sendto(invite(i, caller="+12125550100", callee="+18005550199",
                                 transport="udp", local_port=local, target_port=port, tag=tag),
                          (HOST, port))
        reached = core.collect(1.0)
        caller.close()
        assert len(reached) == 3, sorted(reached)
    finally:
        core.close()
