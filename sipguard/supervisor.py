"""Several worker processes on one host: ``sipguard run`` with ``workers: N`` (N > 1).

The process started by the operator is the supervisor. It handles no SIP itself: it checks
that no other process holds a public listen address (:func:`check_ports_free`), starts N
workers, each ``python -m sipguard run ... --workers N --worker-index i`` (the same command
line, so the same config file and flags; a worker starts from the config the group runs,
:data:`CONFIG_START` and :data:`CONFIG_APPLIED` in the workers' directory — see
``cli.ConfigSource``), and then only watches them:

- every worker binds the public ``listen`` addresses with SO_REUSEPORT and a port of its own
  per listener (``Config.worker_port``; see ``server.proxy_settings`` and
  docs/architecture.md, "Several worker processes on one host");
- SIGTERM / SIGINT are passed to every worker (graceful drain; a second one, passed on too,
  stops them at once); once every other worker has exited, worker 0 (the documented admin
  port, which waits for it once drained) hears ``drained``; SIGHUP is passed to every worker
  (each reloads the config file; one still starting gets it once ready);
- a worker that exits while no stop was asked for is started again, after 1 s, doubling up
  to 30 s while it keeps failing within a minute of its start (``worker_exited``,
  ``worker_restarted``, counted in ``restarts``);
- a worker sends ``alive`` on its link every second from its event loop; one silent for
  ``worker_hang_timeout_s`` (10 s; stopped with SIGSTOP, stuck in a loop, swapped out: its
  share of the calls would go unanswered while it looks alive) is killed with SIGKILL
  (``worker_hung``) and started again as one that died;
- the supervisor exits once every worker has exited after a stop: 0 when all exited 0. When a
  worker cannot start at first (a port in use, a bad config), the others are stopped and the
  supervisor exits with that worker's code (1 or 2), as a single process would.

Each worker has one end of a socket pair with the supervisor (``--supervisor-fd``): it writes
``ready`` there once its listeners are up, and it drains and exits when the supervisor's end
closes (the supervisor was killed), so no worker outlives it. A worker that reloaded the config
file on an operator's request (``sipguard reload``, ``POST /reload`` on its admin API) writes
``reload`` there: the supervisor passes SIGHUP to every other worker, so no worker keeps
deciding calls on the rules the operator just replaced. When the supervisor's stdout is
a regular file (or /dev/null) the workers write to it themselves: the kernel appends each
write() whole (one file position, updated atomically), and a worker writes whole lines only.
Otherwise (a pipe, a socket, a terminal) the workers' stdout goes through
the supervisor, which writes whole lines only: the log lines of N processes never interleave
mid-line. Its writes, like every process's log, leave from a thread
(:class:`sipguard.ops.logging.LogWriter`): a reader of its stdout that stops costs dropped
lines (``log.queue_bytes``; a ``log_lines_dropped`` warning once it catches up), never the
supervisor's loop — signals, restarts and reloads passed on go on. Workers run in their own
session, so a terminal's Ctrl-C reaches the supervisor only, which passes it on once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sipguard.ops.logging import flush_logs, get_logger, log_writer

READY = b"ready\n"
RELOAD = b"reload\n"  # a worker reloaded on an operator's request: reload the others
# to worker 0, during a stop: every other worker has exited (it drained meanwhile, its admin
# API up, answering /readyz 503 and /metrics for the whole group)
DRAINED = b"drained\n"
ALIVE = b"alive\n"  # a worker's heartbeat, sent from its event loop
HEARTBEAT_S = 1.0  # ... this often
SEGMENT_NAME = "state"  # state.backend shared_memory: the segment, in the workers' directory
# the config the workers run, in the workers' directory (a restarted worker starts from these,
# not from the file as it is on disk now): the text loaded at the start, and the text of the
# last reload that applied (its keys that need a restart keep the start's values)
CONFIG_START = "config.yaml"
CONFIG_APPLIED = "config.reloaded.yaml"
# the workers' suspensions folder when state_dir is unset (see docs/architecture.md)
STATE_DIR_NAME = "suspensions"
RESTART_FIRST_S = 1.0  # a worker that died is started again after this
RESTART_MAX_S = 30.0  # ... doubling while it keeps dying, up to this
STABLE_S = 60.0  # a worker up this long that dies starts from RESTART_FIRST_S again
RELAY_CHUNK = 65536

Command = Callable[[int, int], Sequence[str]]  # (worker index, its socket fd) -> argv


@dataclass(slots=True)
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    link: socket.socket | None = None
    started: float = 0.0
    ready: bool = False
    restarts: int = 0
    failures: int = 0  # exits in a row within STABLE_S of their start
    relay: asyncio.Task[None] | None = None
    listen: asyncio.Task[None] | None = None  # what it asks once ready (``RELOAD``)
    seen: float = 0.0  # when its last line (a heartbeat) came
    watched: bool = False  # ready and its link open: its heartbeats are expected
    hung: int = 0  # times it was killed for silence
    hup_due: bool = False  # a reload was asked while it was starting: SIGHUP once it is ready


class Supervisor:
    """Starts ``count`` workers with ``command`` and keeps them running until told to stop."""

    def __init__(self, count: int, command: Command, hang_timeout_s: float = 10.0,
                 on_started: Callable[[], None] | None = None) -> None:
        self.count = count
        self.on_started = on_started  # called once every worker is up (or the start failed)
        self.command = command
        self.hang_timeout_s = hang_timeout_s  # 0: never
        self.workers = [Worker(i) for i in range(count)]
        self.log = get_logger("sipguard.supervisor")
        self.stopping = False
        self.signals = 0  # stop signals received
        self.failed_start: int | None = None  # exit code of a worker that could not start
        self._wake = asyncio.Event()  # a stop was asked for: restarts waiting give up
        self._out = sys.stdout.buffer
        # the workers write to our stdout themselves (a file): no relay (~5 % of the CPU of
        # 2 workers at 2,000 calls/s went to copying their log lines)
        self.shared_stdout = stdout_is_shareable()

    # ------------------------------------------------------------------ logging
    def _note(self, level: str, event: str, **fields: object) -> None:
        getattr(self.log, level)(event, **fields)
        with contextlib.suppress(OSError, ValueError):
            flush_logs()

    def _write(self, data: bytes) -> None:
        writer = log_writer()
        if writer is None:
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()  # our own lines first, in order
                self._out.write(data)
                self._out.flush()
            return
        # Through the log writer's thread, like our own lines: a reader of our stdout that
        # stops costs dropped lines, never the supervisor's loop (signals, restarts, reloads
        # passed on), and the workers' pipes keep draining.
        flush_logs()  # our own lines first, in order
        writer.put(data, data.count(b"\n"))
        writer.take_dropped()
        untold = writer.report_due()
        if untold:
            self._note("warning", "log_lines_dropped", count=untold, queue_bytes=writer.max_bytes)

    async def _relay(self, stream: asyncio.StreamReader) -> None:
        """Copy a worker's stdout to ours, whole lines only."""
        pending = b""
        while True:
            chunk = await stream.read(RELAY_CHUNK)
            if not chunk:
                break
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if cut:
                self._write(pending[:cut])
                pending = pending[cut:]
        if pending:
            self._write(pending + b"\n")

    # ------------------------------------------------------------------ one worker
    async def _start(self, w: Worker) -> bool:
        """Start worker ``w``; True once it reports ready, False when it exited first."""
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(w.index, theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=None if self.shared_stdout else asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),), start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            self._note("error", "worker_start_failed", worker=w.index, error=str(exc))
            return False
        finally:
            theirs.close()
        w.proc, w.link, w.started, w.ready = proc, ours, time.monotonic(), False
        if proc.stdout is not None:
            w.relay = asyncio.get_running_loop().create_task(self._relay(proc.stdout))
        else:
            sys.stdout.flush()  # our lines so far before theirs
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        line = b""
        with contextlib.suppress(OSError):
            while b"\n" not in line and len(line) < 64:
                got = await loop.sock_recv(ours, 64)
                if not got:
                    break
                line += got
        first, _, rest = line.partition(b"\n")  # a heartbeat may come in the same read
        w.ready = first + b"\n" == READY
        if not w.ready:
            await proc.wait()  # it closed its end on its way out: let it finish
        else:
            w.seen, w.watched = time.monotonic(), True
            w.listen = loop.create_task(self._listen(w, ours, rest))
            if w.hup_due and not self.stopping:
                # a reload the others took while it started (it may have started from the
                # config before that reload): it reads the file as they did
                w.hup_due = False
                self._forward(signal.SIGHUP, [w])
        return w.ready

    async def _listen(self, w: Worker, sock: socket.socket, got: bytes = b"") -> None:
        """Worker ``w``'s heartbeats and requests, a line each, until its end closes (``got``:
        what came in the read of its ready line); an unknown line is logged and ignored. At
        most 64 bytes are held for a line."""
        loop = asyncio.get_running_loop()
        pending = b""
        try:
            while True:
                if got:
                    w.seen = time.monotonic()
                    pending += got
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        if line + b"\n" == ALIVE:
                            continue
                        if line + b"\n" == RELOAD:
                            self._reload_others(w)
                        else:
                            self._note("warning", "worker_request_unknown", worker=w.index,
                                       request=line[:32].decode("ascii", "replace"))
                    pending = pending[-64:]
                got = await loop.sock_recv(sock, 64)
                if not got:
                    return
        except OSError:
            return
        finally:
            w.watched = False  # its end closed: it is stopping (or gone), heartbeats end

    def _reload_others(self, w: Worker) -> None:
        # a worker still starting reads the file at its start (and a SIGHUP before its
        # handler is in place would end it)
        others = [o for o in self.workers if o is not w]
        self._note("info", "workers_reloading", workers=self.count, by_worker=w.index)
        self._hup(others)

    def _hup(self, workers: Sequence[Worker]) -> None:
        """SIGHUP to those of ``workers`` that are up; one still starting gets it once ready
        (a SIGHUP before its handler is in place would end it, and, at the first start, all)."""
        for w in workers:
            if not w.ready and w.proc is not None and w.proc.returncode is None:
                w.hup_due = True
        self._forward(signal.SIGHUP, [w for w in workers if w.ready])

    async def _ended(self, w: Worker) -> int:
        """Wait for worker ``w`` to exit; its exit code (negative: killed by that signal)."""
        assert w.proc is not None
        code = await w.proc.wait()
        w.watched = False
        if w.relay is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(w.relay, 5.0)
        if w.listen is not None:
            w.listen.cancel()
            w.listen = None
        if w.link is not None:
            w.link.close()
            w.link = None
        return code

    async def _keep(self, w: Worker, first: asyncio.Future[bool]) -> None:
        """Run worker ``w`` until a stop: start it, wait for its end, start it again."""
        while True:
            ready = await self._start(w)
            if not first.done():
                first.set_result(ready)
            elif ready:
                self._note("info", "worker_restarted", worker=w.index, pid=self._pid(w),
                           restarts=w.restarts)
            code = await self._ended(w) if w.proc is not None else 1
            if self.stopping:
                self._release_first()
                return
            if not ready and w.restarts == 0 and not self._all_started:
                self.failed_start = code if code > 0 else 1
                self._note("error", "worker_start_failed", worker=w.index, pid=self._pid(w),
                           code=code)
                return
            up = time.monotonic() - w.started
            w.failures = 0 if up >= STABLE_S else w.failures + 1
            delay = min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** max(w.failures - 1, 0))
            w.restarts += 1
            self._note("error", "worker_exited", worker=w.index, pid=self._pid(w), code=code,
                       up_s=round(up, 1), restart_in_s=delay, restarts=w.restarts)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            if self.stopping:
                self._release_first()
                return

    async def _watch(self) -> None:
        """Kill a worker whose heartbeats stopped for ``hang_timeout_s``; _keep starts it
        again. A pass of our own that came late (we were stopped or starved) first counts
        every worker seen: their heartbeats wait unread in our sockets."""
        step = min(HEARTBEAT_S, self.hang_timeout_s / 2)
        last = time.monotonic()
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            if now - last > 2 * step + 1.0:
                for w in self.workers:
                    w.seen = max(w.seen, now)
            last = now
            for w in self.workers:
                proc = w.proc
                if not w.watched or proc is None or proc.returncode is not None:
                    continue
                silent = now - w.seen
                if silent < self.hang_timeout_s:
                    continue
                w.watched = False
                w.hung += 1
                self._note("error", "worker_hung", worker=w.index, pid=proc.pid,
                           silent_s=round(silent, 1), hung=w.hung)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)

    @staticmethod
    def _pid(w: Worker) -> int | None:
        return w.proc.pid if w.proc is not None else None

    # ------------------------------------------------------------------ signals
    def _forward(self, sig: int, workers: Sequence[Worker] | None = None) -> None:
        for w in self.workers if workers is None else workers:
            proc = w.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def _on_stop(self) -> None:
        self.signals += 1
        if not self.stopping:
            self.stopping = True
            self._wake.set()
            self._note("info", "workers_stopping", workers=self.count)
        self._forward(signal.SIGTERM)  # the second one: the workers stop at once

    def _on_hup(self) -> None:
        self._note("info", "workers_reloading", workers=self.count)
        self._hup(self.workers)

    def _release_first(self) -> None:
        """During a stop: once every worker but worker 0 has exited, tell worker 0 (which
        serves the documented admin port and, drained, waits for this) that it may exit."""
        first = self.workers[0]
        if first.link is None or any(
            w.proc is not None and w.proc.returncode is None for w in self.workers[1:]
        ):
            return
        with contextlib.suppress(OSError):
            first.link.send(DRAINED)

    # ------------------------------------------------------------------ the whole
    _all_started = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        firsts = [loop.create_future() for _ in self.workers]
        keepers = [loop.create_task(self._keep(w, f)) for w, f in zip(self.workers, firsts,
                                                                       strict=True)]
        watch = loop.create_task(self._watch()) if self.hang_timeout_s > 0 else None
        started = await asyncio.gather(*firsts)
        if self.on_started is not None:
            self.on_started()
        if all(started):
            self._all_started = True
            self._note("info", "workers_started", workers=self.count,
                       pids=[self._pid(w) for w in self.workers], supervisor=os.getpid())
        else:
            # one could not start: stop the others at once, exit as a single process would
            if not self.stopping:
                self.stopping = True
                self._wake.set()
                self._forward(signal.SIGTERM)
                await asyncio.sleep(0.2)
                self._forward(signal.SIGTERM)
        await asyncio.gather(*keepers)
        if watch is not None:
            watch.cancel()
        codes = [w.proc.returncode for w in self.workers if w.proc is not None]
        self._note("info", "workers_stopped", workers=self.count, codes=codes,
                   restarts=sum(w.restarts for w in self.workers))
        if not all(started):
            return self.failed_start or next((c for c in codes if c and c > 0), 1)
        return 0 if all(c == 0 for c in codes) else 1


