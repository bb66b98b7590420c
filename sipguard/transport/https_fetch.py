"""The certificate fetcher: one HTTPS GET per x5u URL, built so it cannot be turned against us.

:class:`HttpsFetcher` implements :class:`sipguard.policy.stircert.CertFetcher` with aiohttp:

- the URL is checked again with :func:`~sipguard.policy.stircert.check_x5u` (https only, the
  allowed ports, no userinfo/query/fragment, IP literals public unless ``allow_private``);
- host names are resolved by :class:`GuardedResolver`, which drops loopback, private,
  link-local and other special-purpose addresses (unless ``allow_private``) *before* aiohttp
  connects, so the address checked is the address used (no DNS-rebinding gap);
- no redirects, no proxy from the environment, no cookies, ``Accept-Encoding: identity``;
- the TLS peer is verified against the system CAs plus ``ca_bundle``;
- the whole fetch is bounded by ``timeout_s``, the body by ``max_bytes`` (counted as read;
  a larger Content-Length is refused before reading);
- concurrent fetches of one URL share one request (single flight; a finished fetch keeps
  answering for ``LINGER_S``); at most ``max_inflight`` distinct URLs are fetched at once, and
  at most ``max_per_host`` of them from one x5u host and port (the URL's host name or IP
  literal; :func:`slot_key`), so
  a slow host — an attacker's, answering nothing — holds a few slots, never all of them. A
  fetch beyond the host's slots waits for one (first come, first served) up to ``timeout_s``,
  at most ``max_waiting_per_host`` of them per host: a repository host serving several
  providers' certificates takes a cold cache's burst. A fetch beyond the global limit, or one
  that finds the host's queue full or waited ``timeout_s``, fails as ``busy`` (logged
  ``x5u_fetch_busy``, sampled per host).

Failures raise :class:`~sipguard.policy.stircert.FetchError` and are logged here
(``x5u_fetch_failed``, sampled per host); successes are logged as ``x5u_fetched``.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
import ssl
import time
from typing import Any, NoReturn

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from sipguard.ops.logging import SampledLogger, get_logger
from sipguard.policy.stircert import (
    Fetched,
    FetchError,
    FetchLimits,
    X5u,
    X5uRefused,
    check_x5u,
    is_public_address,
)

USER_AGENT = "sipguard-stir/1"
# A finished fetch answers further requests for its URL this long: a call that arrives between
# the fetch finishing and its waiters storing the result in the rule's cache reuses it.
LINGER_S = 5.0


def slot_key(x5u: X5u) -> str:
    """What fetch slots are counted per: the x5u host and port (443 unsaid). By host alone, a
    caller naming a repository's host on another allowed port that never answers (8443 on
    one that drops it) took that host's slots and queue, and the repository's real
    certificates, on 443, could not be fetched (``busy``)."""
    if x5u.port == 443:
        return x5u.host
    return f"[{x5u.host}]:{x5u.port}" if ":" in x5u.host else f"{x5u.host}:{x5u.port}"


def _fetched(outcome: Fetched | FetchError) -> Fetched:
    """A shared fetch's outcome for one waiter: the chain, or its failure raised anew."""
    if isinstance(outcome, FetchError):
        raise FetchError(outcome.reason, outcome.detail, cacheable=outcome.cacheable)
    return outcome


class AddressRefused(OSError):
    """Every address a host name resolved to is one we do not fetch from."""


