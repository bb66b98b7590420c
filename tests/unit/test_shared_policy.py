"""The policy on the shared store, through the edge core, against a real redis-server:
one round trip per INVITE for all its shared rules, the verdicts they give (enforce and
monitor), fail open / closed, and every lease given back exactly once (ended, rejected,
cancelled while Redis answered)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from sipguard.contract import DecisionPending, Deferred, Flow, Verdict
from sipguard.policy.concurrency import Tracker
from sipguard.policy.state import RuleState
from sipguard.sip.message import Message
from sipguard.state.base import SharedCounts
from sipguard.transport.redis_client import Where, connect
from sipguard.transport.redis_pipe import RespPipe
from sipguard.transport.redis_state import SharedStore
from tests.unit.dialog_helpers import PolicyHarness, cancel, to
from tests.unit.proxy_helpers import CORE, answer, invite

CALLER_NO = "+12125550100"


class SharedHarness(PolicyHarness):
    """PolicyHarness whose pending decisions and deferred updates are awaited (the shell's
    part), so a test sees what sipguard would send."""

    def __init__(self, rules: str, store: SharedCounts) -> None:
        state = RuleState(shared=store, tracker=Tracker(shared=store))
        super().__init__(rules, state=state)
        self.store = store
        self.waited = 0  # decisions that came back as awaitables

    async def settle(self) -> list[tuple[Flow, Message]]:
        out = []
        for _ in range(10):
            events = self.core.drain_events()
            busy = False
            for event in events:
                if isinstance(event, DecisionPending):
                    self.waited += 1
                    verdict = await event.pending
                    assert isinstance(verdict, Verdict)
                    self.core.resolve(event.call, verdict, self.now)
                    busy = True
                elif isinstance(event, Deferred):
                    await event.pending
                    busy = True
                else:
                    self.events.append(event)
                    if hasattr(event, "verdict"):
                        self.verdicts.append(event.verdict)
            out.extend(self._drain())
            if not busy:
                break
        return out

    async def invite(self, n: int, caller: str = CALLER_NO, callee: str = "+18005550199",
                     extra: str = "") -> tuple[list[Message], Message | None]:
        self.feed(invite(branch=f"z9hG4bK-c{n}", call_id=f"call-{n}", caller=caller,
                         callee=callee, extra=extra))
        out = await self.settle()
        fwd = to(out, CORE)
        return [m for f, m in out if f.addr != CORE], (fwd[0] if fwd else None)


def new_store(url: str, **kw: object) -> SharedStore:
    params: dict[str, object] = {"timeout_s": 0.5, "counters": Counter(), "pipe": RespPipe(url)}
    params.update(kw)
    return SharedStore(connect(Where(url=url)), **params)  # type: ignore[arg-type]


async def members(store: SharedStore, counter: str, settle: bool = True) -> list[bytes]:
    """The lease ids on ``counter``; releases are sent without waiting (release_soon), so
    first let the pipelined connection's queue drain (bounded)."""
    if settle and store.pipe is not None and store.pipe.connected:
        await store.pipe.call("PING")  # answered after every command queued before it
    return list(await store.client.zrange(store.rkey(counter), 0, -1))


async def test_all_shared_rules_cost_one_round_trip_and_limit_across_instances(
    redis_url: str,
) -> None:
    rules = ("rules:\n  rate: {per_caller: {rate: 100, burst: 100}}\n"
             "  concurrency: {per_caller: 2, per_callee: 5}\n")
    sa, sb = new_store(redis_url), new_store(redis_url)
    a, b = SharedHarness(rules, sa), SharedHarness(rules, sb)
    try:
        _, fwd = await a.invite(1)
        assert fwd is not None and sa.counters["state_round_trips"] == 1
        _, fwd = await b.invite(2)
        assert fwd is not None and sb.counters["state_round_trips"] == 1
        got, fwd = await a.invite(3)
        assert fwd is None and [m.status for m in got if m.status >= 200] == [403]
        assert a.verdicts[-1].reason == "per_caller_exceeded"
        assert a.verdicts[-1].detail == {"limit": "per_caller", "number": CALLER_NO,
                                         "count": 2, "max": 2}
        assert len(await members(sa, f"caller:{CALLER_NO}")) == 2
        # the refused call took nothing (one lease per admitted call on the callee too)
        assert len(await members(sa, "callee:+18005550199")) == 2
    finally:
        await sa.close()
        await sb.close()


