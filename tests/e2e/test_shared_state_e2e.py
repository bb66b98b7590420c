"""Scale-out, end to end: two real sipguard processes on 127.0.0.1 share one real Redis
(``state.backend: redis``), and the limits hold across them — concurrency, a burst written to
both at once, rate — a killed instance's slots come back after ``lease_s``, and an outage of
Redis under SIPp load is met by ``state.fail`` (open: calls keep completing; closed: 503)
without a crash, the limits holding again once Redis is back.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest

from tests.redis_server import RedisServer

from .harness import HOST, E2EStack, SipguardProcess, free_port
from .test_burst_e2e import CoreSocket, final_statuses, invite
from .test_rate_e2e import check_ok, counters, start_uac

pytestmark = pytest.mark.e2e


def guard(stack: E2EStack, name: str, core_port: int, url: str, rules: str,
          state_extra: str = "") -> tuple[SipguardProcess, int]:
    """One sipguard (UDP) with the shared Redis state, in its own folder."""
    port = free_port()
    workdir = stack.workdir / name
    workdir.mkdir(exist_ok=True)
    g = SipguardProcess(
        workdir, listen=[f"udp://{HOST}:{port}"], core=f"udp://{HOST}:{core_port}",
        config_extra=f"state: {{backend: redis, url: '{url}', timeout_ms: 200{state_extra}}}\n"
        + rules,
    )
    stack.guards.append(g)
    g.start()
    return g, port


class Caller:
    """One UDP socket sending INVITEs and collecting final answers."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.tag = uuid.uuid4().hex[:6]
        self.got = b""

    def send(self, i: int, port: int, caller: str = "+12125550100",
             callee: str = "+18005550199") -> None:
        self.sock.sendto(invite(i, caller=caller, callee=callee, transport="udp",
                                local_port=self.port, target_port=port, tag=self.tag),
                         (HOST, port))

    def finals(self, want: int, seconds: float = 2.0) -> dict[str, int]:
        end = time.monotonic() + seconds
        while time.monotonic() < end and len(final_statuses(self.got)) < want:
            try:
                self.got += self.sock.recv(65535) + b"\r\n"
            except TimeoutError:
                continue
        return final_statuses(self.got)

    def close(self) -> None:
        self.sock.close()


PER_CALLER_2 = "rules:\n  concurrency: {per_caller: 2}\n"


def test_concurrency_limit_holds_across_two_instances(stack: E2EStack, redis_url: str) -> None:
    """Four calls from one caller alternating A, B, A, B with per_caller 2: exactly two reach
    the core; then twenty written to both at once: none more."""
    core = CoreSocket()
    caller = Caller()
    try:
        _, a = guard(stack, "a", core.port, redis_url, PER_CALLER_2)
        _, b = guard(stack, "b", core.port, redis_url, PER_CALLER_2)
        for i in range(4):
            caller.send(i, a if i % 2 == 0 else b)
            time.sleep(0.05)
        reached = core.collect(1.0)
        finals = caller.finals(2)
        assert len(reached) == 2, sorted(reached)
        assert sorted(finals.values()) == [403, 403], finals
        # twenty more, back to back to both instances: the two slots are still taken
        for i in range(4, 24):
            caller.send(i, a if i % 2 == 0 else b)
        core.collect(1.0)
        finals = caller.finals(22)
        assert len(core.call_ids) == 2, sorted(core.call_ids)
        assert len(finals) == 22 and set(finals.values()) == {403}
    finally:
        caller.close()
        core.close()


def test_burst_to_both_instances_admits_exactly_the_limit(
    stack: E2EStack, redis_url: str
) -> None:
    """Twenty INVITEs from one caller written to both instances at once: exactly two."""
    core = CoreSocket()
    caller = Caller()
    try:
        _, a = guard(stack, "a", core.port, redis_url, PER_CALLER_2)
        _, b = guard(stack, "b", core.port, redis_url, PER_CALLER_2)
        for i in range(20):
            caller.send(i, a if i % 2 == 0 else b)
        reached = core.collect(1.5)
        finals = caller.finals(18)
        assert len(reached) == 2, sorted(reached)
        assert sorted(finals.values()) == [403] * 18
    finally:
        caller.close()
        core.close()


