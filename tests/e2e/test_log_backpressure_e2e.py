"""A reader of sipguard's log that stops reading must not stop the calls.

sipguard runs with its stdout a real pipe that nobody reads (a stuck journald, container
runtime or log shipper): the pipe's 64 KiB and then ``log.queue_bytes`` fill up with
``invite_decided`` lines. SIP over real sockets must still be answered at once; the lines that
did not fit are counted (``log_lines_dropped``), and once the pipe is read again a warning line
says how many were lost.
"""

from __future__ import annotations

import json
import re
import select
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import HOST, REPO, events_total, free_port, sipguard_command, stop_pid

pytestmark = pytest.mark.e2e


def _request(method: str, port: int, local: int, call_id: str) -> bytes:
    """An INVITE to a number, or an OPTIONS to sipguard itself (no user part: answered)."""
    user = "" if method == "OPTIONS" else "+18005550100@"
    return (
        f"{method} sip:{user}{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{local};branch=z9hG4bK-{call_id}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:+12125550100@{HOST}>;tag=lb{call_id[:8]}\r\n"
        f"To: <sip:+18005550100@{HOST}>\r\nCall-ID: {call_id}@{HOST}\r\n"
        f"CSeq: 1 {method}\r\nContact: <sip:+12125550100@{HOST}:{local}>\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def _status(sock: socket.socket, seconds: float) -> int | None:
    sock.settimeout(seconds)
    try:
        data = sock.recv(65535)
    except TimeoutError:
        return None
    return int(data.split(b" ", 2)[1])


def _ready(admin: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            events_total(admin)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("sipguard's admin API did not come up")


@dataclass
class Unread:
    """sipguard running with its stdout a pipe nobody reads (yet), a core that never answers,
    and a caller's socket."""

    proc: subprocess.Popen[bytes]
    port: int
    admin: int
    uac: socket.socket

    @property
    def local(self) -> int:
        return int(self.uac.getsockname()[1])

    def bursts(self, count: int = 16) -> None:
        """``count`` bursts of 100 new calls, one ``invite_decided`` line (~350 bytes) each:
        far more than the pipe and the queue hold. Every INVITE must be answered 100 Trying."""
        for burst in range(count):
            for _ in range(100):
                self.uac.sendto(_request("INVITE", self.port, self.local, uuid.uuid4().hex),
                                (HOST, self.port))
            answered = 0
            while answered < 100 and _status(self.uac, 2.0) == 100:
                answered += 1
            assert answered == 100, f"burst {burst}: {answered} of 100 INVITEs answered"

    def stop(self) -> None:
        """A first SIGTERM drains (the unanswered INVITEs would hold it), a second stops."""
        self.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        self.proc.send_signal(signal.SIGTERM)


@contextmanager
def unread_stdout(tmp_path: Path, admin: int, extra: str = "") -> Iterator[Unread]:
    port = free_port()
    core = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes INVITEs, never answers
    core.bind((HOST, 0))
    config = tmp_path / "sipguard.yaml"
    config.write_text(
        f"listen: [udp://{HOST}:{port}]\ncore: udp://{HOST}:{core.getsockname()[1]}\n"
        f"admin: {{listen: '{HOST}:{admin}'}}\nlog: {{queue_bytes: 65536}}\n{extra}"
    )
    proc = subprocess.Popen(sipguard_command() + ["run", "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    uac = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    uac.bind((HOST, 0))
    try:
        yield Unread(proc, port, admin, uac)
    finally:
        uac.close()
        core.close()
        stop_pid(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_log_reader_that_stops_does_not_stop_the_calls(tmp_path: Path) -> None:
    with unread_stdout(tmp_path, free_port()) as g:
        stdout = g.proc.stdout
        assert stdout is not None
        _ready(g.admin)
        g.bursts()
        time.sleep(0.3)  # a flush (every 0.1 s) hands the last lines to the writer
        # the event loop still answers at once
        start = time.monotonic()
        g.uac.sendto(_request("OPTIONS", g.port, g.local, uuid.uuid4().hex), (HOST, g.port))
        assert _status(g.uac, 2.0) == 200
        assert time.monotonic() - start < 0.5
        events = events_total(g.admin)
        assert events.get("log_lines_dropped", 0) > 0, events
        # the reader comes back: what was queued arrives, then the warning with the count
        got = b""
        deadline = time.monotonic() + 10
        while b'"log_lines_dropped"' not in got and time.monotonic() < deadline:
            ready, _, _ = select.select([stdout], [], [], 0.2)
            if ready:
                got += stdout.read1(1 << 16)
        lines = [json.loads(x) for x in got.splitlines() if x.startswith(b"{")]
        warned = [x for x in lines if x["event"] == "log_lines_dropped"]
        assert warned and warned[0]["level"] == "warning" and warned[0]["count"] > 0, lines[-3:]
        decided = sum(1 for x in lines if x["event"] == "invite_decided")
        assert 0 < decided < 1600
        assert lines[0]["event"] == "sipguard_started"  # the first lines are kept
        g.stop()
        rest = stdout.read()  # to the end: the last lines, then EOF at its exit
        assert b'"sipguard_stopped"' in rest
        assert g.proc.wait(10) == 0


def _loaded_at(admin: int) -> float:
    """When that worker loaded its config (its own metrics: ``scope=worker``)."""
    url = f"http://{HOST}:{admin}/metrics?scope=worker"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(r"^sipguard_config_loaded_timestamp_seconds ([0-9.e+]+)$", text, re.M)
    assert m is not None, text
    return float(m.group(1))


def test_workers_and_their_supervisor_carry_on_when_the_log_reader_stops(
    tmp_path: Path,
) -> None:
    """Two workers, their log relayed by the supervisor to its stdout, a pipe nobody reads:
    the calls are answered, a reload through worker 0 still reaches worker 1 (the supervisor
    passes it on: its loop is not stuck in a write), and a stop ends every process at once."""
    from .test_workers_e2e import free_block

    admin = free_block(2)
    workers = (f"workers: 2\nworker_port_base: {free_block(2)}\n"
               "state: {backend: shared_memory}\n")
    with unread_stdout(tmp_path, admin, workers) as g:
        _ready(admin)
        _ready(admin + 1)
        g.bursts()
        time.sleep(0.5)
        before = _loaded_at(admin + 1)
        request = urllib.request.Request(f"http://{HOST}:{admin}/reload", method="POST")
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert json.loads(resp.read())["other_workers_reloading"] == 1
        deadline = time.monotonic() + 5
        while _loaded_at(admin + 1) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _loaded_at(admin + 1) > before, "worker 1 never reloaded"
        start = time.monotonic()
        g.stop()
        assert g.proc.wait(15) == 0
        assert time.monotonic() - start < 10
