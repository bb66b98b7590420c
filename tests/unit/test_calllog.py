"""The per-call log lines' JSON text (sipguard/ops/calllog.py, sipguard/ops/_jsonline.c) is
the text ``json.dumps`` gives, for any value, in C and in Python alike."""

from __future__ import annotations

import importlib
import io
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipguard.ops.calllog import CallLogger, LineKeys, fields_text
from sipguard.ops.config import LogSettings
from sipguard.ops.logging import configure_logging, encode_json

try:
    _jsonline: Any = importlib.import_module("sipguard.ops._jsonline")
except ImportError:  # not built: the Python loop is what runs, and is tested alone
    _jsonline = None

Encoder = Callable[[tuple[str, ...], tuple[Any, ...]], str]
ENCODERS: list[Encoder] = [fields_text]
if _jsonline is not None:
    ENCODERS.append(lambda texts, values: _jsonline.fields(texts, values, encode_json))

# every code point, lone surrogates too (a Call-ID's undecodable bytes come as surrogates)
ANY_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                 blacklist_categories=()), max_size=40)
SCALARS = st.one_of(
    st.none(), st.booleans(), ANY_TEXT,
    st.integers(), st.integers(min_value=-(1 << 200), max_value=1 << 200),
    st.floats(allow_nan=True, allow_infinity=True),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.text(max_size=5), SCALARS, max_size=3))


def expected(names: tuple[str, ...], values: tuple[Any, ...]) -> str:
    return "".join(", " + json.dumps(n) + ": " + json.dumps(v)
                   for n, v in zip(names, values, strict=True) if v is not None)


pytestmark = pytest.mark.usefixtures("reset_structlog")


@pytest.mark.parametrize("encode", ENCODERS, ids=["python", "c"][: len(ENCODERS)])
@settings(max_examples=400, deadline=None)
@given(pairs=st.lists(st.tuples(ANY_TEXT, VALUES), max_size=8))
def test_fields_are_what_json_dumps_writes(encode: Encoder, pairs: list[tuple[str, Any]]) -> None:
    keys = LineKeys(*(n for n, _ in pairs))
    values = tuple(v for _, v in pairs)
    assert encode(keys.texts, values) == expected(keys.names, values)


@pytest.mark.parametrize("encode", ENCODERS, ids=["python", "c"][: len(ENCODERS)])
def test_the_edges_of_each_kind_of_value(encode: Encoder) -> None:
    values: tuple[Any, ...] = (
        "", '"\\/\b\f\n\r\t\x00\x1f\x7f', "é€😀", "\udcff", True, False, 0, -1,
        (1 << 63) - 1, -(1 << 63), 1 << 64, 0.0, -0.0, 1.5, 1e300, 5e-324, math.nan, math.inf,
        -math.inf, [1, "a", None], {"k": 1.0}, None, "x" * 5000,
    )
    keys = LineKeys(*(f"k{i}" for i in range(len(values))))
    text = encode(keys.texts, values)
    assert text == expected(keys.names, values)
    assert text.isascii()


@pytest.mark.skipif(_jsonline is None, reason="the C extension is not built")
def test_c_fields_refuses_what_it_cannot_write() -> None:
    keys = LineKeys("a", "b")
    with pytest.raises(ValueError, match="differ in length"):
        _jsonline.fields(keys.texts, (1,), encode_json)
    with pytest.raises(TypeError, match="must return a str"):
        _jsonline.fields(keys.texts, (object(), 1), lambda v: 42)
    with pytest.raises(TypeError):
        _jsonline.fields(list(keys.texts), (1, 2), encode_json)
    with pytest.raises(ZeroDivisionError):  # the fallback's own error goes through
        _jsonline.fields(keys.texts, (object(), 1), lambda v: 1 / 0)


def test_a_line_holds_the_head_the_fields_the_extra_and_the_tail() -> None:
    """line(): logger_name and the configured fields first, then the values in the keys'
    order (None left out), then the extra fields, then event, level and ts — what
    json.dumps gives for the same dict."""
    stream = io.StringIO()
    configure_logging(LogSettings(format="json"), stream=stream, fields={"worker": 1})
    log = CallLogger("sipguard")
    keys = LineKeys("call_id", "peer", "caller", "duration_s")
    log.line("dialog_ended", keys, ("c-1", None, "+12125550100", 1.25),
             {"identity": "valid", "gone": None})
    log.line("dialog_ended", keys, ("c-2", "trunk", None, 0.5))
    first, second = stream.getvalue().splitlines()
    line = json.loads(first)
    assert list(line) == ["logger_name", "worker", "call_id", "caller", "duration_s",
                          "identity", "event", "level", "ts"]
    rest = {k: v for k, v in line.items() if k != "ts"}
    assert first == json.dumps({**rest, "ts": line["ts"]})
    assert rest == {"logger_name": "sipguard", "worker": 1, "call_id": "c-1",
                    "caller": "+12125550100", "duration_s": 1.25, "identity": "valid",
                    "event": "dialog_ended", "level": "info"}
    assert json.loads(second)["peer"] == "trunk"


def test_a_line_through_structlog_has_the_same_fields() -> None:
    """The console format (no JSON sink): line() hands the same fields to structlog."""
    stream = io.StringIO()
    configure_logging(LogSettings(format="console"), stream=stream)
    CallLogger("sipguard").line("invite_decided", LineKeys("call_id", "verdict"),
                                ("c-9", "reject"), {"identity": "invalid"})
    text = stream.getvalue()
    assert "invite_decided" in text and "c-9" in text and "reject" in text
    assert "invalid" in text
