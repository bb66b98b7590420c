"""The admin API over real sockets: a Server on 127.0.0.1 with its admin endpoint, driven by
aiohttp client requests and plain UDP sockets for the SIP side."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import structlog

from sipguard import cli
from sipguard import server as server_module
from sipguard.ops.admin import MAX_BANS_SHOWN, MAX_CALLS_SHOWN, SCRAPE_REUSE_S
from sipguard.ops.config_load import ConfigError, load_config, parse_config
from sipguard.policy.flood import Ban
from sipguard.policy.suspensions import SuspensionStore, suspension_key
from sipguard.server import Server, StartupError

from .test_server_shell import _free_udp_port, invite
from .udp_peer import Peer

pytestmark = pytest.mark.usefixtures("reset_structlog")


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Guard:
    """A running Server with its config file, SIP port and admin base URL."""

    def __init__(self, server: Server, config: Path, sip_port: int, admin_port: int) -> None:
        self.server = server
        self.config = config
        self.port = sip_port
        self.admin_port = admin_port
        self.url = f"http://127.0.0.1:{admin_port}"


def _config_text(core: Peer, sip_port: int, admin_port: int, extra: str = "") -> str:
    return (
        f"listen: [udp://127.0.0.1:{sip_port}]\ncore: udp://127.0.0.1:{core.port}\n"
        f"admin: {{listen: 127.0.0.1:{admin_port}}}\n{extra}"
    )


async def start_guard(
    tmp_path: Path, core: Peer, extra: str = "", *, ports: tuple[int, int] | None = None
) -> Guard:
    sip_port, admin_port = ports or (_free_udp_port(), _free_tcp_port())
    path = tmp_path / "sipguard.yaml"
    path.write_text(_config_text(core, sip_port, admin_port, extra))
    server = Server(load_config(path), load=lambda: load_config(path), config_file=str(path))
    await server.start()
    return Guard(server, path, sip_port, admin_port)



async def request(
    method: str, url: str, body: Any = None, token: str | None = None, raw: bytes | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        kwargs: dict[str, Any] = {"headers": headers}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        async with session.request(method, url, **kwargs) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()


def answer_ok(forwarded: bytes, core: Peer) -> bytes:
    """The core's 200 OK to an INVITE it received through sipguard."""
    text = forwarded.decode()
    head = text.split("\r\n\r\n", 1)[0].split("\r\n")[1:]
    keep = ("via:", "from:", "to:", "call-id:", "cseq:", "record-route:")
    lines = [h + (";tag=core1" if h.lower().startswith("to:") else "")
             for h in head if h.lower().startswith(keep)]
    return (
        "SIP/2.0 200 OK\r\n" + "\r\n".join(lines)
        + f"\r\nContact: <sip:core@127.0.0.1:{core.port}>\r\nContent-Length: 0\r\n\r\n"
    ).encode()


async def answered_call(guard: Guard, caller: Peer, core: Peer, call_id: str,
                        number: str) -> None:
    caller.sock.sendto(invite(caller, guard.port, call_id, caller=number),
                       ("127.0.0.1", guard.port))
    forwarded = await core.recv_until(b"INVITE ")
    core.sock.sendto(answer_ok(forwarded, core), ("127.0.0.1", guard.port))
    assert (await caller.recv_until(b"SIP/2.0 200")).startswith(b"SIP/2.0 200 ")


# --------------------------------------------------------------------------- auth and errors


