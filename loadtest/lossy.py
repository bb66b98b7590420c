"""Calls over a lossy link: what sipguard still holds once they are over.

SIPp's caller, sipguard and SIPp's core run in a network namespace of this script's own whose
loopback drops a random share of the UDP datagrams it delivers (nftables ``numgen random`` on
the input hook: every datagram passes it once, in each direction). RFC 3261 over UDP lives on
retransmissions — INVITE and BYE (Timers A and E), the 2xx until its ACK, a non-2xx until its
ACK (Timer G) — so each lost datagram exercises one of them through sipguard. Per scenario
the same calls run straight from caller to core first (what the SIPp pair loses on its own),
then through sipguard; after the last call, ``--wait`` seconds (the 64*T1 timers, and the
OPTIONS sipguard sends the core after a BYE nobody answered) before sipguard's live dialogs,
transactions and per-number live-call counts are read from its admin API. Anything still held
then is a leak: the exit status is 1.

    .venv/bin/python loadtest/lossy.py [--loss 5] [--calls 200] [--rate 20] [--wait 75]

Needs root (``ip netns``), nftables (Debian package ``nftables``: ``nft``) and SIPp. Traffic
stays inside the namespace (127.0.0.1 there), which is deleted at the end. Bounded: ``--calls``
calls per run, each SIPp run stopped after ``--calls / --rate + 60`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LT, E2E = ROOT / "loadtest" / "scenarios", ROOT / "tests" / "e2e" / "scenarios"
# scenario: (caller, core, extra caller flags)
SCENARIOS = {
    "answered": (LT / "uac_load.xml", LT / "uas_load.xml", ["-default_behaviors", "all,-abortunexp"]),
    "busy": (E2E / "uac_expect_486.xml", E2E / "uas_busy.xml", []),
}
CALLER_PORT, GUARD_PORT, CORE_PORT, ADMIN_PORT = 5060, 5070, 5080, 9091


class Namespace:
    """``ip netns`` of our own, loopback up, with ``loss_permille`` of UDP dropped."""

    def __init__(self) -> None:
        self.name = f"sipguard-loss-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run(["ip", "link", "set", "lo", "up"])

    def cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str]) -> None:
        subprocess.run(self.cmd(argv), check=True)

    def loss(self, permille: int) -> None:
        rules = "table inet loss\ndelete table inet loss\n"
        if permille:
            rules += ("table inet loss {\n  chain in {\n"
                      "    type filter hook input priority 0; policy accept;\n"
                      f"    meta l4proto udp numgen random mod 1000 < {permille} drop\n"
                      "  }\n}\n")
        subprocess.run(self.cmd(["nft", "-f", "-"]), input=rules.encode(), check=True)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)


def stop(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sipp(ns: Namespace, work: Path, name: str, xml: Path, args: list[str]) -> list[str]:
    return ns.cmd(["sipp", *args, "-sf", str(xml), "-i", "127.0.0.1", "-t", "u1", "-nostdin",
                   "-trace_stat", "-stf", str(work / f"{name}.csv"), "-fd", "1"])


def completed(work: Path, name: str) -> tuple[int, int]:
    """(successful, failed) calls from SIPp's last statistics line."""
    lines = [ln for ln in (work / f"{name}.csv").read_text().splitlines() if ln.strip()]
    row = dict(zip(lines[0].split(";"), lines[-1].split(";"), strict=False))
    return int(row["SuccessfulCall(C)"]), int(row["FailedCall(C)"])


def admin(ns: Namespace, path: str) -> str:
    code = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            f"'http://127.0.0.1:{ADMIN_PORT}{path}', timeout=5).read().decode())")
    return subprocess.run(ns.cmd([sys.executable, "-c", code]), capture_output=True,
                          text=True, check=True).stdout


