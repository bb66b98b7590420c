"""sipguard/later.py: a value delivered later, its continuations run at once and in order,
chained (map, follow) and awaited from a coroutine."""

from __future__ import annotations

import asyncio

import pytest

from sipguard.later import Later


def test_continuations_run_in_order_when_the_value_is_delivered() -> None:
    later: Later[int] = Later()
    seen: list[tuple[str, int]] = []
    for name in ("a", "b", "c"):
        later.then(lambda src, name=name: seen.append((name, src.result())))
    assert not later.done() and seen == []
    with pytest.raises(RuntimeError):
        later.result()
    later.deliver(7)
    assert later.done() and seen == [("a", 7), ("b", 7), ("c", 7)]
    later.deliver(8)  # delivered once: the second is ignored
    later.then(lambda src: seen.append(("late", src.result())))  # after: runs at once
    assert seen[-1] == ("late", 7) and len(seen) == 4


def test_a_failure_reaches_every_continuation_and_map() -> None:
    later: Later[int] = Later()
    doubled = later.map(lambda v: v * 2)
    later.fail(ValueError("no"))
    with pytest.raises(ValueError, match="no"):
        doubled.result()
    later.deliver(1)  # failed once: stays failed
    with pytest.raises(ValueError):
        later.result()


def test_map_carries_what_the_function_raises() -> None:
    later: Later[int] = Later()
    good = later.map(lambda v: v + 1)
    bad = later.map(lambda v: 1 // (v - v))
    later.deliver(3)
    assert good.result() == 4
    with pytest.raises(ZeroDivisionError):
        bad.result()


def test_follow_a_value_a_later_and_a_coroutine() -> None:
    direct: Later[str] = Later()
    direct.follow("now")
    assert direct.result() == "now"

    inner: Later[str] = Later()
    outer: Later[str] = Later()
    outer.follow(inner)
    assert not outer.done()
    inner.deliver("chained")
    assert outer.result() == "chained"

    failing: Later[str] = Later()
    chained: Later[str] = Later()
    chained.follow(failing)
    failing.fail(KeyError("k"))
    with pytest.raises(KeyError):
        chained.result()

    async def run() -> tuple[str, Later[str]]:
        async def fetch() -> str:
            await asyncio.sleep(0)
            return "fetched"

        async def broken() -> str:
            raise OSError("down")

        ok: Later[str] = Later()
        ok.follow(fetch())
        bad: Later[str] = Later()
        bad.follow(broken())
        assert not ok.done()
        return await ok, bad

    value, bad = asyncio.run(run())
    assert value == "fetched"
    with pytest.raises(OSError, match="down"):
        bad.result()


def test_awaiting_a_pending_and_a_done_later() -> None:
    async def run() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        pending: Later[int] = Later()
        loop.call_later(0.01, pending.deliver, 5)
        done: Later[int] = Later()
        done.deliver(6)
        return await pending, await done

    assert asyncio.run(run()) == (5, 6)

    async def fails() -> int:
        later: Later[int] = Later()
        asyncio.get_running_loop().call_soon(later.fail, LookupError("gone"))
        return await later

    with pytest.raises(LookupError):
        asyncio.run(fails())


def test_an_awaiting_task_cancelled_leaves_the_later_usable() -> None:
    async def run() -> int:
        later: Later[int] = Later()

        async def wait() -> int:
            return await later

        task = asyncio.ensure_future(wait())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        later.deliver(9)  # the cancelled waiter's future is skipped
        return later.result()

    assert asyncio.run(run()) == 9
