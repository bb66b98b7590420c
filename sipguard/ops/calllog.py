"""The two log lines every call writes (``invite_decided``, ``dialog_ended``), compiled.

Every call writes two of these lines, so they skip structlog's processor chain (a context
copy, a level lookup, a ``datetime`` per line) and go straight to JSON — the same fields,
``logger_name``, ``event``, ``level`` and ``ts`` as any other line, and in the same
:class:`sipguard.ops.logging.LineBatch`, so lines stay in order. The JSON text is built here,
strings through JSON's C string encoder, rather than by the C encoder on the whole line, which
makes a string per token (3 µs of a 6.7 µs ``invite_decided`` line); the module is compiled with
the hot path (:mod:`sipguard.native`). The line is the text ``json.dumps`` would give. With the
console format, or before :func:`~sipguard.ops.logging.configure_logging`, lines go through
structlog as usual.
"""

from __future__ import annotations

import json.encoder
import time
from collections.abc import Callable
from typing import Any, Final

from sipguard.ops.logging import call_line_sink, encode_json, get_logger

_STRING: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii
_INF: Final = float("inf")
_KEYS_CACHED: Final = 512  # field names kept encoded (a line's keys come from a fixed set)


def _value(value: Any) -> str:
    """``value`` as ``encode_json`` writes it: strings, numbers and booleans here (they are
    nearly every field), anything else through it."""
    if isinstance(value, str):
        return _STRING(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        number = float(value)
        if number != number:
            return "NaN"
        if number == _INF:
            return "Infinity"
        if number == -_INF:
            return "-Infinity"
        return repr(number)
    return encode_json(value)


class CallLogger:
    """Writes per-call lines at info; ``info(event, **fields)`` as a structlog logger takes
    it, fields that are None left out."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._fallback: Any = get_logger(name)
        add, enabled, fields = call_line_sink()
        self._add: Callable[[str], None] | None = add  # None: through structlog
        self._enabled = enabled
        self._fields = fields  # configure_logging's fields, on every line
        self._second = -1
        self._prefix = ""
        self._keys: dict[str, str] = {}  # field name -> '"name": '

    def _ts(self) -> str:
        """ISO 8601 UTC with microseconds; the date and time part made once per second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        micros = str(int((now - second) * 1e6))
        return self._prefix + "." + "0" * (6 - len(micros)) + micros + "Z"

    def info(self, event: str, **fields: Any) -> None:
        if not self._enabled:
            return
        add = self._add
        if add is None:
            self._fallback.info(event, **fields)
            return
        line: dict[str, Any] = {"logger_name": self._name}
        if self._fields:
            line.update(self._fields)
        for key, value in fields.items():
            if value is not None:
                line[key] = value
        line["event"] = event
        line["level"] = "info"
        line["ts"] = self._ts()
        # what json.dumps(line) gives, without its per-token chunks
        parts = ["{"]
        for key, value in line.items():
            parts.append(self._key(key))
            parts.append(_value(value))
        parts[1] = parts[1][2:]  # no ", " before the first key
        parts.append("}")
        add("".join(parts))

    def _key(self, key: str) -> str:
        keys = self._keys
        text = keys.get(key)
        if text is None:  # ', "key": '
            text = ", " + _STRING(key) + ": "
            if len(keys) < _KEYS_CACHED:
                keys[key] = text
        return text
