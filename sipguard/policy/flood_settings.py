"""The parameters of rule ``flood`` (``rules.flood`` in the config): :class:`Settings`. The rule
itself is :mod:`sipguard.policy.flood`. Its parameters live apart from the rule because the rule is compiled
(:mod:`sipguard.native`) and pydantic models stay plain Python.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, field_validator

from sipguard.policy.settings import RuleSettings, networks

DEFAULT_SCANNERS = (
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "sip-scan",
    "sipscan",
    "iwar",
    "sundayddr",
    "vaxsipuseragent",
    "pplsip",
    "sivus",
    "siparmyknife",
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Settings(RuleSettings):
    """Parameters of rule ``flood`` (``rules.flood`` in the config)."""

    sampling_s: float = Field(
        default=2.0, gt=0, le=3600, description="Sampling unit, seconds (like Kamailio pike)."
    )
    density: int = Field(
        default=300, ge=1, le=10_000_000,
        description="Messages per sampling unit from one source before it is banned (a "
        "configured peer is only limited to it, see `ban_peers`). The previous unit counts in "
        "proportion to its overlap with the last `sampling_s`, so a burst across a boundary is "
        "not missed.",
    )
    ban_s: float = Field(
        default=300, gt=0, le=30 * 86400,
        description="How long a banned source is dropped, seconds.",
    )
    ban_peers: bool = Field(
        default=False,
        description="Ban configured peers too when they exceed their density. Off, a peer's "
        "messages over the density are dropped (`peer_limited`) but it is never banned, so a "
        "flood spoofing a carrier's address cannot cut its calls off for `ban_s`.",
    )
    key: Literal["ip", "ip_port"] = Field(
        default="ip",
        description="Count and ban per address (ip; an IPv6 address with its network of "
        "`sip.ipv6_prefix` bits) or per address and port (ip_port). "
        "Per address and port suits many parties behind one address or a lab on 127.0.0.1, but a scanner "
        "that changes ports then gets through.",
    )
    scanners: tuple[str, ...] = Field(
        default=DEFAULT_SCANNERS,
        description="User-Agent substrings of known scanners, any case, without control "
        "characters. Only the header block is read, and each User-Agent line on its own.",
    )
    scanner_ban: bool = Field(
        default=True, description="Ban a scanner's source too (never a configured peer's)."
    )
    register_from_unknown: Literal["drop", "pass"] = Field(
        default="drop",
        description="REGISTER from an address in no peer's networks (with peers configured): "
        "drop or pass.",
    )
    exempt: tuple[IPNetwork, ...] = Field(
        default=(),
        description="CIDRs never counted, dropped or banned (monitoring, a second core).",
    )
    max_sources: int = Field(
        default=100_000, ge=100, le=100_000_000,
        description="Sources counted per sampling unit. Beyond it new sources go uncounted "
        "until the next unit.",
    )
    max_bans: int = Field(
        default=100_000, ge=10, le=100_000_000,
        description="Bans kept; ended bans are swept first, then the oldest lifted.",
    )

    @field_validator("scanners")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not item.strip():
                raise ValueError("a scanner User-Agent substring must not be empty")
            if any(ord(c) < 32 or ord(c) == 127 for c in item.strip()):
                raise ValueError(f"a scanner User-Agent substring is one line of text, without "
                                 f"control characters: {item!r}")
        return value

    @field_validator("exempt", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        return networks(value)
