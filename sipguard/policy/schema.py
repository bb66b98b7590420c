"""The policy part of the config schema: the ``rules:`` tree and the ``peers:`` list.

:class:`RulesConfig` holds one optional section per rule (each rule's ``Settings`` class lives
beside the rule's module, in ``<rule>_settings``: the rules are compiled, pydantic models stay
Python) and remembers
the order the file lists them in, which is the order they are evaluated in. :class:`PeerConfig`
is one ``peers:`` item; its ``rules`` are the top-level rules with the peer's overrides merged
in (:func:`merge_peer_rules`, which the root config runs before validation).

The root of the file (``sipguard.ops.config.Config``) embeds these models; the policy never
imports it. What the policy reads of the whole configuration is :class:`PolicyConfig`, a
protocol the root config satisfies.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import phonenumbers
from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from sipguard.policy.callerid_settings import Settings as CallerIdSettings
from sipguard.policy.concurrency_settings import Settings as ConcurrencySettings
from sipguard.policy.dialer_settings import Settings as DialerSettings
from sipguard.policy.flood_settings import Settings as FloodSettings
from sipguard.policy.identity_settings import Settings as IdentitySettings
from sipguard.policy.national_cli_settings import Settings as NationalCliSettings
from sipguard.policy.rate_settings import Settings as RateSettings
from sipguard.policy.settings import FROZEN, ConfigModel, ConfigPath, networks, number_list

__all__ = ["PeerConfig", "PolicyConfig", "RulesConfig", "merge_peer_rules"]


# an entry of a peer's `numbers`: a number or prefix*, separators allowed, or "*"
_PEER_NUMBER = re.compile(r"\+?[0-9 ().-]+\*?|\*")


class RulesConfig(ConfigModel):
    """The ``rules:`` section: one key per rule, evaluated in the order the file lists them.

    A rule that is absent is off. Each rule's parameters, with defaults, are documented in its
    module under ``sipguard/policy/`` and in ``docs/rules.md``.
    """

    model_config = FROZEN

    callerid: CallerIdSettings | None = Field(default=None, description="Caller-ID spoofing.")
    identity: IdentitySettings | None = Field(
        default=None, description="STIR/SHAKEN Identity verification."
    )
    national_cli: NationalCliSettings | None = Field(
        default=None,
        description="National caller numbers arriving over international interconnects.",
    )
    concurrency: ConcurrencySettings | None = Field(
        default=None, description="Per-number concurrent call limits."
    )
    rate: RateSettings | None = Field(default=None, description="Call-rate limits (GCRA).")
    dialer: DialerSettings | None = Field(default=None, description="Dialer analytics.")
    flood: FloodSettings | None = Field(
        default=None, description="Flood and scanner defence (before parsing)."
    )
    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: Any) -> Any:
        model = handler(data)
        if isinstance(data, dict):
            model._order = tuple(k for k in data if data[k] is not None)
        elif isinstance(data, RulesConfig):
            model._order = data._order
        return model

    @property
    def order(self) -> tuple[str, ...]:
        """Names of the configured rules, in file order."""
        return tuple(n for n in self._order if getattr(self, n, None) is not None)


def _deep_merge(base: Any, over: Any) -> Any:
    """``over`` merged into ``base`` (mappings recursively; anything else replaced)."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _deep_merge(base.get(key), value) if key in base else value
        return out
    return over


def merge_peer_rules(data: Any) -> Any:
    """The raw config mapping with each peer's ``rules`` replaced by the top-level ``rules``
    with that peer's overrides merged in; anything not shaped like that is returned as is
    (validation then reports it)."""
    if not isinstance(data, dict) or not isinstance(data.get("peers"), list):
        return data
    top = data.get("rules") or {}
    peers = []
    for peer in data["peers"]:
        if isinstance(peer, dict) and isinstance(top, dict):
            over = peer.get("rules") or {}
            if isinstance(over, dict):
                merged = _deep_merge(top, over)
                # keep the file order of the top level, then rules only the peer adds
                peer = {**peer, "rules": merged}
        peers.append(peer)
    return {**data, "peers": peers}


def region_upper(value: object) -> object:
    """A ``default_region`` as written: ``us`` is ``US`` (the code's case says nothing)."""
    return value.strip().upper() if isinstance(value, str) else value


def known_region(value: str | None) -> str | None:
    """A ``default_region`` that is a region of the numbering plans; ValueError else."""
    if value is None:
        return None
    if value not in phonenumbers.SUPPORTED_REGIONS:
        hint = {"UK": " (the United Kingdom is GB)", "EL": " (Greece is GR)"}.get(value, "")
        raise ValueError(f"{value!r} is no region of the numbering plans{hint}")
    return value


# A ``default_region`` field (a peer's, the config's): any case, a region of the numbering plans
Region = Annotated[str | None, BeforeValidator(region_upper), AfterValidator(known_region)]