def supervise(count: int, command: Command, hang_timeout_s: float = 10.0,
              on_started: Callable[[], None] | None = None) -> int:
    """Run the supervisor of ``count`` workers to the end; the exit code. ``on_started``:
    called once the workers are up (or one could not start)."""
    return asyncio.run(Supervisor(count, command, hang_timeout_s, on_started).run())


def stdout_is_shareable() -> bool:
    """Our stdout is a regular file or /dev/null: writes of whole lines from several processes
    land whole, so the workers may write to it directly."""
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    if stat.S_ISREG(mode):
        return True
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except OSError:
        return False


# ---------------------------------------------------------------------- the workers' directory
def group_base() -> str:
    """Where the workers' directory goes: /dev/shm (memory, gone at reboot) when there is
    one, else the temporary directory."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


def make_group() -> str:
    """A fresh directory, mode 0700, for this supervisor's workers: the shared-memory state
    segment, the hand-over's secret and port files (only this user's processes read them).
    The directories of supervisors that died without removing theirs (SIGKILL, a crash; the
    segment alone is tens of MB of memory in /dev/shm) are removed first."""
    global _group_lock
    base = group_base()
    remove_stale_groups(base)
    group = tempfile.mkdtemp(prefix=f"sipguard-{os.getpid()}-", dir=base)
    # held for this process's life (not inherited by the workers): the sign it is alive,
    # which a pid cannot give across PID namespaces sharing one /dev/shm
    lock = os.open(os.path.join(group, LOCK_NAME), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    _group_lock = lock
    return group


LOCK_NAME = "supervisor.lock"
_group_lock: int | None = None  # the lock file of this supervisor's group, held while it runs


_GROUP = re.compile(r"sipguard-(\d+)-[A-Za-z0-9_]+")


def _supervisor_alive(path: str, pid: int) -> bool:
    """The group's supervisor still runs: it holds the lock on the group's lock file (or,
    for a group without one, a process with its pid exists)."""
    try:
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True  # another user's process (EPERM)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (releases a lock taken here)
    return False


def remove_stale_groups(base: str) -> list[str]:
    """Remove this user's workers' directories in ``base`` whose supervisor is no longer
    running (see :func:`_supervisor_alive`); the paths removed. A worker of that supervisor
    still draining keeps its mapping of the segment (an unlinked file stays mapped)."""
    removed: list[str] = []
    uid = os.getuid()
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = _GROUP.fullmatch(name)
        if m is None:
            continue
        path = os.path.join(base, name)
        try:
            if os.stat(path).st_uid != uid or not os.path.isdir(path):
                continue
            if _supervisor_alive(path, int(m.group(1))):
                continue
        except OSError:  # the entry vanished, or cannot be read: leave it
            continue
        remove_group(path)
        removed.append(path)
    return removed


def remove_group(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` through a temporary file beside ``path`` and os.replace: a reader (a
    worker starting) sees the old text or the new, never part of one. Raises OSError."""
    folder, name = os.path.split(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=name, suffix=".tmp", dir=folder or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------- the public ports
# Every worker binds the public listen addresses with SO_REUSEPORT, which lets any process of
# the same user join: a second sipguard with the same `listen` (another worker_port_base and
# admin port, e.g. a staging copy of the config) would share the port silently, and the
# kernel would split the callers, and so the limits and suspensions, between two groups. So
# before starting its workers the supervisor binds each public address once *without*
# SO_REUSEPORT and closes it at once: a port anyone holds (SO_REUSEPORT or not) fails with
# EADDRINUSE and the start is refused, as a single process's would be.
START_HOLD_WAIT_S = 30.0  # how long a start waits for another supervisor's start on its ports

Public = tuple[str, str, int, str]  # a public listen address: transport, host, port, its URI


class PortTaken(Exception):
    """A public listen address cannot be had: the line to print."""


def check_ports_free(listen: Sequence[Public]) -> None:
    """Bind each public address once, without SO_REUSEPORT, and close it: PortTaken naming
    the first one another process holds (or that cannot be bound at all)."""
    for transport, host, port, uri in listen:
        try:
            _test_bind(transport, host, port)
        except OSError as exc:
            line = f"cannot listen on {uri}: {exc.strerror or exc}"
            if exc.errno == errno.EADDRINUSE:
                line += (" (another process holds it: the workers of one sipguard share a "
                         "listen port, two sipguards do not)")
            raise PortTaken(line) from None


def _test_bind(transport: str, host: str, port: int) -> None:
    if transport == "udp":  # as transport/udp.open_udp binds it
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((host, port))
        return
    # tcp, tls: as asyncio's create_server binds it (SO_REUSEADDR: connections of an earlier
    # run in TIME_WAIT do not count; a listening socket does; IPv6 only on an IPv6 address)
    for family, kind, proto, _, address in socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)


