"""The asyncio shell around the edge core: sockets, the clock, one timer, sends, lifecycle.

:class:`Server` owns the listeners, the TCP connection pool and one
:class:`~sipguard.edge.EdgeCore`. Every received message goes to ``core.receive(data, flow,
now)``; at the end of the event-loop pass the shell sends what the core put in its outbox,
hands the core's events to the :class:`~sipguard.ops.observe.Observer` (log lines, counters)
and runs the work some events ask for (a decision or state update that needs I/O, finished
through ``core.resolve``), and re-arms the single loop timer to the core's next deadline. The
shell never decides anything and never changes policy state.

Start-up and shut-down are one async context: :meth:`Server.start` binds every listener or
raises :class:`StartupError` with one clear line; :meth:`Server.stop` closes them in reverse.
The HTTP admin API is :mod:`sipguard.ops.admin` (this class implements its ``Control``: one
reload path for SIGHUP, ``sipguard reload`` and ``POST /reload``; live calls; bans;
suspensions, kept in ``state_dir``), overload protection :mod:`sipguard.ops.overload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from sipguard import native
from sipguard.contract import CallInfo, DecisionPending, Deferred, Dialog, Flow, Local, Verdict
from sipguard.edge import DECISION_FAILED, EdgeCore
from sipguard.ops.admin import (
    MAX_BANS_SHOWN,
    MAX_CALLS_SHOWN,
    AdminEndpoint,
    admin_token,
    read_token,
)
from sipguard.ops.calllog import CallLogger
from sipguard.ops.collector import YOUNG_EVERY_S, Collector
from sipguard.ops.config import Config, StateSettings
from sipguard.ops.config_load import ConfigError, ConfigIssue, region_advice
from sipguard.ops.cooldowns import DialerCooldowns, dialer_windows
from sipguard.ops.endpoints import split_hostport
from sipguard.ops.logging import Level, SampledLogger, flush_logs, get_logger, log_writer
from sipguard.ops.metrics import Metrics
from sipguard.ops.observe import Observer
from sipguard.ops.overload import OverloadWatcher, ReceiveQueue
from sipguard.ops.privacy import NumberPrivacy, number_privacy
from sipguard.ops.reload import ReloadResult, changed_keys, failure, held_back
from sipguard.ops.shared_lists import SharedLists
from sipguard.ops.suspension_file import StateFileError, SuspensionFile
from sipguard.policy.engine import Policy
from sipguard.policy.peers import NumberSet
from sipguard.policy.state import RuleState
from sipguard.policy.suspensions import (
    Suspension,
    SuspensionStore,
    dump_entry,
    suspension_key,
)
from sipguard.proxy.core import MAX_FORMER_CORES, Proxy
from sipguard.proxy.routing import local_for, remember
from sipguard.proxy.settings import ProxySettings
from sipguard.sip.errors import SipParseError
from sipguard.sip.parser import ParseLimits
from sipguard.state.shared_memory import ShmCounts, create_segment
from sipguard.supervisor import SEGMENT_NAME, group_base
from sipguard.transport.http_get import JsonGetter
from sipguard.transport.https_fetch import HttpsFetcher
from sipguard.transport.redis_client import Where, connect
from sipguard.transport.redis_pipe import RespPipe
from sipguard.transport.redis_state import SharedStore
from sipguard.transport.tcp import TcpLimits, TcpPool, listen_overflows
from sipguard.transport.tls import TlsContexts, build_contexts
from sipguard.transport.udp import SendThread, UdpEndpoint, open_udp
from sipguard.transport.worker_link import WorkerLink, opens_call
from sipguard.verify_threads import SignatureVerifier

LOAD_WATCH_S = 0.05  # how often the UDP receive queues are read (overload protection)
# The event loop's busy share (its thread's CPU time over the wall time, per LOAD_WATCH_S) from
# which the work a thread can take off it — signature checks (rules.identity.verify_threads
# auto), UDP sends (sip.udp_send_thread auto) — goes to those threads, and below which it comes
# back. A hand-over costs CPU of its own (waking a thread, and its answer waking the loop),
# worth paying only when the loop's time is what limits the rate.
OFFLOAD_ABOVE = 0.7
OFFLOAD_BELOW = 0.5
# Sends wait for the end of the event-loop pass, or for this many datagrams read in it, which
# comes first: see Server._schedule_flush.
FLUSH_EVERY = 8
# Sends to a host name wait for one lookup per name: at most this many names at once, this
# many messages per name; a name that did not resolve is not looked up again for this long.
MAX_RESOLVING = 256
MAX_WAITING_PER_NAME = 64
UNRESOLVED_S = 30.0
# number lists a reload replaced are emptied (off the loop) this long after it
RETIRED_LISTS_AFTER_S = 60.0
# a suspension's end_calls: this many calls ended per pass of the loop, the passes this far apart
END_CALLS_BATCH = 500
END_CALLS_PAUSE_S = 0.01
REDACTED = "<redacted>"


def _glibc_malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library).

    Freed memory between live blocks stays in the process's RSS under glibc: after a burst of
    large messages (300 INVITEs of 60 KB: 100 MB) nothing is leaked, the next burst reuses it,
    yet RSS stays up until ``malloc_trim(0)`` returns the free pages (8 ms then, 40 us when
    there is nothing to return). But on the fragmented heap of a busy process it walks every
    free chunk: 40–50 ms with a few hundred MB, a stall that at 1,000 calls/s fills the UDP
    queue past the overload mark. So the housekeeping tick calls it only when the calls and
    transactions held have fallen to half their peak since the last trim (the memory of a
    burst or an attack is free now), not every tick under steady load.
    """
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


# a socket to bind: (local index, transport, host, port, shared (SO_REUSEPORT), what it is)
_Socket = tuple[int, str, str, int, bool, str]


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


async def _read_token(path: str) -> str:
    """The admin token in ``path``, read off the loop; ValueError saying why it cannot be
    (an OSError's own words: "No such file or directory")."""
    try:
        return await asyncio.to_thread(read_token, path)
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None


def proxy_settings(cfg: Config, worker: int | None = None) -> ProxySettings:
    """Translate the config file into what the sans-I/O core needs.

    ``worker``: this process is worker ``worker`` of several (``workers``). Listener ``i``
    then advertises the worker's own port (``Config.worker_port``) in Via and Record-Route,
    and the shared public socket of listener ``i`` is one more local at position
    ``len(listen) + i``, advertising the same: a request that came in there is recorded and
    answered as listener ``i``'s, and the shell answers it from the socket it came on.
    """
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
        own = adv_port or ep.port if worker is None else cfg.worker_port(i, worker)
        locals_.append(Local(i, ep.transport, host, own, 6 if ":" in ep.host else 4))
    if worker is not None:
        locals_ += [Local(loc.index, loc.transport, loc.host, loc.port, loc.family)
                    for loc in locals_]
    core = cfg.core
    core_local = local_for(locals_, core.transport, core.host).index
    return ProxySettings(
        locals=tuple(locals_),
        core=Flow(core.transport, (core.host, core.port), core_local),
        max_message_size=sip.max_message_size,
        parse_limits=ParseLimits(
            max_headers=sip.max_headers,
            max_header_line=sip.max_header_line,
            max_continuation_lines=sip.max_continuation_lines,
            max_list_entries=sip.max_list_entries,
            max_header_params=sip.max_header_params,
        ),
        max_dialog_lifetime=sip.max_dialog_lifetime_s,
        answer_options=sip.answer_options,
        record_route=sip.record_route,
        t1=sip.t1_ms / 1000,
        t2=sip.t2_ms / 1000,
        t4=sip.t4_ms / 1000,
        timer_c=sip.timer_c_s,
        allow_methods=frozenset(m.upper() if m != "*" else m for m in sip.allow_methods),
        strip_headers=owned_headers(cfg),
        max_transactions=sip.max_transactions,
        max_dialogs=sip.max_dialogs,
        max_transaction_bytes=sip.max_transaction_bytes_mib << 20,
        max_dialog_bytes=sip.max_dialog_bytes_mib << 20,
        max_call_request_bytes=sip.max_call_request_kib << 10,
        max_subscriptions=sip.max_subscriptions,
        busy_retry_after_s=sip.overload_retry_after_s,
        dialog_keepalive=sip.dialog_keepalive_s,
        core_tcp_any_port=sip.core_tcp_any_port,
        relay_core_503=sip.relay_core_503,
    )


