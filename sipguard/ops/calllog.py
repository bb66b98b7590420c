"""The two log lines every call writes (``invite_decided``, ``dialog_ended``), compiled.

Every call writes two of these lines, so they skip structlog's processor chain (a context
copy, a level lookup, a ``datetime`` per line) and go straight to JSON — the same fields,
``logger_name``, ``event``, ``level`` and ``ts`` as any other line, and in the same
:class:`sipguard.ops.logging.LineBatch`, so lines stay in order. The line is the text
``json.dumps`` would give. With the console format, or before
:func:`~sipguard.ops.logging.configure_logging`, lines go through structlog as usual.

A caller names its fields once (:class:`LineKeys`, made at import) and passes their values
as a tuple in that order (:meth:`CallLogger.line`): no keyword dict per line. The fields' JSON
text is made in one pass by ``_jsonline.fields`` (``sipguard/ops/_jsonline.c``, built with the
compiled modules), or by the same loop in Python where it is not built; the part of the line
that is the same on every line (``logger_name`` and the configured fields; ``event`` and
``level``) is made once.
"""

from __future__ import annotations

import importlib
import json.encoder
import time
from collections.abc import Callable
from typing import Any, Final

from sipguard.ops.logging import call_line_sink, encode_json, get_logger

_STRING: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii
_INF: Final = float("inf")
_KEYS_CACHED: Final = 512  # field names kept encoded (a line's keys come from a fixed set)


def _fields_extension() -> Callable[[tuple[str, ...], tuple[Any, ...], Callable[[Any], str]], str] | None:
    try:
        return importlib.import_module("sipguard.ops._jsonline").fields  # type: ignore[no-any-return]
    except ImportError:  # not built (no C compiler at build time): the loop in _fields below
        return None


_FIELDS: Final = _fields_extension()


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


def _key_text(name: str) -> str:
    return ", " + _STRING(name) + ": "


class LineKeys:
    """The field names of one kind of line, in the order :meth:`CallLogger.line` takes their
    values, with their JSON text (``, "name": ``) made once."""

    def __init__(self, *names: str) -> None:
        self.names: tuple[str, ...] = names
        self.texts: tuple[str, ...] = tuple(_key_text(n) for n in names)


def _fields(texts: tuple[str, ...], values: tuple[Any, ...]) -> str:
    """The JSON text of the fields whose value is not None (``_jsonline.fields`` in C)."""
    fields = _FIELDS
    if fields is not None:
        return fields(texts, values, encode_json)
    return fields_text(texts, values)


def fields_text(texts: tuple[str, ...], values: tuple[Any, ...]) -> str:
    """What ``_jsonline.fields`` gives, in Python (where it is not built; and its reference)."""
    parts: list[str] = []
    for i in range(len(texts)):
        value = values[i]
        if value is not None:
            parts.append(texts[i])
            parts.append(_value(value))
    return "".join(parts)


def _as_dict(keys: LineKeys, values: tuple[Any, ...], extra: dict[str, Any] | None) -> dict[str, Any]:
    """A line's fields as one dict (for the paths that take keywords or merge dicts)."""
    fields = dict(zip(keys.names, values, strict=True))
    if extra:
        fields.update(extra)
    return fields


class CallLogger:
    """Writes per-call lines at info: :meth:`line` (names made once, values in a tuple) or
    :meth:`info` (keywords, as a structlog logger takes them); fields that are None are left
    out."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._fallback: Any = get_logger(name)
        add, enabled, fields = call_line_sink()
        self._add: Callable[[str], None] | None = add  # None: through structlog
        self._enabled = enabled
        self._fields = fields  # configure_logging's fields, on every line
        self._clash: dict[LineKeys, bool] = {}  # keys naming a configured field (it yields)
        self._second = -1
        self._prefix = ""
        self._keys: dict[str, str] = {}  # field name -> ', "name": '
        self._tails: dict[str, str] = {}  # event -> ', "event": ..., "ts": "'
        # '{"logger_name": ...' and the configured fields, the start of every line
        self._head = "{" + '"logger_name": ' + _STRING(name) + "".join(
            self._key(k) + _value(v) for k, v in fields.items() if v is not None)

    def _ts(self) -> str:
        """ISO 8601 UTC with microseconds; the date and time part made once per second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        micros = str(int((now - second) * 1e6))
        return self._prefix + "." + "0" * (6 - len(micros)) + micros + "Z"

    def line(self, event: str, keys: LineKeys, values: tuple[Any, ...],
             extra: dict[str, Any] | None = None) -> None:
        """Write one line: ``values`` in the order of ``keys``, then ``extra``; fields whose
        value is None are left out."""
        if not self._enabled:
            return
        add = self._add
        if add is None:
            self._fallback.info(event, **_as_dict(keys, values, extra))
            return
        configured = self._fields
        if configured:
            clash = self._clash.get(keys)
            if clash is None:
                clash = not configured.keys().isdisjoint(keys.names)
                if len(self._clash) < _KEYS_CACHED:
                    self._clash[keys] = clash
            if clash or (extra and not configured.keys().isdisjoint(extra)):
                # a field of the line's own replaces the configured one in place, as in a dict
                self._line_of_dict(event, {**configured, **_as_dict(keys, values, extra)}, add)
                return
        text = self._head + _fields(keys.texts, values)
        if extra:
            for key, value in extra.items():
                if value is not None:
                    text += self._key(key) + _value(value)
        add(text + self._tail(event))

    def _tail(self, event: str) -> str:
        """``, "event": ..., "level": "info", "ts": ...}``: the end of every line."""
        tails = self._tails
        tail = tails.get(event)
        if tail is None:
            tail = ', "event": ' + _STRING(event) + ', "level": "info", "ts": "'
            if len(tails) < _KEYS_CACHED:
                tails[event] = tail
        return tail + self._ts() + '"}'

    def _line_of_dict(self, event: str, fields: dict[str, Any], add: Callable[[str], None]) -> None:
        parts = ["{", '"logger_name": ', _STRING(self._name)]
        for key, value in fields.items():
            if value is not None and key not in ("logger_name", "event", "level", "ts"):
                parts.append(self._key(key))
                parts.append(_value(value))
        parts.append(self._tail(event))
        add("".join(parts))

    def info(self, event: str, **fields: Any) -> None:
        """As :meth:`line`, the fields as keywords (for lines that are not per call)."""
        self.line(event, LineKeys(*fields), tuple(fields.values()))

    def _key(self, key: str) -> str:
        keys = self._keys
        text = keys.get(key)
        if text is None:
            text = _key_text(key)
            if len(keys) < _KEYS_CACHED:
                keys[key] = text
        return text
