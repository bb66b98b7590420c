"""Structured logging: one event per line, JSON for machines or console for people.

Every line carries ``ts`` (ISO 8601 UTC), ``level``, ``event`` and the event's fields. Event names
are snake_case verbs in the past tense (``invite_decided``, ``dialog_ended``, ``parse_error``)::

    log = get_logger(__name__)
    log.info("invite_decided", call_id=cid, verdict="reject", status=603)

Level filtering is built into the logger class (``structlog.make_filtering_bound_logger``): a
call below the configured level returns at once, so ``log.debug(...)`` on a hot path costs only
the call. Loggers are cached on first use, so call :func:`configure_logging` once at start-up,
before logging; a changed ``log:`` section takes effect on restart.

:class:`SampledLogger` keeps a flood of one kind of event (parse errors from one source, say)
down to one line per interval, counting what it drops.

With ``batch=True`` (``sipguard run``) the lines leave from a thread (:class:`LogWriter`): the
event loop never waits for the reader of its log, and a reader that stops costs dropped,
counted lines instead of stopped calls.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import select
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping, MutableMapping
from typing import Any, Final, Literal, TextIO, cast

import structlog
from structlog.typing import FilteringBoundLogger, Processor

from sipguard.ops.config import LogSettings

__all__ = [
    "LineBatch",
    "LineWriter",
    "LogWriter",
    "close_logs",
    "SampledLogger",
    "call_line_sink",
    "configure_logging",
    "encode_json",
    "flush_logs",
    "get_logger",
    "log_writer",
]

Level = Literal["debug", "info", "warning", "error"]

_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class LogWriter:
    """Log text written to a file descriptor (stdout's) by a thread beside the event loop.

    A write to a pipe blocks once the pipe's 64 KiB are full: a reader of sipguard's log —
    journald, a container runtime, a log shipper — that falls behind or stops would otherwise
    stop the event loop at its next flush, and with it every call. Here the loop only queues
    the encoded text; the thread writes it (the GIL is released while it waits). The queue
    holds ``max_bytes`` at most (``log.queue_bytes``): of a batch that does not fit, the first
    lines that do are queued and the others dropped and counted, as are lines a write fails
    on (the reader gone). The server
    collects the count (:meth:`take_dropped`) into ``log_lines_dropped`` and says so in a
    warning line once the queue has room again. :meth:`close` waits for the queue to drain,
    ``timeout`` seconds at most.
    """

    def __init__(self, fd: int, max_bytes: int, encoding: str = "utf-8") -> None:
        self.fd = fd
        self.max_bytes = max_bytes
        self._encoding = encoding
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[tuple[bytes, int]] = deque()  # (text, its lines)
        self._queued = 0  # bytes in _queue and in the thread's hands
        self._dropped = 0  # lines dropped since the last take_dropped()
        self._untold = 0  # lines taken by take_dropped() no warning has told of (report_due)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="sipguard-log", daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def put(self, text: str | bytes, lines: int) -> bool:
        """Queue ``text`` (``lines`` whole lines; bytes are written as they are) for the
        thread; False when not all of it fit: the first lines that fit are queued, the others
        dropped and counted."""
        data = text if isinstance(text, bytes) else text.encode(self._encoding, "backslashreplace")
        with self._cond:
            room = 0 if self._closing else self.max_bytes - self._queued
            fits = len(data) <= room
            if not fits:
                cut = data.rfind(b"\n", 0, max(room, 0)) + 1  # whole lines only
                kept = data.count(b"\n", 0, cut)
                self._dropped += lines - kept
                data, lines = data[:cut], kept
            if data:
                self._queue.append((data, lines))
                self._queued += len(data)
                self._cond.notify()
        return fits

    def take_dropped(self) -> int:
        """Lines dropped since the last call (they also wait for :meth:`report_due`)."""
        with self._cond:
            n, self._dropped = self._dropped, 0
        self._untold += n
        return n

    def report_due(self) -> int:
        """Lines dropped (as :meth:`take_dropped` found them) that no warning has told of yet,
        once the queue has room again (half empty) — the reader is catching up, so a warning
        now is likely read; 0 before that, or when there is nothing to tell."""
        if not self._untold or self._queued > self.max_bytes // 2:
            return 0
        n, self._untold = self._untold, 0
        return n

    def wait_room(self, timeout: float) -> bool:
        """Wait (``timeout`` seconds at most) until the queue is half empty: before a line that
        must not be dropped for a full queue (the last one, at exit). True when there is room."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queued > self.max_bytes // 2:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Write out what is queued (``timeout`` seconds at most: a reader that does not read
        cannot hold up the exit), then end the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing, everything written
                batch = list(self._queue)
                self._queue.clear()
            for data, lines in batch:
                written = self._write_all(data)
                with self._cond:
                    self._queued -= len(data)
                    if not written:
                        self._dropped += lines
                    self._cond.notify_all()  # (wait_room)

    def _write_all(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except BlockingIOError:  # a non-blocking descriptor (another process set it)
                select.select([], [self.fd], [], 1.0)
                continue
            except OSError:  # EPIPE (the reader is gone), EBADF: these lines are lost
                return False
            view = view[n:]
        return True


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):  # StringIO and the like
        return None


class LineBatch:
    """Log lines waiting for the next :func:`flush_logs`: one write per flush, not per line.

    Every line goes through here in order (structlog's and the per-call lines of
    :class:`sipguard.ops.calllog.CallLogger` alike), so batching never reorders them. More than
    ``limit`` waiting lines are written at once, so a late flush cannot grow memory. With a
    ``writer`` the lines go to its thread; without, straight to ``stream``.
    """

    __slots__ = ("_stream", "_lines", "_limit", "writer")

    def __init__(self, stream: TextIO, limit: int = 1024,
                 writer: LogWriter | None = None) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._limit = limit
        self.writer = writer

    def add(self, line: str) -> None:
        lines = self._lines
        lines.append(line)
        if len(lines) >= self._limit:
            self.write_out()

    def write_out(self) -> None:
        if self._lines:
            text = "\n".join(self._lines) + "\n"
            n = len(self._lines)
            self._lines.clear()  # first: a line that cannot be written is never retried
            if self.writer is not None:
                self.writer.put(text, n)
            else:
                _write(self._stream, text)


class LineWriter:
    """structlog's output: one line per event, never a flush per line.

    structlog's own WriteLogger flushes after every line — a system call per log line, which
    costs more than the rest of the line on the hot path. With a :class:`LineBatch` (what
    ``sipguard run`` uses) lines wait in it; without one they are written to the stream's
    buffer at once. Either way :func:`flush_logs` (the server calls it every 100 ms and at
    shut-down) writes them out.
    """

    __slots__ = ("_add",)

    def __init__(self, stream: TextIO, batch: LineBatch | None = None) -> None:
        self._add = batch.add if batch is not None else _line_writer(stream)

    def msg(self, message: str) -> None:
        self._add(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _line_writer(stream: TextIO) -> Callable[[str], None]:
    def add(line: str) -> None:
        _write(stream, line + "\n")

    return add


def _write(stream: TextIO, text: str) -> None:
    """Write ``text``; bytes the stream cannot encode (a Call-ID holding 0xFF, kept as a
    surrogate escape, in the console format) are written as backslash escapes instead of
    stopping the writer."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "utf-8"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))


_streams: list[TextIO] = []
_fields: dict[str, Any] = {}  # on every line (configure_logging's ``fields``)
_batches: list[LineBatch] = []
_settings: list[LogSettings] = []  # the configuration in force (empty before configure_logging)


def _add_fields(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in _fields.items():
        event_dict.setdefault(key, value)
    return event_dict


def flush_logs() -> None:
    """Write out waiting and buffered log lines (to the writer thread's queue, with one)."""
    for batch in _batches:
        batch.write_out()
    for stream in _streams:
        stream.flush()


def log_writer() -> LogWriter | None:
    """The thread writing the log (``sipguard run``), or None (lines written in place)."""
    return _batches[0].writer if _batches else None


def close_logs(timeout: float = 2.0) -> None:
    """At exit: flush, and give the writer thread ``timeout`` seconds to write out its queue."""
    flush_logs()
    writer = log_writer()
    if writer is not None:
        writer.close(timeout)


def _json_encoder() -> Callable[[Any], str]:
    """A value as JSON text: ``json.JSONEncoder(default=repr, check_circular=False).encode``
    without the Python around its C encoder, which ``encode`` builds anew for every object."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the C accelerator
        return json.JSONEncoder(default=repr, check_circular=False).encode
    # markers (None: no circular check), default, string encoder, indent, separators,
    # sort_keys, skipkeys, allow_nan: JSONEncoder's defaults
    encoder = make(None, repr, json.encoder.encode_basestring_ascii, None, ": ", ", ", False,
                   False, True)

    def encode(obj: Any) -> str:
        return "".join(encoder(obj, 0))

    return encode


encode_json = _json_encoder()  # structlog's lines, and the nested values of the per-call lines


def render_json(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> str:
    """The event as one JSON object, fields that are None left out (shorter lines, and about
    twice as fast as structlog's JSONRenderer, which builds an encoder per line)."""
    return encode_json({k: v for k, v in event_dict.items() if v is not None})


def configure_logging(
    settings: LogSettings, stream: TextIO | None = None, *, batch: bool = False,
    fields: Mapping[str, Any] | None = None,
) -> None:
    """Send log lines to ``stream`` (default: ``sys.stdout`` at call time) per ``settings``.

    ``batch=True`` keeps lines in a :class:`LineBatch` until :func:`flush_logs` (the server
    flushes every 100 ms), which hands them to a :class:`LogWriter` thread when the stream has
    a file descriptor (``settings.queue_bytes`` queued at most); otherwise each line goes to
    the stream's buffer at once. ``fields`` go on every line (``worker=i`` in a worker process).
    """
    out = sys.stdout if stream is None else stream
    for old in _batches:  # configured again (tests): the old thread ends
        if old.writer is not None:
            old.writer.close(0.5)
    lines = None
    if batch:
        fd = _fileno(out)
        writer = None
        if fd is not None:
            out.flush()  # what was written before goes first
            writer = LogWriter(fd, settings.queue_bytes,
                               getattr(out, "encoding", None) or "utf-8")
        lines = LineBatch(out, writer=writer)
    _streams[:] = [out]
    _batches[:] = [lines] if lines is not None else []
    _settings[:] = [settings]
    _fields.clear()
    _fields.update(fields or {})
    processors: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    if _fields:
        processors.insert(0, _add_fields)
    if settings.format == "json":
        processors += [structlog.processors.format_exc_info, render_json]
    else:
        colors = bool(getattr(out, "isatty", lambda: False)())
        processors += [_escape_controls,
                       structlog.dev.ConsoleRenderer(colors=colors, timestamp_key="ts")]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.level]),
        logger_factory=lambda *args: LineWriter(out, lines),
        cache_logger_on_first_use=True,
    )


# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators: what a
# terminal acts on or a line-splitting reader takes for a new line.
_CONTROLS: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_controls(_logger: Any, _method: str,
                     event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The console format's guard (JSON escapes them itself): every control character in a
    string value written as an escape, so a Call-ID or header a peer chose can neither drive
    the operator's terminal (ESC sequences) nor start a line of its own."""
    for key, value in event.items():
        if isinstance(value, str) and _CONTROLS.search(value) is not None:
            event[key] = _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}"
                                       if ord(m.group()) < 0x100
                                       else f"\\u{ord(m.group()):04x}", value)
    return event


def get_logger(name: str) -> FilteringBoundLogger:
    """A logger whose lines carry ``logger_name=name`` (pass the module's ``__name__``).

    Safe to call at import time: before :func:`configure_logging` it returns a lazy proxy that
    takes the configuration on first use (about 1 µs a call extra); after, a bound logger with
    no proxy, so objects built at start-up should fetch theirs in ``__init__``.
    """
    logger = structlog.get_logger(logger_name=name)
    return cast(FilteringBoundLogger, logger.bind() if structlog.is_configured() else logger)


class SampledLogger:
    """Logs at most one line per ``interval_s`` per key; the rest are only counted.

    The line that does get logged carries ``suppressed=N``: events of that key dropped since the
    key's previous line. ``clock`` returns seconds (``time.monotonic`` by default; tests pass a
    fake). At most ``max_keys`` keys are remembered, so a flood of distinct keys (spoofed
    sources) cannot grow memory; the longest-quiet key is forgotten first. Nor can it grow the
    log: one event writes at most ``max_per_event`` lines per interval whatever its keys, and
    its next line says how many it held back (``over_budget=N``).

    What no later line of its own reports — a key's events after its last line, an event's
    over-budget count with no line of it since, the pending count of a forgotten key — is
    reported by :meth:`flush` (the server calls it every interval, and with ``final`` at the
    stop) as a ``sampled_suppressed`` line: ``of`` (the event), ``suppressed=N`` and the fields
    of the last one held back for a key; ``over_budget=N`` / ``forgotten=N`` for an event.
    So every event is in the log: a line of its own, or counted in a later one.
    """

    def __init__(
        self,
        logger: FilteringBoundLogger,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
        max_per_event: int = 100,
    ) -> None:
        self._logger = logger
        self._interval = interval_s
        self._clock = clock
        self._max_keys = max_keys
        self._max_per_event = max_per_event
        # key -> (last logged, dropped since, the last dropped: its level, event and fields;
        # None while none is), least recently logged first
        self._keys: OrderedDict[
            Hashable, tuple[float, int, tuple[Level, str, dict[str, Any]] | None]
        ] = OrderedDict()
        # the keys with events dropped since their last line (a subset of _keys)
        self._pending: dict[Hashable, None] = {}
        # event name -> (start of its interval, lines in it, dropped over the budget since its
        # last line): the names are the code's, a fixed few
        self._budget: dict[str, tuple[float, int, int]] = {}
        # event name -> (level, dropped events of the keys forgotten with a pending count)
        self._forgotten: dict[str, tuple[Level, int]] = {}
        self._levels: dict[str, Level] = {}  # event name -> the level it was last logged at
        self.suppressed_total = 0
        """Events dropped by sampling since this logger was made."""

    @property
    def interval_s(self) -> float:
        return self._interval

    def log(self, level: Level, event: str, /, key: Hashable = None, **fields: Any) -> bool:
        """Log ``event`` unless ``key`` (default: the event name) logged within the interval.

        Returns whether a line was written.
        """
        key = event if key is None else key
        now = self._clock()
        last = self._keys.get(key)
        if last is not None and now - last[0] < self._interval:
            self._keys[key] = (last[0], last[1] + 1, (level, event, fields))
            self._pending[key] = None
            self.suppressed_total += 1
            return False
        # Every key new (spoofed sources: one key each) would still be a line per message: at
        # most max_per_event lines of one event per interval, the rest counted and reported
        # on its next line (over_budget=N).
        self._levels[event] = level
        start, lines, over = self._budget.get(event, (now, 0, 0))
        if now - start >= self._interval:
            start, lines = now, 0
        if lines >= self._max_per_event:
            self._budget[event] = (start, lines, over + 1)
            self.suppressed_total += 1
            return False
        self._budget[event] = (start, lines + 1, 0)
        keys = self._keys
        keys[key] = (now, 0, None)
        keys.move_to_end(key)  # least recently logged first
        self._pending.pop(key, None)
        if len(keys) > self._max_keys:
            gone, (_, dropped, held) = keys.popitem(last=False)  # O(1), unlike a dict's first
            if dropped and held is not None:
                # its count would be lost with it: reported by the next flush, per event
                self._pending.pop(gone, None)
                was = self._forgotten.get(held[1], (held[0], 0))[1]
                self._forgotten[held[1]] = (held[0], was + dropped)
        if over:
            fields["over_budget"] = over
        getattr(self._logger, level)(event, suppressed=0 if last is None else last[1], **fields)
        return True

    def flush(self, final: bool = False) -> int:
        """Write a ``sampled_suppressed`` line for each count no later line of its own has
        reported (see the class): a key's, once it has had no line for two intervals (a key
        still flooding gets its next line with ``suppressed=N`` instead); an event's
        over-budget count once its interval is over; the forgotten keys' counts. ``final``
        (at the stop): every count now. The lines written."""
        now = self._clock()
        wait = 2 * self._interval
        written = 0
        keys = self._keys
        for key in list(self._pending):
            last, dropped, held = keys[key]
            if not final and now - last < wait:
                continue
            del self._pending[key]
            keys[key] = (last, 0, None)
            if dropped and held is not None:
                level, event, fields = held
                getattr(self._logger, level)("sampled_suppressed", of=event, suppressed=dropped,
                                             **fields)
                written += 1
        events = sorted(set(self._forgotten) | {e for e, b in self._budget.items() if b[2]})
        for event in events:
            extra: dict[str, int] = {}
            start, lines, over = self._budget.get(event, (now, 0, 0))
            if over and (final or now - start >= self._interval):
                extra["over_budget"] = over
                self._budget[event] = (start, lines, 0)
            level, forgotten = self._forgotten.pop(event, (self._levels.get(event, "info"), 0))
            if forgotten:
                extra["forgotten"] = forgotten
            if extra:
                getattr(self._logger, self._levels.get(event, level))(
                    "sampled_suppressed", of=event, **extra)
                written += 1
        return written


def call_line_sink() -> tuple[Callable[[str], None] | None, bool, dict[str, Any]]:
    """Where :class:`sipguard.ops.calllog.CallLogger` writes its lines, per the configuration in
    force: (the line adder, None where lines go through structlog — console format, or not yet
    configured; whether info lines are written; the fields every line carries)."""
    settings = _settings[0] if _settings else None
    enabled = settings is None or _LEVELS[settings.level] <= logging.INFO
    add: Callable[[str], None] | None = None
    if settings is not None and settings.format == "json":
        add = _batches[0].add if _batches else _line_writer(_streams[0])
    return add, enabled, _fields
