"""Telephone numbers: E.164 normalisation and plausibility, fast enough for every INVITE.

:func:`lookup` reads a number as the URI grammar left it (``+12125550100``, or national digits
such as ``2125550100``) and answers what the caller-ID rule needs: the E.164 form, whether
the ``phonenumbers`` package (Google's libphonenumber metadata)
calls it valid — an allocated range of a known country, with a length that country uses; N11
area codes, unassigned country codes and impossible lengths are not — and the country code and
national significant number (for the neighbor-spoofing comparison).

Cost: ``phonenumbers`` takes 30–60 µs to parse and validate one number, so

1. a global number (``+`` …) is built into a ``PhoneNumber`` directly instead of going
   through ``phonenumbers.parse`` (about 2 µs instead of 20), leaving only the validity check;
2. a shape pre-check turns obvious garbage away without calling it: a global number is ``+`` and
   2–15 digits, the first not 0 (E.164 allows 15 in all); a national number is
   3–17 digits and needs a region to be read in;
3. answers are memoised in a bounded LRU cache (65 536 entries, keyed by number and region), so
   a number seen before costs one dict lookup. A dialer rotating through millions of numbers
   only evicts older entries; memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import phonenumbers
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, NumberParseException, PhoneNumber

CACHE_SIZE = 65536


@dataclass(frozen=True, slots=True)
class NumberInfo:
    """What is known about one number."""

    e164: str | None  # "+12125550100"; None when it cannot be read as a possible E.164 number
    valid: bool  # phonenumbers.is_valid_number: allocated range, right length for the country
    country_code: int = 0  # 1 for NANP; 0 when unknown
    national: str = ""  # national significant number: "2125550100"


NOT_A_NUMBER: Final = NumberInfo(None, False)


def lookup(number: str, region: str | None = None) -> NumberInfo:
    """Read ``number`` (``+`` and digits, as normalised by the URI grammar) as E.164.

    A number without ``+`` is read as a national number of ``region`` (ISO 3166 code such as
    ``US``); without a region it is not E.164. Never raises.
    """
    if number.startswith("+"):
        digits = number[1:]
        if not (1 < len(digits) <= 15 and digits.isdigit() and digits.isascii()) or (
            digits[0] == "0"
        ):
            return NOT_A_NUMBER
        return _lookup(number, None)
    if region is None or not (2 < len(number) <= 17 and number.isdigit() and number.isascii()):
        return NOT_A_NUMBER
    return _lookup(number, region)


def parts(number: str, region: str | None = None) -> NumberInfo:
    """Like :func:`lookup` without the validity check (``valid`` is False): E.164 form,
    country code and national number only — a tenth of the cost on a cache miss, for a
    number that is compared, not judged (the called number in neighbor-spoofing)."""
    if number.startswith("+"):
        return _parts(number) if 1 < len(number) <= 16 else NOT_A_NUMBER
    return lookup(number, region)


@lru_cache(maxsize=CACHE_SIZE)
def _parts(number: str) -> NumberInfo:
    digits = number[1:]
    if not (digits.isdigit() and digits.isascii()) or digits[0] == "0":
        return NOT_A_NUMBER
    parsed = _global(number)
    if parsed is None:
        return NOT_A_NUMBER
    cc = parsed.country_code or 0
    national = phonenumbers.national_significant_number(parsed)
    return NumberInfo(f"+{cc}{national}", False, cc, national)


def to_e164(number: str | None, region: str | None) -> str | None:
    """``number`` in E.164 when it can be read so, else ``number`` unchanged (None stays None).

    Used to bring national-format numbers of a peer with a ``default_region`` to the form
    configured lists (suspended numbers, ownership, DNO) are written in.
    """
    if number is None or number.startswith("+") or region is None:
        return number
    return lookup(number, region).e164 or number


def country_code_of(region: str | None) -> int:
    """The country code of ``region`` (``US``: 1, ``NL``: 31); 0 for None or one unknown."""
    return int(phonenumbers.country_code_for_region(region)) if region else 0


def national_forms(e164: str) -> tuple[str, ...]:
    """How ``e164`` is written nationally in a list: its national significant number, with a
    trunk 0 before it, and for NANP with the 1 (``+12125550100``: ``2125550100``,
    ``02125550100``, ``12125550100``); () for a number that cannot be read."""
    info = parts(e164)
    n = info.national
    if not n:
        return ()
    return (n, "0" + n, "1" + n) if info.country_code == 1 else (n, "0" + n)


def e164_pattern(pattern: str, region: str) -> str | None:
    """A national-format number or ``prefix*`` of ``region`` in E.164 (``030123*`` in DE:
    ``+4930123*``; ``2125550100`` in US: ``+12125550100``): its country code before it, the
    national (trunk) prefix taken off; None for an E.164 one, ``*`` or a region without
    metadata. A whole number is read by the numbering plan, a prefix by its digits."""
    text = pattern.strip()
    if not text or text.startswith("+") or text == "*":
        return None
    star = text.endswith("*")
    digits = "".join(c for c in (text[:-1] if star else text) if c.isdigit())
    if not digits:
        return None
    if not star:
        e164 = lookup(digits, region).e164
        return e164
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if meta is None or meta.country_code is None:
        return None
    cc = meta.country_code
    # A prefix cannot be read by the plan: only the plain cases, else None (the entry then
    # matches national spellings only, as written). Only the country code's main region
    # (GB, not Jersey; US, not the Bahamas, whose local numbers get an area code put before
    # them); a trunk prefix "0" taken off; none to take off (IT, ES: the number as written);
    # NANP's optional "1". Other trunk prefixes (RU, BY "8") are digits of numbers too.
    if phonenumbers.region_code_for_country_code(cc) != region:
        return None
    trunk = meta.national_prefix
    if trunk == "0":
        if not digits.startswith("0") or digits.startswith("00"):
            return None
        digits = digits[1:]
    elif trunk == "1" and cc == 1:
        digits = digits[1:] if digits.startswith("1") else digits
    elif trunk:
        return None
    return f"+{cc}{digits}*" if digits else None


@lru_cache(maxsize=CACHE_SIZE)
def _lookup(number: str, region: str | None) -> NumberInfo:
    if region is None:
        parsed = _global(number)
        if parsed is None:
            return NOT_A_NUMBER
    else:
        try:
            parsed = phonenumbers.parse(number, region)
        except NumberParseException:
            return NOT_A_NUMBER
    cc = parsed.country_code or 0
    national = phonenumbers.national_significant_number(parsed)
    if phonenumbers.is_valid_number(parsed):  # valid implies possible
        return NumberInfo(f"+{cc}{national}", True, cc, national)
    if phonenumbers.is_possible_number(parsed):
        return NumberInfo(f"+{cc}{national}", False, cc, national)
    return NumberInfo(None, False, cc, national)


def _global(number: str) -> PhoneNumber | None:
    """``+`` and digits as a PhoneNumber, without ``phonenumbers.parse`` (a tenth of its cost).

    The country code is the first 1–3 digits that name one, as ``parse`` finds it. Unlike
    ``parse``, nothing is "repaired": a national trunk prefix left in (``+4402071838750``)
    makes the number invalid instead of being dropped — the E.164 text is taken as written.
    """
    digits = number[1:]
    if not digits.isdigit() or not digits.isascii():
        return None  # (not "+" and digits: int() below would raise)
    for size in (1, 2, 3):
        cc = int(digits[:size])
        if cc in COUNTRY_CODE_TO_REGION_CODE:
            break
    else:
        return None
    national = digits[size:]
    if not national:
        return None
    parsed = PhoneNumber(country_code=cc, national_number=int(national))
    if len(national) > 1 and national[0] == "0":  # as phonenumbers records Italian zeros
        parsed.italian_leading_zero = True
        zeros = 1
        while zeros < len(national) - 1 and national[zeros] == "0":
            zeros += 1
        if zeros != 1:
            parsed.number_of_leading_zeros = zeros
    return parsed


def cache_info() -> str:
    """Hits, misses and size of the lookup cache (for benchmarks and tests)."""
    return str(_lookup.cache_info())


def clear_cache() -> None:
    """Empty the lookup caches (benchmarks measure the cold path with them)."""
    _lookup.cache_clear()
    _parts.cache_clear()


# phonenumbers' PhoneNumberType -> the kinds rule ``national_cli`` has an action for
_KINDS: Final = {
    phonenumbers.PhoneNumberType.FIXED_LINE: "fixed",
    phonenumbers.PhoneNumberType.MOBILE: "mobile",
    phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE: "fixed_or_mobile",
}


@lru_cache(maxsize=CACHE_SIZE)
def number_kind(e164: str) -> str:
    """``fixed``, ``mobile``, ``fixed_or_mobile`` (countries whose plan does not tell them
    apart, e.g. NANP) or ``other`` (toll-free, VoIP, premium, unknown ...) for an E.164
    number, from phonenumbers' numbering-plan metadata. Memoised like :func:`lookup`."""
    parsed = _global(e164) if e164.startswith("+") else None
    if parsed is None:
        return "other"
    return _KINDS.get(phonenumbers.number_type(parsed), "other")