class PeerConfig(ConfigModel):
    """One peer (``peers:`` list item): who it is and what caller numbers it may present.

    - ``name`` (required): a label used in logs, metrics and the admin API.
    - ``networks`` (required): source CIDRs (IPv4/IPv6) this peer sends from.
    - ``numbers``: caller numbers it may present: exact E.164 numbers or ``+1212555*`` prefix
      patterns; ``numbers_file``: the same, one a line, ``#`` comments (up to millions of
      lines). Neither given: the peer may present any number.
    - ``default_region``: ISO country code (``US``) to read national-format numbers.
    - ``trust_pai`` (``true``): take the caller from P-Asserted-Identity when present.
    - ``interconnect`` (``domestic``): ``international`` for an international interconnection
      (rule ``national_cli`` acts on its calls only).
    - ``rules``: overrides merged over the top-level ``rules:`` for this peer's traffic.
    """

    model_config = FROZEN

    name: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Label in logs, metrics and the decision line (`peer`): letters, digits, "
        "`_.:-`.",
    )
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = Field(
        min_length=1,
        description="Source addresses of this peer, IPv4 and IPv6 CIDRs. An IPv4-mapped IPv6 "
        "source matches the IPv4 network; where networks of two peers overlap the most "
        "specific one wins.",
    )
    numbers: tuple[str, ...] = Field(
        default=(),
        description="Caller numbers the peer may present: numbers or `prefix*` (rule `callerid`, "
        "`ownership`). With neither `numbers` nor `numbers_file`, any number; visual separators "
        "are dropped (`+1 (212) 555-*`); a lone `*` is every number. With `default_region` a "
        "national entry counts in E.164 too: a whole number as the plan reads it, a prefix "
        "with a trunk 0 (`030123*`: `+4930123*`), without one where the plan has none (IT), "
        "NANP's with or without 1 — in the country code's main region only.",
    )
    numbers_file: ConfigPath | None = Field(
        default=None,
        description="The same, one a line, `#` comments; relative to the config file. A line "
        "that is not a number is an error naming `FILE:LINE`.",
    )
    default_region: Region = Field(
        default=None, pattern=r"^[A-Z]{2}$",
        description="ISO 3166 country code (e.g. `US`) to read national-format numbers in; "
        "null: none. Applies to every rule, the suspended list and the log "
        "(`2125550100` → `+12125550100`).",
    )
    trust_pai: bool = Field(
        default=True,
        description="The caller is P-Asserted-Identity when present; `false`: From, and the "
        "peer's PAI never reaches the core — removed from every request and response it sends "
        "(RFC 3325 §5; rule `callerid` puts its own on the INVITE). An unknown source's is removed "
        "too.",
    )
    interconnect: Literal["domestic", "international"] = Field(
        default="domestic",
        description="`international`: this peer hands over calls from abroad (an international "
        "interconnection); rule `national_cli` acts on its calls presenting a home-country "
        "number. `domestic`: a national carrier or a customer; `national_cli` never applies.",
    )
    tls_subject: str | None = Field(
        default=None,
        min_length=1,
        description="The peer is also matched by its TLS client certificate: a request from "
        "its networks counts as this peer only when it comes over TLS with a verified "
        "certificate naming this (subject CN or a SAN DNS name; needs `tls.ca_file`); "
        "otherwise it is an unknown source.",
    )
    rules: RulesConfig = Field(
        default=RulesConfig(),
        description="Overrides merged over the top-level `rules:` for this peer's traffic. "
        "Switch a rule off (`enabled: false`), change a value, or turn a rule on for this peer "
        "only.",
    )

    @field_validator("networks", mode="before")
    @classmethod
    def _strict_networks(cls, value: object) -> object:
        return networks(value)

    @field_validator("numbers", mode="before")
    @classmethod
    def _check_numbers(cls, value: Any) -> Any:
        return number_list(value, _PEER_NUMBER, "a number or a prefix pattern like '+1212555*'")

    @field_validator("numbers_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{'a directory, not a file' if value.is_dir() else 'file not found'}"
                             f": {value}")
        return value


class PolicyConfig(Protocol):
    """What the policy reads of the whole configuration (``sipguard.ops.config.Config``)."""

    @property
    def mode(self) -> Literal["enforce", "monitor"]:
        """``monitor``: decide and report, but forward; a rule's own ``mode`` overrides it."""
        ...

    @property
    def peers(self) -> Sequence[PeerConfig]: ...

    @property
    def unknown_source(self) -> Literal["reject", "drop"]: ...

    @property
    def suspended(self) -> Sequence[str]: ...

    @property
    def default_region(self) -> str | None:
        """National numbers of sources of no peer (no peers configured) read in it."""
        ...

    @property
    def rules(self) -> RulesConfig: ...

    @property
    def ipv6_prefix(self) -> int:
        """``sip.ipv6_prefix``: an IPv6 source is counted with its network of this many bits
        by the per-address limits (:mod:`sipguard.addresses`)."""
        ...
