"""The parameters of rule ``callerid`` (``rules.callerid`` in the config): :class:`Settings`,
what the caller hears (:class:`Answers`) and the 603+ redress Reason (:class:`Redress`, used by
rules ``dialer`` and ``national_cli`` too). The rule itself is :mod:`sipguard.policy.callerid`;
its parameters live here, apart from it, because the rule is compiled (``sipguard.native``)
and pydantic models stay plain Python.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from sipguard.policy.peers import NUMBER_PATTERN
from sipguard.policy.settings import (
    FROZEN,
    Answer,
    ConfigModel,
    ConfigPath,
    RuleSettings,
    number_list,
)

# RFC 8606 isup-location-value (U, LPN, LN, TN, RLN, RPN, INTL, BI)
Location = Literal["U", "LPN", "LN", "TN", "RLN", "RPN", "INTL", "BI"]
# Characters that may not appear in an ATIS-1000099 AVP value (it sits in a quoted-string and
# AVPs are separated by ";").
_AVP_BAD = re.compile(r'[\x00-\x20";\\\x7f]')


class Answers(ConfigModel):
    """What the caller hears for each kind of failure."""

    model_config = FROZEN

    invalid: Answer = Field(
        default=Answer(status=603, phrase="Network Blocked"),
        description="`caller_not_e164`, `caller_invalid` (603 Network Blocked: sent as 603+).",
    )
    not_owned: Answer = Field(
        default=Answer(status=603, phrase="Network Blocked"),
        description="`caller_not_owned` (603+).",
    )
    spoofed: Answer = Field(
        default=Answer(status=603, phrase="Network Blocked"),
        description="`pai_mismatch` and `neighbor_spoofing` when set to reject (603+).",
    )
    dno: Answer = Field(
        default=Answer(
            status=603, phrase="Decline",
            headers=('Reason: SIP;cause=603;text="Do Not Originate"',),
        ),
        description="`caller_dno`: a plain 603, DNO blocking is not analytics-based. "
        "`{status: 603, phrase: Network Blocked}` sends 603+ for DNO hits too.",
    )
    anonymous: Answer = Field(
        default=Answer(status=433, phrase="Anonymity Disallowed"),
        description="`caller_anonymous` (RFC 5079).",
    )


class Redress(ConfigModel):
    """The ATIS-1000099 ("603+") Reason header added to every ``603 Network Blocked`` answer:
    ``Reason: SIP;cause=603;text="v=analytics1;url=...;tel=...;email=...";location=RPN``.
    ATIS-1000099 wants at least one of url, tel, email: set one in production."""

    model_config = FROZEN

    location: Location = Field(
        default="RPN",
        description="RFC 8606 location of the block: RPN = private network serving the called "
        "party. That is a contact center's own edge; a carrier serving the called party uses "
        "RLN, a transit network TN.",
    )
    url: str | None = Field(
        default=None,
        description="https URL for redress requests, e.g. https://example.com/call-blocking.",
    )
    tel: str | None = Field(
        default=None, description="E.164 number for redress requests, e.g. +18005550100."
    )
    email: str | None = Field(
        default=None, description="Email address for redress requests, e.g. blocking@example.com."
    )

    @field_validator("url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("https://") or _AVP_BAD.search(value)):
            raise ValueError("must be an https:// URL without spaces, quotes or ';'")
        return value

    @field_validator("tel")
    @classmethod
    def _e164(cls, value: str | None) -> str | None:
        if value is not None and re.fullmatch(r"\+[1-9][0-9]{1,14}", value) is None:
            raise ValueError("must be an E.164 number like +18005550100")
        return value

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and (
            re.fullmatch(r"[^@]+@[^@]+\.[^@]+", value) is None or _AVP_BAD.search(value)
        ):
            raise ValueError("must be an email address like blocking@example.com")
        return value

    def reason_header(self) -> str:
        avps = ["v=analytics1"]
        avps += [f"{k}={v}" for k, v in (("url", self.url), ("tel", self.tel),
                                          ("email", self.email)) if v]
        return f'Reason: SIP;cause=603;text="{";".join(avps)}";location={self.location}'


class NeighborSpoofing(ConfigModel):
    """Caller and callee share the first ``digits`` digits of their national numbers."""

    model_config = FROZEN

    enabled: bool = Field(default=False, description="Run the check (off by default).")
    action: Literal["tag", "reject"] = Field(
        default="tag",
        description="tag: report it to the core; reject: answer `answers.spoofed`.",
    )
    digits: int = Field(
        default=6, ge=1, le=14,
        description="National digits compared: 6 = NANP area code + exchange (NPA-NXX), "
        "3 = area code only.",
    )


class Settings(RuleSettings):
    """Parameters of rule ``callerid`` (``rules.callerid`` in the config)."""

    require_e164: bool = Field(
        default=True,
        description="The caller must normalise to E.164 (`caller_not_e164`); `false` e.g. for "
        "a PBX sending extensions. National numbers are read with the peer's `default_region`; "
        "an allowed anonymous caller without a number skips the number checks.",
    )
    reject_invalid: bool = Field(
        default=True,
        description="Reject numbers phonenumbers calls invalid: unallocated, N11, wrong length "
        "(`caller_invalid`).",
    )
    ownership: bool = Field(
        default=True,
        description="The caller must match the peer's `numbers` / `numbers_file`, if it has "
        "any (`caller_not_owned`). Matched in E.164 or as received.",
    )
    dno: tuple[str, ...] = Field(
        default=(),
        description="Do-Not-Originate numbers or `prefix*`, never accepted as caller "
        "(`caller_dno`). E.g. the contact center's own inbound-only numbers; matched in E.164 "
        "or as received, and a national entry (no `+`: `2125550111`, `0201234*`) in the "
        "caller's national spellings too — its national significant number, with a trunk 0, "
        "for NANP with the 1 — when the caller is of the peer's `default_region` country (of "
        "any country for a peer without one: a DNO list only ever blocks).",
    )
    dno_file: ConfigPath | None = Field(
        default=None,
        description="The same, one a line, `#` comments (an industry DNO list); relative to "
        "the config file. Shared by every peer and re-read on reload only when its size or "
        "mtime changed.",
    )
    pai_mismatch: Literal["reject", "tag", "ignore"] = Field(
        default="tag",
        description="PAI and From carry different numbers (compared in E.164): reject, tag or "
        "ignore. Not `reject` by default: PAI ≠ From is legitimate for forwarded calls and for "
        "contact centers presenting a main number. Only a PAI the peer is trusted for "
        "(`trust_pai`): an untrusted one is removed, not compared.",
    )
    display_mismatch: Literal["reject", "tag", "ignore"] = Field(
        default="tag",
        description="The display name of From or of P-Asserted-Identity is a telephone number "
        "(6–15 digits, `+` and separators allowed) that is neither the caller's nor From's "
        "(compared in E.164): reject (`answers.spoofed`, 603+), tag "
        "(`callerid.display_mismatch`) or ignore — and a withheld caller's display name that "
        "is a number (`\"+1 800 …\" <sip:anonymous@anonymous.invalid>`): no number was "
        "checked. A phone or agent screen showing the display name shows that unchecked "
        "number.",
    )
    anonymous: Literal["allow", "reject"] = Field(
        default="allow",
        description="Withheld callers (Privacy: id, anonymous@anonymous.invalid): allow, or "
        "reject (433). Rejected callers hear `answers.anonymous`.",
    )
    neighbor_spoofing: NeighborSpoofing = Field(
        default=NeighborSpoofing(),
        description="Caller sharing the callee's leading national digits: a heuristic for "
        "tagging. Both numbers E.164, of one country, not equal; `digits` says how many.",
    )
    verstat: bool = Field(
        default=True,
        description="Put verstat (TN-Validation-Passed/-Failed, No-TN-Validation) on PAI for "
        "the core. Off, rule `identity` (when on) still puts its outcome there.",
    )
    verdict_header: str | None = Field(
        default="X-Sipguard-Verdict",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9.!%*_+`'~-]*$",
        description="Header listing the rule's findings for the core; null: none. E.g. "
        "`callerid.pai_mismatch`; copies a peer sent are removed; rule `dialer` uses the same "
        "header.",
    )
    answers: Answers = Field(
        default=Answers(), description="What the caller hears, each `{status, phrase, headers}`."
    )
    redress: Redress = Field(
        default=Redress(),
        description="The 603+ Reason (ATIS-1000099) on 603 Network Blocked: set `url`, `tel` or "
        "`email` in production.",
    )

    @field_validator("dno", mode="before")
    @classmethod
    def _check_dno(cls, value: Any) -> Any:
        return number_list(value, NUMBER_PATTERN, "a number or a prefix pattern like '+1212555*'")

    @field_validator("dno_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{'a directory, not a file' if value.is_dir() else 'file not found'}"
                             f": {value}")
        return value
