"""Telephone numbers in what sipguard writes: ``log.numbers: full | masked | hashed``.

:class:`NumberPrivacy` turns a number into what a log line or an admin API answer may carry:

- ``full`` — the number as is. :func:`number_privacy` returns None for it, and callers skip
  the call entirely: the hot path does no extra work.
- ``masked`` — the country code (read with phonenumbers' country-code table) and the last 3
  digits, every other digit a ``*`` (``+31201234567`` → ``+31******567``); a number with too
  few digits to hide anything (an extension) is all stars. A prefix (``+3120*``) keeps its
  country code only.
- ``hashed`` — ``h:`` and the first 16 hex digits of HMAC-SHA256 of the number under the key
  in ``log.hash_key_file``: the same number gives the same token in every line (and across
  restarts with the same key), so one number can be followed without writing it; without the
  key the token cannot be reversed by trying every number.

Results are memoised (bounded), as numbers come back call after call.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from phonenumbers import COUNTRY_CODE_TO_REGION_CODE

__all__ = ["NumberPrivacy", "number_privacy", "read_hash_key"]

HASH_HEX = 16
MIN_KEY_BYTES = 16
_MEMO_MAX = 65536
# detail keys of a verdict that may carry a number (concurrency: number; rate, dialer: key)
NUMBER_DETAILS = ("number", "key")


def read_hash_key(path: Path) -> bytes:
    """The key in ``path`` (surrounding whitespace dropped). Raises OSError, or ValueError for
    a key shorter than 16 bytes."""
    key = path.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"log.hash_key_file {path}: the key must be at least "
                         f"{MIN_KEY_BYTES} bytes")
    return key


def _looks_like_number(text: str) -> bool:
    digits = text[1:] if text.startswith("+") else text
    digits = digits[:-1] if digits.endswith("*") else digits
    return len(digits) >= 3 and digits.isdigit()


class NumberPrivacy:
    """One mode's number transform, memoised."""

    __slots__ = ("mode", "key", "_memo")

    def __init__(self, mode: Literal["masked", "hashed"], key: bytes = b"") -> None:
        if mode == "hashed" and not key:
            raise ValueError("hashed needs a key")
        self.mode = mode
        self.key = key
        self._memo: dict[str, str] = {}

    def __call__(self, number: str | None) -> str | None:
        if number is None:
            return None
        out = self._memo.get(number)
        if out is None:
            out = self._hash(number) if self.mode == "hashed" else _mask(number)
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[number] = out
        return out

    def _hash(self, number: str) -> str:
        mac = hmac.new(self.key, number.encode("utf-8", "surrogateescape"), hashlib.sha256)
        return "h:" + mac.hexdigest()[:HASH_HEX]

    def many(self, numbers: tuple[str, ...] | list[str]) -> list[str]:
        return [self(n) or "" for n in numbers]

    def detail(self, detail: Mapping[str, Any]) -> dict[str, Any]:
        """A verdict's detail with the values that are numbers transformed."""
        out = dict(detail)
        for name in NUMBER_DETAILS:
            value = out.get(name)
            if isinstance(value, str) and _looks_like_number(value):
                out[name] = self(value)
        return out

    def text(self, value: str) -> str:
        """Any string that may be a number (a suspension key, a ``prefix*``)."""
        return (self(value) or "") if _looks_like_number(value) else value


def _mask(number: str) -> str:
    prefix = number.endswith("*")
    body = number[:-1] if prefix else number
    plus = body.startswith("+")
    digits = body[1:] if plus else body
    if not digits.isdigit():
        return "*" * len(number)
    cc = ""
    if plus:
        for size in (1, 2, 3):
            if int(digits[:size] or "0") in COUNTRY_CODE_TO_REGION_CODE:
                cc = digits[:size]
                break
    rest = digits[len(cc):]
    if prefix:
        return ("+" if plus else "") + cc + "*" * len(rest) + "*"
    keep = 3 if len(rest) >= 7 else 0  # too short: the last digits would tell the number
    tail = rest[len(rest) - keep:] if keep else ""
    return ("+" if plus else "") + cc + "*" * (len(rest) - keep) + tail


def number_privacy(mode: str, key_file: Path | None) -> NumberPrivacy | None:
    """The transform for ``log.numbers`` (None for ``full``). Raises OSError / ValueError when
    the hash key cannot be read."""
    if mode == "full":
        return None
    if mode == "hashed":
        if key_file is None:
            raise ValueError("log.hash_key_file is required with log.numbers: hashed")
        return NumberPrivacy("hashed", read_hash_key(key_file))
    return NumberPrivacy("masked")
