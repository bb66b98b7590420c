"""Where a request goes: RFC 3261 §16.3–16.5 validation, Route pre-processing, next hop.

:class:`Router` knows sipguard's own addresses (the listeners) and the core, tells a loop from
a spiral by the loop hash of sipguard's Via (RFC 3261 §16.3 step 4), and picks the next hop.
From the outside sipguard is no open relay: every request goes to the core whatever Route or
Request-URI it carries. Requests from the core follow their Route, else their Request-URI.
"""

from __future__ import annotations

from typing import Final, TypeVar

from sipguard.contract import Flow, Local
from sipguard.proxy import build
from sipguard.proxy.settings import NextHop, ProxySettings
from sipguard.sip.errors import SipParseError
from sipguard.sip.message import Message
from sipguard.sip.nameaddr import NameAddr
from sipguard.sip.uri import Uri

SUPPORTED_SCHEMES: Final = frozenset({"sip", "sips", "tel"})
MAX_FORMER_NAMES: Final = 16  # host:port sipguard advertised before reloads, still its own
_K = TypeVar("_K")


def _has_our_via(msg: Message) -> bool:
    """A Via line of the request carries a branch sipguard could have made (a quick test on
    the raw lines, before any Via is parsed; ``find``, not ``in``: see sip/parser.py)."""
    ours = build.OUR_PREFIX_BYTES
    lines = msg.lines
    return any(lines[i].find(ours) >= 0 for i in msg.indexes("via"))


def remember(recent: dict[_K, None], key: _K, most: int) -> None:
    """Put ``key`` last in ``recent`` (an insertion-ordered set, oldest first) and forget the
    oldest beyond ``most``: what reloads replaced and calls up may still name."""
    recent.pop(key, None)
    recent[key] = None
    while len(recent) > most:
        del recent[next(iter(recent))]


def local_for(locals_: tuple[Local, ...] | list[Local], transport: str, host: str = "") -> Local:
    """The listener to send to ``host`` over ``transport`` from: the first of that transport
    whose socket reaches the host's address family (an IPv6 literal from an IPv6 listener,
    an IPv4 one from an IPv4 listener: a socket of one family cannot send to the other);
    for a host name, or when no listener has the family, the first of that transport."""
    family = 0
    if ":" in host:
        family = 6
    elif host.count(".") == 3 and host.replace(".", "").isdigit():
        family = 4  # an IPv4 literal (a host name may end in a digit too: core1)
    first: Local | None = None
    for loc in locals_:
        if loc.transport == transport:
            if not family or loc.family == family:
                return loc
            if first is None:
                first = loc
    return first if first is not None else locals_[0]