async def test_rejected_and_cancelled_calls_give_their_slot_back(redis_url: str) -> None:
    store = new_store(redis_url)
    h = SharedHarness("rules:\n  concurrency: {per_caller: 1}\n", store)
    try:
        # the core refuses the call: the slot comes back
        _, fwd = await h.invite(1)
        assert fwd is not None
        h.feed(h_answer(fwd, 486), src=CORE)
        await h.settle()
        assert await members(store, f"caller:{CALLER_NO}") == []
        # cancelled while Redis was answering: given back when the answer comes
        h.feed(invite(branch="z9hG4bK-c2", call_id="call-2", caller=CALLER_NO,
                      callee="+18005550199"))
        events = h.core.drain_events()
        h.feed(cancel(call_id="call-2", branch="z9hG4bK-c2"))
        for event in events + h.core.drain_events():
            if isinstance(event, DecisionPending):
                h.core.resolve(event.call, await event.pending, h.now)
        await h.settle()
        assert await members(store, f"caller:{CALLER_NO}") == []
        assert len(h.tracker.mirror) == 0
    finally:
        await store.close()


def h_answer(req: Message, status: int) -> bytes:
    return answer(req, status, "X")


async def test_monitor_mode_forwards_and_reports(redis_url: str) -> None:
    store = new_store(redis_url)
    h = SharedHarness("rules:\n  concurrency: {per_caller: 1, mode: monitor}\n", store)
    try:
        assert (await h.invite(1))[1] is not None
        _, fwd = await h.invite(2)
        assert fwd is not None
        v = h.verdicts[-1]
        assert v.action == "accept" and v.monitored and v.reason == "per_caller_exceeded"
        assert len(await members(store, f"caller:{CALLER_NO}")) == 2  # counted all the same
    finally:
        await store.close()


async def test_fail_open_tags_the_call_and_counts_it_later(redis_url: str) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    store = SharedStore(connect(Where(url=f"redis://127.0.0.1:{dead}/0")), timeout_s=0.05,
                        fail_open=True, counters=Counter())
    h = SharedHarness("rules:\n  concurrency: {per_caller: 1}\n", store)
    try:
        _, fwd = await h.invite(1)
        assert fwd is not None
        assert fwd.get("x-sipguard-verdict") == "state.unavailable"
        v = h.verdicts[-1]
        assert v.monitored and v.rule == "state" and v.reason == "state_unavailable"
        assert h.tracker.mirror.holds(next(iter(h.tracker.mirror.lease_ids_now())))
    finally:
        await store.close()


async def test_fail_closed_answers_503_with_retry_after(redis_url: str) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    store = SharedStore(connect(Where(url=f"redis://127.0.0.1:{dead}/0")), timeout_s=0.05,
                        fail_open=False, retry_after_s=9, counters=Counter())
    h = SharedHarness("rules:\n  rate: {per_caller: {rate: 1}}\n", store)
    try:
        got, fwd = await h.invite(1)
        assert fwd is None
        final = [m for m in got if m.status >= 200]
        assert [m.status for m in final] == [503]
        assert final[0].get("retry-after") == "9"
        assert final[0].get("x-sipguard-verdict") is None  # the tag is for the core only
    finally:
        await store.close()



# Redis busy for ARGV[1] microseconds: one script holds its single thread (a stalled Redis)
BUSY = ("local t = redis.call('TIME') local start = t[1] * 1000000 + t[2] "
        "while true do local n = redis.call('TIME') "
        "if n[1] * 1000000 + n[2] - start > tonumber(ARGV[1]) then break end end return 1")


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
async def test_a_redis_that_answers_too_late_leaves_no_phantom_slot(
        redis_url: str, fail_open: bool) -> None:
    """Redis stalls past the timeout while an INVITE is decided. Fail closed: the call is
    refused (503), and when Redis wakes and runs the late admission the slot is given back —
    the caller's next call is not refused for a call it does not have. Fail open: the call
    passes, and the late admission counts it while it is up (a second call is refused by
    per_caller 1); its end frees the slot."""
    import redis.asyncio as aioredis

    store = new_store(redis_url, timeout_s=0.05, fail_open=fail_open)
    h = SharedHarness("rules:\n  concurrency: {per_caller: 1}\n", store)
    busy = aioredis.from_url(redis_url)
    try:
        _, fwd = await h.invite(9, caller="+12125550999")  # the connection up, scripts loaded
        assert fwd is not None
        stall = asyncio.ensure_future(busy.eval(BUSY, 0, 400_000))
        await asyncio.sleep(0.05)
        got, fwd = await h.invite(1)
        assert (fwd is not None) is fail_open, [m.status for m in got]
        await stall
        if fail_open:  # the passed call is up and counted: no second call beside it
            assert fwd is not None
            assert len(await members(store, f"caller:{CALLER_NO}")) == 1
            got, second = await h.invite(3)
            assert second is None and [m.status for m in got][-1] == 403
            h.feed(h_answer(fwd, 486), src=CORE)  # it ends: its slot comes back
            await h.settle()
        assert await members(store, f"caller:{CALLER_NO}") == []
        got, fwd = await h.invite(2)
        assert fwd is not None, [m.status for m in got]
    finally:
        await busy.aclose()
        await store.close()


