"""sipguard load test: SIPp call load at a series of rates, direct vs through sipguard.

    python loadtest/run.py [--rates 200,500,1000,1500] [--duration 10] [--hold-ms 1000]
                           [--transport udp|tcp] [--probe-rate 20] [--only direct|sipguard]
                           [--paths direct,kamailio,sipguard,redis,redis-workers] [--workers 2]
                           [--proxy-cmd "python -m sipguard"] [--config FILE]
    python loadtest/run.py --compare [--rates 1000,2000,3000,4000] [--duration 15]
                           [--paths direct,kamailio,sipguard,redis-workers] [--no-pin]

For every rate it runs (a) the baseline SIPp UAC -> SIPp UAS and (b) SIPp UAC -> sipguard ->
SIPp UAS, each for --duration seconds of call generation with --hold-ms long calls, while a
Python probe UAC places --probe-rate calls/s alongside and times INVITE -> 200 with
time.perf_counter() (SIPp's own response times tick in 4 ms steps).  sipguard's CPU use is
read from /proc/PID/stat (utime+stime) before and after the step.  It prints one table and
writes the same numbers as JSON into loadtest/results/.  See loadtest/README.md.

On a machine with two or more CPUs sipguard gets the last CPU to itself and SIPp, the probe and
this runner share the others (``--no-pin`` turns that off): in production the proxy does not
share its core with the load generator, and a SIPp process scheduled onto sipguard's core
measures the scheduler rather than the proxy.  The direct baseline runs on the same CPUs as
SIPp does in the sipguard step.

``--paths`` picks the systems measured at every rate, in one run: ``direct``, ``relay`` (what a
Python process on uvloop pays per call before any SIP work: ``loadtest/relay.py``, pinned like
sipguard), ``sipguard`` (the
config as given, memory state), ``redis`` (the same config with ``state.backend: redis`` on a
redis-server this runner starts on a free loopback port for the run, emptied before each step)
and ``redis-workers`` (that, with ``--workers`` processes; unpinned — they share the CPUs);
``shm-workers`` is ``--workers`` processes sharing their limits through shared memory
(``state.backend: shared_memory``, ``worker_spread: caller``), no Redis, unpinned.
sipguard's CPU is summed over its process tree (the supervisor and its workers); Redis's CPU is
reported apart (``redis_cpu_ms/call``).  ``kamailio`` is Kamailio (``loadtest/kamailio/kamailio.cfg``)
as the proxy, its CPU summed over its processes; ``kamailio-identity`` the same with its
STIR/SHAKEN check on (the secsipid module verifies the Identity headers sipguard verifies,
against the signing certificate in a file), for a like-for-like figure.

``--compare`` is the comparison mode: direct, Kamailio and sipguard with every rule on
(``loadtest/all_rules.yaml``, plus STIR/SHAKEN verification of the Identity header a share of
the calls carry) at 1000..4000 calls/s, 15 s each; every step passes or fails (>= 99.9 %
completed, SIPp retransmissions < 0.1 % of the calls), and the summary gives each system's
highest passing rate and sipguard / Kamailio ratios, also as a markdown table
(``loadtest/compare.py``).

Everything runs on 127.0.0.1; every process is bounded by a call count and a hard timeout and
is stopped by its PID.  ``run.py probe ...`` is the probe itself (started as a subprocess).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from loadtest import compare  # noqa: E402
from tests.e2e.harness import (  # noqa: E402
    HOST,
    SipguardProcess,
    SippProcess,
    _split_header_values,
    cpu_seconds,
    free_port,
    sipguard_command,
    sipp_binary,
    stop_pid,
)

SCENARIOS = HERE / "scenarios"
NUMBERS = HERE / "numbers.csv"
RESULTS = HERE / "results"
ALL_RULES = HERE / "all_rules.yaml"
PATHS = ("direct", "relay", "kamailio", "kamailio-identity", "sipguard", "redis", "redis-workers",
         "shm-workers")
WORKER_PATHS = ("redis-workers", "shm-workers")  # several processes, unpinned
# The load caller's SIPp flags for what the scenario does not wait for: a 180 forwarded after
# its 200 (a proxy's parallel UDP workers) is logged and ignored, not a reason to abort the call
# (the scenarios take provisional responses as optional="true").
UAC_BEHAVIOURS = ("-default_behaviors", "all,-abortunexp")


# ============================================================================ probe


def percentile(values: list[float], q: float) -> float | None:
    """q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@dataclass
class ProbeCall:
    call_id: str
    tag: str
    invite: bytes
    t_invite: float = 0.0
    t_first: float | None = None
    t_200: float | None = None
    to_hdr: str = ""
    ack: bytes = b""
    bye: bytes = b""
    done: bool = False
    failed: str | None = None
    invite_sends: int = 0
    bye_sends: int = 0


