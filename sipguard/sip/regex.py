"""The grammar's regular expressions, with possessive quantifiers written as atomic groups.

The header grammars are written with possessive quantifiers (``x*+``, ``x++``, ``x?+``,
``x{m,n}+``): a token, once read, is never given back, so a hostile header cannot make the
matcher backtrack. CPython's ``re`` matched them wrongly before 3.11.5 when the repeated part
can itself backtrack (python/cpython#100061, #106052): on Debian 12's Python 3.11.2,
``(?:;[a-z]+)*+`` matched ``";"`` — a malformed parameter list accepted. An atomic group does
the same work without the bug (the fix made ``x*+`` mean ``(?>x*)``), so :func:`compile`
rewrites each possessive quantifier into one before compiling; the patterns stay readable.
"""

from __future__ import annotations

import re
from typing import AnyStr

_QUANTIFIERS = "*+?"
_ESCAPE_SIZE = {"x": 4, "u": 6, "U": 10}  # \xhh, \uhhhh, \Uhhhhhhhh


def compile(pattern: AnyStr, flags: int = 0) -> re.Pattern[AnyStr]:  # noqa: A001
    """``re.compile(pattern, flags)`` with every possessive quantifier as an atomic group."""
    if isinstance(pattern, bytes):
        text = atomic(pattern.decode("latin-1")).encode("latin-1")
        return re.compile(text, flags)
    return re.compile(atomic(pattern), flags)


def atomic(pattern: str) -> str:
    """``pattern`` with ``X*+``, ``X++``, ``X?+`` and ``X{m,n}+`` written ``(?>X*)`` and so
    on, in groups too. Raises ValueError for a pattern it cannot read (an unbalanced group or
    class); anything else is copied as it is."""
    out, end = _sequence(pattern, 0)
    if end != len(pattern):
        raise ValueError(f"unbalanced ')' at {end} in {pattern!r}")
    return out


def _sequence(p: str, i: int) -> tuple[str, int]:
    """Atoms from ``i`` up to an unmatched ``)`` or the end: (their text, where it stopped)."""
    parts: list[str] = []
    n = len(p)
    while i < n and p[i] != ")":
        if p[i] == "|":
            parts.append("|")
            i += 1
            continue
        atom, i = _atom(p, i)
        quant, i = _quantifier(p, i)
        if quant and i < n and p[i] == "+":  # possessive: the atom in an atomic group
            parts.append(f"(?>{atom}{quant})")
            i += 1
        else:
            if quant and i < n and p[i] == "?":  # lazy
                quant += "?"
                i += 1
            parts.append(atom + quant)
    return "".join(parts), i


def _atom(p: str, i: int) -> tuple[str, int]:
    c = p[i]
    if c == "\\":
        size = _ESCAPE_SIZE.get(p[i + 1 : i + 2], 2)
        if p.startswith("N{", i + 1):
            size = p.index("}", i) + 1 - i
        return p[i : i + size], i + size
    if c == "[":
        j = i + 1
        if j < len(p) and p[j] == "^":
            j += 1
        if j < len(p) and p[j] == "]":
            j += 1  # a ']' first in a class is a member
        while j < len(p) and p[j] != "]":
            j += 2 if p[j] == "\\" else 1
        if j >= len(p):
            raise ValueError(f"unterminated class at {i} in {p!r}")
        return p[i : j + 1], j + 1
    if c == "(":
        j = i + 1
        head = ""
        if p.startswith("?", j):  # (?:, (?>, (?=, (?!, (?<=, (?<!, (?P<name>, (?i) ...
            k = j + 1
            if p.startswith("P<", k):
                k = p.index(">", k) + 1
            elif p.startswith("<", k) and p[k + 1 : k + 2] in ("=", "!"):
                k += 2
            elif k < len(p) and p[k] in ":>=!":
                k += 1
            else:  # inline flags: (?i) or (?i:...)
                while k < len(p) and p[k] not in ":)":
                    k += 1
                k += 1 if k < len(p) and p[k] == ":" else 0
            head, j = p[i + 1 : k], k
        inner, j = _sequence(p, j)
        if j >= len(p):
            raise ValueError(f"unterminated group at {i} in {p!r}")
        return f"({head}{inner})", j + 1
    return c, i + 1


def _quantifier(p: str, i: int) -> tuple[str, int]:
    if i < len(p) and p[i] in _QUANTIFIERS:
        return p[i], i + 1
    if i < len(p) and p[i] == "{":
        m = re.match(r"\{[0-9]*(?:,[0-9]*)?\}", p[i:])
        if m is not None and m.group() != "{}" and m.group() != "{,}":
            return m.group(), i + m.end()
    return "", i