def owned_headers(cfg: Config) -> frozenset[str]:
    """Header names (lower case) only sipguard may put on a request: the default verdict
    headers, every verdict / identity header name the rules are configured with (peer
    overrides included), ``sip.strip_headers`` and, with ``sip.unchecked_identity: strip``,
    Remote-Party-ID and P-Preferred-Identity. Removed from every request from outside."""
    names = {"x-sipguard-verdict", "x-sipguard-identity"}
    for rules in (cfg.rules, *(pc.rules for pc in cfg.peers)):
        for rule in (rules.callerid, rules.dialer, rules.national_cli):
            if rule is not None and rule.verdict_header:
                names.add(rule.verdict_header.lower())
        if rules.identity is not None and rules.identity.identity_header:
            names.add(rules.identity.identity_header.lower())
    names.update(h.lower() for h in cfg.sip.strip_headers)
    if cfg.sip.unchecked_identity == "strip":
        names.update(("remote-party-id", "p-preferred-identity"))
    return frozenset(names)



def shared_store(settings: StateSettings, counters: Counter[str], log: Any) -> SharedStore:
    """The Redis-backed store of the ``state:`` section (connections open on first use)."""
    sentinel = settings.sentinel
    where = Where(
        url=settings.url, cluster=settings.cluster,
        sentinel_master=sentinel.master if sentinel is not None else None,
        sentinel_nodes=tuple(_node(n) for n in sentinel.nodes) if sentinel is not None else (),
        timeout_s=settings.timeout_ms / 1000,
    )

    def note(event: str, **fields: Any) -> None:
        level = "info" if event == "state_reachable" else "warning"
        getattr(log, level)(event, backend="redis", **fields)

    pipe = None
    if settings.url is not None and not settings.cluster:
        pipe = RespPipe(settings.url.replace("valkey", "redis", 1),
                        connect_timeout_s=max(0.25, settings.timeout_ms / 1000 * 4))
    return SharedStore(
        connect(where), pipe=pipe, prefix=settings.key_prefix, cluster=settings.cluster,
        timeout_s=settings.timeout_ms / 1000, lease_s=settings.lease_s,
        fail_open=settings.fail == "open", retry_after_s=settings.retry_after_s,
        breaker_failures=settings.breaker_failures,
        max_pending=settings.max_pending_releases, counters=counters, log=note,
    )


def _node(text: str) -> tuple[str, int]:
    host, port = split_hostport(text, True)
    return host.strip("[]"), int(port or 26379)

