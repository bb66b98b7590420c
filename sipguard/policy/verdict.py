"""What a rule says about a call, and what the proxy does with it.

A rule never answers a call itself: it returns a :class:`Verdict`, and the proxy turns a
``reject`` into a SIP response from its own server transaction (retransmitted over UDP until
ACKed), an ``accept`` into forwarding to the core (with ``forward_headers`` added), and a
``drop`` into silence.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    monitored: bool = False  # decided as reject/drop by a rule in monitor mode, but forwarded

    @property
    def accepted(self) -> bool:
        return self.action == "accept"


ACCEPT = Verdict("accept")
