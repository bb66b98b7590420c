"""Tests for structured logging: JSON lines, level filtering, sampled flood logging."""

from __future__ import annotations

import io
import json
import os
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from sipguard.ops.calllog import CallLogger
from sipguard.ops.config import LogSettings
from sipguard.ops.logging import (
    LogWriter,
    SampledLogger,
    close_logs,
    configure_logging,
    flush_logs,
    get_logger,
    log_writer,
)

pytestmark = pytest.mark.usefixtures("reset_structlog")


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_json_lines_carry_ts_level_event_and_fields() -> None:
    """Each log call writes one JSON object with ts (UTC ISO), level, event and the fields."""
    stream = io.StringIO()
    configure_logging(LogSettings(format="json"), stream=stream)
    get_logger("sipguard.test").info("invite_decided", call_id="abc", status=603)
    (line,) = json_lines(stream)
    assert line["event"] == "invite_decided"
    assert line["level"] == "info"
    assert line["call_id"] == "abc" and line["status"] == 603
    assert line["logger_name"] == "sipguard.test"
    assert line["ts"].endswith("Z")
    assert datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).utcoffset() is not None


def test_level_filtering_drops_lower_levels() -> None:
    """With level warning, debug and info are dropped and warning and error are written."""
    stream = io.StringIO()
    configure_logging(LogSettings(level="warning"), stream=stream)
    log = get_logger("t")
    log.debug("dialog_ended")
    log.info("dialog_ended")
    log.warning("parse_error", reason="bad")
    log.error("core_unreachable")
    assert [(x["level"], x["event"]) for x in json_lines(stream)] == [
        ("warning", "parse_error"),
        ("error", "core_unreachable"),
    ]


def test_logger_fetched_before_configuration_uses_it() -> None:
    """A logger made at import time (before configure_logging) follows the configuration."""
    early = get_logger("early")
    stream = io.StringIO()
    configure_logging(LogSettings(level="debug"), stream=stream)
    early.debug("dialog_ended")
    assert json_lines(stream)[0]["event"] == "dialog_ended"


def test_console_format_is_not_json() -> None:
    """The console format writes a readable line with the event name and fields."""
    stream = io.StringIO()
    configure_logging(LogSettings(format="console"), stream=stream)
    get_logger("t").info("dialog_ended", call_id="abc")
    text = stream.getvalue()
    assert "dialog_ended" in text and "call_id=abc" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_console_format_escapes_control_characters_a_peer_chose() -> None:
    """A Call-ID with ESC sequences, BEL, VT, NEL and a line separator is written escaped in
    the console format: it can neither drive the operator's terminal nor start a line."""
    stream = io.StringIO()
    configure_logging(LogSettings(format="console"), stream=stream)
    hostile = "abc\x1b[2J\x1b]0;pwned\x07\x0bFAKE\x85x\u2028y"
    get_logger("t").info("dialog_ended", call_id=hostile)
    text = stream.getvalue()
    assert len(text.splitlines()) == 1
    assert not any(c in text for c in "\x1b\x07\x0b\x85\u2028")
    assert "abc\\x1b[2J" in text and "\\u2028y" in text


def test_sampled_logger_suppresses_and_reports_count() -> None:
    """Within the interval only the first event logs; the next line reports suppressed=N."""
    stream = io.StringIO()
    configure_logging(LogSettings(), stream=stream)
    clock = FakeClock()
    sampled = SampledLogger(get_logger("t"), interval_s=1.0, clock=clock)
    assert sampled.log("warning", "parse_error", key="10.0.0.1", reason="a") is True
    clock.now += 0.5
    assert sampled.log("warning", "parse_error", key="10.0.0.1", reason="b") is False
    assert sampled.log("warning", "parse_error", key="10.0.0.1", reason="c") is False
    clock.now += 0.5
    assert sampled.log("warning", "parse_error", key="10.0.0.1", reason="d") is True
    lines = json_lines(stream)
    assert [(x["reason"], x["suppressed"]) for x in lines] == [("a", 0), ("d", 2)]
    assert lines[1]["level"] == "warning"
    assert sampled.suppressed_total == 2


def test_sampled_logger_keys_are_independent() -> None:
    """Each key has its own window; the default key is the event name."""
    stream = io.StringIO()
    configure_logging(LogSettings(), stream=stream)
    sampled = SampledLogger(get_logger("t"), interval_s=10.0, clock=FakeClock())
    assert sampled.log("info", "parse_error", key="a")
    assert sampled.log("info", "parse_error", key="b")
    assert not sampled.log("info", "parse_error", key="a")
    assert sampled.log("info", "dialog_ended")
    assert not sampled.log("info", "dialog_ended")
    assert len(json_lines(stream)) == 3