class Server:
    """One running sipguard: listeners + edge core + observability."""

    def __init__(
        self,
        cfg: Config,
        policy: Policy | None = None,
        load: Callable[[], Config] | None = None,
        worker: int | None = None,
        group: str | None = None,
        config_file: str = "",
    ) -> None:
        self.cfg = cfg
        # the file ``load`` reads, named in a refused reload's errors ("" when none)
        self.config_file = config_file
        # the directory the supervisor made for this host's workers: the shared-memory state
        # segment, the hand-over's secret and port files (None: one process, no supervisor)
        self.group = group
        # reads the config file anew for a reload (None: nothing to reload from)
        self.load = load
        # worker ``worker`` of ``cfg.workers`` (None: the only process): listener i is its
        # own port, the shared public socket of listener i is local len(listen) + i
        self.worker = worker
        self._shared_from = len(cfg.listen) if worker is not None else 1 << 30
        self.loop = asyncio.get_running_loop()
        # The rules' state, made once and kept across reloads. Identity: Unix time = loop
        # time + wall_offset; certificates fetched over HTTPS.
        self.state = policy.state if policy is not None else RuleState()
        self.metrics = Metrics()
        self.counters: Counter[str] = self.metrics.events  # every counter is exported too
        self.log = get_logger("sipguard")
        # state.backend redis / shared_memory: the counts every instance or worker shares
        # (None: all in this process)
        self.shared_store: SharedStore | ShmCounts | None = None
        # the shared-memory segment this process made (one process, no supervisor)
        self._own_segment: str | None = None
        if cfg.state.backend == "redis" and self.state.shared is None:
            self.shared_store = shared_store(cfg.state, self.counters, self.log)
        elif cfg.state.backend == "shared_memory" and self.state.shared is None:
            self.shared_store = self._shm_store(cfg.state)
        if self.shared_store is not None:
            self.state.shared = self.shared_store
            self.state.tracker.share(self.shared_store)
        self.state.wall_offset = time.time() - self.loop.time()
        self.state.pause = let_loop_run  # reloads build number lists in a thread
        if self.state.fetcher is None:
            self.state.fetcher = HttpsFetcher(clock=self.loop.time)
        if self.state.http is None:  # national_cli: roaming lookups
            self.state.http = JsonGetter()
        # identity: ES256 checks on threads beside the loop (sized when the policy activates)
        self.verifier = SignatureVerifier(self.loop, self.counters)
        self.state.verifier = self.verifier
        policy = policy or Policy(cfg, self.state, _trusted(cfg))
        self.core = EdgeCore(proxy_settings(cfg, worker), policy, os.urandom(32),
                             overload_retry_after_s=cfg.sip.overload_retry_after_s,
                             perf=time.perf_counter)
        self.udp: dict[int, UdpEndpoint] = {}
        # several workers: the link between them — the operator's changes (either spread),
        # and with worker_spread: caller the datagrams handed to the caller's worker
        # (``handover``: the same link then, else None)
        self.link: WorkerLink | None = None
        self.handover: WorkerLink | None = None
        if worker is not None and group is not None:
            own_ports = {cfg.worker_port(i, w): w for i, ep in enumerate(cfg.listen)
                         if ep.transport == "udp" for w in range(cfg.workers)}
            by_caller = cfg.worker_spread == "caller"
            self.link = WorkerLink(group, worker, cfg.workers, self._on_handed_over,
                                   self.counters, own_ports, handover=by_caller)
            if by_caller:
                self.link.watch = self._check_load
                self.handover = self.link
        self.sender = SendThread()  # sip.udp_send_thread: started once the sockets are bound
        self.tcp = TcpPool(self.loop, self._on_stream_message, self._on_stream_error,
                           cfg.sip.max_message_size, tcp_limits(cfg), self._on_tcp_event)
        self.tcp.watch = self._check_load
        self.tcp.undelivered = self._undelivered
        self.tcp.is_peer = self._is_peer_address  # connections kept for the trunks
        self.state.tls_names = self._tls_names  # peers matched by their TLS certificate
        self.metrics.config_loaded = time.time()
        sample = cfg.log.parse_error_sample_s
        self.sampled = SampledLogger(self.log, sample, clock=self.loop.time)
        self.observer = Observer(self.metrics, self.log, CallLogger("sipguard"), self.sampled)
        self.observer.flood = policy.flood
        self.privacy: NumberPrivacy | None = number_privacy(cfg.log.numbers,
                                                            cfg.log.hash_key_file)
        self.observer.privacy = self.privacy
        # the dialer's cooldowns for the admin API (GET / DELETE /dialer/cooldowns)
        self.cooldowns = DialerCooldowns(lambda: self.state.dialer, self.loop.time,
                                         lambda: self.state.wall_offset, self._shown, self.log)
        self.overload = OverloadWatcher(self.counters, self.log)
        self.http: AdminEndpoint | None = None
        self.listening = False  # every listener is up (GET /readyz)
        self._reload_lock = asyncio.Lock()  # one reload at a time, whoever asked
        # several workers: asks the supervisor to reload the others (cli sets it)
        self.reload_others: Callable[[], None] | None = None
        self._save_lock = asyncio.Lock()  # one suspensions file write at a time
        state_dir = self.cfg.state_dir  # (a restart key: a reload never changes it)
        self._suspension_file = None if state_dir is None else SuspensionFile(Path(state_dir))
        self._journal_pending: list[dict[str, Any]] = []  # changes not yet written
        self._save_asked = 0  # save_suspensions calls so far
        self._saved_upto = 0  # the calls the last write covered, and its result
        self._save_ok = True
        # state.backend redis: suspensions and flood bans kept equal on every instance
        self.shared_lists: SharedLists | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_pending = False
        self._unflushed = 0  # datagrams read since the last flush
        self._housekeeping: asyncio.TimerHandle | None = None
        self._trim_peak = 0  # most calls + transactions held since the last malloc_trim
        self.collector = Collector(self.counters, self.loop.time())  # see ops/collector.py
        self._log_flusher: asyncio.TimerHandle | None = None
        self._gc_timer: asyncio.TimerHandle | None = None
        self._load_watch: asyncio.TimerHandle | None = None
        # the event loop's busy share: its thread's CPU time over the wall time, per
        # LOAD_WATCH_S (gauge event_loop_busy_ratio), and whether the threads take what they
        # can off it (OFFLOAD_ABOVE / OFFLOAD_BELOW)
        self.loop_busy = 0.0
        self.offload = False
        self._busy_at = self.loop.time()
        self._busy_cpu = time.thread_time()
        self._resolved: dict[str, str] = {}
        self._resolving: dict[str, list[tuple[Flow, bytes]]] = {}  # name -> sends waiting
        self._unresolved: dict[str, float] = {}  # name -> until when it is not looked up
        self._tasks: set[asyncio.Task[None]] = set()
        self._reloads = 0  # reloads started; only the newest one's result is swapped in
        # the cores reloads replaced (at most MAX_FORMER_CORES): still trusted by the flood guard
        self._former_cores: dict[tuple[str, int], None] = {}

    def _point_link(self) -> None:
        """The hand-over's envelopes go through the send thread too, when it runs."""
        if self.link is not None:
            self.link.sender = self.sender.queue if self.sender.active else None

    def _shm_store(self, settings: StateSettings) -> ShmCounts:
        """``state.backend: shared_memory``: the segment the supervisor made for its workers,
        or (one process) a segment of this process's own, removed at stop."""
        if self.group is not None:
            path = os.path.join(self.group, SEGMENT_NAME)
        else:
            path = os.path.join(group_base(), f"sipguard-{os.getpid()}.state")
            create_segment(path, settings.max_keys, settings.max_leases, settings.max_sets)
            self._own_segment = path
        log = self.log

        def note(event: str, **fields: Any) -> None:
            log.warning(event, backend="shared_memory", **fields)

        return ShmCounts(
            path, create=False, lease_s=settings.lease_s, fail_open=settings.fail == "open",
            retry_after_s=settings.retry_after_s, max_keys=settings.max_keys,
            max_leases=settings.max_leases, max_sets=settings.max_sets,
            counters=self.counters, log=note,
        )

    @property
    def policy(self) -> Policy:
        return self.core.policy

    @property
    def proxy(self) -> Proxy:
        return self.core.proxy

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        try:
            self.tcp.tls = await asyncio.to_thread(tls_contexts, self.cfg)
        except (OSError, ValueError) as exc:
            raise StartupError(str(exc)) from None
        await self._listen()
        if self.link is not None:
            try:
                self.link.open(self.loop)
            except OSError as exc:
                await self.stop()
                raise StartupError(f"cannot open the workers' hand-over socket in "
                                   f"{self.group}: {exc.strerror or exc}") from None
        self.sender.configure(self.cfg.sip.udp_send_thread, list(self.udp.values()),
                             self.cfg.workers)
        self._point_link()
        try:
            await self._load_suspensions()
            if self.link is not None:  # what the others changed meanwhile, over the file
                self.link.start_control(self._on_worker_change)
            await self._start_shared_lists()
            await self._start_admin()
        except StartupError:
            await self.stop()
            raise
        self.listening = True
        if isinstance(self.shared_store, ShmCounts):
            self.shared_store.start(self.loop.call_later)
        elif self.shared_store is not None:
            self.shared_store.start()
        self._housekeeping = self.loop.call_later(10.0, self._housekeep)
        self._log_flusher = self.loop.call_later(0.1, self._flush_logs)
        self._gc_timer = self.loop.call_later(YOUNG_EVERY_S, self.collect_garbage)
        self._load_watch = self.loop.call_later(LOAD_WATCH_S, self._watch_load)
        compiled, stale = native.status()
        rules = [r.name for r in self.policy.rules]
        if self.policy.flood is not None:
            rules.append("flood")  # the guard before the pipeline
        self.log.info(
            "sipguard_started",
            listen=[str(ep) for ep in self.cfg.listen],
            core=str(self.cfg.core),
            mode=self.cfg.mode,
            peers=len(self.policy.peers.peers),
            rules=rules,
            compiled=len(compiled) == len(native.HOT_MODULES) + len(native.C_MODULES),
            python=native.interpreter(),  # its version and installation (speed differs by build)
            verify_threads=self.verifier.threads,  # rule identity's signature-check threads
            udp_send_thread=self.sender.active,
        )
        for advice in region_advice(self.cfg):
            self.log.warning("config_note", detail=advice)
        if stale:
            self.log.warning("compiled_modules_stale", modules=stale,
                             fix="run `make` or `python -m sipguard.native build`")

    def _sockets(self) -> list[_Socket]:
        """What to bind: (local index, transport, host, port, shared with SO_REUSEPORT, what
        it is, for messages).

        One process: every listener at its index. Worker w of several: first its own port of
        listener i at index i (nobody else's: a port taken is an error), then the public
        address, shared by every worker, at index len(listen) + i."""
        listen = self.cfg.listen
        w = self.worker
        if w is None:
            return [(i, ep.transport, ep.host, ep.port, False, str(ep))
                    for i, ep in enumerate(listen)]
        out: list[_Socket] = []
        for i, ep in enumerate(listen):
            port = self.cfg.worker_port(i, w)
            out.append((i, ep.transport, ep.host, port, False,
                        f"{ep.transport}://{_bracketed(ep.host)}:{port} (worker {w}'s own port "
                        f"for {ep})"))
        n = len(listen)
        return out + [(n + i, ep.transport, ep.host, ep.port, True, str(ep))
                      for i, ep in enumerate(listen)]

    async def _listen(self) -> None:
        """Bind every listening socket, or stop and raise :class:`StartupError`."""
        wanted = self.cfg.sip.udp_receive_buffer
        for i, transport, host, port, shared, what in self._sockets():
            try:
                if transport == "udp":
                    udp = self.udp[i] = await open_udp(
                        self.loop, host, port, i, self._on_datagram, wanted, reuse_port=shared,
                    )
                    udp.watch = self._check_load
                    if udp.receive_buffer < wanted:
                        self.log.warning(
                            "udp_receive_buffer_capped", listen=what,
                            wanted=wanted, got=udp.receive_buffer // 2,
                            fix="raise net.core.rmem_max (sysctl) or run with CAP_NET_ADMIN",
                        )
                else:
                    await self.tcp.listen(host, port, i, tls=transport == "tls",
                                          reuse_port=shared)
            except OSError as exc:
                await self.stop()
                raise StartupError(f"cannot listen on {what}: {exc.strerror or exc}") from None

    async def _start_admin(self) -> None:
        http = self.cfg.http
        if http.host_port is None:
            return
        try:
            token = await asyncio.to_thread(admin_token, http)  # read off the loop
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        admin = AdminEndpoint(self.metrics, self._gauges, self, token, self.counters)
        host, port = http.host_port
        if port and self.worker is not None:
            base = port
            port += self.worker  # worker i: the admin port + i
            # GET /calls answers for every worker: the others asked on their ports
            near = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
            admin.worker = self.worker
            admin.peers = {i: f"http://{_bracketed(near)}:{base + i}"
                           for i in range(self.cfg.workers) if i != self.worker}
        try:
            await admin.start(host, port, http.max_connections, http.idle_timeout_s,
                              http.max_connections_per_ip)
        except OSError as exc:
            raise StartupError(
                f"cannot serve the admin API on {_bracketed(host)}:{port}: "
                f"{exc.strerror or exc}"
            ) from None
        self.http = admin

    def _gauges(self) -> dict[str, float]:
        proxy = self.proxy
        writer = log_writer()
        return {
            "live_dialogs": proxy.live_dialogs(),
            "subscriptions": len(proxy.subscriptions),
            "server_transactions": len(proxy.servers),
            "server_transaction_bytes": float(proxy.held_bytes),
            "live_dialog_bytes": float(proxy.dialog_bytes),
            "client_transactions": len(proxy.clients),
            "tcp_connections": len(self.tcp.by_id),
            "tcp_accept_queue_ratio": self.tcp.accept_queue_fill(),
            "kernel_tcp_listen_overflows": listen_overflows() or 0.0,
            "udp_receive_queue_ratio": self.overload.queue_fill,
            "udp_receive_queue_delay_seconds": self.overload.queue_delay,
            "tcp_reader_behind_seconds": self.overload.stream_behind,
            "overloaded": float(self.core.overloaded),
            "gc_young_pause_max_seconds": self.collector.take_young_pause_max(),
            "gc_full_pause_seconds": self.collector.full_pause,
            "identity_verify_waiting": self.verifier.waiting,
            "event_loop_busy_ratio": self.loop_busy,
            "udp_send_waiting": self.sender.waiting(),
            "log_queue_bytes": float(writer.queued_bytes) if writer is not None else 0.0,
            **self.core.policy.state.tracker.leaks(),
            **(self.shared_store.stats() if self.shared_store is not None else {}),
            **(self.shared_lists.stats() if self.shared_lists is not None else {}),
        }

    @property
    def overloaded(self) -> bool:
        return self.core.overloaded

    def _check_load(self) -> None:
        """Overload protection (see :mod:`sipguard.ops.overload`): every 50 ms, after every
        ``WATCH_EVERY`` datagrams read (:class:`sipguard.transport.udp.UdpEndpoint`) or
        handed over by another worker (:class:`WorkerLink`: its queue is this worker's backlog
        too) and, while a TCP/TLS reader is behind, every ``BEHIND_WATCH_S``
        (``TcpPool.watch``)."""
        sip = self.cfg.sip
        delay_ms = sip.overload_delay_ms
        queues: list[ReceiveQueue] = list(self.udp.values())
        link = self.handover
        if link is not None and link.sock is not None:
            queues.append(link)
        self.core.overloaded = self.overload.check(
            queues, sip.overload_shed_above, sip.overload_resume_below,
            None if delay_ms is None else delay_ms / 1000, self.tcp.behind_for(),
        )
        proxy = self.proxy
        proxy.lag = self.overload.queue_delay  # retransmission timers wait for the queue
        if proxy.held_retransmissions:
            self.counters["retransmissions_held"] += proxy.held_retransmissions
            proxy.held_retransmissions = 0
        if link is not None:  # what it hands over waited this long here first
            link.lag = max((ep.delay for ep in self.udp.values()), default=0.0)

    def _watch_load(self) -> None:
        self._check_load()
        now = self.loop.time()
        cpu = time.thread_time()  # this thread's: the event loop's
        span = now - self._busy_at
        if span > 0:
            busy = min(1.0, max(0.0, (cpu - self._busy_cpu) / span))
            self.loop_busy = busy
            self._busy_at = now
            self._busy_cpu = cpu
            if busy >= OFFLOAD_ABOVE:
                self.offload = True
            elif busy < OFFLOAD_BELOW:
                self.offload = False
            self.verifier.note_load(self.offload)
        self._load_watch = self.loop.call_later(LOAD_WATCH_S, self._watch_load)

    def _held(self) -> int:
        """Transactions, dialogs and TCP connections held: what the heap grows and shrinks
        with (a connection may buffer a message of up to sip.max_message_size)."""
        proxy = self.proxy
        return len(proxy.servers) + len(proxy.clients) + len(proxy.dialogs) + len(self.tcp.by_id)

    def collect_garbage(self) -> None:
        """The cyclic garbage collector's pass (its automatic runs are off, see
        :mod:`sipguard.ops.collector`): young every ``YOUNG_EVERY_S``; full an hour after the
        last one at the next lull, never while overloaded. Found objects: ``gc_collected``."""
        now = self.loop.time()
        collector = self.collector
        held = self._held()
        if not collector.full_due(now, held):
            collector.young()
        elif self.core.overloaded:
            collector.put_off(now)
        else:
            ran = collector.full(now)
            if ran is not None:
                self.log.info("gc_full", found=ran[0], pause_ms=round(ran[1] * 1000, 1),
                              live_dialogs=self.proxy.live_dialogs(), held=held)
        self._gc_timer = self.loop.call_later(YOUNG_EVERY_S, self.collect_garbage)

    def _flush_logs(self) -> None:
        self.sender.sync(self.counters, list(self.udp.values()))  # its counts, every 0.1 s
        writer = log_writer()
        if writer is not None:
            dropped = writer.take_dropped()
            if dropped:
                self.counters["log_lines_dropped"] += dropped
            untold = writer.report_due()
            if untold:
                # the log's reader is catching up: say what it missed (the counter is exact;
                # this line may be lost too if the reader stops again)
                self.log.warning("log_lines_dropped", count=untold, queue_bytes=writer.max_bytes)
        try:
            flush_logs()
        except Exception:  # a log line that cannot be written must not stop the flusher
            self.counters["log_write_failed"] += 1
        self._log_flusher = self.loop.call_later(0.1, self._flush_logs)

    async def stop(self) -> None:
        self.end_all_calls("shutdown")
        self.listening = False
        for handle in (self._gc_timer, self._load_watch, self._log_flusher, self._timer,
                       self._housekeeping):
            if handle is not None:
                handle.cancel()
        if self.http is not None:
            await self.http.stop()
            self.http = None
        fetcher = self.state.fetcher
        if isinstance(fetcher, HttpsFetcher):
            await fetcher.close()
        if isinstance(self.state.http, JsonGetter):
            await self.state.http.close()
        self.verifier.close()
        if self.link is not None:
            self.link.sender = None
        self.sender.close(list(self.udp.values()))  # what is queued leaves before the sockets close
        self.sender.sync(self.counters, list(self.udp.values()))
        await self._stop_shared_lists()
        if self.link is not None:
            self.link.close()
        if self.shared_store is not None:
            await self.shared_store.close()
        if self._own_segment is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._own_segment)
        await self.tcp.close()
        for ep in self.udp.values():
            if ep.transport is not None:
                ep.transport.close()
        self.udp.clear()

    def reconfigure(self, cfg: Config, policy: Policy, tls: TlsContexts | None = None) -> None:
        """Swap in a new config and policy (and TLS contexts, read from ``cfg`` when not
        given: new TLS connections use the new certificates); transactions, dialogs and the
        rules' state carry on."""
        self.cfg = cfg
        self.metrics.config_loaded = time.time()  # sipguard_config_loaded_timestamp_seconds
        backlog = self.tcp.limits.listen_backlog
        self.tcp.limits = tcp_limits(cfg)
        if self.tcp.limits.listen_backlog != backlog:
            self.tcp.relisten()
        self.tcp.tls = tls if tls is not None else tls_contexts(cfg)
        self.core.set_overload_retry_after(cfg.sip.overload_retry_after_s)
        self.core.reconfigure(proxy_settings(cfg, self.worker), policy, self.loop.time())
        if policy.retired_lists:  # number lists no rule uses any more: emptied off the loop
            retired, policy.retired_lists = policy.retired_lists, []
            self.loop.call_later(RETIRED_LISTS_AFTER_S, self._drain_lists, retired)
        self.observer.flood = policy.flood
        if self.listening:
            self.sender.configure(cfg.sip.udp_send_thread, list(self.udp.values()),
                                 cfg.workers)
            self._point_link()
        # the key file was read by the config's validation moments ago
        self.observer.privacy = self.privacy = number_privacy(cfg.log.numbers,
                                                              cfg.log.hash_key_file)
        self._schedule_flush()

    def _drain_lists(self, lists: list[NumberSet]) -> None:
        """Empty number lists a reload replaced, in a thread that lets the loop run every few
        thousand entries (freed at once on the loop, a million-line list held it ~50 ms).
        Called ``RETIRED_LISTS_AFTER_S`` after the reload: a decision the policy before
        started (an Identity check, a Redis round trip) has long finished reading them."""
        self._start(asyncio.to_thread(_drain_all, lists))

    async def reload(self, cfg: Config) -> bool:
        """Build the new policy off the event loop (big number lists), then swap it in —
        unless a newer reload started meanwhile (newest wins). True when swapped in."""
        self._reloads += 1
        mine = self._reloads
        tls = await asyncio.to_thread(tls_contexts, cfg)  # a bad certificate fails the reload
        former = self._former_cores
        old = (self.cfg.core.host, self.cfg.core.port)
        if (cfg.core.host, cfg.core.port) != old:
            # the replaced core still sends the BYEs of its calls up: the flood guard keeps
            # trusting it (as the proxy keeps routing them, Dialog.core)
            remember(former, old, MAX_FORMER_CORES)
        if former:
            # ... while calls it took are up: a core taken out of service (its address then
            # anyone's) is not left out of the flood guard once its calls have ended
            up = {d.core.addr for d in self.proxy.dialogs.values() if d.core is not None}
            for gone in [c for c in former if c not in up]:
                del former[gone]
        trusted = _trusted(cfg) + tuple(c for c in former if c != (cfg.core.host, cfg.core.port))
        policy = await asyncio.to_thread(Policy, cfg, self.state, trusted)
        if mine != self._reloads:
            self.counters["reloads_superseded"] += 1
            return False
        self.reconfigure(cfg, policy, tls)
        return True

    async def reload_config(self, everywhere: bool = False) -> ReloadResult:
        """The one reload path (SIGHUP, ``sipguard reload``, ``POST /reload``): read the
        config file, build the policy off the loop and swap it in. Reloads run one at a time;
        keys that need a restart (``listen``, the admin endpoint, ``state_dir``) keep their
        running values and are reported. ``everywhere`` (an operator's request to this
        worker's admin API): once applied here, the supervisor reloads the other workers
        (``reload_others``), which read the same file."""
        async with self._reload_lock:
            if self.load is None:
                return failure(ValueError("no config file to reload from"), "")
            try:
                new = await asyncio.to_thread(self.load)
                changed = changed_keys(self.cfg, new)
                new, restart = held_back(self.cfg, new, changed)
                token = await self._admin_token(new)
                applied = await self.reload(new)
            except Exception as exc:  # ConfigError; OSError: a dno_file; ValueError
                # (anything else is a bug, but the running config stays and the operator is
                # told, not left with a reload that silently did nothing)
                # (off the loop: a number list's error reads the config file for its line)
                result = await asyncio.to_thread(
                    failure, exc if isinstance(exc, (ConfigError, OSError, ValueError))
                    else ValueError(f"internal error: {exc!r}"), self.config_file)
                self.counters["config_reload_failed"] += 1
                self.log.error("config_reload_failed", errors=result.error_lines())
                return result
            if not applied:
                self.log.info("config_reload_superseded", detail="a newer reload won")
                return ReloadResult(False, changed, restart, superseded=True)
            if token is not None and self.http is not None and self.http.token != token:
                self.http.token = token  # a rotated token: the old one stops working now
                changed.append("admin.token_file")
            if restart:
                self.log.warning("config_restart_needed", keys=restart,
                                 detail="these settings take effect at the next start")
            others = None
            if everywhere and self.reload_others is not None:
                self.reload_others()
                others = self.cfg.workers - 1
            for advice in region_advice(new):
                self.log.warning("config_note", detail=advice)
            self.log.info("config_reloaded", changed=changed, restart_needed=restart,
                          **({} if others is None else {"other_workers_reloading": others}))
            return ReloadResult(True, changed, restart, others=others)

    async def _admin_token(self, new: Config) -> bytes | None:
        """The admin token file read again on reload (its path is a restart key, its content
        is not: rotating a leaked token takes a reload); None without one. A file that cannot
        be read refuses the reload, naming the field, and the running token stays."""
        path = new.http.token_file
        if self.http is None or path is None:
            return None
        try:
            token = await _read_token(str(path))
        except ValueError as exc:
            raise ConfigError(str(path), [ConfigIssue("admin.token_file", None,
                                                      f"cannot read {path}: {exc}")]) from None
        return token.encode()

    def _tls_names(self, conn: int) -> tuple[str, ...]:
        """The verified client certificate names of TLS connection ``conn`` (empty: none)."""
        connection = self.tcp.by_id.get(conn)
        return connection.peer_names if connection is not None else ()

    # ------------------------------------------------------------------ operator control
    @property
    def state_status(self) -> str | None:
        """The shared store's reachability (None: memory backend)."""
        store = self.shared_store
        if store is None:
            return None
        return "ok" if store.available else "unreachable"

    @property
    def ready(self) -> bool:
        """Listening, not draining, and — with ``state.fail: closed`` — the shared store
        reachable (with ``fail: open`` calls still pass while it is not)."""
        shared = self.state.shared
        if shared is not None and not shared.available and not shared.fail_open:
            return False
        return self.listening and not self.core.draining

    async def drain(self, timeout: float | None = None) -> int:
        """Graceful stop: new INVITEs hear 503 + Retry-After (``/readyz`` is unready at once,
        so a load balancer moves new calls away) while in-dialog requests keep flowing and
        transactions finish, until no call is up or ``drain_timeout_s`` passes. How many
        calls were still up at the end."""
        limit = self.cfg.drain_timeout_s if timeout is None else timeout
        self.core.draining = True
        proxy = self.proxy
        self.log.info("drain_started", live_calls=len(proxy.dialogs), timeout_s=limit)
        deadline = self.loop.time() + limit
        while (proxy.dialogs or proxy.pending) and self.loop.time() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.05)  # the last answers of the pass go out
        left = len(proxy.dialogs)
        self.log.info("drain_ended", live_calls=left)
        return left

    def _is_peer_address(self, ip: str) -> bool | None:
        """Whether ``ip`` is in a configured peer's networks (the running config's); None when
        no peers are configured."""
        peers = self.policy.peers
        return peers.lookup(ip) is not None if peers else None

    def end_all_calls(self, reason: str) -> int:
        """Stopping with calls still up (the drain ran out, or a second signal): each ends
        now — an answered one with a BYE to both sides, one still ringing with a CANCEL toward
        the called side and 503 + Retry-After to its caller — and gets its ``dialog_ended``
        line (``reason``), rather than vanishing with the process and leaving both sides up
        (after a restart their BYEs would hear 481). How many were up."""
        left = len(self.proxy.dialogs)
        if left:
            self.core.end_all(reason, self.loop.time())
            self._flush()  # the BYEs queued and the lines written before the sockets close
        return left

    def config_view(self) -> dict[str, Any]:
        """The effective config as JSON data, secrets' file paths and URL passwords hidden."""
        return dict(_redact(self.cfg.model_dump(mode="json")))

    async def shared_counts(self, key: str) -> dict[str, int] | None:
        """With the Redis backend: ``key``'s live calls as caller, callee and diverter on
        every instance (None: memory backend, a prefix, or Redis unreachable)."""
        store = self.shared_store
        if store is None or key.endswith("*"):
            return None
        kinds = ("caller", "callee", "diverter")
        counts = await store.counts([f"{kind}:{key}" for kind in kinds])
        return None if counts is None else dict(zip(kinds, counts, strict=True))

    def calls_view(self, key: str) -> dict[str, Any]:
        """Live calls whose caller, called or diverting number is ``key`` (or in the prefix
        ``key``) — or the number their From shows, where the caller is another, asserted
        one — and the number's live-call counts (exact numbers, local state backend)."""
        now = self.loop.time()
        matches = _matcher(key)
        p = self.privacy  # log.numbers: the answer shows numbers as the log lines do
        calls: list[dict[str, Any]] = []
        truncated = False
        for d in self.proxy.dialogs.values():
            if any(matches(n) for n in (d.caller, d.callee, d.shown, *d.diverters)):
                if len(calls) >= MAX_CALLS_SHOWN:  # a prefix as wide as "+*": a bounded answer
                    truncated = True
                    break
                calls.append({
                    "call_id": d.call_id,
                    "caller": d.caller if p is None else p(d.caller),
                    "from_shows": d.shown if p is None else p(d.shown),
                    "callee": d.callee if p is None else p(d.callee),
                    "diverters": list(d.diverters) if p is None else p.many(d.diverters),
                    "peer": d.peer,
                    "source": f"{d.source[0]}:{d.source[1]}",
                    "state": d.state,
                    "age_s": round(now - d.started, 1),
                    "confirmed_s": None if d.confirmed_at is None
                    else round(now - d.confirmed_at, 1),
                })
        counts: dict[str, int] | None = None
        tracker = self.state.tracker
        if not key.endswith("*") and tracker.sync is not None:
            counts = {kind: tracker.counts(kind, key) for kind in ("caller", "callee", "diverter")}
        view: dict[str, Any] = {"number": self._shown(key), "calls": calls, "counts": counts}
        if truncated:
            view["truncated"] = True
        return view

    def bans_view(self, source: str | None = None,
                  limit: int = MAX_BANS_SHOWN) -> dict[str, Any]:
        """The flood bans in force here: at most ``limit`` (then ``truncated``), with
        ``total``; ``source``: that one's only."""
        if self.policy.flood is None:
            return {"bans": [], "total": 0}
        now = self.loop.time()
        flood = self.state.flood
        bans = flood.list_bans(now, limit, source)
        view: dict[str, Any] = {"bans": bans, "total": len(bans)}
        if source is None and len(bans) == limit:
            view["total"] = flood.bans_in_force(now)
            if view["total"] > limit:
                view["truncated"] = True
        return view

    def lift_ban(self, source: str, tell_others: bool = True) -> bool:
        """Lift the flood ban of ``source`` here (and in the shared store); with
        ``tell_others``, over the worker link too (the ban may be on the worker that read the
        flood)."""
        key = self.state.flood.key_of(source)
        lifted = self.state.flood.lift(source)
        if lifted:
            self.log.info("ban_lifted", source=source)
            if self.shared_lists is not None and key is not None:
                self.shared_lists.ban_changed(key)
        if tell_others and self.link is not None:
            self.link.broadcast({"op": "lift_ban", "source": source})
        return lifted

    def suspensions_view(self) -> list[dict[str, Any]]:
        now = self.loop.time()
        out = [e.as_dict(now) for e in self.state.suspensions.entries() if e.live(now)]
        out += [{"number": n, "source": "config"} for n in self.cfg.suspended]
        self._hide_numbers(out)
        return out

    def _hide_numbers(self, items: list[dict[str, Any]]) -> None:
        """Suspension entries' ``number`` / ``prefix`` as log lines show them (``log.numbers``)."""
        p = self.privacy
        if p is not None:
            for item in items:
                for name in ("number", "prefix"):
                    if name in item:
                        item[name] = p.text(item[name])

    def suspensions_page(self, after: str | None, limit: int, prefix: str) -> dict[str, Any]:
        """A page of :meth:`suspensions_view` in key order: up to ``limit`` entries (API and
        config ones; a number in both lists: the API's entry first, and both on one page,
        one over ``limit``) whose keys come after ``after`` and start with ``prefix``;
        ``total``: how many start with ``prefix``; ``next``: the last key shown when more
        follow, else None (the key itself, also with ``log.numbers``: the API seals it)."""
        now = self.loop.time()
        api, total, more = self.state.suspensions.page(after, limit, prefix, now)
        config = sorted(pair for pair in ((_config_key(n), n) for n in self.cfg.suspended)
                        if pair[0].startswith(prefix))
        total += len(config)
        rows: list[tuple[str, int, dict[str, Any]]] = [(e.key, 0, e.as_dict(now)) for e in api]
        rows += [(key, 1, {"number": n, "source": "config"}) for key, n in config
                 if after is None or key > after]
        rows.sort(key=lambda row: (row[0], row[1]))
        cut = min(limit, len(rows))
        while 0 < cut < len(rows) and rows[cut][0] == rows[cut - 1][0]:
            cut += 1  # a number in both lists: both on this page (the cursor is the key)
        more = more or cut < len(rows)
        out = [row[2] for row in rows[:cut]]
        self._hide_numbers(out)
        return {"suspensions": out, "total": total,
                "next": rows[cut - 1][0] if more and cut else None}

    @property
    def numbers_hidden(self) -> bool:
        """``log.numbers`` is not ``full``: API answers show no number as it is."""
        return self.privacy is not None

    def cooldowns_view(self, scope: str | None, key: str | None) -> dict[str, Any]:
        return self.cooldowns.view(scope, key)

    async def shared_cooldowns(self, scope: str | None, key: str | None
                               ) -> dict[str, Any] | None:
        """With ``state.backend: redis``: the cooldowns marked in Redis that this process does
        not hold (another instance's), or ``unreachable``; None without Redis."""
        store = self.shared_store
        if not isinstance(store, SharedStore):
            return None
        found = await self.cooldowns.shared_view(store, scope, key)
        return {"cooldowns": [], "unreachable": True} if found is None else found

    async def lift_cooldown(self, key: str, scope: str | None, by: str, local: bool = False,
                            reset: tuple[str, ...] = ()) -> dict[str, Any]:
        """Lift the dialer cooldowns of ``key`` (:mod:`sipguard.ops.cooldowns`)."""
        policy = self.policy
        rules = [r for p in (policy.default, *policy.by_peer.values()) for r in p.rules]
        return await self.cooldowns.lift(key, scope, by, store=self.shared_store,
                                         windows=dialer_windows(rules), lists=self.shared_lists,
                                         local=local, reset=reset)

    def _shown(self, key: str) -> str:
        """A number or prefix as log lines and API answers show it (``log.numbers``)."""
        return key if self.privacy is None else self.privacy.text(key)

    async def suspend(
        self, key: str, reason: str, by: str, ttl: float | None, end_calls: bool,
        keep_expiry: bool = False,
    ) -> dict[str, Any]:
        """Suspend a number or prefix from the next INVITE on; with ``end_calls`` its calls
        are ended at once (answered: BYE both ways; ringing: CANCEL toward the called side;
        ``reason=suspended``)."""
        now = self.loop.time()
        entry, ending = self._suspend_here(key, reason, by, ttl, end_calls, now,
                                           keep_expiry=keep_expiry)
        if self.shared_lists is not None:
            self.shared_lists.suspension_changed(key)
        told = 0
        if self.link is not None:
            told = self.link.broadcast({"op": "suspend", "key": key, "reason": reason, "by": by,
                                        "ttl": ttl, "end_calls": end_calls,
                                        "keep_expiry": keep_expiry})
        self._journal({"add": dump_entry(entry, self.state.wall_offset)})
        saved = await self.save_suspensions()
        ended = await ending  # the calls ended, the last batch too (see _suspend_here)
        shown = entry.as_dict(now)
        field = "prefix" if entry.prefix else "number"
        shown[field] = self._shown(shown[field])
        answer: dict[str, Any] = {"suspension": shown, "calls_ended": ended, "saved": saved}
        if not saved and self.cfg.state_dir is not None:
            answer["save_failed"] = True  # in force, but gone at the next restart (the log)
        if self.link is not None:
            # calls_ended counts this worker's; each other worker ends its own calls and
            # counts them in its suspension_added line
            answer["other_workers_told"] = told
        if not key.startswith("+"):
            answer["warning"] = (
                "no leading +: matches only numbers a peer sends without a country code and "
                "without a default_region; a call from the E.164 form is not stopped")
        return answer

    def _suspend_here(self, key: str, reason: str, by: str, ttl: float | None,
                      end_calls: bool, now: float, keep_expiry: bool = False,
                      **via: str) -> tuple[Suspension, asyncio.Future[int]]:
        """Suspend ``key`` in this process (and end its calls if asked), logged; the entry and
        a future of how many calls were ended (done at once unless there are more than a
        batch). ``via``: where the change came from, for the log line."""
        entry = self.state.suspensions.add(key, reason, by, now, ttl, keep_expiry, "admin-api")
        calls = self.core.calls_of(_matcher(key)) if end_calls else []
        # a few hundred calls a pass, the passes 10 ms apart: ending tens of thousands in
        # one would hold the loop for most of a second, and their BYEs' retransmissions
        # would all come due together
        ended = self.core.end_these(calls[:END_CALLS_BATCH], "suspended", now) if calls else 0
        if calls:
            self._schedule_flush()
        ending: asyncio.Future[int] = self.loop.create_future()
        if len(calls) > END_CALLS_BATCH:
            self._start(self._end_in_batches(entry, calls[END_CALLS_BATCH:], ended, ending,
                                             via))
        else:
            self._log_suspended(entry, end_calls, ended, now, via)
            ending.set_result(ended)
        return entry, ending

    async def _end_in_batches(self, entry: Suspension, calls: list[Dialog], ended: int,
                              ending: asyncio.Future[int], via: dict[str, str]) -> None:
        """The rest of a suspension's calls, END_CALLS_BATCH a pass, END_CALLS_PAUSE_S apart,
        for as long as the key stays suspended (a lift, or its expiry, stops it); then its
        ``suspension_added`` line with the calls ended."""
        try:
            while calls:
                await asyncio.sleep(END_CALLS_PAUSE_S)
                held = self.state.suspensions.get(entry.key)
                if held is None or not held.live(self.loop.time()):
                    break
                batch, calls = calls[:END_CALLS_BATCH], calls[END_CALLS_BATCH:]
                ended += self.core.end_these(batch, "suspended", self.loop.time())
                self._schedule_flush()
        finally:
            self._log_suspended(entry, True, ended, self.loop.time(), via)
            if not ending.done():
                ending.set_result(ended)

    def _log_suspended(self, entry: Suspension, end_calls: bool, ended: int, now: float,
                       via: dict[str, str]) -> None:
        self.log.info(
            "suspension_added",
            **{"prefix" if entry.prefix else "number": self._shown(entry.key)},
            by=entry.by, reason=entry.reason,
            expires=None if entry.expires is None else round(entry.expires - now, 3),
            end_calls=end_calls,
            calls_ended=ended, **via,
        )

    async def unsuspend(self, key: str, by: str) -> dict[str, Any] | None:
        entry = self.state.suspensions.lift(key)
        if self.link is not None:  # also when not here: another worker may hold it
            self.link.broadcast({"op": "unsuspend", "key": key, "by": by})
        if entry is None:
            return None
        if self.shared_lists is not None:
            self.shared_lists.suspension_changed(key)
        self.log.info(
            "suspension_lifted", **{"prefix" if entry.prefix else "number": self._shown(key)},
            by=by,
            reason=entry.reason, expires=None, end_calls=False, calls_ended=0,
        )
        self._journal({"lift": key})
        saved = await self.save_suspensions()
        lifted: dict[str, Any] = {"lifted": self._shown(key), "saved": saved}
        if not saved and self.cfg.state_dir is not None:
            lifted["save_failed"] = True
        return lifted

    def _journal(self, change: dict[str, Any]) -> None:
        """A change for state_dir's journal, written by the next :meth:`save_suspensions`."""
        if self._suspension_file is not None:
            self._journal_pending.append(change)

    async def save_suspensions(self) -> bool:
        """Append the changes made so far to ``state_dir``'s journal, synced, off the loop;
        False when there is no state_dir or the write failed (logged; the changes are kept
        for the next write). Changes made while a write is under way go in one next write
        together, and every caller waiting on them hears its result."""
        file = self._suspension_file
        if file is None:
            return False
        self._save_asked += 1
        asked = self._save_asked
        async with self._save_lock:
            if self._saved_upto >= asked:
                return self._save_ok  # a write that started after this change took it
            changes, self._journal_pending = self._journal_pending, []
            upto = self._save_asked
            try:
                if changes:
                    await asyncio.to_thread(file.append, changes)
                ok = True
            except OSError as exc:
                self._journal_pending[:0] = changes
                self.counters["state_save_failed"] += 1
                self.log.error("suspensions_save_failed", file=str(file.journal),
                               error=str(exc))
                ok = False
            self._saved_upto, self._save_ok = upto, ok
            return ok

    async def _load_suspensions(self) -> None:
        """The suspensions of ``state_dir`` (snapshot and journal), then a compaction: the
        journal starts empty and lifted numbers leave the disk."""
        file = self._suspension_file
        if file is None:
            return
        try:
            items, skipped = await asyncio.to_thread(file.read)
            loaded = self.state.suspensions.load(items, self.state.wall_offset, self.loop.time())
            await asyncio.to_thread(file.compact)
        except OSError as exc:
            raise StartupError(f"cannot use state_dir {file.snapshot.parent}: "
                               f"{exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError) as exc:  # StateFileError among them
            raise StartupError(str(exc) if isinstance(exc, StateFileError) else
                               f"cannot read suspensions from {file.snapshot}: {exc}") from None
        if skipped:
            self.log.warning("suspensions_journal_skipped", file=str(file.journal),
                             lines=skipped[:20], count=len(skipped))
        self.log.info("suspensions_loaded", file=str(file.snapshot), count=loaded)

    async def _start_shared_lists(self) -> None:
        """With ``state.backend: redis``: share the suspensions and flood bans with every other
        instance (:mod:`sipguard.ops.shared_lists`) through the shared store's client. Redis
        supersedes the ``state_dir`` file, which is still written: it is what an instance
        starting while Redis cannot be reached goes by until Redis answers."""
        shared = self.shared_store
        if not isinstance(shared, SharedStore):
            return
        flood = self.state.flood
        lists = SharedLists(
            shared.client, self.cfg.state.key_prefix, self.state.suspensions, flood,
            self.loop.time, lambda: self.state.wall_offset,
            max_bans=lambda: self.policy.flood.max_bans if self.policy.flood else 100_000,
            counters=self.counters, log=self.log, sampled=self.sampled,
            on_suspensions=self._shared_suspensions,
            on_cooldown_lift=self.cooldowns.lifted_elsewhere,
        )
        self.shared_lists = lists
        flood.on_ban = lists.ban_added
        if not await lists.start(wait_s=2.0):
            self.log.warning("shared_lists_not_loaded",
                             detail="Redis did not answer: local lists until it does")

    async def _stop_shared_lists(self) -> None:
        lists, self.shared_lists = self.shared_lists, None
        if lists is None:
            return
        self.state.flood.on_ban = None
        if lists.connected:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await lists.flush()  # what changed here last
        await lists.stop()

    def _shared_suspensions(self, added: list[Suspension], lifted: list[Suspension]) -> None:
        """Suspensions changed on another instance (or found changed in Redis): logged like
        local ones, and written to state_dir's journal."""
        for entry, event in [(e, "suspension_added") for e in added] + \
                [(e, "suspension_lifted") for e in lifted]:
            self.log.info(
                event, **{"prefix" if entry.prefix else "number": self._shown(entry.key)},
                by=entry.by, reason=entry.reason, via="shared",
            )
        offset = self.state.wall_offset
        for entry in added:
            self._journal({"add": dump_entry(entry, offset)})
        for entry in lifted:
            self._journal({"lift": entry.key})
        if self._suspension_file is not None:
            self._start(self._save_quietly())

    def _on_worker_change(self, change: dict[str, Any]) -> None:
        """An operator's change another worker applied (:mod:`sipguard.transport.worker_link`):
        applied here too and logged with ``via=worker``; that worker wrote state_dir's journal."""
        op, now = change.get("op"), self.loop.time()
        try:
            if op == "suspend":
                ttl = change.get("ttl")
                self._suspend_here(suspension_key(str(change["key"])),
                                   str(change.get("reason", "")), str(change.get("by", "")),
                                   None if ttl is None else float(ttl),
                                   bool(change.get("end_calls")), now,
                                   keep_expiry=bool(change.get("keep_expiry")), via="worker")
            elif op == "unsuspend":
                key = suspension_key(str(change["key"]))
                if self.state.suspensions.lift(key) is not None:
                    self.log.info("suspension_lifted", by=str(change.get("by", "")),
                                  **{"prefix" if key.endswith("*") else "number":
                                     self._shown(key)}, via="worker")
            elif op == "lift_ban":
                if self.state.flood.lift(str(change["source"])):
                    self.log.info("ban_lifted", source=str(change["source"]), via="worker")
            else:
                self.counters["worker_handover_bad"] += 1
        except (KeyError, TypeError, ValueError):
            self.counters["worker_handover_bad"] += 1

    def _expire_suspensions(self) -> None:
        ended = self.state.suspensions.sweep(self.loop.time())
        for entry in ended:
            self.log.info(
                "suspension_lifted",
                **{"prefix" if entry.prefix else "number": self._shown(entry.key)},
                by="expiry", reason=entry.reason, expires=None, end_calls=False, calls_ended=0,
            )
        # (nothing to write: an entry that ran out is dropped when the file is read)

    async def _save_quietly(self) -> None:
        await self.save_suspensions()

    # ------------------------------------------------------------------ input
    def _on_datagram(self, data: bytes, flow: Flow) -> None:
        link = self.handover
        if link is not None and (flow.local >= self._shared_from or _call_setup(data)):
            # the public address, several workers: the caller's worker handles it; and a new
            # call sent straight to a worker's own port too (with its CANCEL and ACK) — else a
            # dialer could spread its calls over the workers' ports, out of sight of each
            # one's dialer analytics
            now = self.loop.time()
            core = self.core
            if core.flood_check(data, flow, now):
                # the core's requests hash their To (the outside party), as the call's INVITE
                from_core = core.proxy.router.is_core(flow)
                # (what the core sends to a worker's own port stays with that worker)
                owner = link.index if from_core and flow.local < self._shared_from else \
                    link.owner(data, from_core)
                if owner == link.index or (
                    # Behind in reading: a new call read now waited in this worker's queue, so
                    # it is shed here (503) like the calls this worker owns, not handed over
                    # late to add to another worker's load. Draining: it hears 503 here too,
                    # not from its worker, which may have finished its drain and gone.
                    (core.overloaded or core.draining) and not from_core and opens_call(data)
                ) or not link.hand_over(owner, data, flow):
                    core.receive(data, flow, now, screened=True)
        else:
            self.core.receive(data, flow, self.loop.time())
        self._datagram_done()

    def _on_handed_over(self, data: bytes, flow: Flow) -> None:
        """A datagram another worker read on the public address (flood guard passed there)."""
        self.core.receive(data, flow, self.loop.time(), screened=True)
        self._datagram_done()

    def _datagram_done(self) -> None:
        self._unflushed += 1
        if self._unflushed >= FLUSH_EVERY:
            self._flush()  # a long pass: what the first ones answered goes out now
        else:
            self._schedule_flush()

    def _stream_flow(self, addr: tuple[str, int], local: int, conn: int) -> Flow:
        c = self.tcp.by_id.get(conn)
        return Flow("tls" if c is not None and c.tls else "tcp", addr, local, conn)

    def _on_stream_message(self, data: bytes, addr: tuple[str, int], local: int, conn: int) -> None:
        self.core.receive(data, self._stream_flow(addr, local, conn), self.loop.time())
        self._schedule_flush()

    def _on_stream_error(self, err: SipParseError, addr: tuple[str, int], local: int,
                         head: bytes | None, conn: int) -> None:
        """A TCP/TLS stream that cannot be framed any further: its connection closes. A
        message whose header block came whole (too large, its Content-Length missing or bad)
        is answered first, as a datagram that does not parse is (513, 400): written now,
        before the close."""
        self.sampled.log("warning", "stream_closed", key=f"stream:{addr[0]}", source=addr[0],
                         status=err.status, detail=err.detail)
        if head is None:
            self.counters["parse_errors"] += 1
            return
        self.core.proxy.stream_failed(err, head, self._stream_flow(addr, local, conn))
        self._flush()

    def _undelivered(self, dropped: list[bytes]) -> None:
        """Messages a failed outbound TCP/TLS connect dropped: the requests among them are
        answered at once (RFC 3261 §16.9: a transport error is a 503)."""
        if self.core.proxy.undelivered(dropped, self.loop.time()):
            self._schedule_flush()

    def _on_tcp_event(self, kind: str, addr: tuple[str, int], n: int) -> None:
        # A TCP limit bit, or an outbound connect failed (transport/tcp.py): counted, and
        # logged at most once per kind per sample interval.
        self.counters[kind] += n
        level: Level = "info" if kind in ("tcp_idle_closed", "tcp_write_paused") else "warning"
        self.sampled.log(level, kind, key=kind, source=addr[0], port=addr[1], count=n)

    def _schedule_flush(self) -> None:
        # Sends wait for the end of this event-loop pass: the datagrams read in one pass are
        # all processed first, then their answers go out back to back. A peer woken by the
        # first datagram is still awake for the next, so one wake-up serves several sends —
        # under load that is a large part of the CPU a send costs. The wait is bounded by one
        # pass, and by FLUSH_EVERY datagrams read in it: a pass reads up to 32, and holding
        # the answer to the first until the 32nd is processed added milliseconds to every
        # INVITE→200 under load.
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    # ------------------------------------------------------------------ work events ask for
    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _decide_later(self, call: CallInfo, pending: Awaitable[Verdict]) -> None:
        try:
            verdict = await pending
        except Exception:
            self.counters["internal_errors"] += 1
            self.log.exception("decision_failed", call_id=call.call_id)
            verdict = DECISION_FAILED
        self.core.resolve(call, verdict, self.loop.time())
        # With the other decisions that came back in this pass (the signature checks' answers
        # come in batches): one flush, not one per call, so the core is woken once for them.
        self._schedule_flush()

    async def _settle(self, pending: Awaitable[None], what: str) -> None:
        try:
            await pending
        except Exception:
            self.counters["internal_errors"] += 1
            self.log.exception("policy_update_failed", what=what)

    # ------------------------------------------------------------------ output
    def _flush(self) -> None:
        self._flush_pending = False
        self._unflushed = 0
        if self.handover is not None:
            self.handover.flush()  # what this pass handed to other workers: one envelope each
        core = self.core
        outbox = core.outbox
        if outbox:
            for flow, data in outbox:
                try:
                    self._send(flow, data)
                except Exception:  # one send that fails must not cost the others
                    self.counters["send_failed"] += 1
            outbox.clear()
        # the send thread: what this flush queued (hand-overs included); with auto, sent from
        # here while the loop is not busy
        self.sender.kick(self.offload)
        events = core.drain_events()
        if events:
            observe = self.observer.observe
            for event in events:
                if isinstance(event, DecisionPending):
                    self._start(self._decide_later(event.call, event.pending))
                elif isinstance(event, Deferred):
                    self._start(self._settle(event.pending, event.what))
                else:
                    try:
                        observe(event)
                    except Exception:  # a log line must never cost the sends or the timer
                        self.counters["internal_errors"] += 1
        deadline = core.next_deadline()
        if deadline is not None and (self._timer_at is None or deadline < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.core.handle_timer(self.loop.time())
        self._flush()

    def _send(self, flow: Flow, data: bytes) -> None:
        host = flow.addr[0]
        ip = self._resolved.get(host)
        if ip is None:
            if not _is_ip(host):
                self._resolve_then_send(flow, data)
                return
            if len(self._resolved) > 65536:
                self._resolved.clear()
            self._resolved[host] = ip = host
        if ip != host:
            flow = flow._replace(addr=(ip, flow.addr[1]))
        if flow.transport == "udp":
            local = flow.local
            if local >= self._shared_from and not data.startswith(b"SIP/2.0 "):
                # a worker's requests leave from its own port, whatever socket the party
                # came in on: the answers (rport, or the Via port) come back to this worker
                local -= self._shared_from
            ep = self.udp.get(local) or next(iter(self.udp.values()), None)
            if ep is None:
                self.counters["send_failed"] += 1
                return
            ep.send(data, flow.addr)
        else:
            self.tcp.send(data, flow.addr, flow.local, flow.conn, tls=flow.transport == "tls",
                          host=host)

    def _resolve_then_send(self, flow: Flow, data: bytes) -> None:
        """A send to a host name not resolved yet: it waits for the name's one lookup (a slow
        resolver holds a bounded queue, not a task and a resolver thread's job per
        message); a name that just failed is not asked again for UNRESOLVED_S."""
        host = flow.addr[0]
        waiting = self._resolving.get(host)
        if waiting is not None:
            if len(waiting) < MAX_WAITING_PER_NAME:
                waiting.append((flow, data))
            else:
                self.counters["send_failed"] += 1
            return
        until = self._unresolved.get(host)
        if until is not None and until > self.loop.time() or \
                len(self._resolving) >= MAX_RESOLVING:
            self.counters["send_failed"] += 1
            return
        self._resolving[host] = [(flow, data)]
        family = 0  # over UDP, an address the listener's socket can send to
        if flow.transport == "udp":
            local = flow.local
            if local >= self._shared_from:
                local -= self._shared_from  # a worker's own port: as _send picks it
            ep = self.udp.get(local) or next(iter(self.udp.values()), None)
            family = int(ep.sock.family) if ep is not None else 0
        self.loop.create_task(self._resolve_and_send(host, flow.addr[1], family))

    async def _resolve_and_send(self, host: str, port: int, family: int = 0) -> None:
        waiting: list[tuple[Flow, bytes]] = []
        try:
            try:
                infos = await self.loop.getaddrinfo(host, port, family=family,
                                                    type=socket.SOCK_DGRAM)
                addr = str(infos[0][4][0])
            finally:
                waiting = self._resolving.pop(host, [])  # whatever happens: the name is free
        except (OSError, UnicodeError, ValueError, IndexError) as exc:  # (UnicodeError: a
            # label of 64+ characters)
            if len(self._unresolved) >= 4096:
                self._unresolved.clear()
            self._unresolved[host] = self.loop.time() + UNRESOLVED_S
            self.counters["resolve_failed"] += 1
            self.counters["send_failed"] += len(waiting)
            self.sampled.log("warning", "resolve_failed", key=f"dns:{host}", host=host,
                             error=str(exc), dropped=len(waiting))
            return
        self._resolved[host] = addr
        for flow, data in waiting:
            self._send(flow, data)  # resolved now; the name stays for a TLS certificate
        self.sender.kick()

    def _housekeep(self) -> None:
        self._resolved.clear()  # re-resolve names now and then (no TTLs from getaddrinfo)
        now = self.loop.time()
        for name in [n for n, until in self._unresolved.items() if until <= now]:
            del self._unresolved[name]
        self.core.housekeep(self.loop.time())
        if self.state.suspensions:
            self._expire_suspensions()
        self.state.wall_offset = time.time() - self.loop.time()  # follow NTP steps
        if _MALLOC_TRIM is not None:
            held = self._held()
            self._trim_peak = max(self._trim_peak, held)
            if self._trim_peak >= 64 and held <= self._trim_peak // 2:
                _MALLOC_TRIM(0)  # freed heap pages back to the OS (see _glibc_malloc_trim)
                self.counters["malloc_trims"] += 1
                self._trim_peak = held
        self._housekeeping = self.loop.call_later(10.0, self._housekeep)


def tls_contexts(cfg: Config) -> TlsContexts:
    """The TLS contexts of a config (certificate files read now; OSError naming the file)."""
    tls = cfg.tls
    return build_contexts(
        cert_file=tls.cert_file, key_file=tls.key_file, ca_file=tls.ca_file,
        verify_clients=tls.verify_clients, core_ca_file=tls.core_ca_file,
        core_server_name=tls.core_server_name, core_addr=(cfg.core.host, cfg.core.port),
        peers_ca_file=tls.peers_ca_file,
    )


def tcp_limits(cfg: Config) -> TcpLimits:
    """The TCP pool's limits from the config; the core's address is exempt from the caps."""
    sip = cfg.sip
    return TcpLimits(
        max_connections=sip.tcp_max_connections,
        max_connections_per_ip=sip.tcp_max_connections_per_ip,
        message_timeout_s=sip.tcp_message_timeout_s,
        idle_timeout_s=sip.tcp_idle_timeout_s,
        write_buffer_max=sip.tcp_write_buffer_max,
        write_stall_timeout_s=sip.tcp_write_stall_timeout_s,
        connect_timeout_s=sip.tcp_connect_timeout_s,
        exempt=frozenset((cfg.core.host,)) if _is_ip(cfg.core.host) else frozenset(),
        ipv6_prefix=sip.ipv6_prefix,
        listen_backlog=sip.tcp_listen_backlog,
    )


def _trusted(cfg: Config) -> tuple[tuple[str, int], ...]:
    """Sources the flood guard never checks: the core."""
    return ((cfg.core.host, cfg.core.port),)


def _matcher(key: str) -> Callable[[str | None], bool]:
    """A number test for a suspension key: the number itself, or ``prefix*``."""
    store = SuspensionStore()
    store.add(key, "", "", 0.0)
    return lambda number: store.match(number, 0.0) is not None


def _drain_all(lists: list[NumberSet]) -> None:
    for numbers in lists:
        numbers.drain(let_loop_run)


def let_loop_run() -> None:
    """``RuleState.pause``: let go of the GIL for a moment — the event loop, waiting for it
    while a thread builds or empties a large number list, runs (a thread that has waited its
    switch interval gets the GIL before this one takes it back)."""
    time.sleep(0)


_SECRET_WORDS = ("token", "password", "secret", "key_file")


def _config_key(number: str) -> str:
    """A number of the config's ``suspended:`` list as a suspension key (for the order of
    ``GET /suspensions``): separators dropped."""
    try:
        return suspension_key(number)
    except ValueError:
        return number.strip()


def _redact(value: Any, name: str = "") -> Any:
    """Config data with secrets hidden: values of keys naming a token, password, secret or key
    file, and the password of a URL."""
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, name) for v in value]
    if value is not None and any(word in name for word in _SECRET_WORDS):
        return REDACTED
    if isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1]:
        scheme, rest = value.split("://", 1)
        userinfo, _, host = rest.rpartition("@")
        return f"{scheme}://{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"
    return value


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _call_setup(data: bytes) -> bool:
    """A new call's INVITE, or a CANCEL or ACK (which go where their INVITE went): on a
    worker's own port these go to the caller's worker, as on the public address."""
    return opens_call(data) or data.startswith((b"CANCEL ", b"ACK "))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True

