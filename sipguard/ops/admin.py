"""The HTTP admin API: metrics, health, readiness, reload, config, calls, bans, suspensions,
dialer cooldowns.

One aiohttp site on the event loop (``admin: {listen: 127.0.0.1:9090, token_file: ...}``;
``metrics:`` is the section's old name). ``GET /metrics`` (Prometheus), ``GET /healthz`` and
``GET /readyz`` are open (with several workers, ``/metrics`` on any worker is every
worker's, each sample labelled ``worker``; ``?scope=worker``: that worker's alone); every
other endpoint — everything that changes state or shows
numbers — asks for ``Authorization: Bearer <token>`` when a token file is configured
(compared with :func:`hmac.compare_digest`). Bodies are JSON both ways; a bad request is a 4xx
with ``{"error": "..."}``, never a traceback.

=======================  ==================================================================
``GET /readyz``          200 ``{"ready": true}`` while the listeners are up, else 503
                         (with ``state.backend: redis`` also ``"state": "ok"|"unreachable"``;
                         unready while unreachable with ``state.fail: closed``)
``POST /reload``         re-read the config file: ``{"applied", "changed", "restart_needed"}``
                         or 422 ``{"applied": false, "errors": [{"line", "field", "message"}]}``
``GET /config``          the effective config, file paths of secrets redacted
``GET /calls?number=N``  live calls of a number (or ``prefix*``) and its live-call counts (this
                         instance; with Redis also ``counts_all_instances``); with several
                         workers the calls of every worker (each asked with ``scope=worker``);
                         at most MAX_CALLS_SHOWN calls, then ``"truncated": true``
``GET /bans``            flood bans in force (every worker's), at most MAX_BANS_SHOWN, with
                         ``total``; ``?source=`` one; ``DELETE /bans/{source}`` lifts one,
                         wherever it is held
``GET /suspensions``     suspended numbers (API and config) in key order, a page at a time:
                         ``?limit=`` (SUSPENSIONS_PAGE, at most SUSPENSIONS_PAGE_MAX),
                         ``?after=`` (the ``next`` of the page before), ``?prefix=``; with
                         ``total`` and, while more follow, ``next``; ``POST`` adds, ``DELETE
                         /suspensions/{number}`` lifts
``/dialer/cooldowns``    ``GET``: rule dialer's cooldowns in force (``?scope=``, ``?key=``;
                         with several workers every worker's, each entry with its ``worker``);
                         at most MAX_COOLDOWNS_SHOWN, then ``"truncated": true``; ``DELETE
                         /dialer/cooldowns/{key}`` lifts one (``?scope=``, ``?by=``; 404 when
                         none): :mod:`sipguard.ops.cooldowns`
=======================  ==================================================================

What the endpoints do is the shell's (:class:`Control`, implemented by ``sipguard.server``);
this module is HTTP only: routing, authentication, JSON and request validation.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import os
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import quote, unquote

import aiohttp
from aiohttp import http_exceptions, web, web_protocol
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from sipguard.ops.config import AdminSettings, Config
from sipguard.ops.config_load import FieldError
from sipguard.ops.cooldowns import MAX_COOLDOWNS_SHOWN, cooldown_key, scope_of, scopes_of
from sipguard.ops.logging import SampledLogger, get_logger
from sipguard.ops.metrics import (
    Metrics,
    MetricsCollector,
    Snapshot,
    SnapshotCollector,
    families,
)
from sipguard.ops.reload import ReloadResult
from sipguard.policy.suspensions import suspension_key

__all__ = ["AdminEndpoint", "Control", "read_token"]

MAX_BODY = 64 * 1024
MAX_EXPIRES_S = 10 * 366 * 86400  # a suspension that lifts itself: ten years at most
OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
# GET /calls lists at most this many calls (then says "truncated": true): a prefix as wide as
# "+*" with 100,000 calls up must not build a 30 MB answer on the event loop
MAX_CALLS_SHOWN = 1000
# GET /bans: at most this many (each worker's, and in all), then "truncated": true; a flood
# from a botnet can hold flood.max_bans (100,000 by default) bans on every worker
MAX_BANS_SHOWN = 1000
# GET /suspensions: entries a page by default, and at most (?limit=): 100,000 suspensions in
# one answer were ~5 MB built on the event loop (~0.1 s of no SIP)
SUSPENSIONS_PAGE = 1000
SUSPENSIONS_PAGE_MAX = 10_000
# GET /metrics with several workers: an exposition of every worker's metrics made less than
# this many seconds ago is served again (the others are asked at most this often)
SCRAPE_REUSE_S = 0.25
# GET /calls and GET /metrics with several workers: how long one other worker may take
PEER_TIMEOUT_S = 2.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Control(Protocol):
    """What the admin API asks of the running sipguard."""

    @property
    def ready(self) -> bool: ...

    @property
    def cfg(self) -> Config: ...  # the running config

    async def reload_config(self, everywhere: bool = False) -> ReloadResult: ...

    def config_view(self) -> dict[str, Any]: ...

    def calls_view(self, key: str) -> dict[str, Any]: ...

    def bans_view(self, source: str | None = None,
                  limit: int = MAX_BANS_SHOWN) -> dict[str, Any]: ...

    def lift_ban(self, source: str, tell_others: bool = True) -> bool: ...

    def suspensions_view(self) -> list[dict[str, Any]]: ...

    def suspensions_page(self, after: str | None, limit: int, prefix: str
                         ) -> dict[str, Any]: ...

    @property
    def numbers_hidden(self) -> bool: ...

    async def suspend(
        self, key: str, reason: str, by: str, ttl: float | None, end_calls: bool,
        keep_expiry: bool = False,
    ) -> dict[str, Any]: ...

    async def unsuspend(self, key: str, by: str) -> dict[str, Any] | None: ...

    def cooldowns_view(self, scope: str | None, key: str | None) -> dict[str, Any]: ...

    async def lift_cooldown(self, key: str, scope: str | None, by: str, local: bool = False,
                            reset: tuple[str, ...] = ()) -> dict[str, Any]: ...


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def read_token(path: str) -> str:
    """The token in ``path`` (surrounding whitespace dropped). Raises OSError, or ValueError
    for an empty file."""
    with open(path, encoding="utf-8") as fh:
        token = fh.read().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def admin_token(http: AdminSettings, section: str = "admin") -> str | None:
    """The admin API's token as start-up reads it (``run`` and ``check-config`` alike): None
    without an admin API, or without a token file on a loopback-only one; a
    :class:`~sipguard.ops.config_load.FieldError` (a ValueError) naming the setting and
    saying what is wrong (an unreadable or empty file, an API off loopback without one).
    ``section``: the key the settings are under (``admin``, or its old name ``metrics``)."""
    if http.host_port is None:
        return None
    if http.token_file is None:
        if not http.loopback:
            raise FieldError((section, "listen"), f"admin API on {http.listen} is not "
                             "loopback-only: set admin.token_file")
        return None
    try:
        return read_token(str(http.token_file))
    except (OSError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise FieldError((section, "token_file"),
                         f"cannot read admin token_file {http.token_file}: {detail}") from None


def check_admin(cfg: Config) -> None:
    """The checks start-up makes on the admin section (:func:`admin_token`), for a config
    about to be run, checked or reloaded: a reload of a file the process could not start
    with is refused (FieldError), not found out at the next restart."""
    admin_token(cfg.http, "metrics" if cfg.admin is None and cfg.metrics is not None
                else "admin")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise HttpError(413, "request body too large")
    raw = await request.read()
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python goes
        raise HttpError(400, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise HttpError(400, "body must be a JSON object")
    return data


def _key(text: str) -> str:
    try:
        return suspension_key(text)
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None


def _text(data: dict[str, Any], name: str, default: str) -> str:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > 200:
        raise HttpError(400, f"{name} must be a string of at most 200 characters")
    return value


def _query_number(request: web.Request) -> str:
    """``number`` from the raw query: a literal ``+`` stays a plus (not a space)."""
    number = _query_value(request, "number")
    if number is None:
        raise HttpError(400, "give ?number=+E164 (or a prefix ending in *)")
    return number


def _loopback_host(host: str) -> bool:
    """A Host header naming this machine's loopback: ``localhost``, ``127.x.x.x`` or ``::1``
    (with or without a port). A web page that re-binds its own name to 127.0.0.1 (DNS
    rebinding) still sends its own name."""
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _Gate:
    """The admin listener's bounds: at most ``limit`` connections open, ``per_ip`` from one
    address, each closed after ``idle_s`` without a byte from its client while no request of
    its is being answered (a reload may take longer than that); when full, the oldest
    connection with no request being answered is closed for a new one. aiohttp bounds
    neither the connections nor how slowly a request's body may come, so a client that
    opens connections and sends half a request could hold every file descriptor of the
    process — SIP's too. Called as the listener's protocol factory; each connection gets a
    :class:`_Guarded` around aiohttp's own protocol."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limit: int, per_ip: int,
                 idle_s: float, counters: Counter[str]) -> None:
        self.factory = factory
        self.limit = limit
        self.per_ip = per_ip
        self.idle_s = idle_s
        self.counters = counters
        self.open = 0
        self.by_ip: dict[str, int] = {}  # open connections per address (only those with one)
        self.conns: dict[int, _Guarded] = {}  # id(transport) -> its connection

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self)


