"""End-to-end calls with SIPp: UAC -> sipguard -> UAS (the "core"), on 127.0.0.1 only.

The direct_* tests run the same scenario pairs UAC -> UAS without sipguard, so the
scenarios themselves are known good; the others put sipguard in the middle.
"""

from __future__ import annotations

import pytest

from .harness import E2EStack, RawUdpCaller, SippResult, free_port

pytestmark = pytest.mark.e2e

CALLS = 200
RATE = 100  # calls/s
HOLD_MS = 100

# (UAS scenario, UAC scenario) per call flow
FLOWS = {
    "basic": ("uas_basic.xml", "uac_basic.xml"),
    "uas_bye": ("uas_sends_bye.xml", "uac_wait_bye.xml"),
    "cancel": ("uas_ring_no_answer.xml", "uac_cancel.xml"),
    "busy": ("uas_busy.xml", "uac_expect_486.xml"),
    "prack": ("uas_prack.xml", "uac_prack.xml"),
    "midcall": ("uas_midcall.xml", "uac_midcall.xml"),
    "late_offer": ("uas_late_offer.xml", "uac_late_offer.xml"),
    "cancel_crosses_200": ("uas_answer_at_once.xml", "uac_cancel_at_once.xml"),
}
# flows that need a proxy between the two: directly, the UAS would get the CANCEL
PROXY_ONLY = {"cancel_crosses_200"}


def assert_all_ok(res: SippResult, calls: int, *others: SippResult) -> None:
    detail = "\n\n".join(r.describe() for r in (res, *others))
    assert not res.timed_out, f"UAC hit its time limit\n{detail}"
    assert res.successful == calls and res.failed == 0, (
        f"expected {calls} successful calls\n{detail}"
    )
    assert res.returncode == 0, f"SIPp UAC exit code {res.returncode}\n{detail}"


def run_flow(
    stack: E2EStack,
    flow: str,
    *,
    transport: str,
    via_sipguard: bool,
    calls: int = CALLS,
    rate: float = RATE,
) -> tuple[SippResult, SippResult]:
    uas_scen, uac_scen = FLOWS[flow]
    uas = stack.uas(uas_scen, transport=transport, calls=calls, duration_ms=HOLD_MS)
    target = uas.local_port
    guard = None
    if via_sipguard:
        guard, target = stack.sipguard(core_port=uas.local_port, core_transport=transport)
    uac = stack.uac(
        uac_scen,
        remote_port=target,
        transport=transport,
        calls=calls,
        rate=rate,
        duration_ms=HOLD_MS,
    )
    uas_res = stack.finish_uas(uas)
    assert_all_ok(uac, calls, uas_res)
    assert uas_res.successful == calls and uas_res.failed == 0, uas_res.describe()
    if guard is not None:
        decided = guard.settle("invite_decided", expect=calls)
        assert decided == calls, (
            f"{decided} invite_decided lines for {calls} INVITEs\n{guard.diagnostics()}"
        )
    return uac, uas_res


# ----------------------------------------------------------------- direct sanity


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("flow", sorted(set(FLOWS) - PROXY_ONLY))
def test_direct_scenario_pairs(stack: E2EStack, flow: str, transport: str) -> None:
    """Each UAC/UAS scenario pair completes every call directly, without sipguard."""
    run_flow(stack, flow, transport=transport, via_sipguard=False, calls=20, rate=50)


def test_direct_raw_retransmissions_reach_uas(stack: E2EStack) -> None:
    """Without a proxy all 3 copies of a retransmitted INVITE reach the slow UAS (the detector works)."""
    uas = stack.uas("uas_slow.xml", calls=1)
    res = RawUdpCaller(free_port(), ("127.0.0.1", uas.local_port)).call(copies=3, interval=0.5)
    uas_res = stack.finish_uas(uas)
    assert res.error is None and res.final == 200 and res.bye_final == 200, res
    assert uas_res.received("INVITE") == 3, uas_res.describe()


# ------------------------------------------------------------- through sipguard


def test_udp_200_calls_complete(stack: E2EStack) -> None:
    """200 calls UAC -> sipguard -> UAS over UDP on both legs all complete."""
    run_flow(stack, "basic", transport="udp", via_sipguard=True)