def test_sampled_logger_memory_is_bounded() -> None:
    """Past max_keys the longest-quiet key is forgotten, so it logs again at once."""
    stream = io.StringIO()
    configure_logging(LogSettings(), stream=stream)
    sampled = SampledLogger(get_logger("t"), interval_s=10.0, clock=FakeClock(), max_keys=2)
    for key in ("a", "b", "c"):
        assert sampled.log("info", "parse_error", key=key)
    assert not sampled.log("info", "parse_error", key="c")
    assert sampled.log("info", "parse_error", key="a")


def test_sampled_logger_caps_the_lines_of_an_event_whatever_its_keys() -> None:
    """20,000 spoofed sources (a key each) in one interval write max_per_event lines of the
    event, not 20,000; the next interval's first line says how many were held back; another
    event has its own budget."""
    stream = io.StringIO()
    configure_logging(LogSettings(), stream=stream)
    clock = FakeClock()
    sampled = SampledLogger(get_logger("t"), interval_s=1.0, clock=clock, max_per_event=100)
    written = sum(sampled.log("warning", "parse_error", key=f"10.{i >> 8}.{i & 255}.1")
                  for i in range(20_000))
    assert written == 100 and sampled.suppressed_total == 19_900
    assert sampled.log("info", "message_dropped", key="x")
    clock.now += 1.0
    assert sampled.log("warning", "parse_error", key="10.200.0.1")
    lines = json_lines(stream)
    assert len(lines) == 102 and lines[-1]["over_budget"] == 19_900


def test_sampled_logger_flush_reports_what_no_later_line_does() -> None:
    """A key's refusals after its last line are written by the flush once the key has been
    quiet for two intervals (with the fields of the last one), not while it still floods;
    the final flush writes every count at once; nothing is reported twice."""
    stream = io.StringIO()
    configure_logging(LogSettings(), stream=stream)
    clock = FakeClock()
    sampled = SampledLogger(get_logger("t"), interval_s=1.0, clock=clock)
    for i in range(10):
        sampled.log("info", "invite_decided", key="rate:+12125550100", call_id=f"c{i}",
                    caller="+12125550100", rule="rate")
    clock.now += 1.5
    assert sampled.flush() == 0  # the key may still log its next line with suppressed=9
    clock.now += 1.0
    assert sampled.flush() == 1 and sampled.flush() == 0
    summary = json_lines(stream)[-1]
    assert (summary["event"], summary["of"], summary["suppressed"], summary["call_id"]) == \
        ("sampled_suppressed", "invite_decided", 9, "c9")
    assert summary["caller"] == "+12125550100" and summary["level"] == "info"
    for i in range(3):  # logged (the interval is over), then two held back
        sampled.log("info", "invite_decided", key="rate:+12125550100", call_id=f"d{i}")
    assert sampled.flush() == 0
    assert sampled.flush(final=True) == 1 and sampled.flush(final=True) == 0
    lines = json_lines(stream)
    assert [(x["event"], x.get("call_id"), x["suppressed"]) for x in lines] == [
        ("invite_decided", "c0", 0), ("sampled_suppressed", "c9", 9),
        ("invite_decided", "d0", 0), ("sampled_suppressed", "d2", 2)]


def test_sampled_logger_accounts_for_every_event_after_a_final_flush() -> None:
    """Many keys, a small table and a small per-event budget: the event's lines, their
    suppressed / over_budget and the sampled_suppressed lines' counts add up to every event
    given, forgotten keys and over-budget ones included; the pending table stays bounded."""
    stream = io.StringIO()
    configure_logging(LogSettings(), stream=stream)
    clock = FakeClock()
    sampled = SampledLogger(get_logger("t"), interval_s=1.0, clock=clock, max_keys=8,
                            max_per_event=5)
    given = 0
    for step in range(400):
        for key in (step % 13, step % 29, "hot"):
            sampled.log("info", "invite_decided", key=f"k{key}")
            given += 1
        clock.now += 0.05
        if step % 40 == 0:
            sampled.flush()
        assert len(sampled._pending) <= 8 and len(sampled._keys) <= 8
    sampled.flush(final=True)
    counted = 0
    for line in json_lines(stream):
        counted += (line["event"] == "invite_decided") + line.get("suppressed", 0) \
            + line.get("over_budget", 0) + line.get("forgotten", 0)
    assert counted == given
    assert any(x.get("forgotten") for x in json_lines(stream))
    assert any(x.get("over_budget") for x in json_lines(stream))


