"""Tests for the URI grammar: SIP/SIPS (RFC 3261), tel (RFC 3966), other schemes, numbers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.sip import uri as uri_module
from sipguard.sip.errors import SipParseError
from sipguard.sip.uri import Uri, hidden_number, hidden_numbers, parse_uri


def parsed(text: str) -> Uri:
    uri = parse_uri(text)
    assert str(uri) == text
    assert uri.raw == text
    return uri


# ------------------------------------------------------------------ RFC 3261 §19.1.3 examples


def test_rfc3261_plain_sip_uri() -> None:
    """A plain sip:user@host splits into scheme, user and host."""
    uri = parsed("sip:alice@atlanta.com")
    assert (uri.scheme, uri.user, uri.password, uri.host, uri.port) == (
        "sip",
        "alice",
        None,
        "atlanta.com",
        None,
    )
    assert uri.params == () and uri.headers is None and uri.number is None


def test_rfc3261_password_and_transport() -> None:
    """A password follows the first colon of the userinfo; params are name/value pairs."""
    uri = parsed("sip:alice:secretword@atlanta.com;transport=tcp")
    assert uri.user == "alice" and uri.password == "secretword"
    assert uri.params == (("transport", "tcp"),)
    assert uri.param("TRANSPORT") == "tcp"


def test_rfc3261_sips_with_headers() -> None:
    """The ?headers part is kept raw (without the question mark)."""
    uri = parsed("sips:alice@atlanta.com?subject=project%20x&priority=urgent")
    assert uri.scheme == "sips"
    assert uri.headers == "subject=project%20x&priority=urgent"


def test_rfc3261_telephone_subscriber_with_password() -> None:
    """A phone number user with user=phone gives the normalised number."""
    uri = parsed("sip:+1-212-555-1212:1234@gateway.com;user=phone")
    assert uri.user == "+1-212-555-1212" and uri.password == "1234"
    assert uri.number == "+12125551212"


def test_rfc3261_ipv4_host_and_method_param() -> None:
    """An IPv4 host, and a method param followed by headers, parse apart."""
    assert parsed("sip:alice@192.0.2.4").host == "192.0.2.4"
    uri = parsed("sip:atlanta.com;method=REGISTER?to=alice%40atlanta.com")
    assert uri.user is None and uri.host == "atlanta.com"
    assert uri.params == (("method", "REGISTER"),)
    assert uri.headers == "to=alice%40atlanta.com"


def test_rfc3261_user_with_semicolon() -> None:
    """A user part may contain ';' (sip:alice;day=tuesday@atlanta.com)."""
    uri = parsed("sip:alice;day=tuesday@atlanta.com")
    assert uri.user == "alice;day=tuesday" and uri.host == "atlanta.com" and uri.params == ()


def test_sips_numeric_user() -> None:
    """A numeric user on sips: gives a number without user=phone."""
    uri = parsed("sips:1212@gateway.com")
    assert uri.number == "1212"


# ------------------------------------------------------------------ hosts and ports


def test_ipv6_reference_with_port() -> None:
    """An IPv6 reference keeps its brackets, and the port after it is read."""
    uri = parsed("sip:[2001:db8::10]:5070")
    assert uri.host == "[2001:db8::10]" and uri.port == 5070 and uri.user is None


def test_ipv6_reference_is_lower_cased() -> None:
    """IPv6 hex digits are lower-cased in host, raw keeps the original."""
    uri = parsed("sip:bob@[2001:DB8::A]")
    assert uri.host == "[2001:db8::a]"


def test_hostname_is_lower_cased_and_scheme_too() -> None:
    """Scheme and hostname are case-insensitive and lower-cased; the user is not."""
    uri = parsed("SIP:Alice@EXAMPLE.com:5060;Transport=TCP")
    assert (uri.scheme, uri.user, uri.host, uri.port) == ("sip", "Alice", "example.com", 5060)
    assert uri.params == (("transport", "TCP"),)


def test_fqdn_with_trailing_dot() -> None:
    """A fully qualified hostname may end with a dot."""
    assert parsed("sip:bob@example.com.").host == "example.com."


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sip:",
        "sip:user@",
        "sip:;lr",
        "sip:host:",
        "sip:host:x",
        "sip:host:65536",
        "sip:host:000005060",
        "sip:[::1",
        "sip:::1]",
        "sip:[::1]x",
        "sip:[zz::1]",
        "sip:[1.2.3.4]",
        "sip:host]",
        "sip:a b@c",
        "sip:a@b c",
        "sip:a@b\t",
        "sip:user@ex..ample.com",
        "sip:@host",
        "sip::pw@host",
        "sip:h;;lr",
        "sip:h;lr;",
        "sip:h;a=",
        "sip:h;=b",
        "sip:h;a=b,c",
        "sip:h<x",
        'sip:"h"',
        "sip:h\x00",
        "sip:bücher@example.com",
        "nocolon",
        ":x",
        "1abc:x",
        "name:",
        "tel:",
        "tel:abc-xyz",
        "tel:+",
        "tel:--",
        "tel:+1;",
        "tel:+1;a=b;;c",
    ],
)
def test_malformed_uris_are_400(text: str) -> None:
    """Empty, scheme-less, host-less, bad-port, bad-bracket, whitespace URIs raise 400."""
    with pytest.raises(SipParseError) as caught:
        parse_uri(text)
    assert caught.value.status == 400


def test_max_port_accepted() -> None:
    """Port 65535 is the largest accepted."""
    assert parsed("sip:h:65535").port == 65535


# ------------------------------------------------------------------ params


def test_params_without_values_and_unusual_tokens() -> None:
    """Valueless params (;lr) and unusual paramchars parse, order kept."""
    uri = parsed("sip:services.example.com;lr;unknownwith=value;unknown-no-value")
    assert uri.params == (("lr", None), ("unknownwith", "value"), ("unknown-no-value", None))
    assert uri.has_param("lr") and uri.param("lr") is None
    assert not uri.has_param("maddr")
    uri = parsed("sip:h;x-a=[2001:db8::1];p/q=a:b&c+d$e;~*'()!.=1")
    assert uri.params == (("x-a", "[2001:db8::1]"), ("p/q", "a:b&c+d$e"), ("~*'()!.", "1"))


def test_escaped_param_names_and_values_are_unescaped() -> None:
    """RFC 4475 esc01 Contact: ;%6C%72 is lr and n%61me=v%61lue%25%34%31 is name=value%41."""
    text = "sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31"
    uri = parsed(text)
    assert uri.user == "cal%6Cer"
    assert uri.params == (("lr", None), ("name", "value%41"))


def test_ttl_maddr_and_grid_params() -> None:
    """Standard URI params (maddr, ttl, transport) read by name."""
    uri = parsed("sip:alice@atlanta.com;maddr=239.255.255.1;ttl=15;transport=udp")
    assert uri.param("maddr") == "239.255.255.1" and uri.param("ttl") == "15"


# ------------------------------------------------------------------ RFC 4475 torture URIs


def test_torture_esc01_request_uri() -> None:
    """RFC 4475 esc01: an escaped user is kept as written."""
    uri = parsed("sip:sips%3Auser%40example.com@example.net")
    assert uri.user == "sips%3Auser%40example.com" and uri.host == "example.net"
    assert uri.number is None


def test_torture_esc01_to_and_from() -> None:
    """RFC 4475 esc01: %75se%72 and I%20have%20spaces are legal escaped users."""
    assert parsed("sip:%75se%72@example.com").user == "%75se%72"
    assert parsed("sip:I%20have%20spaces@example.net").number is None


def test_torture_brief_example_escaped_user_with_param() -> None:
    """An escaped user with an unusual other-param stays as written."""
    uri = parsed("sip:sip%3Auser%40example.com@company.com;other-param=summit")
    assert uri.user == "sip%3Auser%40example.com" and uri.host == "company.com"
    assert uri.params == (("other-param", "summit"),)


def test_torture_escnull() -> None:
    """RFC 4475 escnull: %00 in a user part is legal."""
    assert parsed("sip:null-%00-null@example.com").user == "null-%00-null"
    assert parsed("sip:%00%00@host5.example.com").user == "%00%00"


def test_torture_escruri_headers() -> None:
    """RFC 4475 escruri: escaped headers are parsed; the proxy decides what to do with them."""
    uri = parsed("sip:user@example.com?Route=%3Csip:example.com%3E")
    assert uri.host == "example.com" and uri.headers == "Route=%3Csip:example.com%3E"


def test_torture_intmeth_request_uri() -> None:
    """RFC 4475 intmeth: every legal user and password character is accepted."""
    text = (
        "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too."
        "(doesn't-it)@example.com"
    )
    uri = parsed(text)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert uri.host == "example.com" and uri.params == () and uri.headers is None


def test_torture_semiuri() -> None:
    """RFC 4475 semiuri: ';' in the user part does not start URI params."""
    uri = parsed("sip:user;par=u%40example.net@example.com")
    assert uri.user == "user;par=u%40example.net" and uri.host == "example.com"
    assert uri.params == ()


def test_torture_wsinv_request_uri() -> None:
    """RFC 4475 wsinv: an unknown valueless URI param."""
    uri = parsed("sip:vivekg@chair-dnrc.example.com;unknownparam")
    assert uri.params == (("unknownparam", None),)


def test_torture_unknown_scheme_is_opaque() -> None:
    """RFC 4475 unkscm: an unknown scheme parses (no host) so the proxy can answer 416."""
    uri = parsed("nobodyKnowsThisScheme:totallyopaquecontent")
    assert uri.scheme == "nobodyKnowsThisScheme"
    assert (uri.user, uri.host, uri.port, uri.params, uri.headers) == (None, "", None, (), None)


def test_torture_novel_scheme() -> None:
    """RFC 4475 novelsc: soap.beep://... is a syntactically valid absolute URI."""
    uri = parsed("soap.beep://192.0.2.103:3002")
    assert uri.scheme == "soap.beep" and uri.host == ""