async def test_a_call_cancelled_while_redis_stalls_fail_open_keeps_no_slot(
        redis_url: str) -> None:
    """Fail open: an INVITE cancelled while Redis stalls past the timeout is passed over
    (its 487), and the slot the late admission took in Redis — and the local copy's — is
    given back: the caller's next call passes, nothing is held."""
    import redis.asyncio as aioredis

    store = new_store(redis_url, timeout_s=0.05, fail_open=True)
    h = SharedHarness("rules:\n  concurrency: {per_caller: 1}\n", store)
    busy = aioredis.from_url(redis_url)
    try:
        _, fwd = await h.invite(9, caller="+12125550999")  # the connection up, scripts loaded
        assert fwd is not None
        stall = asyncio.ensure_future(busy.eval(BUSY, 0, 400_000))
        await asyncio.sleep(0.05)
        h.feed(invite(branch="z9hG4bK-c1", call_id="call-1", caller=CALLER_NO,
                      callee="+18005550199"))
        events = h.core.drain_events()
        h.feed(cancel(call_id="call-1", branch="z9hG4bK-c1"))
        for event in events + h.core.drain_events():
            if isinstance(event, DecisionPending):
                h.core.resolve(event.call, await event.pending, h.now)
        await h.settle()
        await stall
        await asyncio.sleep(0.05)
        assert await members(store, f"caller:{CALLER_NO}") == []
        assert len(h.tracker.mirror) == 1  # call 9's only
        got, fwd = await h.invite(2)
        assert fwd is not None, [m.status for m in got]
    finally:
        await busy.aclose()
        await store.close()


DIALER = ("rules:\n  dialer:\n    distinct_callees: {tag: 3, block: 5}\n"
          "    pumping: {per_callee: {tag: 2, block: 4}}\n")
CALLEES = ["+16465550107", "+13035550142", "+17205550199", "+14155550123", "+12065550178",
           "+15125550111", "+16175550144"]


async def test_dialer_distinct_callees_and_cooldown_are_shared(redis_url: str) -> None:
    """One caller dialing distinct numbers through two instances: the tag at the third, the
    block at the fifth (counted across both), then the cooldown holds on the other instance
    too — answered from Redis, then from its local copy without asking again."""
    sa, sb = new_store(redis_url), new_store(redis_url)
    a, b = SharedHarness(DIALER, sa), SharedHarness(DIALER, sb)
    try:
        forwarded = []
        for i, callee in enumerate(CALLEES[:4]):
            h = a if i % 2 == 0 else b
            _, fwd = await h.invite(i, callee=callee)
            forwarded.append(fwd)
        assert all(f is not None for f in forwarded)
        assert forwarded[2] is not None and \
            forwarded[2].get("x-sipguard-verdict") == "dialer.distinct_callees"
        got, fwd = await a.invite(10, callee=CALLEES[4])  # the fifth distinct: blocked
        assert fwd is None and [m.status for m in got if m.status >= 200] == [603]
        assert a.verdicts[-1].reason == "distinct_callees"
        got, fwd = await b.invite(11, callee=CALLEES[0])  # B never counted five itself
        assert fwd is None and b.verdicts[-1].reason == "distinct_callees_cooldown"
        trips = sb.counters["state_round_trips"]
        got, fwd = await b.invite(12, callee=CALLEES[1])
        assert fwd is None and sb.counters["state_round_trips"] == trips  # local copy now
        ttl = await sa.client.pttl(sa.rkey("dialer.block.caller:+12125550100"))
        assert 290_000 < ttl <= 300_000  # block_s default 300
    finally:
        await sa.close()
        await sb.close()


async def test_dialer_pumping_per_callee_counts_across_instances(redis_url: str) -> None:
    sa, sb = new_store(redis_url), new_store(redis_url)
    a, b = SharedHarness(DIALER, sa), SharedHarness(DIALER, sb)
    try:
        callers = [f"+1212555{i:04d}" for i in (11, 23, 37, 41, 59)]
        results = []
        for i, caller in enumerate(callers):
            h = a if i % 2 == 0 else b
            _, fwd = await h.invite(20 + i, caller=caller, callee="+19005550100")
            results.append(fwd is not None)
        assert results == [True, True, True, False, False]
        assert (a.verdicts + b.verdicts)[-1].reason in ("pumping", "pumping_cooldown")
    finally:
        await sa.close()
        await sb.close()
