"""Tests for History-Info (RFC 7044), its causes (RFC 4458) and the diverting entries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.sip.errors import SipParseError
from sipguard.sip.history_info import HistoryInfoEntry, diverting_entries, parse_history_info


def entries(text: str, parts: list[str]) -> list[HistoryInfoEntry]:
    """Parse and check each hi-entry round-trips to its original slice."""
    items = parse_history_info(text)
    assert [str(e) for e in items] == parts
    assert [e.raw for e in items] == parts
    return items


# RFC 7044-style call forwarding: Alice calls Bob's AoR, Bob's phone is busy (486, recorded as
# an escaped Reason in the contact's entry), the call is forwarded (mp) to Bob's voicemail
# number with the RFC 4458 cause.
FORWARDED = (
    "<sip:+12125550100@example.com;user=phone>;index=1, "
    "<sip:bob@192.0.2.4?Reason=SIP%3Bcause%3D486%3Btext%3D%22Busy%20Here%22>;index=1.1;rc=1, "
    "<sip:+12125550199@vm.example.com;user=phone;cause=486>;index=1.2;mp=1"
)
FORWARDED_PARTS = [
    "<sip:+12125550100@example.com;user=phone>;index=1",
    "<sip:bob@192.0.2.4?Reason=SIP%3Bcause%3D486%3Btext%3D%22Busy%20Here%22>;index=1.1;rc=1",
    "<sip:+12125550199@vm.example.com;user=phone;cause=486>;index=1.2;mp=1",
]


def test_entries_fields() -> None:
    """index, rc and mp are read from each entry's header params."""
    items = entries(FORWARDED, FORWARDED_PARTS)
    assert [(e.index, e.rc, e.mp, e.np) for e in items] == [
        ("1", None, None, None),
        ("1.1", "1", None, None),
        ("1.2", None, "1", None),
    ]


def test_cause_from_uri_param_and_escaped_reason() -> None:
    """cause comes from the RFC 4458 cause URI param, else from an escaped Reason header."""
    items = entries(FORWARDED, FORWARDED_PARTS)
    assert [e.cause for e in items] == [None, 486, 486]


def test_diverting_entry_is_the_one_mp_names() -> None:
    """The entry named by mp (Bob's AoR) is the diverting party, not the contact entry."""
    items = entries(FORWARDED, FORWARDED_PARTS)
    diverting = diverting_entries(items)
    assert diverting == [items[0]]
    assert diverting[0].name_addr.uri.number == "+12125550100"


def test_rfc4458_cause_without_mp_uses_previous_entry() -> None:
    """Without mp (RFC 4244 style), a forwarding cause marks the previous entry as diverting."""
    text = (
        "<sip:+13035551000@example.com;user=phone>;index=1, "
        "<sip:+13035552000@example.com;user=phone;cause=302>;index=1.1"
    )
    items = entries(
        text,
        [
            "<sip:+13035551000@example.com;user=phone>;index=1",
            "<sip:+13035552000@example.com;user=phone;cause=302>;index=1.1",
        ],
    )
    assert items[1].cause == 302
    assert diverting_entries(items) == [items[0]]


def test_contact_retargeting_is_not_diversion() -> None:
    """rc entries (registered contacts of the same user) are not diversions."""
    text = "<sip:bob@example.com>;index=1, <sip:bob@192.0.2.4>;index=1.1;rc=1"
    items = entries(text, ["<sip:bob@example.com>;index=1", "<sip:bob@192.0.2.4>;index=1.1;rc=1"])
    assert diverting_entries(items) == []


def test_non_forwarding_cause_is_not_diversion() -> None:
    """A cause outside the RFC 4458 forwarding set alone does not mark a diversion."""
    text = "<sip:a@example.com>;index=1, <sip:b@example.com;cause=380>;index=1.1"
    items = entries(
        text, ["<sip:a@example.com>;index=1", "<sip:b@example.com;cause=380>;index=1.1"]
    )
    assert items[1].cause == 380 and diverting_entries(items) == []