def test_rate_limit_holds_across_two_instances(stack: E2EStack, redis_url: str) -> None:
    """per_caller rate 1/s, burst 3: twelve INVITEs alternating over both instances within
    a fraction of a second → three reach the core, nine hear 503 with Retry-After."""
    core = CoreSocket()
    caller = Caller()
    try:
        rules = "rules:\n  rate: {per_caller: {rate: 0.2, burst: 3}}\n"
        _, a = guard(stack, "a", core.port, redis_url, rules)
        _, b = guard(stack, "b", core.port, redis_url, rules)
        for i in range(12):
            caller.send(i, a if i % 2 == 0 else b, callee=f"+1800555{i:04d}")
        reached = core.collect(1.0)
        finals = caller.finals(9)
        assert len(reached) == 3, sorted(reached)
        assert sorted(finals.values()) == [503] * 9
        assert b"Retry-After: " in caller.got
    finally:
        caller.close()
        core.close()


def test_killed_instance_frees_its_slots_after_lease_s(stack: E2EStack, redis_url: str) -> None:
    """A holds both of a caller's slots and is SIGKILLed: B refuses until lease_s (3 s) has
    passed without A re-scoring them, then admits."""
    core = CoreSocket()
    caller = Caller()
    try:
        ga, a = guard(stack, "a", core.port, redis_url, PER_CALLER_2, ", lease_s: 3")
        _, b = guard(stack, "b", core.port, redis_url, PER_CALLER_2, ", lease_s: 3")
        caller.send(0, a)
        caller.send(1, a)
        assert len(core.collect(0.5)) == 2
        caller.send(2, b)
        assert caller.finals(1)[f"burst-{caller.tag}-2@{HOST}"] == 403
        assert ga.proc is not None
        os.kill(ga.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        ga.proc.wait(5)
        admitted_after = None
        for i in range(3, 40):  # one attempt every 0.25 s, at most ~9 s
            caller.send(i, b)
            time.sleep(0.25)
            if len(core.collect(0.01)) > 2:
                admitted_after = time.monotonic() - killed
                break
        assert admitted_after is not None, "the killed instance's slots never came back"
        assert 2.0 <= admitted_after <= 4.5, admitted_after
    finally:
        caller.close()
        core.close()


def _isolated_redis(tmp: Path) -> RedisServer:
    return RedisServer(tmp / "own-redis").start()


def test_redis_outage_under_load_fail_open(stack: E2EStack) -> None:
    """SIPp at 40 calls/s through two instances (fail: open); Redis is stopped a second in
    and restarted a second later: every call completes, neither instance crashes, the outage
    is counted, and after it the limits hold again."""
    redis = _isolated_redis(stack.workdir)
    try:
        uas = stack.uas("uas_basic.xml", calls=10_000)
        rules = "rules:\n  concurrency: {per_caller: 50}\n"
        ga, a = guard(stack, "a", uas.local_port, redis.url, rules, ", breaker_failures: 2")
        gb, b = guard(stack, "b", uas.local_port, redis.url, rules, ", breaker_failures: 2")
        rows = [(f"+1303555{i:04d}", "+17205550100") for i in range(100)]
        ua = start_uac(stack, "ua", rows, port=a, calls=120, rate=40, scenario="uac_basic.xml")
        ub = start_uac(stack, "ub", rows, port=b, calls=120, rate=40, scenario="uac_basic.xml")
        time.sleep(1.0)
        redis.stop()
        time.sleep(1.0)
        redis.start()
        check_ok(ua.wait(), 120)
        check_ok(ub.wait(), 120)
        stack.finish_uas(uas, grace=1.0)
        assert ga.proc is not None and ga.proc.poll() is None
        assert gb.proc is not None and gb.proc.poll() is None
        # Redis is back: the shared limit holds again (breaker closed by the probe)
        core = CoreSocket()
        caller = Caller()
        try:
            limited = "rules:\n  concurrency: {per_caller: 2}\n"
            gc_, c = guard(stack, "c", core.port, redis.url, limited)
            _, d = guard(stack, "d", core.port, redis.url, limited)
            for i in range(10):
                caller.send(i, c if i % 2 == 0 else d)
            assert len(core.collect(1.0)) == 2
        finally:
            caller.close()
            core.close()
        ca, cb = counters(ga), counters(gb)
        assert ca.get("state_breaker_opened", 0) + cb.get("state_breaker_opened", 0) >= 1, (ca, cb)
        assert ca.get("state_reconnected", 0) + cb.get("state_reconnected", 0) >= 1, (ca, cb)
    finally:
        redis.stop()


def test_redis_down_fail_closed_answers_503(stack: E2EStack) -> None:
    """fail: closed with Redis unreachable: INVITEs hear 503 + Retry-After (no hang, no crash);
    once Redis is back calls pass again."""
    redis = _isolated_redis(stack.workdir)
    core = CoreSocket()
    caller = Caller()
    try:
        g, a = guard(stack, "a", core.port, redis.url, PER_CALLER_2,
                     ", fail: closed, retry_after_s: 7, breaker_failures: 1")
        redis.stop()
        for i in range(5):
            caller.send(i, a, caller=f"+1212555{i:04d}")
        finals = caller.finals(5, seconds=3.0)
        assert sorted(finals.values()) == [503] * 5, finals
        assert b"Retry-After: 7" in caller.got
        assert not core.collect(0.3)
        redis.start()
        time.sleep(1.0)  # the probe reconnects (backoff from 0.2 s)
        caller.send(9, a, caller="+12125559999")
        assert len(core.collect(1.5)) == 1
        assert g.proc is not None and g.proc.poll() is None
    finally:
        caller.close()
        core.close()
        redis.stop()


def test_limit_holds_across_two_worker_processes(stack: E2EStack, redis_url: str) -> None:
    """`sipguard run --workers 2` (SO_REUSEPORT, ``worker_spread: source``): twenty INVITEs of one caller, each from a
    socket of its own so the kernel spreads them over both workers — exactly two reach the
    core, and both workers decided some."""
    from .test_workers_e2e import start_workers

    core = CoreSocket()
    callers: list[Caller] = []
    try:
        g, port, _, _ = start_workers(stack, redis_url, core.port,
                                      PER_CALLER_2 + "worker_spread: source\n")
        for i in range(20):
            c = Caller()
            callers.append(c)
            c.send(i, port)
        reached = core.collect(1.5)
        refused = sum(len(c.finals(1, seconds=0.1)) for c in callers)
        assert len(reached) == 2, sorted(reached)
        assert refused == 18
        workers = {e.get("worker") for e in g.events if e.get("event") == "invite_decided"}
        assert workers == {0, 1}, workers  # (decision lines are sampled per key and worker)
    finally:
        for c in callers:
            c.close()
        core.close()


def test_redis_outage_under_load_fail_closed(stack: E2EStack) -> None:
    """SIPp at 20 calls/s (fail: closed); Redis stopped a second in and started again two
    seconds later: the calls of the outage hear 503 + Retry-After (the scenario accepts
    that), every other call completes, nothing hangs and sipguard stays up."""
    redis = _isolated_redis(stack.workdir)
    try:
        uas = stack.uas("uas_basic.xml", calls=10_000)
        g, a = guard(stack, "a", uas.local_port, redis.url,
                     "rules:\n  concurrency: {per_caller: 50}\n",
                     ", fail: closed, breaker_failures: 2")
        rows = [(f"+1303555{i:04d}", "+17205550100") for i in range(100)]
        uac = start_uac(stack, "uac", rows, port=a, calls=100, rate=20)
        time.sleep(1.0)
        redis.stop()
        time.sleep(2.0)
        redis.start()
        res = uac.wait()
        uas_res = stack.finish_uas(uas, grace=1.0)
        check_ok(res, 100)  # every call ended as the scenario allows: completed or 503
        assert g.proc is not None and g.proc.poll() is None
        c = counters(g)
        refused = c.get("rule_state_state_unavailable", 0)
        assert refused >= 10, c  # about 2 s of 20 calls/s
        assert uas_res.successful + refused == 100, (uas_res.describe(), c)
        assert c.get("state_reconnected", 0) >= 1, c
    finally:
        redis.stop()


def test_calls_passed_in_a_short_redis_stall_hold_their_slots(stack: E2EStack) -> None:
    """fail: open, per_caller 2, two calls up; Redis stalls 400 ms (SIGSTOP; timeout_ms 200, the
    two timeouts short of the breaker) while two more INVITEs of that caller come — both pass, as fail open says. Their
    admission scripts run when Redis wakes, with the limit then reached: the calls must hold
    their slots there all the same (4 members for the caller), or once the first two end a
    third and fourth call would be let past the two still up until the next refresh."""
    redis = _isolated_redis(stack.workdir)
    core = CoreSocket()
    caller = Caller()
    try:
        _, port = guard(stack, "stall", core.port, redis.url, PER_CALLER_2,
                        ", fail: open, breaker_failures: 3")
        for i in range(2):
            caller.send(i, port)
        assert len(core.collect(1.0)) == 2
        assert redis.proc is not None
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(2, 4):
                caller.send(i, port)
            time.sleep(0.4)
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        assert len(core.collect(1.5)) == 4  # passed: fail open
        key = "sipguard:{+12125550100}:caller"
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and redis.command("ZCARD", key) != b":4\r\n":
            time.sleep(0.1)
        assert redis.command("ZCARD", key) == b":4\r\n"
    finally:
        caller.close()
        core.close()
        redis.stop()
