"""What a rule says about a call, and what the proxy does with it.

A rule never answers a call itself: it returns a :class:`Verdict`, and the proxy turns a
``reject`` into a SIP response from its own server transaction (retransmitted over UDP until
ACKed), an ``accept`` into forwarding to the core, and a ``drop`` into silence.

On the forwarded INVITE, ``replace_headers`` are applied first: each ``(name, line)`` removes
every received line of header ``name`` (canonical lower-case long name, e.g.
``p-asserted-identity``) and puts ``line`` in the place of the first one — appended when the
header was absent; ``None`` only removes. That is how a rule strips headers a peer must not be
able to forge and rewrites P-Asserted-Identity. Then ``forward_headers`` are appended. Headers
the proxy itself owns (Via, Route, Record-Route, Max-Forwards, From, To, Call-ID, CSeq,
Content-Length) cannot be replaced; such entries are ignored. When several rules replace the
same header, the later rule in the pipeline wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Action = Literal["accept", "reject", "drop"]


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    rule: str = ""  # the rule that decided ("" for the default accept)
    reason: str = ""  # machine-readable reason code, e.g. "caller_not_owned"
    status: int = 0  # SIP status for a reject
    phrase: str = ""  # reason phrase for a reject
    headers: tuple[str, ...] = ()  # extra header lines on the reject ("Retry-After: 5")
    forward_headers: tuple[str, ...] = ()  # extra header lines on the forwarded INVITE
    # (lower-case header name, new line or None): replaces / removes received headers on the
    # forwarded INVITE (see the module docstring)
    replace_headers: tuple[tuple[str, str | None], ...] = ()
    monitored: bool = False  # decided as reject/drop by a rule in monitor mode, but forwarded
    # facts for the decision log line, e.g. {"limit": "per_caller", "number": ..., "count": 2}
    detail: Mapping[str, str | int | None] | None = field(default=None, hash=False)
    # log this decision sampled under this key (one line per key per log.parse_error_sample_s,
    # the rest counted): for verdicts that come in floods, e.g. "rate:per_caller:+1212..."
    sample: str = ""

    @property
    def accepted(self) -> bool:
        return self.action == "accept"


ACCEPT = Verdict("accept")
