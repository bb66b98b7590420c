"""End-to-end STIR/SHAKEN: SIPp UAC with a signed Identity -> sipguard -> SIPp UAS, on
127.0.0.1, with the certificate chain served over HTTPS by a local x5u server.

The test PKI (STI-CA root, intermediate, SP leaf with TNAuthList) and the x5u server come from
``tests/unit/stir_pki.py``; sipguard trusts the x5u server's TLS certificate through
``fetch_ca_bundle`` and may fetch from 127.0.0.1 because of ``allow_private_x5u: true``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.stir_pki import Pki, X5uServer, new_key, sign_passport, standard_routes

from .harness import SCENARIOS, E2EStack, SippProcess, events_total, free_port
from .scripted import Caller, Core, header

pytestmark = pytest.mark.e2e

CALLER, CALLEE = "+12125551000", "+16465552000"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture(scope="module")
def x5u(pki: Pki) -> Iterator[X5uServer]:
    server = X5uServer(pki.server_context(), standard_routes(pki)).start()
    yield server
    server.stop()


def identity_config(stack: E2EStack, pki: Pki, x5u: X5uServer, **over: object) -> str:
    anchors, bundle = pki.write(stack.workdir)
    settings = {
        "trust_anchors": str(anchors),
        "fetch_ca_bundle": str(bundle),
        "allow_private_x5u": True,
        "x5u_ports": [x5u.port],
        **over,
    }
    return "rules:\n  identity: " + json.dumps(settings) + "\n"


def write_csv(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    path.write_text("SEQUENTIAL\n" + "".join(";".join(r) + ";\n" for r in rows))
    return path


def run_uac(stack: E2EStack, scenario: Path | str, port: int, csv: Path, calls: int,
            rate: float = 20) -> SippProcess:
    uac = SippProcess("uac", scenario, stack.workdir, local_port=free_port(),
                      remote=("127.0.0.1", port), calls=calls, rate=rate, duration_ms=100,
                      timeout=30, inf=csv)
    stack.sipps.append(uac)
    return uac.start()


def test_sipp_calls_with_valid_identity_pass(stack: E2EStack, pki: Pki, x5u: X5uServer) -> None:
    """Twenty SIPp calls with valid A-attested PASSporTs complete; the core sees each INVITE
    marked TN-Validation-Passed, and the certificate is fetched once."""
    calls = 20
    url = x5u.url("/good.pem")
    hits = x5u.hits["/good.pem"]
    rows = [(CALLER, CALLEE, sign_passport(pki.leaf_key, url, orig=CALLER[1:], dest=(CALLEE[1:],),
                                           origid=f"00000000-0000-4000-8000-{i:012d}"), url)
            for i in range(calls)]
    csv = write_csv(stack.workdir / "identity.csv", rows)
    uas = stack.uas("uas_basic.xml", calls=calls)
    guard, port = stack.sipguard(core_port=uas.local_port,
                                 config_extra=identity_config(stack, pki, x5u))
    uac = run_uac(stack, "uac_identity.xml", port, csv, calls).wait()
    uas_res = stack.finish_uas(uas)
    detail = f"{uac.describe()}\n{uas_res.describe()}\n{guard.diagnostics()}"
    assert uac.successful == calls and uac.failed == 0, detail
    assert uas_res.received("INVITE") == calls, detail
    seen = uas_res.message_log.read_text(errors="replace")
    assert seen.count("X-Sipguard-Identity: TN-Validation-Passed;attest=A;origid=") == calls
    assert guard.settle("invite_decided", expect=calls) == calls
    decided = [e for e in guard.events if e.get("event") == "invite_decided"]
    assert all(e.get("identity") == "passed" and e.get("identity_attest") == "A"
               for e in decided), decided[:3]
    assert x5u.hits["/good.pem"] - hits == 1
    assert guard.count("x5u_fetched") == 1


@pytest.mark.parametrize(
    ("case", "status"),
    [("stale", 403), ("wrong_key", 438), ("unknown_ca", 437), ("closed_port", 436)],
)
def test_sipp_identity_failures_are_answered_by_sipguard(
    stack: E2EStack, pki: Pki, x5u: X5uServer, case: str, status: int
) -> None:
    """A bad Identity gets its status from sipguard and the core never sees the INVITE."""
    url = x5u.url("/rogue.pem" if case == "unknown_ca" else "/good.pem")
    extra: dict[str, object] = {}
    if case == "closed_port":
        port = free_port()
        url = f"https://127.0.0.1:{port}/good.pem"
        extra["x5u_ports"] = [port]
    key = new_key() if case == "wrong_key" else pki.leaf_key
    iat = int(time.time()) - (120 if case == "stale" else 0)
    token = sign_passport(key, url, orig=CALLER[1:], dest=(CALLEE[1:],), iat=iat)
    csv = write_csv(stack.workdir / "identity.csv", [(CALLER, CALLEE, token, url)])
    scenario = stack.workdir / "uac_identity_reject.xml"
    scenario.write_text((SCENARIOS / "uac_identity_reject.xml").read_text().replace(
        'response="438"', f'response="{status}"'))
    uas = stack.uas("uas_basic.xml", calls=1)
    guard, port = stack.sipguard(core_port=uas.local_port,
                                 config_extra=identity_config(stack, pki, x5u, **extra))
    uac = run_uac(stack, scenario, port, csv, 1).wait()
    uas_res = uas.stop()
    detail = f"{uac.describe()}\n{uas_res.describe()}\n{guard.diagnostics()}"
    assert uac.successful == 1 and uac.failed == 0, detail
    assert uas_res.received("INVITE") == 0, detail
    guard.wait_event("invite_decided")
    decided = [e for e in guard.events if e.get("event") == "invite_decided"][0]
    assert (decided["verdict"], decided["status"], decided["rule"]) == ("reject", status,
                                                                         "identity")


@pytest.mark.parametrize("threads", [0, 2])
def test_signature_checks_on_threads_or_in_the_loop(
    stack: E2EStack, pki: Pki, x5u: X5uServer, threads: int
) -> None:
    """``verify_threads``: with threads the signatures are checked beside the loop (counted
    ``identity_verify_threaded``), without in it; the outcomes are the same either way —
    valid calls reach the core marked passed, a wrong key gets 438 from sipguard."""
    calls = 30
    url = x5u.url("/good.pem")
    rows = [(CALLER, CALLEE, sign_passport(pki.leaf_key, url, orig=CALLER[1:], dest=(CALLEE[1:],),
                                           origid=f"00000000-0000-4000-8000-{i:012d}"), url)
            for i in range(calls)]
    csv = write_csv(stack.workdir / "identity.csv", rows)
    bad = write_csv(stack.workdir / "bad.csv", [(CALLER, CALLEE, sign_passport(
        new_key(), url, orig=CALLER[1:], dest=(CALLEE[1:],)), url)])
    reject = stack.workdir / "uac_identity_reject.xml"
    reject.write_text((SCENARIOS / "uac_identity_reject.xml").read_text())
    metrics_port = free_port()
    uas = stack.uas("uas_basic.xml", calls=calls)
    extra = identity_config(stack, pki, x5u, verify_threads=threads, verify_queue=8)
    guard, port = stack.sipguard(core_port=uas.local_port,
                                 config_extra=extra + f"metrics: {{listen: 127.0.0.1:{metrics_port}}}\n")
    uac = run_uac(stack, "uac_identity.xml", port, csv, calls, rate=200).wait()
    rejected = run_uac(stack, reject, port, bad, 1).wait()
    uas_res = stack.finish_uas(uas)
    detail = f"{uac.describe()}\n{rejected.describe()}\n{uas_res.describe()}\n{guard.diagnostics()}"
    assert uac.successful == calls and uac.failed == 0, detail
    assert rejected.successful == 1 and rejected.failed == 0, detail
    assert uas_res.received("INVITE") == calls, detail
    seen = uas_res.message_log.read_text(errors="replace")
    assert seen.count("X-Sipguard-Identity: TN-Validation-Passed;attest=A;origid=") == calls
    assert guard.settle("invite_decided", expect=calls + 1) == calls + 1
    started = [e for e in guard.events if e.get("event") == "sipguard_started"]
    assert started and started[0]["verify_threads"] == threads, started
    events = events_total(metrics_port)
    checked = events.get("identity_verify_threaded", 0) + events.get(
        "identity_verify_queue_full", 0)
    if threads:
        # every check went to the threads, or (queue of 8 full) was done in the loop
        assert checked == calls + 1, events
        assert events.get("identity_verify_threaded", 0) >= 8, events
    else:
        assert checked == 0, events


def test_a_burst_past_verify_queue_is_checked_in_the_loop(
    stack: E2EStack, pki: Pki, x5u: X5uServer
) -> None:
    """``verify_queue`` over real sockets: 24 INVITEs signed with a wrong key sent back to
    back, one thread, a queue of 1. Every call gets 438 from sipguard, none reaches the core,
    and every check is counted once — on the thread, or in the loop once the queue is full."""
    core = Core()
    metrics_port = free_port()
    extra = identity_config(stack, pki, x5u, verify_threads=1, verify_queue=1)
    _, port = stack.sipguard(core_port=core.port, listen=("udp",),
                             config_extra=extra + f"metrics: {{listen: 127.0.0.1:{metrics_port}}}\n")
    caller = Caller(port)
    url = x5u.url("/good.pem")

    def invite(i: int, key: Any) -> bytes:  # the Caller's numbers: +12125550100 -> +18005550199
        token = sign_passport(key, url, orig="12125550100", dest=("18005550199",))
        return caller.request("INVITE", f"burst-{i}",
                              extra=f'Identity: {token};info=<{url}>;alg=ES256;ppt="shaken"\r\n')

    try:
        caller.send(invite(0, pki.leaf_key))  # a good one first: the certificate is cached
        [ok] = caller.finals(5, call_id="burst-0")
        assert ok.startswith(b"SIP/2.0 200"), ok
        wrong = new_key()
        burst = [invite(i, wrong) for i in range(1, 25)]
        for data in burst:
            caller.send(data)
        answered: dict[str, bytes] = {}
        end = time.monotonic() + 10
        while len(answered) < 24 and time.monotonic() < end:
            for final in caller.finals(0.5, want=24):
                answered.setdefault(header(final, "Call-ID"), final)
        assert sorted(answered) == sorted(f"burst-{i}" for i in range(1, 25)), answered.keys()
        assert all(r.startswith(b"SIP/2.0 438") for r in answered.values())
        assert [header(r, "Call-ID") for r in core.received
                if r.startswith(b"INVITE")] == ["burst-0"]
        events = events_total(metrics_port)
        threaded = events.get("identity_verify_threaded", 0)
        inline = events.get("identity_verify_queue_full", 0)
        assert threaded + inline == 25, events
        assert threaded >= 1 and inline >= 1, events
    finally:
        caller.close()
        core.close()