def test_torture_unksm2_schemes() -> None:
    """RFC 4475 unksm2: isbn:, http: and name: URIs parse as opaque absolute URIs."""
    assert parsed("isbn:2983792873").scheme == "isbn"
    assert parsed("http://www.example.com").scheme == "http"
    uri = parsed("name:John_Doe")
    assert uri.scheme == "name" and uri.user is None and uri.host == ""


@pytest.mark.parametrize(
    "text",
    [
        "<sip:user@example.com>",  # ltgtruri
        "sip:user@example.com; lr",  # lwsruri
        "alan@jasomi.com",  # test.dat: no scheme
    ],
)
def test_torture_invalid_request_uris(text: str) -> None:
    """RFC 4475 ltgtruri / lwsruri / test.dat Request-URIs are 400."""
    with pytest.raises(SipParseError) as caught:
        parse_uri(text)
    assert caught.value.status == 400


def test_torture_cparam02_uri_param() -> None:
    """RFC 4475 cparam02: inside <> the unknown param belongs to the URI."""
    uri = parsed("sip:+19725552222@gw1.example.net;unknownparam")
    assert uri.params == (("unknownparam", None),) and uri.number == "+19725552222"


def test_torture_longreq_uri() -> None:
    """RFC 4475 longreq: very long param names and values."""
    text = (
        "sip:user@example.com:6000;unknownparam1=verylonglonglonglonglonglonglonglonglonglong"
        "longlonglonglonglonglonglonglonglonglongvalue;longparamnamenamenamenamenamenamename"
        "namenamenamenamenamenamenamenamenamenamenamenamenamenamenamenamenamenamename=shortvalue;"
        "verylonglonglonglonglonglonglonglonglonglonglonglonglonglonglonglonglonglonglonglonglong"
        "longlonglongParameterNameWithNoValue"
    )
    uri = parsed(text)
    assert uri.port == 6000 and len(uri.params) == 3
    assert uri.params[1][1] == "shortvalue" and uri.params[2][1] is None


