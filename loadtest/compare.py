"""Comparison mode of the load kit (``loadtest/run.py --compare``): Kamailio as a second proxy,
the STIR/SHAKEN material for sipguard's identity rule, pass/fail and the summary.

- :func:`ensure_kamailio` / :class:`KamailioProcess`: Kamailio (Debian package ``kamailio``)
  started in the foreground with ``loadtest/kamailio/kamailio.cfg`` on a free loopback port,
  relaying to the SIPp UAS, its process tree pinned as sipguard's is; for the
  ``kamailio-identity`` system with the secsipid module too (``kamailio-secsipid-modules``),
  checking the Identity headers sipguard checks;
- :class:`IdentityKit`: a test STI-CA, an SP certificate served over HTTPS on 127.0.0.1 (x5u),
  and per step a SIPp injection file whose lines carry a signed PASSporT on a share of the calls;
- :func:`passed`, :func:`summary`, :func:`markdown`: the verdict per step and per system.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from tests.e2e.harness import HOST, free_port, wait_port_bound

HERE = Path(__file__).resolve().parent
KAMAILIO_CFG = HERE / "kamailio" / "kamailio.cfg"
NUMBERS = HERE / "numbers.csv"

PASS_COMPLETED_PCT = 99.9  # a step passes with at least this share of calls completed ...
PASS_RETRANS_PCT = 0.1  # ... and SIPp retransmissions below this share of the calls


# ============================================================================ Kamailio


def kamailio_binary() -> str | None:
    return shutil.which("kamailio") or next(
        (p for p in ("/usr/sbin/kamailio", "/usr/local/sbin/kamailio") if os.access(p, os.X_OK)),
        None,
    )


SECSIPID_MODULE: Final = "secsipid.so"  # Debian kamailio-secsipid-modules


def secsipid_installed() -> bool:
    """Kamailio's STIR/SHAKEN module is there (the ``kamailio-identity`` system needs it)."""
    binary = kamailio_binary()
    if binary is None:
        return False
    libdirs = [Path("/usr/lib/x86_64-linux-gnu/kamailio/modules"),
               Path("/usr/lib/kamailio/modules"), Path("/usr/local/lib64/kamailio/modules")]
    libdirs += list(Path("/usr/lib").glob("*/kamailio/modules"))
    return any((d / SECSIPID_MODULE).exists() for d in libdirs)


def ensure_kamailio(install: bool = True, identity: bool = False) -> str | None:
    """The kamailio binary; installed with apt (Debian package ``kamailio``, and
    ``kamailio-secsipid-modules`` with ``identity``) when missing and ``install``. The service
    the package may start is stopped and disabled: the runner starts its own instance per
    step. None when it (or, with ``identity``, its secsipid module) is missing."""
    packages = [] if kamailio_binary() else ["kamailio"]
    if identity and not secsipid_installed():
        packages.append("kamailio-secsipid-modules")
    if not packages or not install:
        return kamailio_binary() if not packages else None
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"installing Debian packages {' '.join(packages)}", flush=True)
    try:
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True, env=env, timeout=300,
                       stdout=subprocess.DEVNULL)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", *packages], check=True,
                       env=env, timeout=600, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"could not install {' '.join(packages)}: {exc}", flush=True)
        return None
    stop_kamailio_service()
    if identity and not secsipid_installed():
        return None
    return kamailio_binary()