def _hdrs(head: list[str]) -> dict[str, list[str]]:
    compact = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact"}
    out: dict[str, list[str]] = {}
    for line in head[1:]:
        n, _, v = line.partition(":")
        n = n.strip().lower()
        out.setdefault(compact.get(n, n), []).append(v.strip())
    return out


class Probe(asyncio.DatagramProtocol):
    """Low-rate UDP UAC: INVITE -> (1xx) -> 200 -> ACK -> hold -> BYE -> 200, with RFC 3261
    style retransmissions (INVITE until a response, BYE until its final response)."""

    def __init__(self, target: tuple[str, int], local_port: int, hold: float) -> None:
        self.target = target
        self.local_port = local_port
        self.hold = hold
        self.calls: dict[str, ProbeCall] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.n = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, self.target)

    def _via(self) -> str:
        return f"SIP/2.0/UDP {HOST}:{self.local_port};branch=z9hG4bK-probe-{uuid.uuid4().hex[:16]}"

    def start_call(self) -> None:
        self.n += 1
        caller = f"+1212559{self.n % 10000:04d}"
        callee = f"+1646559{self.n % 10000:04d}"
        call_id = f"probe-{uuid.uuid4().hex}@{HOST}"
        tag = uuid.uuid4().hex[:12]
        sdp = (
            f"v=0\r\no=probe 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
        )
        invite = (
            f"INVITE sip:{callee}@{self.target[0]}:{self.target[1]} SIP/2.0\r\n"
            f"Via: {self._via()}\r\n"
            f"From: <sip:{caller}@{HOST}:{self.local_port}>;tag={tag}\r\n"
            f"To: <sip:{callee}@{self.target[0]}:{self.target[1]}>\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Contact: <sip:{caller}@{HOST}:{self.local_port};transport=UDP>\r\n"
            f"Max-Forwards: 70\r\nContent-Type: application/sdp\r\n"
            f"Content-Length: {len(sdp)}\r\n\r\n{sdp}"
        ).encode()
        c = ProbeCall(call_id, tag, invite)
        self.calls[call_id] = c
        c.t_invite = time.perf_counter()
        self._send(invite)
        c.invite_sends = 1
        asyncio.get_running_loop().call_later(0.5, self._retrans_invite, c, 0.5)

    def _retrans_invite(self, c: ProbeCall, interval: float) -> None:
        if c.t_first is not None or c.done:
            return
        if c.invite_sends >= 7:
            c.failed, c.done = "INVITE timeout", True
            return
        self._send(c.invite)
        c.invite_sends += 1
        nxt = min(interval * 2, 4.0)
        asyncio.get_running_loop().call_later(nxt, self._retrans_invite, c, nxt)

    def _send_bye(self, c: ProbeCall) -> None:
        if c.done:
            return
        if c.bye_sends >= 7:
            c.failed, c.done = "BYE timeout", True
            return
        self._send(c.bye)
        c.bye_sends += 1
        asyncio.get_running_loop().call_later(0.5 * min(2**c.bye_sends, 8), self._send_bye, c)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.perf_counter()
        head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n")
        if not head or not head[0].startswith("SIP/2.0 "):
            return
        code = int(head[0].split()[1])
        h = _hdrs(head)
        c = self.calls.get((h.get("call-id") or [""])[0])
        if c is None:
            return
        cseq = (h.get("cseq") or ["1 ?"])[0].split()
        method = cseq[1] if len(cseq) > 1 else "?"
        if method == "INVITE":
            if c.t_first is None:
                c.t_first = now
            if 200 <= code < 300:
                if c.t_200 is None:
                    c.t_200 = now
                    self._prepare_dialog(c, h)
                    asyncio.get_running_loop().call_later(self.hold, self._send_bye, c)
                self._send(c.ack)  # first 2xx or a retransmission of it
            elif code >= 300 and not c.done:
                c.failed, c.done = f"INVITE {code}", True
        elif method == "BYE" and code >= 200 and not c.done:
            c.done = True
            if code >= 300:
                c.failed = f"BYE {code}"

    def _prepare_dialog(self, c: ProbeCall, h: dict[str, list[str]]) -> None:
        rr: list[str] = []
        for v in h.get("record-route", []):
            rr.extend(_split_header_values(v))
        routes = list(reversed(rr))
        contact = _split_header_values((h.get("contact") or [""])[0] or "")
        m = re.search(r"<([^>]+)>", contact[0] if contact else "")
        target_uri = m.group(1) if m else f"sip:{self.target[0]}:{self.target[1]}"
        c.to_hdr = (h.get("to") or [""])[0]
        route = f"Route: {', '.join(routes)}\r\n" if routes else ""
        from_hdr = f"<sip:probe@{HOST}:{self.local_port}>;tag={c.tag}"
        caller = re.search(r"^From: ([^\r\n]*)", c.invite.decode(), re.M)
        if caller:
            from_hdr = caller.group(1)

        def req(method: str, cseq: int) -> bytes:
            return (
                f"{method} {target_uri} SIP/2.0\r\nVia: {self._via()}\r\n{route}"
                f"From: {from_hdr}\r\nTo: {c.to_hdr}\r\nCall-ID: {c.call_id}\r\n"
                f"CSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ).encode()

        c.ack = req("ACK", 1)
        c.bye = req("BYE", 2)


async def run_probe(
    target: tuple[str, int], local_port: int, rate: float, duration: float, hold: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    transport, probe = await loop.create_datagram_endpoint(
        lambda: Probe(target, local_port, hold), local_addr=(HOST, local_port)
    )
    try:
        t0 = time.perf_counter()
        n_total = max(int(rate * duration), 1)
        for i in range(n_total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            probe.start_call()
        deadline = time.perf_counter() + hold + 15.0
        while time.perf_counter() < deadline and not all(c.done for c in probe.calls.values()):
            await asyncio.sleep(0.05)
    finally:
        transport.close()
    calls = list(probe.calls.values())
    # (INVITE -> 200 ms, seconds into the step) per answered call; the slowest ten and when
    # they started: a tail that comes at one moment (a stall) reads differently from one
    # spread over the step (queueing).
    answered = [((c.t_200 - c.t_invite) * 1000, c.t_invite - t0) for c in calls
                if c.t_200 is not None]
    to200 = [ms for ms, _ in answered]
    slowest = sorted(answered)[-10:]
    first = [(c.t_first - c.t_invite) * 1000 for c in calls if c.t_first is not None]
    ok = [c for c in calls if c.done and c.failed is None and c.t_200 is not None]
    failures: dict[str, int] = {}
    for c in calls:
        if c not in ok:
            reason = c.failed or "unfinished"
            failures[reason] = failures.get(reason, 0) + 1
    return {
        "calls": len(calls),
        "completed": len(ok),
        "failed": len(calls) - len(ok),
        "failures": failures,
        "invite_retransmissions": sum(max(c.invite_sends - 1, 0) for c in calls),
        "to200_ms": {
            "p50": percentile(to200, 50),
            "p90": percentile(to200, 90),
            "p99": percentile(to200, 99),
            "max": max(to200, default=None),
            "n": len(to200),
            "slowest": [{"ms": round(ms, 3), "at_s": round(at, 3)} for ms, at in reversed(slowest)],
        },
        "first_response_ms": {
            "p50": percentile(first, 50),
            "p99": percentile(first, 99),
            "n": len(first),
        },
    }


def probe_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="run.py probe", description="latency probe UAC (UDP)")
    ap.add_argument("--target", required=True, help="HOST:PORT")
    ap.add_argument("--local-port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=20)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--hold-ms", type=int, default=100)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    host, _, port = a.target.rpartition(":")
    res = asyncio.run(
        run_probe((host, int(port)), a.local_port, a.rate, a.duration, a.hold_ms / 1000)
    )
    a.out.write_text(json.dumps(res, indent=2))


# ======================================================================= load steps


@dataclass
class Step:
    rate: int
    path: str  # "direct" | "sipguard"
    duration: float
    attempted: int = 0
    completed: int = 0
    failed: int = 0
    success_pct: float = 0.0
    achieved_cps: float = 0.0
    uac_elapsed_s: float = 0.0
    uac_timed_out: bool = False
    uac_returncode: int | None = None
    retransmissions: int = 0  # the UAC's (SIPp Retransmissions(C))
    uas_retransmissions: int = 0
    retrans_total: int = 0  # UAC + UAS
    retrans_pct: float = 0.0  # of the calls attempted
    passed: bool = False  # >= 99.9 % completed and retrans_pct < 0.1
    uas_completed: int = 0
    uas_failed: int = 0
    probe: dict[str, Any] = field(default_factory=dict)
    p50_ms: float | None = None
    p99_ms: float | None = None
    sipguard_cpu_s: float | None = None
    proxy_cpu_s: float | None = None  # the proxy's process tree (sipguard or Kamailio)
    proxy_processes: int = 0
    cpu_ms_per_call: float | None = None
    redis_cpu_ms_per_call: float | None = None
    steal_pct: float | None = None  # the host's CPU time the hypervisor gave elsewhere
    sipguard_returncode: int | None = None
    proxy_returncode: int | None = None
    identity_fetches: int | None = None  # x5u fetches during the step (compare mode)
    error: str | None = None
    workdir: str = ""


def host_ticks() -> tuple[int, int] | None:
    """(steal, all) CPU ticks of the whole machine so far (/proc/stat); None where not Linux.
    Steal is time a virtual machine's CPUs were ready to run but the hypervisor ran something
    else: on a shared host it moves every figure of a step, whichever system is measured."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (fields[7], sum(fields)) if len(fields) == 8 else None


def steal_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Steal as a share (%) of all CPU time between two :func:`host_ticks` readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` and every live descendant (a supervisor and its workers)."""
    total = 0.0
    for p in tree_pids(pid):
        try:
            total += cpu_seconds(p)
        except OSError:  # ended since the scan
            continue
    return total


def tree_pids(pid: int) -> list[int]:
    """pid and its live descendants."""
    return [pid, *compare._children_of(pid)]


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    """The sipguard config of the run (the given file, or a minimal one), with rules.identity
    added first when the run verifies STIR/SHAKEN (--identity-share > 0): the load kit's trust
    anchors, x5u and freshness over the file's own rules.identity keys, if any."""
    import yaml

    base: dict[str, Any] = (
        yaml.safe_load(args.config.read_text()) if args.config is not None
        else {"listen": [f"udp://{HOST}:5060"], "core": f"udp://{HOST}:5080"}
    )
    if args.identity is not None:
        rules = dict(base.get("rules") or {})
        own = rules.pop("identity", None) or {}  # its other keys (verify_threads, ...) stay
        base["rules"] = {"identity": {**own, **args.identity.settings(identity_freshness(args))},
                         **rules}
    return base


def identity_freshness(args: argparse.Namespace) -> float:
    """How old a PASSporT may be (s): the injection file's are signed once per step, so a
    step's length and a call's, and a minute's margin."""
    return args.duration + args.hold_ms / 1000 + 60


def sipguard_configs(args: argparse.Namespace, root: Path, url: str | None) -> dict[str, Path]:
    """The config file of each sipguard path: for ``sipguard`` the given one as is (or, with
    identity, a copy with rules.identity); for the Redis paths that with the state section,
    and for ``redis-workers`` the worker count. Written next to the given config so its
    relative paths still resolve; removed at the end of the run."""
    import yaml

    base = base_config(args)
    folder = args.config.parent if args.config is not None else root
    out: dict[str, Path] = {}
    for path in ("sipguard", "redis", "redis-workers", "shm-workers"):
        if path == "sipguard" and args.identity is None:
            continue
        if path.startswith("redis") and url is None:
            continue
        cfg = dict(base)
        if path.startswith("redis"):
            cfg["state"] = {"backend": "redis", "url": url}
        if path == "shm-workers":
            cfg["state"] = {"backend": "shared_memory"}
        if path in WORKER_PATHS:
            cfg["workers"] = args.workers
        file = folder / f".loadtest-{root.name}-{path}.yaml"
        file.write_text(yaml.safe_dump(cfg, sort_keys=False))
        out[path] = file
    return out


def proxy_command(args: argparse.Namespace, pin: bool) -> list[str] | None:
    """The sipguard command; pinned: under ``taskset`` so every thread and child process of
    it starts on the proxy's CPU."""
    cmd = shlex.split(args.proxy_cmd) if args.proxy_cmd else None
    if pin and args.proxy_cpu is not None and shutil.which("taskset"):
        return ["taskset", "-c", str(args.proxy_cpu), *(cmd or sipguard_command())]
    return cmd


def start_relay(args: argparse.Namespace, workdir: Path, port: int,
                core_port: int) -> subprocess.Popen[bytes]:
    """The ``relay`` path: ``loadtest/relay.py`` (the Python floor, no SIP work), pinned like
    sipguard; returns once it is bound."""
    cmd = [sys.executable, str(HERE / "relay.py"), "--listen", f"{HOST}:{port}",
           "--core", f"{HOST}:{core_port}"]
    if args.proxy_cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(args.proxy_cpu), *cmd]
    with open(workdir / "relay_stderr.txt", "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "relay ready", or b"" if it died
    proc.stdout.close()
    if not line.startswith(b"relay ready"):
        stop_pid(proc, grace=1)
        raise RuntimeError(f"relay did not start: see {workdir / 'relay_stderr.txt'}")
    return proc


def run_warmup(args: argparse.Namespace, workdir: Path, target: int, inf: Path,
               scenario: Path, extra: list[str]) -> None:
    """A few calls before the measured ones (compare mode): the certificate cache of the
    identity rule is warm, every proxy has seen traffic. Not counted."""
    calls = args.warmup_calls
    if calls <= 0:
        return
    warm = SippProcess(
        "warmup", scenario, workdir, local_port=free_port(), transport=args.transport,
        remote=(HOST, target), calls=calls, rate=min(calls, 50), duration_ms=100, timeout=20,
        inf=inf, trace_msg=False, extra=extra,
    )
    warm.start()
    res = warm.wait()
    if res.successful < calls:
        print(f"  note: warm-up {res.successful}/{calls} calls completed ({workdir.name})",
              flush=True)


def run_step(args: argparse.Namespace, rate: int, path: str, root: Path) -> Step:
    step = Step(rate=rate, path=path, duration=args.duration)
    workdir = root / f"{rate:05d}-{path}"
    workdir.mkdir(parents=True, exist_ok=True)
    step.workdir = str(workdir)
    hold_s = args.hold_ms / 1000
    attempted = max(int(rate * args.duration), 1)
    probe_calls = int(args.probe_rate * args.duration)
    limit = args.duration + hold_s + 40  # hard bound of one step's SIPp runs, seconds
    log_cap = ["-max_log_size", "2000000", "-ringbuffer_files", "1"]
    uas = SippProcess(
        "uas",
        SCENARIOS / "uas_load.xml",
        workdir,
        local_port=free_port(),
        transport=args.transport,
        calls=(attempted + probe_calls + args.warmup_calls) * 2 + 100,
        timeout=limit + 40,
        inf=None,
        trace_msg=False,
        extra=log_cap,
    )
    guard: SipguardProcess | None = None
    kam: compare.KamailioProcess | None = None
    proxy_pid: int | None = None
    probe_proc: subprocess.Popen[bytes] | None = None
    relay_proc: subprocess.Popen[bytes] | None = None
    redis = args.redis if path.startswith("redis") else None
    inf, scenario = NUMBERS, SCENARIOS / "uac_load.xml"
    uac_extra = [*log_cap, *UAC_BEHAVIOURS]
    if args.uac_sockets == "per-call":
        # one UDP socket per call (SIPp -t un): many source ports, as many callers would send
        # from; the kernel's SO_REUSEPORT spreading over workers needs that to spread at all
        uac_extra += ["-t", "un", "-max_socket", "16000"]
    try:
        if args.identity is not None:
            inf = args.identity.write_csv(workdir / "numbers_identity.csv")
            scenario = SCENARIOS / "uac_load_identity.xml"
        uas.start()
        uas.wait_bound()
        target = uas.local_port
        if path in compare.KAMAILIOS:
            port = free_port()
            defines = list(args.kamailio_define)
            if path == "kamailio-identity" and args.identity is not None:
                defines += args.identity.kamailio_defines(identity_freshness(args))
            kam = compare.KamailioProcess(
                workdir, port=port, core=(HOST, uas.local_port), transport=args.transport,
                cpu=args.proxy_cpu, children=args.kamailio_children, defines=defines,
            ).start()
            proxy_pid, target = kam.pid, port
        elif path == "relay":
            port = free_port()
            relay_proc = start_relay(args, workdir, port, uas.local_port)
            proxy_pid, target = relay_proc.pid, port
        elif path != "direct":
            port = free_port()
            config = args.sipguard_configs.get(path, args.config)
            if redis is not None:
                redis.flush()
            guard = SipguardProcess(
                workdir,
                listen=[f"{args.transport}://{HOST}:{port}"],
                core=f"{args.transport}://{HOST}:{uas.local_port}",
                config_path=config,
                command=proxy_command(args, pin=path not in WORKER_PATHS),
                stdout_events=False,
            )
            guard.start(ready_timeout=20)
            if path in WORKER_PATHS:
                time.sleep(2.0)  # every worker up (the supervisor reports ready first)
            proxy_pid, target = guard.pid, port
        fetches0 = args.identity.fetches() if args.identity is not None else 0
        if args.compare:
            run_warmup(args, workdir, target, inf, scenario, uac_extra[len(log_cap):])
        cpu0 = tree_cpu_seconds(proxy_pid) if proxy_pid else 0.0
        rcpu0 = cpu_seconds(redis.proc.pid) if redis is not None and redis.proc else 0.0
        probe_out = workdir / "probe.json"
        if args.probe_rate > 0:
            probe_cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "probe",
                "--target",
                f"{HOST}:{target}",
                "--local-port",
                str(free_port()),
                "--rate",
                str(args.probe_rate),
                "--duration",
                str(args.duration),
                "--hold-ms",
                "100",
                "--out",
                str(probe_out),
            ]
            with open(workdir / "probe_stderr.txt", "wb") as perr:
                probe_proc = subprocess.Popen(
                    probe_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=perr
                )
        uac = SippProcess(
            "uac",
            scenario,
            workdir,
            local_port=free_port(),
            transport=args.transport,
            remote=(HOST, target),
            calls=attempted,
            rate=rate,
            duration_ms=args.hold_ms,
            timeout=limit,
            inf=inf,
            trace_msg=False,
            extra=uac_extra,
        )
        t0 = time.monotonic()
        ticks0 = host_ticks()
        uac.start()
        res = uac.wait()
        step.uac_elapsed_s = time.monotonic() - t0
        step.steal_pct = steal_pct(ticks0, host_ticks())
        if probe_proc is not None:
            try:
                probe_proc.wait(max(args.duration + 25 - step.uac_elapsed_s, 5))
            except subprocess.TimeoutExpired:
                stop_pid(probe_proc, grace=2)
        if proxy_pid is not None:
            step.proxy_processes = len(tree_pids(proxy_pid))
            step.proxy_cpu_s = tree_cpu_seconds(proxy_pid) - cpu0
            if guard is not None:
                step.sipguard_cpu_s = step.proxy_cpu_s
        if args.identity is not None:
            step.identity_fetches = args.identity.fetches() - fetches0
        if redis is not None and redis.proc is not None:
            rcpu = cpu_seconds(redis.proc.pid) - rcpu0
            step.redis_cpu_ms_per_call = 1000 * rcpu / max(res.created or attempted, 1)
        step.attempted = res.created or attempted
        step.completed = res.successful
        step.failed = res.failed
        step.uac_timed_out = res.timed_out
        step.uac_returncode = res.returncode
        step.retransmissions = res.retransmissions
        step.success_pct = 100.0 * step.completed / step.attempted if step.attempted else 0.0
        gen_window = max(step.uac_elapsed_s - hold_s, 1e-3)
        step.achieved_cps = step.completed / gen_window
        if probe_out.exists():
            step.probe = json.loads(probe_out.read_text())
            step.p50_ms = step.probe["to200_ms"]["p50"]
            step.p99_ms = step.probe["to200_ms"]["p99"]
        if step.proxy_cpu_s is not None:
            handled = step.attempted + int(step.probe.get("calls", 0))
            step.cpu_ms_per_call = 1000 * step.proxy_cpu_s / max(handled, 1)
    except Exception as exc:  # noqa: BLE001 - report and go on with the next step
        step.error = f"{type(exc).__name__}: {exc}"
    finally:
        if probe_proc is not None and probe_proc.poll() is None:
            stop_pid(probe_proc, grace=2)
        if guard is not None:
            step.sipguard_returncode = step.proxy_returncode = guard.stop()
        if kam is not None:
            step.proxy_returncode = kam.stop()
        if relay_proc is not None:
            stop_pid(relay_proc, grace=3)
            step.proxy_returncode = relay_proc.returncode
        if uas.proc is not None:
            ures = uas.stop(grace=5)
            step.uas_completed, step.uas_failed = ures.successful, ures.failed
            step.uas_retransmissions = ures.retransmissions
    step.retrans_total = step.retransmissions + step.uas_retransmissions
    step.retrans_pct = 100.0 * step.retrans_total / step.attempted if step.attempted else 0.0
    step.passed = compare.passed(asdict(step))
    return step


# ========================================================================== report


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


HEADER = (
    f"{'rate':>6} {'path':<13} {'attempted':>9} {'completed':>9} {'failed':>6} {'ok%':>7} "
    f"{'calls/s':>8} {'retrans':>7} {'retr%':>6} {'probe':>9} {'p50ms':>8} {'p99ms':>8} "
    f"{'cpu_ms/call':>11} {'x_cps':>6} {'x_p50':>6} {'x_p99':>6} {'pass':>4} {'steal%':>6}"
)


def row(s: Step, base: Step | None) -> str:
    xs = (
        (
            ratio(s.achieved_cps, base.achieved_cps),
            ratio(s.p50_ms, base.p50_ms),
            ratio(s.p99_ms, base.p99_ms),
        )
        if base and s is not base
        else (None, None, None)
    )
    probe = f"{s.probe.get('completed', 0)}/{s.probe.get('calls', 0)}" if s.probe else "-"
    line = (
        f"{s.rate:>6} {s.path:<13} {s.attempted:>9} {s.completed:>9} {s.failed:>6} "
        f"{s.success_pct:>7.2f} {s.achieved_cps:>8.1f} {s.retrans_total:>7} "
        f"{s.retrans_pct:>6.2f} {probe:>9} {fmt(s.p50_ms, '.3f'):>8} "
        f"{fmt(s.p99_ms, '.3f'):>8} {fmt(s.cpu_ms_per_call, '.3f'):>11} "
        f"{fmt(xs[0]):>6} {fmt(xs[1]):>6} {fmt(xs[2]):>6} {'yes' if s.passed else 'NO':>4} "
        f"{fmt(s.steal_pct, '.1f'):>6}"
    )
    if s.redis_cpu_ms_per_call is not None:
        line += f"  redis {s.redis_cpu_ms_per_call:.3f} ms/call"
    if s.error:
        line += f"  ERROR {s.error}"
    elif s.uac_timed_out:
        line += "  (UAC hit its time limit)"
    return line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        probe_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(
        description="sipguard load test: direct baseline vs through sipguard (and Kamailio)"
    )
    ap.add_argument(
        "--compare", action="store_true",
        help="comparison mode: direct, Kamailio and sipguard with every rule on "
        f"({ALL_RULES.name} + STIR/SHAKEN); defaults rates 1000,2000,3000,4000, 15 s steps",
    )
    ap.add_argument("--rates", help="comma-separated call rates (calls/s); default "
                    "200,500,1000,1500 (compare: 1000,2000,3000,4000)")
    ap.add_argument("--duration", type=float,
                    help="seconds of call generation per step; default 10 (compare: 15)")
    ap.add_argument("--hold-ms", type=int, default=1000, help="call duration (SIPp -d)")
    ap.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    ap.add_argument(
        "--probe-rate", type=float, default=20, help="latency probe calls/s (0: no probe)"
    )
    ap.add_argument("--only", choices=["direct", "sipguard"], help="run one path only")
    ap.add_argument(
        "--paths", help="systems to measure, comma-separated, in order: direct, relay (the "
        "Python floor: loadtest/relay.py, no SIP work), kamailio, kamailio-identity (Kamailio "
        "checking the Identity headers too: secsipid), sipguard, redis (state on a "
        "local redis-server), redis-workers (--workers processes on it), shm-workers "
        "(--workers processes sharing limits in shared memory); default "
        "direct,sipguard (compare: direct,kamailio,sipguard)",
    )
    ap.add_argument("--workers", type=int, default=2,
                    help="processes of the redis-workers and shm-workers paths")
    ap.add_argument(
        "--uac-sockets", choices=["one", "per-call"], default="one",
        help="the load UAC sends from one socket (default) or one per call (SIPp -t un: many "
        "source ports, needed for the kernel to spread calls over --workers processes)",
    )
    ap.add_argument(
        "--proxy-cmd",
        help="command replacing `python -m sipguard` (then `run --config ... --listen ... --core ...` is appended)",
    )
    ap.add_argument(
        "--config", type=Path, help="sipguard config file to use (listen/core overridden by "
        f"flags); compare: loadtest/{ALL_RULES.name}",
    )
    ap.add_argument(
        "--identity-share", type=float,
        help="share of the calls carrying a signed Identity header (STIR/SHAKEN) that "
        "sipguard verifies; default 0 (compare: 0.5)",
    )
    ap.add_argument("--warmup-calls", type=int,
                    help="calls placed before each measured step; default 0 (compare: 20)")
    ap.add_argument("--kamailio-children", type=int, default=2,
                    help="Kamailio UDP worker processes (children=)")
    ap.add_argument("--kamailio-define", action="append", default=[], metavar="NAME=VALUE",
                    help="extra -A define for kamailio.cfg (e.g. CALLER_LIMIT=10), repeatable")
    ap.add_argument("--no-install", dest="install", action="store_false",
                    help="do not apt-get install kamailio when it is missing")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument(
        "--no-pin", dest="pin", action="store_false",
        help="do not give the proxy a CPU of its own (default: the last CPU, when there are 2+)",
    )
    args = ap.parse_args(argv)
    if args.rates is None:
        args.rates = "1000,2000,3000,4000" if args.compare else "200,500,1000,1500"
    if args.duration is None:
        args.duration = 15.0 if args.compare else 10.0
    if args.compare and args.config is None:
        args.config = ALL_RULES
    if args.identity_share is None:
        args.identity_share = 0.5 if args.compare else 0.0
    if args.warmup_calls is None:
        args.warmup_calls = 20 if args.compare else 0
    args.proxy_cpu = None
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) >= 2:
        args.proxy_cpu = cpus[-1]
        os.sched_setaffinity(0, set(cpus[:-1]))  # SIPp and the probe inherit the rest
    if sipp_binary() is None:
        print(
            "sipp not on PATH: install SIPp (Debian package sip-tester, `make sipp`)",
            file=sys.stderr,
        )
        return 2
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    if args.transport != "udp" and args.probe_rate > 0:
        print("note: the latency probe is UDP only; no probe (and no p50/p99) with --transport tcp")
        args.probe_rate = 0
    if args.config is not None:
        args.config = args.config.resolve()
    paths = [args.only] if args.only else ["direct", "sipguard"]
    if args.compare and not args.only:
        paths = ["direct", "kamailio", "sipguard"]
    if args.paths:
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        unknown = set(paths) - set(PATHS)
        if unknown:
            print(f"unknown --paths: {sorted(unknown)}", file=sys.stderr)
            return 2
    if "kamailio-identity" in paths and args.identity_share <= 0:
        print("kamailio-identity checks Identity headers: it needs --identity-share > 0",
              file=sys.stderr)
        return 2
    kamailios = [p for p in paths if p in compare.KAMAILIOS]
    if kamailios and compare.ensure_kamailio(
            args.install, identity="kamailio-identity" in kamailios) is None:
        print("kamailio not installed (Debian packages kamailio, and kamailio-secsipid-modules "
              "for kamailio-identity): drop it from --paths or allow the install",
              file=sys.stderr)
        return 2
    run_id = time.strftime("%Y%m%d-%H%M%S")
    root = args.results_dir / run_id
    root.mkdir(parents=True, exist_ok=True)
    args.redis = None
    args.identity = None
    args.sipguard_configs = {}
    try:
        if args.identity_share > 0:
            args.identity = compare.IdentityKit(root / "identity", args.identity_share)
        if any(p.startswith("redis") for p in paths):
            from tests.redis_server import RedisServer

            args.redis = RedisServer(root / "redis").start()
        args.sipguard_configs = sipguard_configs(
            args, root, args.redis.url if args.redis is not None else None
        )
        steps = run_all(args, rates, paths, run_id, root)
    finally:
        if args.redis is not None:
            args.redis.stop()
        if args.identity is not None:
            args.identity.stop()
        for file in args.sipguard_configs.values():
            file.unlink(missing_ok=True)
    return report(args, steps, paths, run_id, root)