# ------------------------------------------------------------------ tel URIs and numbers


def test_tel_global_number() -> None:
    """tel: with visual separators gives the number without them, '+' kept."""
    uri = parsed("tel:+1(212)555-0100")
    assert (uri.scheme, uri.user, uri.host, uri.port) == ("tel", "+1(212)555-0100", "", None)
    assert uri.number == "+12125550100"


def test_tel_params_and_local_number() -> None:
    """tel params are split off the subscriber; a local number keeps its digits."""
    uri = parsed("tel:7042;phone-context=example.com")
    assert uri.user == "7042" and uri.params == (("phone-context", "example.com"),)
    assert uri.number == "7042"
    uri = parsed("tel:+1-201-555-0123;ext=1234;isub=5678")
    assert uri.number == "+12015550123" and uri.param("ext") == "1234"


def test_tel_uppercase_scheme_and_dial_string() -> None:
    """TEL: is lower-cased; *67 style dial strings count as numbers in a tel URI."""
    uri = parsed("TEL:*67")
    assert uri.scheme == "tel" and uri.number == "*67"


def test_tel_hex_local_number_has_no_number() -> None:
    """A local number with hex digits is a valid tel URI but not a telephone number here."""
    assert parsed("tel:ab12;phone-context=example.com").number is None


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("sip:+1-212-555-0100@carrier.example;user=phone", "+12125550100"),
        ("sip:2125550100@10.0.0.1", "2125550100"),
        ("sip:alice@example.com", None),
        ("sip:anonymous@anonymous.invalid", None),
        ("sip:%2B12125550100@h", "+12125550100"),
        ("sip:+1.212.555.0100;isub=1411@gw.example.com", "+12125550100"),
        ("sip:2125550100;phone-context=+1@gw.example.com;user=phone", "2125550100"),
        ("sip:*67@gw.example.com", None),
        ("sip:*67@gw.example.com;user=phone", "*67"),
        ("sip:+@gw.example.com", None),
        ("sip:(212)%20555-0100@gw.example.com", "2125550100"),
        ("sip:alice@example.com;user=phone", None),
        ("sip:+13035551111@ift.client.example.net;user=phone", "+13035551111"),
        ("sip:%ZZ12@h", None),
    ],
)
def test_number_extraction(text: str, number: str | None) -> None:
    """The number property is normalised, or None for non-numeric users."""
    assert parsed(text).number == number


