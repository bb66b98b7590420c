"""The parameters of rule ``identity`` (``rules.identity`` in the config): :class:`Settings` and
what the caller hears for each kind of failure (:class:`Answers`). The rule itself is
:mod:`sipguard.policy.identity`. Its parameters live apart from the rule because the rule is compiled
(:mod:`sipguard.native`) and pydantic models stay plain Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from sipguard.policy.settings import FROZEN, Answer, ConfigModel, ConfigPath, RuleSettings
from sipguard.policy.stircert import load_trust_anchors

_TOKEN = r"^[A-Za-z0-9][A-Za-z0-9.!%*_+`'~-]*$"


class Answers(ConfigModel):
    """What the caller hears for each kind of failure (defaults per RFC 8224, ATIS-1000074)."""

    model_config = FROZEN

    missing: Answer = Field(
        default=Answer(status=428, phrase="Use Identity Header"),
        description="No Identity header while `require` is true (`missing`).",
    )
    invalid: Answer = Field(
        default=Answer(status=438, phrase="Invalid Identity Header"),
        description="Bad syntax, claims, signature, or orig/dest not the call's numbers.",
    )
    bad_info: Answer = Field(
        default=Answer(status=436, phrase="Bad Identity Info"),
        description="No info, x5u refused, certificate not fetched or unreadable.",
    )
    untrusted: Answer = Field(
        default=Answer(status=437, phrase="Unsupported Credential"),
        description="Chain not to a trust anchor, expired, no TNAuthList, not an ES256 key.",
    )
    stale: Answer = Field(
        default=Answer(status=403, phrase="Stale Date"),
        description="`iat` outside the freshness window, either side (`stale`, `future`).",
    )
    low_attestation: Answer = Field(
        default=Answer(status=403, phrase="Forbidden"),
        description="`attest` below `min_attestation`, with `on_low_attestation: reject`.",
    )


class Settings(RuleSettings):
    """Parameters of rule ``identity`` (``rules.identity`` in the config)."""

    require: bool = Field(
        default=False,
        description="true: a call without an Identity header gets `answers.missing` (428).",
    )
    min_attestation: Literal["A", "B", "C"] = Field(
        default="C", description="Lowest attestation that passes: A, B or C (A is the highest)."
    )
    on_fail: Literal["reject", "tag"] = Field(
        default="reject",
        description="reject: answer the caller (`answers`); tag: forward the call marked "
        "`TN-Validation-Failed`.",
    )
    on_low_attestation: Literal["reject", "tag"] | None = Field(
        default=None,
        description="Attestation below `min_attestation`: reject or tag; null: as `on_fail`.",
    )
    freshness_s: float = Field(
        default=60, gt=0, le=3600,
        description="Largest |now − iat|, seconds; tokens from the future fail as well.",
    )
    check_dest: bool = Field(
        default=True,
        description="`dest.tn` must hold the called number (the Request-URI's; To's only "
        "when the Request-URI has no user part) — or verified `ppt=div` PASSporTs (RFC 8946) "
        "must lead from it to the called number (a retargeted call).",
    )
    trust_anchors: ConfigPath | None = Field(
        default=None,
        description="STI-CA root certificate(s): a PEM file or a folder of `*.pem`/`*.crt`/"
        "`*.cer`. "
        "Required while the rule is enabled; relative to the config file.",
    )
    x5u_ports: tuple[int, ...] = Field(
        default=(443, 8443), min_length=1,
        description="Ports an x5u URL may name (https only, always).",
    )
    allow_private_x5u: bool = Field(
        default=False,
        description="Fetch from loopback, private, link-local … addresses too (labs and tests "
        "only).",
    )
    fetch_ca_bundle: ConfigPath | None = Field(
        default=None,
        description="PEM file of extra CAs trusted for the HTTPS fetch (the system CAs "
        "always); null: none.",
    )
    fetch_timeout_s: float = Field(
        default=2.0, gt=0, le=30,
        description="Whole certificate fetch (connect, TLS, body), seconds; the INVITE waits "
        "meanwhile.",
    )
    fetch_max_bytes: int = Field(
        default=65536, ge=1024, le=1048576,
        description="Largest certificate chain fetched, bytes. Content-Length is checked "
        "first, then the body as read.",
    )
    max_concurrent_fetches: int = Field(
        default=64, ge=1, le=10000,
        description="Distinct URLs fetched at once; beyond it a call fails at once as "
        "`fetch_busy`. That is `answers.bad_info` (436) or, with `on_fetch_error: "
        "no_validation`, unvalidated; never cached.",
    )
    max_fetches_per_host: int = Field(
        default=2, ge=1, le=10000,
        description="Distinct URLs fetched at once from one x5u host and port (name or IP "
        "literal), so one slow host cannot hold every fetch slot, nor a port of it that never "
        "answers its other ports' (a caller naming a repository on another allowed port); "
        "beyond it a fetch waits for one of the host's slots (`max_fetches_waiting_per_host`).",
    )
    max_fetches_waiting_per_host: int = Field(
        default=16, ge=0, le=10000,
        description="Fetches that may wait for a slot of their x5u host (a repository "
        "serving several providers' certificates, a cold cache), first come first served, "
        "each up to `fetch_timeout_s`; one more, or one that waited that long, fails as "
        "`fetch_busy`. 0: fail at once.",
    )
    on_fetch_error: Literal["reject", "no_validation"] = Field(
        default="reject",
        description="A certificate that cannot be fetched (`fetch_timeout`, `fetch_connect`, "
        "`fetch_busy`): reject (a failure, per `on_fail`) or no_validation (forwarded as "
        "`No-TN-Validation` with the reason). Not with `require: true`.",
    )
    cache_max_s: float = Field(
        default=86400, gt=0,
        description="Longest a fetched chain is kept, seconds. Cache-Control max-age "
        "(s-maxage first) is capped at it.",
    )
    cache_min_s: float = Field(
        default=60, ge=0,
        description="Shortest a fetched chain is kept, seconds. A no-store, no-cache or "
        "smaller max-age is raised to it.",
    )
    negative_cache_s: float = Field(
        default=30, ge=0,
        description="How long a failed fetch or an untrusted chain is remembered, seconds.",
    )
    cache_entries: int = Field(
        default=10000, ge=16,
        description="URLs with a chain a signature has verified with (and chain verdicts) "
        "kept at most; least recently used first out. Failures and chains no signature has "
        "verified with yet never take their place.",
    )
    negative_cache_entries: int = Field(
        default=1000, ge=16,
        description="Failures kept at most (failed fetches, unreadable or untrusted chains, "
        "chains no signature has verified with yet), apart from the trusted chains; least "
        "recently used first out.",
    )
    verify_threads: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="Threads that check PASSporT signatures (ES256) beside the event loop, "
        "which meanwhile goes on with other calls; 0: in the loop. `auto`: one per CPU this "
        "process may run on beyond the first (its CPU affinity), at most 4 — 0 when pinned to "
        "one CPU — and they take the checks only while the event loop is busy (from 70 % of "
        "its time on; a check in the loop costs less CPU than a hand-over); a number: every check "
        "goes to the threads. One pool per process: the largest number among the identity "
        "sections (top level and peers) is used, `auto` where none sets one above 0.",
    )
    verify_queue: int = Field(
        default=1024, ge=1, le=1_000_000,
        description="Signature checks waiting for a thread at most; beyond it a check is done "
        "in the event loop (counter `identity_verify_queue_full`), never refused. The largest "
        "among the identity sections is used.",
    )
    identity_header: str | None = Field(
        default="X-Sipguard-Identity",
        pattern=_TOKEN,
        description="Outcome header for the core (copies a peer sent are removed); null: "
        "none.",
    )
    answers: Answers = Field(
        default=Answers(), description="What the caller hears, each `{status, phrase, headers}`."
    )

    @field_validator("x5u_ports")
    @classmethod
    def _ports(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        for port in value:
            if not 1 <= port <= 65535:
                raise ValueError(f"port must be 1..65535, got {port}")
        return value

    @field_validator("fetch_ca_bundle")
    @classmethod
    def _bundle(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{'a directory, not a file' if value.is_dir() else 'file not found'}"
                             f": {value}")
        return value

    @model_validator(mode="after")
    def _anchors(self) -> Settings:
        if self.cache_min_s > self.cache_max_s:
            raise ValueError("cache_min_s must not exceed cache_max_s")
        if self.require and self.on_fetch_error == "no_validation":
            raise ValueError(
                "on_fetch_error: no_validation cannot go with require: true (an x5u naming an "
                "unreachable server would get any call past require)"
            )
        if not self.enabled:
            return self
        if self.trust_anchors is None:
            raise ValueError("trust_anchors is required: the STI-CA root certificate(s)")
        if not self.trust_anchors.exists():
            raise ValueError(f"trust_anchors: not found: {self.trust_anchors}")
        load_trust_anchors(self.trust_anchors)  # ValueError names the bad file
        return self