class _Guarded(asyncio.Protocol):
    """One admin connection: refused over the gate's limit, closed when idle, otherwise
    every event handed to aiohttp's protocol."""

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.last = 0.0
        self.ip = ""
        self.busy = 0  # its requests being answered (AdminEndpoint._guard counts them)
        self.opened = 0.0
        self.evicted = False  # closed to make room for a newer one (its close is under way)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self.gate
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else ""
        loop = asyncio.get_running_loop()
        full_ip = gate.by_ip.get(ip, 0) >= gate.per_ip
        if gate.open >= gate.limit or full_ip:
            # Full: the oldest connection (of this address, when that is what is full) with
            # no request being answered makes room — a client holding every slot with
            # half-sent requests would otherwise lock the operator out for as long as it
            # likes; then the new one is refused.
            victim = min((c for c in gate.conns.values() if not c.busy and not c.evicted
                          and (not full_ip or c.ip == ip)),
                         key=lambda c: c.opened, default=None)
            if victim is None or victim.transport is None:
                gate.counters["admin_connections_refused"] += 1
                transport.abort()  # type: ignore[attr-defined]
                return
            victim.evicted = True
            gate.counters["admin_connections_evicted"] += 1
            victim.transport.abort()  # type: ignore[attr-defined]  # connection_lost follows
        gate.open += 1
        gate.by_ip[ip] = gate.by_ip.get(ip, 0) + 1
        self.ip = ip
        self.transport = transport
        gate.conns[id(transport)] = self
        self.last = self.opened = loop.time()
        self.timer = loop.call_later(gate.idle_s, self._check)
        self.inner = gate.factory()
        self.inner.connection_made(transport)

    def _check(self) -> None:
        self.timer = None
        if self.inner is None or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        idle = 0.0 if self.busy else loop.time() - self.last
        if idle >= self.gate.idle_s:
            self.gate.counters["admin_connections_idle_closed"] += 1
            self.transport.abort()  # type: ignore[attr-defined]  # connection_lost follows
        else:
            self.timer = loop.call_later(self.gate.idle_s - idle, self._check)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.last = asyncio.get_running_loop().time()
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        inner, self.inner = self.inner, None
        if inner is None:
            return
        gate = self.gate
        gate.open -= 1
        gate.conns.pop(id(self.transport), None)
        left = gate.by_ip.pop(self.ip, 1) - 1
        if left:
            gate.by_ip[self.ip] = left
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        inner.connection_lost(exc)