class Router:
    """Validation and next-hop choice for one proxy; ``configure`` on reload."""

    def __init__(
        self,
        settings: ProxySettings,
        ids: build.Ids,
    ) -> None:
        self.ids = ids
        self.settings = settings
        self._ours: set[str] = set()
        self._former: dict[str, None] = {}  # host:port advertised before a reload, oldest first
        self.configure(settings)

    def configure(self, settings: ProxySettings) -> None:
        """Apply new settings (reload). The host:port sipguard wrote into Record-Route before
        stay its own too (at most :data:`MAX_FORMER_NAMES`): a wildcard listener advertises
        its address toward the core, which a reload of ``core`` can change, and the calls up
        name the old one in their Route."""
        self.settings = settings
        names: set[str] = set()
        for loc in settings.locals:
            host = loc.host.strip("[]").lower()
            names.add(f"{host}:{loc.port}")
        for name in self._ours - names:
            remember(self._former, name, MAX_FORMER_NAMES)
        self._ours = names | set(self._former)

    def is_ours(self, uri: Uri) -> bool:
        if uri.scheme not in ("sip", "sips"):
            return False
        host = uri.host.strip("[]").lower()
        port = uri.port or (5061 if uri.scheme == "sips" else 5060)
        return f"{host}:{port}" in self._ours

    def names_core(self, uri: Uri) -> bool:
        """A Route entry naming the configured core by its address and port (5061 unsaid
        for sips: / transport=tls, else 5060)."""
        if uri.scheme not in ("sip", "sips") or uri.user is not None or uri.has_param("maddr"):
            return False  # (a maddr or a user part would send the core elsewhere)
        tls = uri.scheme == "sips" or (uri.param("transport") or "").lower() == "tls"
        host, port = self.settings.core.addr
        return uri.host.strip("[]").lower() == host.lower() and \
            (uri.port or (5061 if tls else 5060)) == port

    def local_for(self, transport: str, host: str = "") -> Local:
        """The listener to send to ``host`` over ``transport`` from: see :func:`local_for`."""
        return local_for(self.settings.locals, transport, host)

    def has_tls(self) -> bool:
        return any(loc.transport == "tls" for loc in self.settings.locals)

    def flow_for_uri(self, uri: Uri) -> Flow:
        """The next hop a URI names (RFC 3263 without DNS): ``sips:`` and ``transport=tls`` go
        over TLS (default port 5061) when sipguard has a ``tls://`` listener, over TCP (port
        5060 unless given) when it has none."""
        transport = (uri.param("transport") or "udp").lower()
        default_port = 5060
        if uri.scheme == "sips" or transport == "tls":
            if self.has_tls():
                transport, default_port = "tls", 5061
            else:
                transport = "tcp"  # no tls:// listener: TCP is the closest fit
        if transport not in ("udp", "tcp", "tls"):
            raise SipParseError(416, f"unsupported transport {transport}")
        host = (uri.param("maddr") or uri.host).strip("[]")
        if not host:
            raise SipParseError(416, "URI without a host cannot be routed")
        port = uri.port or default_port
        return Flow(transport, (host, port), self.local_for(transport, host).index)

    def reply_flow(self, msg: Message, flow: Flow) -> Flow:
        """Where responses to ``msg`` go (RFC 3261 §18.2.2 + RFC 3581): over TCP/TLS the
        connection it came on; when that has closed, a connection to the source address and
        the Via's sent-by port (not the closed connection's own, temporary port)."""
        via = msg.top_via
        if flow.transport != "udp":
            port = via.port or (5061 if flow.transport == "tls" else 5060)
            return flow if port == flow.addr[1] else Flow(
                flow.transport, (flow.addr[0], port), flow.local, flow.conn)
        if via.has_rport:
            return flow
        return Flow("udp", (flow.addr[0], via.port or 5060), flow.local)

    def is_core(self, flow: Flow) -> bool:
        """``flow`` comes from the core (see :func:`flow_is_core`)."""
        s = self.settings
        return flow_is_core(flow, s.core, s.core_tcp_any_port)

    def validate(self, msg: Message) -> int:
        """RFC 3261 §16.3: the status to answer with, 200 for a local OPTIONS, or 0 to go on."""
        uri = msg.request_uri
        if uri.scheme not in SUPPORTED_SCHEMES:
            return 416
        mf = msg.max_forwards
        local_options = (
            msg.method == "OPTIONS"
            and self.settings.answer_options
            and msg.to_tag is None
            and not msg.has("route")
            and (uri.user is None or mf == 0)
            and (self.is_ours(uri) or mf == 0)
        )
        if local_options:
            return 200
        if mf == 0:
            return 483
        if msg.has("proxy-require") and msg.option_tags("proxy-require"):
            return 420
        if self.is_loop(msg):
            return 482
        return 0

    def is_loop(self, msg: Message) -> bool:
        """RFC 3261 §16.3 step 4: our own Via with the same loop hash means a loop, not a spiral."""
        if not _has_our_via(msg):
            return False
        loop = build.loop_hash(self.ids, msg)
        for via in msg.vias:
            branch = via.branch or ""
            if branch.startswith(build.OUR_PREFIX) and branch.endswith("." + loop):
                host = via.host.strip("[]").lower()
                if f"{host}:{via.port or 5060}" in self._ours:
                    return True
        return False

    def preprocess_route(self, msg: Message, flow: Flow, initial: bool,
                         from_core: bool | None = None) -> NextHop:
        """RFC 3261 §16.4 and §16.5: drop our own Route entries, pick the next hop.
        ``from_core``: the request is the core's (None: ``flow`` is the configured core's;
        the proxy also counts the core a call went to before a reload).

        Returns (target, new start line or None, remaining routes or None when unchanged).
        """
        start_line = None
        routes: list[NameAddr] | None = None
        uri = msg.request_uri
        if msg.has("route"):
            routes = list(msg.routes)
            if uri.has_param("lr") and self.is_ours(uri) and routes:
                # The previous hop was a strict router: the real target is the last Route.
                last = routes.pop()
                uri = last.uri
                start_line = f"{msg.method} {last.uri} SIP/2.0".encode()
            # Ours first: one entry, or the pair one pass wrote when it changed transport or
            # listener (RFC 5658) — two different URIs. The same URI again is another pass
            # through sipguard (a spiral through a core that does not record-route): that
            # one is for the next pass (RFC 3261 §16.4: the first value only).
            popped = 0
            first = ""
            while routes and popped < 2 and self.is_ours(routes[0].uri):
                if popped and routes[0].uri.raw == first:
                    break
                first = routes.pop(0).uri.raw
                popped += 1
            if not popped and start_line is None:
                routes = None  # untouched
        remaining = routes if routes is not None else (msg.routes if msg.has("route") else [])
        if self.is_core(flow) if from_core is None else from_core:
            if remaining:
                return self.flow_for_uri(remaining[0].uri), start_line, routes
            if self.is_ours(uri):
                return None, None, None
            return self.flow_for_uri(uri), start_line, routes
        # From the outside sipguard is no open relay: every request goes to the core, whatever
        # Route or Request-URI it carries (the core routes in-dialog requests on by them).
        # Whether an in-dialog request may come from this source at all is the proxy core's
        # check (the dialog's outside party). A new request's Route entries beyond sipguard's
        # own are the sender's pre-loaded route: a core that routes on them would carry an
        # accepted call on to wherever the peer chose — removed, but for the core's own.
        if initial and msg.has("route"):
            # (entries naming the core itself stay: a Service-Route, RFC 3608)
            return self.settings.core, start_line, [
                r for r in remaining if self.names_core(r.uri)]
        return self.settings.core, start_line, routes


def flow_is_core(flow: Flow, core: Flow, any_port: bool = False) -> bool:
    """True when ``flow`` comes from the configured core address.

    Over TCP this holds for the connection sipguard opened to the core (which the core reuses
    for its own requests, RFC 5923 style) — a connection the core opens from an ephemeral port
    counts as an outside source, unless ``any_port`` (``sip.core_tcp_any_port``): then any
    TCP/TLS connection from the core's address is the core's (a stream cannot be spoofed) —
    also with a UDP core, which sends a message too large for a datagram over TCP (RFC 3261
    §18.1.1).
    """
    if flow.transport != core.transport:  # (a TLS core is never plain TCP)
        return any_port and core.transport == "udp" and flow.transport != "udp" and \
            flow.addr[0] == core.addr[0]
    if flow.addr == core.addr:
        return True
    return any_port and flow.transport != "udp" and flow.addr[0] == core.addr[0]
