"""Connecting to Redis / Valkey: one server, Sentinel, or Cluster; key names and hash slots.

Every sipguard key is ``<prefix>{<ident>}:<kind>``: the part in braces is the Redis Cluster
*hash tag*, the number (or peer, or address) the key is about. So all of one number's keys —
its live calls as caller, its rate bucket — sit in one slot, and one script can check and take
them together. With one server or Sentinel every key is in "one slot" as far as sipguard cares.

redis-py's asyncio client is used (with hiredis for parsing when installed). The connection
pool blocks (up to the call's timeout) instead of failing when all its connections are busy,
so a burst waits a little rather than tripping the circuit breaker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot

MAX_CONNECTIONS = 64  # per process; a round trip takes one for ~0.1-1 ms


@dataclass(frozen=True, slots=True)
class Where:
    """How to reach the store (the ``state:`` config section, as plain values)."""

    url: str | None = None
    cluster: bool = False
    sentinel_master: str | None = None
    sentinel_nodes: tuple[tuple[str, int], ...] = ()
    timeout_s: float = 0.05


def connect(where: Where) -> Redis | RedisCluster:
    """A client (no I/O yet: connections open on first use). Socket timeouts are a few times
    the per-call timeout so a dead server is noticed by the call's own deadline first."""
    sock_timeout = max(0.25, where.timeout_s * 4)
    common: dict[str, Any] = {
        "socket_timeout": sock_timeout,
        "socket_connect_timeout": sock_timeout,
        "decode_responses": False,
    }
    if where.sentinel_master is not None:
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2
            list(where.sentinel_nodes), sentinel_kwargs=dict(common), **common
        )
        master: Redis = sentinel.master_for(where.sentinel_master)
        return master
    assert where.url is not None
    url = where.url.replace("valkey://", "redis://", 1).replace("valkeys://", "rediss://", 1)
    if where.cluster:
        return RedisCluster.from_url(url, max_connections=MAX_CONNECTIONS, **common)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=max(0.1, where.timeout_s * 2), **common
    )
    return Redis(connection_pool=pool)


def key(prefix: str, ident: str, kind: str) -> str:
    """``prefix{ident}:kind``; braces in ``ident`` (never in a number) are dropped so the hash
    tag stays the whole ident."""
    if "{" in ident or "}" in ident:
        ident = ident.replace("{", "").replace("}", "")
    return f"{prefix}{{{ident}}}:{kind}"


def by_slot(keys: Sequence[str], cluster: bool) -> list[list[int]]:
    """Indices of ``keys`` grouped by hash slot (one group when not a cluster), first
    appearance order."""
    if not cluster:
        return [list(range(len(keys)))]
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(key_slot(k.encode()), []).append(i)
    return list(groups.values())
