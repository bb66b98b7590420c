"""SHAKEN PASSporTs (RFC 8225, RFC 8588, ATIS-1000074): decode, check the claims, verify ES256.

A PASSporT is a JWS in compact serialisation, ``BASE64URL(header).BASE64URL(payload).
BASE64URL(signature)``. For SHAKEN (RFC 8588 §4–6, ATIS-1000074 §5.2)::

    header  = {"alg":"ES256", "ppt":"shaken", "typ":"passport", "x5u":"https://..."}
    payload = {"attest":"A"|"B"|"C", "dest":{"tn":["12155551213"]}, "iat":1443208345,
               "orig":{"tn":"12155551212"}, "origid":"123e4567-e89b-12d3-a456-426655440000"}

and the signature is ES256 (ECDSA P-256 / SHA-256, RFC 7518 §3.4) over the ASCII bytes of
``header "." payload`` as they were sent, given as the raw 64-byte ``r || s``.

:func:`decode_passport` does everything that needs no certificate and raises
:class:`PassportError` with a reason code naming what is wrong; :func:`verify_signature`
checks the signature with the public key of the certificate ``x5u`` points to. Both are pure
(no clock, no I/O): freshness is the caller's comparison of ``iat`` with its own clock.

Telephone numbers are compared in the canonical form of RFC 8224 §8.3: visual separators
(`` -.()``) and a leading ``+`` removed, digits only (:func:`canonical_tn`).
"""

from __future__ import annotations

import binascii
import json
import json.scanner
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

ATTESTATIONS: Final = ("A", "B", "C")  # strongest first

_VISUAL: Final = str.maketrans("", "", " -.()")
_ORIGID: Final = re.compile(r"[A-Za-z0-9._\-]{1,128}")
# The latest iat taken (seconds since the epoch, 2**40: year ~36,800): a larger integer is no
# time, and one past a float's range would make the freshness arithmetic raise.
IAT_MAX: Final = 1 << 40
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())
_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")


class PassportError(Exception):
    """The PASSporT cannot be accepted; ``reason`` is a short code for logs and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True, init=False)
class Passport:
    """A decoded SHAKEN (or div) PASSporT whose header and claims are well formed (not yet
    verified). Treat it as immutable once the rule has set ``diverted`` (not frozen: a frozen
    dataclass's ``__init__`` runs as Python, one ``object.__setattr__`` per field, on every
    call that carries Identity)."""

    x5u: str
    attest: str  # "A" | "B" | "C"
    orig: str  # canonical telephone number (digits only)
    dest: tuple[str, ...]  # canonical telephone numbers
    iat: int  # seconds since the Unix epoch
    origid: str
    signing_input: bytes  # b"header.payload" as sent: what the signature covers
    signature: bytes  # raw r || s, 64 bytes
    # a div PASSporT (RFC 8946; ``attest`` and ``origid`` empty): the number the call was
    # diverted from; "" for a SHAKEN one
    div: str
    # a SHAKEN PASSporT whose dest is not the callee: the div PASSporTs that lead from its
    # dest to the callee (RFC 8946), each to be verified as it is
    diverted: tuple[Passport, ...]

    def __init__(self, x5u: str, attest: str, orig: str, dest: tuple[str, ...], iat: int,
                 origid: str, signing_input: bytes, signature: bytes, div: str = "") -> None:
        self.x5u = x5u
        self.attest = attest
        self.orig = orig
        self.dest = dest
        self.iat = iat
        self.origid = origid
        self.signing_input = signing_input
        self.signature = signature
        self.div = div
        self.diverted = ()


def canonical_tn(text: str) -> str | None:
    """``text`` as RFC 8224 §8.3 canonical digits (separators and a leading + dropped), or
    None when anything but digits is left."""
    tn = text.translate(_VISUAL)
    if tn.startswith("+"):
        tn = tn[1:]
    return tn if tn.isdigit() and tn.isascii() else None


def _b64(part: str) -> bytes:
    """base64url, padding optional: ``base64.urlsafe_b64decode`` without its three Python
    frames (the same steps: ASCII only, ``-_`` read as ``+/``, non-alphabet bytes skipped)."""
    try:
        data = (part + "=" * (-len(part) % 4)).encode("ascii")
        return binascii.a2b_base64(data.translate(_URLSAFE))
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        raise PassportError("bad_passport", "invalid base64url") from None


# json.loads's scanner: (the value at index i, the index after it), StopIteration if none
_SCAN: Final[Callable[[str, int], tuple[Any, int]]] = json.scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]  # the stub wants the scanner's own type
)


def _json(part: str, what: str) -> dict[str, Any]:
    """A base64url JSON object, in UTF-8 (RFC 8259 §8.1). A duplicate member name keeps its
    lexically last value, one of the two behaviours RFC 7515 §4 allows (the other, rejecting,
    costs a Python hook per object on the per-call path). The object is read by the C scanner
    straight away; ``json.loads`` (three Python frames and an encoding guess around the same
    scanner) only where the text starts with whitespace or has more after the value."""
    try:
        text = _b64(part).decode("utf-8")
        try:
            obj, end = _SCAN(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):
            obj = json.loads(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise PassportError("bad_passport", f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise PassportError("bad_passport", f"{what} is not a JSON object")
    return obj


@lru_cache(maxsize=256)
def _header(part: str, ppt: str = "shaken") -> str:
    """The x5u of a checked SHAKEN (or ``ppt``) PASSporT header (memoised: one originating
    carrier sends the same protected header on every call)."""
    header = _json(part, "header")
    if header.get("alg") != "ES256":
        raise PassportError("bad_header", f"alg {header.get('alg')!r}, expected ES256")
    if header.get("typ") != "passport":
        raise PassportError("bad_header", f"typ {header.get('typ')!r}, expected passport")
    if header.get("ppt") != ppt:
        raise PassportError("bad_header", f"ppt {header.get('ppt')!r}, expected {ppt}")
    x5u = header.get("x5u")
    if not isinstance(x5u, str) or not x5u:
        raise PassportError("bad_header", "x5u missing")
    return x5u


def _tn(value: object, what: str) -> str:
    tn = canonical_tn(value) if isinstance(value, str) else None
    if not tn:
        raise PassportError("bad_passport", f"{what} is not a telephone number")
    return tn


def decode_passport(token: str) -> Passport:
    """Decode a SHAKEN PASSporT and check its header and claims; raise :class:`PassportError`.

    Reason codes: ``compact_form`` (payload left out, RFC 8224 §4.1: SHAKEN claims cannot be
    rebuilt from SIP), ``bad_header`` (alg, typ, ppt or x5u wrong), ``bad_passport`` (not
    base64url JSON, a claim missing or of the wrong type).
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise PassportError("bad_passport", "not a JWS compact serialisation")
    if not parts[1]:
        raise PassportError("compact_form", "payload left out (RFC 8224 compact form)")
    x5u = _header(parts[0])
    claims = _json(parts[1], "payload")
    attest = claims.get("attest")
    if attest not in ATTESTATIONS:
        raise PassportError("bad_passport", f"attest {attest!r}, expected A, B or C")
    orig = claims.get("orig")
    if not isinstance(orig, dict):
        raise PassportError("bad_passport", "orig missing")
    dest = claims.get("dest")
    dest_tns = dest.get("tn") if isinstance(dest, dict) else None
    if not isinstance(dest_tns, list) or not dest_tns:
        raise PassportError("bad_passport", "dest.tn missing or not a list")
    iat = claims.get("iat")
    if not isinstance(iat, int) or isinstance(iat, bool) or iat < 0:
        raise PassportError("bad_passport", "iat missing or not an integer")
    if iat > IAT_MAX:
        raise PassportError("bad_passport", "iat out of range")
    origid = claims.get("origid")
    if not isinstance(origid, str) or not origid:
        raise PassportError("bad_passport", "origid missing")
    signature = _b64(parts[2])
    if len(signature) != 64:
        raise PassportError("bad_passport", f"ES256 signature of {len(signature)} bytes, not 64")
    return Passport(
        x5u=x5u,
        attest=str(attest),
        orig=_tn(orig.get("tn"), "orig.tn"),
        dest=tuple(_tn(tn, "dest.tn") for tn in dest_tns),
        iat=iat,
        origid=origid,
        signing_input=f"{parts[0]}.{parts[1]}".encode("ascii"),
        signature=signature,
    )


