"""Micro-benchmark: what rule ``identity`` (STIR/SHAKEN) costs per initial INVITE, no sockets.

With the certificate cache warm (the steady state: one x5u per originating carrier, kept up to
a day), measures over N distinct signed PASSporTs (distinct ``iat``/``origid``, as real calls):

* ``decode``: ``decode_passport`` (base64url + JSON + claim checks);
* ``verify``: the ES256 signature check alone;
* ``decide``: ``Policy.decide`` with only the identity rule (header selection, decode, freshness,
  numbers, x5u policy, cache lookups, signature, verdict) — the verification cost per INVITE;
* ``invite``: a whole initial INVITE through ``EdgeCore.receive`` (the proxy: parse, 100
  Trying, decision, forwarding with the outcome header), with no rules and with ``identity``;

and, once per certificate (cache miss), ``chain``: PEM parse + chain validation to the anchor.

    .venv/bin/python loadtest/bench_identity.py [--n 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchutil import quiet_gc  # noqa: E402

from sipguard.contract import CallInfo, Flow, Local  # noqa: E402
from sipguard.edge import EdgeCore  # noqa: E402
from sipguard.ops.config_load import parse_config  # noqa: E402
from sipguard.policy.engine import Policy  # noqa: E402
from sipguard.policy.passport import decode_passport, verify_signature  # noqa: E402
from sipguard.policy.state import RuleState  # noqa: E402
from sipguard.policy.stircert import (  # noqa: E402
    UrlEntry,
    load_trust_anchors,
    parse_chain,
    verify_chain,
)
from sipguard.proxy.settings import ProxySettings  # noqa: E402
from sipguard.sip.parser import parse_message  # noqa: E402
from tests.unit.stir_pki import Pki, identity_value, pem, sign_passport  # noqa: E402

URL = "https://cert.example.org/709J.pem"
SRC = ("198.51.100.7", 5062)
SDP = "v=0\r\no=- 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


def invite(i: int, identity: str | None) -> bytes:
    ident = f"Identity: {identity}\r\n" if identity else ""
    return (
        f"INVITE sip:+18005550199@192.0.2.1:5060;user=phone SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK-{i}-a;rport\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:+12125550100@198.51.100.7>;tag=f{i}\r\n"
        f"To: <sip:+18005550199@192.0.2.1>\r\n"
        f"Call-ID: bench-{i}@198.51.100.7\r\n"
        f"CSeq: 1 INVITE\r\n"
        f"Contact: <sip:+12125550100@198.51.100.7:5062>\r\n"
        f"{ident}"
        f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n{SDP}"
    ).encode()


def per_call_us(fn: Callable[[int], object], n: int, repeat: int) -> float:
    """Best of ``repeat`` runs of fn(0..n-1), CPU microseconds per call (process time, so
    other processes on a shared machine do not inflate it)."""
    best = float("inf")
    for _ in range(repeat):
        with quiet_gc():
            started = time.process_time()
            for i in range(n):
                fn(i)
            best = min(best, (time.process_time() - started) / n * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = args.n
    pki = Pki()
    tmp = Path(tempfile.mkdtemp(prefix="bench-identity-"))
    atexit.register(shutil.rmtree, tmp, True)  # the test PKI goes with the run
    anchors_dir, _ = pki.write(tmp)
    wall = float(int(time.time()))
    tokens = [sign_passport(pki.leaf_key, URL, iat=int(wall), origid=f"00000000-0000-0000-0000-{i:012d}")
              for i in range(n)]
    values = [identity_value(t, URL) for t in tokens]

    cfg_text = json.dumps({
        "listen": ["udp://192.0.2.1:5060"], "core": "udp://10.0.0.10:5080",
        "rules": {"identity": {"trust_anchors": str(anchors_dir)}},
    })
    policy = Policy(parse_config(cfg_text, base_dir=tmp), RuleState(wall_offset=wall - 1000.0))
    policy.activate()  # swapped in, as the edge core does (sizes the certificate cache)
    cache = policy.state.certs
    chain_pem = pem(pki.leaf, pki.inter)
    cache.store(URL, UrlEntry(parse_chain(chain_pem), "", "", 1e12), 1000.0)
    plain = Policy(parse_config("listen: [udp://192.0.2.1:5060]\ncore: udp://10.0.0.10:5080\n"))

    msgs = [parse_message(invite(i, v)) for i, v in enumerate(values)]
    flow = Flow("udp", SRC, 0)
    calls = [CallInfo(m, flow, 1000.0) for m in msgs]
    verdict = policy.decide(calls[0], 1000.0)
    assert getattr(verdict, "forward_headers", None) is not None, verdict
    assert calls[0].labels.get("identity") == "passed", calls[0].labels

    passports = [decode_passport(t) for t in tokens]
    key = pki.leaf.public_key()
    anchors = load_trust_anchors(anchors_dir)

    def fresh_call(i: int) -> None:
        policy.decide(CallInfo(msgs[i], flow, 1000.0), 1000.0)

    results = {
        "decode": per_call_us(lambda i: decode_passport(tokens[i]), n, args.repeat),
        "verify": per_call_us(lambda i: verify_signature(passports[i], key), n, args.repeat),
        "decide": per_call_us(fresh_call, n, args.repeat),
        "chain (miss)": per_call_us(
            lambda i: verify_chain(parse_chain(chain_pem), anchors, wall), min(n, 2000),
            args.repeat),
    }

    def through_proxy(pol: Policy, with_identity: bool) -> float:
        settings = ProxySettings(locals=(Local(0, "udp", "192.0.2.1", 5060),),
                                 core=Flow("udp", ("10.0.0.10", 5080), 0))
        datas = [invite(i, values[i] if with_identity else None) for i in range(n)]

        def run(i: int) -> None:
            core.receive(datas[i], flow, 1000.0)
            core.outbox.clear()
            core.drain_events()

        best = float("inf")
        for _ in range(args.repeat):
            core = EdgeCore(settings, pol, b"k" * 32)
            best = min(best, per_call_us(run, n, 1))
            assert len(core.proxy.dialogs) == n, "every INVITE decided at once and forwarded"
        return best

    results["invite, no rules"] = through_proxy(plain, False)
    results["invite, identity"] = through_proxy(policy, True)
    width = max(map(len, results))
    print(f"n={n}, best of {args.repeat}, CPU time per call, Python {sys.version.split()[0]}")
    for name, us in results.items():
        print(f"  {name:<{width}}  {us:8.1f} µs   {1e6 / us:10,.0f} /s")


if __name__ == "__main__":
    main()
