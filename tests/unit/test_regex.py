"""sipguard.sip.regex: the grammar's possessive quantifiers compiled as atomic groups, so that
the grammar is the same on every Python 3.11 (CPython's ``re`` matched possessive repeats
wrongly before 3.11.5, and Debian 12 ships 3.11.2)."""

from __future__ import annotations

import importlib
import pkgutil
import re

# the parser of CPython's re (Python 3.11 and later)
from re import _constants as sre_constants  # type: ignore[attr-defined]
from re import _parser as sre_parser  # type: ignore[attr-defined]
from typing import Any

import pytest

import sipguard
from sipguard.sip import regex


@pytest.mark.parametrize(
    ("pattern", "rewritten"),
    [
        (r"[ \t]*+;", r"(?>[ \t]*);"),
        (r"(?:;[a-z]++(?:=[a-z]++)?+)*+", r"(?>(?:;(?>[a-z]+)(?>(?:=(?>[a-z]+))?))*)"),
        (r"a*?b+c?", r"a*?b+c?"),  # lazy and greedy ones stay
        (r"\x7f++\.", r"(?>\x7f+)\."),
        (r"[]a]*+[^]a\]]++x", r"(?>[]a]*)(?>[^]a\]]+)x"),
        (r"(?P<n>a)++(?<=a)b{1,5}+", r"(?>(?P<n>a)+)(?<=a)(?>b{1,5})"),
        (r"(?i:ab)*+|x{2}+", r"(?>(?i:ab)*)|(?>x{2})"),
        (r"a{,}+", r"a{,}+"),  # not a quantifier: copied as it is
    ],
)
def test_possessive_quantifiers_become_atomic_groups(pattern: str, rewritten: str) -> None:
    assert regex.atomic(pattern) == rewritten
    re.compile(rewritten)


@pytest.mark.parametrize("pattern", [r"(a", r"a)", r"[a", r"(?:a|b"])
def test_a_pattern_it_cannot_read_is_an_error(pattern: str) -> None:
    with pytest.raises(ValueError):
        regex.atomic(pattern)


def test_the_repeats_cpython_3_11_2_matched_wrongly_match_right() -> None:
    """python/cpython#106052 and #100061, on whatever Python runs the tests."""
    assert regex.compile("(?:ab?c)*+").fullmatch("a") is None
    run = regex.compile(r"(?:[ \t]*+;[ \t]*+([a-z]++)(?:=([a-z]++))?+)*+")
    for text, end in ((";", 0), (";tag=", 4), (";a;b", 4), (";tag=x;", 6), (";a=b;c", 6)):
        m = run.match(text)
        assert m is not None and m.end() == end, text
    cseq = regex.compile(rb"([0-9]++)[ \t]++([A-Z]++)")
    m = cseq.match(b"12 INVITE")
    assert m is not None and m.groups() == (b"12", b"INVITE")


def _possessive(pattern: re.Pattern[Any]) -> bool:
    def walk(items: Any) -> bool:
        for op, av in items:
            if op is sre_constants.POSSESSIVE_REPEAT:
                return True
            for value in av if isinstance(av, (list, tuple)) else (av,):
                if isinstance(value, sre_parser.SubPattern) and walk(value):
                    return True
                if isinstance(value, (list, tuple)):
                    for sub in value:
                        if isinstance(sub, sre_parser.SubPattern) and walk(sub):
                            return True
        return False

    return walk(sre_parser.parse(pattern.pattern, pattern.flags))


def test_no_module_compiles_a_possessive_repeat() -> None:
    """Every compiled pattern a sipguard module holds at its top level (or in a class) has
    its possessive quantifiers as atomic groups: a new one with ``re.compile`` fails here."""
    found: list[str] = []
    checked = 0
    for info in pkgutil.walk_packages(sipguard.__path__, "sipguard."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        spaces = [vars(module)] + [vars(v) for v in vars(module).values() if isinstance(v, type)
                                   and v.__module__ == module.__name__]
        for space in spaces:
            for name, value in list(space.items()):
                if isinstance(value, re.Pattern):
                    checked += 1
                    if _possessive(value):
                        found.append(f"{info.name}.{name}")
    assert checked > 20  # the grammar's patterns were seen
    assert not found, f"compile these with sipguard.sip.regex.compile: {found}"
