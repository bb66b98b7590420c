"""Reload under load: a steady SIPp call load while the config is reloaded ten times through
the admin API (valid and invalid versions, limits changed) — no call fails that the config
did not refuse, every reload answers applied or refused with field and line, and the last
limits apply to the next INVITE after the reload answered."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from .harness import HOST, E2EStack, SippProcess, free_port
from .scripted import Caller

pytestmark = pytest.mark.e2e

CALLS = 400
RATE = 50  # calls/s: about 8 s of load


def _reload(url: str) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"{url}/reload", method="POST", data=b"{}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_ten_reloads_under_load_drop_no_call(stack: E2EStack) -> None:
    """400 calls at 50 calls/s complete while five valid and five invalid configs are
    reloaded; then a per-callee rate limit reloaded last refuses the second INVITE at once."""
    uas = stack.uas("uas_basic.xml", calls=CALLS + 10, duration_ms=100, timeout=60)
    admin_port = free_port()
    base = f"admin: {{listen: {HOST}:{admin_port}}}\n"
    guard, port = stack.sipguard(core_port=uas.local_port, listen=("udp",), config_extra=base)
    url = f"http://{HOST}:{admin_port}"
    valid = [
        base + "rules:\n  concurrency: {per_callee: 1000}\n",
        base + "rules:\n  rate: {per_peer: {rate: 500, burst: 1000}}\n",
        base + "rules:\n  concurrency: {per_caller: 500}\n  rate: {per_caller: {rate: 500, burst: 500}}\n",
        base + "sip: {max_dialogs: 50000}\n",
        base,
    ]
    invalid = [
        base + "rules:\n  concurrency: {per_caller: -1}\n",
        base + "rules: [not, a, map\n",
        base + "rules:\n  rate: {per_caller: {rate: 0}}\n",
        base + "sip: {no_such_key: 1}\n",
        base + "rules:\n  concurrency: {per_calee: 3}\n",
    ]
    uac = SippProcess("uac", "uac_basic.xml", stack.workdir, local_port=free_port(),
                      remote=(HOST, port), calls=CALLS, rate=RATE, duration_ms=100,
                      timeout=60).start()
    stack.sipps.append(uac)
    results: list[tuple[int, dict[str, object]]] = []
    time.sleep(1.0)
    for good, bad in zip(valid, invalid, strict=True):
        guard.config.write_text(f"listen: [udp://{HOST}:{port}]\ncore: udp://{HOST}:{uas.local_port}\n" + good)
        results.append(_reload(url))
        time.sleep(0.3)
        guard.config.write_text(f"listen: [udp://{HOST}:{port}]\ncore: udp://{HOST}:{uas.local_port}\n" + bad)
        results.append(_reload(url))
        time.sleep(0.3)
    res = uac.wait(90)
    assert not res.timed_out and res.successful == CALLS and res.failed == 0, res.describe()
    assert [status for status, _ in results] == [200, 422] * 5, results
    for status, body in results:
        if status == 422:
            errors = body.get("errors")
            assert isinstance(errors, list) and errors, body
    # The last limits apply to the next INVITE after the reload answered.
    guard.config.write_text(
        f"listen: [udp://{HOST}:{port}]\ncore: udp://{HOST}:{uas.local_port}\n" + base
        + "rules:\n  rate: {per_callee: {rate: 1, burst: 1}}\n"
    )
    assert _reload(url)[0] == 200
    caller = Caller(port)
    try:
        caller.send(caller.request("INVITE", "after-1"))
        caller.send(caller.request("INVITE", "after-2"))
        [second] = caller.finals(call_id="after-2")
        assert second.startswith(b"SIP/2.0 503 ")
    finally:
        caller.close()