async def test_token_is_required_when_configured(
    tmp_path: Path, peers: tuple[Peer, Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a token file, operator endpoints answer 401 without the token, metrics stay open."""
    monkeypatch.delenv("SIPGUARD_TOKEN", raising=False)
    _, core = peers
    (tmp_path / "token").write_text("s3cret\n")
    sip_port, admin_port = _free_udp_port(), _free_tcp_port()
    path = tmp_path / "sipguard.yaml"
    path.write_text(
        f"listen: [udp://127.0.0.1:{sip_port}]\ncore: udp://127.0.0.1:{core.port}\n"
        f"admin: {{listen: 127.0.0.1:{admin_port}, token_file: token}}\n"
    )
    server = Server(load_config(path))
    await server.start()
    url = f"http://127.0.0.1:{admin_port}"
    try:
        status, body = await request("GET", url + "/suspensions")
        assert status == 401 and "token" in body["error"]
        status, _ = await request("GET", url + "/suspensions", token="wrong")
        assert status == 401
        status, body = await request("GET", url + "/suspensions", token="s3cret")
        assert status == 200 and body == {"suspensions": [], "total": 0, "next": None}
        assert (await request("GET", url + "/healthz"))[0] == 200
        assert (await request("GET", url + "/metrics"))[0] == 200
        status, body = await request("GET", url + "/readyz")
        assert status == 200 and body == {"ready": True}
        status, body = await request("GET", url + "/config", token="s3cret")
        assert body["admin"]["token_file"] == "<redacted>"
        # the CLI says which it is: no token given, or a token that is not the one
        (tmp_path / "stale").write_text("0ld\n")
        for extra, hint in (([], "it needs a token: give --token-file or $SIPGUARD_TOKEN"),
                            (["--token-file", str(tmp_path / "stale")],
                             f"the token from --token-file {tmp_path / 'stale'} is not the one")):
            with pytest.raises(cli.AdminError, match=re.escape(hint)):
                await asyncio.to_thread(cli._call, cli.build_parser().parse_args(
                    ["suspensions", "--admin", url, *extra]), "GET", "/suspensions")
    finally:
        await server.stop()


async def test_requests_a_web_page_makes_are_refused(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """A browser's cross-site POST (text/plain, an Origin header) and a DNS-rebinding GET (a
    Host that names the page's site, not loopback) are refused with 403 and counted; the
    same requests from a tool (no Origin, Host 127.0.0.1 or localhost) pass. /metrics
    stays open to any Host (a scraper names the machine as it knows it)."""
    _, core = peers
    guard = await start_guard(tmp_path, core)
    url = guard.url
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/suspensions", data=b'{"prefix": "+1*"}', headers={
                    "Origin": "http://attacker.example", "Content-Type": "text/plain"}) as r:
                assert r.status == 403 and "Origin" in (await r.json())["error"]
            async with session.post(url + "/reload", headers={
                    "Origin": "http://attacker.example"}) as r:
                assert r.status == 403
            async with session.get(url + "/calls?number=%2B1*",
                                   headers={"Host": "rebind.attacker.example:80"}) as r:
                assert r.status == 403 and "Host" in (await r.json())["error"]
            async with session.get(url + "/suspensions",
                                   headers={"Host": f"localhost:{guard.admin_port}"}) as r:
                assert r.status == 200
            async with session.get(url + "/metrics", headers={"Host": "sipguard-1:9090"}) as r:
                assert r.status == 200
        assert guard.server.state.suspensions.match("+12125550100", 0.0) is None
        counters = guard.server.counters
        assert counters["admin_refused_origin"] == 2 and counters["admin_refused_host"] == 1
    finally:
        await guard.server.stop()


async def test_admin_connections_are_bounded_and_idle_ones_closed(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """``admin.max_connections`` open connections at most, ``max_connections_per_ip`` from
    one address: when full, the oldest connection with no request being answered (of that
    address, when it is the address that is full) is closed for the new one — half-sent
    requests cannot lock the operator out; a connection that sends nothing for
    ``admin.idle_timeout_s`` (a half-sent request) is closed: half-sent requests cannot hold
    the process's file descriptors."""
    _, core = peers
    sip_port, admin_port = _free_udp_port(), _free_tcp_port()
    path = tmp_path / "bounded.yaml"
    path.write_text(
        f"listen: [udp://127.0.0.1:{sip_port}]\ncore: udp://127.0.0.1:{core.port}\n"
        f"admin: {{listen: 0.0.0.0:{admin_port}, max_connections: 3, "
        "max_connections_per_ip: 2, idle_timeout_s: 1.5, token_file: token}\n")
    (tmp_path / "token").write_text("t0ken\n")
    server = Server(load_config(path))
    await server.start()
    url = f"http://127.0.0.1:{admin_port}"
    writers: list[asyncio.StreamWriter] = []

    async def half_sent(source: str) -> asyncio.StreamReader:
        reader, writer = await asyncio.open_connection("127.0.0.1", admin_port,
                                                       local_addr=(source, 0))
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        writers.append(writer)
        await asyncio.sleep(0.05)
        return reader

    try:
        # two half-sent requests from one address (its share), one from another (the limit)
        first, second, other = [await half_sent(ip)
                                for ip in ("127.0.0.1", "127.0.0.1", "127.0.0.2")]
        # a third from the first address closes that address's oldest; one from a fresh
        # address closes the oldest of all
        third = await half_sent("127.0.0.1")
        assert await asyncio.wait_for(first.read(), 2) == b""
        fresh = await half_sent("127.0.0.4")
        assert await asyncio.wait_for(second.read(), 2) == b""
        assert server.counters["admin_connections_evicted"] == 2
        assert server.counters["admin_connections_refused"] == 0
        status, _ = await request("GET", url + "/healthz")  # the operator gets in at once
        assert status == 200
        assert await asyncio.wait_for(other.read(), 2) == b""
        for r in (third, fresh):  # the idle ones are closed after 1.5 s without a byte
            assert await asyncio.wait_for(r.read(), 3) == b""
        assert server.counters["admin_connections_idle_closed"] == 2
    finally:
        for w in writers:
            w.close()
        await server.stop()


async def test_a_request_answered_more_slowly_than_the_idle_timeout_is_not_cut(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """A reload that takes longer than ``admin.idle_timeout_s`` (waiting for another, big
    number lists): its connection sends nothing meanwhile, but it is being answered — the
    answer comes, the connection is not closed as idle."""
    _, core = peers
    sip_port, admin_port = _free_udp_port(), _free_tcp_port()
    path = tmp_path / "slow.yaml"
    path.write_text(
        f"listen: [udp://127.0.0.1:{sip_port}]\ncore: udp://127.0.0.1:{core.port}\n"
        f"admin: {{listen: 127.0.0.1:{admin_port}, idle_timeout_s: 0.5}}\n")
    server = Server(load_config(path), load=lambda: load_config(path))

    class Slow:
        """The server as the admin API's control, its reload 1.5 s slower (three idle
        timeouts)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(server, name)

        async def reload_config(self, everywhere: bool = False) -> Any:
            await asyncio.sleep(1.5)
            return await server.reload_config(everywhere)

    await server.start()
    assert server.http is not None
    server.http.control = Slow()  # type: ignore[assignment]
    try:
        status, body = await request("POST", f"http://127.0.0.1:{admin_port}/reload")
        assert status == 200, body
        assert server.counters["admin_connections_idle_closed"] == 0
    finally:
        await server.stop()


async def test_a_reload_rotates_the_token(tmp_path: Path, peers: tuple[Peer, Peer]) -> None:
    """The token file written anew and a reload: the new token works, the old one is 401,
    and `changed` says so; an empty token file refuses the reload naming the field, and the
    running token stays."""
    _, core = peers
    (tmp_path / "token").write_text("old-secret\n")
    path = tmp_path / "sipguard.yaml"
    path.write_text(
        f"listen: [udp://127.0.0.1:{_free_udp_port()}]\ncore: udp://127.0.0.1:{core.port}\n"
        f"admin: {{listen: 127.0.0.1:{_free_tcp_port()}, token_file: token}}\n"
    )
    cfg = load_config(path)
    server = Server(cfg, load=lambda: load_config(path))
    await server.start()
    assert cfg.http.host_port is not None
    url = f"http://127.0.0.1:{cfg.http.host_port[1]}"
    try:
        (tmp_path / "token").write_text("new-secret\n")
        status, body = await request("POST", url + "/reload", token="old-secret")
        assert status == 200 and body["changed"] == ["admin.token_file"], body
        assert (await request("GET", url + "/suspensions", token="old-secret"))[0] == 401
        assert (await request("GET", url + "/suspensions", token="new-secret"))[0] == 200
        (tmp_path / "token").write_text("")
        status, body = await request("POST", url + "/reload", token="new-secret")
        assert status == 422 and body["errors"][0]["field"] == "admin.token_file", body
        assert (await request("GET", url + "/suspensions", token="new-secret"))[0] == 200
    finally:
        await server.stop()


async def test_a_reload_refuses_an_admin_section_the_process_could_not_start_with(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """A reload (through the loader `run` gives the server) of a file whose admin section
    `check-config` and the next start would refuse — a token file that cannot be read, an
    API off loopback without one — is refused naming the field and its line, counted and
    logged as any refused reload; the running config and token stay."""
    _, core = peers
    (tmp_path / "token").write_text("s3cret\n")
    path = tmp_path / "sipguard.yaml"
    admin_port = _free_tcp_port()
    head = (f"listen: [udp://127.0.0.1:{_free_udp_port()}]\n"
            f"core: udp://127.0.0.1:{core.port}\n")
    path.write_text(head + f"admin:\n  listen: 127.0.0.1:{admin_port}\n  token_file: token\n")
    args = cli.build_parser().parse_args(["run", "--config", str(path)])
    source = cli.ConfigSource(str(path), args)
    server = Server(source.load(), load=source.load, config_file=str(path))
    await server.start()
    url = f"http://127.0.0.1:{admin_port}"
    try:
        with structlog.testing.capture_logs() as logs:
            for admin, field, line, words in (
                (f"admin:\n  listen: 127.0.0.1:{admin_port}\n  token_file: /nonexistent/t\n",
                 "admin.token_file", 5, "cannot read admin token_file /nonexistent/t"),
                (f"admin:\n  listen: 0.0.0.0:{admin_port}\n", "admin.listen", 4,
                 "is not loopback-only: set admin.token_file"),
            ):
                path.write_text(head + admin + "rules:\n  concurrency: {per_caller: 1}\n")
                failed = server.counters["config_reload_failed"]
                status, body = await request("POST", url + "/reload", token="s3cret")
                assert status == 422 and body["applied"] is False, body
                (error,) = body["errors"]
                assert (error["file"], error["line"], error["field"]) == (str(path), line, field)
                assert words in error["message"], error
                assert server.counters["config_reload_failed"] == failed + 1
                assert server.cfg.rules.concurrency is None  # the old config stays
                assert (await request("GET", url + "/suspensions", token="s3cret"))[0] == 200
        refused = [e for e in logs if e["event"] == "config_reload_failed"]
        assert len(refused) == 2 and not [e for e in logs if e["event"] == "config_reloaded"]
        assert f"{path}:5: admin.token_file: cannot read" in refused[0]["errors"][0]
    finally:
        await server.stop()


async def test_non_loopback_admin_without_token_refuses_to_start(
    peers: tuple[Peer, Peer],
) -> None:
    """An admin API on a non-loopback address with no token file is a one-line StartupError."""
    _, core = peers
    cfg = parse_config(
        f"listen: [udp://127.0.0.1:{_free_udp_port()}]\ncore: udp://127.0.0.1:{core.port}\n"
        f"admin: {{listen: 0.0.0.0:{_free_tcp_port()}}}\n"
    )
    server = Server(cfg)
    with pytest.raises(StartupError, match="not loopback-only: set admin.token_file"):
        await server.start()
    assert not server.listening


def test_metrics_is_the_old_name_of_admin_and_both_is_an_error() -> None:
    """`metrics:` alone configures the admin endpoint; `admin:` and `metrics:` together is an
    error naming the field and its line."""
    base = "listen: [udp://127.0.0.1:5060]\ncore: udp://127.0.0.1:5080\n"
    cfg = parse_config(base + "metrics: {listen: 127.0.0.1:9999}\n")
    assert cfg.http.host_port == ("127.0.0.1", 9999)
    with pytest.raises(ConfigError) as err:
        parse_config(base + "admin: {listen: 127.0.0.1:9999}\nmetrics: {listen: 127.0.0.1:9}\n")
    (issue,) = err.value.issues
    assert issue.path == "metrics" and issue.line == 4 and "admin" in issue.message


async def test_requests_aiohttp_cannot_read_are_json_400s_and_one_sampled_line(
    tmp_path: Path, peers: tuple[Peer, Peer], capfd: pytest.CaptureFixture[str]
) -> None:
    """An over-long header or a garbage request line, before any token check: a JSON 400
    that does not echo the request, counted admin_bad_requests, one admin_bad_request line per
    source per interval, no traceback on stderr; the API answers as before after them."""
    _, core = peers
    (tmp_path / "token").write_text("s3cret\n")
    guard = await start_guard(tmp_path, core, ports=None)
    guard.server.http.token = b"s3cret"  # type: ignore[union-attr]

    async def raw(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", guard.admin_port)
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer

    try:
        with structlog.testing.capture_logs() as logs:
            answers = [await raw(b"GET /suspensions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: "
                                 + b"a" * 9000 + b"\r\n\r\n") for _ in range(5)]
            answers.append(await raw(b"\x16\x03\x01 garbage\r\n\r\n"))
        for answer in answers:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.") and b" 400 " in head.split(b"\r\n")[0], answer
            assert b"application/json" in head.lower(), head
            error = json.loads(body)["error"]
            assert error in ("request line or header longer than 8190 bytes",
                             "not an HTTP request", "malformed HTTP request"), error
            assert b"aaaa" not in body
        assert guard.server.counters["admin_bad_requests"] == 6
        lines = [e for e in logs if e["event"] == "admin_bad_request"]
        assert len(lines) == 1 and lines[0]["source"] == "127.0.0.1", lines
        assert lines[0]["status"] == 400
        assert (await request("GET", guard.url + "/suspensions", token="s3cret"))[0] == 200
        server = guard.server

        class Broken:
            """The server as the admin API's control, its config view a bug."""

            def __getattr__(self, name: str) -> Any:
                return getattr(server, name)

            def config_view(self) -> Any:
                raise RuntimeError("a bug")

        assert server.http is not None
        server.http.control = Broken()  # type: ignore[assignment]
        with structlog.testing.capture_logs() as logs:
            status, body = await request("GET", guard.url + "/config", token="s3cret")
        assert (status, body) == (500, {"error": "internal error"})
        (line,) = [e for e in logs if e["event"] == "admin_error"]
        assert "RuntimeError: a bug" in line["traceback"]
        assert server.counters["admin_errors"] == 1
    finally:
        with structlog.testing.capture_logs() as logs:
            await guard.server.stop()
    (flushed,) = [e for e in logs if e["event"] == "sampled_suppressed"]
    assert (flushed["of"], flushed["suppressed"]) == ("admin_bad_request", 5)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error handling request" not in err, err


async def test_bad_requests_are_json_4xx(tmp_path: Path, peers: tuple[Peer, Peer]) -> None:
    """Bad JSON, missing or bad fields and unknown paths are 4xx with {"error": ...}."""
    _, core = peers
    guard = await start_guard(tmp_path, core)
    url = guard.url
    try:
        status, body = await request("POST", url + "/suspensions", raw=b"{not json")
        assert status == 400 and body == {"error": "body is not valid JSON"}
        status, body = await request("POST", url + "/suspensions", {"reason": "x"})
        assert status == 400 and "exactly one of number, prefix" in body["error"]
        status, body = await request("POST", url + "/suspensions", {"number": "bob"})
        assert status == 400 and "not a number" in body["error"]
        for bad in (b"-1", b"NaN", b"Infinity", b"1e300"):
            raw = b'{"number": "+31201234567", "expires": ' + bad + b"}"
            status, body = await request("POST", url + "/suspensions", raw=raw)
            assert status == 400 and "expires" in body["error"], bad
        status, body = await request("POST", url + "/suspensions", {"number": "+1" + "2" * 40})
        assert status == 400 and "digits" in body["error"]
        deep = b"[" * 30000 + b"]" * 30000  # deeper than Python's recursion: 400, no traceback
        status, body = await request("POST", url + "/suspensions", raw=deep)
        assert status == 400 and body == {"error": "body is not valid JSON"}
        assert guard.server.suspensions_view() == []
        status, body = await request("DELETE", url + "/suspensions/%2B31209999999")
        assert status == 404 and "not suspended" in body["error"]
        status, body = await request("GET", url + "/nope")
        assert status == 404 and "error" in body
        status, body = await request("GET", url + "/calls")
        assert status == 400 and "number" in body["error"]
    finally:
        await guard.server.stop()


# --------------------------------------------------------------------------- suspensions


async def test_suspend_then_unsuspend_gates_the_next_invite(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """A suspended caller's next INVITE gets 403 with a Reason header; once lifted it passes."""
    caller, core = peers
    guard = await start_guard(tmp_path, core)
    try:
        status, body = await request("POST", guard.url + "/suspensions", {
            "number": "+31201234567", "reason": "fraud", "by": "alice",
        })
        assert status == 201 and body["suspension"]["number"] == "+31201234567"
        caller.sock.sendto(invite(caller, guard.port, "s-1", caller="+31201234567"),
                           ("127.0.0.1", guard.port))
        refused = await caller.recv_until(b"SIP/2.0 4")
        assert refused.startswith(b"SIP/2.0 403 ")
        assert b'Reason: SIP;cause=403;text="Caller number suspended"' in refused
        status, body = await request("GET", guard.url + "/suspensions")
        assert [s["number"] for s in body["suspensions"]] == ["+31201234567"]
        status, body = await request("DELETE", guard.url + "/suspensions/%2B31201234567")
        assert status == 200 and body["lifted"] == "+31201234567"
        caller.sock.sendto(invite(caller, guard.port, "s-2", caller="+31201234567"),
                           ("127.0.0.1", guard.port))
        assert b"Call-ID: s-2" in await core.recv_until(b"INVITE ")
    finally:
        await guard.server.stop()


async def test_prefix_suspension_covers_the_called_number(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """A prefix suspension refuses an INVITE to a number under it (callee_suspended)."""
    caller, core = peers
    guard = await start_guard(tmp_path, core)
    try:
        status, _ = await request("POST", guard.url + "/suspensions", {"prefix": "+1800555*"})
        assert status == 201
        caller.sock.sendto(invite(caller, guard.port, "p-1"), ("127.0.0.1", guard.port))
        refused = await caller.recv_until(b"SIP/2.0 4")
        assert b'text="Callee number suspended"' in refused
    finally:
        await guard.server.stop()


async def test_end_calls_sends_bye_to_both_sides(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """Suspending with end_calls ends the number's answered call: the core and the caller
    each get a BYE, and the answer counts the call."""
    caller, core = peers
    guard = await start_guard(tmp_path, core)
    try:
        await answered_call(guard, caller, core, "e-1", "+31201234567")
        status, body = await request("GET", guard.url + "/calls?number=+31201234567")
        assert status == 200 and [c["call_id"] for c in body["calls"]] == ["e-1"]
        status, body = await request("POST", guard.url + "/suspensions", {
            "number": "+31201234567", "end_calls": True, "reason": "fraud",
        })
        assert status == 201 and body["calls_ended"] == 1
        assert b"Call-ID: e-1" in await core.recv_until(b"BYE ")
        assert b"Call-ID: e-1" in await caller.recv_until(b"BYE ")
        status, body = await request("GET", guard.url + "/calls?number=+31201234567")
        assert body["calls"] == []
    finally:
        await guard.server.stop()


async def test_a_suspension_under_mode_monitor_says_it_is_only_monitored(
    tmp_path: Path, peers: tuple[Peer, Peer], capsys: pytest.CaptureFixture[str]
) -> None:
    """With a top-level mode: monitor, POST /suspensions with end_calls ends the number's call
    but its next INVITE is forwarded (monitored): the answer says so (`monitored: true` and a
    warning), and so does the CLI, on stderr; in enforce mode neither is there."""
    caller, core = peers
    guard = await start_guard(tmp_path, core, "mode: monitor\n")
    try:
        await answered_call(guard, caller, core, "m-1", "+31201234567")
        status, body = await request("POST", guard.url + "/suspensions", {
            "number": "+31201234567", "end_calls": True, "reason": "fraud",
        })
        assert status == 201 and body["calls_ended"] == 1 and body["monitored"] is True, body
        assert body["warning"].startswith("mode: monitor: its next INVITEs are only logged")
        assert "calls up were ended all the same" in body["warning"]
        assert b"Call-ID: m-1" in await core.recv_until(b"BYE ")
        caller.sock.sendto(invite(caller, guard.port, "m-2", caller="+31201234567"),
                           ("127.0.0.1", guard.port))
        assert b"Call-ID: m-2" in await core.recv_until(b"INVITE ")  # forwarded, monitored
        code = await asyncio.to_thread(cli.main, ["suspend", "+31201234568", "--admin",
                                                  guard.url])
        out = capsys.readouterr()
        printed = json.JSONDecoder().raw_decode(out.out[out.out.index("{\n"):])[0]
        assert code == 0 and printed["monitored"] is True, out.out
        assert "sipguard: warning: mode: monitor: its next INVITEs are only logged" in out.err
        assert "ended all the same" not in out.err
        guard.config.write_text(guard.config.read_text().replace("mode: monitor\n", ""))
        assert (await request("POST", guard.url + "/reload"))[1]["changed"] == ["mode"]
        status, body = await request("POST", guard.url + "/suspensions",
                                     {"number": "+31201234569"})
        assert status == 201 and "monitored" not in body and "warning" not in body
    finally:
        await guard.server.stop()


async def test_end_calls_ends_many_calls_a_batch_a_pass(
    tmp_path: Path, peers: tuple[Peer, Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suspension with end_calls ends its calls END_CALLS_BATCH a pass, the passes
    END_CALLS_PAUSE_S apart (here one a pass, 0.3 s apart: three calls): while the batches
    go the first call has ended and the others are up; the answer comes after the last
    batch and counts all three."""
    monkeypatch.setattr(server_module, "END_CALLS_BATCH", 1)
    monkeypatch.setattr(server_module, "END_CALLS_PAUSE_S", 0.3)
    caller, core = peers
    guard = await start_guard(tmp_path, core)
    try:
        for n in range(3):
            await answered_call(guard, caller, core, f"b-{n}", "+31201234567")
        suspending = asyncio.ensure_future(request("POST", guard.url + "/suspensions", {
            "number": "+31201234567", "end_calls": True, "reason": "fraud",
        }))
        await asyncio.sleep(0.15)
        status, body = await request("GET", guard.url + "/calls?number=+31201234567")
        assert len(body["calls"]) == 2, body  # one a pass
        status, body = await suspending
        assert status == 201 and body["calls_ended"] == 3
        ended = set()
        for _ in range(12):  # (unanswered, sipguard's BYEs come again)
            bye = await core.recv_until(b"BYE ")
            ended.add(bye.split(b"Call-ID: ", 1)[1].split(b"\r\n", 1)[0])
            if len(ended) == 3:
                break
        assert ended == {b"b-0", b"b-1", b"b-2"}
        status, body = await request("GET", guard.url + "/calls?number=+31201234567")
        assert body["calls"] == []
    finally:
        await guard.server.stop()


async def test_lifting_a_suspension_stops_its_batches_of_calls_to_end(
    tmp_path: Path, peers: tuple[Peer, Peer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suspension lifted while its calls are being ended a batch at a time ends no more:
    the calls of later batches stay up, and calls_ended counts only the calls it ended."""
    monkeypatch.setattr(server_module, "END_CALLS_BATCH", 1)
    monkeypatch.setattr(server_module, "END_CALLS_PAUSE_S", 0.3)
    caller, core = peers
    guard = await start_guard(tmp_path, core)
    try:
        for n in range(3):
            await answered_call(guard, caller, core, f"l-{n}", "+31201234567")
        suspending = asyncio.ensure_future(request("POST", guard.url + "/suspensions", {
            "number": "+31201234567", "end_calls": True, "reason": "mistake",
        }))
        await asyncio.sleep(0.15)
        status, _ = await request("DELETE", guard.url + "/suspensions/%2B31201234567")
        assert status == 200
        status, body = await suspending
        assert status == 201 and body["calls_ended"] == 1
        await asyncio.sleep(0.4)
        status, body = await request("GET", guard.url + "/calls?number=+31201234567")
        assert len(body["calls"]) == 2, body
    finally:
        await guard.server.stop()


async def test_suspensions_one_by_one_append_a_line_each_and_all_survive_a_restart(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """With state_dir, each API change appends one line to the journal (the snapshot is
    not rewritten per change), 30 suspensions sent at once (the admin API takes 32 connections from one address) all answer saved, a lift is a
    line too, and a restart loads them all and folds the journal into the snapshot."""
    caller, core = peers
    extra = f"state_dir: {tmp_path / 'state'}\n"
    guard = await start_guard(tmp_path, core, extra)
    snapshot = tmp_path / "state" / "suspensions.json"
    journal = tmp_path / "state" / "suspensions.journal"
    try:
        before = snapshot.stat()
        for n in range(20):
            status, body = await request("POST", guard.url + "/suspensions",
                                         {"number": f"+312012{n:05d}", "reason": "fraud"})
            assert status == 201 and body["saved"] is True
        assert len(journal.read_bytes().splitlines()) == 20
        answers = await asyncio.gather(*(
            request("POST", guard.url + "/suspensions", {"number": f"+312013{n:05d}"})
            for n in range(30)))
        assert all(status == 201 and body["saved"] is True for status, body in answers)
        status, body = await request("DELETE", guard.url + "/suspensions/%2B31201200000")
        assert status == 200 and body["saved"] is True
        assert len(journal.read_bytes().splitlines()) == 51
        after = snapshot.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    finally:
        await guard.server.stop()
    guard = await start_guard(tmp_path, core, extra)
    try:
        status, body = await request("GET", guard.url + "/suspensions")
        assert len(body["suspensions"]) == 49
        assert journal.stat().st_size == 0  # folded in at the start
        caller.sock.sendto(invite(caller, guard.port, "j-1", caller="+31201300029"),
                           ("127.0.0.1", guard.port))
        assert (await caller.recv_until(b"SIP/2.0 4")).startswith(b"SIP/2.0 403 ")
    finally:
        await guard.server.stop()


async def test_suspension_survives_a_restart(tmp_path: Path, peers: tuple[Peer, Peer]) -> None:
    """With state_dir set, an API suspension is saved and is in force after a restart; an
    expired one is dropped on load."""
    caller, core = peers
    extra = f"state_dir: {tmp_path / 'state'}\n"
    guard = await start_guard(tmp_path, core, extra)
    try:
        status, body = await request("POST", guard.url + "/suspensions", {
            "number": "+31201234567", "reason": "fraud", "by": "alice",
        })
        assert status == 201 and body["saved"] is True
        status, body = await request("POST", guard.url + "/suspensions",
                                     {"number": "+31207654321", "expires": 0.05})
        assert status == 201
        await asyncio.sleep(0.1)
    finally:
        await guard.server.stop()
    assert (tmp_path / "state" / "suspensions.json").exists()
    guard = await start_guard(tmp_path, core, extra)  # a new process: new ports
    try:
        status, body = await request("GET", guard.url + "/suspensions")
        (entry,) = body["suspensions"]
        assert entry["number"] == "+31201234567" and entry["by"] == "alice"
        caller.sock.sendto(invite(caller, guard.port, "r-1", caller="+31201234567"),
                           ("127.0.0.1", guard.port))
        assert (await caller.recv_until(b"SIP/2.0 4")).startswith(b"SIP/2.0 403 ")
    finally:
        await guard.server.stop()


def _bulk(guard: Guard, keys: list[str]) -> None:
    """Suspensions straight into the running server's store (thousands through POST would
    take seconds); the API then lists what the store holds."""
    now = guard.server.loop.time()
    for key in keys:
        guard.server.state.suspensions.add(key, "bulk", "test", now)


def _listed_key(item: dict[str, Any]) -> str:
    return suspension_key(item.get("number") or item["prefix"])


async def _every_page(url: str, query: str, start: str | None = None
                      ) -> tuple[list[dict[str, Any]], list[Any]]:
    """Every page of GET /suspensions?query (after ``start``), following ``next``: the
    entries, the answers."""
    items: list[dict[str, Any]] = []
    pages: list[Any] = []
    after = "" if start is None else "&after=" + quote(start, safe="")
    while len(pages) < 100:
        status, body = await request("GET", f"{url}/suspensions?{query}{after}")
        assert status == 200, body
        pages.append(body)
        items += body["suspensions"]
        if body["next"] is None:
            return items, pages
        after = "&after=" + quote(body["next"], safe="")
    raise AssertionError(f"no last page: {pages[-1]['next']!r} again and again")


async def test_suspensions_are_listed_a_page_at_a_time_each_once_in_key_order(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """2,500 API suspensions (numbers and prefixes, added out of order) and two config ones
    (one also an API one): pages of 1,000 list every entry once, in key order, with
    `total`, and `next` on all but the last; no ?limit gives 1,000. A suspension lifted
    before its page comes is not listed, one added after the cursor is."""
    _, core = peers
    guard = await start_guard(tmp_path, core, "suspended: ['+1 212 555 0000', '+4420000']\n")
    numbers = [f"+1212555{n:04d}" for n in range(2490)]
    prefixes = [f"+3120{n}*" for n in range(10)]
    keys = numbers[1::2] + prefixes + numbers[::2]
    _bulk(guard, keys)
    try:
        status, first = await request("GET", guard.url + "/suspensions")
        assert status == 200 and len(first["suspensions"]) == 1000
        assert first["total"] == 2502 and first["next"] == _listed_key(first["suspensions"][-1])
        items, pages = await _every_page(guard.url, "limit=1000")
        assert [len(p["suspensions"]) for p in pages] == [1000, 1000, 502]
        assert all(p["total"] == 2502 for p in pages)
        listed = [(_listed_key(i), i["source"]) for i in items]
        expected = sorted([(k, "api") for k in keys]
                          + [("+12125550000", "config"), ("+4420000", "config")])
        assert listed == expected
        assert items[0]["number"] == "+12125550000" and items[1]["number"] == "+1 212 555 0000"
        # the index follows changes between pages
        status, page = await request("GET", guard.url + "/suspensions?limit=1000")
        await request("DELETE", guard.url + "/suspensions/%2B12125552000")
        await request("POST", guard.url + "/suspensions", {"number": "+12125551500"})
        await request("DELETE", guard.url + "/suspensions/%2B12125552100")  # and back
        await request("POST", guard.url + "/suspensions", {"number": "+12125552100"})
        _bulk(guard, ["+12125559999"])
        rest, _ = await _every_page(guard.url, "limit=700", page["next"])
        rest_keys = [_listed_key(i) for i in rest]
        assert "+12125552000" not in rest_keys
        assert rest_keys.count("+12125551500") == rest_keys.count("+12125552100") == 1
        assert "+12125559999" in rest_keys
        assert rest_keys == sorted(rest_keys) and rest_keys[0] > page["next"]
    finally:
        await guard.server.stop()


async def test_suspensions_page_bounds_and_bad_cursors(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """?limit from 1 to 10,000 (else 400 naming the range); ?after and ?prefix must be a
    number or a prefix (else 400)."""
    _, core = peers
    guard = await start_guard(tmp_path, core)
    _bulk(guard, [f"+3161{n:07d}" for n in range(12)])
    try:
        for bad in ("0", "10001", "-1", "abc", "", "1.5"):
            status, body = await request("GET", guard.url + f"/suspensions?limit={bad}")
            assert status == 400 and "limit must be a whole number from 1 to 10000" \
                in body["error"], (bad, body)
        status, body = await request("GET", guard.url + "/suspensions?limit=10000")
        assert status == 200 and len(body["suspensions"]) == 12 and body["next"] is None
        status, body = await request("GET", guard.url + "/suspensions?limit=1")
        assert [i["number"] for i in body["suspensions"]] == ["+31610000000"]
        assert body["next"] == "+31610000000" and body["total"] == 12
        for bad in ("bob", "*", "%2B31x"):
            status, body = await request("GET", guard.url + f"/suspensions?after={bad}")
            assert status == 400 and "after must be" in body["error"], (bad, body)
        status, body = await request("GET", guard.url + "/suspensions?prefix=bob")
        assert status == 400 and "not a number" in body["error"]
        # a cursor past the end: an empty last page
        status, body = await request("GET", guard.url + "/suspensions?after=%2B9")
        assert status == 200 and body["suspensions"] == [] and body["next"] is None
    finally:
        await guard.server.stop()


async def test_suspensions_filtered_by_key_prefix(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """?prefix=+1212 lists the keys starting with it — numbers and narrower prefixes, not
    +12* nor +1213…; `total` counts them; it pages like the whole list; `+1212*` and
    separators mean the same."""
    _, core = peers
    guard = await start_guard(tmp_path, core, "suspended: ['+1 212 000 0001']\n")
    _bulk(guard, [f"+1212555{n:04d}" for n in range(30)] + [f"+1213555{n:04d}" for n in range(5)]
          + ["+12*", "+1212*", "+12125*"])
    try:
        items, pages = await _every_page(guard.url, "prefix=%2B1212&limit=7")
        keys = [_listed_key(i) for i in items]
        assert keys == sorted(["+1212*", "+12125*", "+12120000001",
                               *(f"+1212555{n:04d}" for n in range(30))])
        assert len(pages) == 5 and pages[0]["total"] == 33
        for spelled in ("%2B1212*", "%2B1%20212", "+1212"):  # a raw + stays a plus
            status, body = await request("GET", guard.url + f"/suspensions?prefix={spelled}")
            assert status == 200 and body["total"] == 33, spelled
    finally:
        await guard.server.stop()


async def test_suspension_cursors_are_sealed_when_numbers_are_hidden(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """log.numbers: masked — the entries show masked numbers and `next` is sealed (no digits
    of the key it stands for); it pages through all; a plain key or an altered cursor is
    refused (400)."""
    _, core = peers
    guard = await start_guard(tmp_path, core, "log: {numbers: masked}\n")
    _bulk(guard, [f"+3161{n:07d}" for n in range(25)])
    try:
        items, pages = await _every_page(guard.url, "limit=10")
        assert len(items) == 25 and len(pages) == 3
        cursor = pages[0]["next"]
        assert cursor.startswith("c.") and "3161" not in cursor
        assert all("*" in i["number"] for i in items)
        for bad in ("%2B31610000009", cursor[:-2] + ("AA" if cursor[-2:] != "AA" else "BB"),
                    "c.", "c.%25%25"):
            status, body = await request("GET", guard.url + f"/suspensions?after={bad}")
            assert status == 400 and "after must be" in body["error"], (bad, body)
    finally:
        await guard.server.stop()


async def test_cli_suspensions_lists_every_page(
    tmp_path: Path, peers: tuple[Peer, Peer], capsys: pytest.CaptureFixture[str],
) -> None:
    """`sipguard suspensions` follows `next` to the last page (pages of 1,000): every one
    of 2,500 once, in order; `--prefix` filters."""
    assert cli.LIST_PAGE == 1000
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # stdout: the CLI's
    _, core = peers
    guard = await start_guard(tmp_path, core)
    keys = [f"+4930{n:06d}" for n in range(2500)]
    _bulk(guard, keys[::-1])
    try:
        capsys.readouterr()
        assert await asyncio.to_thread(cli.main, ["suspensions", "--admin", guard.url]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [i["number"] for i in listed["suspensions"]] == keys
        assert listed["total"] == 2500
        assert await asyncio.to_thread(
            cli.main, ["suspensions", "--prefix", "+4930001", "--admin", guard.url]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [i["number"] for i in listed["suspensions"]] == keys[1000:2000]
    finally:
        await guard.server.stop()


# --------------------------------------------------------------------------- reload


async def test_reload_reports_errors_and_applies_a_valid_file(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """POST /reload: a broken file is 422 with field and line and changes nothing; a valid
    changed one is applied and its new limit holds for the next INVITE."""
    caller, core = peers
    guard = await start_guard(tmp_path, core)
    good = guard.config.read_text()
    try:
        loaded = guard.server.metrics.config_loaded
        guard.config.write_text(good + "sip:\n  max_message_size: 10\n")
        status, body = await request("POST", guard.url + "/reload")
        assert status == 422 and body["applied"] is False
        (error,) = body["errors"]
        assert error["field"] == "sip.max_message_size" and error["line"] == 5
        assert error["file"] == str(guard.config)
        assert guard.server.metrics.config_loaded == loaded  # the old config still runs
        # a number list with bad lines: the key's line in the config file, every bad line
        (tmp_path / "nums.txt").write_text("+1212555*\nnot-a-number\n+1646\n12a\n")
        guard.config.write_text(good + "peers:\n  - name: lab\n    networks: [127.0.0.9/32]\n"
                                "    numbers_file: nums.txt\n")
        status, body = await request("POST", guard.url + "/reload")
        assert status == 422 and body["applied"] is False
        (error,) = body["errors"]
        assert (error["file"], error["line"], error["field"]) == \
            (str(guard.config), 7, "peers[0].numbers_file"), error
        assert "nums.txt:2: 'not-a-number'" in error["message"]
        assert "nums.txt:4: '12a'" in error["message"], error
        guard.config.write_text(good + "rules:\n  concurrency: {per_caller: 1}\n")
        status, body = await request("POST", guard.url + "/reload")
        assert status == 200
        assert body == {"applied": True, "changed": ["rules"], "restart_needed": []}
        # sipguard_config_loaded_timestamp_seconds: when the running config was loaded
        assert guard.server.metrics.config_loaded > loaded
        caller.sock.sendto(invite(caller, guard.port, "l-1"), ("127.0.0.1", guard.port))
        await core.recv_until(b"INVITE ")
        caller.sock.sendto(invite(caller, guard.port, "l-2"), ("127.0.0.1", guard.port))
        assert (await caller.recv_until(b"SIP/2.0 4")).startswith(b"SIP/2.0 403 ")
        moved = re.sub(r"udp://127\.0\.0\.1:\d+\]", f"udp://127.0.0.1:{_free_udp_port()}]",
                       guard.config.read_text(), count=1)
        guard.config.write_text(moved)
        status, body = await request("POST", guard.url + "/reload")
        assert body["applied"] is True and body["restart_needed"] == ["listen"]
        assert guard.server.cfg.listen[0].port == guard.port
        # the log's level and format are set up at start: reported, kept as they run
        level = guard.server.cfg.log.level
        other = "debug" if level != "debug" else "error"
        guard.config.write_text(moved + f"log: {{level: {other}, numbers: masked}}\n")
        status, body = await request("POST", guard.url + "/reload")
        assert body["applied"] is True and "log.level" in body["restart_needed"], body
        assert guard.server.cfg.log.level == level and guard.server.cfg.log.numbers == "masked"
        # the UDP receive buffer is set when the socket opens: reported, kept; the rest of
        # the sip section is applied
        buffer = guard.server.cfg.sip.udp_receive_buffer
        guard.config.write_text(moved + f"log: {{level: {other}, numbers: masked}}\n"
                                f"sip: {{udp_receive_buffer: {buffer * 2}, t1_ms: 400}}\n")
        status, body = await request("POST", guard.url + "/reload")
        assert body["applied"] is True and "sip.udp_receive_buffer" in body["restart_needed"]
        assert guard.server.cfg.sip.udp_receive_buffer == buffer
        assert guard.server.cfg.sip.t1_ms == 400
        # the advertised address is in every live call's Record-Route: kept until a restart
        guard.config.write_text(moved + f"log: {{level: {other}, numbers: masked}}\n"
                                f"sip: {{udp_receive_buffer: {buffer * 2}, t1_ms: 400, "
                                "advertise: 'sg.example.net:5060'}\n")
        status, body = await request("POST", guard.url + "/reload")
        assert body["applied"] is True and "sip.advertise" in body["restart_needed"], body
        assert guard.server.cfg.sip.advertise is None
    finally:
        await guard.server.stop()


async def test_a_reload_after_a_number_list_edit_says_so(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """The config the same, its peer's numbers_file edited: the reload reads the list again
    and `changed` names the setting (not `[]`), in the answer and the log line."""
    _, core = peers
    (tmp_path / "nums.txt").write_text("+1212555*\n")
    guard = await start_guard(tmp_path, core, "peers:\n  - name: lab\n    networks: "
                              "[127.0.0.9/32]\n    numbers_file: nums.txt\n")
    try:
        status, body = await request("POST", guard.url + "/reload")
        assert status == 200 and body["changed"] == [], body
        (tmp_path / "nums.txt").write_text("+1212555*\n+1312555*\n")
        with structlog.testing.capture_logs() as logs:
            status, body = await request("POST", guard.url + "/reload")
        assert status == 200 and body["changed"] == ["peers[0].numbers_file"], body
        (line,) = [e for e in logs if e["event"] == "config_reloaded"]
        assert line["changed"] == ["peers[0].numbers_file"]
    finally:
        await guard.server.stop()


# --------------------------------------------------------------------------- views


async def test_calls_name_the_worker_and_a_worker_that_does_not_answer(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """As worker 0 of two: each call carries `worker`; the other worker is asked (here its
    port is closed) and named in `workers_unanswered`; with `scope=worker` it is not asked."""
    caller, core = peers
    guard = await start_guard(tmp_path, core)
    try:
        await answered_call(guard, caller, core, "w-1", "+31201234567")
        admin = guard.server.http
        assert admin is not None
        admin.worker = 0
        admin.peers = {1: f"http://127.0.0.1:{_free_tcp_port()}"}  # nothing listens there
        status, body = await request("GET", guard.url + "/calls?number=+31201234567")
        assert status == 200 and body["workers_unanswered"] == [1]
        (call,) = body["calls"]
        assert call["worker"] == 0 and call["caller"] == "+31201234567"
        status, body = await request("GET",
                                     guard.url + "/calls?number=+31201234567&scope=worker")
        assert status == 200 and "workers_unanswered" not in body and len(body["calls"]) == 1
    finally:
        await guard.server.stop()


async def test_metrics_of_every_worker_in_one_scrape(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """As worker 0 of three: /metrics holds its own samples and worker 1's (asked on its admin
    port), each labelled `worker`, one family per name; worker 2 does not answer and is
    `sipguard_worker_up 0`. `scope=worker` is this worker's alone, without the label."""
    from prometheus_client.parser import text_string_to_metric_families

    caller, core = peers
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = await start_guard(tmp_path / "a", core)
    second = await start_guard(tmp_path / "b", core)
    try:
        await answered_call(first, caller, core, "m-1", "+31201234567")
        await answered_call(second, caller, core, "m-2", "+31201234568")
        await answered_call(second, caller, core, "m-3", "+31201234569")
        admin = first.server.http
        assert admin is not None
        admin.worker = 0
        admin.peers = {1: second.url, 2: f"http://127.0.0.1:{_free_tcp_port()}"}
        status, text = await request("GET", first.url + "/metrics")
        assert status == 200
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert len(fams) == len(list(text_string_to_metric_families(text))), "one per name"
        accepted = {s.labels["worker"]: s.value for s in fams["sipguard_invites"].samples
                    if s.name == "sipguard_invites_total" and s.labels["verdict"] == "accept"}
        assert accepted == {"0": 1.0, "1": 2.0}
        live = {s.labels["worker"]: s.value for s in fams["sipguard_live_dialogs"].samples}
        assert live == {"0": 1.0, "1": 2.0}
        up = {s.labels["worker"]: s.value for s in fams["sipguard_worker_up"].samples}
        assert up == {"0": 1.0, "1": 1.0, "2": 0.0}
        counts = [s for s in fams["sipguard_decision_seconds"].samples
                  if s.name == "sipguard_decision_seconds_count"]
        assert {s.labels["worker"]: s.value for s in counts} == {"0": 1.0, "1": 2.0}

        # a burst of scrapes (no token needed) asks the other workers once, not once each
        other = second.server.http
        assert other is not None
        asked: list[int] = []
        snapshot = other.collector.snapshot

        def counted() -> Any:
            asked.append(1)
            return snapshot()

        other.collector.snapshot = counted  # type: ignore[method-assign]
        await asyncio.sleep(SCRAPE_REUSE_S + 0.05)  # the scrape above is too old to serve
        answers = await asyncio.gather(*(request("GET", first.url + "/metrics")
                                         for _ in range(20)))
        assert [status for status, _ in answers] == [200] * 20 and len(asked) == 1
        assert len({text for _, text in answers}) == 1
        other.collector.snapshot = snapshot  # type: ignore[method-assign]

        status, text = await request("GET", first.url + "/metrics?scope=worker")
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        (sample,) = [s for s in fams["sipguard_invites"].samples
                     if s.name == "sipguard_invites_total"]
        assert sample.value == 1.0 and "worker" not in sample.labels
        assert "sipguard_worker_up" not in fams

        status, snap = await request("GET", second.url + "/metrics?scope=worker&format=json")
        assert status == 200 and snap["gauges"]["live_dialogs"] == 2
        assert snap["invites"] == [["accept", "", "", 2]]
    finally:
        await first.server.stop()
        await second.server.stop()


async def test_calls_and_bans_shapes(tmp_path: Path, peers: tuple[Peer, Peer]) -> None:
    """GET /calls lists a live call with its fields and counts; GET /bans lists bans with the
    flood rule on (at most MAX_BANS_SHOWN, with their total; ?source= one), DELETE
    /bans/{source} lifts one."""
    caller, core = peers
    guard = await start_guard(tmp_path, core,
                              "rules:\n  concurrency: {per_caller: 5}\n  flood: {}\n")
    try:
        await answered_call(guard, caller, core, "c-1", "+31201234567")
        status, body = await request("GET", guard.url + "/calls?number=+31201234567")
        assert status == 200 and body["number"] == "+31201234567"
        (call,) = body["calls"]
        assert set(call) == {"call_id", "caller", "from_shows", "callee", "diverters", "peer", "source",
                             "state", "age_s", "confirmed_s"}
        assert call["caller"] == "+31201234567" and call["callee"] == "+18005550199"
        assert body["counts"] == {"caller": 1, "callee": 0, "diverter": 0}
        status, body = await request("GET", guard.url + "/calls?number=%2B3120*")
        assert len(body["calls"]) == 1 and body["counts"] is None and "truncated" not in body
        # a prefix matching more calls than MAX_CALLS_SHOWN: a bounded answer that says so
        dialogs = guard.server.proxy.dialogs
        live = next(iter(dialogs.values()))
        for i in range(MAX_CALLS_SHOWN + 5):
            dialogs[f"made-up-{i}"] = live
        try:
            status, body = await request("GET", guard.url + "/calls?number=%2B31*")
            assert len(body["calls"]) == MAX_CALLS_SHOWN and body["truncated"] is True
        finally:
            for i in range(MAX_CALLS_SHOWN + 5):
                del dialogs[f"made-up-{i}"]
        status, body = await request("GET", guard.url + "/bans")
        assert status == 200 and body == {"bans": [], "total": 0}
        bans = guard.server.state.flood.bans
        bans.clear()
        now = guard.server.loop.time()
        bans["192.0.2.7"] = Ban(now, now + 60, "flood")
        status, body = await request("GET", guard.url + "/bans")
        (ban,) = body["bans"]
        assert ban["source"] == "192.0.2.7" and ban["reason"] == "flood" and body["total"] == 1
        # a botnet's worth of bans: a bounded answer that says so, and one found by ?source=
        for i in range(MAX_BANS_SHOWN + 50):
            bans[f"198.18.{i // 256}.{i % 256}"] = Ban(now, now + 60, "flood")
        bans["198.18.200.1"] = Ban(now - 120, now - 60, "flood")  # ended: not listed
        status, body = await request("GET", guard.url + "/bans")
        assert len(body["bans"]) == MAX_BANS_SHOWN and body["truncated"] is True
        assert body["total"] == MAX_BANS_SHOWN + 51
        status, body = await request("GET", guard.url + "/bans?source=198.18.3.250")
        assert [b["source"] for b in body["bans"]] == ["198.18.3.250"] and body["total"] == 1
        status, body = await request("GET", guard.url + "/bans?source=198.18.200.1")
        assert body == {"bans": [], "total": 0}
        for i in range(MAX_BANS_SHOWN + 50):
            del bans[f"198.18.{i // 256}.{i % 256}"]
        status, body = await request("DELETE", guard.url + "/bans/192.0.2.7")
        assert status == 200 and body == {"lifted": "192.0.2.7"}
        assert (await request("DELETE", guard.url + "/bans/192.0.2.7"))[0] == 404
    finally:
        await guard.server.stop()


def test_store_matches_exact_and_prefix_and_expires() -> None:
    """The store matches exact numbers and the longest live prefix; expired entries stop
    matching and are swept."""
    store = SuspensionStore()
    store.add(suspension_key("+31 20 123 4567"), "r", "a", 0.0)
    store.add(suspension_key("+3120*"), "p", "a", 0.0, ttl=10)
    assert store.match("+31201234567", 5.0) is not None
    assert store.match("+31209999999", 5.0) is not None
    assert store.match("+31209999999", 11.0) is None
    assert store.match("+3130", 5.0) is None and store.match(None, 5.0) is None
    assert [e.key for e in store.sweep(11.0)] == ["+3120*"]
    assert len(store) == 1
    with pytest.raises(ValueError):
        suspension_key("*")


def test_suspending_again_keeps_the_reason_author_and_age_unless_given() -> None:
    """The documented sequence — suspend with a reason, then again with --end-calls — keeps
    the ticket; a new reason or author replaces the old; an expired entry starts afresh."""
    store = SuspensionStore()
    store.add("+12125550199", "fraud ticket 4711", "noc", 10.0)
    again = store.add("+12125550199", "", "", 20.0, ttl=60)
    assert (again.reason, again.by, again.created, again.expires) == (
        "fraud ticket 4711", "noc", 10.0, 80.0)
    assert store.add("+12125550199", "ticket 4712", "", 30.0).reason == "ticket 4712"
    store.add("+3120*", "p", "a", 0.0, ttl=5)
    fresh = store.add("+3120*", "", "", 50.0)
    assert (fresh.reason, fresh.created) == ("", 50.0)
    # keep_expiry (no expiry given): a suspension for an hour stays one for an hour
    store.add("+4420*", "t", "a", 0.0, ttl=3600)
    assert store.add("+4420*", "", "", 10.0, keep_expiry=True).expires == 3600.0
    assert store.add("+4420*", "", "", 20.0, ttl=60, keep_expiry=True).expires == 80.0
    assert store.add("+4420*", "", "", 30.0).expires is None  # null given: permanent


async def test_suspending_again_over_the_api_keeps_the_expiry_unless_given(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """POST a suspension for an hour, then again with only end_calls (how the docs say to end
    its calls): still an hour, same author; "expires": null makes it permanent."""
    _, core = peers
    guard = await start_guard(tmp_path, core)
    url = guard.url + "/suspensions"
    try:
        status, body = await request("POST", url, {"number": "+12125559301", "reason": "t1",
                                                  "by": "alice", "expires": 3600})
        assert status == 201
        status, body = await request("POST", url, {"number": "+12125559301",
                                                  "end_calls": True})
        shown = body["suspension"]
        assert status == 201 and shown["by"] == "alice" and shown["reason"] == "t1"
        assert 3590 < shown["expires_in_s"] <= 3600
        status, body = await request("POST", url, {"number": "+12125559301", "expires": None})
        assert body["suspension"]["expires_in_s"] is None
    finally:
        await guard.server.stop()


async def test_a_number_without_a_plus_is_suspended_with_a_warning(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    caller, core = peers
    guard = await start_guard(tmp_path, core)
    try:
        status, body = await request("POST", guard.url + "/suspensions",
                                     {"number": "2125550199", "reason": "x"})
        assert status == 201 and body["warning"].startswith("no leading +"), body
        status, body = await request("POST", guard.url + "/suspensions",
                                     {"number": "+12125550199", "reason": "x"})
        assert status == 201 and "warning" not in body
    finally:
        await guard.server.stop()


# --------------------------------------------------------------------------- shared state


async def test_readyz_is_unready_from_the_start_until_redis_answers(
    tmp_path: Path, peers: tuple[Peer, Peer], capfd: pytest.CaptureFixture[str],
) -> None:
    """fail: closed and Redis down at start: /readyz is unready before any call failed, and
    ready once Redis answers. A refused password is logged as what it is, not as a Redis
    that did not answer, and keeps the instance unready."""
    from tests.redis_server import RedisServer

    _, core = peers
    server = RedisServer(tmp_path / "redis", None, "--requirepass", "s3cret")
    (tmp_path / "a").mkdir()
    guard = await start_guard(
        tmp_path / "a", core,
        f"state: {{backend: redis, url: 'redis://:s3cret@127.0.0.1:{server.port}/0', "
        "fail: closed, timeout_ms: 100, breaker_failures: 1}\n",
    )
    try:
        status, body = await request("GET", f"{guard.url}/readyz")
        assert (status, body) == (503, {"ready": False, "state": "unreachable"})
        server.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        while (await request("GET", f"{guard.url}/readyz"))[0] != 200:
            assert loop.time() - started < 1.5, "not ready after Redis came up"
            await asyncio.sleep(0.05)
    finally:
        await guard.server.stop()
    (tmp_path / "b").mkdir()
    capfd.readouterr()
    guard = await start_guard(
        tmp_path / "b", core,
        f"state: {{backend: redis, url: 'redis://:wrong@127.0.0.1:{server.port}/0', "
        "fail: closed, timeout_ms: 100}\n",
    )
    try:
        await asyncio.sleep(0.1)
        status, body = await request("GET", f"{guard.url}/readyz")
        assert (status, body) == (503, {"ready": False, "state": "unreachable"})
    finally:
        await guard.server.stop()
        server.stop()
    out = capfd.readouterr()
    text = out.out + out.err
    assert "did not answer" not in text, text
    refused = [line for line in text.splitlines() if "authentication failed" in line]
    assert len(refused) == 2, text
    assert "shared_lists_not_loaded" in refused[0] and "state_unreachable" in refused[1]
    assert "wrong" not in text


async def test_readyz_and_calls_report_the_shared_state(
    tmp_path: Path, peers: tuple[Peer, Peer], redis_url: str
) -> None:
    """With Redis: /calls adds the counts of every instance; with fail: closed and Redis
    unreachable, calls hear 503 and /readyz is unready, naming the state."""
    caller, core = peers
    guard = await start_guard(
        tmp_path, core,
        f"state: {{backend: redis, url: '{redis_url}'}}\n"
        "rules:\n  concurrency: {per_caller: 5}\n",
    )
    try:
        await answered_call(guard, caller, core, "shared-1", "+12125550100")
        status, body = await request("GET", f"{guard.url}/calls?number=%2B12125550100")
        assert status == 200 and body["counts_all_instances"]["caller"] == 1
        status, body = await request("GET", f"{guard.url}/readyz")
        assert (status, body) == (200, {"ready": True, "state": "ok"})
        status, text = await request("GET", f"{guard.url}/metrics")
        assert re.search(r"^sipguard_state_available 1\.0$", text, re.M), text
        assert re.search(r"^sipguard_shared_lists_pending 0\.0$", text, re.M), text
    finally:
        await guard.server.stop()
    dead = _free_tcp_port()
    (tmp_path / "closed").mkdir()
    guard = await start_guard(
        tmp_path / "closed", core,
        f"state: {{backend: redis, url: 'redis://127.0.0.1:{dead}/0', fail: closed, "
        "breaker_failures: 1, timeout_ms: 100}\nrules:\n  concurrency: {per_caller: 5}\n",
    )
    try:
        caller.sock.sendto(invite(caller, guard.port, "shared-2"), ("127.0.0.1", guard.port))
        assert (await caller.recv_until(b"SIP/2.0 503")).startswith(b"SIP/2.0 503 ")
        status, body = await request("GET", f"{guard.url}/readyz")
        assert (status, body) == (503, {"ready": False, "state": "unreachable"})
    finally:
        await guard.server.stop()


def _backlogs(port: int) -> list[int]:
    """The accept-queue size of each socket listening on TCP ``port`` (`ss`: a listening
    socket's Send-Q is its backlog)."""
    out = subprocess.run(["ss", "-Hltn", "sport", "=", f":{port}"], capture_output=True,
                         text=True, check=True).stdout
    return [int(line.split()[2]) for line in out.splitlines()]


async def test_the_tcp_accept_queue_is_the_configured_backlog_and_a_reload_resizes_it(
        tmp_path: Path, peers: tuple[Peer, Peer]) -> None:
    """sip.tcp_listen_backlog is each TCP listener's accept queue; a reload resizes it on
    the listening socket (no new socket, no connection refused meanwhile). /metrics shows the
    fullest queue's fill and the kernel's count of connections full queues turned away."""
    _, core = peers
    sip_port, admin_port = _free_tcp_port(), _free_tcp_port()
    path = tmp_path / "sipguard.yaml"
    base = (f"listen: [udp://127.0.0.1:{_free_udp_port()}, tcp://127.0.0.1:{sip_port}]\n"
            f"core: udp://127.0.0.1:{core.port}\n"
            f"admin: {{listen: 127.0.0.1:{admin_port}}}\n")
    path.write_text(base + "sip: {tcp_listen_backlog: 37}\n")
    server = Server(load_config(path), load=lambda: load_config(path))
    await server.start()
    try:
        assert _backlogs(sip_port) == [37]
        path.write_text(base + "sip: {tcp_listen_backlog: 600}\n")
        status, body = await request("POST", f"http://127.0.0.1:{admin_port}/reload")
        assert status == 200 and body["applied"] and body["changed"] == ["sip"], body
        assert _backlogs(sip_port) == [600]
        status, text = await request("GET", f"http://127.0.0.1:{admin_port}/metrics")
        assert re.search(r"^sipguard_tcp_accept_queue_ratio 0\.0$", text, re.M), text
        assert re.search(r"^sipguard_kernel_tcp_listen_overflows \d+\.0$", text, re.M), text
    finally:
        await server.stop()


async def test_a_reload_keeps_the_running_numbering_region_while_calls_are_counted_by_it(
    tmp_path: Path, peers: tuple[Peer, Peer]
) -> None:
    """per_caller 1, no default_region, a call up from 2125550100 (national). A reload that
    sets `default_region: US` (and a peer's) keeps the running region, reported as
    restart_needed — with it, the same caller's next call would have been counted under
    +12125550100 and let past its limit while the first is up; it still hears 403, and a
    suspension with end_calls of the number as it was counted ends the call."""
    caller, core = peers
    guard = await start_guard(tmp_path, core, "rules:\n  concurrency: {per_caller: 1}\n")
    good = guard.config.read_text()
    try:
        await answered_call(guard, caller, core, "reg-1", "2125550100")
        guard.config.write_text(good + "default_region: US\n")
        status, body = await request("POST", guard.url + "/reload")
        assert status == 200 and body["applied"] is True, body
        assert body["restart_needed"] == ["default_region"], body
        assert guard.server.cfg.default_region is None
        caller.sock.sendto(invite(caller, guard.port, "reg-2", caller="2125550100"),
                           ("127.0.0.1", guard.port))
        assert (await caller.recv_until(b"SIP/2.0 4")).startswith(b"SIP/2.0 403 ")
        status, body = await request("POST", guard.url + "/suspensions",
                                     {"number": "2125550100", "end_calls": True})
        assert status == 201 and body["calls_ended"] == 1, body
    finally:
        await guard.server.stop()
