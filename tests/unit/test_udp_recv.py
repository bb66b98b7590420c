"""UDP receives in batches (sipguard/transport/_udp_recv.c) and the endpoint that reads with
them (sipguard/transport/udp.py), over real sockets on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any

import pytest
import uvloop

import sipguard.transport.udp as udp
from sipguard.contract import Flow

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="recvmmsg is Linux only")

_udp_recv: Any = udp._udp_recv
needs_c = pytest.mark.skipif(_udp_recv is None, reason="the C extension is not built")
# sipguard runs on uvloop; the endpoint works on asyncio's own loop too
LOOPS = pytest.mark.parametrize("run_loop", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])


def _bound(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


@needs_c
@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"),
                                              (socket.AF_INET6, "::1")])
def test_a_read_takes_a_batch_in_order_with_the_sources(family: int, host: str) -> None:
    """50 datagrams from two sources: a read hands over 32, the next 18, then none waits;
    the key of each names its source."""
    sock, a, b = _bound(family, host), _bound(family, host), _bound(family, host)
    with sock, a, b:
        dest = sock.getsockname()[:2]
        for i in range(50):
            (a if i % 2 else b).sendto(b"m%d" % i, dest)
        receiver = _udp_recv.Receiver(sock.fileno(), family, 32, 65536)
        got: list[tuple[bytes, Any]] = []
        assert receiver.read(lambda data, key: got.append((data, key))) == 32
        assert receiver.read(lambda data, key: got.append((data, key))) == 18
        assert receiver.read(lambda data, key: got.append((data, key))) == 0
        assert [d for d, _ in got] == [b"m%d" % i for i in range(50)]
        sources = {i % 2: _udp_recv.address(family, key) for i, (_, key) in enumerate(got)}
        assert sources == {1: (host, a.getsockname()[1]), 0: (host, b.getsockname()[1])}
        assert len({key for _, key in got}) == 2


@needs_c
def test_a_callback_that_raises_loses_nothing() -> None:
    """The datagrams read after the one the callback raised for are handed over first by the
    next read, in order."""
    sock, a = _bound(socket.AF_INET, "127.0.0.1"), _bound(socket.AF_INET, "127.0.0.1")
    with sock, a:
        for i in range(10):
            a.sendto(b"%d" % i, sock.getsockname())
        receiver = _udp_recv.Receiver(sock.fileno(), socket.AF_INET)
        got: list[bytes] = []

        def handle(data: bytes, key: object) -> None:
            got.append(data)
            if data == b"3":
                raise RuntimeError("bug")

        with pytest.raises(RuntimeError):
            receiver.read(handle)
        assert got == [b"0", b"1", b"2", b"3"] and receiver.pending == 6
        assert receiver.read(handle) == 6 and receiver.pending == 0
        assert got == [b"%d" % i for i in range(10)]


@needs_c
def test_a_datagram_too_long_is_dropped_and_counted() -> None:
    sock, a = _bound(socket.AF_INET, "127.0.0.1"), _bound(socket.AF_INET, "127.0.0.1")
    with sock, a:
        a.sendto(b"x" * 200, sock.getsockname())
        a.sendto(b"short", sock.getsockname())
        receiver = _udp_recv.Receiver(sock.fileno(), socket.AF_INET, 8, 100)
        got: list[bytes] = []
        assert receiver.read(lambda d, k: got.append(d)) == 1
        assert got == [b"short"] and receiver.truncated == 1


@needs_c
def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        _udp_recv.Receiver(0, socket.AF_UNIX)
    with pytest.raises(ValueError):
        _udp_recv.Receiver(0, socket.AF_INET, 0)
    with pytest.raises(ValueError):
        _udp_recv.address(socket.AF_INET6, b"short")
    with pytest.raises(ValueError):
        _udp_recv.address(socket.AF_INET, 1 << 50)


@needs_c
def test_an_icmp_error_on_the_socket_is_an_oserror_and_the_next_read_goes_on() -> None:
    """A connected socket whose peer port is closed gets ECONNREFUSED from the kernel on its
    next receive; the error is reported once, then datagrams are read again."""
    sock = _bound(socket.AF_INET, "127.0.0.1")
    closed = _bound(socket.AF_INET, "127.0.0.1")
    port = closed.getsockname()[1]
    closed.close()
    with sock:
        sock.connect(("127.0.0.1", port))
        sock.send(b"ping")  # answered with ICMP port unreachable
        receiver = _udp_recv.Receiver(sock.fileno(), socket.AF_INET)
        with pytest.raises(ConnectionRefusedError):
            receiver.read(lambda d, k: None)
        assert receiver.read(lambda d, k: None) == 0


@LOOPS
@pytest.mark.parametrize("in_c", [True, False], ids=["recvmmsg", "python"])
def test_the_endpoint_hands_each_datagram_on_with_one_flow_per_source(
        monkeypatch: pytest.MonkeyPatch, in_c: bool, run_loop: Any) -> None:
    """Through the event loop: every datagram reaches the handler in order, with a Flow naming
    its source, the same Flow object for every datagram of one source."""
    if in_c and _udp_recv is None:
        pytest.skip("the C extension is not built")
    if not in_c:
        monkeypatch.setattr(udp, "_udp_recv", None)
    got: list[tuple[bytes, Flow]] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        ep = await udp.open_udp(loop, "127.0.0.1", 0, 2, lambda d, f: got.append((d, f)), 1 << 20)
        a, b = _bound(socket.AF_INET, "127.0.0.1"), _bound(socket.AF_INET, "127.0.0.1")
        sources = {("127.0.0.1", a.getsockname()[1]), ("127.0.0.1", b.getsockname()[1])}
        try:
            for i in range(100):
                (a if i % 3 else b).sendto(b"%d" % i, ep.sock.getsockname())
            for _ in range(200):
                if len(got) == 100:
                    break
                await asyncio.sleep(0.01)
        finally:
            ep.close()
            a.close()
            b.close()
        assert [d for d, _ in got] == [b"%d" % i for i in range(100)]
        flows = {f.addr: f for _, f in got}
        assert set(flows) == sources
        assert all(f is flows[f.addr] and f.transport == "udp" and f.local == 2 for _, f in got)

    run_loop(run())


@LOOPS
@needs_c
def test_a_handler_that_raises_costs_only_its_datagram(run_loop: Any) -> None:
    """The loop's exception handler sees the error; the datagrams read with it are handled on
    the next pass, though nothing more arrives."""
    got: list[bytes] = []
    errors: list[dict[str, Any]] = []

    def handle(data: bytes, flow: Flow) -> None:
        got.append(data)
        if data == b"2":
            raise RuntimeError("bug")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        ep = await udp.open_udp(loop, "127.0.0.1", 0, 0, handle, 1 << 20)
        a = _bound(socket.AF_INET, "127.0.0.1")
        try:
            ep.sock.setblocking(True)  # nothing is read until all five wait
            for i in range(5):
                a.sendto(b"%d" % i, ep.sock.getsockname())
            ep.sock.setblocking(False)
            for _ in range(100):
                if len(got) == 5:
                    break
                await asyncio.sleep(0.01)
        finally:
            ep.close()
            a.close()

    run_loop(run())
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    assert len(errors) == 1 and isinstance(errors[0].get("exception"), RuntimeError)


class _FullSocket(socket.socket):
    """The endpoint's socket (the same file descriptor), its send buffer full while ``full``
    is set: loopback never fills one, as the kernel hands a datagram to the receiver at once."""

    full = True

    def sendto(self, data: Any, addr: Any) -> int:  # type: ignore[override]
        if self.full:
            raise BlockingIOError
        return super().sendto(data, addr)


@LOOPS
def test_sends_the_kernel_has_no_room_for_wait_in_order_in_a_bounded_backlog(
        run_loop: Any) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        ep = await udp.open_udp(loop, "127.0.0.1", 0, 0, lambda d, f: None, 1 << 20)
        peer = _bound(socket.AF_INET, "127.0.0.1")
        dest = peer.getsockname()
        real = ep.sock
        full = _FullSocket(fileno=os.dup(real.fileno()))
        ep.sock = full
        ep._backlog_max = 3500
        try:
            for i in range(4):
                ep.send(bytes([48 + i]) * 1000, dest)  # the 4th finds no room in the backlog
            assert ep.backlog == 3 and ep.send_errors == 1
            await asyncio.sleep(0.05)  # writable: still no room, still waiting
            assert ep.backlog == 3
            full.full = False
            ep.send(b"after", dest)  # behind the backlog, not before it
            for _ in range(100):
                if not ep.backlog:
                    break
                await asyncio.sleep(0.01)
            assert ep.backlog == 0
            peer.settimeout(2.0)
            got = [peer.recv(2000) for _ in range(4)]
            assert got == [b"0" * 1000, b"1" * 1000, b"2" * 1000, b"after"]
        finally:
            ep.sock = real
            full.close()
            ep.close()
            peer.close()

    run_loop(run())
