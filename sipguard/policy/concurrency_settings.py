"""The parameters of rule ``concurrency`` (``rules.concurrency`` in the config): :class:`Settings`
and what the caller hears when a limit is reached (:class:`Answers`). The rule itself is
:mod:`sipguard.policy.concurrency`. Its parameters live apart from the rule because the rule is compiled
(:mod:`sipguard.native`) and pydantic models stay plain Python.
"""

from __future__ import annotations

from pydantic import Field

from sipguard.policy.settings import FROZEN, Answer, ConfigModel, RuleSettings


def _reason(limit: str, text: str) -> tuple[str, ...]:
    return (f'Reason: SIP;cause=403;text="{text} ({limit})"',)


class Answers(ConfigModel):
    """What the caller hears when a limit is reached."""

    model_config = FROZEN

    per_caller: Answer = Field(
        default=Answer(status=403, phrase="Forbidden",
                       headers=_reason("per_caller", "Too many concurrent calls from caller")),
        description="`per_caller` reached (`per_caller_exceeded`).",
    )
    per_callee: Answer = Field(
        default=Answer(status=486, phrase="Busy Here"),
        description="`per_callee` reached (`per_callee_exceeded`).",
    )
    per_diverter: Answer = Field(
        default=Answer(status=403, phrase="Forbidden",
                       headers=_reason("per_diverter",
                                       "Too many concurrent calls forwarded by a number")),
        description="`per_diverter` reached (`per_diverter_exceeded`).",
    )
    max_diversions: Answer = Field(
        default=Answer(status=403, phrase="Forbidden",
                       headers=_reason("max_diversions", "Call forwarded too many times")),
        description="Forwarded more than `max_diversions` times (`max_diversions_exceeded`).",
    )
    per_peer: Answer = Field(
        default=Answer(status=503, phrase="Service Unavailable", headers=("Retry-After: 5",)),
        description="`per_peer` reached (`per_peer_exceeded`). An upstream proxy may send "
        "nothing to sipguard for Retry-After seconds (RFC 3261 §21.5.4): keep it short.",
    )


class Settings(RuleSettings):
    """Parameters of rule ``concurrency`` (``rules.concurrency`` in the config)."""

    per_caller: int | None = Field(
        default=None, ge=1,
        description="Live calls from one caller number; null: no limit. The caller is "
        "P-Asserted-Identity when trusted, else From, after the peer's `default_region` "
        "normalisation.",
    )
    per_callee: int | None = Field(
        default=None, ge=1,
        description="Live calls to one called number (a DID used as a trunk); null: no limit. "
        "The called number is the Request-URI's (To's only when the Request-URI has no user "
        "part).",
    )
    per_diverter: int | None = Field(
        default=None, ge=1,
        description="Live calls forwarded by one number (PBX forwarding); null: no limit. "
        "Every number in Diversion (RFC 5806) counts, and every diverting History-Info "
        "entry (RFC 7044: the entry an `mp` tag names, or the one before an entry with an "
        "RFC 4458 forwarding `cause`) — the first 16 distinct numbers of a call (Diversion "
        "first: its top entry is the latest), so one INVITE takes a bounded number of "
        "counters; refuse longer chains with `max_diversions`.",
    )
    max_diversions: int | None = Field(
        default=None, ge=0,
        description="A call forwarded more times than this is refused; null: any. "
        "Counted as the larger of the Diversion hop count (each entry its `counter`, default "
        "1) and the diverting History-Info entries (one forwarding often shows in both; not "
        "summed); `0` refuses every forwarded call.",
    )
    per_peer: int | None = Field(
        default=None, ge=1,
        description="Live calls from one peer (call admission control); null: no limit. "
        "With no peers configured all traffic is one peer, `-`.",
    )
    answers: Answers = Field(
        default=Answers(),
        description="What the caller hears, each `{status, phrase, headers}`, given whole.",
    )
