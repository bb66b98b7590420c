"""File descriptors: what a config needs, the soft limit raised toward it, the TCP cap fitted.

Every TCP/TLS connection holds one descriptor, and so do the listeners, the admin API's
connections, Redis, the log and state files and the event loop itself. When the process's
``RLIMIT_NOFILE`` (``ulimit -n``) is below what they may take, ``accept()`` fails with
EMFILE: new connections wait in the listen backlog, and the admin API (``GET /metrics``) is
refused with them. So at start, in the single process and in every worker
(``sipguard run`` calls :func:`apply` before it binds anything):

1. :func:`budget` counts what the config may need, per process:

   - ``sip.tcp_max_connections`` — connections with parties, inbound and outbound, each
     process its own (``transport/tcp.py``);
   - :data:`BEYOND_CAP` (256) — connections admitted beyond that cap: the core's (its
     address is exempt from the caps) and, with peers configured, the peers' (admitted
     beyond the total cap);
   - the reserve for everything else: :data:`BASE_RESERVE` (64: standard streams, the event
     loop's epoll, eventfds and signal pipe, libuv's and the TCP pool's spare descriptor, the
     UDP send thread, the state file and journal, the shared-memory segment, the workers'
     sockets, DNS lookups and file reads on helper threads), each listening socket (a worker
     binds two per ``listen`` entry: its own port and the shared one), the admin API's
     ``admin.max_connections`` plus its listener (and, with workers, one connection to each
     other worker for ``/metrics``), with ``state.backend: redis`` the client's pool
     (:data:`REDIS_CONNECTIONS`), with rule ``identity`` its
     ``max_concurrent_fetches`` and with rule ``national_cli``'s ``roaming_lookup`` its
     ``max_concurrent`` (the largest of the top level's and the peers').

2. :func:`raise_soft_limit` raises the soft limit toward ``min(hard limit, needed)`` with
   ``setrlimit`` (what nginx and haproxy do); it never lowers it.

3. :func:`fit` gives the TCP pool (``TcpPool.fd_room``, ``fd_cap``) its room: ``soft -
   reserve`` descriptors for TCP/TLS connections in all (a ceiling for every connection, the
   core's and peers' included), and a cap on connections from parties of that room less
   what is kept beyond it (BEYOND_CAP, at most a quarter of the room); the pool applies the
   lower of it and ``sip.tcp_max_connections``, a reloaded one included. Connections beyond
   are closed at once and counted as any beyond the cap (``tcp_refused_total``), and the
   admin API keeps its descriptors.

Still below what is needed, one warning at start (the CLI's): ``fd_limit_low`` with
``soft``, ``hard``, ``needed``, ``tcp_max_connections``, ``tcp_connections_limit`` (the cap
in force), the ``reserve`` by part and ``fix`` (what to do); ``fd_limit_raised`` when the
soft limit was raised and suffices. The gauges ``fd_limit``, ``fd_needed``, ``fd_open`` and
``tcp_connections_limit`` are exported on ``/metrics`` (:meth:`FdLimit.gauges`, read when
scraped; ``fd_needed`` of the config running then).

The limit is read at start only: raising the hard limit of a running process (``prlimit``)
takes a restart to be used.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

from sipguard.ops.config import Config

__all__ = [
    "BASE_RESERVE",
    "BEYOND_CAP",
    "REDIS_CONNECTIONS",
    "FdBudget",
    "FdLimit",
    "apply",
    "budget",
    "fit",
    "raise_soft_limit",
]

# Descriptors a process holds besides connections, listeners and the clients counted below: 3
# standard streams, the event loop's (epoll, io_uring, 2 eventfds, a signal pipe pair, libuv's
# spare), the TCP pool's spare, the state file and its journal being written, the
# shared-memory segment, the workers' hand-over socket and supervisor link, DNS lookups and
# number-list reads on helper threads. ~17 are open in a plain start; the rest is margin.
BASE_RESERVE = 64
# Connections the caps let beyond sip.tcp_max_connections: the core's (exempt from the caps)
# and peers' (admitted beyond the total cap). At most a quarter of the room when the limit is
# low.
BEYOND_CAP = 256
# state.backend redis: the client's pool (transport/redis_client.MAX_CONNECTIONS, 64), the
# pipelined connection, the shared lists' subscription, a sentinel lookup
REDIS_CONNECTIONS = 68
FIX = ("raise the open-files limit: `ulimit -n N` in the shell that starts sipguard, "
       "LimitNOFILE=N in its systemd unit, `docker run --ulimit nofile=N:N` (compose: ulimits: "
       "nofile), or lower sip.tcp_max_connections")


@dataclass(frozen=True, slots=True)
class FdBudget:
    """What one process of a config may need, by part (see the module's text)."""

    tcp: int  # sip.tcp_max_connections
    beyond: int  # the core's and peers' connections beyond it (BEYOND_CAP)
    parts: tuple[tuple[str, int], ...]  # the reserve, by what it is for

    @property
    def reserve(self) -> int:
        return sum(n for _, n in self.parts)

    @property
    def needed(self) -> int:
        return self.tcp + self.beyond + self.reserve


def _rules(cfg: Config) -> list[Any]:
    return [cfg.rules, *(p.rules for p in cfg.peers)]


def budget(cfg: Config, worker: bool = False) -> FdBudget:
    """The descriptors one process of ``cfg`` may need (``worker``: one of ``workers``)."""
    listeners = len(cfg.listen) * (2 if worker else 1)
    parts: list[tuple[str, int]] = [("base", BASE_RESERVE), ("listeners", listeners)]
    admin = cfg.http
    if admin.host_port is not None:
        parts.append(("admin", admin.max_connections + 1 + (cfg.workers - 1 if worker else 0)))
    if cfg.state.backend == "redis":
        parts.append(("redis", REDIS_CONNECTIONS))
    fetches = max((r.identity.max_concurrent_fetches for r in _rules(cfg)
                   if r.identity is not None), default=0)
    if fetches:
        parts.append(("identity_fetches", fetches))
    lookups = max((r.national_cli.roaming_lookup.max_concurrent for r in _rules(cfg)
                   if r.national_cli is not None and r.national_cli.roaming_lookup is not None),
                  default=0)
    if lookups:
        parts.append(("roaming_lookups", lookups))
    return FdBudget(cfg.sip.tcp_max_connections, BEYOND_CAP, tuple(parts))


def _finite(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY or value < 0 else value


def raise_soft_limit(needed: int) -> tuple[int | None, int | None, int | None]:
    """Raise the soft RLIMIT_NOFILE toward ``min(hard, needed)`` (never lower it): (soft
    before, soft now, hard); None for unlimited. A refused ``setrlimit`` keeps the old one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before, top = _finite(soft), _finite(hard)
    if before is None or before >= needed:
        return before, before, top
    target = needed if top is None else min(top, needed)
    if target > before:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # above fs.nr_open, or a sandbox that refuses it
            return before, before, top
        return before, target, top
    return before, before, top


def fit(need: FdBudget, soft: int | None) -> tuple[int | None, int | None]:
    """(room, cap) for a soft limit: ``room`` descriptors for TCP/TLS connections in all,
    and ``cap``, what the limit allows connections from parties, the room less the part kept
    for the core's and peers' connections (``need.beyond``, at most a quarter of the room);
    None, None: unlimited."""
    if soft is None:
        return None, None
    room = max(0, soft - need.reserve)
    return room, room - min(need.beyond, room // 4)


@dataclass(slots=True)
class FdLimit:
    """The outcome of :func:`apply` for this process."""

    soft: int | None  # the soft limit now (None: unlimited)
    hard: int | None
    before: int | None  # the soft limit sipguard started with
    need: FdBudget
    room: int | None  # descriptors for TCP/TLS connections in all (None: unlimited)
    fd_cap: int | None  # connections from parties the limit allows (None: unlimited)

    @property
    def cap(self) -> int:
        """Connections from parties at most: sip.tcp_max_connections, or lower."""
        return self.need.tcp if self.fd_cap is None else min(self.need.tcp, self.fd_cap)

    @property
    def low(self) -> bool:
        return self.soft is not None and self.soft < self.need.needed

    def fields(self) -> dict[str, Any]:
        """The start-up line's fields."""
        out: dict[str, Any] = {"soft": self.soft, "hard": self.hard, "needed": self.need.needed}
        if self.before != self.soft:
            out["raised_from"] = self.before
        return {**out, "tcp_max_connections": self.need.tcp, "tcp_connections_limit": self.cap,
                "reserve": dict(self.need.parts), "beyond_cap": self.need.beyond}

    def gauges(self, cfg: Config | None = None, worker: bool = False) -> dict[str, float]:
        """``fd_limit`` (the soft limit, -1: unlimited), ``fd_needed`` (of ``cfg``, the config
        running now, when given), ``fd_open`` (descriptors open now; -1: not known) and
        ``tcp_connections_limit`` (this process's cap on connections from parties, the
        config's or lower)."""
        needed = self.need if cfg is None else budget(cfg, worker)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        tcp = needed.tcp if self.fd_cap is None else min(needed.tcp, self.fd_cap)
        count = open_descriptors()
        return {
            "fd_limit": float(-1 if _finite(soft) is None else soft),
            "fd_needed": float(needed.needed),
            "fd_open": float(-1 if count is None else count),
            "tcp_connections_limit": float(tcp),
        }


def open_descriptors() -> int | None:
    """Descriptors this process holds now (Linux: /proc/self/fd; None elsewhere or when even
    that cannot be opened)."""
    if sys.platform != "linux":
        return None
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself held
    except OSError:
        return None


def apply(cfg: Config, worker: bool = False) -> FdLimit:
    """Raise the soft limit for ``cfg`` and fit the TCP cap to it (see the module's text)."""
    need = budget(cfg, worker)
    before, soft, hard = raise_soft_limit(need.needed)
    room, fd_cap = fit(need, soft)
    return FdLimit(soft=soft, hard=hard, before=before, need=need, room=room, fd_cap=fd_cap)
