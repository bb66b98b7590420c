"""The supervisor's side of a worker's socket: a worker that reloaded on an operator's
request writes ``reload`` and the supervisor passes SIGHUP to every *other* worker; an unknown
line is logged and ignored. Real child processes (a few lines of Python each) stand in for the
workers, so the signals and the socket pair are the real ones."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from sipguard.supervisor import PortTaken, Supervisor, check_ports_free, hold_ports


def worker_script(before_handlers: str = "", after_ready: str = "") -> str:
    """A stand-in worker: installs its SIGHUP handler (which marks a file per SIGHUP) and
    reports ready on the supervisor's socket, then idles; ``before_handlers`` and
    ``after_ready`` are lines run at those points (``index``, ``sock`` in scope)."""
    return (
        "import signal, socket, sys, time\n"
        "index, fd, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]\n"
        f"{before_handlers}"
        "def hup(*_):\n"
        "    with open(f'{out}/hup{index}', 'a') as f:\n"
        "        f.write('x')\n"
        "signal.signal(signal.SIGHUP, hup)\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
        "sock = socket.socket(fileno=fd)\n"
        "sock.send(b'ready\\n')\n"
        f"{after_ready}"
        "end = time.monotonic() + 20\n"
        "while time.monotonic() < end:\n"
        "    time.sleep(0.02)\n"
    )


WORKER = worker_script(after_ready=(
    "if index == 0:\n"
    "    time.sleep(0.5)\n"
    "    sock.send(b'bogus\\nrel')  # a line split over two writes still counts\n"
    "    time.sleep(0.05)\n"
    "    sock.send(b'oad\\n')\n"))


async def test_a_workers_reload_request_reaches_the_others_only(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    sup = Supervisor(3, lambda i, fd: [sys.executable, str(script), str(i), str(fd),
                                       str(tmp_path)])
    run = asyncio.get_running_loop().create_task(sup.run())
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end and not all(
            (tmp_path / f"hup{i}").exists() for i in (1, 2)
        ):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # a SIGHUP to the asking worker would have landed by now
        assert (tmp_path / "hup1").read_text() == "x"
        assert (tmp_path / "hup2").read_text() == "x"
        assert not (tmp_path / "hup0").exists()
    finally:
        sup._on_stop()
        code = await asyncio.wait_for(run, 10)
    assert code == 0
    out = capfd.readouterr().out
    assert re.search(r"worker_request_unknown.*request\W+bogus", out), out
    assert re.search(r"workers_reloading.*by_worker\W+0", out), out


# worker 1 is still starting: no SIGHUP handler yet (the default action ends it) until the
# test lets it go on (the file "go"; a fixed sleep raced a slow start of worker 0 under load)
SLOW_WORKER = worker_script(before_handlers=(
    "import os\n"
    "end = time.monotonic() + 10\n"
    "while index == 1 and not os.path.exists(f'{out}/go') and time.monotonic() < end:\n"
    "    time.sleep(0.01)\n"))


async def test_a_sighup_while_a_worker_starts_reloads_the_ready_ones_and_kills_none(
    tmp_path: Path,
) -> None:
    """SIGHUP (an operator's reload) reaches the supervisor while worker 1 is still starting:
    worker 0, up, reloads; worker 1 is not killed by a signal it has no handler for yet
    (which made the whole group fail its start): it gets its SIGHUP once it is ready (it may
    have started from the config before the reload)."""
    script = tmp_path / "worker.py"
    script.write_text(SLOW_WORKER)
    sup = Supervisor(2, lambda i, fd: [sys.executable, str(script), str(i), str(fd),
                                       str(tmp_path)])
    run = asyncio.get_running_loop().create_task(sup.run())
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end and not sup.workers[0].ready:
            await asyncio.sleep(0.02)
        assert sup.workers[0].ready and not sup.workers[1].ready
        sup._on_hup()
        (tmp_path / "go").touch()
        while time.monotonic() < end and not sup.workers[1].ready:
            await asyncio.sleep(0.02)
        assert sup.workers[1].ready and sup._all_started
        while time.monotonic() < end and not (tmp_path / "hup1").exists():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert (tmp_path / "hup0").read_text() == "x"
        assert (tmp_path / "hup1").read_text() == "x"
        assert sup.workers[1].proc is not None and sup.workers[1].proc.returncode is None
    finally:
        sup._on_stop()
        code = await asyncio.wait_for(run, 10)
    assert code == 0


# Worker 0 drains like the others but, drained, waits for ``drained`` from the supervisor (the
# others have exited) before it exits; worker 1 takes 0.6 s to drain.
DRAINING_WORKER = (
    "import os, signal, socket, sys, time\n"
    "index, fd, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]\n"
    "stop = []\n"
    "signal.signal(signal.SIGTERM, lambda *_: stop.append(1))\n"
    "sock = socket.socket(fileno=fd)\n"
    "sock.send(b'ready\\n')\n"
    "while not stop:\n"
    "    time.sleep(0.02)\n"
    "if index == 1:\n"
    "    time.sleep(0.6)\n"
    "else:\n"
    "    sock.settimeout(5)\n"
    "    got = sock.recv(64)\n"
    "    open(f'{out}/heard0', 'wb').write(got)\n"
    "open(f'{out}/exit{index}', 'w').write(repr(time.time()))\n"
)


async def test_worker_0_hears_drained_once_the_others_have_exited(tmp_path: Path) -> None:
    """During a stop, worker 0 (the documented admin port) is told ``drained`` only once
    every other worker has exited, so it can keep answering /readyz and /metrics until the
    whole group has drained."""
    script = tmp_path / "worker.py"
    script.write_text(DRAINING_WORKER)
    sup = Supervisor(2, lambda i, fd: [sys.executable, str(script), str(i), str(fd),
                                       str(tmp_path)])
    run = asyncio.get_running_loop().create_task(sup.run())
    end = time.monotonic() + 10
    while time.monotonic() < end and not sup._all_started:
        await asyncio.sleep(0.02)
    sup._on_stop()
    code = await asyncio.wait_for(run, 10)
    assert code == 0
    assert (tmp_path / "heard0").read_bytes() == b"drained\n"
    exit0 = float((tmp_path / "exit0").read_text())
    exit1 = float((tmp_path / "exit1").read_text())
    assert exit0 >= exit1


def test_a_public_port_another_process_holds_is_refused() -> None:
    """The supervisor binds each public address once without SO_REUSEPORT before starting its
    workers: one that another process holds with SO_REUSEPORT (another sipguard's workers),
    UDP or TCP, IPv4 or IPv6, is refused naming it; a free one passes."""
    families = [(socket.AF_INET, "127.0.0.1")]
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
                probe.bind(("::1", 0))
            families.append((socket.AF_INET6, "::1"))
        except OSError:
            pass
    for family, host in families:
        for transport, kind in (("udp", socket.SOCK_DGRAM), ("tcp", socket.SOCK_STREAM),
                                ("tls", socket.SOCK_STREAM)):
            with socket.socket(family, kind) as other:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if kind == socket.SOCK_STREAM:
                    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                other.bind((host, 0))
                if kind == socket.SOCK_STREAM:
                    other.listen()
                port = other.getsockname()[1]
                uri = f"{transport}://{'[::1]' if ':' in host else host}:{port}"
                with pytest.raises(PortTaken) as caught:
                    check_ports_free([(transport, host, port, uri)])
                assert str(caught.value).startswith(
                    f"cannot listen on {uri}: Address already in use (another process "
                    "holds it"), caught.value
            check_ports_free([(transport, host, port, uri)])  # closed: free again


def test_a_second_start_on_the_same_ports_waits_for_the_first() -> None:
    """Two supervisors starting at once on one port: the second waits (here 0.2 s, then goes
    on) for the first's hold, which a closed socket ends."""
    public = [("udp", "127.0.0.1", 1, "udp://127.0.0.1:1"),
              ("tcp", "127.0.0.1", 1, "tcp://127.0.0.1:1")]
    first = hold_ports(public)
    try:
        assert len(first) == 2  # a hold for the UDP port and one for the TCP port
        t0 = time.monotonic()
        assert hold_ports(public[:1], wait_s=0.2) == []
        assert time.monotonic() - t0 >= 0.2
    finally:
        for sock in first:
            sock.close()
    again = hold_ports(public, wait_s=0.2)
    assert len(again) == 2
    for sock in again:
        sock.close()
