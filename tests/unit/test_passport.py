"""Tests for SHAKEN PASSporT decoding, claim checks and ES256 verification (RFC 8225/8588)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipguard.policy.passport import (
    PassportError,
    canonical_tn,
    decode_passport,
    safe_origid,
    verify_signature,
)

from .stir_pki import ORIGID, b64, new_key, sign_passport

X5U = "https://cert.example.org/709J.pem"
KEY = new_key()


def token_with(header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None,
               sig: bytes = b"\x01" * 64) -> str:
    h = {"alg": "ES256", "ppt": "shaken", "typ": "passport", "x5u": X5U, **(header or {})}
    c = {"attest": "A", "dest": {"tn": ["18005550199"]}, "iat": 1700000000,
         "orig": {"tn": "12125550100"}, "origid": ORIGID, **(claims or {})}
    return f"{b64(json.dumps(h).encode())}.{b64(json.dumps(c).encode())}.{b64(sig)}"


def test_decode_and_verify_a_signed_passport() -> None:
    """A signed PASSporT decodes to its claims and verifies with the signer's public key."""
    p = decode_passport(sign_passport(KEY, X5U, iat=1700000000))
    assert (p.x5u, p.attest, p.orig, p.dest, p.iat) == (
        X5U, "A", "12125550100", ("18005550199",), 1700000000)
    assert safe_origid(p) == ORIGID
    assert verify_signature(p, KEY.public_key())
    assert not verify_signature(p, new_key().public_key())


@pytest.mark.parametrize(
    ("header", "claims", "reason"),
    [
        ({"alg": "RS256"}, None, "bad_header"),
        ({"typ": "JWT"}, None, "bad_header"),
        ({"ppt": "div"}, None, "bad_header"),
        ({"x5u": 5}, None, "bad_header"),
        (None, {"attest": "D"}, "bad_passport"),
        (None, {"orig": {"uri": "sip:a@b"}}, "bad_passport"),
        (None, {"orig": {"tn": "12ab"}}, "bad_passport"),
        (None, {"dest": {"tn": "18005550199"}}, "bad_passport"),
        (None, {"dest": {"tn": []}}, "bad_passport"),
        (None, {"iat": "1700000000"}, "bad_passport"),
        (None, {"iat": True}, "bad_passport"),
        (None, {"iat": 1.5}, "bad_passport"),
        (None, {"iat": 1 << 41}, "bad_passport"),  # past IAT_MAX: no time
        (None, {"iat": 10**400}, "bad_passport"),  # past a float: the age would overflow
        (None, {"origid": ""}, "bad_passport"),
    ],
)
def test_bad_header_or_claims(header: dict[str, Any] | None, claims: dict[str, Any] | None,
                              reason: str) -> None:
    """Each wrong or missing PASSporT header member or claim is refused with its reason."""
    with pytest.raises(PassportError) as exc:
        decode_passport(token_with(header, claims))
    assert exc.value.reason == reason


def test_malformed_tokens() -> None:
    """Not three parts, a left-out payload, non-JSON or non-object parts, short signatures."""
    good = token_with()
    h, p, s = good.split(".")
    cases = {
        f"{h}.{p}": "bad_passport",
        f"{h}..{s}": "compact_form",
        f"{b64(b'not json')}.{p}.{s}": "bad_passport",
        f"{b64(b'[1]')}.{p}.{s}": "bad_passport",
        f"{h}.{p}.{b64(b'x' * 63)}": "bad_passport",
        f"{h}.{p}.a": "bad_passport",
    }
    for token, reason in cases.items():
        with pytest.raises(PassportError) as exc:
            decode_passport(token)
        assert exc.value.reason == reason, token


def test_duplicate_member_keeps_the_last_value() -> None:
    """A duplicate claim keeps its lexically last value (RFC 7515 §4 allows this reading)."""
    c = {"attest": "C", "dest": {"tn": ["18005550199"]}, "iat": 1700000000,
         "orig": {"tn": "12125550100"}, "origid": ORIGID}
    text = json.dumps(c)[:-1] + ', "attest": "A"}'
    h = b64(json.dumps({"alg": "ES256", "ppt": "shaken", "typ": "passport", "x5u": X5U}).encode())
    assert decode_passport(f"{h}.{b64(text.encode())}.{b64(bytes(64))}").attest == "A"


def test_canonical_tn() -> None:
    """Separators and a leading + are dropped; anything else non-digit is not a number."""
    assert canonical_tn("+1 (212) 555-0100") == "12125550100"
    assert canonical_tn("12125550100") == "12125550100"
    assert canonical_tn("+1212555010x") is None
    assert canonical_tn("١٢٣") is None  # non-ASCII digits


def test_unsafe_origid_is_not_copied() -> None:
    """An origid with header-breaking characters is not put into the outcome header."""
    p = decode_passport(token_with(claims={"origid": "a;b=c\r\nX: y"}))
    assert safe_origid(p) is None


@given(st.text(alphabet="ABCDEFGHIJabcdefghij0123456789-_.", max_size=200))
def test_decode_raises_only_passport_error(token: str) -> None:
    """Random base64url-ish input never raises anything but PassportError."""
    with contextlib.suppress(PassportError):
        decode_passport(token)
