"""The UDP send thread (sipguard/transport/_udp_send.c, SendThread in transport/udp.py) over
real sockets on loopback: order, the queue bound, errors, stop and restart, and the
endpoint's fall-back to sending in the loop."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from sipguard.transport import udp
from sipguard.transport.udp import SendThread, UdpEndpoint, open_udp, send_thread_wanted

pytestmark = pytest.mark.skipif(not SendThread.available(), reason="C extension not built")

HOST = "127.0.0.1"


def _idle(q: object) -> None:
    """Wait until the thread sleeps (it takes what is queued without a kick until then)."""
    end = time.monotonic() + 5
    while not q.idle:
        assert time.monotonic() < end
        time.sleep(0.001)


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    r.bind((HOST, 0))
    r.settimeout(5)
    yield r
    r.close()


@pytest.fixture
def sender_sock() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, 0))
    s.setblocking(False)
    yield s
    s.close()


def _sender(capacity: int = 100_000, max_bytes: int = 1 << 30) -> object:
    assert udp._udp_send is not None
    return udp._udp_send.Sender(capacity, max_bytes)


def test_datagrams_leave_in_order_after_a_kick(receiver: socket.socket,
                                                sender_sock: socket.socket) -> None:
    q = _sender()
    assert not q.push(sender_sock.fileno(), socket.AF_INET, b"x", HOST, 9)  # no thread yet
    q.start()
    port = receiver.getsockname()[1]
    sent = [b"datagram %d " % i + b"x" * (i % 700) for i in range(2000)]
    for data in sent:
        assert q.push(sender_sock.fileno(), socket.AF_INET, data, HOST, port)
    q.kick()
    got = [receiver.recv(2048) for _ in sent]
    assert got == sent
    assert receiver.getsockname() != sender_sock.getsockname()
    q.stop()
    assert (q.sent, q.errors, q.queued, q.running) == (2000, 0, 0, False)


def test_the_source_is_the_socket_given(receiver: socket.socket,
                                        sender_sock: socket.socket) -> None:
    q = _sender()
    q.start()
    assert q.push(sender_sock.fileno(), socket.AF_INET, b"hello", HOST, receiver.getsockname()[1])
    q.kick()
    data, source = receiver.recvfrom(100)
    assert (data, source) == (b"hello", sender_sock.getsockname())
    q.stop()


def test_queue_bound_and_stop_sends_what_is_queued(receiver: socket.socket,
                                                    sender_sock: socket.socket) -> None:
    q = _sender(capacity=5)
    q.start()
    _idle(q)
    port = receiver.getsockname()[1]
    # No kick: the thread sleeps, the queue fills at 5 and refuses the sixth.
    accepted = [q.push(sender_sock.fileno(), socket.AF_INET, b"%d" % i, HOST, port)
                for i in range(8)]
    assert accepted == [True] * 5 + [False] * 3
    assert q.queued == 5
    q.stop()  # sends the five first
    assert [receiver.recv(10) for _ in range(5)] == [b"0", b"1", b"2", b"3", b"4"]
    assert (q.sent, q.queued) == (5, 0)
    assert not q.push(sender_sock.fileno(), socket.AF_INET, b"late", HOST, port)
    q.start()  # and again
    assert q.push(sender_sock.fileno(), socket.AF_INET, b"again", HOST, port)
    q.kick()
    assert receiver.recv(10) == b"again"
    q.stop()


def test_queue_bound_in_bytes(receiver: socket.socket, sender_sock: socket.socket) -> None:
    q = _sender(max_bytes=2500)
    q.start()
    _idle(q)
    port = receiver.getsockname()[1]
    fd = sender_sock.fileno()
    assert [q.push(fd, socket.AF_INET, b"x" * 1000, HOST, port) for _ in range(3)] == [
        True, True, False]  # 3,000 bytes would pass 2,500
    assert q.push(fd, socket.AF_INET, b"y" * 500, HOST, port)  # exactly 2,500
    assert not q.push(fd, socket.AF_INET, b"z", HOST, port)
    q.kick()
    assert [len(receiver.recv(2000)) for _ in range(3)] == [1000, 1000, 500]
    q.stop()
    with pytest.raises(ValueError):
        _sender(max_bytes=0)


def test_addresses_that_are_not_literals_of_the_family_are_refused(
        sender_sock: socket.socket) -> None:
    q = _sender()
    q.start()
    fd = sender_sock.fileno()
    for host in ("example.com", "::1", "127.0.0.1%lo", "", "1.2.3.4\x00", "fe80::1%eth0"):
        assert not q.push(fd, socket.AF_INET, b"x", host, 5060), host
    with pytest.raises(ValueError):
        q.push(fd, socket.AF_INET, b"x", HOST, 70000)
    with pytest.raises(TypeError):
        q.push(fd, socket.AF_INET, "text", HOST, 5060)
    assert q.queued == 0
    q.stop()


def test_ipv4_peers_of_an_ipv6_socket_are_v4_mapped(receiver: socket.socket) -> None:
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s6.bind(("::", 0))
    q = _sender()
    q.start()
    try:
        assert q.push(s6.fileno(), socket.AF_INET6, b"mapped", HOST, receiver.getsockname()[1])
        q.kick()
        assert receiver.recv(10) == b"mapped"
    finally:
        q.stop()
        s6.close()


def test_errors_are_counted_and_the_next_datagram_still_goes(receiver: socket.socket,
                                                             sender_sock: socket.socket) -> None:
    q = _sender()
    q.start()
    port = receiver.getsockname()[1]
    fd = sender_sock.fileno()
    assert q.push(fd, socket.AF_INET, b"first", HOST, port)
    assert q.push(fd, socket.AF_INET, b"to port 0", HOST, 0)  # EINVAL from the kernel
    assert q.push(fd, socket.AF_INET, b"x" * 70_000, HOST, port)  # EMSGSIZE
    assert q.push(fd, socket.AF_INET, b"last", HOST, port)
    q.kick()
    assert [receiver.recv(100), receiver.recv(100)] == [b"first", b"last"]
    q.stop()
    assert (q.sent, q.errors) == (2, 2)


def test_a_full_socket_buffer_is_waited_for(sender_sock: socket.socket) -> None:
    """EAGAIN: the thread waits for room (the receiver reads meanwhile); nothing is lost."""
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    r.bind((HOST, 0))
    r.settimeout(5)
    sender_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # fills at once
    q = _sender()
    q.start()
    try:
        n = 300
        for i in range(n):
            assert q.push(sender_sock.fileno(), socket.AF_INET, b"%04d" % i + b"y" * 1200,
                          HOST, r.getsockname()[1])
        q.kick()
        got = [r.recv(2048)[:4] for _ in range(n)]
        assert got == [b"%04d" % i for i in range(n)]
    finally:
        q.stop()
        r.close()
    assert (q.sent, q.errors) == (300, 0)


def test_auto_follows_the_cpu_affinity() -> None:
    assert send_thread_wanted(True) and not send_thread_wanted(False)
    original = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(original)})
        assert not send_thread_wanted("auto")
        if len(original) > 1:
            os.sched_setaffinity(0, original)
            assert send_thread_wanted("auto")
            # a worker per CPU: no CPU left for the threads
            assert not send_thread_wanted("auto", workers=len(original))
            assert send_thread_wanted(True, workers=len(original))
    finally:
        os.sched_setaffinity(0, original)


def test_endpoints_send_through_the_thread_and_fall_back_in_the_loop(
        receiver: socket.socket) -> None:
    """An endpoint with the thread queues its sends and the flush's kick sends them; with the
    queue full the loop sends (counted); with the thread stopped it sends in the loop; the
    counts reach the counters through sync."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        ep: UdpEndpoint = await open_udp(loop, HOST, 0, 0, lambda d, f: got.append(d), 1 << 20)
        threads = SendThread()
        counters: Counter[str] = Counter()
        dest = (HOST, receiver.getsockname()[1])
        try:
            assert threads.configure(True, [ep]) and ep.sender is threads.queue
            threads.queue.capacity = 3
            _idle(threads.queue)
            for i in range(5):
                ep.send(b"%d" % i, dest)
            assert threads.waiting() == 3  # the first three wait for the kick
            threads.kick()
            got_now = sorted(await asyncio.to_thread(lambda: [receiver.recv(10) for _ in range(5)]))
            assert got_now == [b"0", b"1", b"2", b"3", b"4"]  # two of them sent by the loop
            threads.sync(counters, [ep])
            assert counters["udp_send_queue_full"] == 2
            assert counters["udp_sent_threaded"] == 3
            assert not threads.configure(False, [ep]) and ep.sender is None
            ep.send(b"inline", dest)
            assert await asyncio.to_thread(receiver.recv, 10) == b"inline"
            threads.sync(counters, [ep])
            assert counters["udp_sent_threaded"] == 3 and counters["udp_send_errors"] == 0
            if send_thread_wanted("auto"):  # auto: the loop sends a flush itself unless busy
                assert threads.configure("auto", [ep]) and threads.adaptive
                _idle(threads.queue)
                ep.send(b"quiet", dest)
                threads.kick(busy=False)
                assert threads.waiting() == 0  # sent before kick returned
                assert await asyncio.to_thread(receiver.recv, 10) == b"quiet"
                ep.send(b"busy", dest)
                threads.kick(busy=True)  # the thread's
                assert await asyncio.to_thread(receiver.recv, 10) == b"busy"
                threads.close([ep])
                threads.sync(counters, [ep])
                assert counters["udp_sent_in_loop"] == 1 and counters["udp_sent_threaded"] == 4
        finally:
            threads.close([ep])
            assert ep.transport is not None
            ep.transport.close()

    asyncio.run(run())