# ------------------------------------------------------------------ fuzzing

_URI_ALPHABET = st.sampled_from(list('sipteal:@;=?&[]<>"%.+-_0123456789AF ()#*,/\t\x00é'))
_URI_FRAGMENTS = st.sampled_from(
    [
        "sip:",
        "sips:",
        "tel:",
        "SIP:",
        "x-y:",
        "alice",
        "+1-212",
        "%2B",
        "%",
        "@",
        ":",
        "5060",
        "99999",
        "example.com",
        "[::1]",
        "[",
        "]",
        ";lr",
        ";user=phone",
        ";a=b",
        ";",
        "=",
        "?",
        "h=v",
        "&",
        " ",
        "é",
        "#",
    ]
)


def _check_uri(text: str) -> None:
    try:
        uri = parse_uri(text)
    except SipParseError as err:
        assert err.status == 400
        return
    assert str(uri) == text


@settings(max_examples=300)
@given(st.text())
def test_fuzz_parse_uri_random_text(text: str) -> None:
    """Random text either parses and round-trips or raises SipParseError, nothing else."""
    _check_uri(text)


@settings(max_examples=500)
@given(st.one_of(st.text(_URI_ALPHABET, max_size=40), st.lists(_URI_FRAGMENTS).map("".join)))
def test_fuzz_parse_uri_uri_like_text(text: str) -> None:
    """URI-shaped text either parses and round-trips or raises SipParseError, nothing else."""
    _check_uri(text)


@settings(max_examples=500)
@given(st.lists(_URI_FRAGMENTS, max_size=8).map(lambda parts: "sip:" + "".join(parts)))
def test_fast_and_general_sip_paths_agree(text: str) -> None:
    """The one-regex fast path and the general SIP parser give identical results."""
    fast = uri_module._SIP_FAST.fullmatch(text)
    if fast is None:
        return
    try:
        quick = uri_module._sip_from_match(text, fast)
    except SipParseError:
        quick = None
    try:
        general: Uri | None = uri_module._parse_sip(text, "sip", 4)
    except SipParseError:
        general = None
    assert quick == general
    if quick is not None:
        assert str(quick) == text


@pytest.mark.parametrize(("user", "hidden"), [
    ("*67+13125557090", "+13125557090"), ("+12125550100x12", "+12125550100"),
    ("+1-212-555-0100p1", "+12125550100"), ("x19005550199", "19005550199"),
    ("%E2%80%8Bx+19005550199", "+19005550199"), ("+13125556952#", "+13125556952"),
    ("123456_sales", "123456"), ("user2024060110", "2024060110"),
    ("gw1", None), ("3cx", None), ("queue_123456", None), ("agent-100-200", None),
    ("ext.1000.2001", None), ("1000_agent", None), ("alice", None), ("+12125550100", None),
])
def test_the_number_a_receiver_may_read_in_a_user_part(user: str, hidden: str | None) -> None:
    """hidden_number: a run of digits read as a number where sipguard reads none — across a
    number's separators when the user starts as a number does, written together (7+) after a
    letter; a user with a number read has none hidden."""
    assert hidden_number(parse_uri(f"sip:{user}@h.example")) == hidden


def test_every_number_a_receiver_may_read_in_a_user_part() -> None:
    """hidden_numbers: every run, a decoy first; none for a name or a number read."""
    assert hidden_numbers(parse_uri("sip:123456x+19005550199@h")) == ["123456", "+19005550199"]
    assert hidden_numbers(parse_uri("sip:x2125550100y19005550199@h")) == [
        "2125550100", "19005550199"]
    assert hidden_numbers(parse_uri("sip:gw1@h")) == []
    assert hidden_numbers(parse_uri("sip:+12125550100@h")) == []


def test_a_telephone_number_longer_than_any_is_a_400_and_hidden_runs_are_few() -> None:
    """32 digits (prefixes and all) are read as a number; more in a number-like user are a
    400 (keyed by it, every rule's table would hold what the sender chose); a user hiding a
    thousand runs of digits yields the first five (more than four: rule callerid refuses)."""
    assert parse_uri(f"sip:+{'1' * 32}@h").number == "+" + "1" * 32
    for user in ("1" * 33, "+" + "2" * 15000, "+1-212-" + "5" * 40, "0" * 40 + ";isub=1"):
        with pytest.raises(SipParseError) as err:
            _ = parse_uri(f"sip:{user}@h").number
        assert err.value.status == 400
    assert parse_uri("sip:alice" + "1" * 40 + "@h").number is None
    # a token of hex digits is no number, however many digits it holds
    assert parse_uri("sip:972a67c48192728a34979d9a35164c1295401b71@h").number is None
    assert len(hidden_numbers(parse_uri("sip:x" + "1234567x" * 1000 + "@h"))) == 5
