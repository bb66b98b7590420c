"""Micro-benchmark: what rule ``callerid`` costs per initial INVITE, in memory, no sockets.

Measures, over the same INVITE bytes:

* ``decide``: ``Policy.decide`` alone — peer lookup, suspended check and the rule pipeline —
  with no rules, and with ``callerid`` and every check on (E.164, validity, a DNO list,
  ownership, PAI/From comparison, neighbor spoofing, verstat, verdict header);
* ``invite``: a whole initial INVITE through ``EdgeCore.receive`` (the proxy: parse, 100
  Trying, decision, forwarding with the header edits) with no rules and with ``callerid``;

each with callers the number cache has seen (``warm``) and with a new caller number on every
INVITE (``cold``: phonenumbers runs each time, the worst case — a dialer rotating numbers).

    .venv/bin/python loadtest/bench_callerid.py [--n 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sipguard.contract import CallInfo, Flow, Local  # noqa: E402
from sipguard.edge import EdgeCore  # noqa: E402
from sipguard.ops.config_load import parse_config  # noqa: E402
from sipguard.policy import numbers  # noqa: E402
from sipguard.policy.engine import Policy  # noqa: E402
from sipguard.proxy.settings import ProxySettings  # noqa: E402
from sipguard.sip.parser import parse_message  # noqa: E402

SRC = ("198.51.100.7", 5062)
BASE = """
listen: [udp://192.0.2.1:5060]
core: udp://10.0.0.10:5080
peers:
  - name: carrier-a
    networks: [198.51.100.0/24]
    numbers: ["+1212555*", "+1646555*"]
    default_region: US
"""
RULES = """
rules:
  callerid:
    dno_file: {dno}
    pai_mismatch: tag
    neighbor_spoofing: {{enabled: true}}
"""
SDP = "v=0\r\no=- 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def invite(i: int, caller: str) -> bytes:
    return (
        f"INVITE sip:+18005550199@192.0.2.1:5060;user=phone SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-{i}-a;rport\r\n"
        f"Max-Forwards: 70\r\n"
        f'From: "Agent" <sip:{caller}@198.51.100.7>;tag=f{i}\r\n'
        f"To: <sip:+18005550199@192.0.2.1>\r\n"
        f"Call-ID: {i}-bench@198.51.100.7\r\nCSeq: 1 INVITE\r\n"
        f"P-Asserted-Identity: <sip:{caller}@198.51.100.7;user=phone>\r\n"
        f"Contact: <sip:{caller}@198.51.100.7:5062>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n{SDP}"
    ).encode()


def callers(n: int, cold: bool, offset: int) -> list[str]:
    if cold:  # a new, valid, owned number every time: +1212 555 0000..9999, +1646 555 ...
        return [f"+1{('212', '646')[(offset + i) // 10000 % 2]}555{(offset + i) % 10000:04d}"
                for i in range(n)]
    return [f"+1212555{i % 100:04d}" for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = args.n
    with tempfile.TemporaryDirectory() as tmp:
        dno = Path(tmp) / "dno.txt"
        dno.write_text("".join(f"+1800555{i:04d}\n" for i in range(10000)))
        plain = Policy(parse_config(BASE))
        rule = Policy(parse_config(BASE + RULES.format(dno=dno)))
    settings = ProxySettings(locals=(Local(0, "udp", "192.0.2.1", 5060),),
                             core=Flow("udp", ("10.0.0.10", 5080), 0))
    flow = Flow("udp", SRC, 0)
    offset = 0

    def run_decide(policy: Policy, cold: bool) -> float:
        nonlocal offset
        msgs = [parse_message(invite(i, c)) for i, c in enumerate(callers(n, cold, offset))]
        offset += n
        if cold:
            numbers.clear_cache()
        calls = [CallInfo(m, flow, 0.0) for m in msgs]
        gc.collect()
        t0 = time.process_time()
        for call in calls:
            policy.decide(call, 0.0)
        return (time.process_time() - t0) / n * 1e6

    def run_invite(policy: Policy, cold: bool) -> float:
        nonlocal offset
        data = [invite(i, c) for i, c in enumerate(callers(n, cold, offset))]
        offset += n
        if cold:
            numbers.clear_cache()
        core = EdgeCore(settings, policy, b"k" * 32)
        gc.collect()
        t0 = time.process_time()
        for d in data:
            core.receive(d, flow, 0.0)
            core.outbox.clear()
            core.drain_events()
        spent = time.process_time() - t0
        assert len(core.proxy.dialogs) == n  # every INVITE accepted and forwarded
        return spent / n * 1e6

    # Interleaved repeats, best of each: a busy machine slows every case alike.
    cases = [(cache, name, policy) for cache in ("warm", "cold")
             for name, policy in (("no rules", plain), ("callerid", rule))]
    best: dict[tuple[str, str], list[float]] = {(c, nm): [1e9, 1e9] for c, nm, _ in cases}
    for _ in range(args.repeat):
        for cache, name, policy in cases:
            cell = best[(cache, name)]
            cell[0] = min(cell[0], run_decide(policy, cache == "cold"))
            cell[1] = min(cell[1], run_invite(policy, cache == "cold"))
    rows = [(cache, name, *best[(cache, name)]) for cache, name, _ in cases]
    print(f"{'numbers':8} {'rules':10} {'decide µs':>10} {'INVITE µs':>10}")
    for cache, name, d, inv in rows:
        print(f"{cache:8} {name:10} {d:10.2f} {inv:10.2f}")
    for cache in ("warm", "cold"):
        base = next(r for r in rows if r[0] == cache and r[1] == "no rules")
        with_rule = next(r for r in rows if r[0] == cache and r[1] == "callerid")
        print(f"{cache}: callerid adds {with_rule[2] - base[2]:.2f} µs per INVITE "
              f"({(with_rule[3] / base[3] - 1) * 100:.0f} % of the INVITE path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
