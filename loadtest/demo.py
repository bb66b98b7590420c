"""`make demo`: sipguard in front of a SIPp UAS, and a short labelled mix of calls through it.

Starts, all on 127.0.0.1 and on free ports:

- a SIPp UAS (``sipp -sn uas``, Debian package sip-tester) standing in for the core;
- sipguard (the venv's ``sipguard run``) with a demo config written to a temp dir: one peer
  127.0.0.1/32 owning ``+1212555*``; rules callerid, concurrency per_caller 2, dialer
  distinct_callees (block at 3) and rate per_caller {rate: 1, burst: 3};

then places calls with a small UDP user agent in this file (INVITE, ACK, BYE), and prints one
line per call: its label, what the caller heard, and the rule and reason sipguard logged for it
(its ``invite_decided`` line on stdout, matched by Call-ID). A number is suspended live on the
way: with ``sipguard suspend`` when the CLI has that verb, else by rewriting the config's
``suspended:`` and sending SIGHUP.

Every process it starts is stopped by its PID at the end, also on Ctrl-C or an error; every
wait is bounded. ``--json`` prints the results as one JSON list (used by
tests/e2e/test_demo_e2e.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
OWNED = "+1212555*"
CALLEE = "+16465552000"

CONFIG = """\
listen: [udp://{host}:{sip_port}]
core: udp://{host}:{core_port}
mode: enforce
admin: {{listen: "{host}:{admin_port}"}}
log: {{level: info, format: json, parse_error_sample_s: 1.0}}
peers:
  - name: demo-carrier
    networks: [{host}/32]
    numbers: ["{owned}"]
unknown_source: reject
suspended: {suspended}
rules:
  callerid: {{ownership: true, reject_invalid: true, require_e164: true}}
  concurrency: {{per_caller: 2}}
  dialer: {{distinct_callees: {{tag: 2, block: 3}}, sequential: null}}
  rate: {{per_caller: {{rate: 1, burst: 3}}}}
"""


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((HOST, 0))
            port = int(t.getsockname()[1])
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


# --------------------------------------------------------------------------- a tiny UAC


@dataclass
class Response:
    status: int
    phrase: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_response(data: bytes) -> Response | None:
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    lines = head.split("\r\n")
    m = re.match(r"SIP/2\.0 (\d{3}) ?(.*)", lines[0])
    if not m:
        return None
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return Response(int(m.group(1)), m.group(2), headers)


SDP = (
    "v=0\r\no=demo 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
    "m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


@dataclass
class Call:
    """One call from a UDP socket of its own, through sipguard."""

    label: str
    caller: str
    callee: str
    proxy: tuple[str, int]
    expect: str  # the class of answer this call should get (for the e2e test)
    call_id: str = field(default_factory=lambda: f"demo-{random.getrandbits(64):016x}@{HOST}")
    status: int | None = None
    phrase: str = ""
    reason_header: str | None = None
    answered: Response | None = None
    sock: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.tag = f"{random.getrandbits(32):08x}"
        self.cseq = 1

    def _via(self, branch: str) -> str:
        return f"Via: SIP/2.0/UDP {HOST}:{self.port};branch={branch};rport"

    def _send(self, text: str) -> None:
        self.sock.sendto(text.encode(), self.proxy)

    def invite(self, timeout: float = 10.0) -> int | None:
        """Send the INVITE; wait (bounded) for the final answer; ACK a non-2xx at once."""
        self.branch = f"z9hG4bK{random.getrandbits(48):012x}"
        body = SDP.format(host=HOST)
        self.invite_text = (
            f"INVITE sip:{self.callee}@{HOST}:{self.proxy[1]} SIP/2.0\r\n"
            f"{self._via(self.branch)}\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:{self.caller}@{HOST}>;tag={self.tag}\r\n"
            f"To: <sip:{self.callee}@{HOST}>\r\n"
            f"Call-ID: {self.call_id}\r\n"
            "CSeq: 1 INVITE\r\n"
            f"Contact: <sip:{self.caller}@{HOST}:{self.port}>\r\n"
            "User-Agent: sipguard-demo\r\n"
            "Content-Type: application/sdp\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        )
        self._send(self.invite_text)
        deadline = time.monotonic() + timeout
        resend, interval = time.monotonic() + 0.5, 0.5
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(deadline, resend) - time.monotonic()))
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                if time.monotonic() >= resend and self.status is None:
                    self._send(self.invite_text)  # Timer A, until a provisional arrives
                    interval = min(interval * 2, 4.0)
                    resend = time.monotonic() + interval
                continue
            resp = parse_response(data)
            if resp is None or "INVITE" not in (resp.header("CSeq") or ""):
                continue
            if resp.status < 200:
                resend = deadline  # provisional: stop retransmitting
                continue
            self.status, self.phrase = resp.status, resp.phrase
            self.reason_header = resp.header("Reason")
            if resp.status < 300:
                self.answered = resp
                self._ack_2xx()
            else:
                self._ack_non2xx(resp)
            return self.status
        return None

    def _ack_non2xx(self, resp: Response) -> None:
        self._send(
            f"ACK sip:{self.callee}@{HOST}:{self.proxy[1]} SIP/2.0\r\n"
            f"{self._via(self.branch)}\r\nMax-Forwards: 70\r\n"
            f"From: <sip:{self.caller}@{HOST}>;tag={self.tag}\r\n"
            f"To: {resp.header('To')}\r\nCall-ID: {self.call_id}\r\n"
            "CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
        )

    def _in_dialog(self, method: str, cseq: int) -> str:
        resp = self.answered
        assert resp is not None
        contact = resp.header("Contact") or f"<sip:{self.callee}@{HOST}>"
        target = contact[contact.find("<") + 1 : contact.find(">")] if "<" in contact else contact
        routes = [r.strip() for rr in resp.all("Record-Route") for r in rr.split(",")]
        route = "".join(f"Route: {r}\r\n" for r in reversed(routes))
        branch = f"z9hG4bK{random.getrandbits(48):012x}"
        return (
            f"{method} {target} SIP/2.0\r\n{self._via(branch)}\r\nMax-Forwards: 70\r\n{route}"
            f"From: <sip:{self.caller}@{HOST}>;tag={self.tag}\r\n"
            f"To: {resp.header('To')}\r\nCall-ID: {self.call_id}\r\n"
            f"CSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
        )

    def _ack_2xx(self) -> None:
        self._send(self._in_dialog("ACK", 1))

    def bye(self, timeout: float = 5.0) -> int | None:
        if self.answered is None:
            return None
        self.cseq += 1
        text = self._in_dialog("BYE", self.cseq)
        self._send(text)
        deadline = time.monotonic() + timeout
        resend = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, min(deadline, resend) - time.monotonic()))
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                if time.monotonic() >= resend:
                    self._send(text)
                    resend = time.monotonic() + 1.0
                continue
            resp = parse_response(data)
            if resp is not None and "BYE" in (resp.header("CSeq") or "") and resp.status >= 200:
                return resp.status
            if resp is not None and resp.status >= 200 and "INVITE" in (resp.header("CSeq") or ""):
                self._ack_2xx()  # a retransmitted 200: ACK again
        return None

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- processes


class Demo:
    def __init__(self, workdir: Path, sipguard: str) -> None:
        self.workdir = workdir
        self.sipguard = sipguard
        self.procs: list[subprocess.Popen[Any]] = []
        self.decisions: dict[str, dict[str, Any]] = {}
        self.lines: list[dict[str, Any]] = []
        self.reloaded = threading.Event()
        self.sip_port = free_port()
        self.core_port = free_port()
        self.admin_port = free_port()
        self.config = workdir / "sipguard.yaml"
        self.log = (workdir / "sipguard.log").open("w")

    def write_config(self, suspended: list[str]) -> None:
        text = CONFIG.format(host=HOST, sip_port=self.sip_port, core_port=self.core_port,
                             admin_port=self.admin_port, owned=OWNED,
                             suspended=json.dumps(suspended))
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config)

    def start(self) -> None:
        sipp = shutil.which("sipp")
        if sipp is None:
            raise SystemExit("sipp not found: install Debian sip-tester (make tools)")
        uas = subprocess.Popen(
            [sipp, "-sn", "uas", "-i", HOST, "-p", str(self.core_port), "-m", "100",
             "-timeout", "120s", "-nostdin", "-trace_err"],
            cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.procs.append(uas)
        self.write_config([])
        guard = subprocess.Popen(
            [self.sipguard, "run", "--config", str(self.config)],
            cwd=self.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.procs.append(guard)
        self.guard = guard
        threading.Thread(target=self._read_log, daemon=True).start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if any(line.get("event") == "sipguard_started" for line in list(self.lines)):
                break
            for name, p in zip(("sipp", "sipguard"), self.procs, strict=True):
                if p.poll() is not None:
                    raise SystemExit(f"{name} exited ({p.returncode}); see {self.log.name}")
            time.sleep(0.05)
        else:
            raise SystemExit("sipguard did not start in 15 s")
        time.sleep(0.3)  # let the SIPp UAS bind

    def _read_log(self) -> None:
        assert self.guard.stdout is not None
        for raw in self.guard.stdout:
            self.log.write(raw)
            self.log.flush()
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            self.lines.append(line)
            if line.get("event") == "invite_decided" and line.get("call_id"):
                self.decisions[line["call_id"]] = line
            if line.get("event") in ("config_reloaded", "config_reload_failed"):
                self.reloaded.set()

    def suspend(self, number: str) -> str:
        """Suspend a number live; returns how it was done."""
        helptext = subprocess.run([self.sipguard, "--help"], capture_output=True, text=True,
                                  timeout=30).stdout
        if re.search(r"\bsuspend\b", helptext):
            sub = subprocess.run([self.sipguard, "suspend", "--help"], capture_output=True,
                                 text=True, timeout=30).stdout
            opt = next((o for o in ("--admin", "--url", "--api") if o in sub), None)
            url = f"http://{HOST}:{self.admin_port}"
            cmd = [self.sipguard, "suspend", number] + ([opt, url] if opt else [])
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                return f"`sipguard suspend {number}` (admin API)"
            print(f"sipguard suspend failed ({done.returncode}): {done.stderr.strip()}; "
                  "falling back to the config file and SIGHUP", file=sys.stderr)
        self.reloaded.clear()
        self.write_config([number])
        os.kill(self.guard.pid, signal.SIGHUP)
        if not self.reloaded.wait(10):
            raise SystemExit("sipguard did not log config_reloaded within 10 s")
        return "config `suspended:` + SIGHUP"

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(0.5)
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)  # sipguard: a second signal ends its drain
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    p.wait(5)
        self.log.close()


# --------------------------------------------------------------------------- the mix


def run_mix(demo: Demo) -> tuple[list[Call], str]:
    proxy = (HOST, demo.sip_port)
    calls: list[Call] = []

    def call(label: str, caller: str, expect: str, callee: str = CALLEE) -> Call:
        c = Call(label, caller, callee, proxy, expect)
        calls.append(c)
        c.invite()
        return c

    # 1. a legitimate call: the peer owns the number
    c = call("legitimate", "+12125550100", "accept")
    c.bye()
    # 2. a spoofed caller: a valid number the peer does not own
    call("spoofed caller", "+13125550100", "callerid")
    # 3. three simultaneous calls from one number (per_caller 2): two held up, the third
    held = [call(f"concurrent {i}/3", "+12125550111", "accept") for i in (1, 2)]
    call("concurrent 3/3", "+12125550111", "concurrency")
    for c in held:
        c.bye()
    # 4. a dialer burst: one number, distinct callees, back to back (block at 3 callees)
    for i in range(1, 5):
        c = call(f"dialer burst {i}/4", "+12125550122",
                 "accept" if i < 3 else "dialer", callee=f"+1646555{2100 + i}")
        c.bye()
    # 5. a rate burst: one number, one callee, back to back (burst 3, then 1/s)
    for i in range(1, 6):
        c = call(f"rate burst {i}/5", "+12125550133", "accept" if i <= 3 else "rate")
        c.bye()
    # 6. a number suspended live, called before and after
    c = call("before suspend", "+12125550199", "accept")
    c.bye()
    how = demo.suspend("+12125550199")
    call("suspended caller", "+12125550199", "suspended")
    for c in calls:
        c.close()
    return calls, how


def rows(demo: Demo, calls: list[Call]) -> list[dict[str, Any]]:
    out = []
    for c in calls:
        d = demo.decisions.get(c.call_id)
        if d is None:
            rule, reason = "(line sampled)", ""
        else:
            rule = d.get("rule") or ("-" if d.get("verdict") == "accept" else "?")
            reason = d.get("reason") or d.get("verdict") or ""
        out.append({"label": c.label, "caller": c.caller, "callee": c.callee,
                    "status": c.status, "phrase": c.phrase, "rule": rule, "reason": reason,
                    "expect": c.expect, "call_id": c.call_id,
                    "logged": d is not None})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sipguard", default=str(REPO / ".venv" / "bin" / "sipguard"),
                    help="the sipguard executable (default: the venv's)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, log)")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="sipguard-demo-"))
    demo = Demo(workdir, args.sipguard)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        demo.start()
        calls, how = run_mix(demo)
        time.sleep(0.5)  # sipguard writes its log lines every 100 ms
        table = rows(demo, calls)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        demo.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps({"suspended_with": how, "calls": table}, indent=1))
        return 0
    print(f"sipguard udp://{HOST}:{demo.sip_port} -> SIPp UAS udp://{HOST}:{demo.core_port}; "
          f"suspended with {how}")
    print(f"{'call':<22} {'caller':<14} {'heard':<28} {'rule':<14} reason")
    for r in table:
        heard = f"{r['status']} {r['phrase']}" if r["status"] else "no answer"
        print(f"{r['label']:<22} {r['caller']:<14} {heard:<28} {r['rule']:<14} {r['reason']}")
    if args.keep:
        print(f"config and log kept in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
