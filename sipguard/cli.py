"""Command line: ``sipguard run``, ``check-config`` and the operator verbs over the admin API.

``run`` loads the config (flags override the file), binds every listener and proxies until
SIGINT/SIGTERM. SIGHUP reloads the config file (``Server.reload_config``, the same path as
``sipguard reload`` and ``POST /reload``): a valid file is swapped in without touching live
calls; an invalid one is reported and the running config stays. ``check-config`` exits 0 for a
valid file and 2 with one ``FILE:LINE: FIELD: message`` line per problem otherwise.

With ``workers: N`` (or ``--workers N``) above 1, ``run`` is the supervisor of N worker
processes (:mod:`sipguard.supervisor`): each is this command line again plus the hidden
``--worker-index i --supervisor-fd FD``, and its log lines carry ``worker=i``.

The operator verbs talk to a running sipguard's admin API (``--admin URL``, default
``http://127.0.0.1:9090``; the token from ``--token-file`` or ``$SIPGUARD_TOKEN``)::

    sipguard reload
    sipguard suspend +31201234567 --reason fraud --end-calls --expires 3600 --by alice
    sipguard suspend '+3120*'            # a prefix
    sipguard unsuspend +31201234567
    sipguard suspensions [--prefix +1212]                  # every page of GET /suspensions
    sipguard calls +31201234567
    sipguard bans [--source SOURCE | --lift SOURCE]        # at most 1,000, with the total
    sipguard cooldowns [--key KEY] [--scope SCOPE]         # rule dialer's cooldowns
    sipguard cooldowns --lift KEY [--scope SCOPE] [--by WHO]

They print JSON and exit 0; on failure one ``sipguard: ...`` line and exit 1 (2 for a reload
the file's errors refused, one ``LINE: FIELD: message`` line each).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import signal
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sipguard.ops.admin import check_admin
from sipguard.ops.config import Config
from sipguard.ops.config_load import (
    ConfigError,
    FieldError,
    config_with_overrides,
    load_config,
    located,
    parse_config_as,
    read_config,
    region_advice,
)
from sipguard.ops.endpoints import Endpoint
from sipguard.ops.fdlimit import FIX as FD_FIX
from sipguard.ops.fdlimit import FdLimit
from sipguard.ops.fdlimit import apply as fit_fd_limit
from sipguard.ops.logging import (
    close_logs,
    configure_logging,
    flush_logs,
    get_logger,
    log_writer,
)
from sipguard.ops.reload import changed_keys, held_back
from sipguard.ops.suspension_file import SuspensionFile
from sipguard.policy.engine import Policy, build_peer
from sipguard.policy.settings import ListFileError
from sipguard.policy.state import RuleState
from sipguard.server import Server, StartupError, tls_contexts
from sipguard.state.shared_memory import create_segment
from sipguard.supervisor import (
    CONFIG_APPLIED,
    CONFIG_START,
    SEGMENT_NAME,
    STATE_DIR_NAME,
    PortTaken,
    SupervisorLink,
    check_ports_free,
    hold_ports,
    make_group,
    remove_group,
    supervise,
    write_text_atomic,
)
from sipguard.transport.worker_link import make_token

EXIT_CONFIG = 2
EXIT_STARTUP = 1
# worker 0, drained, waits for the others at most this long after its own drain_timeout_s
OTHERS_GRACE_S = 10.0


def _endpoint(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipguard", description="Inline SIP edge filter.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", "-c", default="config/sipguard.yaml",
                     help="config file (YAML); default: config/sipguard.yaml in the current "
                     "directory")
    run.add_argument("--listen", action="append", type=_endpoint, metavar="URI",
                     help="listen URI, e.g. udp://0.0.0.0:5060 (repeatable; replaces the file's)")
    run.add_argument("--core", type=_endpoint, metavar="URI", help="core URI (replaces the file's)")
    run.add_argument("--workers", type=int, metavar="N",
                     help="worker processes (replaces the file's `workers`; more than 1 "
                          "needs state.backend: shared_memory or redis)")
    # set by the supervisor on the command lines of its workers (sipguard/supervisor.py)
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    run.add_argument("--supervisor-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--group-dir", help=argparse.SUPPRESS)
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    verbs = [
        sub.add_parser("reload", help="reload the running sipguard's config file"),
        suspend := sub.add_parser("suspend", help="suspend a number or prefix (ending in *)"),
        unsuspend := sub.add_parser("unsuspend", help="lift a suspension"),
        listing := sub.add_parser("suspensions", help="list suspended numbers (every page)"),
        calls := sub.add_parser("calls", help="live calls of a number"),
        bans := sub.add_parser("bans", help="list flood bans, or lift one"),
        cooldowns := sub.add_parser("cooldowns",
                                    help="list rule dialer's cooldowns, or lift one"),
    ]
    for verb in verbs:
        verb.add_argument("--admin", default=DEFAULT_ADMIN, metavar="URL",
                          help=f"admin API base URL (default {DEFAULT_ADMIN})")
        verb.add_argument("--token-file", metavar="FILE",
                          help="file holding the admin token (default: $SIPGUARD_TOKEN)")
    suspend.add_argument("number", help="+E164 number, or a prefix like '+3120*'")
    suspend.add_argument("--reason", default="", help="why (logged and listed)")
    suspend.add_argument("--by", default=os.environ.get("USER", "cli"), help="who (logged)")
    expiry = suspend.add_mutually_exclusive_group()
    expiry.add_argument("--expires", type=float, metavar="S",
                        help="lift after S seconds (default: a new suspension never lifts "
                             "itself; one in force keeps its expiry)")
    expiry.add_argument("--no-expiry", action="store_true",
                        help="never lift itself (makes a suspension in force permanent)")
    suspend.add_argument("--end-calls", action="store_true", help="end its calls now: BYE the answered ones, CANCEL the ringing ones")
    unsuspend.add_argument("number")
    unsuspend.add_argument("--by", default=os.environ.get("USER", "cli"), help="who (logged)")
    listing.add_argument("--prefix", help="only the keys starting with PREFIX (e.g. +1212)")
    calls.add_argument("number")
    which = bans.add_mutually_exclusive_group()
    which.add_argument("--lift", metavar="SOURCE", help="lift the ban on SOURCE (ip or ip:port)")
    which.add_argument("--source", metavar="SOURCE", help="only the ban on SOURCE, if any")
    cooldowns.add_argument("--lift", metavar="KEY",
                           help="lift the cooldowns of KEY: a number, a peer name or a source "
                                "address")
    cooldowns.add_argument("--key", help="list only the cooldowns of KEY")
    cooldowns.add_argument("--scope", choices=("caller", "origin", "callee", "high_cost"),
                           help="only this scope (default: every scope)")
    cooldowns.add_argument("--by", default=os.environ.get("USER", "cli"),
                           help="who lifts (logged)")
    return parser


DEFAULT_ADMIN = "http://127.0.0.1:9090"


class AdminError(Exception):
    """A verb failed: the one line to print, and the exit code."""

    def __init__(self, line: str, code: int = EXIT_STARTUP) -> None:
        super().__init__(line)
        self.code = code


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as fh:
                return fh.read().strip() or None
        except OSError as exc:
            raise AdminError(f"cannot read {args.token_file}: {exc.strerror or exc}") from None
    return os.environ.get("SIPGUARD_TOKEN") or None


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One admin API request: (status, JSON answer). Raises AdminError for no answer or a
    401; other error answers are returned for the verb to report."""
    url = args.admin.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    token = _token(args)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        reason = getattr(reason, "strerror", None) or reason
        raise AdminError(f"cannot reach the admin API at {args.admin}: {reason}") from None
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = {"error": raw.decode("utf-8", "replace").strip()[:200]}
    if status == 401:
        if not token:
            raise AdminError("admin API refused the request (401): it needs a token: give "
                             "--token-file or $SIPGUARD_TOKEN")
        where = f"--token-file {args.token_file}" if getattr(args, "token_file", None) \
            else "$SIPGUARD_TOKEN"
        raise AdminError(f"admin API refused the request (401): the token from {where} is "
                         "not the one in its admin.token_file (changed there and reloaded?)")
    return status, answer


