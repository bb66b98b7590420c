"""Subscriptions across sipguard: the dialogs a SUBSCRIBE (RFC 6665) or a REFER (its implicit
subscription, RFC 3515) sets up, which the dialog table — calls only — does not keep.

sipguard record-routes an initial SUBSCRIBE or REFER, so the subscription's later requests
pass through it; from outside, an in-dialog request is refused (481) unless it belongs to a
dialog sipguard knows. This table is what makes a subscription known:

- the core subscribes to a party outside (BLF, presence; a click-to-dial REFER): the
  party's NOTIFYs (To tag: the core's) are let through to the core while the subscription
  lasts, from the host the SUBSCRIBE went to;
- a party outside subscribes to the core: its refreshes and un-SUBSCRIBEs (From tag: its
  own) are let through, from the host it subscribed from.

An entry lasts what the subscription says: the SUBSCRIBE's ``Expires`` (1 hour when absent;
for a REFER, 1 hour), moved by every refresh and by the ``expires`` of a NOTIFY's
``Subscription-State``; ``terminated`` or ``Expires: 0`` leaves it 32 s (64*T1) for the
last messages. At most ``most`` entries: the oldest one goes first when full (counted by the
proxy as ``subscription_forgotten``); entries past their time go as they are met, when the
table is full, and at the edge core's housekeeping (every few seconds). Only the core and admitted parties' requests create entries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from sipguard.contract import Dialog
from sipguard.sip.message import Message
from sipguard.sip.nameaddr import NameAddr

DEFAULT_S: Final = 3600.0  # a subscription without Expires (and a REFER's) lasts this long
GRACE_S: Final = 32.0  # beyond its end: the last NOTIFY and its retransmissions (64*T1)
MAX_S: Final = 86400.0  # the longest an Expires is taken for

# (who subscribed: "core" or "party", Call-ID, the subscriber's tag)
Key = tuple[str, str, str]


@dataclass(slots=True)
class Subscription:
    host: str  # the outside party's address: its requests must come from there ("": any,
    # while provisional — sent to a host name, not answered yet)
    until: float  # loop time
    provisional: bool = True  # its SUBSCRIBE / REFER not answered 2xx yet
    # the core's subscription: where the party's NOTIFYs go — the core's Contact and route
    # set (those of the call a REFER came in), whatever Request-URI and Route they carry
    target: str = ""
    routes: tuple[NameAddr, ...] = ()
    # the core's REFER or SUBSCRIBE within a call that came in: who its caller was checked as
    # (a slim copy: core._checked_identity), so that the party's NOTIFYs — which may outlive
    # the call (RFC 3515 §2.4.4) — show that caller, and are anonymised as the call was
    call: Dialog | None = None


class Subscriptions:
    """The subscriptions sipguard forwarded the initial request of; bounded."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.table: dict[Key, Subscription] = {}
        self.forgotten = 0  # entries dropped to make room
        self._swept = -1.0  # when the full table was last searched for entries past their time

    def __len__(self) -> int:
        return len(self.table)

    def add(self, key: Key, host: str, until: float, now: float,
            provisional: bool = True, target: str = "",
            routes: tuple[NameAddr, ...] = (), call: Dialog | None = None) -> bool:
        """Keep ``key``'s subscription; True when the table was full and its oldest one was
        forgotten to make room."""
        table = self.table
        forgot = False
        table.pop(key, None)
        if len(table) >= self.most:
            if now - self._swept >= 1.0:  # (a whole pass: once a second at most)
                self._swept = now
                for k in [k for k, sub in table.items() if sub.until <= now]:
                    del table[k]
            while len(table) >= self.most:
                del table[next(iter(table))]
                self.forgotten += 1
                forgot = True
        table[key] = Subscription(host, until, provisional, target, routes, call)
        return forgot

    def match(self, key: Key, host: str, now: float) -> Subscription | None:
        """The live subscription ``key`` when ``host`` is its outside party's."""
        sub = self.table.get(key)
        if sub is None:
            return None
        if sub.until <= now:
            del self.table[key]
            return None
        return sub if sub.host == host or (sub.provisional and not sub.host) else None

    def sweep(self, now: float) -> int:
        """Forget the subscriptions past their time (the gauge says what is live); how many."""
        gone = [k for k, sub in self.table.items() if sub.until <= now]
        for k in gone:
            del self.table[k]
        return len(gone)

    def drop_provisional(self, key: Key) -> None:
        """``key``'s subscription, when its SUBSCRIBE / REFER was never answered 2xx, ends."""
        sub = self.table.get(key)
        if sub is not None and sub.provisional:
            del self.table[key]

    def extend(self, key: Key, until: float, *, longer: bool = True) -> None:
        """Move ``key``'s end to ``until``; with ``longer`` False never later than it was (a
        NOTIFY from outside: the notifier may end a subscription, not keep it open longer
        than its subscriber — the core — asked or was granted, RFC 6665 §4.2.2)."""
        sub = self.table.get(key)
        if sub is not None:
            sub.until = until if longer else min(until, sub.until)


def notified(msg: Message, from_core: bool = False) -> Key:
    """The key of the subscription a NOTIFY belongs to: from outside, the core's; from the
    core, a party's (its To tag: the subscriber's From tag on the SUBSCRIBE / REFER)."""
    return ("party" if from_core else "core", msg.call_id, msg.to_tag or "")


def subscriber(msg: Message, core: bool) -> Key:
    """The key of the subscription ``msg`` (a SUBSCRIBE or REFER) makes or refreshes: who
    subscribed (``core``: the core), its Call-ID and its From tag."""
    return ("core" if core else "party", msg.call_id, msg.from_tag or "")


def lasts(msg: Message, now: float) -> float:
    """Until when the subscription a SUBSCRIBE or REFER (or a NOTIFY's Subscription-State)
    asks for lasts, grace included."""
    if msg.method == "NOTIFY":
        state = (msg.get("subscription-state") or "").lower()
        if state.startswith("terminated"):
            return now + GRACE_S
        for param in state.split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip() == "expires":
                return now + _seconds(value) + GRACE_S
        return now + DEFAULT_S + GRACE_S
    if msg.method == "REFER":
        return now + DEFAULT_S + GRACE_S
    expires = msg.get("expires")
    return now + (DEFAULT_S if expires is None else _seconds(expires)) + GRACE_S


# An Expires header line in a raw header block (no compact form; RFC 3261 §20.19)
_EXPIRES: Final = re.compile(rb"\r\nexpires[ \t]*:[ \t]*([0-9]{1,10})[ \t]*\r\n", re.IGNORECASE)


def granted(answer: bytes, until: float, now: float) -> float:
    """``until`` (what the SUBSCRIBE asked for, grace included) shortened to the Expires its
    2xx ``answer`` granted: the notifier may shorten a subscription there, never lengthen it
    (RFC 6665 §4.1.2.1)."""
    end = answer.find(b"\r\n\r\n")
    m = _EXPIRES.search(answer, 0, end + 2 if end >= 0 else len(answer))
    if m is None:
        return until
    return min(until, now + min(float(m.group(1)), MAX_S) + GRACE_S)


def _seconds(text: str) -> float:
    text = text.strip()
    return min(float(text), MAX_S) if text.isdigit() and len(text) <= 10 else DEFAULT_S
