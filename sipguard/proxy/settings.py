"""What the proxy core is configured with: listeners, the core, timers, limits.

Made by the shell from the config file (``server.proxy_settings``) and replaced whole on
reload (``Proxy.configure``); transactions and dialogs in progress carry on.
"""

from __future__ import annotations

from dataclasses import dataclass

from sipguard.contract import Flow, Local
from sipguard.sip.nameaddr import NameAddr


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """What the core needs from the config (times in seconds)."""

    locals: tuple[Local, ...]
    core: Flow
    max_message_size: int = 65535
    max_dialog_lifetime: float = 14400.0
    answer_options: bool = True
    record_route: bool = True
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    timer_c: float = 180.0


# (next hop, rewritten start line or None, remaining Route entries or None when unchanged)
NextHop = tuple[Flow | None, bytes | None, list[NameAddr] | None]