def stop_kamailio_service() -> None:
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    for cmd in (["systemctl", "disable", "--now", "kamailio"], ["service", "kamailio", "stop"]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run(sudo + cmd, capture_output=True, timeout=30).returncode == 0:
                return


def _children_of(pid: int) -> list[int]:
    """Every live descendant of pid (from /proc)."""
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], list(kids.get(pid, ()))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def sip_options_ok(port: int, timeout: float = 0.5) -> bool:
    """True when an OPTIONS to 127.0.0.1:port gets a SIP response."""
    local = free_port()
    call_id = f"ready-{uuid.uuid4().hex}@{HOST}"
    msg = (
        f"OPTIONS sip:{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{local};branch=z9hG4bK-{uuid.uuid4().hex[:16]};rport\r\n"
        f"From: <sip:ready@{HOST}:{local}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{HOST}:{port}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n"
        "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, local))
        s.settimeout(timeout)
        s.sendto(msg, (HOST, port))
        try:
            data = s.recv(65535)
        except OSError:
            return False
    return data.startswith(b"SIP/2.0 ")


class KamailioProcess:
    """Kamailio in the foreground (``-DD -E``), its log in ``kamailio_stderr.txt`` in workdir.
    ``cpu``: pin the main process and every child it forks to this CPU (set before exec, so
    the children inherit it)."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int,
        core: tuple[str, int],
        transport: str = "udp",
        cpu: int | None = None,
        shm_mb: int = 1024,
        pkg_mb: int = 32,
        children: int = 2,
        defines: Sequence[str] = (),
        config: Path = KAMAILIO_CFG,
    ) -> None:
        binary = kamailio_binary()
        if binary is None:
            raise RuntimeError("kamailio not found (Debian package kamailio)")
        self.workdir = workdir
        self.port = port
        self.transport = transport
        self.cpu = cpu
        rundir = workdir / "kamailio-run"
        rundir.mkdir(exist_ok=True)
        cmd = [binary, "-f", str(config), "-DD", "-E", "-x", "tlsf", "-m", str(shm_mb),
               "-M", str(pkg_mb), "-Y", str(rundir), "-l", f"udp:{HOST}:{port}"]
        if transport == "tcp":
            cmd += ["-l", f"tcp:{HOST}:{port}", "-A", "WITH_TCP"]
        cmd += ["-A", f'CORE_URI="sip:{core[0]}:{core[1]};transport={transport}"',
                "-A", f"UDP_CHILDREN={children}"]
        for d in defines:
            cmd += ["-A", d]
        self.cmd = cmd
        self.proc: subprocess.Popen[bytes] | None = None
        self.children: set[int] = set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_timeout: float = 15.0) -> KamailioProcess:
        import shlex

        (self.workdir / "kamailio_cmd.txt").write_text(shlex.join(self.cmd) + "\n")
        err = open(self.workdir / "kamailio_stderr.txt", "wb")  # noqa: SIM115
        cpu = self.cpu

        def pin() -> None:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
            cwd=self.workdir, preexec_fn=pin,
        )
        err.close()
        try:
            wait_port_bound(self.port, "udp", ready_timeout, self.proc)
            deadline = time.monotonic() + ready_timeout
            while not sip_options_ok(self.port):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"kamailio not answering on {self.port}: "
                                       + self.log_tail())
            self.children.update(_children_of(self.pid))
        except Exception:
            self.stop()
            raise
        return self

    def log_tail(self, n: int = 20) -> str:
        p = self.workdir / "kamailio_stderr.txt"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM to the main process (it stops its children), SIGKILL after grace; then any
        child still alive is killed by its PID."""
        if self.proc is None:
            return None
        self.children.update(_children_of(self.proc.pid))
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        time.sleep(0.1)
        for child in self.children:
            try:
                comm = Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:
                continue
            if comm == "kamailio":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
        return self.proc.returncode


# ============================================================================ identity


class IdentityKit:
    """STIR/SHAKEN for the load: the test PKI of tests/unit/stir_pki.py (STI-CA root,
    intermediate, SP leaf with TNAuthList), the chain served over HTTPS on 127.0.0.1, and the
    config of sipguard's identity rule that trusts both."""

    def __init__(self, folder: Path, share: float) -> None:
        from tests.unit.stir_pki import Pki, X5uServer, pem, standard_routes

        self.share = share
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.pki = Pki()
        self.anchors, self.bundle = self.pki.write(folder)
        # the signing certificate, for the kamailio-identity system (secsipid reads the key
        # from a file: the warm cache sipguard's identity rule builds from the x5u fetch)
        self.cert_file = folder / "signer.pem"
        self.cert_file.write_bytes(pem(self.pki.leaf))
        self.server = X5uServer(self.pki.server_context(), standard_routes(self.pki)).start()
        self.url = self.server.url("/good.pem")

    def settings(self, freshness_s: float) -> dict[str, Any]:
        return {
            "trust_anchors": str(self.anchors),
            "fetch_ca_bundle": str(self.bundle),
            "allow_private_x5u": True,
            "x5u_ports": [self.server.port],
            "freshness_s": int(min(max(freshness_s, 60), 3600)),
        }

    def kamailio_defines(self, freshness_s: float) -> list[str]:
        """kamailio.cfg's defines that turn its Identity check on, as strict about age as
        :meth:`settings` makes sipguard."""
        return ["WITH_IDENTITY", f'IDENTITY_CERT="{self.cert_file}"',
                f"IDENTITY_EXPIRE={int(min(max(freshness_s, 60), 3600))}"]

    def fetches(self) -> int:
        return int(self.server.hits["/good.pem"])

    def write_csv(self, out: Path, numbers: Path = NUMBERS) -> Path:
        """numbers.csv's caller;callee pairs with three more fields: a header name, a PASSporT
        and its x5u. A share of the lines (spread evenly) names ``Identity``; the others a
        padding header, so every INVITE has the same shape (the scenario writes
        ``[field2]: [field3];info=<[field4]>;alg=ES256;ppt="shaken"``)."""
        from tests.unit.stir_pki import sign_passport

        lines = numbers.read_text().splitlines()
        head, pairs = lines[0], [ln for ln in lines[1:] if ln.strip()]
        now = int(time.time())
        rows = [head]
        for i, line in enumerate(pairs):
            caller, callee = line.split(";")[:2]
            token = sign_passport(self.pki.leaf_key, self.url, orig=caller.lstrip("+"),
                                  dest=(callee.lstrip("+"),), iat=now, origid=str(uuid.uuid4()))
            with_identity = int((i + 1) * self.share) > int(i * self.share)
            name = "Identity" if with_identity else "X-Loadtest-Pad"
            rows.append(f"{caller};{callee};{name};{token};{self.url};")
        out.write_text("\n".join(rows) + "\n")
        return out

    def stop(self) -> None:
        self.server.stop()


# ============================================================================ verdicts


def passed(step: dict[str, Any]) -> bool:
    """At least 99.9 % of the calls completed and SIPp retransmissions under 0.1 % of them."""
    if step.get("error") or not step.get("attempted"):
        return False
    return (step["success_pct"] >= PASS_COMPLETED_PCT
            and step["retrans_pct"] < PASS_RETRANS_PCT)


KAMAILIOS: Final = ("kamailio", "kamailio-identity")  # the systems others are compared with


def summary(steps: list[dict[str, Any]], paths: list[str]) -> dict[str, Any]:
    """Per system the highest passing rate — the highest step that passed with every lower
    step passed too (a pass above a failed step is near the knee, luck of the run: it is
    reported apart, ``passed_above_a_failure``); every other proxy against Kamailio
    (``vs_kamailio``) and, when measured, against Kamailio checking Identity too
    (``vs_kamailio_identity``): highest passing rates, and CPU per call at the highest rate
    both passed."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for s in steps:
        by.setdefault(s["path"], {})[s["rate"]] = s
    best: dict[str, int | None] = {}
    above: dict[str, list[int]] = {}
    for p in paths:
        best[p] = None
        failed = False
        for r, s in sorted(by.get(p, {}).items()):
            if not s["passed"]:
                failed = True
            elif failed:
                above.setdefault(p, []).append(r)
            else:
                best[p] = r
    out: dict[str, Any] = {"highest_passing_rate": best, "passed_above_a_failure": above,
                           "vs_kamailio": {}}
    for ref in KAMAILIOS:
        kam = by.get(ref)
        if kam is None:
            continue
        versus: dict[str, Any] = {}
        for p in paths:
            if p == "direct" or p in KAMAILIOS:
                continue
            mine = by.get(p, {})
            both = [r for r in mine if r in kam and mine[r]["passed"] and kam[r]["passed"]]
            cmp: dict[str, Any] = {
                "highest_passing_rate_ratio": (
                    best[p] / best[ref] if best.get(p) and best.get(ref) else None
                ),
            }
            if both:
                r = max(both)
                a, b = mine[r].get("cpu_ms_per_call"), kam[r].get("cpu_ms_per_call")
                cmp.update({
                    "cpu_rate": r,
                    "cpu_ms_per_call": a,
                    "kamailio_cpu_ms_per_call": b,
                    "cpu_per_call_ratio": a / b if a is not None and b else None,
                })
            versus[p] = cmp
        out["vs_" + ref.replace("-", "_")] = versus
    return out


def _f(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def markdown(steps: list[dict[str, Any]], paths: list[str], summ: dict[str, Any],
             note: str = "") -> str:
    """A table for the README: one row per rate and system, then the summary lines."""
    lines = [
        "| calls/s | system | completed | retrans. | INVITE→200 p50 / p99 | CPU per call | pass "
        "| host steal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in steps:
        if s["path"] not in paths:
            continue
        lat = (f"{_f(s['p50_ms'], '.2f')} / {_f(s['p99_ms'], '.2f')} ms"
               if s.get("p50_ms") is not None else "–")
        cpu = "–" if s.get("cpu_ms_per_call") is None else f"{s['cpu_ms_per_call']:.3f} ms"
        lines.append(
            f"| {s['rate']:,} | {s['path']} | {s['success_pct']:.2f} % | "
            f"{s['retrans_total']} ({s['retrans_pct']:.2f} %) | {lat} | {cpu} | "
            f"{'yes' if s['passed'] else '**no**'} | {_f(s.get('steal_pct'), '.1f')} % |"
        )
    best = summ["highest_passing_rate"]
    lines.append("")
    lines.append("Highest passing rate: " + ", ".join(
        f"{p} {best[p]:,}" if best.get(p) else f"{p} none" for p in paths) + ".")
    for p, rates in summ.get("passed_above_a_failure", {}).items():
        lines.append(f"{p} also passed {', '.join(f'{r:,}' for r in rates)}, above a step it "
                     "failed: near its knee, not counted.")
    for ref, label in (("vs_kamailio", "Kamailio"),
                       ("vs_kamailio_identity", "Kamailio checking Identity")):
        lines += _versus_lines(summ.get(ref, {}), label)
    if note:
        lines.append(note)
    return "\n".join(lines)


def _versus_lines(versus: dict[str, Any], label: str) -> list[str]:
    lines = []
    for p, c in versus.items():
        parts = []
        if c.get("highest_passing_rate_ratio") is not None:
            parts.append(f"highest passing rate {c['highest_passing_rate_ratio']:.2f}×")
        if c.get("cpu_per_call_ratio") is not None:
            parts.append(f"CPU per call {c['cpu_per_call_ratio']:.2f}× at {c['cpu_rate']:,} "
                         f"calls/s ({c['cpu_ms_per_call']:.3f} vs "
                         f"{c['kamailio_cpu_ms_per_call']:.3f} ms)")
        if parts:
            lines.append(f"{p} / {label}: " + "; ".join(parts) + ".")
    return lines
