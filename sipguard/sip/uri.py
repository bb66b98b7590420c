"""URIs: SIP and SIPS (RFC 3261 §19.1, §25.1), tel (RFC 3966), and any other absolute URI.

``parse_uri`` splits a URI into its parts and keeps the original text: ``str(uri)`` is the URI
exactly as received. What it accepts and rejects:

* sip/sips: userinfo is everything up to the first ``@`` (a user may contain ``;``, ``?``, ``/``
  and the other user-unreserved characters), the password follows the first ``:`` of it. The
  user and password are kept as written (still %-escaped); the host is lower-cased (IPv6
  references keep their brackets); URI parameter names and values are %-unescaped (RFC 3261
  §19.1.4: ``;%6C%72`` is ``;lr``) and names lower-cased; the ``?`` headers are kept raw.
* tel: the telephone-subscriber before the first ``;`` is ``user``; the rest are tel params.
* any other ``scheme ":" 1*char``: kept opaque (scheme as written, no host); whether the scheme is
  acceptable is for the proxy to decide (416).
* 400 for: no scheme, a character no URI may contain (whitespace, controls, non-ASCII,
  ``" < > \\ ^ ` { | }``), sip/sips without a host, an empty user before ``@``, a malformed
  host, a bad port (not digits, or above 65535), unbalanced brackets, malformed parameters.

Deliberately lenient: user, password and headers are not checked beyond the character set above
(``#`` in dial strings is common in the wild), and malformed %-escapes are left as written.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote as _pct_unquote

from sipguard.sip import regex
from sipguard.sip.errors import SipParseError
from sipguard.sip.params import (
    CACHE_PARTS_MAX,
    CACHE_TEXT_MAX,
    Params,
    get_param,
    has_param,
    remember,
)

# scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
_SCHEME: Final = regex.compile(r"[A-Za-z][A-Za-z0-9+.\-]*+")

# Every character a URI may hold: reserved / unreserved / escaped (RFC 3261 §25.1), plus "[" "]"
# for IPv6 references and "#" (unescaped in dial strings by many devices).
#   reserved    =  ";" / "/" / "?" / ":" / "@" / "&" / "=" / "+" / "$" / ","
#   unreserved  =  alphanum / mark
#   mark        =  "-" / "_" / "." / "!" / "~" / "*" / "'" / "(" / ")"
#   escaped     =  "%" HEXDIG HEXDIG
_BAD_CHAR: Final = regex.compile(r"[^!#-;=?-\[\]_a-z~]")

# hostname     =  *( domainlabel "." ) toplabel [ "." ]
# domainlabel  =  alphanum / alphanum *( alphanum / "-" ) alphanum
# toplabel     =  ALPHA / ALPHA *( alphanum / "-" ) alphanum
# IPv4address  =  1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT
# (checked loosely: labels of alphanum, "-" and "_", which also covers IPv4 addresses)
_HOSTNAME: Final = regex.compile(r"(?:[a-z0-9_\-]+\.)*[a-z0-9_\-]+\.?")
# IPv6reference  =  "[" IPv6address "]"
_IPV6_CHARS: Final = regex.compile(r"[0-9a-f:.]++")

# uri-parameters    =  *( ";" uri-parameter)
# uri-parameter     =  transport-param / user-param / method-param / ttl-param / maddr-param
#                      / lr-param / other-param
# other-param       =  pname [ "=" pvalue ]
# pname             =  1*paramchar
# pvalue            =  1*paramchar
# paramchar         =  param-unreserved / unreserved / escaped
# param-unreserved  =  "[" / "]" / "/" / ":" / "&" / "+" / "$"
# (RFC 3966 tel parameters, ";" pname [ "=" pvalue ], use the same characters)
_PARAMCHAR = r"[A-Za-z0-9\-_.!~*'()\[\]/:&+$%]"
_URI_PARAMS: Final = regex.compile(rf"(?:;{_PARAMCHAR}++(?:={_PARAMCHAR}++)?+)*+")

# telephone-subscriber  = global-number / local-number
# global-number-digits  = "+" *phonedigit DIGIT *phonedigit
# local-number-digits   = *phonedigit-hex (HEXDIG / "*" / "#")*phonedigit-hex
# phonedigit            = DIGIT / [ visual-separator ]
# phonedigit-hex        = HEXDIG / "*" / "#" / [ visual-separator ]
# visual-separator      = "-" / "." / "(" / ")"
_TEL_SUBSCRIBER: Final = regex.compile(r"\+[0-9().\-]*+|[0-9A-Fa-f*#().\-]++")

_DROP_SEPARATORS: Final = str.maketrans("", "", "-.() ")
_DROP_DIALCHARS: Final = str.maketrans("", "", "0123456789*#")
_NUMBER_START: Final = frozenset("+0123456789-.() ")
_CONTROL: Final = re.compile("[\x00-\x1f\x7f]")
# a number's digits at most, dial prefixes and routing digits included (E.164: 15)
MAX_NUMBER_DIGITS: Final = 32
# the runs of digits hidden_numbers reads at most (a decoy or two, then the number)
MAX_HIDDEN: Final = 4
_HIDDEN: Final = re.compile(r"\+?[0-9]{6,15}")
_HIDDEN_IN_NAME: Final = re.compile(r"\+?[0-9]{7,15}")
# what a receiver may skip around the digits of a number: dial and visual characters, a pause
_DROP_NUMBERISH: Final = str.maketrans("", "", "+*#,-.() ")


@dataclass(slots=True, init=False, unsafe_hash=True)
class Uri:
    """A parsed URI; ``str()`` gives back the original text."""

    scheme: str
    user: str | None
    password: str | None
    host: str
    port: int | None
    params: Params
    headers: str | None
    raw: str
    number: str | None

    # A hand-written __init__: mypyc compiles it, where a dataclass-made one runs as Python.
    def __init__(
        self,
        scheme: str,
        user: str | None,
        password: str | None,
        host: str,
        port: int | None,
        params: Params,
        headers: str | None,
        raw: str,
        number: str | None = None,
    ) -> None:
        self.scheme = scheme
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self.params = params
        self.headers = headers
        self.raw = raw
        self.number = number

    def param(self, name: str) -> str | None:
        """The value of URI parameter ``name``; None when absent or valueless."""
        return get_param(self.params, name.lower())

    def has_param(self, name: str) -> bool:
        """True when URI parameter ``name`` is present, with or without a value."""
        return has_param(self.params, name.lower())

    def __str__(self) -> str:
        return self.raw


# Memo caches, bounded in size and count (sipguard.sip.params, "Memo caches").
_URIS: Final[dict[str, Uri]] = {}
URIS_MAX: Final = 2048
_HOSTS: Final[dict[str, str]] = {}
HOSTS_MAX: Final = 4096


def parse_uri(text: str) -> Uri:
    """Parse a SIP, SIPS, tel or other absolute URI (see the module docstring).

    Short results are memoised by text (URIs repeat across the messages of a call); a Uri is
    immutable, so sharing one is safe.
    """
    if len(text) > CACHE_TEXT_MAX:
        return _parse_uri(text)
    uri = _URIS.get(text)
    if uri is None:
        uri = _parse_uri(text)
        if len(uri.params) <= CACHE_PARTS_MAX:
            remember(_URIS, text, uri, URIS_MAX)
    return uri


def _parse_uri(text: str) -> Uri:
    fast = FAST_URI
    if fast is not None:
        uri = fast(text)
        if uri is not None:
            return uri
    m = _SIP_FAST.fullmatch(text)
    if m is not None:
        return _sip_from_match(text, m)
    if not text:
        raise SipParseError(400, "empty URI")
    colon = text.find(":")
    if colon <= 0 or _SCHEME.fullmatch(text, 0, colon) is None:
        raise SipParseError(400, f"URI without a scheme: {text[:40]!r}")
    bad = _BAD_CHAR.search(text)
    if bad is not None:
        raise SipParseError(400, f"illegal character {bad.group()!r} in URI")
    scheme = text[:colon]
    lower = scheme.lower()
    if lower == "sip" or lower == "sips":
        return _parse_sip(text, lower, colon + 1)
    if lower == "tel":
        return _parse_tel(text, colon + 1)
    # absoluteURI = scheme ":" ( hier-part / opaque-part )  -- kept opaque
    if colon + 1 == len(text):
        raise SipParseError(400, "URI with nothing after the scheme")
    return Uri(scheme, None, None, "", None, (), None, text, None)


# The common shape of a SIP/SIPS URI in one match (a strict subset of what _parse_sip takes,
# with the same results): scheme, [user [":" password] "@"], host, [":" port], params, [headers].
# No "@" may appear but the one ending the userinfo, as in _parse_sip where the first "@" ends
# it. Anything else goes the long way, which also produces the precise error.
_SIP_FAST: Final = regex.compile(
    r"((?i:sips?)):"
    r"(?:([!#-9;=?A-Z_a-z~]++)(?::([!#-;=?A-Z_a-z~]*+))?+@)?+"
    r"([A-Za-z0-9_.\-]++|\[[0-9A-Fa-f:.]++\])"
    r"(?::([0-9]{1,5}+))?+"
    rf"((?:;{_PARAMCHAR}++(?:={_PARAMCHAR}++)?+)*+)"
    r"(?:\?([!#-;=?A-\[\]_a-z~]*+))?+"
)


def _sip_from_match(text: str, m: re.Match[str]) -> Uri:
    scheme, user, password, host, port_text, ptext, headers = m.groups()
    port: int | None = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            raise SipParseError(400, f"port {port} out of range")
    params = _split_uri_params(ptext) if ptext else ()
    number = None
    if user is not None:
        phone = get_param(params, "user") if params else None
        number = _number(user, phone is not None and phone.lower() == "phone")
    return Uri(
        scheme.lower(), user, password, check_host(host), port, params, headers, text, number
    )


# SIP-URI   =  "sip:" [ userinfo ] hostport uri-parameters [ headers ]
# SIPS-URI  =  "sips:" [ userinfo ] hostport uri-parameters [ headers ]
# userinfo  =  ( user / telephone-subscriber ) [ ":" password ] "@"
# user      =  1*( unreserved / escaped / user-unreserved )
# user-unreserved  =  "&" / "=" / "+" / "$" / "," / ";" / "?" / "/"
# password  =  *( unreserved / escaped / "&" / "=" / "+" / "$" / "," )
# headers   =  "?" header *( "&" header )
def _parse_sip(text: str, scheme: str, start: int) -> Uri:
    at = text.find("@", start)
    user: str | None = None
    password: str | None = None
    hp = start
    if at >= 0:
        user, sep, pw = text[start:at].partition(":")
        if not user:
            raise SipParseError(400, "empty user part in URI")
        if sep:
            password = pw
        hp = at + 1
    query = text.find("?", hp)
    params_end = query if query >= 0 else len(text)
    semi = text.find(";", hp, params_end)
    hp_end = semi if semi >= 0 else params_end
    host, port = _hostport(text[hp:hp_end])
    params: Params = ()
    if hp_end < params_end:
        params = _uri_params(text[hp_end:params_end])
    headers = text[query + 1 :] if query >= 0 else None
    number = None
    if user is not None:
        phone = get_param(params, "user")
        number = _number(user, phone is not None and phone.lower() == "phone")
    return Uri(scheme, user, password, host, port, params, headers, text, number)


# telephone-uri  = "tel:" telephone-subscriber
# global-number  = global-number-digits *par
# local-number   = local-number-digits *par context *par
# par            = parameter / extension / isdn-subaddress
def _parse_tel(text: str, start: int) -> Uri:
    semi = text.find(";", start)
    end = semi if semi >= 0 else len(text)
    subscriber = text[start:end]
    if _TEL_SUBSCRIBER.fullmatch(subscriber) is None:
        raise SipParseError(400, f"malformed telephone-subscriber {subscriber[:40]!r}")
    if not subscriber.translate(_DROP_SEPARATORS).lstrip("+"):
        raise SipParseError(400, "telephone-subscriber without digits")
    params = _uri_params(text[end:]) if semi >= 0 else ()
    return Uri("tel", subscriber, None, "", None, params, None, text, _number(subscriber, True))


def _uri_params(text: str) -> Params:
    if _URI_PARAMS.fullmatch(text) is None:
        raise SipParseError(400, f"malformed URI parameters {text[:40]!r}")
    return _split_uri_params(text)


def _split_uri_params(text: str) -> Params:
    out: list[tuple[str, str | None]] = []
    for item in text[1:].split(";"):
        name, eq, value = item.partition("=")
        if "%" in name:
            name = _pct_unquote(name, encoding="latin-1")
        if "%" in value:
            value = _pct_unquote(value, encoding="latin-1")
        out.append((name.lower(), value if eq else None))
    return tuple(out)


# hostport  =  host [ ":" port ]
# host      =  hostname / IPv4address / IPv6reference
# port      =  1*DIGIT
def _hostport(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise SipParseError(400, "unbalanced brackets in host")
        host = check_host(text[: close + 1])
        rest = text[close + 1 :]
        if not rest:
            return host, None
        if rest[0] != ":":
            raise SipParseError(400, f"malformed hostport {text[:60]!r}")
        return host, check_port(rest[1:])
    host, sep, port = text.partition(":")
    return check_host(host), (check_port(port) if sep else None)


def check_host(text: str) -> str:
    """Validate a host (hostname, IPv4 address or bracketed IPv6 reference); lower-case it.

    Memoised for short hosts (a DNS name has at most 253 characters).
    """
    if len(text) > CACHE_TEXT_MAX:
        return _check_host(text)
    host = _HOSTS.get(text)
    if host is None:
        host = _check_host(text)
        remember(_HOSTS, text, host, HOSTS_MAX)
    return host


def _check_host(text: str) -> str:
    host = text.lower()
    if host.startswith("["):
        inner = host[1:-1]
        if (
            not host.endswith("]")
            or _IPV6_CHARS.fullmatch(inner) is None
            or ":" not in inner
            or not _is_ipv6(inner)
        ):
            raise SipParseError(400, f"malformed IPv6 reference {text[:60]!r}")
        return host
    if _HOSTNAME.fullmatch(host) is None:
        raise SipParseError(400, f"malformed host {text[:60]!r}" if text else "missing host")
    return host


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _load_fast() -> Callable[[str], Uri | None] | None:
    """The usual SIP URI parsed in C (sipguard/sip/_grammar.c), where it is built; None: the
    Python code alone. The C code builds Uri objects and checks hosts with :func:`check_host`;
    tests/unit/test_grammar_fast.py checks both paths agree."""
    try:
        from sipguard.sip import _grammar
    except ImportError:
        return None
    _grammar.register("Uri", Uri)
    _grammar.register("check_host", check_host)
    return _grammar.sip_uri


FAST_URI = _load_fast()


def check_port(text: str) -> int:
    """Validate a port (1*DIGIT, at most 65535)."""
    if not 0 < len(text) <= 5 or not text.isascii() or not text.isdigit():
        raise SipParseError(400, f"malformed port {text[:20]!r}")
    port = int(text)
    if port > 65535:
        raise SipParseError(400, f"port {port} out of range")
    return port


def _number(user: str, phone: bool) -> str | None:
    """The telephone number in a user part / telephone-subscriber, normalised, or None.

    The user is %-unescaped, cut at the first ``;`` (isub, ext, phone-context...) and stripped
    of visual separators ``- . ( )`` and spaces; the leading ``+`` of a global number stays.
    Where the URI says it is a telephone number (tel:, or sip with ``user=phone``) digits, ``*``
    and ``#`` are accepted; a plain SIP user must be digits only.
    """
    if "%" in user:
        user = _pct_unquote(user, encoding="latin-1")
        head = user.partition(";")[0]
        if _CONTROL.search(head) is not None and _CONTROL.sub("", head).translate(
                _DROP_NUMBERISH).isdigit():
            # "+1212…%00": a receiver reading C strings sees a number this one does not (RFC
            # 4475's "null-%00-null" is no number: it passes)
            raise SipParseError(400, "escaped control character in a telephone number")
    elif user[0] not in _NUMBER_START:
        if not phone:
            return None  # fast exit for the usual "alice"
    elif (user[1:] if user[0] == "+" else user).isdigit() and user.isascii() and \
            len(user) <= MAX_NUMBER_DIGITS:
        return user  # fast exit for an already normal number
    digits = user.partition(";")[0].translate(_DROP_SEPARATORS)
    body = digits[1:] if digits.startswith("+") else digits
    if not body:
        return None
    if (body.isascii() and body.isdigit()) or (
            phone and not body.translate(_DROP_DIALCHARS) and any(c.isdigit() for c in body)):
        if len(body) > MAX_NUMBER_DIGITS and \
                sum(c.isdigit() for c in body) > MAX_NUMBER_DIGITS:
            # no telephone number is that long (E.164: 15 digits): keyed by it, every
            # rule's table would hold what the sender chose
            raise SipParseError(400, f"telephone number of more than {MAX_NUMBER_DIGITS} digits")
        return digits
    return None


def hidden_number(uri: Uri) -> str | None:
    """The telephone number a receiver may read in a user part that holds none as read here,
    once escapes are decoded, compatibility forms folded and invisible characters dropped:
    where the user starts with a digit, ``+``, ``*`` or ``#``, its first run of 6–15 digits
    across the separators a number is written with (``*67+13125557090``,
    ``+1 212-555-0100x12``); where it starts with a letter, a run of 7–15 digits written
    together (``x19005550199``). None for a name (``gw1``, ``3cx``, ``queue_123456``,
    ``agent-100-200``) or a URI with a number."""
    found = hidden_numbers(uri)
    return found[0] if found else None


def hidden_numbers(uri: Uri) -> list[str]:
    """Every run :func:`hidden_number` may find, in order: a receiver that skips a decoy
    (``123456x+19005550199``) reads the second. At most MAX_HIDDEN + 1: more than MAX_HIDDEN
    is no identity a rule can check (rule callerid refuses it)."""
    user = uri.user
    if uri.number is not None or not user:
        return []
    if "%" in user:
        user = _pct_unquote(user, errors="replace")
    head = user.partition(";")[0]
    if not head.isascii():
        head = "".join(c for c in unicodedata.normalize("NFKC", head)
                       if unicodedata.category(c) not in ("Cf", "Zs", "Cc"))
    first = next((c for c in head if c.isascii() and (c.isalnum() or c in "+*#")), "")
    if first.isalpha():
        found = _HIDDEN_IN_NAME.finditer(head)
    else:
        found = _HIDDEN.finditer("".join(c for c in head if (c.isascii() and c.isalnum())
                                         or c == "+"))
    return [m.group() for _, m in zip(range(MAX_HIDDEN + 1), found, strict=False)]


def display_number(name: str | None) -> str | None:
    """The telephone number a display name shows: a name without a (visible) letter, read
    part by part — ``#``, ``,``, ``;``, ``/``, ``:`` end a part — as the first part's digits
    (any script's, compatibility forms folded) with a leading ``+``, 6–15 of them, whatever
    separates them: ``"+1 212 555 0100 #12"`` shows +12125550100. None for a name
    (``Support 0800 123 456``) or a part of too few or many digits."""
    if not name or not any(c.isdigit() for c in name):
        return None
    text = name if name.isascii() else "".join(
        c for c in unicodedata.normalize("NFKC", name) if c not in _INVISIBLE
        and unicodedata.category(c) != "Cf")
    if any(c.isalpha() for c in text):
        return None
    for part in _DISPLAY_PARTS.split(text):
        digits = "".join(str(unicodedata.decimal(c)) for c in part if c.isdecimal())
        if 6 <= len(digits) <= 15:
            return "+" + digits if part.lstrip(" \t*").startswith("+") else digits
    return None


# shown as blank, yet letters to str.isalpha (Hangul fillers)
_INVISIBLE: Final = frozenset("\u115f\u1160\u3164\uffa0")
_DISPLAY_PARTS: Final = re.compile("[#,;/:]")


def plain_identity(uri: Uri) -> bool:
    """A P-Asserted-Identity value without a number that may go on as it is: a SIP URI (RFC
    3325 §9.1 allows sip, sips and tel) whose user is no number in disguise (``sip:gw1@carrier``,
    ``sip:carrier.example``) — not ``*67+1312…@…``, not ``skp:+1312…``."""
    return uri.scheme in ("sip", "sips") and hidden_number(uri) is None
