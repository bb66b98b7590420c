"""The sipguard configuration schema: the root :class:`Config` and its non-policy sections.

The file is YAML. Only ``listen`` and ``core`` are required; every other setting has a default
(see ``config/sipguard.yaml`` for all of them, each with a comment)::

    listen: [udp://127.0.0.1:5060, tcp://127.0.0.1:5060]
    core: udp://127.0.0.1:5080

This module holds the root model and the sections the shell reads (``sip``, ``log``,
``admin`` — ``metrics`` is accepted as its old name, giving both is an error — ``tls`` and
``state_dir``). The ``rules:`` tree and the ``peers:`` list are the policy's
(:mod:`sipguard.policy.schema`); the endpoint syntax is :mod:`sipguard.ops.endpoints`; reading
the file and reporting its errors with line numbers is :mod:`sipguard.ops.config_load`.

Unknown keys and out-of-range values are errors. Every model is frozen: a loaded
:class:`Config` never changes, so a reload builds a fresh tree and swaps one reference; code
holding the old tree keeps a consistent view until it looks again.

Relative file paths (``dno_file``, ``numbers_file``, ``trust_anchors``, ...) are declared with
the ``ConfigPath`` type (:mod:`sipguard.policy.settings`). It resolves them against the folder
of the config file (``base_dir``, passed to pydantic as validation context), not against the
process's working directory, so ``sipguard run --config /etc/sipguard/sipguard.yaml`` finds
``dno.txt`` next to the config file wherever it is started from.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sipguard.ops.endpoints import Endpoint, ListenUri, format_host, split_hostport
from sipguard.ops.privacy import read_hash_key
from sipguard.policy.schema import PeerConfig, Region, RulesConfig, merge_peer_rules
from sipguard.policy.settings import ConfigModel, ConfigPath, number_list
from sipguard.state.shared_memory import SET_CAP

# an entry of `suspended`: a whole number, visual separators allowed
_TELEPHONE_NUMBER = re.compile(r"\+?[0-9 ().-]+")

__all__ = [
    "AdminSettings", "Config", "LogSettings", "MetricsSettings", "SentinelSettings", "SipSettings",
    "StateSettings", "TlsSettings",
]

_FROZEN = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

MAX_WORKERS = 64
WORKER_PORT_OFFSET = 100  # default worker_port_base: the highest listen port + this


class SipSettings(ConfigModel):
    """SIP protocol behaviour and limits (the ``sip:`` section)."""

    model_config = _FROZEN

    max_message_size: int = Field(
        default=65535,
        ge=1024,
        le=1048576,
        description="Largest SIP message accepted, bytes; a larger one gets 513 Message Too "
        "Large.",
    )
    max_headers: int = Field(
        default=256, ge=32,
        description="Header lines in one message at most (a folded one counts once); more: "
        "400 `too many headers`. A large INVITE has 40.",
    )
    max_header_line: int = Field(
        default=16384, ge=1024,
        description="Longest header line with its folds, and start line, bytes; longer: 513 "
        "(414 for a request line). An Identity header has about 900.",
    )
    max_continuation_lines: int = Field(
        default=64, ge=1,
        description="Continuation (folded) lines of one header at most; more: 400 `too many "
        "continuation lines`.",
    )
    max_list_entries: int = Field(
        default=100, ge=8,
        description="Entries of one list header (Via, Route, Record-Route, Contact, PAI, "
        "Diversion, History-Info) at most; more: 400. Max-Forwards 70 allows 71 Vias.",
    )
    max_header_params: int = Field(
        default=512, ge=32,
        description="Parameters of one header at most, over its entries and their URIs; "
        "more: 400. Bounds what a parsed header costs (130 bytes a parameter).",
    )
    max_dialog_lifetime_s: float = Field(
        default=14400,
        gt=0,
        description="A call ends this many seconds after its INVITE whatever else happens (4 h), "
        "an answered one with a BYE to each side (`lifetime`): a lost BYE never leaks a call, "
        "and no call stays up that sipguard has forgotten.",
    )
    core_tcp_any_port: bool = Field(
        default=False,
        description="Take any TCP/TLS connection from the core's address as the core's, also "
        "one the core opens itself for its own requests (its BYE, a call it places) — and, "
        "with a udp:// core, the TCP a core switches to for a message over 1,300 bytes (RFC "
        "3261 §18.1.1: listen on TCP too). A stream cannot be spoofed, but every process on "
        "the core's host then speaks as the core. Off: only the connection sipguard opened "
        "to a tcp:// or tls:// core.",
    )
    relay_core_503: bool = Field(
        default=True,
        description="A `503` from the core goes to the caller as it is: a carrier fails over to "
        "another site on it (RFC 3263), and may hold the whole trunk for its Retry-After. "
        "`false`: sent as `500 Server Internal Error` (RFC 3261 §16.7 step 6: a 503 from a "
        "proxy says it can serve no request, where the core refused one).",
    )
    answer_options: bool = Field(
        default=True,
        description="Answer out-of-dialog OPTIONS to sipguard itself with 200 (peer "
        "keep-alives). OPTIONS with a user part go to the core.",
    )
    record_route: bool = Field(
        default=True,
        description="Add Record-Route so in-dialog requests (ACK, BYE, re-INVITE) also pass "
        "sipguard.",
    )
    allow_methods: tuple[str, ...] = Field(
        default=("INVITE", "OPTIONS"),
        min_length=1,
        description="Out-of-dialog methods accepted from peers (ACK and CANCEL that match a "
        "call always are); others are answered 405 with Allow. `[\"*\"]`: every method. Dialogs "
        "are kept for calls only: a SUBSCRIBE's refreshes from outside hear 481.",
    )
    strip_headers: tuple[str, ...] = Field(
        default=(),
        description="More header names removed from every request and answer from outside, "
        "besides sipguard's own verdict headers (which always are).",
    )
    unchecked_identity: Literal["strip", "pass"] = Field(
        default="strip",
        description="Remote-Party-ID and P-Preferred-Identity from outside: removed from every "
        "request and answer (`strip`), or passed on (`pass`). No rule checks them (rule "
        "`callerid` checks From and P-Asserted-Identity): passed on, a core that reads the "
        "caller from them sees a number no rule looked at — a DNO number behind an anonymous "
        "From, say.",
    )
    max_transactions: int = Field(
        default=500000, ge=100,
        description="Live server transactions at most; a new request beyond is answered 503 "
        "+ Retry-After (`dropped_limit_transactions`). Requests within a call in progress go "
        "on, up to `max_dialogs` transactions more. An answered transaction is held 64*T1 "
        "(32 s), a call holds two (INVITE, BYE; with their client sides ~2.5-3.5 KB): the "
        "default holds ~7,800 calls/s sustained, or a burst above that for a while (some "
        "0.6-0.9 GB when full of ordinary calls, and bounded in bytes by "
        "`max_transaction_bytes_mib` whatever the messages' size; per process: each worker "
        "has its own table).",
    )
    dialog_keepalive_s: float | None = Field(
        default=None, ge=10,
        description="Send in-dialog OPTIONS to both sides of every answered call this often, "
        "seconds (null: off); a side answering 481/408 or not at all ends the call and frees "
        "its slots (`dialogs_ended_keepalive_failed`).",
    )
    max_dialogs: int = Field(
        default=100000, ge=1,
        description="Live calls at most; a new INVITE beyond is answered 503 + Retry-After "
        "(`dropped_limit_dialogs`), calls in progress go on.",
    )
    max_transaction_bytes_mib: int = Field(
        default=512, ge=1,
        description="The bytes of the requests the live server transactions hold at most, "
        "MiB (a sender chooses a message's size up to `max_message_size`: 500,000 requests of "
        "60 KB would be 30 GB; a call's two are ~2 KB); a new request beyond is answered 503 + "
        "Retry-After (`dropped_limit_transaction_bytes`), requests within a call in progress "
        "go on. The process holds up to ~3x this (each request's answer and forwarded copy).",
    )
    max_dialog_bytes_mib: int = Field(
        default=256, ge=1,
        description="The bytes of the INVITEs of the live calls at most, MiB (a call keeps its "
        "From, To, Contact, Call-ID and Record-Route for its whole life: a caller choosing "
        "15 KB tags would hold ~170 KB a call for hours); a new INVITE beyond is answered 503 "
        "+ Retry-After (`dropped_limit_dialog_bytes`).",
    )
    max_call_request_kib: int = Field(
        default=256, ge=64,
        description="The bytes of one call's requests from outside that its live transactions "
        "hold at most, KiB (re-INVITEs, UPDATEs, INFOs, MESSAGEs ...: each is held 32 s after "
        "its answer; a DTMF INFO is ~0.7 KB), so that one call cannot use up "
        "`max_transaction_bytes_mib` and keep new calls out; a request beyond is answered 503 "
        "+ Retry-After (`dropped_limit_call_bytes`) and the call goes on. Its BYE always goes "
        "on.",
    )
    max_subscriptions: int = Field(
        default=10000, ge=1,
        description="Subscriptions (SUBSCRIBE, REFER) through sipguard kept at most, so "
        "that their later requests from outside — the NOTIFYs for the core's, a party's "
        "refreshes — are let through while they last; the oldest is forgotten first "
        "(`noticed_subscription_forgotten`; its next NOTIFY then hears 481).",
    )
    t1_ms: int = Field(
        default=500, ge=1,
        description="RFC 3261 T1: round-trip estimate and first retransmit interval, ms.",
    )
    t2_ms: int = Field(
        default=4000, ge=1,
        description="RFC 3261 T2: longest retransmit interval for non-INVITE requests, ms; not "
        "below `t1_ms`.",
    )
    t4_ms: int = Field(
        default=5000, ge=1,
        description="RFC 3261 T4: longest time a message stays in the network, ms.",
    )
    timer_c_s: float = Field(
        default=185,
        gt=0,
        description="RFC 3261 §16.6 Timer C: give up on an unanswered INVITE after this many "
        "seconds without a provisional response (each one starts it again); sipguard then "
        "sends CANCEL toward the core. The RFC asks for more than 180.",
    )
    tcp_idle_timeout_s: float = Field(
        default=600, gt=0,
        description="Close a TCP connection with no complete SIP message either way for this "
        "many seconds. CRLF keep-alives are answered but do not count as traffic.",
    )
    tcp_max_connections: int = Field(
        default=4096, ge=1,
        description="TCP connections with parties at most; a new inbound one beyond is closed "
        "at once, and one sipguard would open to a party (an answer whose connection closed) "
        "is not opened (`tcp_refused_total`). Connections with the core do not count. With "
        "peers configured, a peer's connection is admitted beyond it (its per-address cap "
        "still holds), and one from an unknown source that brings no complete message within "
        "`tcp_message_timeout_s` is closed: unknown sources cannot lock the trunks out. Per "
        "process (each worker its own). sipguard raises its open-files soft limit to what this "
        "needs (about this + 256 + 64 + listeners + `admin.max_connections`); a hard limit "
        "below lowers the cap to fit (`fd_limit_low` at start, gauge "
        "`tcp_connections_limit`).",
    )
    tcp_listen_backlog: int = Field(
        default=1024, ge=1, le=65535,
        description="TCP and TLS connections the kernel completes and holds for sipguard to "
        "accept, per listener (listen(2) backlog; the kernel caps it at "
        "`net.core.somaxconn`). A burst of connects beyond it (trunks and phones reconnecting "
        "at once after an outage) has its SYNs dropped and retried 1 s, 3 s, 7 s later.",
    )
    tcp_max_connections_per_ip: int = Field(
        default=64, ge=1,
        description="TCP connections with one IP address (an IPv6 one: its `ipv6_prefix` "
        "network) at most, whichever side opened them; a new one beyond is closed at once or "
        "not opened (`tcp_refused_per_ip`). The core's address is exempt.",
    )
    ipv6_prefix: int = Field(
        default=64, ge=16, le=128,
        description="IPv6 sources are counted per network of this many bits by the "
        "per-address limits: the flood guard (`rules.flood` with `key: ip`), "
        "`rules.rate.per_source_ip` and `tcp_max_connections_per_ip`. One holder of a /64 "
        "has 2^64 addresses; counted per address it would stay under every limit. A ban or "
        "a count then names the network (`2001:db8:1:2::/64`). An address in a configured "
        "peer's networks is counted on its own. 128: every address on its own. IPv4 "
        "addresses are always counted on their own.",
    )
    tcp_message_timeout_s: float = Field(
        default=10, gt=0,
        description="Close a TCP connection that holds a partial SIP message for longer than "
        "this, seconds (`tcp_message_timeout`; slowloris).",
    )
    tcp_write_buffer_max: int = Field(
        default=1048576, ge=16384,
        description="Stop reading from a TCP connection whose unsent answers exceed this, "
        "bytes, until a quarter of it is left (`tcp_write_paused`). Past four times this the "
        "connection is aborted (`tcp_write_overflow`).",
    )
    tcp_write_stall_timeout_s: float = Field(
        default=30, gt=0,
        description="Abort a TCP connection whose reading has stayed paused for a full write "
        "buffer this long, seconds (`tcp_write_stalled`).",
    )
    tcp_connect_timeout_s: float = Field(
        default=5, gt=0,
        description="Give up an outbound TCP connection not open after this many seconds "
        "(`tcp_connect_failed`); the messages waiting for it are dropped (`tcp_queued_dropped`).",
    )
    udp_receive_buffer: int = Field(
        default=4194304,
        ge=65536,
        le=268435456,
        description="UDP socket receive buffer, bytes: absorbs bursts; the kernel drops "
        "datagrams beyond it. It is SO_RCVBUF: the kernel caps it at `net.core.rmem_max` unless sipguard "
        "may force it (root / CAP_NET_ADMIN); `udp_receive_buffer_capped` is logged then.",
    )
    udp_send_thread: bool | Literal["auto"] = Field(
        default="auto",
        description="Send UDP datagrams from a C thread beside the event loop: the loop queues "
        "a copy and wakes the thread once per pass, which sends them in order with `sendmmsg`; "
        "the kernel's share of a send (delivering the datagram, waking the receiver) then runs "
        "on another CPU. `auto`: when this process may run on more CPUs (its CPU affinity) "
        "than there are `workers`, and the loop sends a pass's datagrams itself while it is not "
        "busy (below 70 % of its time; waking the thread costs CPU too: `udp_sent_in_loop`); "
        "`true`: the thread sends everything. With the queue full (65,536 datagrams or 32 MiB) "
        "the loop sends (`udp_send_queue_full`). Reloadable.",
    )
    overload_shed_above: float | None = Field(
        default=0.5,
        gt=0,
        le=1,
        description="A UDP receive queue fuller than this share: new calls get 503 at once "
        "(null: off). The share is of `udp_receive_buffer`; those 503s carry Retry-After, no "
        "rules run for them and nothing goes to the core, so the ACKs and BYEs of calls in "
        "progress are still read.",
    )
    overload_resume_below: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Overload ends once every UDP receive queue is below this share again "
        "(and its delay under a quarter of `overload_delay_ms`). It must be below "
        "`overload_shed_above`.",
    )
    overload_delay_ms: int | None = Field(
        default=300,
        ge=10,
        le=10000,
        description="A datagram that waited longer than this in a UDP receive queue (from its "
        "arrival in the kernel to its reading, measured every 32 datagrams), or a TCP/TLS "
        "connection that has had bytes left waiting after every read for longer than this: "
        "new calls get 503 at once, as for `overload_shed_above` (null: off; then calls "
        "over TCP/TLS are never shed). Keep it below SIP's T1 (500 ms): a queue that far "
        "behind makes callers retransmit, which adds load. Linux only (kernel receive "
        "timestamps, FIONREAD); elsewhere only the UDP share counts.",
    )
    overload_retry_after_s: int = Field(
        default=5, ge=0,
        description="Retry-After on the 503 answers sent while overloaded, seconds.",
    )
    advertise: str | None = Field(
        default=None,
        description="host[:port] to put in Via and Record-Route (NAT, 0.0.0.0 binds); null: "
        "the listen address.",
    )

    @field_validator("advertise")
    @classmethod
    def _check_advertise(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, port = split_hostport(value.strip(), port_required=False)
        return format_host(host) + ("" if port is None else f":{port}")

    @model_validator(mode="after")
    def _check_timers(self) -> SipSettings:
        if self.t2_ms < self.t1_ms:
            raise ValueError(f"t2_ms ({self.t2_ms}) must not be below t1_ms ({self.t1_ms})")
        shed = self.overload_shed_above
        if shed is not None and self.overload_resume_below >= shed:
            raise ValueError(
                f"overload_resume_below ({self.overload_resume_below}) must be below "
                f"overload_shed_above ({shed})"
            )
        return self


class AdminSettings(ConfigModel):
    """The HTTP admin API (the ``admin:`` section; ``metrics:`` is its old name)."""

    model_config = _FROZEN

    listen: str | None = Field(
        default=None,
        description="host:port of the HTTP endpoint: /metrics, /healthz, /readyz and the admin "
        "API; null: no endpoint. Off loopback a token_file is required (a start or a reload "
        "without one is refused).",
    )
    token_file: ConfigPath | None = Field(
        default=None,
        description="File holding the bearer token the admin API asks for (not /healthz, "
        "/readyz, /metrics); null: no token (loopback only).",
    )
    max_connections: int = Field(
        default=64, ge=1, le=100_000,
        description="Open HTTP connections the endpoint holds at most; for one more, the "
        "oldest with no request being answered is closed (counted admin_connections_evicted: "
        "half-sent requests cannot lock the operator out), or, with none, the new one "
        "(admin_connections_refused): idle or half-sent requests cannot use up the file "
        "descriptors SIP needs.",
    )
    max_connections_per_ip: int = Field(
        default=32, ge=1, le=100_000,
        description="Open HTTP connections from one address at most (beyond: as "
        "max_connections, among that address's): one client cannot take all of "
        "max_connections.",
    )
    idle_timeout_s: float = Field(
        default=30.0, gt=0, le=3600,
        description="An HTTP connection that sends nothing for this long while none of its "
        "requests is being answered is closed (counted admin_connections_idle_closed): a "
        "half-sent request, or a kept-alive connection between scrapes. A slow answer (a "
        "reload) is not cut.",
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, port = split_hostport(value.strip(), port_required=True)
        return format_host(host) + f":{port}"

    @property
    def host_port(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def loopback(self) -> bool:
        """The endpoint binds a loopback address only (``localhost`` counts)."""
        hp = self.host_port
        if hp is None:
            return True
        if hp[0] == "localhost":
            return True
        try:
            return ipaddress.ip_address(hp[0]).is_loopback
        except ValueError:
            return False


MetricsSettings = AdminSettings  # the section's old name


class LogSettings(ConfigModel):
    """Logging (the ``log:`` section)."""

    model_config = _FROZEN

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level written: debug, info, warning, error."
    )
    format: Literal["json", "console"] = Field(
        default="json",
        description="json = one JSON object a line (for collectors); console = for people.",
    )
    queue_bytes: int = Field(
        default=16 * 1024 * 1024, ge=65536, le=1024 * 1024 * 1024,
        description="Log text waiting for the reader of stdout at most, bytes. Lines leave "
        "from a thread, so a reader that falls behind or stops (journald, a container "
        "runtime, a log shipper) never stops calls; beyond this, lines are dropped and "
        "counted (`log_lines_dropped`, and a warning once the reader catches up).",
    )
    parse_error_sample_s: float = Field(
        default=1.0, ge=0,
        description="At most one sampled log line per kind and source per this many seconds; "
        "the rest are counted. Sampled: parse errors, dropped messages, rate-limited calls.",
    )
    numbers: Literal["full", "masked", "hashed"] = Field(
        default="full",
        description="Telephone numbers in log lines and admin API answers: full; masked (country "
        "code and last 3 digits, `+31*******567`); hashed (HMAC-SHA256 with `hash_key_file`, "
        "16 hex digits: one number can be followed across lines). See docs/privacy.md.",
    )
    hash_key_file: ConfigPath | None = Field(
        default=None,
        description="File holding the secret key of `numbers: hashed` (at least 16 bytes; "
        "relative to the config file); required with `hashed`.",
    )

    @model_validator(mode="after")
    def _check_hash_key(self) -> LogSettings:
        if self.numbers == "hashed" and self.hash_key_file is None:
            raise ValueError("log.hash_key_file is required with log.numbers: hashed")
        if self.numbers == "hashed" and self.hash_key_file is not None:
            try:
                read_hash_key(self.hash_key_file)
            except OSError as exc:
                raise ValueError(f"log.hash_key_file: cannot read {self.hash_key_file}: "
                                 f"{exc.strerror or exc}") from None
        return self


class TlsSettings(ConfigModel):
    """TLS (the ``tls:`` section): certificates for ``tls://`` listeners and toward a
    ``tls://`` core (RFC 3261 §26, RFC 5630). Read at start and again on every reload: new
    connections use the new files, open ones keep theirs."""

    model_config = _FROZEN

    cert_file: ConfigPath | None = Field(
        default=None,
        description="PEM certificate chain (leaf first) sipguard presents on `tls://` "
        "listeners, and to a `tls://` core that asks for one; required with a `tls://` listener.",
    )
    key_file: ConfigPath | None = Field(
        default=None,
        description="PEM private key of `cert_file`; required with a `tls://` listener.",
    )
    ca_file: ConfigPath | None = Field(
        default=None,
        description="PEM CA certificates client certificates are verified against; set: a "
        "client that presents a certificate must chain to one of them (null: none asked for).",
    )
    peers_ca_file: ConfigPath | None = Field(
        default=None,
        description="PEM CA certificates trusted, beside the system's CAs, for the servers of "
        "parties sipguard connects to (calls the core places to `sips:` / `transport=tls` "
        "parties: a PBX with a private CA); null: the system's CAs only. Not the core's "
        "(`core_ca_file`).",
    )
    verify_clients: bool = Field(
        default=False,
        description="Refuse TLS clients without a certificate that chains to `ca_file` "
        "(mutual TLS); needs `ca_file`.",
    )
    core_ca_file: ConfigPath | None = Field(
        default=None,
        description="PEM CA certificates the core's certificate is verified against when "
        "`core` is `tls://`; null: the system's CAs.",
    )
    core_server_name: str | None = Field(
        default=None,
        description="Name the core's certificate must carry (and SNI) when `core` is "
        "`tls://`; null: the core's host.",
    )

    @model_validator(mode="after")
    def _check_verify(self) -> TlsSettings:
        if self.verify_clients and self.ca_file is None:
            raise ValueError("tls.verify_clients needs tls.ca_file (the CA to verify against)")
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise ValueError(f"tls.{missing} is missing: give cert_file and key_file together")
        return self


class SentinelSettings(ConfigModel):
    """Redis Sentinel: where the sentinels are and the name of the master they watch."""

    model_config = _FROZEN

    master: str = Field(min_length=1, description="The monitored master's name (`mymaster`).")
    nodes: tuple[str, ...] = Field(
        min_length=1, description="Sentinels as `HOST:PORT`, one or more.",
    )

    @field_validator("nodes")
    @classmethod
    def _hostports(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for node in value:
            split_hostport(node, True)
        return value


class StateSettings(ConfigModel):
    """Where the limits' counters live: this process (``memory``) or a Redis / Valkey shared by
    every sipguard instance (``redis``). Read at start-up; a reload that changes it is refused."""

    model_config = _FROZEN

    backend: Literal["memory", "redis", "shared_memory"] = Field(
        default="memory",
        description="`memory`: counters in this process (one instance, no server needed); "
        "`redis`: shared through Redis / Valkey, so limits hold across instances; "
        "`shared_memory`: shared by the worker processes of one host (`workers`) through a "
        "memory segment the supervisor makes, no server needed.",
    )
    url: str | None = Field(
        default=None,
        description="The Redis server: `redis://[:PASSWORD@]HOST:PORT/DB`, `rediss://` for "
        "TLS, `unix:///path/redis.sock`; with `cluster: true`, any node of the cluster. "
        "Required for `redis` unless `sentinel` is given.",
    )
    cluster: bool = Field(
        default=False,
        description="`url` is a Redis Cluster node: keys are hash-tagged per number, so one "
        "number's checks touch one slot.",
    )
    sentinel: SentinelSettings | None = Field(
        default=None,
        description="Find the master through Redis Sentinel `{master, nodes}` instead of `url`.",
    )
    key_prefix: str = Field(
        default="sipguard:", min_length=1, max_length=64,
        description="Prefix of every key sipguard writes (several deployments can share one "
        "Redis with different prefixes).",
    )
    timeout_ms: int = Field(
        default=50, ge=1, le=10_000,
        description="Longest wait for Redis per INVITE; beyond it the call is decided as if "
        "Redis were down (`fail`).",
    )
    fail: Literal["open", "closed"] = Field(
        default="open",
        description="While the shared store cannot be used (Redis unreachable; `shared_memory`: "
        "a table full, or its lock held by a stopped process): `open` = calls pass unlimited by "
        "the shared limits (counted `rule_state_state_unavailable`, logged, tagged `X-Sipguard-Verdict: "
        "state.unavailable` to the core); `closed` = they hear `503` + Retry-After.",
    )
    retry_after_s: int = Field(
        default=5, ge=0, le=3600,
        description="Retry-After of the 503 with `fail: closed` (0: none).",
    )
    lease_s: int = Field(
        default=60, ge=3, le=86_400,
        description="A live call's slot lapses this long after its instance last refreshed it "
        "(every `lease_s / 3`): a crashed instance's calls free their slots after at most this.",
    )
    breaker_failures: int = Field(
        default=3, ge=1, le=1000,
        description="Failed or late round trips in a row that open the circuit breaker: then "
        "no call waits for Redis until a background probe reaches it again. (`shared_memory`: "
        "one call that waited 100 ms for the lock opens it; a probe every second.)",
    )
    max_pending_releases: int = Field(
        default=100_000, ge=0, le=10_000_000,
        description="Slot releases kept to retry when Redis is back; beyond it they lapse "
        "after `lease_s` instead.",
    )

    max_keys: int = Field(
        default=262_144, ge=1024, le=16_777_216,
        description="`shared_memory`: counters held at once (live-call counts, rate cells, "
        "cooldowns, windowed counts), about 85 bytes each; a call that needs one more while the "
        "table is full is decided as if the store were down (`fail`), counted "
        "`state_shm_full`.",
    )
    max_leases: int = Field(
        default=524_288, ge=1024, le=16_777_216,
        description="`shared_memory`: live-call slots held at once (one per live call and "
        "number it counts on), about 32 bytes each; full: as `max_keys`.",
    )
    max_sets: int = Field(
        default=16_384, ge=16, le=1_048_576,
        description="`shared_memory`: callers whose distinct called numbers are counted at "
        "once (rule `dialer`, `distinct_callees`), about 1 KiB each; the count stops at 128 "
        "(thresholds above it are refused); full: "
        "as `max_keys`.",
    )

    @model_validator(mode="after")
    def _where(self) -> StateSettings:
        if self.backend == "redis":
            if self.url is None and self.sentinel is None:
                raise ValueError("backend redis needs `url` (or `sentinel`)")
            if self.url is not None and self.sentinel is not None:
                raise ValueError("give `url` or `sentinel`, not both")
            if self.cluster and self.sentinel is not None:
                raise ValueError("`cluster` works with `url`, not with `sentinel`")
        if self.url is not None:
            shown = re.sub(r"(//[^/@]*:)[^/@]*@", r"\1<redacted>@", self.url)[:60]
            if not re.match(r"(rediss?|unix|valkeys?)://", self.url):
                raise ValueError(f"url {shown!r} is not redis://, rediss:// or unix://")
            try:  # what the client would refuse at start, refused here (check-config too)
                parts = urlsplit(self.url)
                _ = parts.port
                if parts.scheme == "unix":
                    if not parts.path:
                        raise ValueError("no socket path")
                elif not parts.hostname:
                    raise ValueError("no host")
                elif parts.path.strip("/") and not parts.path.strip("/").isdigit():
                    raise ValueError(f"database {parts.path.strip('/')!r} is not a number")
            except ValueError as exc:
                raise ValueError(f"url {shown!r}: {exc}") from None
        return self


class Config(ConfigModel):
    """The whole configuration file.

    - ``listen`` (required): one or more ``udp://HOST:PORT`` / ``tcp://HOST:PORT`` /
      ``tls://HOST:PORT`` to accept SIP on; a single string is accepted as a one-item list.
    - ``core`` (required): where accepted calls are sent, same URI syntax.
    - ``mode`` (``enforce``): ``enforce`` rejects what policy rejects; ``monitor`` only logs.
    - ``sip``: :class:`SipSettings`; ``log``: :class:`LogSettings` (all defaults if omitted).
    """

    model_config = _FROZEN

    listen: tuple[ListenUri, ...] = Field(min_length=1, description="Addresses to accept SIP on.")
    core: Endpoint = Field(description="Where accepted calls are sent.")
    mode: Literal["enforce", "monitor"] = Field(
        default="enforce", description="enforce: reject per policy; monitor: only log the decision."
    )
    sip: SipSettings = Field(default=SipSettings(), description="SIP behaviour and limits.")
    log: LogSettings = Field(default=LogSettings(), description="Logging.")
    tls: TlsSettings = Field(
        default=TlsSettings(),
        description="TLS certificates: `tls://` listeners, a `tls://` core, client certificates.",
    )
    admin: AdminSettings | None = Field(
        default=None,
        description="HTTP admin API and metrics endpoint (listen, token_file); null: none.",
    )
    metrics: AdminSettings | None = Field(
        default=None,
        description="Old name of `admin:` (the same keys); giving both is an error.",
    )
    state_dir: ConfigPath | None = Field(
        default=None,
        description="Folder where suspensions made through the admin API are kept across "
        "restarts; null: they last until the process ends.",
    )
    state: StateSettings = Field(
        default=StateSettings(),
        description="Where the limits' counters live: this process, or Redis / Valkey shared "
        "by several instances.",
    )
    drain_timeout_s: float = Field(
        default=30, ge=0,
        description="On SIGTERM / SIGINT: new INVITEs hear 503 + Retry-After and /readyz turns "
        "unready at once; calls in progress go on until they end or this many seconds pass, "
        "then sipguard exits 0. A second signal stops at once.",
    )
    workers: int = Field(
        default=1, ge=1, le=MAX_WORKERS,
        description="Worker processes on this host (`sipguard run --workers N` overrides): "
        "each binds every `listen` address with SO_REUSEPORT (the kernel spreads new callers "
        "over them) and a port of its own per listener that its Via and Record-Route name, so "
        "a call's later messages reach the worker holding it. More than 1 needs "
        "`state.backend: shared_memory` or `redis`.",
    )
    worker_spread: Literal["caller", "source"] = Field(
        default="caller",
        description="With several workers, who handles a message that reaches the public "
        "address: `caller` = the worker chosen by the caller number (the From URI's user "
        "part): whichever worker the kernel gave the datagram to hands it over, so one "
        "trunk's calls spread over every worker and a caller's calls stay on one; `source` = "
        "the worker the kernel chose by source address and port (one trunk, one worker).",
    )
    worker_hang_timeout_s: float = Field(
        default=10, ge=0,
        description="With several workers, a worker whose event loop has not answered the "
        "supervisor for this many seconds (it sends a heartbeat every second from its loop: "
        "stopped, stuck in a busy loop, swapped out) is killed (SIGKILL) and started again, "
        "as one that died (`worker_hung`); 0: never, else at least 3. Read at start.",
    )
    worker_port_base: int | None = Field(
        default=None, ge=1, le=65535, validate_default=True,
        description="With several workers, worker i's own port on the listener at position "
        "L of `listen` is `worker_port_base + L * workers + i`; null: the highest listen port "
        "+ 100 (5160 for 5060).",
    )
    peers: tuple[PeerConfig, ...] = Field(
        default=(), description="Known peers; empty: every source is accepted."
    )
    unknown_source: Literal["reject", "drop"] = Field(
        default="reject",
        description="Traffic from an address in no peer's networks (with peers configured): "
        "`reject` = one stateless 403 Forbidden, `drop` = no answer at all (not even 100 "
        "Trying); for every method.",
    )
    default_region: Region = Field(
        default=None, pattern=r"^[A-Z]{2}$",
        description="ISO 3166 country code (e.g. `US`) to read national-format numbers in for "
        "every peer that sets none and, without peers, for every source; null: none "
        "(`2125550100` and `+12125550100` are then two numbers to the limits and lists).",
    )
    suspended: tuple[str, ...] = Field(
        default=(),
        description="Numbers suspended at once: INVITEs from outside from or to them get 403 "
        "Forbidden (\"from\": the caller, or the number From shows when it is another); so "
        "does a REFER from outside whose Refer-To is one (the core would call it on the "
        "party's word). Calls the core places pass without policy, so does a 3xx's Contact "
        "the core recurses on: the core's own dial plan must keep them from a suspended "
        "number.",
    )
    rules: RulesConfig = Field(default=RulesConfig(), description="Rules, in evaluation order.")

    # the files the settings name, as they were when this config was loaded: the setting's
    # place (``peers[0].numbers_file``) -> (the file, its (mtime_ns, size); None: no such
    # file); a reload compares them to report a list edited in place (``file_stamps``)
    _files: dict[str, tuple[str, tuple[int, int] | None]] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        self._files = _file_stamps(self)

    @property
    def file_stamps(self) -> dict[str, tuple[str, tuple[int, int] | None]]:
        """The files this config's settings name (number lists, ``dno_file``, certificates,
        the log's hash key; not the admin token file nor ``state_dir``), each at its first
        setting (the top-level ``rules`` before the peers that inherit them), with its mtime
        and size when the config was loaded."""
        return self._files

    @model_validator(mode="before")
    @classmethod
    def _merge_peer_rules(cls, data: Any) -> Any:
        """Each peer's ``rules`` become the top-level rules with the peer's overrides merged in."""
        return merge_peer_rules(data)

    @model_validator(mode="before")
    @classmethod
    def _peers_inherit_region(cls, data: Any) -> Any:
        """A peer without ``default_region`` takes the top-level one."""
        if not isinstance(data, dict) or not data.get("default_region"):
            return data
        peers = data.get("peers")
        if not isinstance(peers, (list, tuple)):
            return data
        region = data["default_region"]
        return {**data, "peers": [
            {**p, "default_region": region}
            if isinstance(p, dict) and p.get("default_region") is None else p for p in peers]}

    @field_validator("peers")
    @classmethod
    def _unique_peers(cls, value: tuple[PeerConfig, ...]) -> tuple[PeerConfig, ...]:
        seen: set[str] = set()
        nets: dict[object, str] = {}
        for peer in value:
            if peer.name in seen:
                raise ValueError(f"peer name {peer.name!r} is used twice")
            seen.add(peer.name)
            for net in peer.networks:
                other = nets.setdefault(net, peer.name)
                if other != peer.name:
                    # the most specific network wins; of two alike, one would be dead config
                    raise ValueError(f"network {net} is both peer {other!r}'s and peer "
                                     f"{peer.name!r}'s: an address belongs to one peer")
        return value

    @field_validator("suspended", mode="before")
    @classmethod
    def _check_suspended(cls, value: Any) -> Any:
        return number_list(value, _TELEPHONE_NUMBER, "a telephone number")

    @property
    def ipv6_prefix(self) -> int:
        """``sip.ipv6_prefix``, as the policy reads it (``PolicyConfig``)."""
        return self.sip.ipv6_prefix

    @property
    def http(self) -> AdminSettings:
        """The effective admin / metrics endpoint settings (``admin:`` or its old name)."""
        return self.admin or self.metrics or _NO_ADMIN

    @field_validator("metrics")
    @classmethod
    def _one_admin_section(
        cls, value: AdminSettings | None, info: ValidationInfo
    ) -> AdminSettings | None:
        if value is not None and info.data.get("admin") is not None:
            raise ValueError("give `admin:` only (`metrics:` is its old name), not both")
        return value

    @field_validator("sip", "log", "state", mode="before")
    @classmethod
    def _empty_section_is_defaults(cls, value: object) -> object:
        return {} if value is None else value

    @field_validator("listen", mode="before")
    @classmethod
    def _one_listen_string(cls, value: object) -> object:
        return [value] if isinstance(value, str | Endpoint) else value

    @field_validator("listen")
    @classmethod
    def _unique_listen(cls, value: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        for i, endpoint in enumerate(value):
            if endpoint in value[:i]:
                raise ValueError(f"{endpoint} is listed twice")
        return value

    @field_validator("core")
    @classmethod
    def _core_is_elsewhere(cls, value: Endpoint, info: ValidationInfo) -> Endpoint:
        if value.host in ("0.0.0.0", "::"):
            raise ValueError(f"core must be a concrete address, not {format_host(value.host)}")
        listen = info.data.get("listen", ())
        if value in listen:
            raise ValueError(f"core {value} is also a listen address: calls would loop")
        if value.transport == "udp" and listen and all(ep.transport != "udp" for ep in listen):
            raise ValueError(f"core {value} is UDP but no listen address is: sipguard sends "
                             "UDP from a udp:// listener's socket (add one, or reach the core "
                             "over tcp://)")
        return value

    @field_validator("worker_hang_timeout_s")
    @classmethod
    def _hang_timeout_outlasts_heartbeats(cls, value: float) -> float:
        if 0 < value < 3:
            raise ValueError("must be 0 (off) or at least 3 seconds: a worker's heartbeat "
                             "comes every second, and a busy second must not kill it")
        return value

    @field_validator("workers")
    @classmethod
    def _workers_share_state(cls, value: int, info: ValidationInfo) -> int:
        if value == 1:
            return value
        state = info.data.get("state")
        if isinstance(state, StateSettings) and state.backend == "memory":
            raise ValueError("more than one worker needs state.backend: shared_memory or "
                             "redis (each worker would count its own calls)")
        sip = info.data.get("sip")
        if isinstance(sip, SipSettings) and sip.advertise and _has_port(sip.advertise):
            raise ValueError("with more than one worker sip.advertise takes a host only: each "
                             "worker advertises a port of its own")
        return value

    @field_validator("rules")
    @classmethod
    def _distinct_counts_fit(cls, value: RulesConfig, info: ValidationInfo) -> RulesConfig:
        state = info.data.get("state")
        if not isinstance(state, StateSettings) or state.backend != "shared_memory":
            return value
        peers = info.data.get("peers") or ()
        # (the top-level rules' error is said at `rules:` already: no second "rules:")
        for where, rules in (("", value), *((f"peer {p.name}: ", p.rules) for p in peers)):
            distinct = rules.dialer.distinct_callees if rules.dialer is not None else None
            if distinct is None:
                continue
            for name in ("tag", "block"):
                at = getattr(distinct, name)
                if at is not None and at > SET_CAP:
                    raise ValueError(
                        f"{where}dialer.distinct_callees.{name} is {at}, but with "
                        f"state.backend shared_memory distinct called numbers are counted up "
                        f"to {SET_CAP} (use {SET_CAP} or less, or the redis backend)")
        return value

    @field_validator("worker_port_base")
    @classmethod
    def _worker_ports_are_free(cls, value: int | None, info: ValidationInfo) -> int | None:
        workers, listen = info.data.get("workers"), info.data.get("listen")
        if not isinstance(workers, int) or workers == 1 or not listen:
            return value
        base = _worker_base(value, listen)
        # every port one host would bind: UDP ones, and TCP ones (tcp, tls, the admin API)
        owners: dict[tuple[str, int], str] = {}

        def take(kind: str, port: int, owner: str) -> None:
            other = owners.setdefault((kind, port), owner)
            if other != owner:
                raise ValueError(f"port {port} would be both {other} and {owner}")

        for ep in listen:
            take("udp" if ep.transport == "udp" else "tcp", ep.port, f"listen {ep}")
        admin = info.data.get("admin") or info.data.get("metrics")
        if isinstance(admin, AdminSettings) and admin.host_port is not None and \
                admin.host_port[1]:
            for i in range(workers):
                take("tcp", admin.host_port[1] + i, f"worker {i}'s admin API")
        for index, ep in enumerate(listen):
            for i in range(workers):
                port = base + index * workers + i
                if port > 65535:
                    raise ValueError(f"worker {i}'s own port for {ep} would be {port}, past "
                                     "65535: give a lower worker_port_base")
                take("udp" if ep.transport == "udp" else "tcp", port,
                     f"worker {i}'s own port for {ep}")
        return value

    def worker_port(self, listener: int, worker: int) -> int:
        """Worker ``worker``'s own port on ``listen[listener]`` (several workers): its Via and
        Record-Route name it, so what belongs to its calls comes back to it."""
        return _worker_base(self.worker_port_base, self.listen) + listener * self.workers + worker

    @model_validator(mode="after")
    def _tls_listener_has_certificate(self) -> Config:
        tls_listeners = [str(ep) for ep in self.listen if ep.transport == "tls"]
        if tls_listeners and self.tls.cert_file is None:
            raise ValueError(
                f"tls.cert_file and tls.key_file are required by the tls:// listener "
                f"{tls_listeners[0]}"
            )
        return self


_NO_ADMIN = AdminSettings()


def _worker_base(base: int | None, listen: tuple[Endpoint, ...]) -> int:
    return base if base is not None else max(ep.port for ep in listen) + WORKER_PORT_OFFSET


def _has_port(hostport: str) -> bool:
    return split_hostport(hostport, port_required=False)[1] is not None


# settings naming a file whose edits ``Config.file_stamps`` does not follow: the admin section
# (its token file's content is compared on reload, ``admin.token_file``) and state_dir (a folder)
_UNSTAMPED = frozenset({"admin", "metrics", "state_dir"})


def _file_stamps(cfg: Config) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """``Config.file_stamps`` of ``cfg``: each file once, at its first setting."""
    out: dict[str, tuple[str, tuple[int, int] | None]] = {}
    # (module-level helpers, not closures: a recursive closure is a reference cycle, left to
    # the cyclic collector sipguard runs rarely — tests/unit/test_no_cycles.py)
    seen: set[str] = set()
    _stamp_model(cfg.rules, "rules", out, seen)  # before the peers that inherit them
    _stamp_model(cfg, "", out, seen)
    return out


def _stamp_model(model: BaseModel, where: str,
                 out: dict[str, tuple[str, tuple[int, int] | None]], seen: set[str]) -> None:
    for name in type(model).model_fields:
        if not where and name in _UNSTAMPED:
            continue
        value = getattr(model, name)
        here = f"{where}.{name}" if where else name
        if isinstance(value, Path):
            _stamp_file(value, here, out, seen)
        elif isinstance(value, BaseModel):
            _stamp_model(value, here, out, seen)
        elif isinstance(value, tuple) and value and isinstance(value[0], (BaseModel, Path)):
            for i, item in enumerate(value):
                if isinstance(item, Path):
                    _stamp_file(item, f"{here}[{i}]", out, seen)
                elif isinstance(item, BaseModel):
                    _stamp_model(item, f"{here}[{i}]", out, seen)


def _stamp_file(path: Path, where: str, out: dict[str, tuple[str, tuple[int, int] | None]],
                seen: set[str]) -> None:
    name = str(path)
    if name in seen:
        return
    seen.add(name)
    try:
        st = path.stat()
    except OSError:
        out[where] = (name, None)
    else:
        out[where] = (name, (st.st_mtime_ns, st.st_size))
