"""The supervisor's side of a worker's socket: a worker that reloaded on an operator's
request writes ``reload`` and the supervisor passes SIGHUP to every *other* worker; an unknown
line is logged and ignored. Real child processes (a few lines of Python each) stand in for the
workers, so the signals and the socket pair are the real ones."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import pytest

from sipguard.supervisor import Supervisor


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


# worker 1 is still starting: no SIGHUP handler yet (the default action ends it)
SLOW_WORKER = worker_script(before_handlers="if index == 1:\n    time.sleep(1.0)\n")


async def test_a_sighup_while_a_worker_starts_reloads_the_ready_ones_and_kills_none(
    tmp_path: Path,
) -> None:
    """SIGHUP (an operator's reload) reaches the supervisor while worker 1 is still starting:
    worker 0, up, reloads; worker 1 is left alone (it reads the file at its start) instead of
    being killed by a signal it has no handler for yet — which made the whole group fail its
    start."""
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
        while time.monotonic() < end and not sup.workers[1].ready:
            await asyncio.sleep(0.02)
        assert sup.workers[1].ready and sup._all_started
        assert (tmp_path / "hup0").read_text() == "x"
        assert not (tmp_path / "hup1").exists()
    finally:
        sup._on_stop()
        code = await asyncio.wait_for(run, 10)
    assert code == 0
