"""The asyncio shell around the sans-I/O proxy: sockets, the clock, one timer, logs and counters.

:class:`Server` owns the listeners, the TCP connection pool and one :class:`Proxy`. Every
received message goes to ``proxy.receive(data, flow, now)``; afterwards the shell drains the
proxy's outbox (datagrams and stream writes) and its events (log lines and counters, made here
and only here), and re-arms the single loop timer to the proxy's next deadline.

Start-up and shut-down are one async context: :meth:`Server.start` binds every listener or
raises :class:`StartupError` with one clear line; :meth:`Server.stop` closes them in reverse.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import ipaddress
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from sipguard import native
from sipguard.ops.config import Config
from sipguard.ops.logging import CallLogger, SampledLogger, flush_logs, get_logger
from sipguard.ops.metrics import Metrics, MetricsCollector
from sipguard.policy import flood
from sipguard.policy.engine import Policy
from sipguard.policy.identity import FETCHER_KEY, WALL_OFFSET_KEY
from sipguard.policy.verdict import Verdict
from sipguard.proxy.core import Proxy, ProxySettings
from sipguard.proxy.events import (
    CallInfo,
    DialogEnded,
    DialogStarted,
    Dropped,
    InviteDecided,
    ParseFailed,
)
from sipguard.proxy.flows import Flow, Local
from sipguard.sip.errors import SipParseError
from sipguard.transport.https_fetch import HttpsFetcher
from sipguard.transport.tcp import TcpPool
from sipguard.transport.udp import UdpEndpoint, open_udp

GC_INTERVAL_S = 60.0  # how often the cyclic garbage collector runs (see cli.py)
LOAD_WATCH_S = 0.05  # how often the UDP receive queues are read (overload protection)


class StartupError(Exception):
    """sipguard cannot start (a port in use, an address not on this host, ...)."""


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _primary_address(toward: str) -> str:
    """The local address the kernel would use to reach ``toward`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in toward else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((toward, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1" if family == socket.AF_INET else "::1"


def proxy_settings(cfg: Config) -> ProxySettings:
    """Translate the config file into what the sans-I/O core needs."""
    sip = cfg.sip
    adv_host: str | None = None
    adv_port: int | None = None
    if sip.advertise:
        text = sip.advertise
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            adv_host, adv_port = host, int(rest[1:]) if rest.startswith(":") else None
        else:
            host, _, port = text.partition(":")
            adv_host, adv_port = host, int(port) if port else None
    locals_ = []
    for i, ep in enumerate(cfg.listen):
        host = adv_host or (_primary_address(cfg.core.host) if _unspecified(ep.host) else ep.host)
        locals_.append(Local(i, ep.transport, host, adv_port or ep.port))
    core = cfg.core
    core_local = next((loc.index for loc in locals_ if loc.transport == core.transport), 0)
    return ProxySettings(
        locals=tuple(locals_),
        core=Flow(core.transport, (core.host, core.port), core_local),
        max_message_size=sip.max_message_size,
        max_dialog_lifetime=sip.max_dialog_lifetime_s,
        answer_options=sip.answer_options,
        record_route=sip.record_route,
        t1=sip.t1_ms / 1000,
        t2=sip.t2_ms / 1000,
        t4=sip.t4_ms / 1000,
        timer_c=sip.timer_c_s,
    )


class Server:
    """One running sipguard: listeners + proxy + observability."""

    def __init__(self, cfg: Config, policy: Policy | None = None) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.shared: dict[str, Any] = {}  # rule state that outlives reloads
        self.policy = policy or Policy(cfg, self.shared)
        self.shared = self.policy.ctx.shared
        # identity rule: Unix time = loop time + wall_offset; certificate fetches over HTTPS
        self.shared[WALL_OFFSET_KEY] = time.time() - self.loop.time()
        self.shared.setdefault(FETCHER_KEY, HttpsFetcher(clock=self.loop.time))
        self.proxy = Proxy(proxy_settings(cfg), self._decide, os.urandom(32))
        self.flood = self._flood_guard(cfg, self.policy)
        self.udp: dict[int, UdpEndpoint] = {}
        self.tcp = TcpPool(self.loop, self._on_stream_message, self._on_stream_error,
                           cfg.sip.max_message_size)
        self.metrics = Metrics()
        self.metrics.config_loaded = time.time()
        self.counters: Counter[str] = self.metrics.events  # every counter is exported too
        self._metrics_runner: web.AppRunner | None = None
        self.log = get_logger("sipguard")
        self.call_log = CallLogger("sipguard")
        sample = cfg.log.parse_error_sample_s
        self.sampled = SampledLogger(self.log, sample, clock=self.loop.time)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_pending = False
        self._housekeeping: asyncio.TimerHandle | None = None
        self._log_flusher: asyncio.TimerHandle | None = None
        self._gc_timer: asyncio.TimerHandle | None = None
        self._load_watch: asyncio.TimerHandle | None = None
        self.overloaded = False  # new calls get 503 while a UDP receive queue is too full
        self.queue_fill = 0.0  # the fullest UDP receive queue, share of its buffer
        self._udp_drops = 0  # the kernel's drop count at the last look
        self._overload_verdict = overload_verdict(cfg)
        self._resolved: dict[str, str] = {}
        self._decisions: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        for i, ep in enumerate(self.cfg.listen):
            try:
                if ep.transport == "udp":
                    udp = self.udp[i] = await open_udp(
                        self.loop, ep.host, ep.port, i, self._on_datagram,
                        self.cfg.sip.udp_receive_buffer,
                    )
                    if udp.receive_buffer < self.cfg.sip.udp_receive_buffer:
                        self.log.warning(
                            "udp_receive_buffer_capped", listen=str(ep),
                            wanted=self.cfg.sip.udp_receive_buffer, got=udp.receive_buffer // 2,
                            fix="raise net.core.rmem_max (sysctl) or run with CAP_NET_ADMIN",
                        )
                else:
                    await self.tcp.listen(ep.host, ep.port, i)
            except OSError as exc:
                await self.stop()
                raise StartupError(f"cannot listen on {ep}: {exc.strerror or exc}") from None
        if self.cfg.metrics.host_port is not None:
            try:
                await self._start_metrics(*self.cfg.metrics.host_port)
            except OSError as exc:
                await self.stop()
                raise StartupError(
                    f"cannot serve metrics on {self.cfg.metrics.listen}: {exc.strerror or exc}"
                ) from None
        self._housekeeping = self.loop.call_later(10.0, self._housekeep)
        self._log_flusher = self.loop.call_later(0.1, self._flush_logs)
        self._gc_timer = self.loop.call_later(GC_INTERVAL_S, self.collect_garbage)
        self._load_watch = self.loop.call_later(LOAD_WATCH_S, self._watch_load)
        compiled, stale = native.status()
        self.log.info(
            "sipguard_started",
            listen=[str(ep) for ep in self.cfg.listen],
            core=str(self.cfg.core),
            mode=self.cfg.mode,
            peers=len(self.policy.peers.peers),
            rules=[r.name for r in self.policy.rules],
            compiled=len(compiled) == len(native.HOT_MODULES),
        )
        if stale:
            self.log.warning("compiled_modules_stale", modules=stale,
                             fix="run `make` or `python -m sipguard.native build`")

    async def _start_metrics(self, host: str, port: int) -> None:
        """GET /metrics (Prometheus text format) and /healthz, served on the event loop."""
        registry = CollectorRegistry()
        registry.register(MetricsCollector(self.metrics, self._gauges))

        async def metrics(request: web.Request) -> web.Response:
            body = generate_latest(registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError:
            await runner.cleanup()
            raise
        self._metrics_runner = runner

    def _gauges(self) -> dict[str, float]:
        proxy = self.proxy
        return {
            "live_dialogs": proxy.live_dialogs(),
            "server_transactions": len(proxy.servers),
            "client_transactions": len(proxy.clients),
            "tcp_connections": len(self.tcp.by_id),
            "udp_receive_queue_ratio": self.queue_fill,
            "overloaded": float(self.overloaded),
        }

    def _watch_load(self) -> None:
        """Overload protection, every 50 ms: how full the UDP receive queues are.

        A queue that fills means sipguard reads datagrams slower than they come. Past
        ``sip.overload_shed_above`` new calls are answered 503 + Retry-After straight away (no
        rules, no dialog, nothing sent to the core), which costs a fraction of a call, so the
        calls already up keep getting their ACKs, BYEs and answers through instead of losing
        them to kernel drops. It ends when every queue is below ``overload_resume_below``.
        The kernel's drops are counted as ``udp_receive_dropped``.
        """
        fill = 0.0
        drops = 0
        for ep in self.udp.values():
            state = ep.receive_queue()
            if state is not None:
                fill = max(fill, state[0])
                drops += state[1]
        self.queue_fill = fill
        if drops > self._udp_drops:
            self.counters["udp_receive_dropped"] += drops - self._udp_drops
        self._udp_drops = drops
        sip = self.cfg.sip
        shed = sip.overload_shed_above
        if not self.overloaded and shed is not None and fill > shed:
            self.overloaded = True
            self.counters["overload_started"] += 1
            self.log.warning("overload_started", queue_ratio=round(fill, 3),
                             udp_receive_dropped=self.counters["udp_receive_dropped"])
        elif self.overloaded and (shed is None or fill < sip.overload_resume_below):
            self.overloaded = False
            self.log.info("overload_ended", queue_ratio=round(fill, 3),
                          rejected=self.counters["overload_rejected"])
        self._load_watch = self.loop.call_later(LOAD_WATCH_S, self._watch_load)

    def collect_garbage(self) -> None:
        """Run the cyclic garbage collector (disabled for automatic runs by the CLI): only
        leftovers of rare cycles (exceptions, tasks) are found; counted as ``gc_collected``."""
        found = gc.collect()
        if found:
            self.counters["gc_collected"] += found
        self._gc_timer = self.loop.call_later(GC_INTERVAL_S, self.collect_garbage)

    def _flush_logs(self) -> None:
        flush_logs()
        self._log_flusher = self.loop.call_later(0.1, self._flush_logs)

    async def stop(self) -> None:
        if self._gc_timer is not None:
            self._gc_timer.cancel()
        if self._load_watch is not None:
            self._load_watch.cancel()
        if self._log_flusher is not None:
            self._log_flusher.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        fetcher = self.shared.get(FETCHER_KEY)
        if isinstance(fetcher, HttpsFetcher):
            await fetcher.close()
        await self.tcp.close()
        for ep in self.udp.values():
            if ep.transport is not None:
                ep.transport.close()
        self.udp.clear()

    def reconfigure(self, cfg: Config, policy: Policy) -> None:
        """Swap in a new config and policy; transactions, dialogs and counters carry on."""
        self.cfg = cfg
        self._overload_verdict = overload_verdict(cfg)
        previous, self.policy = self.policy, policy
        self.proxy.configure(proxy_settings(cfg))
        self.flood = self._flood_guard(cfg, policy)
        # A rule turned on by this reload starts from the calls that are up now.
        self._run_later(policy.adopt(previous, self.proxy.dialogs.values(), self.loop.time()))

    def _run_later(self, pending: list[Awaitable[None]]) -> None:
        """Run what the policy could not do at once (a remote state backend) as tasks."""
        for aw in pending:
            task = self.loop.create_task(self._settle(aw))
            self._decisions.add(task)
            task.add_done_callback(self._decisions.discard)

    async def _settle(self, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception:
            self.counters["internal_errors"] += 1
            self.log.exception("policy_update_failed")

    def _flood_guard(self, cfg: Config, policy: Policy) -> flood.FloodGuard | None:
        """The pre-parse flood and scanner check (rule ``flood``); bans live in ``shared``."""
        peers = policy.peers
        return flood.guard(
            cfg.rules.flood, cfg.mode, self.shared, peers,
            [(peers.peers[pc.name], pc.rules.flood) for pc in cfg.peers],
            trusted=((cfg.core.host, cfg.core.port),),
        )

    async def reload(self, cfg: Config) -> None:
        """Build the new policy off the event loop (big number lists), then swap it in."""
        policy = await asyncio.to_thread(Policy, cfg, self.shared)
        self.reconfigure(cfg, policy)

    # ------------------------------------------------------------------ input
    def _on_datagram(self, data: bytes, addr: tuple[str, int], local: int) -> None:
        guard = self.flood
        if guard is not None and (why := guard.check(addr, data, self.loop.time())) and (
            self._flooded(why, addr)
        ):
            return
        if len(data) <= 4 and not data.strip(b"\r\n"):
            return  # CRLF keep-alive over UDP
        self._receive(data, Flow("udp", addr, local))

    def _on_stream_message(self, data: bytes, addr: tuple[str, int], local: int, conn: int) -> None:
        guard = self.flood
        if guard is not None and (why := guard.check(addr, data, self.loop.time())) and (
            self._flooded(why, addr)
        ):
            return
        self._receive(data, Flow("tcp", addr, local, conn))

    def _flooded(self, why: str, addr: tuple[str, int]) -> bool:
        """Count (and for a new ban, log) a message the flood guard objects to; True to drop."""
        guard = self.flood
        assert guard is not None
        self.counters[f"flood_{'monitored' if guard.monitor else 'dropped'}_{why}"] += 1
        if why == flood.FLOOD or (why == flood.SCANNER and guard.banned(addr)):
            self.counters[f"flood_banned_{why}"] += 1
            key = addr[0] if guard.by_ip else f"{addr[0]}:{addr[1]}"
            self.sampled.log("warning", "source_banned", key=f"ban:{key}", source=addr[0],
                             port=addr[1], reason=why, ban_s=guard.ban_s,
                             monitored=guard.monitor or None)
        return not guard.monitor

    def _on_stream_error(self, err: SipParseError, addr: tuple[str, int], local: int) -> None:
        self.counters["parse_errors"] += 1
        self.sampled.log("warning", "stream_closed", key=f"stream:{addr[0]}", source=addr[0],
                         status=err.status, detail=err.detail)

    def _receive(self, data: bytes, flow: Flow) -> None:
        proxy = self.proxy
        try:
            proxy.receive(data, flow, self.loop.time())
        except Exception:  # a bug must cost one message, never the process
            self.counters["internal_errors"] += 1
            self.log.exception("message_failed", source=flow.addr[0], size=len(data))
            proxy.outbox.clear()
        # Sends wait for the end of this event-loop pass: the datagrams read in one pass are
        # all processed first, then their answers go out back to back. A peer woken by the
        # first datagram is still awake for the next, so one wake-up serves several sends —
        # under load that is a large part of the CPU a send costs. The wait is bounded by one
        # pass (at most a few dozen datagrams).
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _decide(self, call: CallInfo, now: float) -> Verdict | None:
        if self.overloaded:
            self.counters["overload_rejected"] += 1
            return self._overload_verdict
        started = time.perf_counter()
        verdict = self.policy.decide(call, now)
        if isinstance(verdict, Verdict):
            elapsed = time.perf_counter() - started
            call.decision_us = elapsed * 1e6
            self.metrics.decision(elapsed)
            return verdict
        # A rule needs I/O: the INVITE waits in its server transaction (retransmissions are
        # absorbed) until the verdict arrives.
        task = self.loop.create_task(self._decide_later(call, verdict, started))
        self._decisions.add(task)
        task.add_done_callback(self._decisions.discard)
        return None

    async def _decide_later(
        self, call: CallInfo, pending: Awaitable[Verdict], started: float
    ) -> None:
        try:
            verdict = await pending
        except Exception:
            self.counters["internal_errors"] += 1
            self.log.exception("decision_failed", call_id=call.call_id)
            verdict = Verdict("reject", rule="internal", reason="decision_failed", status=500)
        elapsed = time.perf_counter() - started
        call.decision_us = elapsed * 1e6
        self.metrics.decision(elapsed)
        self.proxy.resolve(call, verdict, self.loop.time())
        self._flush()

    # ------------------------------------------------------------------ output
    def _flush(self) -> None:
        self._flush_pending = False
        proxy = self.proxy
        if proxy.outbox:
            for flow, data in proxy.outbox:
                self._send(flow, data)
            proxy.outbox.clear()
        if proxy.events:
            events = proxy.events
            proxy.events = []
            for event in events:
                self._observe(event)
        deadline = proxy.next_deadline()
        if deadline is not None and (self._timer_at is None or deadline < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.proxy.handle_timer(self.loop.time())
        except Exception:
            self.counters["internal_errors"] += 1
            self.log.exception("timer_failed")
            self.proxy.outbox.clear()
        self._flush()

    def _send(self, flow: Flow, data: bytes) -> None:
        host = flow.addr[0]
        ip = self._resolved.get(host)
        if ip is None:
            if not _is_ip(host):
                self.loop.create_task(self._resolve_and_send(flow, data))
                return
            if len(self._resolved) > 65536:
                self._resolved.clear()
            self._resolved[host] = ip = host
        if ip != host:
            flow = flow._replace(addr=(ip, flow.addr[1]))
        if flow.transport == "udp":
            ep = self.udp.get(flow.local) or next(iter(self.udp.values()), None)
            if ep is None:
                self.counters["send_failed"] += 1
                return
            ep.send(data, flow.addr)
        else:
            self.tcp.send(data, flow.addr, flow.local, flow.conn)

    async def _resolve_and_send(self, flow: Flow, data: bytes) -> None:
        host = flow.addr[0]
        try:
            infos = await self.loop.getaddrinfo(host, flow.addr[1], type=socket.SOCK_DGRAM)
        except OSError as exc:
            self.counters["send_failed"] += 1
            self.sampled.log("warning", "resolve_failed", key=f"dns:{host}", host=host,
                             error=str(exc))
            return
        addr = str(infos[0][4][0])
        self._resolved[host] = addr
        self._send(flow._replace(addr=(addr, flow.addr[1])), data)

    def _housekeep(self) -> None:
        self.tcp.close_idle(self.cfg.sip.tcp_idle_timeout_s)
        self._resolved.clear()  # re-resolve names now and then (no TTLs from getaddrinfo)
        if self.flood is not None:
            self.flood.state.sweep(self.loop.time())
        self.shared[WALL_OFFSET_KEY] = time.time() - self.loop.time()  # follow NTP steps
        self._housekeeping = self.loop.call_later(10.0, self._housekeep)

    # ------------------------------------------------------------------ observability
    def _observe(self, event: Any) -> None:
        """Turn a core event into a log line and counters (the one place that does)."""
        c = self.counters
        if isinstance(event, InviteDecided):
            call, v = event.call, event.verdict
            c[f"invites_{v.action}"] += 1
            verdict = "monitored" if v.monitored else v.action
            self.metrics.invites[(verdict, v.rule, call.peer or "")] += 1
            for label, value in call.labels.items():
                c[f"{label}_{value}"] += 1
            if v.monitored:
                c["invites_monitored"] += 1
            if v.reason:
                c[f"rule_{v.rule}_{v.reason}"] += 1
            emit: Callable[..., Any] = self.call_log.info
            if v.sample:  # a verdict that comes in floods: one line per key and interval
                emit = functools.partial(self.sampled.log, "info", key=v.sample)
            emit(
                "invite_decided",
                call_id=call.call_id,
                source=f"{call.flow.addr[0]}:{call.flow.addr[1]}",
                transport=call.flow.transport,
                peer=call.peer,
                caller=call.caller,
                callee=call.callee,
                diverters=list(call.diverters) or None,
                verdict=v.action,
                monitored=v.monitored or None,
                rule=v.rule or None,
                reason=v.reason or None,
                status=v.status or None,
                detail=dict(v.detail) if v.detail else None,
                decision_us=round(call.decision_us, 1),
                **call.labels,
            )
        elif isinstance(event, DialogStarted):
            c["dialogs_started"] += 1
            self._run_later(self.policy.dialog_started(event.dialog, self.loop.time()))
        elif isinstance(event, DialogEnded):
            d = event.dialog
            c["dialogs_ended"] += 1
            c[f"dialogs_ended_{event.reason}"] += 1
            self.metrics.ended[(event.reason, d.peer or "")] += 1
            self._run_later(self.policy.dialog_ended(d, self.loop.time()))
            end = d.ended_at or d.started
            self.call_log.info(
                "dialog_ended",
                call_id=d.call_id,
                caller=d.caller,
                callee=d.callee,
                peer=d.peer,
                reason=event.reason,
                duration_s=round(end - (d.confirmed_at or end), 3),
                lifetime_s=round(end - d.started, 3),
            )
        elif isinstance(event, ParseFailed):
            c["parse_errors"] += 1
            self.sampled.log(
                "warning",
                "parse_error",
                key=f"parse:{event.flow.addr[0]}:{event.status}",
                source=event.flow.addr[0],
                status=event.status,
                detail=event.detail,
                answered=event.answered,
            )
        elif isinstance(event, Dropped):
            c[f"dropped_{event.kind}"] += 1
            self.sampled.log(
                "info",
                "message_dropped",
                key=f"drop:{event.kind}",
                kind=event.kind,
                source=event.flow.addr[0],
                detail=event.detail,
            )


def overload_verdict(cfg: Config) -> Verdict:
    """The answer to a new call while sipguard is overloaded: 503 with Retry-After (RFC 3261
    §21.5.4), its log line sampled."""
    return Verdict(
        "reject", rule="overload", reason="overloaded", status=503,
        phrase="Service Unavailable",
        headers=(f"Retry-After: {cfg.sip.overload_retry_after_s}",), sample="overload",
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True

