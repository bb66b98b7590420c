"""The parameters of rule ``national_cli`` (``rules.national_cli`` in the config): :class:`Settings`
and the roaming lookup's (:class:`RoamingLookup`). The rule itself is
:mod:`sipguard.policy.national_cli`. Its parameters live apart from the rule because the rule is compiled
(:mod:`sipguard.native`) and pydantic models stay plain Python.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from sipguard.policy.callerid_settings import Redress
from sipguard.policy.peers import NUMBER_PATTERN
from sipguard.policy.settings import FROZEN, Answer, ConfigModel, RuleSettings, number_list

Action = Literal["block", "anonymise", "allow"]


class RoamingLookup(ConfigModel):
    """An HTTP endpoint that tells whether a number is a subscriber roaming abroad."""

    model_config = FROZEN

    url: str = Field(
        pattern=r"^https?://[^\s?#]+$",
        description="Asked `GET url?number=+E164`; answers JSON `{\"roaming\": true|false}` "
        "(an operator's HLR / number-portability service behind a small HTTP front).",
    )
    timeout_ms: int = Field(
        default=300, ge=10, le=10_000,
        description="Longest wait for an answer; past it `on_error` applies.",
    )
    on_error: Action = Field(
        default="allow",
        description="Action when the lookup fails, times out or answers something else than "
        "`{\"roaming\": bool}`: block, anonymise or allow.",
    )
    cache_s: float = Field(
        default=300.0, ge=0, le=86_400,
        description="How long an answer is kept per number (up to 10,000 numbers); 0: not "
        "cached. Failures are not cached.",
    )
    max_concurrent: int = Field(
        default=64, ge=1, le=10_000,
        description="Lookups running at once at most; beyond, `on_error` applies at once.",
    )


class Settings(RuleSettings):
    """Parameters of rule ``national_cli`` (``rules.national_cli`` in the config)."""

    home_countries: tuple[str, ...] = Field(
        default=(),
        description="E.164 country codes (`31`, `\"44\"`) or longer number prefixes "
        "(`+3120`) whose numbers must not arrive over an international interconnect; empty: "
        "the rule never acts.",
    )
    fixed: Action = Field(
        default="block", description="Action for fixed-line numbers: block, anonymise, allow."
    )
    mobile: Action = Field(
        default="block", description="Action for mobile numbers: block, anonymise, allow."
    )
    other: Action = Field(
        default="allow",
        description="Action for every other type (toll-free, VoIP, premium, shared cost, "
        "unknown): block, anonymise, allow.",
    )
    answer: Answer = Field(
        default=Answer(status=603, phrase="Network Blocked"),
        description="What a blocked caller hears (603 Network Blocked: sent as 603+ with the "
        "redress Reason).",
    )
    redress: Redress | None = Field(
        default=None,
        description="The 603+ Reason (ATIS-1000099); null: rule `callerid`'s `redress` when "
        "that rule is configured, else its defaults.",
    )
    keep_pai_to_core: bool = Field(
        default=False,
        description="On `anonymise`, keep P-Asserted-Identity toward the core (with `Privacy: "
        "id`, RFC 3325); false: removed.",
    )
    roaming_allow: tuple[str, ...] = Field(
        default=(),
        description="Numbers and `prefix*` of subscribers roaming abroad: always allowed.",
    )
    roaming_lookup: RoamingLookup | None = Field(
        default=None,
        description="Ask an HTTP endpoint whether the number is roaming (`{url, timeout_ms, "
        "on_error, cache_s}`); null: no lookup.",
    )
    verdict_header: str | None = Field(
        default="X-Sipguard-Verdict",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9.!%*_+`'~-]*$",
        description="Header telling the core why a call was anonymised; null: none.",
    )

    @field_validator("home_countries", mode="before")
    @classmethod
    def _codes_as_written(cls, value: object) -> object:
        """``[31, 44]`` as YAML reads it unquoted: country codes, taken as written (a bool or
        a float is no country code: left for the check below to refuse)."""
        if isinstance(value, list | tuple):
            return [str(v) if type(v) is int else v for v in value]
        return value

    @field_validator("home_countries")
    @classmethod
    def _check_home(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for item in value:
            text = str(item).strip()
            digits = text[1:] if text.startswith("+") else text
            if not (digits.isdigit() and digits.isascii() and digits[0] != "0"
                    and len(digits) <= 15):
                raise ValueError(f"{item!r} is not a country code or number prefix like '31'")
            out.append(digits)
        return tuple(out)

    @field_validator("roaming_allow", mode="before")
    @classmethod
    def _check_roaming(cls, value: Any) -> Any:
        return number_list(value, NUMBER_PATTERN, "a number or a prefix pattern like '+316*'")
