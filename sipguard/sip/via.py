"""The Via header (RFC 3261 §20.42, §25.1; RFC 3581 rport).

Grammar::

    Via               =  ( "Via" / "v" ) HCOLON via-parm *(COMMA via-parm)
    via-parm          =  sent-protocol LWS sent-by *( SEMI via-params )
    via-params        =  via-ttl / via-maddr / via-received / via-branch / via-extension
    via-ttl           =  "ttl" EQUAL ttl
    via-maddr         =  "maddr" EQUAL host
    via-received      =  "received" EQUAL (IPv4address / IPv6address)
    via-branch        =  "branch" EQUAL token
    via-extension     =  generic-param
    sent-protocol     =  protocol-name SLASH protocol-version SLASH transport
    protocol-name     =  "SIP" / token
    protocol-version  =  token
    transport         =  "UDP" / "TCP" / "TLS" / "SCTP" / other-transport
    sent-by           =  host [ COLON port ]
    ttl               =  1*3DIGIT ; 0 to 255
    response-port     =  "rport" [EQUAL 1*DIGIT]            ; RFC 3581
    SLASH = SWS "/" SWS ; COLON = SWS ":" SWS ; SEMI = SWS ";" SWS ; EQUAL = SWS "=" SWS

The protocol name must be SIP (else 400); the version is kept in ``protocol`` (``"SIP/2.0"``)
for the caller to check. ``str(via)`` is the via-parm exactly as received.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sipguard.sip import regex
from sipguard.sip.errors import SipParseError
from sipguard.sip.params import (
    CACHE_PARTS_MAX,
    CACHE_TEXT_MAX,
    TOKEN_CHARS,
    VALUE_CHARS,
    Params,
    get_param,
    has_param,
    remember,
    scan_params,
    split_plain,
)
from sipguard.sip.uri import check_host, check_port

# sent-protocol LWS sent-by, with SWS around "/" and ":" (RFC 4475 wsinv).
_T = f"[{TOKEN_CHARS}]++"
_VIA_HEAD: Final = regex.compile(
    rf"[ \t]*+({_T})[ \t]*+/[ \t]*+({_T})[ \t]*+/[ \t]*+({_T})[ \t]++"
    r"(\[[^\]]*+\]|[^ \t;,:\[\]]++)(?:[ \t]*+(:)[ \t]*+([0-9]*+))?"
)
# The usual shape, "SIP/2.0/" transport SP host [":" port] *(";" param), without LWS or
# quoted-strings, followed by the end or a comma: one match, same result as the general path.
_VIA_FAST: Final = regex.compile(
    rf"SIP/2\.0/({_T}) ([A-Za-z0-9_.\-]++|\[[0-9A-Fa-f:.]++\])(?::([0-9]{{1,5}}+))?+"
    rf"((?:;{_T}(?:=[{VALUE_CHARS}]++)?+)*+)(?=[ \t]*+(?:,|\Z))"
)
# IPv4address  =  1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT
_IPV4: Final = regex.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")


@dataclass(slots=True, init=False, unsafe_hash=True)
class Via:
    """One via-parm; ``str()`` gives back the original text."""

    protocol: str
    transport: str
    host: str
    port: int | None
    params: Params
    raw: str

    # A hand-written __init__: mypyc compiles it, where a dataclass-made one runs as Python.
    def __init__(
        self, protocol: str, transport: str, host: str, port: int | None, params: Params, raw: str
    ) -> None:
        self.protocol = protocol
        self.transport = transport
        self.host = host
        self.port = port
        self.params = params
        self.raw = raw

    @property
    def branch(self) -> str | None:
        return get_param(self.params, "branch")

    @property
    def received(self) -> str | None:
        return get_param(self.params, "received")

    @property
    def has_rport(self) -> bool:
        """True when ``rport`` is present, with or without a value."""
        return has_param(self.params, "rport")

    @property
    def rport(self) -> int | None:
        """The ``rport`` value; None when absent or bare (see :attr:`has_rport`)."""
        value = get_param(self.params, "rport")
        return int(value) if value is not None else None

    @property
    def maddr(self) -> str | None:
        return get_param(self.params, "maddr")

    @property
    def ttl(self) -> int | None:
        value = get_param(self.params, "ttl")
        return int(value) if value is not None else None

    def param(self, name: str) -> str | None:
        """The value of parameter ``name``; None when absent or valueless."""
        return get_param(self.params, name.lower())

    def __str__(self) -> str:
        return self.raw


def _scan_via(text: str, pos: int, *, fast: bool = True) -> tuple[Via, int]:
    """Scan one via-parm starting at ``pos`` (not at whitespace)."""
    if fast and FAST_VIA is not None:
        found = FAST_VIA(text, pos)
        if found is not None:
            return found
    m = _VIA_FAST.match(text, pos) if fast else None
    if m is not None:
        transport, host_text, port_text, run = m.groups()
        version = "2.0"
        end = m.end()
        params = split_plain(run) if run else ()
    else:
        m = _VIA_HEAD.match(text, pos)
        if m is None:
            raise SipParseError(400, f"malformed Via near {text[pos : pos + 30]!r}")
        name, version, transport, host_text, colon, port_text = m.groups()
        if name.upper() != "SIP":
            raise SipParseError(400, f"Via protocol {name[:20]!r} is not SIP")
        if colon and not port_text:
            raise SipParseError(400, "Via sent-by with an empty port")
        params, end = scan_params(text, m.end())
    host = check_host(host_text)
    port = check_port(port_text) if port_text else None
    if params:
        _check_params(params)
    return Via(f"SIP/{version}", transport.upper(), host, port, params, text[pos:end]), end


def _load_fast() -> Callable[[str, int], tuple[Via, int] | None] | None:
    """The usual via-parm scanned in C (sipguard/sip/_grammar.c), where it is built; None: the
    Python code alone (tests/unit/test_grammar_fast.py checks both agree)."""
    try:
        from sipguard.sip import _grammar
    except ImportError:
        return None
    _grammar.register("Via", Via)
    return _grammar.scan_via


FAST_VIA = _load_fast()


def _load_rest() -> Callable[[bytes], int] | None:
    """Where the values after the first begin in a raw Via line, in C (sipguard/sip/_scan.c,
    ``rest_after_first_via``); None: only :func:`after_first_via` (tests/unit/test_via.py
    checks both agree)."""
    try:
        from sipguard.sip._scan import rest_after_first_via
    except ImportError:
        return None
    return rest_after_first_via


REST_AFTER_FIRST_VIA = _load_rest()


def _check_params(params: Params) -> None:
    for key, value in params:
        if key == "branch" or key == "received" or key == "maddr":
            if not value:
                raise SipParseError(400, f"Via {key} without a value")
            if key == "received":
                _check_received(value)
            elif key == "maddr":
                check_host(value)
        elif key == "rport":
            if value is not None:
                check_port(value)
        elif key == "ttl" and (
            value is None or not value.isdigit() or len(value) > 3 or int(value) > 255
        ):
            raise SipParseError(400, "malformed Via ttl")


def _check_received(value: str) -> None:
    # via-received = "received" EQUAL (IPv4address / IPv6address); a bracketed IPv6 reference
    # is tolerated.
    if _IPV4.fullmatch(value) is not None:
        return
    check_host(value if value.startswith("[") else f"[{value}]")


# Memo cache, bounded in size and count (sipguard.sip.params, "Memo caches").
_VIAS: Final[dict[str, tuple[Via, ...]]] = {}
VIAS_MAX: Final = 64  # small on purpose: see sipguard.sip.params, "Memo caches"


def parse_via_list(text: str, stop: int = 0) -> list[Via]:
    """Parse every via-parm of one Via header value (comma separated), top first.

    ``stop`` > 0 may end the scan once that many via-parms are parsed, the rest of the value
    unread: for a caller that rejects a list that long (``max_list_entries``), so that a
    hostile list costs no more than the limit. Short values are memoised by text (a response
    carries the Vias of its request); each call returns a new list.
    """
    if len(text) > CACHE_TEXT_MAX:
        return list(_parse_vias(text, stop))
    vias = _VIAS.get(text)
    if vias is None:
        vias = _parse_vias(text, 0)
        if len(vias) + sum([len(v.params) for v in vias]) <= CACHE_PARTS_MAX:
            remember(_VIAS, text, vias, VIAS_MAX)
    return list(vias)


def after_first_via(text: str) -> str:
    """What follows the first via-parm of a Via header value and its comma, as written; ""
    when there is none after it. Only the first is parsed (a SipParseError when it is
    malformed): a proxy removing its own Via from a response passes the others on as they
    came, unparsed."""
    n = len(text)
    pos = 0
    while pos < n and text[pos] in " \t":
        pos += 1
    _, pos = _scan_via(text, pos)
    while pos < n and text[pos] in " \t":
        pos += 1
    if pos >= n:
        return ""
    if text[pos] != ",":
        raise SipParseError(400, f"malformed Via near {text[pos : pos + 30]!r}")
    return text[pos + 1 :].strip(" \t")


def _parse_vias(text: str, stop: int) -> tuple[Via, ...]:
    out: list[Via] = []
    n = len(text)
    pos = 0
    while True:
        while pos < n and text[pos] in " \t":
            pos += 1
        via, pos = _scan_via(text, pos)
        out.append(via)
        if len(out) == stop:
            return tuple(out)
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos >= n:
            return tuple(out)
        if text[pos] != ",":
            raise SipParseError(400, f"malformed Via near {text[pos : pos + 30]!r}")
        pos += 1