def run_all(
    args: argparse.Namespace, rates: list[int], paths: list[str], run_id: str, root: Path
) -> list[Step]:
    proxy = args.proxy_cmd or shlex.join(sipguard_command())
    args.proxy_desc = proxy
    print(
        f"sipguard load test {run_id}: rates {rates} cps, {args.duration:g} s each, calls "
        f"{args.hold_ms} ms, {args.transport}, probe {args.probe_rate:g} cps, systems "
        f"{','.join(paths)}; proxy: {proxy}"
        + (f"; config {args.config}" if args.config else "")
        + (f"; identity on {args.identity_share:.0%} of calls" if args.identity else "")
        + (f"; proxies on CPU {args.proxy_cpu}" if args.proxy_cpu is not None else "; unpinned"),
        flush=True,
    )
    print(HEADER, flush=True)
    steps: list[Step] = []
    for rate in rates:
        base: Step | None = None
        for path in paths:
            s = run_step(args, rate, path, root)
            steps.append(s)
            if path == "direct":
                base = s
            print(row(s, base), flush=True)
    return steps


def report(
    args: argparse.Namespace, steps: list[Step], paths: list[str], run_id: str, root: Path
) -> int:
    sipp_ver = subprocess.run(
        [sipp_binary() or "sipp", "-v"], capture_output=True, text=True, timeout=10
    ).stdout
    kam_ver = ""
    if any(p in compare.KAMAILIOS for p in paths) and compare.kamailio_binary():
        kam_ver = subprocess.run(
            [compare.kamailio_binary() or "kamailio", "-v"], capture_output=True, text=True,
            timeout=10,
        ).stdout.splitlines()[0]
    dicts = [asdict(s) for s in steps]
    summ = compare.summary(dicts, paths)
    skip = ("redis", "identity", "sipguard_configs")
    result = {
        "run_id": run_id,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in skip},
        "proxy_cmd": args.proxy_desc,
        "sipguard_configs": {k: str(v) for k, v in args.sipguard_configs.items()},
        "kamailio_cfg": (str(compare.KAMAILIO_CFG)
                         if any(p in compare.KAMAILIOS for p in paths) else None),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "sipp": " ".join(sipp_ver.split())[:80],
            "sipp_path": shutil.which("sipp"),
            "kamailio": kam_ver,
        },
        "columns": {
            "attempted": "calls the SIPp UAC started",
            "completed": "calls that went INVITE..BYE/200 as scripted",
            "calls/s": "completed / (UAC wall time - hold time)",
            "retrans": "SIPp retransmissions, UAC + UAS (retr%: of the calls attempted)",
            "p50ms/p99ms": "probe INVITE->200 latency",
            "cpu_ms/call": "proxy process tree utime+stime / (load + probe calls)",
            "redis_cpu_ms_per_call": "redis-server utime+stime / load calls (redis paths)",
            "steal_pct": "the host's steal time (/proc/stat) as a % of all its CPU time "
                         "during the step's calls: a virtual machine's CPUs kept waiting",
            "x_*": "system / direct, same rate, same run",
            "pass": f">= {compare.PASS_COMPLETED_PCT} % completed and retransmissions "
                    f"< {compare.PASS_RETRANS_PCT} % of the calls",
        },
        "summary": summ,
        "steps": dicts,
    }
    out = args.results_dir / f"{run_id}.json"
    best = summ["highest_passing_rate"]
    print("highest passing rate: " + ", ".join(
        f"{p} {best[p] if best.get(p) else 'none'}" for p in paths))
    for p, rates in summ["passed_above_a_failure"].items():
        print(f"{p} also passed {rates} above a failed step (not counted)")
    for ref in compare.KAMAILIOS:
        for p, c in summ.get("vs_" + ref.replace("-", "_"), {}).items():
            hr, cr = c.get("highest_passing_rate_ratio"), c.get("cpu_per_call_ratio")
            print(f"{p} / {ref}: highest passing rate {fmt(hr)}x, CPU per call {fmt(cr)}x"
                  + (f" at {c['cpu_rate']} calls/s" if cr is not None else ""))
    if args.compare or any(p in compare.KAMAILIOS for p in paths):
        pin = (f"proxy pinned to CPU {args.proxy_cpu}, load on the others" if args.proxy_cpu
               is not None else "unpinned")
        note = (f"({run_id}: {args.duration:g} s per step, {args.hold_ms} ms calls, "
                f"{args.transport}, {pin}"
                + (f", Identity on {args.identity_share:.0%} of the calls" if args.identity_share
                   else "") + ")")
        result["markdown"] = compare.markdown(dicts, paths, summ, note)
        print("\nmarkdown:\n")
        print(result["markdown"])
        print()
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out} (traces in {root})")
    return 0 if all(s.error is None for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
