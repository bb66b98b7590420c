"""Where a message comes from and where it goes: transports, local listeners, remote flows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(slots=True, init=False, unsafe_hash=True)
class Local:
    """One listening endpoint of sipguard, as the proxy core sees it."""

    index: int
    transport: str  # "udp" | "tcp"
    host: str  # address written into Via and Record-Route (advertised)
    port: int
    hostport: str  # "host:port" as written in Via and Record-Route (IPv6 in brackets)

    def __init__(self, index: int, transport: str, host: str, port: int) -> None:
        self.index = index
        self.transport = transport
        self.host = host
        self.port = port
        bracketed = ":" in host and not host.startswith("[")
        self.hostport = f"[{host}]:{port}" if bracketed else f"{host}:{port}"


class Flow(NamedTuple):
    """A remote peer on one transport: the source of a received message or a send target.

    ``conn`` identifies a TCP connection (responses go back on the connection the request
    came on); None means "any connection to ``addr``, opened if needed". ``local`` is the index
    of the listener the message arrived on / should leave from.
    """

    transport: str
    addr: tuple[str, int]
    local: int
    conn: int | None = None


class Target(NamedTuple):
    """A next hop named by a URI: the shell resolves ``host`` when it is not an IP literal."""

    transport: str
    host: str
    port: int