def _ok(status: int, answer: Any) -> Any:
    if status >= 400:
        error = answer.get("error") if isinstance(answer, dict) else None
        raise AdminError(f"admin API answered {status}: {error or answer}")
    return answer


def _number_path(number: str) -> str:
    return urllib.parse.quote(number, safe="")


# GET /suspensions?limit=: a page of 1,000 holds sipguard's event loop ~2 ms, one of 10,000
# (the most) ~20 ms; 100,000 suspensions in pages of 1,000 take ~0.35 s all told
LIST_PAGE = 1000


def _suspensions(args: argparse.Namespace) -> dict[str, Any]:
    """Every suspension: GET /suspensions a page at a time, each after the ``next`` of the
    one before, until a page has none (an admin API from before paging answers everything
    in one page, without ``next``)."""
    query = f"limit={LIST_PAGE}"
    if args.prefix:
        query += f"&prefix={_number_path(args.prefix)}"
    listed: list[Any] = []
    after: str | None = None
    seen: set[str] = set()
    while True:
        page = _ok(*_call(args, "GET", "/suspensions?" + query + (
            f"&after={_number_path(after)}" if after is not None else "")))
        if not isinstance(page, dict) or not isinstance(page.get("suspensions"), list):
            raise AdminError(f"admin API answered no list of suspensions: {page!r:.200}")
        listed += page["suspensions"]
        after = page.get("next")
        if after is None:
            break
        if not isinstance(after, str) or after in seen:
            raise AdminError(f"admin API answered a bad next cursor: {after!r:.200}")
        seen.add(after)
    result: dict[str, Any] = {"suspensions": listed}
    if "total" in page:
        result["total"] = page["total"]
    return result