def hold_ports(listen: Sequence[Public], wait_s: float = START_HOLD_WAIT_S
               ) -> list[socket.socket]:
    """Between the check and the workers' binds, another supervisor starting at the same
    moment could pass the same check: each supervisor holds, while it starts, an abstract
    Unix socket named after each public port (per network namespace, like the ports; gone
    with the process, no file left behind), waiting up to ``wait_s`` for one another holds.
    The sockets to close once the workers are up."""
    held: list[socket.socket] = []
    for kind, port in sorted({("udp" if t == "udp" else "tcp", p) for t, _, p, _ in listen}):
        name = f"\0sipguard-starting-{kind}-{port}"
        deadline = time.monotonic() + wait_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(name)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                break  # (the check still runs: only the race stays open)
            held.append(sock)
            break
    return held


# ---------------------------------------------------------------------- the worker's side
class SupervisorLink:
    """A worker's end of the socket pair: report ready; notice the supervisor is gone."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self._watch: asyncio.Task[None] | None = None
        self._beat: asyncio.TimerHandle | None = None
        # set once the supervisor says the other workers have exited (``DRAINED``), or is gone
        self.others_drained = asyncio.Event()

    def ready(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(READY)

    def heartbeat(self) -> None:
        """Send ``alive`` now and every HEARTBEAT_S from the event loop: while the loop
        turns, the supervisor hears it (a full socket buffer skips a beat, never blocks)."""
        with contextlib.suppress(OSError):
            self.sock.send(ALIVE)
        self._beat = asyncio.get_running_loop().call_later(HEARTBEAT_S, self.heartbeat)

    def reload_others(self) -> None:
        """This worker reloaded on an operator's request: the supervisor reloads the others."""
        with contextlib.suppress(OSError):
            self.sock.send(RELOAD)

    def on_gone(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the supervisor's end closes (it exited or was killed). Our
        stdout went through it: from then on it goes to /dev/null, not to a broken pipe.
        What the supervisor sends meanwhile (``DRAINED``) sets :attr:`others_drained`."""
        loop = asyncio.get_running_loop()

        async def watch() -> None:
            pending = b""
            with contextlib.suppress(OSError):
                while got := await loop.sock_recv(self.sock, 64):
                    pending += got
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        if line + b"\n" == DRAINED:
                            self.others_drained.set()
                    pending = pending[-64:]
            self.others_drained.set()
            with contextlib.suppress(OSError, ValueError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, sys.stdout.fileno())
                os.close(null)
            callback()

        self._watch = loop.create_task(watch())

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self._beat is not None:
            self._beat.cancel()
        self.sock.close()
