"""Server and client transactions (RFC 3261 §17), as plain records the proxy core drives.

States (names, not bare strings; RFC 6026 adds "accepted" for INVITE 2xx):

==================  =========================================================================
server INVITE       proceeding -> deciding (initial INVITE, policy pending) -> proceeding
                    (forwarded) -> completed (non-2xx final sent, Timer G/H) -> confirmed
                    (ACK, Timer I) -> terminated; proceeding -> accepted (2xx, Timer L)
                    -> terminated
server non-INVITE   proceeding -> completed (final sent, Timer J) -> terminated
client INVITE       calling (Timer A/B) -> proceeding (1xx, Timer C) -> completed (non-2xx,
                    ACKed, Timer D) / accepted (2xx, Timer M) -> terminated
client non-INVITE   calling (Timer E/F) -> proceeding (1xx) -> completed (Timer K)
                    -> terminated
==================  =========================================================================
"""

from __future__ import annotations

from typing import Final

from sipguard.contract import CallInfo, Dialog, Flow
from sipguard.proxy.keepalive import Probe
from sipguard.proxy.settings import NextHop
from sipguard.proxy.timers import TimerEntry
from sipguard.sip.message import Message
from sipguard.sip.parser import UNLIMITED, parse_message


def table_key(key: str, method: str) -> str:
    """A transaction's key in the proxy's tables: the method, a space, then the transaction's
    id (RFC 3261 §17.2.3) or our branch. A method is a token, so it has no space: distinct
    (id, method) pairs give distinct keys. A string, not an (id, method) tuple: a tuple is
    an object the cyclic collector examines (~6 per call, ~0.75 µs each under load)."""
    return method + " " + key


CALLING: Final = "calling"
PROCEEDING: Final = "proceeding"
DECIDING: Final = "deciding"
COMPLETED: Final = "completed"
CONFIRMED: Final = "confirmed"
ACCEPTED: Final = "accepted"
TERMINATED: Final = "terminated"


# Transactions are plain classes with hand-written __init__s: mypyc compiles those, where
# dataclass-made ones would run as Python for every transaction.
class ServerTxn:
    __slots__ = ("key", "method", "msg", "flow", "reply_to", "state", "last", "client", "call",
                 "dialog", "to_tag", "timer", "timeout", "interval", "held", "stamped",
                 "next_hop", "ends", "end_reason", "size", "charged")

    def __init__(self, key: str, method: str, msg: Message, flow: Flow, reply_to: Flow) -> None:
        self.key = key
        self.size = 0  # the request's bytes, counted against sip.max_transaction_bytes
        # the call whose Dialog.request_bytes counts them too (a request from its outside
        # party within it, see Proxy._on_request), until the transaction ends
        self.charged: Dialog | None = None
        self.method = method
        # The request; None once the transaction has its final answer (see Proxy._settle):
        # from then on it only absorbs retransmissions, which takes key, flows and ``last``.
        self.msg: Message | None = msg
        self.flow = flow  # where the request came from (TCP: the connection)
        self.reply_to = reply_to  # where responses go (RFC 3261 §18.2.2 / RFC 3581)
        self.state = PROCEEDING
        self.last: bytes | None = None  # the last response sent (resent on retransmissions)
        self.client: ClientTxn | None = None
        self.call: CallInfo | None = None
        self.dialog: Dialog | None = None
        self.to_tag = ""
        self.timer: TimerEntry | None = None  # G (retransmit final)
        self.timeout: TimerEntry | None = None  # H / I / J / L
        self.interval = 0.0
        self.held = 0.0  # seconds its retransmission timer has waited for the receive queue
        self.stamped = ""  # the top Via with received/rport, made once (see Proxy._stamped)
        # An initial INVITE's next hop, worked out before its decision and used when that
        # comes at once (a decision that waited for I/O works it out again: a reload may
        # have changed the core meanwhile).
        self.next_hop: NextHop | None = None
        # A BYE from outside: the dialog it ends once the core has answered it (2xx or 481)
        self.ends: Dialog | None = None
        # that BYE's reason; on an INVITE, the reason sipguard cancelled it for (a suspended
        # number's ringing call: see Proxy.cancel_early)
        self.end_reason = ""

    def __repr__(self) -> str:
        return f"<ServerTxn {self.method} {self.key} {self.state}>"


class ClientTxn:
    __slots__ = ("branch", "method", "data", "flow", "server", "state", "provisional",
                 "cancel_wanted", "cancel_sent", "timer", "timeout", "interval", "held", "sent",
                 "probe", "cancel_reason", "answered_by", "pins_for", "sent_by", "route_tail")

    def __init__(
        self, branch: str, method: str, data: bytes, flow: Flow, server: ServerTxn | None
    ) -> None:
        self.branch = branch
        self.method = method
        self.data = data
        self.flow = flow
        self.server = server
        self.state = CALLING
        self.provisional = False
        self.cancel_wanted = False
        self.cancel_sent = False
        self.timer: TimerEntry | None = None  # A / E (retransmit)
        self.timeout: TimerEntry | None = None  # B / F / C / D / K / M
        self.interval = 0.0
        self.held = 0.0  # seconds its retransmission timer has waited for the receive queue
        self.sent: Message | None = None  # ``data`` parsed, on demand (ACK and CANCEL building)
        self.probe: Probe | None = None  # a keep-alive OPTIONS of sipguard's own
        # the Reason lines of the caller's CANCEL, relayed in ours (RFC 3326)
        self.cancel_reason: tuple[bytes, ...] = ()
        # the call that came in whose caller answers this request (the core's re-INVITE,
        # UPDATE, BYE …): its answers' identity is checked against it (Proxy._answer_edits)
        self.answered_by: Dialog | None = None
        # the call whose answers this INVITE's are (its first 2xx confirmed it): another
        # fork's 2xx pins its tag there (Proxy._on_response)
        self.pins_for: Dialog | None = None
        # the protocol and sent-by of sipguard's Via in ``data``, as core._via_sent reads
        # them (b"" until the first answer needs them): an answer's top Via must show them
        self.sent_by = b""
        # a request of the core's that makes a dialog (an initial INVITE, SUBSCRIBE, REFER):
        # its Record-Route entries as it left, sipguard's own on top — an answer from outside
        # must carry them, in this order, below whatever its side added (Proxy._route_tail)
        self.route_tail: tuple[str, ...] | None = None

    def sent_msg(self) -> Message:
        if self.sent is None:
            # bytes sipguard built itself: our Via and Record-Route may take an accepted
            # message past a parse limit, which must not stop its CANCEL or ACK
            self.sent = parse_message(self.data, max_size=1 << 30, datagram=True,
                                      limits=UNLIMITED)
        return self.sent

    def __repr__(self) -> str:
        return f"<ClientTxn {self.method} {self.branch} {self.state}>"


def _kind(method: str) -> str:
    return "INVITE" if method == "ACK" else method