def test_two_forwardings_in_order_without_duplicates() -> None:
    """Each diverting party appears once, in header order."""
    text = (
        "<sip:+1111@a.example.com>;index=1, "
        "<sip:+2222@b.example.com;cause=486>;index=1.1;mp=1, "
        "<sip:+3333@c.example.com;cause=408>;index=1.1.1;mp=1.1, "
        "<sip:+4444@d.example.com;cause=408>;index=1.1.2;mp=1.1"
    )
    items = parse_history_info(text)
    assert [str(e) for e in items] == [part.strip() for part in text.split(", ")]
    assert diverting_entries(items) == [items[0], items[1]]


def test_mp_naming_unknown_index_falls_back_to_previous_entry() -> None:
    """When mp names an index not in the header, the previous entry is the diverting one."""
    text = "<sip:+1111@a.example.com>;index=1.1, <sip:+2222@b.example.com>;index=1.2;mp=1"
    items = entries(
        text, ["<sip:+1111@a.example.com>;index=1.1", "<sip:+2222@b.example.com>;index=1.2;mp=1"]
    )
    assert diverting_entries(items) == [items[0]]


def test_reason_with_q850_first_and_malformed_causes() -> None:
    """The SIP reason-value is found after a Q.850 one; malformed causes are ignored."""
    text = (
        "<sip:a@example.com?Reason=Q.850%3Bcause%3D16%2C%20SIP%3Bcause%3D480>;index=1, "
        "<sip:b@example.com;cause=abc>;index=2, "
        "<sip:c@example.com?reason=SIP%3Bcause%3D4800>;index=3, "
        "<sip:d@example.com?Subject=x&Reason=garbage%3B%3B>;index=4;np=3"
    )
    items = parse_history_info(text)
    assert [str(e) for e in items] == [part.strip() for part in text.split(", ")]
    assert [e.cause for e in items] == [480, None, None, None]
    assert items[3].np == "3"


def test_display_names_and_extension_params() -> None:
    """Display names and unknown hi-extension params are kept."""
    text = '"Bob" <sip:bob@example.com>;index=1;foo=bar'
    (e,) = entries(text, [text])
    assert e.name_addr.display == "Bob" and e.name_addr.param("foo") == "bar"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sip:bob@example.com;index=1",
        "<sip:bob@example.com>",
        "<sip:bob@example.com>;index",
        "<sip:bob@example.com>;index=",
        "<sip:bob@example.com>;index=a",
        "<sip:bob@example.com>;index=1.",
        "<sip:bob@example.com>;index=1..2",
        "<sip:bob@example.com>;index=1;mp=x",
        "<sip:bob@example.com>;index=1;rc",
        "<sip:bob@example.com>;index=1,",
        "<sip:bob@example.com>;index=1 <sip:c@example.com>;index=2",
    ],
)
def test_malformed_history_info_is_400(text: str) -> None:
    """Bare URIs, a missing or malformed index, and bad rc/mp values are 400."""
    with pytest.raises(SipParseError) as caught:
        parse_history_info(text)
    assert caught.value.status == 400


_FRAGMENTS = st.sampled_from(
    [
        "<sip:+1@a.example.com>",
        "<sip:b@example.com;cause=486>",
        "<sip:c@example.com?Reason=SIP%3Bcause%3D302>",
        "<sip:d@example.com?Reason=",
        "%3B",
        "%2C",
        ";index=1",
        ";index=1.1",
        ";mp=1",
        ";rc=1",
        ";np=",
        ", ",
        ";",
        "=",
        "<",
        ">",
        '"',
    ]
)


def _check(text: str) -> None:
    try:
        items = parse_history_info(text)
    except SipParseError as err:
        assert err.status == 400
    else:
        assert all(str(e) in text for e in items)
        for e in diverting_entries(items):
            assert e in items


@settings(max_examples=300)
@given(st.text())
def test_fuzz_random_text(text: str) -> None:
    """Random text either parses or raises SipParseError, nothing else."""
    _check(text)


@settings(max_examples=600)
@given(st.lists(_FRAGMENTS, max_size=12).map("".join))
def test_fuzz_history_info_like_text(text: str) -> None:
    """History-Info-shaped text parses (diverting entries come from it) or raises SipParseError."""
    _check(text)