class GuardedResolver(AbstractResolver):
    """The system resolver, with non-public addresses removed unless ``allow_private``."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if self.allow_private:
            return found
        kept = [r for r in found if is_public_address(ipaddress.ip_address(r["host"]))]
        if not kept:
            addrs = ", ".join(sorted({r["host"] for r in found}))
            raise AddressRefused(f"{host} resolves only to non-public addresses ({addrs})")
        return kept

    async def close(self) -> None:
        await self._inner.close()


class HttpsFetcher:
    """Fetches certificate chains for the identity rule; close with :meth:`close`."""

    def __init__(self, clock: Any = time.monotonic, linger_s: float = LINGER_S) -> None:
        self.linger_s = linger_s
        self._sessions: dict[tuple[str | None, bool], aiohttp.ClientSession] = {}
        self._inflight: dict[tuple[str, FetchLimits], asyncio.Task[Fetched | FetchError]] = {}
        self._per_host: dict[str, int] = {}  # x5u host -> fetches not finished yet
        # x5u host -> fetches waiting for one of its slots, first come first
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self.log = get_logger("sipguard.certfetch")
        self.sampled = SampledLogger(self.log, 10.0, clock=clock)
        self.requests = 0  # HTTP requests made (tests and metrics)
        self.running = 0  # fetches not finished yet

    async def fetch(self, url: str, limits: FetchLimits) -> Fetched:
        key = (url, limits)
        task = self._inflight.get(key)
        if task is None:
            try:
                host = slot_key(check_x5u(url, limits.ports, limits.allow_private))
            except X5uRefused:
                host = ""  # refused by _fetch at once, without a request
            if host and (self._per_host.get(host, 0) >= limits.max_per_host
                         or self._waiting.get(host)):
                await self._slot(url, host, limits)  # returns holding one of host's slots
                task = self._inflight.get(key)  # fetched meanwhile by another waiter?
                if task is not None or self.running >= limits.max_inflight:
                    self._release(host)
                    if task is None:
                        self._busy(url, host, f"{self.running} fetches in flight")
                    return _fetched(await asyncio.shield(task))
            else:
                if self.running >= limits.max_inflight:
                    self._busy(url, host, f"{self.running} fetches in flight")
                self._per_host[host] = self._per_host.get(host, 0) + 1
            loop = asyncio.get_running_loop()
            task = loop.create_task(self._outcome(url, limits))
            self._inflight[key] = task
            self.running += 1

            def finished(t: asyncio.Task[Fetched | FetchError]) -> None:
                self.running -= 1
                self._release(host)
                if not t.cancelled():
                    t.exception()  # retrieved: the waiters get it; no "never retrieved" noise
                loop.call_later(self.linger_s, self._forget, key, t)

            task.add_done_callback(finished)
        # shield: a waiter that goes away (CANCEL) must not cancel the others' fetch
        return _fetched(await asyncio.shield(task))

    async def _outcome(self, url: str, limits: FetchLimits) -> Fetched | FetchError:
        """:meth:`_fetch`'s result, or its failure as a FetchError never raised: no traceback
        and no context, so the task that keeps it for ``linger_s`` holds no frame of the fetch
        — a raised one's traceback held the response and its buffers in a cycle the young
        collections freeze, until a full one (an hour on): one failed fetch named by a caller
        held ~230 KB that long, and one caller could name a new URL with every INVITE."""
        try:
            return await self._fetch(url, limits)
        except FetchError as exc:
            return FetchError(exc.reason, exc.detail, cacheable=exc.cacheable)

    async def _slot(self, url: str, host: str, limits: FetchLimits) -> None:
        """Wait, first come first served, for one of ``host``'s fetch slots (its fetches at
        ``max_per_host``), up to ``timeout_s``; return holding it (a finished fetch hands its
        slot to the first waiter). ``busy`` when ``max_waiting_per_host`` already wait or
        time runs out."""
        queue = self._waiting.setdefault(host, collections.deque())
        if len(queue) >= limits.max_waiting_per_host:
            if not queue:
                del self._waiting[host]
            self._busy(url, host, f"{self._per_host.get(host, 0)} fetches in flight to "
                                  f"{host}, {len(queue)} waiting")
        loop = asyncio.get_running_loop()
        handed: asyncio.Future[None] = loop.create_future()
        queue.append(handed)
        try:
            await asyncio.wait_for(asyncio.shield(handed), limits.timeout_s)
        except BaseException as exc:
            if handed.done() and not handed.cancelled():
                self._release(host)  # handed a slot just as it gave up: pass it on
            else:
                handed.cancel()
            if isinstance(exc, TimeoutError):
                self._busy(url, host, f"no fetch slot on {host} within {limits.timeout_s:g} s")
            raise
        finally:
            if handed in queue:
                queue.remove(handed)
            if not queue and self._waiting.get(host) is queue:
                del self._waiting[host]

    def _release(self, host: str) -> None:
        """One of ``host``'s slots is free: handed to the first fetch waiting for one, if
        any (it holds it on waking: nobody can take it meanwhile), else given back."""
        queue = self._waiting.get(host)
        while queue:
            handed = queue.popleft()
            if not handed.done():
                handed.set_result(None)  # the slot passes to it: the count stays
                return
        left = self._per_host.get(host, 1) - 1
        if left > 0:
            self._per_host[host] = left
        else:
            self._per_host.pop(host, None)

    def in_flight(self, host: str) -> int:
        """Fetches from ``host`` (a :func:`slot_key`) not finished yet (tests and metrics)."""
        return self._per_host.get(host, 0)

    def _busy(self, url: str, host: str, detail: str) -> NoReturn:
        self.sampled.log("warning", "x5u_fetch_busy", key=f"busy:{host}", url=url[:200],
                         host=host, detail=detail)
        raise FetchError("busy", detail, cacheable=False)

    def _forget(self, key: tuple[str, FetchLimits], task: asyncio.Task[Fetched | FetchError]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    # ------------------------------------------------------------------ internals
    def _session(self, limits: FetchLimits) -> aiohttp.ClientSession:
        key = (limits.ca_bundle, limits.allow_private)
        session = self._sessions.get(key)
        if session is None or session.closed:
            ctx = ssl.create_default_context()
            if limits.ca_bundle is not None:
                ctx.load_verify_locations(cafile=limits.ca_bundle)
            connector = aiohttp.TCPConnector(
                ssl=ctx,
                resolver=GuardedResolver(limits.allow_private),
                limit=0,
                ttl_dns_cache=60,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                         "Accept": "application/pem-certificate-chain, */*;q=0.5"},
            )
            self._sessions[key] = session
        return session

    async def _fetch(self, url: str, limits: FetchLimits) -> Fetched:
        started = time.perf_counter()
        try:
            try:
                x5u = check_x5u(url, limits.ports, limits.allow_private)
            except X5uRefused as exc:
                raise FetchError("refused", str(exc)) from None
            try:
                async with asyncio.timeout(limits.timeout_s):
                    fetched = await self._get(url, limits)
            except TimeoutError:
                raise FetchError("timeout", f"no complete answer in {limits.timeout_s:g}s") from None
        except FetchError as exc:
            self.sampled.log("warning", "x5u_fetch_failed", key=f"x5u:{url[:200]}",
                             url=url[:200], reason=exc.reason, detail=exc.detail[:300])
            raise
        self.log.info("x5u_fetched", url=url[:200], host=x5u.host, size=len(fetched.body),
                      cache_control=fetched.cache_control,
                      ms=round((time.perf_counter() - started) * 1000, 1))
        return fetched

    async def _get(self, url: str, limits: FetchLimits) -> Fetched:
        session = self._session(limits)
        self.requests += 1
        try:
            async with session.get(url, allow_redirects=False, max_redirects=0,
                                   max_line_size=8190, max_field_size=8190) as resp:
                if resp.status != 200:
                    raise FetchError("http_status", f"HTTP {resp.status}")
                length = resp.content_length
                if length is not None and length > limits.max_bytes:
                    raise FetchError("too_large", f"Content-Length {length} > {limits.max_bytes}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(16384):
                    body += chunk
                    if len(body) > limits.max_bytes:
                        raise FetchError("too_large", f"body over {limits.max_bytes} bytes")
                return Fetched(bytes(body), resp.headers.get("Cache-Control"))
        except aiohttp.ClientConnectorCertificateError as exc:
            raise FetchError("tls", str(exc.certificate_error)[:200]) from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefused):
                raise FetchError("refused", str(exc.os_error)) from None
            raise FetchError("connect", str(exc.os_error)[:200]) from None
        except aiohttp.ClientSSLError as exc:
            raise FetchError("tls", str(exc)[:200]) from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise FetchError("connect", f"{type(exc).__name__}: {exc}"[:200]) from None