# (source address, status, what was wrong, the traceback of an internal error or None)
BadRequestReport = Callable[[str, int, str, str | None], None]


def _traceback(exc: BaseException | None) -> str | None:
    """An internal error's traceback (a bug: worth the whole of it); None for a bad request."""
    if exc is None or isinstance(exc, http_exceptions.HttpProcessingError):
        return None
    return "".join(traceback.format_exception(exc))


def _bad_request_text(status: int, exc: BaseException | None) -> str:
    """What was wrong with a request aiohttp could not read, in a few words — never the
    request's own bytes (aiohttp's message quotes them)."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return f"request line or header longer than {exc.args[1]} bytes"
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return "not an HTTP request"
    if status >= 500:
        return "internal error"
    return "malformed HTTP request"


class _AdminHandler(web_protocol.RequestHandler):
    """aiohttp's protocol for one connection, with the admin API's answer to a request it
    cannot read (an over-long header, garbage): ``{"error": ...}`` like every other error,
    reported as one sampled line — not aiohttp's text/plain answer and a traceback on stderr
    per request, which anyone reaching the port could send before the token is checked."""

    __slots__ = ("_report",)

    def __init__(self, report: BadRequestReport, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._report = report

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, http_exceptions.HttpProcessingError) and exc.code >= 400:
            status = exc.code
        what = _bad_request_text(status, exc)
        self._report(str(request.remote or ""), status, what,
                     _traceback(exc) if status >= 500 else None)
        if request.writer.output_size > 0:  # (as aiohttp: an answer is on its way already)
            raise ConnectionError("response is sent already, cannot send an error")
        response = _error(status, what)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # aiohttp's other "error handling request" tracebacks: one sampled line too
        exc = kwargs.get("exc_info")
        error = exc if isinstance(exc, BaseException) else None
        self._report("", 500, f"{args[0] if args else 'error'}: {type(error).__name__}"
                     if error is not None else str(args[0] if args else "error"),
                     _traceback(error))


class _GatedSite(web.TCPSite):
    """aiohttp's TCP site with the listener's protocol factory behind a :class:`_Gate`, each
    connection's protocol an :class:`_AdminHandler`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, gate: _Gate,
                 report: BadRequestReport) -> None:
        super().__init__(runner, host, port, reuse_address=True)
        self.gate = gate
        self.report = report

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        report = self.report
        # (web.Server() makes a RequestHandler with these; ours is that with handle_error)
        loop, kwargs = server._loop, server._kwargs  # noqa: SLF001

        def factory() -> asyncio.Protocol:
            return _AdminHandler(report, server, loop=loop, **kwargs)

        self.gate.factory = factory
        self._server = await asyncio.get_running_loop().create_server(
            self.gate, self._host, self._port, backlog=self._backlog, reuse_address=True)