def held(ns: Namespace, numbers: set[str]) -> dict[str, float]:
    """What sipguard still holds: live dialogs, transactions, and live calls per number."""
    out: dict[str, float] = {}
    for line in admin(ns, "/metrics").splitlines():
        name, _, value = line.partition(" ")
        if name in ("sipguard_live_dialogs", "sipguard_server_transactions",
                    "sipguard_client_transactions"):
            out[name] = float(value)
    out["numbers_with_live_calls"] = sum(
        1 for n in numbers
        if any((json.loads(admin(ns, "/calls?number=" + urllib.parse.quote(n)))
                .get("counts") or {}).values()))
    return out


def one_run(ns: Namespace, work: Path, scenario: str, through: bool, args: argparse.Namespace,
            numbers: Path) -> tuple[int, int]:
    uac_xml, uas_xml, extra = SCENARIOS[scenario]
    uas = subprocess.Popen(sipp(ns, work, f"{scenario}-uas", uas_xml, ["-p", str(CORE_PORT)]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    target = GUARD_PORT if through else CORE_PORT
    name = f"{scenario}-{'sipguard' if through else 'direct'}"
    uac = subprocess.Popen(
        sipp(ns, work, name, uac_xml,
             [f"127.0.0.1:{target}", "-p", str(CALLER_PORT), "-inf", str(numbers),
              "-m", str(args.calls), "-r", str(args.rate), "-d", "1000", *extra]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uac.wait(args.calls / args.rate + 60)
    except subprocess.TimeoutExpired:
        stop(uac)
    stop(uas)
    return completed(work, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loss", type=float, default=5.0, help="percent of UDP datagrams dropped")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rate", type=float, default=20.0, help="calls per second")
    ap.add_argument("--wait", type=float, default=75.0,
                    help="seconds after the last call before reading what sipguard holds")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("sipp"):
        print("lossy.py needs root, nft (nftables) and sipp", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="sipguard-lossy-"))
    numbers = work / "numbers.csv"  # 10 callers, 20 called numbers: their counts are read
    pairs = [(f"+1212555{i % 10:04d}", f"+1646555{i:04d}") for i in range(20)]
    numbers.write_text("SEQUENTIAL\n" + "".join(f"{a};{b};\n" for a, b in pairs))
    wanted = {n for pair in pairs for n in pair}
    config = work / "sipguard.yaml"
    config.write_text(f"listen: [udp://127.0.0.1:{GUARD_PORT}]\ncore: udp://127.0.0.1:{CORE_PORT}\n"
                      f"admin: {{listen: 127.0.0.1:{ADMIN_PORT}}}\n"
                      "rules:\n  concurrency: {per_caller: 1000, per_callee: 1000}\n")
    ns = Namespace()
    leaks = 0
    try:
        permille = round(args.loss * 10)
        print(f"loss {args.loss:g} %, {args.calls} calls at {args.rate:g}/s per run; "
              f"work files in {work}")
        for scenario in args.scenarios.split(","):
            ns.loss(permille)
            ok, failed = one_run(ns, work, scenario, False, args, numbers)
            print(f"{scenario:9} direct:   {ok} completed, {failed} failed")
            ns.loss(0)
            with open(work / f"{scenario}-sipguard.log", "wb") as log:
                guard = subprocess.Popen(
                    ns.cmd([sys.executable, "-m", "sipguard", "run", "--config", str(config)]),
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            time.sleep(2.0)
            try:
                ns.loss(permille)
                ok, failed = one_run(ns, work, scenario, True, args, numbers)
                ns.loss(0)
                time.sleep(args.wait)
                state = held(ns, wanted)
            finally:
                stop(guard)
            left = {k: v for k, v in state.items() if v}
            leaks += bool(left)
            print(f"{scenario:9} sipguard: {ok} completed, {failed} failed; after {args.wait:g} s "
                  f"{'held: ' + json.dumps(left) if left else 'nothing held'}")
    finally:
        ns.close()
    return 1 if leaks else 0


if __name__ == "__main__":
    raise SystemExit(main())