def test_without_the_extension_every_send_is_in_the_loop(
        monkeypatch: pytest.MonkeyPatch, receiver: socket.socket) -> None:
    monkeypatch.setattr(udp, "_udp_send", None)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        ep = await open_udp(loop, HOST, 0, 0, lambda d, f: None, 1 << 20)
        threads = SendThread()
        try:
            assert not threads.configure(True, [ep]) and ep.sender is None
            assert threads.waiting() == 0
            ep.send(b"inline", (HOST, receiver.getsockname()[1]))
            threads.kick()
            assert await asyncio.to_thread(receiver.recv, 10) == b"inline"
        finally:
            threads.close([ep])
            assert ep.transport is not None
            ep.transport.close()

    asyncio.run(run())


def test_a_kick_here_sends_in_this_thread_in_order_with_the_threads_sends(
        receiver: socket.socket, sender_sock: socket.socket) -> None:
    """``kick(True)`` while the thread sleeps sends the queue in the calling thread (done when
    it returns, counted ``sent_here``); with the thread busy, or ``kick()``, the thread sends.
    Either way the datagrams leave in the order pushed."""
    q = _sender()
    q.start()
    port = receiver.getsockname()[1]
    fd = sender_sock.fileno()
    try:
        first = [b"thread %d" % i for i in range(500)]
        for data in first:
            assert q.push(fd, socket.AF_INET, data, HOST, port)
        q.kick()  # the thread's
        end = time.monotonic() + 5
        while q.sent < 500:
            assert time.monotonic() < end
            time.sleep(0.001)
        _idle(q)
        assert (q.sent, q.sent_here) == (500, 0)
        second = [b"here %d " % i + b"x" * (i % 700) for i in range(1000)]
        for data in second:
            assert q.push(fd, socket.AF_INET, data, HOST, port)
        q.kick(True)  # the thread asleep: sent here, before kick returns
        assert (q.sent, q.sent_here, q.queued) == (1500, 1000, 0)
        got = [receiver.recv(2048) for _ in range(1500)]
        assert got == first + second
        q.kick(True)  # nothing queued: nothing to do
        assert (q.sent, q.errors) == (1500, 0)
    finally:
        q.stop()