def _verb(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "reload":
        status, answer = _call(args, "POST", "/reload")
        if status == 422 and isinstance(answer, dict):
            for err in answer.get("errors", []):
                where = err.get("file") or "-"
                if err.get("line"):
                    where += f":{err['line']}"
                field = f" {err['field']}:" if err.get("field") else ""
                print(f"sipguard: reload refused: {where}:{field} {err.get('message')}",
                      file=sys.stderr)
            return EXIT_CONFIG
        result: Any = _ok(status, answer)
    elif cmd == "suspend":
        text = args.number.strip()
        body = {("prefix" if text.endswith("*") else "number"): text, "reason": args.reason,
                "by": args.by, "end_calls": args.end_calls}
        if args.expires is not None or args.no_expiry:
            body["expires"] = None if args.no_expiry else args.expires
        result = _ok(*_call(args, "POST", "/suspensions", body))
    elif cmd == "unsuspend":
        by = urllib.parse.quote(args.by, safe="")
        result = _ok(*_call(args, "DELETE",
                            f"/suspensions/{_number_path(args.number)}?by={by}"))
    elif cmd == "suspensions":
        result = _suspensions(args)
    elif cmd == "calls":
        result = _ok(*_call(args, "GET", f"/calls?number={_number_path(args.number)}"))
    elif cmd == "cooldowns":
        query = f"scope={args.scope}" if args.scope else ""
        if args.lift:
            by = urllib.parse.quote(args.by, safe="")
            result = _ok(*_call(args, "DELETE", f"/dialer/cooldowns/{_number_path(args.lift)}"
                                f"?by={by}" + (f"&{query}" if query else "")))
        else:
            if args.key:
                query += ("&" if query else "") + f"key={_number_path(args.key)}"
            result = _ok(*_call(args, "GET", "/dialer/cooldowns" + (f"?{query}" if query
                                                                     else "")))
    else:  # bans
        if args.lift:
            result = _ok(*_call(args, "DELETE", f"/bans/{_number_path(args.lift)}"))
        else:
            query = f"?source={_number_path(args.source)}" if args.source else ""
            result = _ok(*_call(args, "GET", "/bans" + query))
    try:
        print(json.dumps(result, indent=2), flush=True)
    except BrokenPipeError:  # `sipguard calls ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if isinstance(result, dict) and result.get("monitored") and result.get("warning"):
        print(f"sipguard: warning: {result['warning']}", file=sys.stderr)
    if isinstance(result, dict) and result.get("save_failed"):
        print("sipguard: in force now, but not saved to state_dir: it will not survive a "
              "restart (the log has suspensions_save_failed)", file=sys.stderr)
        return 1
    return 0


def _load(path: str, args: argparse.Namespace) -> Config:
    return ConfigSource(path, args).load()


class ConfigSource:
    """The config file of ``run``, with the command line's overrides, as each load reads it.

    A worker (``--group-dir``) also keeps what its siblings run: it starts from the config
    the supervisor loaded at the start (``CONFIG_START`` in the workers' directory), with the
    last reload that applied anywhere in the group over it (``CONFIG_APPLIED``, written by
    :meth:`applied`; its keys that need a restart keep the start's values, as in a reload)
    — never from the file as it is on disk now, which may hold an edit nobody reloaded (or a
    broken one). Both texts are read as the config file itself: named after it in errors,
    with relative paths resolved against its folder. Without ``state_dir`` its workers keep
    their suspensions in the workers' directory (``STATE_DIR_NAME``): a worker started again
    loads what its siblings hold."""

    def __init__(self, path: str, args: argparse.Namespace) -> None:
        self.path = path
        self.args = args
        group = getattr(args, "group_dir", None)
        self.group: str | None = group if getattr(args, "worker_index", None) is not None \
            else None
        self.text: str | None = None  # the text the last load read

    def _finish(self, cfg: Config) -> Config:
        args = self.args
        if args.listen or args.core or args.workers is not None:
            cfg = config_with_overrides(cfg, listen=args.listen, core=args.core,
                                        workers=args.workers)
        if self.group is not None and cfg.workers > 1 and cfg.state_dir is None:
            cfg = cfg.model_copy(update={"state_dir": Path(self.group) / STATE_DIR_NAME})
        return cfg

    def load(self) -> Config:
        """The file as it is now (the start of ``run``, every reload). Raises ConfigError, or
        FieldError for an admin section the process could not start with (a reload of it is
        refused, as ``check-config`` refuses the file)."""
        self.text, cfg = read_config(self.path)
        cfg = self._finish(cfg)
        check_admin(cfg)
        return cfg

    def running(self) -> Config:
        """A worker's start: what its siblings run (see the class). Raises ConfigError."""
        if self.group is None:
            return self.load()
        try:
            with open(os.path.join(self.group, CONFIG_START), encoding="utf-8") as fh:
                start = fh.read()
        except FileNotFoundError:  # (no copy: the file, as a single process reads it)
            return self.load()
        cfg = self._finish(parse_config_as(start, self.path))
        try:
            with open(os.path.join(self.group, CONFIG_APPLIED), encoding="utf-8") as fh:
                reloaded: str | None = fh.read()
        except FileNotFoundError:
            reloaded = None
        if reloaded is not None:
            new = self._finish(parse_config_as(reloaded, self.path))
            cfg = held_back(cfg, new, changed_keys(cfg, new))[0]
        return cfg

    def applied(self) -> None:
        """The last load was applied by a reload: what a worker started from now on runs."""
        if self.group is None or self.text is None:
            return
        try:
            write_text_atomic(Path(self.group) / CONFIG_APPLIED, self.text)
        except OSError as exc:
            get_logger("sipguard").error("config_copy_failed", error=str(exc),
                                         detail="a worker started again runs the config "
                                                "before this reload")


def _worker_command(args: argparse.Namespace, workers: int,
                    group: str) -> Callable[[int, int], list[str]]:
    """The command line of worker i: this one's, plus --workers N --worker-index i and the
    workers' directory."""
    base = [sys.executable, "-m", "sipguard", "run", "--config", args.config]
    for ep in args.listen or ():
        base += ["--listen", str(ep)]
    if args.core is not None:
        base += ["--core", str(args.core)]
    base += ["--workers", str(workers), "--group-dir", group]

    def command(index: int, fd: int) -> list[str]:
        return [*base, "--worker-index", str(index), "--supervisor-fd", str(fd)]

    return command


def fd_limit(cfg: Config, worker: bool) -> FdLimit:
    """Raise the open-files soft limit toward what ``cfg`` needs and fit the TCP cap to it
    (:mod:`sipguard.ops.fdlimit`); log ``fd_limit_raised``, and ``fd_limit_low`` (a
    warning, with what to do) when it is still below."""
    fds = fit_fd_limit(cfg, worker)
    log = get_logger("sipguard")
    fields = fds.fields()
    if fds.low:
        log.warning("fd_limit_low", **fields, fix=FD_FIX)
    elif "raised_from" in fields:
        log.info("fd_limit_raised", soft=fds.soft, hard=fds.hard, needed=fds.need.needed,
                 raised_from=fds.before)
    return fds


def attach_fd_limit(server: Server, fds: FdLimit) -> None:
    """The TCP pool bounded by the limit, and its gauges on /metrics."""
    server.tcp.fd_room = fds.room
    server.tcp.fd_cap = fds.fd_cap
    worker = server.worker is not None
    server.metrics.gauge_sources.append(lambda: fds.gauges(server.cfg, worker))


async def _serve(source: ConfigSource, args: argparse.Namespace, cfg: Config,
                 fds: FdLimit | None = None) -> int:
    loop = asyncio.get_running_loop()
    link = SupervisorLink(args.supervisor_fd) if args.supervisor_fd is not None else None
    try:
        server = Server(cfg, load=source.load, worker=args.worker_index,
                        group=args.group_dir,
                        # absolute: a reload's errors name it to whoever asks, from anywhere
                        config_file=os.path.abspath(source.path))
    except ListFileError as exc:  # a number list (numbers_file, dno_file): unreadable, bad lines
        print(str(located(exc, source.path)), file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, ValueError) as exc:
        print(f"sipguard: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if fds is not None:
        attach_fd_limit(server, fds)
    if link is not None:  # an operator's reload through this worker reaches every worker
        def reload_others() -> None:
            source.applied()  # (before the others hear of it)
            link.reload_others()

        server.reload_others = reload_others
    log = get_logger("sipguard")
    try:
        await server.start()
    except StartupError as exc:
        print(f"sipguard: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    # The proxy frees transactions and dialogs by reference counting (it breaks its own cycles;
    # tests/unit/test_no_cycles.py keeps it so). The cyclic collector's automatic runs are off:
    # the server runs short young passes and freezes their survivors, and a full pass an hour
    # after the last at a lull (sipguard/ops/collector.py). What startup made is frozen now.
    gc.collect()
    gc.freeze()
    gc.disable()
    stop = asyncio.Event()

    async def reload() -> None:
        result = await server.reload_config()  # the one reload path; it logs what it did
        if result.applied:
            source.applied()

    drains: list[asyncio.Task[None]] = []

    async def drain_then_stop() -> None:
        started = loop.time()
        await server.drain()
        if link is not None and args.worker_index == 0 and cfg.workers > 1 \
                and not link.others_drained.is_set() and not stop.is_set():
            # worker 0 serves the documented admin port: it stays up, drained (/readyz 503,
            # new INVITEs 503, /metrics), until the other workers have exited too — bounded,
            # should the supervisor never say so
            log.info("drain_waiting_for_workers", workers=cfg.workers)
            limit = max(0.0, started + cfg.drain_timeout_s + OTHERS_GRACE_S - loop.time())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(link.others_drained.wait(), limit)
        stop.set()

    def on_stop() -> None:
        # First signal: drain (new calls 503, calls up finish); a second one: stop at once
        # (the calls still up are ended as the stop does at the drain's end).
        if drains:
            if not stop.is_set():
                log.warning("drain_cut", live_calls=len(server.proxy.dialogs))
            stop.set()
            return
        drains.append(loop.create_task(drain_then_stop()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)

    async def flush_sampled() -> None:
        # the sampled lines' counts no later line reports (a number's refusals after its
        # last line): written once the number has gone quiet, not only at the stop
        while True:
            await asyncio.sleep(max(server.sampled.interval_s, 0.5))
            try:
                server.sampled.flush()
            except Exception:  # a line that cannot be written must not stop the flusher
                server.counters["log_write_failed"] += 1

    flusher = loop.create_task(flush_sampled())
    if link is not None:
        link.ready()  # the supervisor counts the worker started (signals are handled now)
        link.heartbeat()  # from the loop: a worker whose loop stops is killed and restarted
        # the supervisor is gone (killed): drain and exit rather than outlive it
        link.on_gone(lambda: None if drains else on_stop())
    try:
        await stop.wait()
    finally:
        if link is not None:
            link.close()
        flusher.cancel()
        await server.stop()
        with contextlib.suppress(Exception):  # every sampled count still untold, in the log
            server.sampled.flush(final=True)
        flush_logs()
        writer = log_writer()
        if writer is not None:  # the lines of the calls ended at the stop may fill its queue:
            # the last line waits for room (2 s at most: a reader that stopped cannot hold us)
            await asyncio.to_thread(writer.wait_room, 2.0)
        log.info("sipguard_stopped", counters=dict(server.counters))
        flush_logs()
    return 0


def _check_files(cfg: Config) -> None:
    """What `run` reads besides the rules, read as it reads them: the TLS certificate, key
    and CA files, the admin token file (an admin API off loopback needs one) and
    ``state_dir`` (a writable folder, its suspensions file sipguard's). OSError or
    ValueError naming the field (a FieldError for the admin section and ``state_dir``: its
    key, for the line)."""
    tls_contexts(cfg)
    check_admin(cfg)
    if cfg.state_dir is not None:
        try:
            SuspensionFile(Path(cfg.state_dir)).check()
        except OSError as exc:
            raise FieldError(("state_dir",), f"cannot use {exc.filename or cfg.state_dir}: "
                             f"{exc.strerror or exc}") from None
        except ValueError as exc:
            raise FieldError(("state_dir",), str(exc)) from None


def _process_hygiene() -> None:
    """Before `run` opens anything: a standard stream the caller left closed (``>&-``) is
    opened on /dev/null — the event loop's own file descriptors would otherwise take its
    number, and log lines written to "stdout" would go to them — and SIGUSR1 / SIGUSR2,
    whose default is to kill the process (calls up and all, no BYE), are ignored: sipguard
    has no use for them (it logs to stdout, with nothing to reopen)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    # (Python made no stream for a descriptor closed at its start)
    if sys.stdout is None:
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("run", "check-config"):
        try:
            return _verb(args)
        except AdminError as exc:
            print(f"sipguard: {exc}", file=sys.stderr)
            return exc.code
    if args.command == "check-config":
        try:
            cfg = load_config(args.file)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return EXIT_CONFIG
        # each peer's number list, the rules built as `run` builds them (number lists, trust
        # anchors, patterns), then the other files it reads: every problem said in one run
        # (building the rules stops at the first peer whose list is bad: the lists are read
        # one by one first, and a problem said twice is said once)
        checks: list[Callable[[], object]] = [
            functools.partial(build_peer, pc) for pc in cfg.peers if pc.numbers_file is not None]
        checks += [lambda: Policy(cfg, RuleState()), lambda: _check_files(cfg)]
        problems: list[str] = []
        for check in checks:
            try:
                check()
            except (ListFileError, FieldError) as exc:  # with the line of the key
                problem = str(located(exc, args.file))
                if problem not in problems:
                    problems.append(problem)
            except (OSError, ValueError) as exc:
                problems.append(f"{args.file}: {exc}")
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return EXIT_CONFIG
        for advice in region_advice(cfg):
            print(f"{args.file}: note: {advice}", file=sys.stderr)
        print(f"{args.file}: OK")
        return 0
    _process_hygiene()
    source = ConfigSource(args.config, args)
    try:
        cfg = source.running()
        check_admin(cfg)  # a config error (as check-config says it), not a start-up one
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except (ListFileError, FieldError) as exc:
        print(str(located(exc, args.config)), file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:
        print(f"sipguard: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    worker = args.worker_index
    if worker is None and cfg.workers > 1:
        # the supervisor: starts the workers, passes signals on, restarts a worker that died
        configure_logging(cfg.log, batch=True)  # a writer thread: a stuck reader never blocks it
        group = make_group()
        held: list[socket.socket] = []

        def release() -> None:
            for sock in held:
                sock.close()
            held.clear()

        try:
            # the public addresses: no other process may hold them (SO_REUSEPORT would let
            # another sipguard's workers join ours)
            public = [(ep.transport, ep.host, ep.port, str(ep)) for ep in cfg.listen]
            held += hold_ports(public)
            try:
                check_ports_free(public)
            except PortTaken as exc:
                print(f"sipguard: {exc}", file=sys.stderr)
                return EXIT_STARTUP
            make_token(group)  # the secret of the workers' hand-over (transport/worker_link.py)
            # what every worker starts from, a restarted one included (ConfigSource.running)
            write_text_atomic(Path(group) / CONFIG_START, source.text or "")
            if cfg.state.backend == "shared_memory":
                st = cfg.state
                create_segment(os.path.join(group, SEGMENT_NAME), st.max_keys, st.max_leases,
                               st.max_sets)
            return supervise(cfg.workers, _worker_command(args, cfg.workers, group),
                             hang_timeout_s=cfg.worker_hang_timeout_s, on_started=release)
        except OSError as exc:
            print(f"sipguard: cannot make the workers' shared state in {group}: {exc}",
                  file=sys.stderr)
            return EXIT_STARTUP
        finally:
            release()
            remove_group(group)
            close_logs()
    if worker is not None and not 0 <= worker < cfg.workers:
        print(f"sipguard: --worker-index {worker} is not below workers ({cfg.workers})",
              file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(cfg.log, batch=True, fields=None if worker is None else {"worker": worker})
    fds = fd_limit(cfg, worker is not None)  # before anything is opened
    run = asyncio.run
    # uvloop is the faster loop (a dependency). With a tls:// listener sipguard runs asyncio's
    # own loop: uvloop's server-side start_tls hands the client's first TLS record to the
    # plain protocol now and then, and that handshake hangs until its timeout.
    if not any(ep.transport == "tls" for ep in cfg.listen):
        with contextlib.suppress(ImportError):
            import uvloop

            run = uvloop.run
    try:
        return run(_serve(source, args, cfg, fds))
    except KeyboardInterrupt:
        return 0
    finally:
        try:
            close_logs()  # lines still waiting (start-up errors included), 2 s at most
        except BrokenPipeError:  # stdout's reader is gone (a worker whose supervisor died)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
