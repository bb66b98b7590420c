"""Micro-benchmark of the sans-I/O hot path: a whole call through the edge core in memory.

Drives N complete calls (INVITE, 100, 180, 200, ACK, BYE, 200 — seven messages in, eight out)
through ``EdgeCore.receive`` (proxy and policy, as sipguard runs them) with no sockets, and
reports CPU µs per call and per message. The baseline, measured in the same run over the same
bytes, is ``parse_message`` alone: the ratio says how much the proxy and policy cost on top of
parsing. Machines are noisy, so compare ratios. ``--config`` benchmarks with that file's rules
(its listen/core are replaced by the benchmark's).

    .venv/bin/python loadtest/bench_core.py [--calls 20000] [--repeat 5] [--config FILE]
                                            [--interleave N]

``--interleave N`` overlaps the calls as under load, N up at once (see ``run_interleaved``):
a call's objects are cold by the time its next message comes, which is closer to what the
process pays than calls run one after another.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import quiet_gc  # noqa: E402

from sipguard.contract import Flow, Local  # noqa: E402
from sipguard.edge import EdgeCore  # noqa: E402
from sipguard.ops.config_load import parse_config  # noqa: E402
from sipguard.policy.engine import Policy  # noqa: E402
from sipguard.proxy.settings import ProxySettings  # noqa: E402
from sipguard.sip.parser import parse_message  # noqa: E402

CALLER = ("198.51.100.7", 5062)
CORE = ("10.0.0.10", 5080)
SDP = (
    "v=0\r\no=- 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\n"
    "m=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
)


def invite(i: int, callee: str = "+18005550199") -> bytes:
    return (
        f"INVITE sip:{callee}@192.0.2.1:5060;user=phone SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-{i}-a;rport\r\n"
        f"Max-Forwards: 70\r\n"
        f'From: "Agent {i}" <sip:+1212555{i % 10000:04d}@198.51.100.7>;tag=f{i}\r\n'
        f"To: <sip:{callee}@192.0.2.1>\r\n"
        f"Call-ID: {i}-bench@198.51.100.7\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:+1212555{i % 10000:04d}@198.51.100.7:5062>\r\n"
        f"User-Agent: bench/1.0\r\nAllow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE\r\n"
        f"Supported: timer, replaces\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {len(SDP)}\r\n\r\n{SDP}"
    ).encode()


def response(req: bytes, status: int, phrase: str) -> bytes:
    msg = parse_message(req)
    vias = "".join(f"Via: {v}\r\n" for v in msg.values("via"))
    rr = "".join(f"Record-Route: {v}\r\n" for v in msg.values("record-route"))
    to = msg.get("to") or ""
    if status > 100:
        to += ";tag=core1"
    return (
        f"SIP/2.0 {status} {phrase}\r\n{vias}{rr}From: {msg.get('from')}\r\nTo: {to}\r\n"
        f"Call-ID: {msg.call_id}\r\nCSeq: {msg.get('cseq')}\r\n"
        f"Contact: <sip:core@10.0.0.10:5080>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def in_dialog(method: str, i: int, cseq: int) -> bytes:
    return (
        f"{method} sip:core@10.0.0.10:5080 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-{i}-{method};rport\r\n"
        f"Route: <sip:192.0.2.1:5060;lr>\r\nMax-Forwards: 70\r\n"
        f'From: "Agent {i}" <sip:+1212555{i % 10000:04d}@198.51.100.7>;tag=f{i}\r\n'
        f"To: <sip:+18005550199@192.0.2.1>;tag=core1\r\n"
        f"Call-ID: {i}-bench@198.51.100.7\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()


MINIMAL = "listen: [udp://192.0.2.1:5060]\ncore: udp://10.0.0.10:5080\n"


def new_core(rules: str = "") -> EdgeCore:
    settings = ProxySettings(
        locals=(Local(0, "udp", "192.0.2.1", 5060),), core=Flow("udp", CORE, 0)
    )
    return EdgeCore(settings, Policy(parse_config(MINIMAL + rules)), b"k" * 32)


def parse_seconds(inputs: list[bytes]) -> float:
    """The baseline: ``parse_message`` alone over the same inputs, seconds."""
    t0 = time.perf_counter()
    for data in inputs:
        parse_message(data)
    return time.perf_counter() - t0


def run(calls: int, rules: str = "") -> tuple[float, float, int]:
    """(seconds in the edge core, seconds parsing the same inputs, messages in)."""
    proxy = new_core(rules)
    src, core = Flow("udp", CALLER, 0), Flow("udp", CORE, 0)
    now = 1000.0
    spent = 0.0
    inputs: list[bytes] = []
    for i in range(calls):
        t0 = time.perf_counter()
        proxy.receive(invite(i), src, now)
        spent += time.perf_counter() - t0
        fwd = proxy.outbox[-1][1]
        proxy.outbox.clear()
        proxy.drain_events()
        script = [
            (response(fwd, 100, "Trying"), core),
            (response(fwd, 180, "Ringing"), core),
            (response(fwd, 200, "OK"), core),
            (in_dialog("ACK", i, 1), src),
            (in_dialog("BYE", i, 2), src),
        ]
        inputs.append(invite(i))
        for data, flow in script:
            t0 = time.perf_counter()
            proxy.receive(data, flow, now)
            spent += time.perf_counter() - t0
            inputs.append(data)
            if data.startswith(b"BYE"):
                bye = proxy.outbox[-1][1]
                proxy.outbox.clear()
                ok = response(bye, 200, "OK")
                t0 = time.perf_counter()
                proxy.receive(ok, core, now)
                spent += time.perf_counter() - t0
                inputs.append(ok)
            proxy.outbox.clear()
            proxy.drain_events()
        now += 0.001
        proxy.handle_timer(now)
        proxy.outbox.clear()
    return spent, parse_seconds(inputs), len(inputs)


def run_interleaved(calls: int, rules: str = "", lag: int = 1000,
                    by_kind: dict[str, float] | None = None) -> tuple[float, float, int]:
    """As :func:`run`, but the calls overlap as under load: each 1 ms step brings a new
    INVITE, the answers (100, 180, 200) and ACK of the call placed 20 steps earlier, and the
    BYE (and its 200) of the call placed ``lag`` steps earlier — ``lag`` calls are up at once,
    and a call's objects are touched again only after those of many others. ``by_kind``
    gets the seconds spent per kind of message (``INVITE``, ``180``, ``BYE 200``, ...)."""
    proxy = new_core(rules)
    src, core = Flow("udp", CALLER, 0), Flow("udp", CORE, 0)
    now = 1000.0
    spent = 0.0
    inputs: list[bytes] = []
    forwarded: dict[int, bytes] = {}

    def feed(data: bytes, flow: Flow, kind: str) -> bytes | None:
        nonlocal spent
        t0 = time.perf_counter()
        proxy.receive(data, flow, now)
        took = time.perf_counter() - t0
        spent += took
        if by_kind is not None:
            by_kind[kind] = by_kind.get(kind, 0.0) + took
        inputs.append(data)
        out = proxy.outbox[-1][1] if proxy.outbox else None
        proxy.outbox.clear()
        proxy.drain_events()
        return out

    for step in range(calls + lag):
        if step < calls:
            # each caller dials its own callee (numbers.csv-like): per-callee limits hold
            fwd = feed(invite(step, f"+1646555{(step * 7919) % 10000:04d}"), src, "INVITE")
            assert fwd is not None and fwd.startswith(b"INVITE"), fwd
            forwarded[step] = fwd
        j = step - 20
        if 0 <= j < calls:
            fwd = forwarded[j]
            for status, phrase in ((100, "Trying"), (180, "Ringing"), (200, "OK")):
                feed(response(fwd, status, phrase), core, str(status))
            feed(in_dialog("ACK", j, 1), src, "ACK")
        k = step - lag
        if 0 <= k < calls:
            del forwarded[k]
            bye = feed(in_dialog("BYE", k, 2), src, "BYE")
            assert bye is not None and bye.startswith(b"BYE"), bye
            feed(response(bye, 200, "OK"), core, "BYE 200")
        now += 0.001
        proxy.handle_timer(now)
        proxy.outbox.clear()
    assert proxy.proxy.live_dialogs() == 0, proxy.proxy.live_dialogs()
    return spent, parse_seconds(inputs), len(inputs)


def config_rules(path: Path | None) -> str:
    """The rules (and peers) of the sipguard config at ``path`` for :func:`new_core`: the file
    without its ``listen:`` and ``core:`` lines (the benchmark's own are used); "" for none."""
    if path is None:
        return ""
    return "\n".join(ln for ln in path.read_text().splitlines()
                     if not ln.startswith(("listen:", "core:")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--config", type=Path, default=None,
                    help="a sipguard config whose rules: / peers: to run (listen/core ignored)")
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="overlap the calls, N up at once (as under load: see run_interleaved)")
    args = ap.parse_args()
    rules = config_rules(args.config)
    best: tuple[float, float, int] | None = None
    best_kinds: dict[str, float] = {}
    for _ in range(args.repeat):
        kinds: dict[str, float] = {}
        # sipguard runs with automatic GC passes off (cli.py): so does the benchmark
        with quiet_gc():
            result = (run_interleaved(args.calls, rules, args.interleave, kinds)
                      if args.interleave else run(args.calls, rules))
        if best is None or result[0] < best[0]:
            best, best_kinds = result, kinds
    assert best is not None
    spent, parse, msgs = best
    per_call = spent / args.calls * 1e6
    print(f"calls                 {args.calls}")
    print(f"core µs per call      {per_call:8.1f}   ({msgs // args.calls} messages in)")
    print(f"core µs per message   {spent / msgs * 1e6:8.1f}")
    print(f"parse µs per message  {parse / msgs * 1e6:8.1f}   (baseline, same inputs)")
    print(f"core / parse ratio    {spent / parse:8.2f}")
    print(f"calls/s per core      {1e6 / per_call:8.0f}   (proxy + policy, no syscalls)")
    for kind, seconds in best_kinds.items():  # --interleave: the same best round, per message
        print(f"  {kind:<8} µs        {seconds / args.calls * 1e6:8.1f}")


if __name__ == "__main__":
    main()