class AdminEndpoint:
    """One aiohttp site; :meth:`start` binds it (raises OSError), :meth:`stop` closes it."""

    def __init__(
        self,
        metrics: Metrics,
        gauges: Callable[[], dict[str, float]],
        control: Control,
        token: str | None = None,
        counters: Counter[str] | None = None,
    ) -> None:
        self.collector = MetricsCollector(metrics, gauges)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        self.control = control
        self.token = token.encode() if token else None
        self.counters: Counter[str] = Counter() if counters is None else counters
        self._runner: web.AppRunner | None = None
        # several workers: this one's index and the base URLs of the others' admin APIs
        # (GET /calls answers for every worker)
        self.worker: int | None = None
        self.peers: dict[int, str] = {}
        # several workers: the last exposition of every worker's metrics, and when it was made
        # (loop time); one fan-out to the others at a time
        self._scraped: tuple[float, bytes] | None = None
        self._host_scrape = asyncio.Lock()
        self._gate: _Gate | None = None
        self._cursors = _Cursors()
        # requests aiohttp cannot read: one line per source per 10 s, the rest counted
        self._bad = SampledLogger(get_logger("sipguard"), 10.0)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/metrics", self._metrics)
        r.add_get("/healthz", self._healthz)
        r.add_get("/readyz", self._readyz)
        r.add_post("/reload", self._reload)
        r.add_get("/config", self._config)
        r.add_get("/calls", self._calls)
        r.add_get("/bans", self._bans)
        r.add_delete("/bans/{source:.+}", self._lift_ban)  # an IPv6 network has a "/"
        r.add_get("/suspensions", self._suspensions)
        r.add_post("/suspensions", self._suspend)
        r.add_delete("/suspensions/{number}", self._unsuspend)
        r.add_get("/dialer/cooldowns", self._cooldowns)
        r.add_delete("/dialer/cooldowns/{key}", self._lift_cooldown)
        return app

    async def start(self, host: str, port: int, max_connections: int = 64,
                    idle_timeout_s: float = 30.0, max_connections_per_ip: int = 32) -> None:
        """Bind ``host:port``: at most ``max_connections`` connections
        (``max_connections_per_ip`` from one address), each closed after ``idle_timeout_s``
        without a byte from its client (see :class:`_Gate`)."""
        # aiohttp's own keep-alive timer after ours: an idle connection is closed (and
        # counted) by the gate, not by whichever of two equal timers fires first
        runner = web.AppRunner(self.app(), access_log=None,
                               keepalive_timeout=idle_timeout_s + 1.0)
        await runner.setup()
        gate = _Gate(lambda: asyncio.Protocol(), max_connections, max_connections_per_ip,
                     idle_timeout_s, self.counters)
        try:
            await _GatedSite(runner, host, port, gate, self._bad_request).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self._gate = gate

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._bad.flush(final=True)

    def _bad_request(self, source: str, status: int, what: str, trace: str | None) -> None:
        """A request aiohttp could not read (answered ``{"error": ...}``): counted
        ``admin_bad_requests``, logged ``admin_bad_request`` sampled per source; an error of
        aiohttp's or of a handler (a bug) as ``admin_error`` with its traceback, sampled."""
        if trace is None:
            self.counters["admin_bad_requests"] += 1
            self._bad.log("warning", "admin_bad_request", key=f"bad:{source}",
                          source=source or None, status=status, error=what)
            return
        self.counters["admin_errors"] += 1
        self._bad.log("error", "admin_error", key=f"error:{what}", source=source or None,
                      status=status, error=what, traceback=trace)

    # ------------------------------------------------------------------ auth and errors
    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self.token)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # a request being answered keeps its connection from counting as idle
        conn = self._gate.conns.get(id(request.transport)) if self._gate is not None else None
        if conn is None:
            return await self._answer(request, handler)
        conn.busy += 1
        try:
            return await self._answer(request, handler)
        finally:
            conn.busy -= 1
            conn.last = asyncio.get_running_loop().time()

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            refusal = self._from_a_web_page(request)
            if refusal:
                return _error(403, refusal)
            if not self.authorized(request.headers.get("Authorization")):
                return _error(401, "missing or wrong token (Authorization: Bearer ...)")
        try:
            return await handler(request)
        except HttpError as exc:
            return _error(exc.status, exc.message)
        except web.HTTPException as exc:  # 404 / 405 from the router: JSON too
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason)

    def _from_a_web_page(self, request: web.Request) -> str:
        """Why an operator endpoint refuses a request a web browser made (empty: it does
        not). A page on any site can make a browser send a POST to 127.0.0.1 (a "simple"
        request: text/plain, no preflight) — suspending a prefix, ending every call — and,
        re-binding its own name to 127.0.0.1, read the answers of GETs too. Browsers name the
        page in ``Origin`` on such POSTs, and its name in ``Host``; the operator's tools
        (curl, ``sipguard``, scripts) send neither. So: no ``Origin`` at all, and without a
        token (the endpoint is then on loopback only) a ``Host`` naming loopback."""
        if request.headers.get("Origin") is not None:
            self.counters["admin_refused_origin"] += 1
            return "requests from web pages (with an Origin header) are refused"
        host = request.headers.get("Host")
        if self.token is None and host is not None and not _loopback_host(host):
            self.counters["admin_refused_host"] += 1
            return ("without admin.token_file the Host header must name loopback "
                    "(localhost, 127.0.0.1, [::1])")
        return ""

    # ------------------------------------------------------------------ open endpoints
    async def _metrics(self, request: web.Request) -> web.Response:
        if request.query.get("format") == "json":  # this worker's, for the one serving all
            return _json(self.collector.snapshot())
        if self.peers and request.query.get("scope") != "worker":
            body = await self._host_scrape_once()
        else:
            body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _host_scrape_once(self) -> bytes:
        """Every worker's metrics, asked of the others at most once per SCRAPE_REUSE_S:
        /metrics needs no token, and a scrape flood must not turn into a flood of questions
        to every worker. Scrapes that come while the others are being asked wait for that
        answer; one that comes less than SCRAPE_REUSE_S after it gets it too."""
        async with self._host_scrape:
            now = asyncio.get_running_loop().time()
            if self._scraped is not None and now - self._scraped[0] < SCRAPE_REUSE_S:
                return self._scraped[1]
            body = await self._host_metrics()
            self._scraped = (asyncio.get_running_loop().time(), body)
            return body

    async def _host_metrics(self) -> bytes:
        """Every worker's metrics in one exposition: this one's and the others' (their
        ``scope=worker&format=json`` answers, asked at once), each sample labelled with its
        ``worker``; ``sipguard_worker_up{worker}`` is 0 for one that did not answer (its
        samples are missing from this scrape, as a target that is down)."""
        answers = await self._ask_peers("/metrics?scope=worker&format=json", None)
        snaps: list[tuple[str | None, Snapshot]] = [(str(self.worker), self.collector.snapshot())]
        up = {str(self.worker): True}
        for i, got in answers.items():
            ok = isinstance(got, dict)
            if ok:
                try:  # a malformed answer counts as none
                    list(families([(str(i), got)]))
                except (AttributeError, KeyError, TypeError, ValueError):
                    ok = False
            if ok:
                snaps.append((str(i), got))
            up[str(i)] = ok
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(snaps, up))
        return generate_latest(registry)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.control.ready
        body: dict[str, Any] = {"ready": ready}
        state = getattr(self.control, "state_status", None)
        if state is not None:  # the shared store: "ok" or "unreachable"
            body["state"] = state
        return _json(body, 200 if ready else 503)

    # ------------------------------------------------------------------ operator endpoints
    async def _reload(self, request: web.Request) -> web.Response:
        result = await self.control.reload_config(everywhere=True)
        return _json(result.as_dict(), 422 if result.errors else 200)

    async def _config(self, request: web.Request) -> web.Response:
        return _json(self.control.config_view())

    async def _calls(self, request: web.Request) -> web.Response:
        key = _key(_query_number(request))
        view = self.control.calls_view(key)
        if self.worker is not None:
            for call in view["calls"]:
                call["worker"] = self.worker
        if self.peers and request.query.get("scope") != "worker":
            view["calls"] += await self._peer_calls(key, request.headers.get("Authorization"),
                                                    view)
            if len(view["calls"]) > MAX_CALLS_SHOWN:
                del view["calls"][MAX_CALLS_SHOWN:]
                view["truncated"] = True
        shared = getattr(self.control, "shared_counts", None)
        if shared is not None:  # Redis backend: the counts every instance shares
            view["counts_all_instances"] = await shared(key)
        return _json(view)

    async def _peer_calls(self, key: str, auth: str | None,
                          view: dict[str, Any]) -> list[dict[str, Any]]:
        """The other workers' calls of ``key`` (their ``scope=worker`` answers, asked at once,
        PEER_TIMEOUT_S each); a worker that does not answer is named in
        ``view["workers_unanswered"]``."""
        answers = await self._ask_peers(
            f"/calls?number={quote(key, safe='')}&scope=worker", auth)
        return _gathered(answers, "calls", view)

    async def _ask_peers(self, path: str, auth: str | None,
                         method: str = "GET") -> dict[int, Any]:
        """GET (or ``method``) ``path`` (JSON) from every other worker at once,
        PEER_TIMEOUT_S each: worker -> its answer, None for one that did not answer 200 with
        JSON."""
        headers = {"Accept": "application/json"}
        if auth:
            headers["Authorization"] = auth
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)
        async with aiohttp.ClientSession(trust_env=False, timeout=timeout,
                                         headers=headers) as session:

            async def ask(url: str) -> Any:
                try:
                    async with session.request(method, url + path,
                                               allow_redirects=False) as resp:
                        if resp.status != 200:
                            return None
                        return await resp.json()
                except (TimeoutError, aiohttp.ClientError, ValueError):
                    return None

            order = sorted(self.peers)
            answers = await asyncio.gather(*(ask(self.peers[i]) for i in order))
        return dict(zip(order, answers, strict=True))

    async def _bans(self, request: web.Request) -> web.Response:
        """The flood bans in force, at most MAX_BANS_SHOWN (then ``truncated``; ``total`` is
        how many there are), ``?source=`` that one only: with workers, every worker's (each
        bans what it reads), each entry naming its ``worker``; ``?local=1`` (how the workers
        ask each other): this worker's only."""
        source = _query_value(request, "source")
        view = self.control.bans_view(source)
        if self.worker is not None:
            for entry in view["bans"]:
                entry["worker"] = self.worker
        if self.peers and request.query.get("local") != "1":
            query = "" if source is None else f"&source={quote(source, safe='')}"
            answers = await self._ask_peers(f"/bans?local=1{query}",
                                            request.headers.get("Authorization"))
            view["bans"] += _gathered(answers, "bans", view)
            view["total"] += sum(int(got.get("total", 0)) for got in answers.values()
                                 if isinstance(got, dict))
            if len(view["bans"]) > MAX_BANS_SHOWN:
                del view["bans"][MAX_BANS_SHOWN:]
                view["truncated"] = True
        return _json(view)

    async def _lift_ban(self, request: web.Request) -> web.Response:
        """Lift a flood ban wherever it is held. With workers, the others are asked first
        (``?local=1``: lift yours, say whether you held it); this worker's own lift then also
        goes over the worker link, which reaches a worker that did not answer. 404 when no
        worker held it."""
        source = request.match_info["source"]
        if request.query.get("local") == "1":
            return _json({"held": self.control.lift_ban(source, tell_others=False)})
        view: dict[str, Any] = {"lifted": source}
        held: list[int] = []
        if self.peers:
            answers = await self._ask_peers(f"/bans/{quote(source, safe='/:[]')}?local=1",
                                            request.headers.get("Authorization"), "DELETE")
            missing = []
            for i, got in answers.items():
                there = got.get("held") if isinstance(got, dict) else None
                if there is True:
                    held.append(i)
                elif there is not False:
                    missing.append(i)
            if missing:
                view["workers_unanswered"] = missing
        if self.control.lift_ban(source):
            held.append(self.worker or 0)
        if not held:
            unanswered = view.get("workers_unanswered")
            raise HttpError(404, f"{source} is not banned" + (
                f" (workers {unanswered} did not answer; the lift was sent to them)"
                if unanswered else ""))
        if self.worker is not None:
            view["workers"] = sorted(held)
        return _json(view)

    async def _suspensions(self, request: web.Request) -> web.Response:
        """One page of the suspensions in key order (this process's: every worker holds
        every suspension)."""
        limit_text = request.query.get("limit")
        limit = SUSPENSIONS_PAGE
        if limit_text is not None:
            try:
                limit = int(limit_text)
            except ValueError:
                limit = 0
            if not 1 <= limit <= SUSPENSIONS_PAGE_MAX:
                raise HttpError(400, f"limit must be a whole number from 1 to "
                                     f"{SUSPENSIONS_PAGE_MAX}")
        hidden = self.control.numbers_hidden
        after = _query_value(request, "after")
        if after is not None:
            after = self._cursors.open(after) if hidden else _cursor_key(after)
        prefix = _query_value(request, "prefix")
        if prefix is not None:
            prefix = _key(prefix.strip().removesuffix("*") or "*").removesuffix("*")
        page = self.control.suspensions_page(after, limit, prefix or "")
        if page["next"] is not None and hidden:
            page["next"] = self._cursors.seal(page["next"])
        return _json(page)

    async def _suspend(self, request: web.Request) -> web.Response:
        data = await _body(request)
        unknown = set(data) - {"number", "prefix", "reason", "by", "expires", "end_calls"}
        if unknown:
            raise HttpError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        number, prefix = data.get("number"), data.get("prefix")
        if (number is None) == (prefix is None):
            raise HttpError(400, "give exactly one of number, prefix")
        text = number if number is not None else prefix
        if not isinstance(text, str):
            raise HttpError(400, "number / prefix must be a string")
        if prefix is not None and not text.strip().endswith("*"):
            text = text.strip() + "*"
        if number is not None and text.strip().endswith("*"):
            raise HttpError(400, "a pattern ending in * goes in prefix, not number")
        key = _key(text)
        expires = data.get("expires")
        if expires is not None and (
            isinstance(expires, bool) or not isinstance(expires, int | float)
            or not 0 < expires <= MAX_EXPIRES_S  # NaN and Infinity fail this too
        ):
            raise HttpError(400, "expires must be null or a positive number of seconds "
                                 f"(at most {MAX_EXPIRES_S})")
        end_calls = data.get("end_calls", False)
        if not isinstance(end_calls, bool):
            raise HttpError(400, "end_calls must be true or false")
        reason = _text(data, "reason", "")
        by = _text(data, "by", "")  # none: the entry's author stays (a new one: admin-api)
        # no "expires" at all: a suspension in force keeps its expiry (suspending again to end
        # the calls); "expires": null makes it permanent
        result = await self.control.suspend(
            key, reason, by, None if expires is None else float(expires), end_calls,
            keep_expiry="expires" not in data,
        )
        if self.control.cfg.mode == "monitor":
            # the suspension check follows the top-level mode: its next INVITEs are logged
            # (rule suspended, monitored) and forwarded; end_calls ends its calls regardless
            result["monitored"] = True
            note = ("mode: monitor: its next INVITEs are only logged (rule suspended, "
                    "monitored: true) and forwarded, not refused"
                    + ("; its calls up were ended all the same" if end_calls else ""))
            result["warning"] = f"{result['warning']}; {note}" if result.get("warning") \
                else note
        return _json(result, 201)

    async def _unsuspend(self, request: web.Request) -> web.Response:
        key = _key(request.match_info["number"])
        by = request.query.get("by", "admin-api")[:200]
        result = await self.control.unsuspend(key, by)
        if result is None:
            raise HttpError(404, f"{key} is not suspended through the API")
        return _json(result)

    # ------------------------------------------------------------------ dialer cooldowns
    async def _cooldowns(self, request: web.Request) -> web.Response:
        scope = _scope(request.query.get("scope"))
        key = _query_value(request, "key")
        if key is not None:
            key = _cooldown_key(key)
        view = self.control.cooldowns_view(scope, key)
        if self.worker is not None:
            for entry in view["cooldowns"]:
                entry["worker"] = self.worker
        shared = getattr(self.control, "shared_cooldowns", None)
        if shared is not None and request.query.get("local") != "1":
            # with Redis: the marks of other instances this process has not met
            found = await shared(scope, key)
            if found is not None:
                view["cooldowns"] += found["cooldowns"]
                if found.get("truncated"):
                    view["truncated"] = True
                if found.get("unreachable"):
                    view["shared_store"] = "unreachable"
        if self.peers and request.query.get("local") != "1":
            query = "".join(f"&{name}={quote(value, safe='')}" for name, value in
                            (("scope", scope), ("key", key)) if value is not None)
            answers = await self._ask_peers(f"/dialer/cooldowns?local=1{query}",
                                            request.headers.get("Authorization"))
            view["cooldowns"] += _gathered(answers, "cooldowns", view)
            if len(view["cooldowns"]) > MAX_COOLDOWNS_SHOWN:
                del view["cooldowns"][MAX_COOLDOWNS_SHOWN:]
                view["truncated"] = True
        return _json(view)

    async def _lift_cooldown(self, request: web.Request) -> web.Response:
        key = _cooldown_key(request.match_info["key"])
        scope = _scope(request.query.get("scope"))
        by = request.query.get("by", "admin-api")[:200]
        local = request.query.get("local") == "1"  # asked by the worker whose API took it
        try:
            reset = scopes_of(request.query.get("reset", ""))
        except ValueError as exc:
            raise HttpError(400, str(exc)) from None
        result = await self.control.lift_cooldown(key, scope, by, local, reset)
        shared = result.pop("shared_scopes", [])
        if self.worker is not None:
            for entry in result["lifted"]:
                if entry.get("where") == "local":
                    entry["worker"] = self.worker
        if local:
            return _json(result)
        if self.peers:
            query = f"?local=1&by={quote(by, safe='')}"
            if scope is not None:
                query += f"&scope={scope}"
            if shared:
                query += f"&reset={','.join(shared)}"
            answers = await self._ask_peers(
                f"/dialer/cooldowns/{quote(key, safe='')}{query}",
                request.headers.get("Authorization"), "DELETE")
            missing = []
            for i, got in answers.items():
                found = got.get("lifted") if isinstance(got, dict) else None
                if isinstance(found, list):
                    result["lifted"] += found
                    reset_there = got.get("windows_reset")
                    if isinstance(reset_there, list):
                        result["windows_reset"] = sorted(
                            {*result["windows_reset"], *map(str, reset_there)})
                else:
                    missing.append(i)
            if missing:
                result["workers_unanswered"] = missing
        self.counters["dialer_cooldowns_lifted"] += len({e["scope"] for e in result["lifted"]})
        if not result["lifted"]:
            if result.get("shared_store") == "unreachable":
                raise HttpError(503, "the shared state store did not answer: cooldowns kept "
                                     "there were not lifted; try again")
            where = f" in scope {scope}" if scope is not None else ""
            unanswered = result.get("workers_unanswered")
            raise HttpError(404, f"{key} has no dialer cooldown{where}" + (
                f" (workers {unanswered} did not answer)" if unanswered else ""))
        return _json(result)


