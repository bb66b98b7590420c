"""A result that arrives later on the event loop's thread, continued without a task.

The one decision that waits on the hot path is an INVITE's signature check on a verify thread
(``rules.identity.verify_threads``). Through asyncio it cost a future, a coroutine per layer
(the rule, the pipeline, the shell) and a task, whose steps each took a pass of the loop: the
answer came back in one pass, the task woke in the next. A :class:`Later` is what such a
step gives back instead. Whoever produces the value calls :meth:`Later.deliver` (or
:meth:`Later.fail`) on the loop's thread, and the continuations registered with
:meth:`Later.then` run at once, in order, inside that call: the verify threads' answer is
folded into the rule's verdict, the remaining rules run, and the proxy gets the verdict in
the same callback that read the answer.

A Later is also awaitable (``await later``): code that waits in a coroutine (tests, a rule
after a certificate fetch) needs nothing else. There is no cancellation: a call that went
away while its decision waited is found gone when the verdict arrives (``Proxy.resolve``).

Continuations must not raise: they are the producer's callers' code, run inside the
producer's callback. Each one here catches what it calls and fails the Later it feeds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")

_PENDING, _VALUE, _ERROR = 0, 1, 2

# Tasks that bridge an awaitable into a Later (follow): the loop keeps only weak references.
_bridges: set[asyncio.Future[Any]] = set()


class Later(Generic[T]):
    """A value (or an exception) delivered once, later, on the event loop's thread."""

    __slots__ = ("_state", "_value", "_error", "_first", "_more")

    def __init__(self) -> None:
        self._state = _PENDING
        self._value: T | None = None
        self._error: BaseException | None = None
        self._first: Callable[[Later[T]], None] | None = None
        self._more: list[Callable[[Later[T]], None]] | None = None

    def done(self) -> bool:
        return self._state != _PENDING

    def result(self) -> T:
        """The value; raises the exception it failed with, or RuntimeError while pending."""
        if self._state == _VALUE:
            return self._value  # type: ignore[return-value]
        if self._state == _ERROR:
            assert self._error is not None
            raise self._error
        raise RuntimeError("Later.result() before the value was delivered")

    def then(self, fn: Callable[[Later[T]], None]) -> None:
        """Run ``fn(self)`` once the value is there: at once when it is already."""
        if self._state != _PENDING:
            fn(self)
        elif self._first is None:
            self._first = fn
        elif self._more is None:
            self._more = [fn]
        else:
            self._more.append(fn)

    def deliver(self, value: T) -> None:
        if self._state == _PENDING:
            self._state = _VALUE
            self._value = value
            self._run()

    def fail(self, error: BaseException) -> None:
        if self._state == _PENDING:
            self._state = _ERROR
            self._error = error
            self._run()

    def _run(self) -> None:
        first, more = self._first, self._more
        self._first = self._more = None
        if first is not None:
            first(self)
        if more is not None:
            for fn in more:
                fn(self)

    def map(self, fn: Callable[[T], U]) -> Later[U]:
        """A Later of ``fn(value)``; fails as this one does, or with what ``fn`` raises."""
        out: Later[U] = Later()

        def step(src: Later[T]) -> None:
            try:
                value = fn(src.result())
            except Exception as exc:
                out.fail(exc)
                return
            out.deliver(value)

        self.then(step)
        return out

    def follow(self, source: U | Later[U] | Awaitable[U]) -> None:
        """Complete this Later (of U) from ``source``: a value (at once), another Later (when
        it completes) or any other awaitable (a task on the running loop awaits it)."""
        if isinstance(source, Later):
            source.then(self._adopt)
        elif isinstance(source, Awaitable):
            task = asyncio.ensure_future(source)
            _bridges.add(task)
            task.add_done_callback(self._from_task)
        else:
            self.deliver(source)  # type: ignore[arg-type]

    def _adopt(self, src: Later[Any]) -> None:
        if src._state == _VALUE:
            self.deliver(src._value)  # type: ignore[arg-type]
        else:
            assert src._error is not None
            self.fail(src._error)

    def _from_task(self, task: asyncio.Future[Any]) -> None:
        _bridges.discard(task)
        if task.cancelled():
            self.fail(asyncio.CancelledError())
            return
        error = task.exception()
        if error is not None:
            self.fail(error)
        else:
            self.deliver(task.result())

    def __await__(self) -> Generator[Any, None, T]:
        if self._state == _PENDING:
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            self.then(lambda src: _settle(future, src))
            return future.__await__()
        return _ready(self).__await__()


async def _ready(later: Later[T]) -> T:
    return later.result()


def _settle(future: asyncio.Future[T], src: Later[T]) -> None:
    if future.done():  # the awaiting task was cancelled
        return
    if src._state == _VALUE:
        future.set_result(src._value)  # type: ignore[arg-type]
    else:
        assert src._error is not None
        future.set_exception(src._error)
