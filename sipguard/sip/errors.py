"""The one exception the SIP layer raises: a parse error that carries the answer to send.

Whatever bytes arrive, parsing either succeeds or raises :class:`SipParseError`; the status
tells the proxy what to answer (400, 413, 414, 416, 420, 482, 483, 505, 513) when the message is a
request it can still answer, and the reason phrase is sent as-is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sipguard.sip.message import Message

REASONS: dict[int, str] = {
    400: "Bad Request",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    482: "Loop Detected",
    483: "Too Many Hops",
    505: "Version Not Supported",
    513: "Message Too Large",
}


class SipParseError(Exception):
    """A message (or part of one) that cannot be accepted, with the SIP status to answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status} {detail}")
        self.status = status
        self.detail = detail
        # What could be split of a request that failed (see sipguard.sip.parser._fail).
        self.partial: Message | None = None

    @property
    def reason(self) -> str:
        """The reason phrase for the status line."""
        return REASONS.get(self.status, "Bad Request")