def _cursor_key(text: str) -> str:
    """``?after=``: a key as ``next`` gives it (a number, or a prefix ending in ``*``)."""
    try:
        return suspension_key(text)
    except ValueError:
        raise HttpError(400, "after must be the next of the page before (a number, or a "
                             "prefix ending in *)") from None


class _Cursors:
    """``next`` of GET /suspensions with ``log.numbers`` masked or hashed: the key the page
    ended on, sealed with AES-GCM under a key of this process, so a page's last number is not
    shown by its cursor and a forged one is refused. A cursor from another process (a restart,
    another worker) is refused too (400: list from the start)."""

    def __init__(self) -> None:
        self._aead = AESGCM(AESGCM.generate_key(bit_length=128))

    def seal(self, key: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, key.encode(), b"suspensions-cursor")
        return "c." + base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, text: str) -> str:
        refused = HttpError(400, "after must be the next of the page before, from this "
                                 "process (log.numbers hides numbers: cursors are sealed; "
                                 "after a restart list from the start)")
        if not text.startswith("c.") or len(text) > 200:
            raise refused
        try:
            raw = base64.urlsafe_b64decode(text[2:] + "=" * (-len(text[2:]) % 4))
            return self._aead.decrypt(raw[:12], raw[12:], b"suspensions-cursor").decode()
        except (ValueError, InvalidTag):  # not base64, too short, forged, not UTF-8
            raise refused from None


def _gathered(answers: dict[int, Any], field: str, view: dict[str, Any]) -> list[Any]:
    """The ``field`` lists of the other workers' answers (:meth:`AdminEndpoint._ask_peers`),
    joined; ``view`` gets ``truncated`` when one was, and ``workers_unanswered`` naming those
    that gave no such list."""
    out: list[Any] = []
    missing = []
    for i, got in answers.items():
        found = got.get(field) if isinstance(got, dict) else None
        if isinstance(found, list):
            out += found
            if got.get("truncated"):
                view["truncated"] = True
        else:
            missing.append(i)
    if missing:
        view["workers_unanswered"] = missing
    return out


def _scope(text: str | None) -> str | None:
    try:
        return scope_of(text)
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None


def _cooldown_key(text: str) -> str:
    try:
        return cooldown_key(text)
    except ValueError as exc:
        raise HttpError(400, str(exc)) from None


def _query_value(request: web.Request, name: str) -> str | None:
    """Query parameter ``name`` from the raw query: a literal ``+`` stays a plus (not a
    space); None when absent."""
    for part in request.rel_url.raw_query_string.split("&"):
        given, _, value = part.partition("=")
        if given == name and value:
            return unquote(value)
    return None