def test_call_logger_writes_the_same_line_as_structlog() -> None:
    """The per-call fast path writes the fields, logger_name, event, level and ts structlog
    would, with None fields left out, and a timestamp in the same format."""
    stream = io.StringIO()
    configure_logging(LogSettings(format="json"), stream=stream)
    get_logger("sipguard").info("dialog_ended", call_id="c1", peer=None, duration_s=1.5)
    CallLogger("sipguard").info("dialog_ended", call_id="c1", peer=None, duration_s=1.5)
    slow, fast = json_lines(stream)
    assert slow.keys() == fast.keys()
    assert {k: v for k, v in fast.items() if k != "ts"} == {
        k: v for k, v in slow.items() if k != "ts"
    }
    assert len(fast["ts"]) == len(slow["ts"]) and fast["ts"].endswith("Z")
    parsed = datetime.fromisoformat(fast["ts"].replace("Z", "+00:00"))
    assert abs(parsed.timestamp() - datetime.fromisoformat(
        slow["ts"].replace("Z", "+00:00")).timestamp()) < 5


def test_call_logger_follows_level_and_console_format() -> None:
    """Level warning silences the per-call lines; the console format goes through structlog."""
    stream = io.StringIO()
    configure_logging(LogSettings(level="warning"), stream=stream)
    CallLogger("sipguard").info("invite_decided", call_id="c2")
    assert stream.getvalue() == ""
    configure_logging(LogSettings(format="console"), stream=stream)
    CallLogger("sipguard").info("invite_decided", call_id="c3")
    text = stream.getvalue()
    assert "invite_decided" in text and "c3" in text and not text.startswith("{")


def test_batched_lines_wait_for_flush_and_keep_their_order() -> None:
    """With batch=True nothing is written until flush_logs; structlog lines and per-call lines
    come out in the order they were logged."""
    stream = io.StringIO()
    configure_logging(LogSettings(), stream=stream, batch=True)
    get_logger("sipguard").warning("first")
    CallLogger("sipguard").info("second", call_id="c4")
    get_logger("sipguard").info("third")
    assert stream.getvalue() == ""
    flush_logs()
    assert [x["event"] for x in json_lines(stream)] == ["first", "second", "third"]


def test_a_line_the_stream_cannot_encode_is_escaped_and_the_writer_goes_on() -> None:
    """Console format, a Call-ID holding byte 0xFF (a surrogate escape): the line is written
    with a backslash escape, and the lines after it are written too."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    configure_logging(LogSettings(format="console"), stream, batch=True)
    log = get_logger("t")
    log.info("invite_decided", call_id=b"bad\xff".decode("utf-8", "surrogateescape"))
    flush_logs()
    log.info("after")
    flush_logs()
    text = raw.getvalue().decode("utf-8")
    assert "bad\\udcff" in text and "after" in text


def test_line_encoder_is_json_encoders_output() -> None:
    """The log lines' encoder (the C encoder, built once) writes what
    ``json.JSONEncoder(default=repr, check_circular=False).encode`` would: ASCII with escapes,
    bytes kept from the wire as surrogates, floats, nested values, and repr() for the rest."""
    from sipguard.ops.logging import encode_json

    reference = json.JSONEncoder(default=repr, check_circular=False).encode
    samples: list[Any] = [
        {"event": "invite_decided", "decision_us": 1.3, "n": 3, "ok": True, "none": None},
        {"caller": "+12125550003", "detail": {"why": ["a", "b"], "x": 1e-7}},
        {"call_id": "abc\udcff\udcfe@h", "text": "é \u2028 \" \\ \n \t"},
        {"weird": object.__new__(type("Odd", (), {"__repr__": lambda self: "<odd>"}))},
        {"nan": float("nan"), "inf": float("inf"), "big": 10**30},
    ]
    for sample in samples:
        assert encode_json(sample) == reference(sample)
        assert json.loads(encode_json(sample)) is not None


def test_call_logger_line_is_the_text_json_dumps_gives() -> None:
    """The per-call line is built by hand (strings, numbers and booleans without the encoder):
    its text is exactly json.dumps of the line's fields, for every kind of value."""
    import enum

    class Status(enum.IntEnum):
        OK = 200

    stream = io.StringIO()
    configure_logging(LogSettings(format="json"), stream=stream, fields={"worker": 1})
    values: dict[str, Any] = {
        "plain": "abc", "quote": 'a"b\\c', "control": "a\r\nb\x00\x7f", "unicode": "Zoë ☎ 𝄞",
        "surrogate": "bad\udcff", "int": -42, "big": 10**30, "enum": Status.OK, "true": True,
        "false": False, "float": 123.456, "tiny": 1e-7, "huge": 1e300, "nan": float("nan"),
        "inf": float("inf"), "ninf": float("-inf"), "list": ["+1", 2, None],
        "dict": {"a": [1, {"b": "c"}], "n": None}, "tuple": ("x", 1), "none": None,
        "object": object,
    }
    logger = CallLogger("sipguard")
    logger.info("invite_decided", **values)
    logger.info("dialog_ended", worker=2, call_id="c5")
    first, second = stream.getvalue().splitlines()
    ts = json.loads(first)["ts"]
    expected = {"logger_name": "sipguard", "worker": 1,
                **{k: v for k, v in values.items() if v is not None},
                "event": "invite_decided", "level": "info", "ts": ts}
    assert first == json.dumps(expected, default=repr)
    ts = json.loads(second)["ts"]
    assert second == json.dumps({"logger_name": "sipguard", "worker": 2, "call_id": "c5",
                                 "event": "dialog_ended", "level": "info", "ts": ts})