def test_tcp_200_calls_complete(stack: E2EStack) -> None:
    """200 calls UAC -> sipguard -> UAS over TCP on both legs all complete."""
    run_flow(stack, "basic", transport="tcp", via_sipguard=True)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_bye_from_uas_side_completes(stack: E2EStack, transport: str) -> None:
    """A BYE sent by the core (UAS) is routed back through sipguard to the caller and answered."""
    run_flow(stack, "uas_bye", transport=transport, via_sipguard=True)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_cancel_before_answer_yields_487(stack: E2EStack, transport: str) -> None:
    """Every INVITE cancelled while ringing ends with 200 (CANCEL) and 487 (INVITE) at the UAC."""
    run_flow(stack, "cancel", transport=transport, via_sipguard=True)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_busy_486_passes_back(stack: E2EStack, transport: str) -> None:
    """A 486 Busy Here from the core reaches the caller as 486 for every call."""
    run_flow(stack, "busy", transport=transport, via_sipguard=True)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_reliable_provisional_prack_in_the_early_dialog(stack: E2EStack, transport: str) -> None:
    """RFC 3262 (100rel): the core's reliable 183 reaches the caller with the Record-Route set,
    the caller's PRACK is routed through sipguard in the early dialog, and the call completes
    (PRACK's 200 and the INVITE's 200 apart) — carriers' SBCs dial this way."""
    run_flow(stack, "prack", transport=transport, via_sipguard=True)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_requests_within_the_call_pass_both_ways(stack: E2EStack, transport: str) -> None:
    """While a call is up, the caller's re-INVITE (hold), INFO (DTMF: its body arrives),
    UPDATE and the core's own re-INVITE (a session refresh, toward the caller along the
    Record-Route) all pass through sipguard and are answered, then the BYE ends the call."""
    run_flow(stack, "midcall", transport=transport, via_sipguard=True, calls=20, rate=50)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_late_offer_with_early_media(stack: E2EStack, transport: str) -> None:
    """An INVITE without SDP (late offer): the core's 183 with early media and its 200 with
    the offer reach the caller with their bodies, and the caller's answer in the ACK reaches
    the core."""
    run_flow(stack, "late_offer", transport=transport, via_sipguard=True, calls=20, rate=50)


def test_a_cancel_that_crosses_the_answer(stack: E2EStack) -> None:
    """The caller cancels as soon as it rings, and the core's 200 crosses the CANCEL
    (the core answers the INVITE after the CANCEL came, as if it had left before): the
    caller hears 200 for its CANCEL, then the INVITE's 200 (RFC 3261 §16.7: a 2xx is always
    forwarded), ACKs and hangs up, and the core gets that ACK and BYE."""
    run_flow(stack, "cancel_crosses_200", transport="udp", via_sipguard=True, calls=20,
             rate=50)


def test_slow_uas_sipp_client_one_invite_per_call(stack: E2EStack) -> None:
    """With a UAS silent for 2.5 s, a retransmitting SIPp UDP client still delivers exactly one INVITE per call to the UAS."""
    calls = 5
    uas = stack.uas("uas_slow.xml", calls=calls)
    guard, port = stack.sipguard(core_port=uas.local_port, core_transport="udp")
    uac = stack.uac("uac_basic.xml", remote_port=port, calls=calls, rate=10)
    uas_res = stack.finish_uas(uas)
    assert_all_ok(uac, calls, uas_res)
    assert uas_res.received("INVITE") == calls, uas_res.describe()
    assert guard.settle("invite_decided", expect=calls) == calls, guard.diagnostics()


def test_slow_uas_raw_retransmissions_one_invite(stack: E2EStack) -> None:
    """Three copies of one INVITE sent 500 ms apart to sipguard reach the slow UAS exactly once, and the call completes."""
    uas = stack.uas("uas_slow.xml", calls=1)
    guard, port = stack.sipguard(core_port=uas.local_port, core_transport="udp")
    res = RawUdpCaller(free_port(), ("127.0.0.1", port)).call(copies=3, interval=0.5)
    uas_res = stack.finish_uas(uas)
    assert res.invites_sent == 3
    assert res.error is None and res.final == 200 and res.bye_final == 200, (
        res,
        uas_res.describe(),
    )
    assert uas_res.received("INVITE") == 1, uas_res.describe()
    assert guard.settle("invite_decided", expect=1) == 1, guard.diagnostics()
