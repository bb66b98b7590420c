"""The parameters of rule ``rate`` (``rules.rate`` in the config): :class:`Settings` and one
limit's rate and burst (:class:`Limit`). The rule itself is :mod:`sipguard.policy.rate`.
Its parameters live apart from the rule because the rule is compiled
(:mod:`sipguard.native`) and pydantic models stay plain Python.
"""

from __future__ import annotations

from pydantic import Field

from sipguard.policy.settings import FROZEN, Answer, ConfigModel, RuleSettings


class Limit(ConfigModel):
    """A rate and a burst: ``rate`` calls every ``per_s`` seconds, ``burst`` at once."""

    model_config = FROZEN

    rate: float = Field(
        gt=0, description="Calls every `per_s` seconds on average (required in a limit)."
    )
    burst: int = Field(
        default=1, ge=1, le=1_000_000, description="Calls let through at once after a pause."
    )
    per_s: float = Field(
        default=1.0, gt=0, le=86400,
        description="The period of `rate`, seconds: `{rate: 10, per_s: 60}` is ten a minute.",
    )

    @property
    def interval(self) -> float:
        """GCRA emission interval T: seconds between calls at the average rate."""
        return self.per_s / self.rate

    @property
    def tolerance(self) -> float:
        """GCRA tolerance tau: how far ahead of schedule a key may run (the burst)."""
        return (self.burst - 1) * self.interval


class Settings(RuleSettings):
    """Parameters of rule ``rate`` (``rules.rate`` in the config)."""

    per_caller: Limit | None = Field(
        default=None,
        description="INVITEs per caller number; null: no limit. The caller is "
        "P-Asserted-Identity when trusted, else From, after the peer's `default_region` "
        "normalisation.",
    )
    per_callee: Limit | None = Field(
        default=None,
        description="INVITEs per called number (a flooded DID); null: no limit. The called "
        "number is the Request-URI's (To's only when the Request-URI has no user part).",
    )
    per_peer: Limit | None = Field(
        default=None,
        description="INVITEs per peer; null: no limit. With no peers configured all traffic "
        "is one peer, `-`.",
    )
    per_source_ip: Limit | None = Field(
        default=None,
        description="INVITEs per source IP address (an IPv6 one: its network of "
        "`sip.ipv6_prefix` bits); null: no limit.",
    )
    answer: Answer = Field(
        default=Answer(status=503, phrase="Service Unavailable"),
        description="What a limited call hears. For a peer that backs off from every 503, use "
        "e.g. `{status: 486, phrase: Busy Here}` in its override.",
    )
    retry_after_s: int | None = Field(
        default=None, ge=0, le=86400,
        description="Retry-After: null = the real wait, rounded up (at least 1 s); 0 = none.",
    )
    max_keys: int = Field(
        default=100_000, ge=100, le=100_000_000,
        description="Numbers / addresses / peers remembered per limit. Beyond it the older half "
        "is forgotten early (fail open for those keys).",
    )
