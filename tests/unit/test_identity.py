"""Tests for the STIR Identity header (RFC 8224 §4.1 with errata 6499)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.sip.errors import SipParseError
from sipguard.sip.identity import Identity, parse_identity

# A SHAKEN PASSporT (header.payload.signature, base64url without padding).
JWS = (
    "eyJhbGciOiJFUzI1NiIsInBwdCI6InNoYWtlbiIsInR5cCI6InBhc3Nwb3J0IiwieDV1IjoiaHR0cHM6Ly9jZXJ0"
    "LmV4YW1wbGUub3JnL3Bhc3Nwb3J0LmNlciJ9"
    ".eyJhdHRlc3QiOiJBIiwiZGVzdCI6eyJ0biI6WyIxMjE1NTU1MTIxMyJdfSwiaWF0IjoxNDQzMjA4MzQ1LCJvcmln"
    "Ijp7InRuIjoiMTIxNTU1NTEyMTIifSwib3JpZ2lkIjoiMTIzZTQ1NjctZTg5Yi0xMmQzLWE0NTYtNDI2NjU1NDQw"
    "MDAwIn0"
    ".rq3pjT1hoRwakEGjHCnWSwUnshd0-zJ6F1VOgFWSjHBr8Qjpjlk-cpFYpFYsojNCpTzO3QfPOlckGaS6hEck7w"
)


def ident(text: str) -> Identity:
    identity = parse_identity(text)
    assert str(identity) == text
    assert identity.raw == text
    return identity


def test_shaken_identity_with_quoted_ppt() -> None:
    """info loses its <>, alg is read and a quoted ppt loses its quotes."""
    text = JWS + ';info=<https://cert.example.org/passport.cer>;alg=ES256;ppt="shaken"'
    identity = ident(text)
    assert identity.token == JWS
    assert identity.info == "https://cert.example.org/passport.cer"
    assert identity.alg == "ES256" and identity.ppt == "shaken"
    assert identity.params[0] == ("info", "<https://cert.example.org/passport.cer>")
    assert identity.param("PPT") == '"shaken"'


def test_unquoted_ppt_and_any_parameter_order() -> None:
    """An unquoted ppt token is accepted and parameters may come in any order."""
    identity = ident(JWS + ";ppt=shaken;alg=ES256;info=<https://cert.example.org/passport.cer>")
    assert identity.ppt == "shaken" and identity.info == "https://cert.example.org/passport.cer"


def test_rfc8224_example_without_alg_and_ppt() -> None:
    """The RFC 8224 example has only info; alg and ppt are None."""
    identity = ident(JWS + ";info=<https://biloxi.example.org/biloxi.cert>")
    assert identity.info == "https://biloxi.example.org/biloxi.cert"
    assert identity.alg is None and identity.ppt is None


def test_compact_form_with_empty_payload() -> None:
    """The RFC 8225 compact form header..signature is accepted."""
    header, _, signature = JWS.split(".")
    token = f"{header}..{signature}"
    identity = ident(token + ";info=<https://cert.example.org/passport.cer>;ppt=div")
    assert identity.token == token and identity.ppt == "div"


def test_missing_info_is_left_to_the_verifier() -> None:
    """No info param parses with info None (the verifier answers 436, not a parse 400)."""
    identity = ident(JWS)
    assert identity.info is None and identity.params == ()


def test_lws_around_params_and_info_uri_with_semicolon() -> None:
    """LWS around ';' and '=' is allowed and a ';' inside <info> does not split."""
    text = JWS + " ; info = <https://cert.example.org/p.cer;v=1> ; alg = ES256 ; x-ext"
    identity = ident(text)
    assert identity.info == "https://cert.example.org/p.cer;v=1"
    assert identity.alg == "ES256" and identity.params[-1] == ("x-ext", None)


@pytest.mark.parametrize(
    "text",
    [
        "",
        # RFC 4475 mpart01: an RFC 4474 base64 Identity (padding, '/' and '+') is not RFC 8224
        "r5mwreLuyDRYBi/0TiPwEsY3rEVsk/G2WxhgTV1PF7hHuLIK0YWVKZhKv9Mj8UeXqkMVbnVq37CD+813gvYjcB"
        "UaZngQmXc9WNZSDNGCzA+fWl9MEUHWIZo1CeJebdY/XlgKeTa0Olvq0rt70Q5jiSfbqMJmQFteeivUhkMWYUA=",
        "abc",
        "abc.def",
        ".def.ghi",
        "abc.def.",
        "abc.def.ghi.jkl",
        "abc.def.gh=i",
        "abc.def.ghi;",
        "abc.def.ghi;info=",
        "abc.def.ghi;info=<https://x y>",
        "abc.def.ghi;info=<https://x",
        "abc.def.ghi;info=https://cert.example.org/a.cer",
        "abc.def.ghi info=<https://x>",
        '"abc.def.ghi";info=<https://x>',
    ],
)
def test_malformed_identity_is_400(text: str) -> None:
    """Non-JWS digests, padding, bad separators and malformed params are 400."""
    with pytest.raises(SipParseError) as caught:
        parse_identity(text)
    assert caught.value.status == 400


_FRAGMENTS = st.sampled_from(
    [
        "eyJh",
        ".",
        "-_",
        "=",
        ";",
        "info",
        "<https://cert.example.org/p.cer>",
        "<",
        ">",
        "alg",
        "ES256",
        "ppt",
        '"shaken"',
        '"',
        " ",
        "\\",
    ]
)


def _check(text: str) -> None:
    try:
        identity = parse_identity(text)
    except SipParseError as err:
        assert err.status == 400
    else:
        assert str(identity) == text.rstrip(" \t")


@settings(max_examples=300)
@given(st.text())
def test_fuzz_random_text(text: str) -> None:
    """Random text either parses and round-trips or raises SipParseError, nothing else."""
    _check(text)


@settings(max_examples=600)
@given(st.lists(_FRAGMENTS, max_size=14).map("".join))
def test_fuzz_identity_like_text(text: str) -> None:
    """Identity-shaped text either parses and round-trips or raises SipParseError."""
    _check(text)