# --------------------------------------------------------------------------- the writer thread


@contextmanager
def piped_writer(max_bytes: int) -> Iterator[tuple[int, LogWriter]]:
    """A LogWriter on a real pipe: (the read end, the writer); both closed afterwards."""
    r, w = os.pipe()
    writer = LogWriter(w, max_bytes)
    try:
        yield r, writer
    finally:
        writer.close(1.0)
        os.close(r)
        os.close(w)


def _drain(fd: int, writer: LogWriter, seconds: float = 5.0) -> bytes:
    """Everything the writer has queued, read from the pipe until its queue is empty and the
    pipe has nothing more."""
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            got += os.read(fd, 1 << 16)
        elif writer.queued_bytes == 0:
            break
    return got


def test_writer_thread_writes_batches_in_order_to_a_pipe() -> None:
    with piped_writer(1 << 20) as (r, writer):
        for i in range(50):
            assert writer.put(f"line {i}\n", 1)
        got = _drain(r, writer)
        assert got.decode().splitlines() == [f"line {i}" for i in range(50)]
        assert writer.take_dropped() == 0


def test_a_reader_that_stops_costs_counted_lines_never_a_blocked_caller() -> None:
    """Nobody reads the pipe: once it (64 KiB) and the queue (max_bytes) are full, put()
    drops lines and counts them, at once; when the reader comes back, every line not counted
    arrives, whole and in order."""
    line = "x" * 99 + "\n"  # 100 bytes
    with piped_writer(65536) as (r, writer):
        start = time.monotonic()
        fitted = [writer.put(line * 10, 10) for _ in range(400)]  # 400 KB offered
        assert time.monotonic() - start < 1.0, "put() never waits for the reader"
        assert fitted[0] and not all(fitted)
        dropped = writer.take_dropped()
        assert writer.queued_bytes <= 65536
        got = _drain(r, writer)
        assert got == line.encode() * (len(got) // 100)
        assert dropped > 0 and len(got) // 100 + dropped == 4000
        assert writer.take_dropped() == 0
        assert writer.report_due() == dropped  # the queue has room again: time to tell
        assert writer.report_due() == 0  # told once


def test_a_batch_larger_than_the_queue_keeps_its_first_lines() -> None:
    with piped_writer(65536) as (r, writer):
        text = "".join(f"{i:09d}\n" for i in range(20_000))  # 200 KB, one batch
        assert not writer.put(text, 20_000)
        got = _drain(r, writer).decode().splitlines()
        assert got == [f"{i:09d}" for i in range(len(got))] and 6000 <= len(got) <= 6554
        assert writer.take_dropped() == 20_000 - len(got)


def test_a_reader_gone_counts_the_lines_and_close_does_not_hang() -> None:
    r, w = os.pipe()
    writer = LogWriter(w, 1 << 20)
    os.close(r)  # the reader is gone: EPIPE (Python ignores SIGPIPE)
    try:
        assert writer.put("a\nb\nc\n", 3)
        deadline = time.monotonic() + 5
        dropped = 0
        while dropped < 3 and time.monotonic() < deadline:
            dropped += writer.take_dropped()
            time.sleep(0.01)
        assert dropped == 3
    finally:
        start = time.monotonic()
        writer.close(1.0)
        assert time.monotonic() - start < 1.5
        os.close(w)


def test_close_gives_up_on_a_reader_that_never_reads() -> None:
    r, w = os.pipe()
    writer = LogWriter(w, 1 << 20)
    try:
        writer.put("y" * 200_000, 1)  # more than the pipe holds: the thread waits in write
        start = time.monotonic()
        writer.close(0.3)
        assert time.monotonic() - start < 1.0
    finally:
        os.close(r)  # the thread's write fails now, and it ends
        os.close(w)


def test_run_mode_logging_goes_through_the_writer_thread(tmp_path: Path) -> None:
    """configure_logging(batch=True) on a stream with a descriptor: lines reach the file
    through the thread, in order, once flushed."""
    path = tmp_path / "out.log"
    with open(path, "w", encoding="utf-8") as out:
        configure_logging(LogSettings(), stream=out, batch=True)
        writer = log_writer()
        assert writer is not None
        log = get_logger("t")
        for i in range(5):
            log.info("numbered", i=i)
        close_logs(2.0)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["i"] for x in lines] == list(range(5))
