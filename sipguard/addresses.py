"""How the per-address limits count a source address.

The flood guard (``rules.flood`` with ``key: ip``), ``rules.rate.per_source_ip`` and the TCP
per-address cap (``sip.tcp_max_connections_per_ip``) each count a source under a key. An IPv4
address is its own key. An IPv6 address is counted with its network of ``sip.ipv6_prefix``
bits (default 64): a customer or a cloud instance gets a whole /64, so counted per address a
single holder could spread a flood over 2^64 addresses and stay under every limit. The key is
written ``network/prefix`` (``2001:db8:1:2::/64``), which is also how a ban shows in
``GET /bans`` and how it is lifted (any address inside the network lifts it too).

An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, a dual-stack socket's view of an IPv4
source) keeps its whole address, and a prefix of 128 counts every IPv6 address on its own. A
link-local scope id (``%eth0``) is not part of the key. The callers keep an address in a
configured peer's (or the flood guard's exempt) networks on its own: a peer listed by its
address must not share a ban or a count with its neighbours in the /64. A reload that changes
the prefix moves each ban on a network to the new network of its first address.
"""

from __future__ import annotations

import ipaddress
import socket

_V4_MAPPED = bytes(10) + b"\xff\xff"


def source_key(ip: str, ipv6_prefix: int) -> str:
    """The key the per-address limits count ``ip`` under (see the module's text). Cheap for
    IPv4 (one ``in`` test); an IPv6 address costs a parse and a format (~1 µs)."""
    if ":" not in ip or ipv6_prefix >= 128:
        return ip
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
    except OSError:  # not an address (a test's made-up name): counted as it is
        return ip
    if packed[:12] == _V4_MAPPED:
        return ip
    drop = 128 - max(ipv6_prefix, 0)
    network = (int.from_bytes(packed, "big") >> drop) << drop
    return f"{socket.inet_ntop(socket.AF_INET6, network.to_bytes(16, 'big'))}/{128 - drop}"


def unmapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address
             ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address an IPv4-mapped IPv6 one (``::ffff:192.0.2.1``, a dual-stack socket's
    view of an IPv4 source) stands for; any other address as it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip

