"""Tests for name-addr / addr-spec headers: From, To, Contact, Route, PAI, Diversion."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.sip.errors import SipParseError
from sipguard.sip.nameaddr import (
    NameAddr,
    diversion_counter,
    parse_name_addr,
    parse_name_addr_list,
)


def one(text: str) -> NameAddr:
    na = parse_name_addr(text)
    assert str(na) == text
    assert na.raw == text
    return na


def many(text: str, parts: list[str]) -> list[NameAddr]:
    """Parse a list and check each element round-trips to the given original slice."""
    items = parse_name_addr_list(text)
    assert [str(na) for na in items] == parts
    return items


# ------------------------------------------------------------------ RFC 3261 §20 examples


def test_rfc3261_from_quoted_display_and_tag() -> None:
    """A quoted display name, <URI> and ;tag split into display, uri and params."""
    na = one('"A. G. Bell" <sip:agb@bell-telephone.com> ;tag=a48s')
    assert na.display == "A. G. Bell"
    assert str(na.uri) == "sip:agb@bell-telephone.com"
    assert na.tag == "a48s" and na.params == (("tag", "a48s"),)


def test_rfc3261_from_bare_addr_spec_params_belong_to_header() -> None:
    """Without <>, the ;tag after the URI is a header param (RFC 3261 §20.10)."""
    na = one("sip:+12125551212@server.phone2net.com;tag=887s")
    assert na.display is None and na.uri.params == () and na.tag == "887s"
    assert na.uri.number == "+12125551212"


def test_rfc3261_token_display_names() -> None:
    """Unquoted display names are tokens separated by whitespace."""
    assert one("Anonymous <sip:c8oqz84zk7z@privacy.org>;tag=hyh8").display == "Anonymous"
    na = one("The Operator <sip:operator@cs.columbia.edu>;tag=287447")
    assert na.display == "The Operator" and na.tag == "287447"


def test_rfc3261_to_without_tag() -> None:
    """A To without tag has tag None."""
    na = one("sip:+12125551212@server.phone2net.com")
    assert na.tag is None and na.params == ()


def test_rfc3261_contact_list() -> None:
    """A Contact list splits on commas outside quotes; q and expires are params."""
    text = (
        '"Mr. Watson" <sip:watson@worcester.bell-telephone.com> ;q=0.7; expires=3600, '
        '"Mr. Watson" <mailto:watson@bell-telephone.com> ;q=0.1'
    )
    items = many(
        text,
        [
            '"Mr. Watson" <sip:watson@worcester.bell-telephone.com> ;q=0.7; expires=3600',
            '"Mr. Watson" <mailto:watson@bell-telephone.com> ;q=0.1',
        ],
    )
    assert items[0].params == (("q", "0.7"), ("expires", "3600"))
    assert items[1].uri.scheme == "mailto" and items[1].param("Q") == "0.1"


def test_rfc3261_route_list() -> None:
    """Route entries keep their URI params (lr) inside the brackets."""
    text = "<sip:bigbox3.site3.atlanta.com;lr>, <sip:server10.biloxi.com;lr>"
    items = parse_name_addr_list(text, name_addr_only=True)
    assert [str(na) for na in items] == [
        "<sip:bigbox3.site3.atlanta.com;lr>",
        "<sip:server10.biloxi.com;lr>",
    ]
    assert all(na.uri.has_param("lr") and na.params == () for na in items)


def test_name_addr_only_rejects_bare_uris() -> None:
    """With name_addr_only, a bare addr-spec is a 400 (Route / Record-Route)."""
    with pytest.raises(SipParseError) as caught:
        parse_name_addr_list("<sip:a.example.com;lr>, sip:b.example.com", name_addr_only=True)
    assert caught.value.status == 400
    with pytest.raises(SipParseError):
        parse_name_addr("sip:b.example.com", name_addr_only=True)
    assert str(parse_name_addr("<sip:b.example.com>", name_addr_only=True)) == (
        "<sip:b.example.com>"
    )


def test_comma_inside_quotes_and_brackets_does_not_split() -> None:
    """Commas in a quoted display name, a quoted param value and a URI user stay put."""
    text = '"Bell, Alexander" <sip:a,b@example.com>;x="1,2", <sip:c@example.com>'
    items = many(text, ['"Bell, Alexander" <sip:a,b@example.com>;x="1,2"', "<sip:c@example.com>"])
    assert items[0].display == "Bell, Alexander" and items[0].uri.user == "a,b"
    assert items[0].param("x") == '"1,2"'


def test_pai_sip_and_tel() -> None:
    """P-Asserted-Identity (RFC 3325) with a display name and a bare tel URI."""
    items = many(
        '"Cullen Jennings" <sip:fluffy@cisco.com>, tel:+14085264000',
        ['"Cullen Jennings" <sip:fluffy@cisco.com>', "tel:+14085264000"],
    )
    assert items[0].display == "Cullen Jennings"
    assert items[1].uri.scheme == "tel" and items[1].uri.number == "+14085264000"


def test_empty_quoted_display_name() -> None:
    """An empty quoted display name gives the empty string, not None."""
    na = one('"" <sip:anonymous@anonymous.invalid>;tag=1')
    assert na.display == "" and na.uri.number is None


def test_single_value_with_trailing_garbage_is_400() -> None:
    """parse_name_addr takes exactly one value: a second one is a 400."""
    with pytest.raises(SipParseError):
        parse_name_addr("<sip:a@example.com>, <sip:b@example.com>")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "*",
        "<sip:a@example.com>,",
        ",<sip:a@example.com>",
        "<sip:a@example.com>,,<sip:b@example.com>",
        "<sip:a@example.com",
        "sip:a@example.com>",
        "<>",
        "<sip:a@example.com> x",
        '"unterminated <sip:a@example.com>',
        '"quoted" sip:a@example.com',
        "alice",
        "Alice <sip:a@example.com",
        "<sip:a@example.com>;",
        "<sip:a@example.com>;tag=",
        "<sip:a@example.com>;tag=a b",
        "<sip:a@example.com>;=x",
        "<sip:a@example.com>;a=<b>",
    ],
)
def test_malformed_lists_are_400(text: str) -> None:
    """Empty elements, '*', unbalanced <> or quotes and bad params are 400."""
    with pytest.raises(SipParseError) as caught:
        parse_name_addr_list(text)
    assert caught.value.status == 400


# ------------------------------------------------------------------ RFC 4475 torture values


def test_torture_esc01_from() -> None:
    """RFC 4475 esc01 From: escaped spaces inside <>."""
    na = one("<sip:I%20have%20spaces@example.net>;tag=938")
    assert na.uri.user == "I%20have%20spaces" and na.tag == "938"


def test_torture_esc01_contact() -> None:
    """RFC 4475 esc01 Contact: escaped URI param names are unescaped."""
    na = one("<sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>")
    assert na.uri.params == (("lr", None), ("name", "value%41")) and na.params == ()


def test_torture_esc02_percent_in_display_name() -> None:
    """RFC 4475 esc02: a quoted display name is not %-unescaped."""
    assert one('"%Z%45" <sip:resource@example.com>;tag=f232jadfj23').display == "%Z%45"


def test_torture_escnull() -> None:
    """RFC 4475 escnull: %00 in a bare addr-spec with a tag."""
    na = one("sip:null-%00-null@example.com;tag=839923423")
    assert na.uri.user == "null-%00-null" and na.tag == "839923423"


def test_torture_lwsdisp() -> None:
    """RFC 4475 lwsdisp: no whitespace between a token display name and '<'."""
    na = one("caller<sip:caller@example.com>;tag=323")
    assert na.display == "caller" and na.uri.user == "caller" and na.tag == "323"


def test_torture_wsinv_to() -> None:
    """RFC 4475 wsinv To: whitespace around ';' and '=' after a bare addr-spec."""
    na = one("sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n")
    assert na.uri.host == "chair-dnrc.example.com" and na.tag == "1918181833n"


def test_torture_wsinv_from() -> None:
    """RFC 4475 wsinv From: escaped quote and backslash in the display name, unfolded LWS."""
    text = '"J Rosenberg \\\\\\""       <sip:jdrosen@example.com>   ;   tag = 98asjd8'
    na = one(text)
    assert na.display == 'J Rosenberg \\"' and na.tag == "98asjd8"


def test_torture_wsinv_contact() -> None:
    """RFC 4475 wsinv m: escaped quotes, spaced params, a valueless param."""
    text = '"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam =       newvalue ;   secondparam ; q = 0.33'
    (na,) = many(text, [text])
    assert na.display == 'Quoted string ""'
    assert na.params == (("newparam", "newvalue"), ("secondparam", None), ("q", "0.33"))


def test_torture_wsinv_route() -> None:
    """RFC 4475 wsinv Route: unknown URI params with and without values."""
    text = "<sip:services.example.com;lr;unknownwith=value;unknown-no-value>"
    (na,) = many(text, [text])
    assert na.uri.params == (("lr", None), ("unknownwith", "value"), ("unknown-no-value", None))


def test_torture_intmeth_to_with_control_characters() -> None:
    """RFC 4475 intmeth To: quoted-pairs escape BEL, NUL and DEL; the URI is exotic."""
    text = (
        '"BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f" '
        "<sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*@example.com>"
    )
    na = one(text)
    assert na.display == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert na.uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"


def test_torture_intmeth_from_with_unusual_tokens() -> None:
    """RFC 4475 intmeth From: token display names and params made of unusual token chars."""
    text = (
        "token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;"
        "fromParam''~+*_!.-%=\"\u0440\u0430\u0431\u043e\u0442\u0430\u044e\u0449\u0438\u0439\""
        ";tag=_token~1'+`*%!-."
    )
    na = one(text)
    assert na.display == "token1~` token2'+_ token3*%!.-"
    assert (
        na.param("fromParam''~+*_!.-%")
        == '"\u0440\u0430\u0431\u043e\u0442\u0430\u044e\u0449\u0438\u0439"'
    )
    assert na.tag == "_token~1'+`*%!-."


def test_torture_unksm2_unknown_schemes() -> None:
    """RFC 4475 unksm2: isbn:, http: and name: URIs in To, From and Contact."""
    assert one("isbn:2983792873").uri.scheme == "isbn"
    na = one("<http://www.example.com>;tag=3234233")
    assert na.uri.scheme == "http" and na.tag == "3234233"
    assert one("<name:John_Smith>").uri.scheme == "name"


def test_torture_cparam01_bare_contact_param_is_header_param() -> None:
    """RFC 4475 cparam01: ;unknownparam after a bare URI is a Contact param."""
    (na,) = many(
        "sip:+19725552222@gw1.example.net;unknownparam",
        ["sip:+19725552222@gw1.example.net;unknownparam"],
    )
    assert na.uri.params == () and na.params == (("unknownparam", None),)


def test_torture_cparam02_bracketed_contact_param_is_uri_param() -> None:
    """RFC 4475 cparam02: ;unknownparam inside <> is a URI param."""
    (na,) = many(
        "<sip:+19725552222@gw1.example.net;unknownparam>",
        ["<sip:+19725552222@gw1.example.net;unknownparam>"],
    )
    assert na.uri.params == (("unknownparam", None),) and na.params == ()


def test_torture_regescrt_escaped_route_in_brackets() -> None:
    """RFC 4475 regescrt: escaped headers inside <> are fine."""
    (na,) = many(
        "<sip:user@example.com?Route=%3Csip:sip.example.com%3E>",
        ["<sip:user@example.com?Route=%3Csip:sip.example.com%3E>"],
    )
    assert na.uri.headers == "Route=%3Csip:sip.example.com%3E"


def test_torture_regbadct_escaped_route_without_brackets() -> None:
    """RFC 4475 regbadct: a bare addr-spec with ?headers is a 400 (RFC 3261 §20.10)."""
    with pytest.raises(SipParseError) as caught:
        parse_name_addr_list("sip:user@example.com?Route=%3Csip:sip.example.com%3E")
    assert caught.value.status == 400


def test_torture_scalar02_folded_contact() -> None:
    """RFC 4475 scalar02: a Contact whose params continue on a folded line."""
    (na,) = many(
        "<sip:user@host129.example.com>  ;expires=280297596632815",
        ["<sip:user@host129.example.com>  ;expires=280297596632815"],
    )
    assert na.param("expires") == "280297596632815"


def test_torture_badaspec_quoted_comma_is_fine() -> None:
    """RFC 4475 badaspec From: a comma inside a quoted display name is legal."""
    na = one('"Bell, Alexander" <sip:a.g.bell@example.com>;tag=433423')
    assert na.display == "Bell, Alexander"


def test_torture_badaspec_spaces_inside_brackets() -> None:
    """RFC 4475 badaspec To: whitespace inside <> is rejected."""
    with pytest.raises(SipParseError):
        parse_name_addr('"Watson, Thomas" < sip:t.watson@example.org >')


@pytest.mark.parametrize(
    "text",
    [
        "Bell, Alexander <sip:a.g.bell@example.com>;tag=43",  # baddn
        "Watson, Thomas <sip:t.watson@example.org>",  # baddn
        '"Mr. J. User <sip:j.user@example.com>',  # quotbal
        '"Joe" <sip:joe@example.org>;;;;',  # badinv01
    ],
)
def test_torture_invalid_name_addrs(text: str) -> None:
    """RFC 4475 baddn / quotbal / badinv01 values are 400, as one value or as a list."""
    with pytest.raises(SipParseError) as caught:
        parse_name_addr(text)
    assert caught.value.status == 400
    with pytest.raises(SipParseError):
        parse_name_addr_list(text)


def test_torture_badvers_token_display_with_dot() -> None:
    """RFC 4475 badvers From: 'A. Bell' is a valid token display name."""
    na = one("A. Bell <sip:a.g.bell@example.com>;tag=qweoiqpe")
    assert na.display == "A. Bell"


def test_torture_inv2543_user_phone_outside_brackets() -> None:
    """RFC 4475 inv2543 To: ;user=phone after a bare URI is a header param, number still found."""
    na = one("sip:+16505552222@ss1.example.net;user=phone")
    assert na.uri.params == () and na.param("user") == "phone"
    assert na.uri.number == "+16505552222"
    rr = parse_name_addr("<sip:UserB@example.com;maddr=ss1.example.com>", name_addr_only=True)
    assert rr.uri.param("maddr") == "ss1.example.com"


def test_torture_longreq_from_and_to() -> None:
    """RFC 4475 longreq: very long display names, users, tags and params."""
    to = (
        '"I have a user name of extremeextremeextremeextremeextremeextremeextremeextremeextreme'
        'extreme proportion"<sip:user@example.com:6000;unknownparam1=verylonglonglonglonglong'
        "longlonglonglonglonglonglonglonglonglonglonglonglonglonglongvalue;longparamnamenamename"
        "namenamenamenamenamenamenamenamenamenamenamenamenamenamenamenamenamenamenamenamename"
        "namenamename=shortvalue;verylonglonglonglonglonglonglonglonglonglonglonglonglonglong"
        "longlonglonglonglonglonglonglonglonglonglongParameterNameWithNoValue>"
    )
    na = one(to)
    assert na.display is not None and na.display.endswith("proportion")
    assert na.uri.port == 6000
    frm = (
        "sip:amazinglylongcallernameamazinglylongcallernameamazinglylongcallername"
        "amazinglylongcallernameamazinglylongcallername@example.net;tag=12982982982982982982"
        "982982982982982982982982982982982982982982982982982982982982982982982424;"
        "unknownheaderparamnamenamenamenamenamename=unknowheaderparamvaluevaluevaluevalue;"
        "unknownValuelessparamnameparamnameparamnameparamname"
    )
    na = one(frm)
    assert na.tag is not None and na.tag.endswith("2424") and len(na.params) == 3


def test_trws_and_mpart01_bracketed_values() -> None:
    """RFC 4475 trws / mpart01: plain bracketed To, From and Route values."""
    assert one("<sip:remote-target@example.com>").uri.user == "remote-target"
    assert one("<sip:local-resource@example.com>;tag=329429089").tag == "329429089"
    route = parse_name_addr("<sip:127.0.0.1:5080>", name_addr_only=True)
    assert route.uri.host == "127.0.0.1" and route.uri.port == 5080


# ------------------------------------------------------------------ Diversion (RFC 5806)


def test_diversion_list_and_counter() -> None:
    """Diversion entries carry reason, counter and privacy as header params."""
    text = (
        "<sip:+12125550100@carrier.example.com;user=phone>;reason=unconditional;counter=2;"
        'privacy=off, "Bob" <sip:bob@biloxi.example.com>;reason="no-answer"'
    )
    items = many(
        text,
        [
            "<sip:+12125550100@carrier.example.com;user=phone>;reason=unconditional;counter=2;privacy=off",
            '"Bob" <sip:bob@biloxi.example.com>;reason="no-answer"',
        ],
    )
    assert items[0].uri.number == "+12125550100" and items[0].param("reason") == "unconditional"
    assert diversion_counter(items[0]) == 2
    assert diversion_counter(items[1]) == 1


@pytest.mark.parametrize(
    "text", ["<sip:a@b>;counter=x", "<sip:a@b>;counter", '<sip:a@b>;counter="1"']
)
def test_diversion_counter_malformed(text: str) -> None:
    """A non-numeric or valueless Diversion counter is a 400."""
    na = one(text)
    with pytest.raises(SipParseError) as caught:
        diversion_counter(na)
    assert caught.value.status == 400


# ------------------------------------------------------------------ fuzzing

_FRAGMENTS = st.sampled_from(
    [
        "sip:a@b.com",
        "tel:+1",
        "x:y",
        "<",
        ">",
        '"',
        "\\",
        "Alice",
        " ",
        "\t",
        ",",
        ";",
        "=",
        "tag",
        "q=0.5",
        "?",
        "@",
        ":",
        "*",
        "é",
        "\x00",
        "[::1]",
    ]
)


def _check(text: str) -> None:
    try:
        na = parse_name_addr(text)
    except SipParseError as err:
        assert err.status == 400
    else:
        assert str(na) == text.strip(" \t")
    try:
        items = parse_name_addr_list(text)
    except SipParseError as err:
        assert err.status == 400
    else:
        assert all(str(na) in text for na in items)


@settings(max_examples=300)
@given(st.text())
def test_fuzz_random_text(text: str) -> None:
    """Random text either parses or raises SipParseError, nothing else."""
    _check(text)


@settings(max_examples=600)
@given(st.lists(_FRAGMENTS, max_size=12).map("".join))
def test_fuzz_name_addr_like_text(text: str) -> None:
    """name-addr-shaped text either parses and round-trips or raises SipParseError."""
    _check(text)
