"""Graceful stop, end to end: SIGTERM while a call is up — new INVITEs hear 503 + Retry-After,
the call up finishes its BYE through sipguard, and sipguard then exits 0 on its own."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from .harness import E2EStack
from .scripted import Caller, Core, header

pytestmark = pytest.mark.e2e


def answered(caller: Caller, call_id: str) -> tuple[str, str]:
    """A call from ``caller`` answered by the core and ACKed: (its To tag, its Route line)."""
    caller.send(caller.request("INVITE", call_id))
    [ok] = caller.finals(call_id=call_id)
    m = re.search(r"tag=([^;>\s]+)", header(ok, "To"))
    assert m is not None
    to_tag, route = m.group(1), f"Route: {header(ok, 'Record-Route')}\r\n"
    caller.send(caller.request("ACK", call_id, to_tag=to_tag, extra=route))
    return to_tag, route


def test_sigterm_drains_calls_up_and_refuses_new_ones(stack: E2EStack) -> None:
    """A call up at SIGTERM completes its BYE (the core gets it, the caller its 200); a new
    INVITE meanwhile hears 503 with Retry-After; sipguard exits 0 once the call has ended."""
    core = Core()
    guard, port = stack.sipguard(core_port=core.port, listen=("udp",),
                                 config_extra="drain_timeout_s: 20\n")
    caller = Caller(port)
    try:
        to_tag, route = answered(caller, "drain-1")
        os.kill(guard.pid, signal.SIGTERM)
        guard.wait_event("drain_started", 1, timeout=5)
        caller.send(caller.request("INVITE", "drain-new"))
        [refused] = caller.finals(call_id="drain-new")
        assert refused.startswith(b"SIP/2.0 503 ") and header(refused, "Retry-After")
        assert guard.proc is not None and guard.proc.poll() is None  # still draining
        caller.send(caller.request("BYE", "drain-1", cseq=2, to_tag=to_tag, extra=route))
        [bye_ok] = caller.finals(call_id="drain-1")
        assert bye_ok.startswith(b"SIP/2.0 200 ")
        assert "BYE" in core.methods("drain-1") and "drain-new" not in str(core.methods())
        deadline = time.monotonic() + 10
        while guard.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert guard.proc.returncode == 0
        assert guard.count("drain_ended") == 1
    finally:
        caller.close()
        core.close()


def test_calls_still_up_when_the_drain_ends_get_a_bye_and_a_line(stack: E2EStack) -> None:
    """drain_timeout_s runs out with a call up and one still ringing: sipguard sends BYE to
    both sides of the answered one, CANCELs the ringing one toward the core and answers its
    caller 503 with Retry-After, logs a dialog_ended with reason shutdown for each, and exits
    0 — no call vanishes unrecorded with a side left up or ringing (after a restart their
    BYEs would hear 481, and a ringing caller would hear nothing)."""
    core = Core(ring=frozenset({"drain-3"}))
    guard, port = stack.sipguard(core_port=core.port, listen=("udp",),
                                 config_extra="drain_timeout_s: 1\n")
    caller = Caller(port)
    try:
        answered(caller, "drain-2")
        caller.send(caller.request("INVITE", "drain-3"))
        time.sleep(0.2)
        os.kill(guard.pid, signal.SIGTERM)
        heard: list[bytes] = []
        end = time.monotonic() + 5

        def final_503() -> bool:
            return any(d.startswith(b"SIP/2.0 503") and header(d, "Call-ID") == "drain-3"
                       for d in heard)

        while time.monotonic() < end and not (
                any(d.startswith(b"BYE ") for d in heard) and final_503()):
            try:
                heard.append(caller.sock.recv(65535))
            except TimeoutError:
                continue
        assert any(d.startswith(b"BYE ") for d in heard), heard
        assert final_503(), heard
        [refused] = [d for d in heard if d.startswith(b"SIP/2.0 503")]
        assert header(refused, "Retry-After"), refused
        assert b"SIP/2.0 180" in b"".join(heard)  # it was ringing
        assert guard.proc is not None
        deadline = time.monotonic() + 10
        while guard.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert guard.proc.returncode == 0
        assert "BYE" in core.methods("drain-2")
        assert core.methods("drain-3") == ["INVITE", "CANCEL"]
        with guard._cv:
            reasons = [e.get("reason") for e in guard.events if e.get("event") == "dialog_ended"]
        assert reasons == ["shutdown", "shutdown"]
    finally:
        caller.close()
        core.close()
