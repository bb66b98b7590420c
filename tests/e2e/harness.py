"""Process harness for the SIPp end-to-end tests: free ports, SIPp UAC/UAS, sipguard.

Everything runs on 127.0.0.1, every SIPp run is bounded by a call count (-m) and by time
(SIPp's own -timeout plus a hard kill from here), and every process is stopped by its PID
when the test ends, pass or fail (and at interpreter exit as a last resort).

The proxy under test is started as ``python -m sipguard run --config FILE --listen ...
--core ...``; the environment variable ``SIPGUARD_E2E_CMD`` replaces ``python -m sipguard``
(e.g. to test another installed build).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SCENARIOS = HERE / "scenarios"
NUMBERS_CSV = SCENARIOS / "numbers.csv"
HOST = "127.0.0.1"

# SIPp transport flags per transport name: one socket for all calls.
SIPP_TRANSPORT = {"udp": "u1", "tcp": "t1"}

_live: dict[int, subprocess.Popen[Any]] = {}
_ports_handed_out: set[int] = set()


def _kill_leftovers() -> None:
    for proc in list(_live.values()):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)


atexit.register(_kill_leftovers)


def sipp_binary() -> str | None:
    """Path of the sipp executable, or None when SIPp is not installed."""
    return shutil.which("sipp")


def events_total(metrics_port: int, host: str = HOST) -> dict[str, float]:
    """sipguard_events_total by event, from GET /metrics on ``metrics_port``."""
    with urllib.request.urlopen(f"http://{host}:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    pattern = r'^sipguard_events_total\{event="([^"]+)"\} ([0-9.e+]+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def suspend_number(admin_port: int, number: str, **fields: Any) -> dict[str, Any]:
    """POST /suspensions on a running sipguard's admin API; its JSON answer."""
    req = urllib.request.Request(
        f"http://{HOST}:{admin_port}/suspensions",
        data=json.dumps({"number": number, **fields}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=5) as answer:
        return dict(json.loads(answer.read()))


def one_caller_csv(path: Path, caller: str, callees: Iterable[str]) -> Path:
    """A SIPp -inf file: one caller number calling each of ``callees`` in turn."""
    path.write_text("SEQUENTIAL\n" + "".join(f"{caller};{callee};\n" for callee in callees))
    return path


def free_port(host: str = HOST) -> int:
    """A port that is free for both UDP and TCP on host (bound to 0, closed, then used)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = int(t.getsockname()[1])
            if port in _ports_handed_out:
                continue
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((host, port))
            except OSError:
                continue
        _ports_handed_out.add(port)
        return port
    raise RuntimeError("no free UDP+TCP port found")


def port_bound(port: int, transport: str) -> bool:
    """True when something on this host listens on TCP / is bound on UDP to port."""
    files = (
        ["/proc/net/tcp", "/proc/net/tcp6"]
        if transport == "tcp"
        else ["/proc/net/udp", "/proc/net/udp6"]
    )
    want = f":{port:04X}"
    for name in files:
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 3 and cols[1].endswith(want) and (transport == "udp" or cols[3] == "0A"):
                return True
    return False


def wait_port_bound(
    port: int, transport: str, timeout: float = 5.0, proc: subprocess.Popen[Any] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_bound(port, transport):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process {proc.pid} exited ({proc.returncode}) before binding {transport}/{port}"
            )
        time.sleep(0.02)
    raise TimeoutError(f"nothing bound to {transport}/{port} after {timeout}s")


def stop_pid(proc: subprocess.Popen[Any], grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Stop one process we started, by its PID: sig, then SIGKILL after grace seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    _live.pop(proc.pid, None)


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process in seconds, from /proc/PID/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- SIPp


def parse_stat_csv(path: Path) -> dict[str, str]:
    """Last row of a SIPp -trace_stat CSV as {column: value} ({} if there is none)."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    return dict(zip(lines[0].split(";"), lines[-1].split(";"), strict=False))


_BLOCK_SEP = re.compile(r"^-{20,} .*$", re.M)


def received_requests(message_log: Path, method: str) -> int:
    """How many METHOD requests SIPp logged as received in its -trace_msg file
    (retransmissions included: SIPp logs every datagram/frame it reads)."""
    try:
        text = message_log.read_text(errors="replace")
    except OSError:
        return 0
    n = 0
    for block in _BLOCK_SEP.split(text):
        lines = [ln for ln in block.strip().splitlines() if ln.strip()]
        if len(lines) >= 2 and "message received" in lines[0] and lines[1].startswith(method + " "):
            n += 1
    return n


@dataclass
class SippResult:
    name: str
    returncode: int | None
    timed_out: bool
    stats: dict[str, str]
    workdir: Path

    def _int(self, col: str) -> int:
        try:
            return int(float(self.stats.get(col, "0") or 0))
        except ValueError:
            return 0

    @property
    def successful(self) -> int:
        return self._int("SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return self._int("FailedCall(C)")

    @property
    def created(self) -> int:
        return self._int("TotalCallCreated")

    @property
    def retransmissions(self) -> int:
        return self._int("Retransmissions(C)")

    @property
    def unexpected(self) -> int:
        return self._int("FailedUnexpectedMessage(C)")

    @property
    def message_log(self) -> Path:
        return self.workdir / f"{self.name}_messages.log"

    @property
    def error_log(self) -> Path:
        return self.workdir / f"{self.name}_errors.log"

    @property
    def screen_log(self) -> Path:
        return self.workdir / f"{self.name}_screen.log"

    def received(self, method: str) -> int:
        return received_requests(self.message_log, method)

    def describe(self, tail: int = 40) -> str:
        parts = [
            f"{self.name}: rc={self.returncode} timed_out={self.timed_out} created={self.created} "
            f"successful={self.successful} failed={self.failed} unexpected={self.unexpected} "
            f"retrans={self.retransmissions} (files in {self.workdir})"
        ]
        for p in (self.error_log, self.workdir / f"{self.name}_stdout.txt"):
            if p.exists() and p.stat().st_size:
                lines = p.read_text(errors="replace").splitlines()
                parts.append(f"--- {p.name} (last {tail} lines)\n" + "\n".join(lines[-tail:]))
        return "\n".join(parts)


class SippProcess:
    """One SIPp instance (UAC or UAS) writing its traces into workdir."""

    def __init__(
        self,
        name: str,
        scenario: str | Path,
        workdir: Path,
        *,
        local_port: int,
        transport: str = "udp",
        remote: tuple[str, int] | None = None,
        calls: int = 1,
        rate: float | None = None,
        duration_ms: int | None = None,
        timeout: float = 60.0,
        inf: Path | None = NUMBERS_CSV,
        trace_msg: bool = True,
        extra: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.local_port = local_port
        self.transport = transport
        self.timeout = timeout
        scen = Path(scenario)
        if not scen.is_absolute() and not scen.exists():
            scen = SCENARIOS / scen
        binary = sipp_binary()
        if binary is None:
            raise RuntimeError("sipp not found on PATH")
        cmd = [binary]
        if remote is not None:
            cmd.append(f"{remote[0]}:{remote[1]}")
        cmd += [
            "-sf",
            str(scen),
            "-i",
            HOST,
            "-p",
            str(local_port),
            "-t",
            SIPP_TRANSPORT[transport],
        ]
        cmd += ["-m", str(calls), "-nostdin", "-timeout", f"{int(timeout) + 1}s", "-timeout_error"]
        cmd += ["-recv_timeout", "10s", "-buff_size", "4194304"]
        if rate is not None:
            cmd += ["-r", f"{rate:g}", "-rp", "1000"]
        if duration_ms is not None:
            cmd += ["-d", str(duration_ms)]
        if inf is not None and remote is not None:
            cmd += ["-inf", str(inf)]
        cmd += ["-trace_stat", "-stf", str(workdir / f"{name}_stat.csv"), "-fd", "1"]
        cmd += ["-trace_err", "-error_file", str(workdir / f"{name}_errors.log")]
        cmd += ["-trace_screen", "-screen_file", str(workdir / f"{name}_screen.log")]
        if trace_msg:
            cmd += ["-trace_msg", "-message_file", str(workdir / f"{name}_messages.log")]
        cmd += list(extra)
        self.cmd = cmd
        self.proc: subprocess.Popen[bytes] | None = None
        self._deadline = 0.0
        self.timed_out = False

    def start(self) -> SippProcess:
        out = open(self.workdir / f"{self.name}_stdout.txt", "wb")  # noqa: SIM115
        (self.workdir / f"{self.name}_cmd.txt").write_text(shlex.join(self.cmd) + "\n")
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        out.close()
        _live[self.proc.pid] = self.proc
        self._deadline = time.monotonic() + self.timeout
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_bound(self, timeout: float = 5.0) -> None:
        wait_port_bound(self.local_port, self.transport, timeout, self.proc)

    def wait(self, timeout: float | None = None) -> SippResult:
        """Wait for SIPp to exit by itself (hard-killed at its deadline) and collect results."""
        assert self.proc is not None
        left = self._deadline - time.monotonic() if timeout is None else timeout
        try:
            self.proc.wait(max(left, 0.1))
        except subprocess.TimeoutExpired:
            self.timed_out = True
            stop_pid(self.proc, grace=3.0)
        _live.pop(self.proc.pid, None)
        return self.result()

    def stop(self, grace: float = 5.0) -> SippResult:
        """Stop SIPp now (SIGTERM makes SIPp write its final statistics), then collect."""
        assert self.proc is not None
        stop_pid(self.proc, grace=grace)
        return self.result()

    def result(self) -> SippResult:
        assert self.proc is not None
        return SippResult(
            name=self.name,
            returncode=self.proc.poll(),
            timed_out=self.timed_out,
            stats=parse_stat_csv(self.workdir / f"{self.name}_stat.csv"),
            workdir=self.workdir,
        )


# ------------------------------------------------------------------------ sipguard


def sipguard_command() -> list[str]:
    override = os.environ.get("SIPGUARD_E2E_CMD")
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "sipguard"]


class SipguardProcess:
    """sipguard under test; stdout JSON lines are collected by a reader thread."""

    def __init__(
        self,
        workdir: Path,
        *,
        listen: Sequence[str],
        core: str,
        config_extra: str = "",
        config_path: Path | None = None,
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        stdout_events: bool = True,
    ) -> None:
        """config_path: use this config file (listen/core still come from the flags);
        otherwise a minimal one is written (plus config_extra YAML).  stdout_events=False
        only scans for `sipguard_started` and keeps no parsed events (cheaper under load)."""
        self.workdir = workdir
        self.listen = list(listen)
        self.core = core
        if config_path is not None:
            self.config = config_path
        else:
            self.config = workdir / "sipguard.yaml"
            listen_yaml = ", ".join(self.listen)
            self.config.write_text(f"listen: [{listen_yaml}]\ncore: {core}\n{config_extra}")
        self.stdout_events = stdout_events
        cmd = list(command or sipguard_command()) + ["run", "--config", str(self.config)]
        for u in self.listen:
            cmd += ["--listen", u]
        cmd += ["--core", core]
        self.cmd = cmd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._cv = threading.Condition()
        self._reader: threading.Thread | None = None
        self.stdout_path = workdir / "sipguard_stdout.jsonl"
        self.stderr_path = workdir / "sipguard_stderr.txt"

    def start(self, ready_timeout: float = 10.0) -> SipguardProcess:
        (self.workdir / "sipguard_cmd.txt").write_text(shlex.join(self.cmd) + "\n")
        err = open(self.stderr_path, "wb")  # noqa: SIM115
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        # Under load (stdout_events=False) the log goes straight to a file: a pipe would make
        # sipguard wait for this process to read it, and that wait is not sipguard's latency.
        out = subprocess.PIPE if self.stdout_events else open(self.stdout_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=REPO,
            env=env,
        )
        err.close()
        if not isinstance(out, int):
            out.close()
        _live[self.proc.pid] = self.proc
        reader = self._read if self.stdout_events else self._watch_file
        self._reader = threading.Thread(target=reader, name="sipguard-stdout", daemon=True)
        self._reader.start()
        try:
            self.wait_event("sipguard_started", 1, ready_timeout)
        except Exception:
            self.stop()
            raise
        return self

    def _watch_file(self) -> None:
        """stdout_events=False: wait for `sipguard_started` in the log file, then stop."""
        assert self.proc is not None
        with open(self.stdout_path, "rb") as log:
            pending = b""
            while True:
                chunk = log.read()
                if not chunk:
                    if self.proc.poll() is not None:
                        break
                    time.sleep(0.02)
                    continue
                pending += chunk
                *complete, pending = pending.split(b"\n")
                started = [line for line in complete if b"sipguard_started" in line]
                for raw in started:
                    with contextlib.suppress(ValueError):
                        obj = json.loads(raw)
                        with self._cv:
                            self.lines.append(raw.decode("utf-8", "replace"))
                            if isinstance(obj, dict):
                                self.events.append(obj)
                            self._cv.notify_all()
                if started:
                    return
        with self._cv:
            self._cv.notify_all()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.stdout_path, "w") as sink:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                sink.write(line + "\n")
                ev: dict[str, Any] | None = None
                if not self.stdout_events and "sipguard_started" not in line:
                    continue
                with contextlib.suppress(ValueError):
                    obj = json.loads(line)
                    if isinstance(obj, dict):
                        ev = obj
                with self._cv:
                    self.lines.append(line)
                    if ev is not None:
                        self.events.append(ev)
                    self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def count(self, event: str) -> int:
        with self._cv:
            return sum(1 for e in self.events if e.get("event") == event)

    def wait_event(self, event: str, n: int = 1, timeout: float = 5.0) -> int:
        """Wait until at least n `event` lines were logged; returns the count (raises on timeout
        when fewer arrived, or when sipguard exited first)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                got = sum(1 for e in self.events if e.get("event") == event)
                if got >= n:
                    return got
                if (
                    self.proc is not None
                    and self.proc.poll() is not None
                    and not (self._reader and self._reader.is_alive())
                ):
                    raise RuntimeError(
                        f"sipguard exited with {self.proc.returncode} before logging {event!r} x{n} "
                        f"(got {got})\n{self.diagnostics()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"sipguard logged {event!r} {got} times, wanted {n}, within {timeout}s\n{self.diagnostics()}"
                    )
                self._cv.wait(min(left, 0.2))

    def settle(self, event: str, quiet: float = 0.5, timeout: float = 5.0,
               expect: int | None = None) -> int:
        """Count of `event` once no new one arrived for `quiet` seconds — or, with `expect`,
        0.1 s after the count reached it (time for one too many to show)."""
        deadline = time.monotonic() + timeout
        last = self.count(event)
        since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.count(event)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= (
                    0.1 if expect is not None and now >= expect else quiet):
                break
        return last

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def diagnostics(self, tail: int = 30) -> str:
        with self._cv:
            out = self.lines[-tail:]
        err = (
            self.stderr_path.read_text(errors="replace").splitlines()[-tail:]
            if self.stderr_path.exists()
            else []
        )
        return (
            f"cmd: {shlex.join(self.cmd)}\n--- stdout tail\n"
            + "\n".join(out)
            + "\n--- stderr tail\n"
            + "\n".join(err)
        )

    def stop(self, drain: float | None = None) -> int | None:
        """Stop sipguard. By default at once: SIGTERM starts its graceful drain, a second
        SIGTERM right after ends it. ``drain``: one SIGTERM, then up to that many seconds for
        the drain to finish by itself (calls up end, new ones hear 503)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.3 if drain is None else drain)
        stop_pid(self.proc, grace=5.0)
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode


# ------------------------------------------------------------------ raw UDP caller


@dataclass
class RawCallResult:
    responses: list[tuple[int, str]] = field(default_factory=list)  # (code, CSeq method)
    invites_sent: int = 0
    final: int | None = None
    bye_final: int | None = None
    error: str | None = None
    log: list[str] = field(default_factory=list)  # timestamped events, for failure messages

    def codes(self, method: str = "INVITE") -> list[int]:
        return [c for c, m in self.responses if m == method]


def _split_header_values(value: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in value:
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _parse_response(data: bytes) -> tuple[int, dict[str, list[str]]] | None:
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n")
    if not head or not head[0].startswith("SIP/2.0 "):
        return None
    code = int(head[0].split()[1])
    compact = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact"}
    headers: dict[str, list[str]] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        headers.setdefault(compact.get(name, name), []).append(value.strip())
    return code, headers


class RawUdpCaller:
    """A hand-made UDP UAC that deliberately retransmits its INVITE (same bytes) N times,
    whatever it hears back, then completes the call (ACK with the Route set, BYE)."""

    def __init__(
        self,
        local_port: int,
        target: tuple[str, int],
        caller: str = "+12125550199",
        callee: str = "+16465550199",
    ) -> None:
        self.local_port = local_port
        self.target = target
        self.caller = caller
        self.callee = callee
        tag = uuid.uuid4().hex[:10]
        self.call_id = f"raw-{uuid.uuid4().hex}@{HOST}"
        self.from_hdr = f"<sip:{caller}@{HOST}:{local_port}>;tag={tag}"
        self.to_hdr = f"<sip:{callee}@{target[0]}:{target[1]}>"
        self.contact = f"<sip:{caller}@{HOST}:{local_port};transport=UDP>"

    def _via(self) -> str:
        return (
            f"SIP/2.0/UDP {HOST}:{self.local_port};branch=z9hG4bK-raw-{uuid.uuid4().hex[:16]};rport"
        )

    def invite_bytes(self) -> bytes:
        sdp = (
            f"v=0\r\no=raw 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
        )
        head = (
            f"INVITE sip:{self.callee}@{self.target[0]}:{self.target[1]} SIP/2.0\r\n"
            f"Via: {self._via()}\r\n"
            f"From: {self.from_hdr}\r\nTo: {self.to_hdr}\r\nCall-ID: {self.call_id}\r\n"
            f"CSeq: 1 INVITE\r\nContact: {self.contact}\r\nMax-Forwards: 70\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n"
        )
        return head.encode() + sdp.encode()

    def call(
        self,
        copies: int = 3,
        interval: float = 0.5,
        answer_timeout: float = 10.0,
        hold: float = 0.1,
    ) -> RawCallResult:
        res = RawCallResult()
        invite = self.invite_bytes()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((HOST, self.local_port))
            start = time.monotonic()
            next_send = start
            ok_headers: dict[str, list[str]] | None = None
            deadline = start + answer_timeout
            while time.monotonic() < deadline and res.final is None or res.invites_sent < copies:
                now = time.monotonic()
                if res.invites_sent < copies and now >= next_send:
                    sock.sendto(invite, self.target)
                    res.invites_sent += 1
                    res.log.append(f"{now - start:.3f} sent INVITE #{res.invites_sent}")
                    next_send = start + interval * res.invites_sent
                wait = (next_send if res.invites_sent < copies else deadline) - time.monotonic()
                if wait <= 0 and res.invites_sent >= copies:
                    break
                sock.settimeout(max(min(wait, 0.25), 0.01))
                try:
                    data = sock.recv(65535)
                except TimeoutError:
                    continue
                parsed = _parse_response(data)
                if parsed is None:
                    continue
                code, hdrs = parsed
                method = (hdrs.get("cseq", ["1 ?"])[0].split() + ["?"])[1]
                res.responses.append((code, method))
                res.log.append(f"{time.monotonic() - start:.3f} got {code} {method}")
                if method == "INVITE" and code >= 200 and res.final is None:
                    res.final = code
                    ok_headers = hdrs
            if res.final is None:
                res.error = f"no final response to INVITE after {time.monotonic() - start:.3f}s"
                return res
            assert ok_headers is not None
            to_hdr = ok_headers.get("to", [self.to_hdr])[0]
            if res.final >= 300:
                return res  # the proxy ACKs non-2xx hop by hop; nothing more to do here
            rr: list[str] = []
            for v in ok_headers.get("record-route", []):
                rr.extend(_split_header_values(v))
            routes = list(reversed(rr))
            contact = _split_header_values(ok_headers.get("contact", [""])[0])[0]
            m = re.search(r"<([^>]+)>", contact)
            target_uri = m.group(1) if m else contact.split(";")[0]
            route_hdr = f"Route: {', '.join(routes)}\r\n" if routes else ""

            def request(method: str, cseq: int) -> bytes:
                return (
                    f"{method} {target_uri} SIP/2.0\r\nVia: {self._via()}\r\n{route_hdr}"
                    f"From: {self.from_hdr}\r\nTo: {to_hdr}\r\nCall-ID: {self.call_id}\r\n"
                    f"CSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
                ).encode()

            ack = request("ACK", 1)
            sock.sendto(ack, self.target)
            time.sleep(hold)
            bye = request("BYE", 2)
            sock.sendto(bye, self.target)
            bye_deadline = time.monotonic() + 5.0
            next_bye = time.monotonic() + 0.5
            while res.bye_final is None and time.monotonic() < bye_deadline:
                sock.settimeout(0.1)
                try:
                    data = sock.recv(65535)
                except TimeoutError:
                    if time.monotonic() >= next_bye:
                        sock.sendto(bye, self.target)
                        next_bye = time.monotonic() + 0.5
                    continue
                parsed = _parse_response(data)
                if parsed is None:
                    continue
                code, hdrs = parsed
                method = (hdrs.get("cseq", ["1 ?"])[0].split() + ["?"])[1]
                res.responses.append((code, method))
                if method == "INVITE" and code < 300 and code >= 200:
                    sock.sendto(ack, self.target)  # retransmitted 2xx: ACK again
                elif method == "BYE" and code >= 200:
                    res.bye_final = code
            if res.bye_final is None:
                res.error = "no final response to BYE"
        return res


# ---------------------------------------------------------------------- the stack


class E2EStack:
    """Starts UAS / sipguard / UAC for one test and stops all of them at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sipps: list[SippProcess] = []
        self.guards: list[SipguardProcess] = []

    def uas(
        self,
        scenario: str,
        *,
        transport: str = "udp",
        calls: int,
        duration_ms: int = 100,
        timeout: float = 60.0,
        name: str = "uas",
        extra: Sequence[str] = (),
    ) -> SippProcess:
        p = SippProcess(
            name,
            scenario,
            self.workdir,
            local_port=free_port(),
            transport=transport,
            calls=calls,
            duration_ms=duration_ms,
            timeout=timeout,
            extra=extra,
        ).start()
        self.sipps.append(p)
        p.wait_bound()
        return p

    def sipguard(
        self,
        *,
        core_port: int,
        core_transport: str = "udp",
        listen: Iterable[str] = ("udp", "tcp"),
        config_extra: str = "",
        ready_timeout: float = 10.0,
    ) -> tuple[SipguardProcess, int]:
        """Start sipguard listening on one free port for each transport in `listen`."""
        port = free_port()
        g = SipguardProcess(
            self.workdir,
            listen=[f"{t}://{HOST}:{port}" for t in listen],
            core=f"{core_transport}://{HOST}:{core_port}",
            config_extra=config_extra,
        )
        self.guards.append(g)
        g.start(ready_timeout)
        return g, port

    def uac(
        self,
        scenario: str,
        *,
        remote_port: int,
        transport: str = "udp",
        calls: int,
        rate: float = 100,
        duration_ms: int = 100,
        timeout: float = 60.0,
        name: str = "uac",
        extra: Sequence[str] = (),
    ) -> SippResult:
        """Run a SIPp UAC to completion (bounded by timeout) and return its counts."""
        p = SippProcess(
            name,
            scenario,
            self.workdir,
            local_port=free_port(),
            transport=transport,
            remote=(HOST, remote_port),
            calls=calls,
            rate=rate,
            duration_ms=duration_ms,
            timeout=timeout,
            extra=extra,
        ).start()
        self.sipps.append(p)
        return p.wait()

    def finish_uas(self, uas: SippProcess, grace: float = 5.0) -> SippResult:
        """Let the UAS exit by itself (its -m reached) within grace seconds, else stop it."""
        assert uas.proc is not None
        try:
            uas.proc.wait(grace)
        except subprocess.TimeoutExpired:
            return uas.stop()
        return uas.result()

    def close(self) -> None:
        for s in self.sipps:
            if s.proc is not None and s.proc.poll() is None:
                stop_pid(s.proc, grace=3.0)
        for g in self.guards:
            g.stop()
