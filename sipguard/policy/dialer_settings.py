"""Parameters of rule ``dialer``: :class:`Settings` (``rules.dialer``) and its sections.

The rule itself is :mod:`sipguard.policy.dialer`, what it remembers
:mod:`sipguard.policy.dialer_state`. Each analytic is a section of its own with a *tag* and a
*block* threshold (what each does: :mod:`sipguard.policy.dialer`); ``null`` turns it off, and
each is overridable per peer. The ``Field`` descriptions below are the reference that
``python -m sipguard.ops.docgen`` writes into ``docs/rules.md`` and ``config/sipguard.yaml``.

Per caller number (P-Asserted-Identity, else From):

- ``distinct_callees`` ({tag: 30, block: 60}): distinct called numbers in the window — one
  number dialing many destinations, a predictive dialer or bulk calling. Blocks the caller.
- ``short_calls`` ({tag: 0.2, block: 0.35, min_calls: 10}): share of answered calls shorter
  than ``short_call_s`` (6 s) among the answered calls that ended in the window, once there are
  ``min_calls`` of them (industry filters flag above ~20 %). Blocks the caller.
- ``asr`` ({tag: 0.2, block: 0.1, min_calls: 30}): answer-seizure ratio — answered calls over
  calls that ended in the window — *below* the floors, once ``min_calls`` ended. Blocks the
  caller.
- ``sequential`` ({tag: 5, block: 10, per_origin: false}): a run of called numbers each one
  higher than the last (+12125550100, …0101, …0102: number scanning). Runs are tracked per
  caller and, with ``per_origin``, per peer/source as well (a scan that rotates caller numbers;
  up to 8 interleaved runs per peer). Blocks the caller, or the peer/source. ``per_origin`` is
  off by default: callers of the public reaching a contact center's consecutive DIDs through
  one carrier make such a run, and its block would cool down the whole carrier.

Per peer (with no peers configured: per source IP address), off unless configured:

- ``caller_rotation`` ({tag: 50, block: 100, max_uses: 2}): distinct caller numbers used at
  most ``max_uses`` times each in the window — snowshoe dialing, circumventing per-number
  limits. A carrier delivering calls from the public looks exactly like this: enable it for
  dialer / PBX peers only (``peers[].rules.dialer.caller_rotation: {}``). Blocks the peer.
- ``pumping``: targeted traffic pumping. ``per_callee`` ({tag: 30, block: 60}): calls to one
  called number in the window, from anywhere (``exempt``: your own DIDs, numbers or ``prefix*``);
  blocks calls to that number. ``high_cost`` ({tag: 10, block: 20}) with ``high_cost_prefixes``
  (``["+1900*", "+882*"]``): calls from one peer/source to those prefixes in the window; blocks
  that peer/source's calls to them.

General: ``window_s`` (60; each analytic may set its own), ``short_call_s`` (6), ``block_s``
(300), ``answer`` (603 Network Blocked), ``redress`` (the 603+ Reason contact, as in rule
``callerid``), ``verdict_header`` (``X-Sipguard-Verdict``; values ``dialer.<analytic>``, with
``;monitored`` for a block in monitor mode; copies a peer sent are removed), ``max_numbers``
(200000 callers and called numbers each), ``max_origins`` (10000).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from sipguard.policy.callerid_settings import Redress
from sipguard.policy.peers import NUMBER_PATTERN
from sipguard.policy.settings import FROZEN, Answer, ConfigModel, RuleSettings, number_list


class _Counted(ConfigModel):
    model_config = FROZEN

    window_s: float | None = Field(
        default=None, gt=0, le=86400, description="Window, seconds; null: the rule's window_s."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Any:
        tag, block = getattr(self, "tag", None), getattr(self, "block", None)
        if tag is not None and block is not None and tag > block:
            raise ValueError(f"tag ({tag}) must not be above block ({block})")
        return self


class DistinctCallees(_Counted):
    """Distinct called numbers per caller in the window."""

    tag: int | None = Field(
        default=30, ge=1, le=100_000, description="Tag at this many callees; null: no tag."
    )
    block: int | None = Field(
        default=60, ge=1, le=100_000, description="Block at this many; null: no block."
    )


class Sequential(_Counted):
    """Runs of called numbers each one higher than the one before."""

    tag: int | None = Field(
        default=5, ge=2, le=100_000, description="Tag at a run this long; null: no tag."
    )
    block: int | None = Field(
        default=10, ge=2, le=100_000, description="Block at a run this long; null: no block."
    )
    per_origin: bool = Field(
        default=False,
        description="Also track runs per peer/source: a scan that rotates caller numbers. Up "
        "to 8 interleaved runs per peer/source; its block cools down the whole peer/source. "
        "Off by default: the public calling a contact center's consecutive DIDs through one "
        "carrier makes such runs. Enable it for dialer / PBX peers (a peer override)."
    )


class ShortCalls(_Counted):
    """Share of answered calls shorter than short_call_s."""

    tag: float | None = Field(
        default=0.2, ge=0, le=1, description="Tag above this share; null: no tag."
    )
    block: float | None = Field(
        default=0.35, ge=0, le=1, description="Block above this share; null: no block."
    )
    min_calls: int = Field(
        default=10, ge=1, le=100_000,
        description="Answered calls ended in the window before the share counts.",
    )


class Asr(ConfigModel):
    """Answer-seizure ratio floors (answered / ended calls)."""

    model_config = FROZEN

    tag: float | None = Field(
        default=0.2, ge=0, le=1, description="Tag below this ratio; null: no tag."
    )
    block: float | None = Field(
        default=0.1, ge=0, le=1,
        description="Block below this ratio (not above tag); null: no block.",
    )
    min_calls: int = Field(
        default=30, ge=1, le=100_000,
        description="Calls ended in the window before the ratio counts.",
    )
    window_s: float | None = Field(
        default=None, gt=0, le=86400, description="Window, seconds; null: the rule's window_s."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Asr:
        if self.tag is not None and self.block is not None and self.block > self.tag:
            raise ValueError(f"block ({self.block}) must not be above tag ({self.tag}): "
                             "both are floors")
        return self


class CallerRotation(_Counted):
    """Distinct caller numbers used at most max_uses times, per peer/source, in the window."""

    tag: int | None = Field(
        default=50, ge=1, le=100_000, description="Tag at this many one-off numbers; null: no tag."
    )
    block: int | None = Field(
        default=100, ge=1, le=100_000, description="Block at this many; null: no block."
    )
    max_uses: int = Field(
        default=2, ge=1, le=1000,
        description="A caller number presented at most this often in the window is one-off.",
    )


class Threshold(ConfigModel):
    model_config = FROZEN

    tag: int | None = Field(default=None, ge=1, le=10_000_000, description="Tag at this many.")
    block: int | None = Field(default=None, ge=1, le=10_000_000, description="Block at this.")

    @model_validator(mode="after")
    def _ordered(self) -> Threshold:
        if self.tag is not None and self.block is not None and self.tag > self.block:
            raise ValueError(f"tag ({self.tag}) must not be above block ({self.block})")
        return self


def _patterns(value: tuple[str, ...]) -> tuple[str, ...]:
    checked: tuple[str, ...] = number_list(value, NUMBER_PATTERN,
                                           "a number or a prefix pattern like '+1900*'")
    return checked


class Pumping(ConfigModel):
    """Calls concentrated on one called number, or on high-cost prefixes."""

    model_config = FROZEN

    window_s: float | None = Field(
        default=None, gt=0, le=86400, description="Window, seconds; null: the rule's window_s."
    )
    per_callee: Threshold | None = Field(
        default=Threshold(tag=30, block=60),
        description="Calls to one called number from anywhere, `{tag, block}`; null: off.",
    )
    exempt: tuple[str, ...] = Field(
        default=(), description="Called numbers / `prefix*` never counted (list your own DIDs)."
    )
    high_cost_prefixes: tuple[str, ...] = Field(
        default=(), description="High-cost destinations, numbers or `prefix*`, e.g. `'+1900*'`."
    )
    high_cost: Threshold | None = Field(
        default=Threshold(tag=10, block=20),
        description="Calls from one peer/source to `high_cost_prefixes`, `{tag, block}`; null: "
        "off.",
    )

    @model_validator(mode="after")
    def _check(self) -> Pumping:
        _patterns(self.exempt)
        _patterns(self.high_cost_prefixes)
        return self


class Settings(RuleSettings):
    """Parameters of rule ``dialer`` (``rules.dialer`` in the config)."""

    window_s: float = Field(
        default=60, gt=0, le=86400,
        description="Sliding window of every analytic, seconds (each may set its own `window_s`).",
    )
    short_call_s: float = Field(
        default=6, gt=0, le=3600,
        description="An answered call shorter than this is short, seconds.",
    )
    block_s: float = Field(
        default=300, gt=0, le=30 * 86400,
        description="Cooldown after a block, seconds. The blocked number, peer/source or called "
        "number is answered at once this long.",
    )
    distinct_callees: DistinctCallees | None = Field(
        default=DistinctCallees(),
        description="Distinct numbers one caller dials in the window (bulk calling); null: off. "
        "A predictive dialer's pattern; a block cools down the caller.",
    )
    short_calls: ShortCalls | None = Field(
        default=ShortCalls(),
        description="Share of a caller's answered calls shorter than `short_call_s`; null: off. "
        "Industry filters flag above ~20 %; a block cools down the caller.",
    )
    asr: Asr | None = Field(
        default=Asr(),
        description="A caller's answer-seizure ratio (answered / ended calls) below the floors; "
        "null: off. A block cools down the caller.",
    )
    sequential: Sequential | None = Field(
        default=Sequential(),
        description="Runs of called numbers each one higher than the last (number scanning); "
        "null: off. Per caller and, with `per_origin`, per peer/source; a block cools down the "
        "caller or the peer/source.",
    )
    caller_rotation: CallerRotation | None = Field(
        default=None,
        description="One peer/source presenting many one-off caller numbers (snowshoe "
        "dialing); null: off. Enable it for dialer peers only: a carrier delivering calls from "
        "the public looks exactly like rotation.",
    )
    pumping: Pumping | None = Field(
        default=None,
        description="Traffic pumping: calls concentrated on one number or on high-cost "
        "prefixes; null: off. A contact center's own DIDs receive concentrated calls: list "
        "them in `exempt`.",
    )
    answer: Answer = Field(
        default=Answer(status=603, phrase="Network Blocked"),
        description="What a blocked call hears; 603 Network Blocked is sent as 603+. The 603+ "
        "Reason is added unless the answer brings its own Reason.",
    )
    redress: Redress | None = Field(
        default=None,
        description="The 603+ redress contact, as in rule `callerid`; null: rule `callerid`'s "
        "`redress` when that rule is configured, else its defaults. Set `url`, `tel` or "
        "`email` in production.",
    )
    verdict_header: str | None = Field(
        default="X-Sipguard-Verdict",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9.!%*_+`'~-]*$",
        description="Header listing tags for the core (dialer.sequential, …); null: none. "
        "Shared with rule `callerid`; copies a peer sent are removed.",
    )
    max_numbers: int = Field(
        default=200_000, ge=100, le=100_000_000,
        description="Caller and called numbers remembered (each table): bounds memory.",
    )
    max_origins: int = Field(
        default=10_000, ge=10, le=10_000_000, description="Peers / source addresses remembered."
    )