def decode_div(token: str) -> Passport:
    """Decode a div PASSporT (RFC 8946 §3: a call retargeted from ``div.tn`` to ``dest``),
    checking its header and claims like :func:`decode_passport`; raise
    :class:`PassportError`."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2]:
        raise PassportError("bad_passport", "not a full JWS compact serialisation")
    x5u = _header(parts[0], "div")
    claims = _json(parts[1], "payload")
    orig, dest, div = claims.get("orig"), claims.get("dest"), claims.get("div")
    dest_tns = dest.get("tn") if isinstance(dest, dict) else None
    if not isinstance(orig, dict) or not isinstance(div, dict):
        raise PassportError("bad_passport", "orig or div missing")
    if not isinstance(dest_tns, list) or not dest_tns:
        raise PassportError("bad_passport", "dest.tn missing or not a list")
    iat = claims.get("iat")
    if not isinstance(iat, int) or isinstance(iat, bool) or not 0 <= iat <= IAT_MAX:
        raise PassportError("bad_passport", "iat missing or not an integer")
    signature = _b64(parts[2])
    if len(signature) != 64:
        raise PassportError("bad_passport", f"ES256 signature of {len(signature)} bytes, not 64")
    return Passport(x5u, "", _tn(orig.get("tn"), "orig.tn"),
                    tuple(_tn(tn, "dest.tn") for tn in dest_tns), iat, "",
                    f"{parts[0]}.{parts[1]}".encode("ascii"), signature,
                    _tn(div.get("tn"), "div.tn"))


def safe_origid(passport: Passport) -> str | None:
    """``origid`` when it is safe to copy into a header parameter (UUID-like), else None."""
    return passport.origid if _ORIGID.fullmatch(passport.origid) else None


class SignatureChecks(Protocol):
    """Signature checks off the event loop: the shell's threads
    (:class:`sipguard.verify_threads.SignatureVerifier`)."""

    def submit(self, passport: Passport, key: ec.EllipticCurvePublicKey) -> Awaitable[bool] | None:
        """An awaitable for :func:`verify_signature` done elsewhere; None: verify here."""
        ...

    def check_here(self, passport: Passport, key: ec.EllipticCurvePublicKey) -> bool:
        """:func:`verify_signature` in this thread (where :meth:`submit` said None)."""
        ...

    def configure(self, threads: int | str, max_pending: int) -> None:
        """Run ``threads`` threads (``"auto"``: by this process's CPUs) and queue at most
        ``max_pending`` checks."""
        ...


def verify_signature(passport: Passport, key: ec.EllipticCurvePublicKey) -> bool:
    """True when the ES256 signature over the header and payload verifies with ``key``."""
    if not isinstance(key.curve, ec.SECP256R1):
        return False
    r = int.from_bytes(passport.signature[:32], "big")
    s = int.from_bytes(passport.signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), passport.signing_input, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True
