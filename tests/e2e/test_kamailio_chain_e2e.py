"""End-to-end with another SIP stack on both sides: SIPp -> Kamailio (a carrier's SBC) ->
sipguard -> Kamailio (a proxy before the core) -> SIPp, on 127.0.0.1 only.

Both Kamailios record-route (with ``ftag``, Kamailio's form) and relay in-dialog requests
with ``loose_route``: every message of a call crosses three proxies, each adding its Via and
each in-dialog request carrying a Route set of three. ``tests/e2e/kamailio/relay.cfg`` is
the Kamailio config; the processes are the load kit's ``KamailioProcess``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.compare import KamailioProcess, kamailio_binary

from .harness import (
    HOST,
    E2EStack,
    SipguardProcess,
    SippProcess,
    free_port,
    one_caller_csv,
    suspend_number,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(kamailio_binary() is None,
                       reason="kamailio not installed (Debian package kamailio: `make tools`)"),
]

RELAY_CFG = Path(__file__).resolve().parent / "kamailio" / "relay.cfg"


@pytest.fixture()
def kamailios(tmp_path: Path) -> Iterator[list[KamailioProcess]]:
    started: list[KamailioProcess] = []
    yield started
    for k in started:
        k.stop()


def kamailio(tmp_path: Path, name: str, next_port: int) -> KamailioProcess:
    workdir = tmp_path / name
    workdir.mkdir()
    return KamailioProcess(workdir, port=free_port(), core=(HOST, next_port), shm_mb=64,
                           pkg_mb=8, children=1, config=RELAY_CFG)


def chain(stack: E2EStack, kamailios: list[KamailioProcess], tmp_path: Path, uas_port: int,
          config_extra: str = "") -> tuple[SipguardProcess, int]:
    """core-side Kamailio -> the UAS; sipguard -> it; the carrier-side Kamailio -> sipguard.
    Returns sipguard and the port the caller calls (the carrier-side Kamailio)."""
    near_core = kamailio(tmp_path, "kamailio-core-side", uas_port).start()
    kamailios.append(near_core)
    guard, port = stack.sipguard(core_port=near_core.port, listen=("udp",),
                                 config_extra=config_extra)
    carrier = kamailio(tmp_path, "kamailio-carrier", port).start()
    kamailios.append(carrier)
    return guard, carrier.port


def test_calls_in_progress_cross_three_record_routing_proxies(
        stack: E2EStack, kamailios: list[KamailioProcess], tmp_path: Path) -> None:
    """20 calls through carrier Kamailio, sipguard and core-side Kamailio, each with the
    caller's re-INVITE, INFO and UPDATE and the core's own re-INVITE along the Route set, and
    the caller's BYE: all complete, each decided once and ended by the caller's BYE."""
    calls = 20
    uas = stack.uas("uas_midcall.xml", calls=calls)
    guard, port = chain(stack, kamailios, tmp_path, uas.local_port)
    res = stack.uac("uac_midcall.xml", remote_port=port, calls=calls, rate=20)
    uas_res = stack.finish_uas(uas)
    detail = "\n\n".join([res.describe(), uas_res.describe(), guard.diagnostics(),
                          *(k.log_tail() for k in kamailios)])
    assert res.successful == calls and res.failed == 0, detail
    assert uas_res.successful == calls and uas_res.failed == 0, detail
    assert guard.settle("invite_decided", expect=calls) == calls, detail
    assert guard.settle("dialog_ended", expect=calls) == calls, detail
    ended = [e for e in guard.events if e.get("event") == "dialog_ended"]
    assert {(e["reason"], e.get("status")) for e in ended} == {("bye_caller", 200)}, ended


def test_a_suspension_ends_the_calls_through_both_proxies(
        stack: E2EStack, kamailios: list[KamailioProcess], tmp_path: Path) -> None:
    """Calls up through the chain; the caller number is suspended with end_calls through the
    admin API: sipguard's BYE reaches the caller through the carrier's Kamailio and the core
    through its Kamailio (each with that side's Route set), both answer 200, every call ends
    (reason suspended) and a new call of the number hears 403."""
    calls = 5
    admin = free_port()
    uas = stack.uas("uas_basic.xml", calls=calls, timeout=40)
    guard, port = chain(stack, kamailios, tmp_path, uas.local_port,
                        config_extra=f"admin: {{listen: {HOST}:{admin}}}\n")
    csv = one_caller_csv(tmp_path / "one_caller.csv", "+12125550142",
                         (f"+1646555{2000 + 7 * i:04d}" for i in range(calls)))
    uac = SippProcess("uac", "uac_wait_bye.xml", stack.workdir, local_port=free_port(),
                      remote=(HOST, port), calls=calls, rate=10, timeout=40, inf=csv).start()
    stack.sipps.append(uac)
    guard.wait_event("invite_decided", calls, timeout=10)
    time.sleep(1.0)  # every call answered and ACKed (1 s of 10 calls/s; a hold of 40 s)
    body = suspend_number(admin, "+12125550142", end_calls=True, reason="e2e")
    res = uac.wait()
    uas_res = stack.finish_uas(uas)
    detail = "\n\n".join([json.dumps(body), res.describe(), uas_res.describe(),
                          guard.diagnostics(), *(k.log_tail() for k in kamailios)])
    assert body.get("calls_ended") == calls, detail
    assert res.successful == calls and res.failed == 0, detail
    assert uas_res.successful == calls and uas_res.failed == 0, detail
    assert guard.settle("dialog_ended", expect=calls) == calls, detail
    ended = [e for e in guard.events if e.get("event") == "dialog_ended"]
    assert {e["reason"] for e in ended} == {"suspended"}, ended
