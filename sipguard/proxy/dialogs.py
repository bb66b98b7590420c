"""The dialog table: live calls by Call-ID and caller tag, and when each one expires.

A dialog is added when an initial INVITE is accepted and removed exactly once, whatever ends
it (the proxy core decides that and tells the policy). Expiry times (maximum lifetime, or an
RFC 4028 session timer that a 2xx to a re-INVITE / UPDATE refreshes) move and arrive out of
order, so they live in a one-second :class:`~sipguard.state.expiry.ExpiryWheel` that the
core's once-a-second sweep pops; a dialog that ends early leaves no entry behind.
"""

from __future__ import annotations

from typing import Final

from sipguard.contract import Dialog
from sipguard.sip.message import Message
from sipguard.state.expiry import ExpiryWheel

MIN_SESSION_EXPIRES: Final = 90.0  # RFC 4028 §4: Min-SE is never below 90 s

DialogId = str  # dialog_key(Call-ID, caller's From tag, outbound)


def dialog_key(call_id: str, caller_tag: str, outbound: bool = False) -> DialogId:
    """A dialog's key in the tables: Call-ID and caller tag joined by a line feed, which
    neither can hold (a header value has no bare LF), so distinct pairs give distinct keys; a
    call the core places (``outbound``) ends with one more. A proxy core that sends a call
    back out through sipguard keeps its Call-ID and From tag: the two legs are two dialogs,
    one each way, and neither replaces the other. A string, not a tuple: a tuple is an object
    the cyclic collector examines."""
    key = call_id + "\n" + caller_tag
    return key + "\n" if outbound else key


def key_of(dialog: Dialog) -> DialogId:
    return dialog_key(dialog.call_id, dialog.caller_tag, dialog.outbound)


class DialogTable:
    """Live dialogs and their expiry times."""

    __slots__ = ("by_id", "_expiry")

    def __init__(self) -> None:
        self.by_id: dict[DialogId, Dialog] = {}
        self._expiry: ExpiryWheel[DialogId] = ExpiryWheel()

    def __len__(self) -> int:
        return len(self.by_id)

    def of(self, msg: Message, from_core: bool) -> tuple[Dialog | None, str]:
        """The live dialog an in-dialog request belongs to, and who sent it (``caller`` when
        its From tag is the caller's, else ``callee``). A request from outside is first the
        outside party's of a call that came in (From tag: the caller's) or of a call the core
        placed (To tag: the caller's, the core's); one from the core the other way round. Only
        then the other two readings, which make a request speak for the wrong side (refused
        from outside, see ``Proxy._not_party``)."""
        call_id = msg.call_id
        by_id = self.by_id
        by_from = call_id + "\n" + (msg.from_tag or "")
        if not from_core:
            dialog = by_id.get(by_from)  # the common case first: the caller's ACK and BYE
            if dialog is not None:
                return dialog, "caller"
        by_to = call_id + "\n" + (msg.to_tag or "")
        order: tuple[tuple[str, str], ...]
        if from_core:
            order = ((by_to, "callee"), (by_from + "\n", "caller"), (by_from, "caller"),
                     (by_to + "\n", "callee"))
        else:
            order = ((by_to + "\n", "callee"), (by_from + "\n", "caller"), (by_to, "callee"))
        for key, side in order:
            dialog = by_id.get(key)
            if dialog is not None:
                return dialog, side
        return None, "callee"

    def add(self, dialog: Dialog) -> bool:
        """Table ``dialog``; False (nothing changed) when a live dialog holds its key — a
        dialog is never replaced, or the one replaced could never end and free its slots."""
        key = key_of(dialog)
        if key in self.by_id:
            return False
        self.by_id[key] = dialog
        self._expiry.set(key, dialog.expires)
        return True

    def remove(self, dialog: Dialog) -> None:
        """Take ``dialog`` out of the table (a no-op when another dialog holds its id)."""
        key = key_of(dialog)
        if self.by_id.get(key) is dialog:
            del self.by_id[key]
            self._expiry.discard(key)

    def expire_at(self, dialog: Dialog, expires: float) -> None:
        dialog.expires = expires
        self._expiry.set(key_of(dialog), expires)

    def expiries(self) -> int:
        """Expiry entries held (equals the live dialogs: an ended dialog leaves none)."""
        return len(self._expiry)

    def due(self, now: float) -> list[Dialog]:
        """Dialogs whose expiry has passed (still in the table; the caller ends them)."""
        out: list[Dialog] = []
        for key in self._expiry.pop_due(now):
            dialog = self.by_id.get(key)
            if dialog is not None:
                out.append(dialog)
        return out


def session_interval(msg: Message) -> float | None:
    """The RFC 4028 session interval a 2xx sets, in seconds (at least 90), or None.

    ``Session-Expires = ("Session-Expires" / "x") HCOLON delta-seconds *(SEMI se-params)``;
    a value that is not delta-seconds is ignored (no timer), never an error.
    """
    value = msg.get("session-expires")
    if value is None:
        return None
    delta = value.split(";", 1)[0].strip()
    if not delta or not delta.isascii() or not delta.isdigit():
        return None
    return max(float(int(delta[:10])), MIN_SESSION_EXPIRES)
