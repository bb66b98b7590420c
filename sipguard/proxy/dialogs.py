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

DialogId = str  # dialog_key(Call-ID, caller's From tag)


def dialog_key(call_id: str, caller_tag: str) -> DialogId:
    """A dialog's key in the tables: Call-ID and caller tag joined by a line feed, which
    neither can hold (a header value has no bare LF), so distinct pairs give distinct keys. A
    string, not a (Call-ID, tag) tuple: a tuple is an object the cyclic collector examines."""
    return call_id + "\n" + caller_tag


class DialogTable:
    """Live dialogs and their expiry times."""

    __slots__ = ("by_id", "_expiry")

    def __init__(self) -> None:
        self.by_id: dict[DialogId, Dialog] = {}
        self._expiry: ExpiryWheel[DialogId] = ExpiryWheel()

    def __len__(self) -> int:
        return len(self.by_id)

    def of(self, msg: Message) -> tuple[Dialog | None, str]:
        """The live dialog an in-dialog request belongs to, and who sent it (``caller`` when
        its From tag is the caller's, else ``callee``)."""
        call_id = msg.call_id
        dialog = self.by_id.get(dialog_key(call_id, msg.from_tag or ""))
        if dialog is not None:
            return dialog, "caller"
        return self.by_id.get(dialog_key(call_id, msg.to_tag or "")), "callee"

    def add(self, dialog: Dialog) -> None:
        key = dialog_key(dialog.call_id, dialog.caller_tag)
        self.by_id[key] = dialog
        self._expiry.set(key, dialog.expires)

    def remove(self, dialog: Dialog) -> None:
        """Take ``dialog`` out of the table (a no-op when another dialog holds its id)."""
        key = dialog_key(dialog.call_id, dialog.caller_tag)
        if self.by_id.get(key) is dialog:
            del self.by_id[key]
            self._expiry.discard(key)

    def expire_at(self, dialog: Dialog, expires: float) -> None:
        dialog.expires = expires
        self._expiry.set(dialog_key(dialog.call_id, dialog.caller_tag), expires)

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
