"""The Identity header of STIR (RFC 8224 §4.1 with errata 6499; PASSporT, RFC 8225).

Grammar (RFC 8224 §4.1, errata 6499 replaces base64-char by base64url-char)::

    Identity = "Identity" HCOLON signed-identity-digest SEMI
               ident-info *( SEMI ident-info-params )
    signed-identity-digest = 1*(base64url-char / ".")
    ident-info = "info" EQUAL ident-info-uri
    ident-info-uri = LAQUOT absoluteURI RAQUOT
    ident-info-params = ident-info-alg / ident-type / ident-info-extension
    ident-info-alg = "alg" EQUAL token
    ident-type = "ppt" EQUAL token
    ident-info-extension = generic-param
    base64url-char = ALPHA / DIGIT / "-" / "_"

The digest must be a JWS compact serialisation, ``header.payload.signature``, or the RFC 8225
compact form with the payload left out, ``header..signature``. Parameters may come in any
order. A missing ``info`` is not a parse error (``info`` is None): RFC 8224 answers it
with 436 Bad Identity Info, which is the verifier's call. ``ppt`` is commonly sent quoted
(``ppt="shaken"``, RFC 8588), so quotes are accepted and stripped; ``info`` is given without
its angle brackets (or quotes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sipguard.sip import regex
from sipguard.sip.errors import SipParseError
from sipguard.sip.params import (
    CACHE_PARTS_MAX,
    Params,
    expect_end,
    get_param,
    remember,
    scan_params,
    unquote,
)

# JWS compact serialisation: BASE64URL(header) "." [BASE64URL(payload)] "." BASE64URL(sig)
_JWS: Final = regex.compile(r"[A-Za-z0-9_\-]++\.[A-Za-z0-9_\-]*+\.[A-Za-z0-9_\-]++")


@dataclass(slots=True, init=False, unsafe_hash=True)
class Identity:
    """One Identity header value; ``str()`` gives back the original text. Treat it as
    immutable: parsed values are memoised and shared (not frozen: a frozen dataclass's
    ``__init__`` runs as Python, one ``object.__setattr__`` per field, on every call that
    carries Identity)."""

    token: str
    info: str | None
    alg: str | None
    ppt: str | None
    params: Params
    raw: str

    # A hand-written __init__: mypyc compiles it, where a dataclass-made one runs as Python.
    def __init__(self, token: str, info: str | None, alg: str | None, ppt: str | None,
                 params: Params, raw: str) -> None:
        self.token = token
        self.info = info
        self.alg = alg
        self.ppt = ppt
        self.params = params
        self.raw = raw

    def param(self, name: str) -> str | None:
        """The value of parameter ``name`` as written; None when absent or valueless."""
        return get_param(self.params, name.lower())

    def __str__(self) -> str:
        return self.raw


# Memo cache, bounded in size and count (sipguard.sip.params, "Memo caches"). An Identity
# value is longer than other headers (a signed PASSporT: 400 to 900 characters), so it has its
# own text cap, and few entries: each call signs its own.
_IDENTITIES: Final[dict[str, Identity]] = {}
IDENTITIES_MAX: Final = 128
IDENTITY_TEXT_MAX: Final = 1024


def parse_identity(text: str) -> Identity:
    """Parse one Identity header value (short ones memoised by text: a call attempted again
    repeats it)."""
    if len(text) > IDENTITY_TEXT_MAX:
        return _parse_identity(text)
    identity = _IDENTITIES.get(text)
    if identity is None:
        identity = _parse_identity(text)
        if len(identity.params) <= CACHE_PARTS_MAX:
            remember(_IDENTITIES, text, identity, IDENTITIES_MAX)
    return identity


def _parse_identity(text: str) -> Identity:
    m = _JWS.match(text)
    if m is None:
        raise SipParseError(400, "Identity is not a JWS compact serialisation")
    params, end = scan_params(text, m.end(), angle=True)
    expect_end(text, end, "Identity")
    info = get_param(params, "info")
    if info is not None:
        info = info[1:-1] if info.startswith("<") else unquote(info)
    alg = get_param(params, "alg")
    ppt = get_param(params, "ppt")
    return Identity(
        m.group(),
        info,
        unquote(alg) if alg is not None else None,
        unquote(ppt) if ppt is not None else None,
        params,
        text[:end],
    )
