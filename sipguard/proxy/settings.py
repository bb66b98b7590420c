"""What the proxy core is configured with: listeners, the core, timers, limits.

Made by the shell from the config file (``server.proxy_settings``) and replaced whole on
reload (``Proxy.configure``); transactions and dialogs in progress carry on.
"""

from __future__ import annotations

from dataclasses import dataclass

from sipguard.contract import Flow, Local
from sipguard.sip.nameaddr import NameAddr
from sipguard.sip.parser import DEFAULT_LIMITS, ParseLimits


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """What the core needs from the config (times in seconds)."""

    locals: tuple[Local, ...]
    core: Flow
    max_message_size: int = 65535
    parse_limits: ParseLimits = DEFAULT_LIMITS
    max_dialog_lifetime: float = 14400.0
    answer_options: bool = True
    record_route: bool = True
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    timer_c: float = 185.0
    # Out-of-dialog methods accepted from outside (ACK and CANCEL that match always are);
    # others are answered 405 with Allow. "*": every method (a general-purpose proxy).
    allow_methods: frozenset[str] = frozenset({"INVITE", "OPTIONS"})
    # Header names (lower case) removed from every request from outside: sipguard's own
    # verdict headers and whatever the operator adds (sip.strip_headers).
    strip_headers: frozenset[str] = frozenset({"x-sipguard-verdict", "x-sipguard-identity"})
    max_transactions: int = 500_000  # live server transactions; beyond, new requests get 503
    # (a request within a live call: up to max_dialogs more, see Proxy._in_progress)
    max_dialogs: int = 100_000  # live dialogs; beyond, new INVITEs get 503
    # the bytes of the requests those tables hold (a sender chooses a message's size, up to
    # max_message_size: a count alone bounds no memory); beyond, as above
    max_transaction_bytes: int = 512 << 20
    max_dialog_bytes: int = 256 << 20
    # of those, the bytes one call's requests from outside hold (its BYE is never refused)
    max_call_request_bytes: int = 256 << 10
    max_subscriptions: int = 10_000  # subscriptions kept (proxy/subscriptions.py)
    busy_retry_after_s: int = 5  # Retry-After on those 503s
    dialog_keepalive: float | None = None  # in-dialog OPTIONS every this many s (None: off)
    # over TCP/TLS, any connection from the core's address is the core's (sip.core_tcp_any_port)
    core_tcp_any_port: bool = False
    # a 503 from the core goes upstream as it is (else as a 500: sip.relay_core_503)
    relay_core_503: bool = True


# (next hop, rewritten start line or None, remaining Route entries or None when unchanged)
NextHop = tuple[Flow | None, bytes | None, list[NameAddr] | None]
