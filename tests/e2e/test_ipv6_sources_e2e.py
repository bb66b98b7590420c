"""IPv6 sources counted per network (``sip.ipv6_prefix``), over real sockets.

One holder of a /64 has 2^64 source addresses. This test gives sipguard and its callers a
network namespace of their own (``unshare -n``: root only, no traffic leaves it), puts a few
addresses of four /64 networks on its loopback, and checks from many addresses of one /64:

- the flood guard bans the /64 (its other addresses hear nothing; another /64 is answered);
- ``rate.per_source_ip`` limits the /64 (503 for the fourth call of a burst of three);
- ``sip.tcp_max_connections_per_ip`` caps connections from the /64;
- the ban lists as the network in ``GET /bans``, ``DELETE /bans/<network>/64`` lifts it, and
  the counters say what happened.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import REPO, SipguardProcess

SG = "2001:db8:7::1"  # sipguard's address, and the (absent) core's
FLOOD_NET, RATE_NET, TCP_NET, OTHER_NET = (f"2001:db8:7:{n}::" for n in (1, 2, 3, 9))
CONFIG = """\
admin: {listen: "[::1]:9090"}
rules:
  flood: {sampling_s: 10, density: 10, ban_s: 60}
  rate: {per_source_ip: {rate: 0.1, burst: 3}}
sip: {tcp_max_connections_per_ip: 2}
"""


def _options(src: str, i: int) -> bytes:
    return (
        f"OPTIONS sip:[{SG}]:5060 SIP/2.0\r\nVia: SIP/2.0/UDP [{src}]:5060;branch=z9hG4bK-o{i};rport\r\n"
        f"From: <sip:probe@[{src}]>;tag=o{i}\r\nTo: <sip:[{SG}]>\r\nCall-ID: o{i}@v6\r\n"
        f"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _invite(src: str, i: int) -> bytes:
    return (
        f"INVITE sip:+18005550199@[{SG}]:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP [{src}]:5060;branch=z9hG4bK-i{i};rport\r\n"
        f"From: <sip:+1212555{i:04d}@[{src}]>;tag=i{i}\r\nTo: <sip:+18005550199@[{SG}]>\r\n"
        f"Call-ID: i{i}@v6\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
        f"Contact: <sip:caller@[{src}]:5060>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def _ask(src: str, data: bytes, want: bytes, wait: float = 0.6) -> bytes | None:
    """Send ``data`` from ``src`` over UDP; the first answer whose status line starts with
    ``want`` (None: none within ``wait`` seconds)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.settimeout(0.1)
        s.sendto(data, (SG, 5060))
        end = time.monotonic() + wait
        while time.monotonic() < end:
            try:
                answer = s.recv(65536)
            except TimeoutError:
                continue
            if answer.startswith(want):
                return answer
    return None


def _tcp_accepted(src: str) -> socket.socket | None:
    """A connection from ``src`` that sipguard keeps open (None: closed at once)."""
    s = socket.create_connection((SG, 5060), timeout=2, source_address=(src, 0))
    s.settimeout(0.5)
    try:
        closed = s.recv(1) == b""
    except TimeoutError:
        return s  # still open after half a second
    except ConnectionResetError:
        closed = True
    if closed:
        s.close()
    return None


def inside() -> None:
    """Runs in the new network namespace: addresses, sipguard, the checks; prints JSON."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    addresses = [SG, *(f"{net}{i:x}" for net in (FLOOD_NET, RATE_NET, TCP_NET)
                       for i in range(1, 15)), f"{OTHER_NET}1"]
    for address in addresses:
        subprocess.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad"],
                       check=True)
    out: dict[str, Any] = {}
    core = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)  # takes the calls let through
    core.bind((SG, 5080))
    with core, tempfile.TemporaryDirectory(prefix="sipguard-v6-") as tmp:
        listen, target = [f"udp://[{SG}]:5060", f"tcp://[{SG}]:5060"], f"udp://[{SG}]:5080"
        config = Path(tmp) / "sipguard.yaml"
        config.write_text(f"listen: {json.dumps(listen)}\ncore: {json.dumps(target)}\n{CONFIG}")
        guard = SipguardProcess(Path(tmp), listen=listen, core=target,
                                config_path=config).start()
        try:
            # flood: 11 messages from 11 addresses of one /64 (density 10 per 10 s), all in
            # one sampling unit (sipguard's clock is CLOCK_MONOTONIC, as this one)
            if time.monotonic() % 10 > 8:
                time.sleep(10.05 - time.monotonic() % 10)
            out["flood_answers"] = [
                _ask(f"{FLOOD_NET}{i:x}", _options(f"{FLOOD_NET}{i:x}", i), b"SIP/2.0 200",
                     wait=0.3) is not None for i in range(1, 12)]
            out["flood_same_net_later"] = _ask(
                f"{FLOOD_NET}e", _options(f"{FLOOD_NET}e", 50), b"SIP/2.0 200") is not None
            out["flood_other_net"] = _ask(
                f"{OTHER_NET}1", _options(f"{OTHER_NET}1", 51), b"SIP/2.0 200") is not None
            # rate: four INVITEs from four addresses of one /64 (burst 3)
            out["rate_503"] = [
                _ask(f"{RATE_NET}{i:x}", _invite(f"{RATE_NET}{i:x}", i), b"SIP/2.0 503",
                     wait=0.4) is not None for i in range(1, 5)]
            # TCP: a cap of 2 per /64
            kept = [_tcp_accepted(f"{TCP_NET}{i:x}") for i in range(1, 4)]
            out["tcp_kept"] = [s is not None for s in kept]
            other = _tcp_accepted(f"{OTHER_NET}1")
            out["tcp_other_net_kept"] = other is not None
            for s in [*kept, other]:
                if s is not None:
                    s.close()
            with urllib.request.urlopen("http://[::1]:9090/bans", timeout=5) as resp:
                out["bans"] = json.loads(resp.read())["bans"]
            lift = urllib.request.Request(f"http://[::1]:9090/bans/{FLOOD_NET}/64",
                                          method="DELETE")
            try:
                with urllib.request.urlopen(lift, timeout=5) as resp:
                    out["lifted"] = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                out["lifted"] = {"status": exc.code, "body": exc.read().decode()}
            out["flood_after_lift"] = _ask(
                f"{FLOOD_NET}e", _options(f"{FLOOD_NET}e", 52), b"SIP/2.0 200") is not None
            with urllib.request.urlopen("http://[::1]:9090/metrics", timeout=5) as resp:
                text = resp.read().decode()
            out["metrics"] = [line for line in text.splitlines()
                              if line.startswith("sipguard_events_total")]
            with guard._cv:
                out["rules"] = [e["rules"] for e in guard.events
                                if e.get("event") == "sipguard_started"]
        finally:
            guard.stop()
    print(json.dumps(out))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                    or shutil.which("ip") is None,
                    reason="needs root, unshare and ip for a network namespace of its own")
def test_ipv6_sources_are_counted_per_network() -> None:
    run = subprocess.run(
        ["unshare", "-n", sys.executable, "-c",
         "from tests.e2e.test_ipv6_sources_e2e import inside; inside()"],
        cwd=REPO, capture_output=True, text=True, timeout=90,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["flood_answers"] == [True] * 10 + [False], out
    assert not out["flood_same_net_later"], "the other addresses of the banned /64 hear nothing"
    assert out["flood_other_net"], "another /64 is answered"
    assert out["rate_503"] == [False, False, False, True], out
    assert out["tcp_kept"] == [True, True, False], out
    assert out["tcp_other_net_kept"]
    assert [(b["source"], b["reason"]) for b in out["bans"]] == [
        ("2001:db8:7:1::/64", "flood")], out["bans"]
    assert out["lifted"] == {"lifted": "2001:db8:7:1::/64"} and out["flood_after_lift"]
    assert out["rules"] == [["rate", "flood"]], "the start-up line names the flood guard too"
    metrics = "\n".join(out["metrics"])
    assert 'event="tcp_refused_per_ip"} 1.0' in metrics, metrics


def test_a_call_over_ipv6_loopback() -> None:
    """An IPv6 listener carries a call: INVITE from [::1] to the core on [::1], its 200 back
    (no network namespace needed: every machine has ::1)."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback here")
    core = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    caller = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with core, caller, tempfile.TemporaryDirectory(prefix="sipguard-v6-") as tmp:
        core.bind(("::1", 0))
        caller.bind(("::1", 0))
        core.settimeout(5)
        caller.settimeout(5)
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as free:
            free.bind(("::1", 0))
            port = free.getsockname()[1]
        listen, target = [f"udp://[::1]:{port}"], f"udp://[::1]:{core.getsockname()[1]}"
        config = Path(tmp) / "sipguard.yaml"
        config.write_text(f"listen: {json.dumps(listen)}\ncore: {json.dumps(target)}\n")
        guard = SipguardProcess(Path(tmp), listen=listen, core=target, config_path=config).start()
        try:
            me = caller.getsockname()[1]
            caller.sendto((
                f"INVITE sip:+18005550199@[::1]:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP [::1]:{me};branch=z9hG4bK-v6call;rport\r\n"
                f"From: <sip:+12125550100@[::1]>;tag=v6\r\nTo: <sip:+18005550199@[::1]>\r\n"
                f"Call-ID: v6-call\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
                f"Contact: <sip:caller@[::1]:{me}>\r\nContent-Length: 0\r\n\r\n").encode(),
                ("::1", port))
            assert caller.recv(65536).startswith(b"SIP/2.0 100 ")
            got, at = core.recvfrom(65536)
            assert got.startswith(b"INVITE sip:+18005550199@[::1]")
            head = got.split(b"\r\n\r\n")[0].decode()
            vias = [line for line in head.split("\r\n") if line.lower().startswith("via:")]
            keep = [line for line in head.split("\r\n")
                    if line.split(":")[0].lower() in ("from", "to", "call-id", "cseq")]
            core.sendto(("SIP/2.0 200 OK\r\n" + "\r\n".join(vias + keep).replace(
                "To: <sip:+18005550199@[::1]>", "To: <sip:+18005550199@[::1]>;tag=c1")
                + "\r\nContact: <sip:core@[::1]>\r\nContent-Length: 0\r\n\r\n").encode(), at)
            assert caller.recv(65536).startswith(b"SIP/2.0 200 OK")
        finally:
            guard.stop()
