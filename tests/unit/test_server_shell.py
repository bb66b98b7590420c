"""The asyncio shell without SIPp: a real Server on 127.0.0.1 sockets, driven by plain UDP
sockets in the test — the decide-later path, reloads, and events turned into counters and
log lines."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from collections.abc import Awaitable
from typing import Any

import pytest

from sipguard.contract import CallInfo, Failed, Flow, SourceFlagged, Verdict
from sipguard.ops.calllog import CallLogger
from sipguard.ops.config import LogSettings
from sipguard.ops.config_load import parse_config
from sipguard.ops.logging import SampledLogger, configure_logging, flush_logs
from sipguard.ops.metrics import Metrics
from sipguard.ops.observe import Observer
from sipguard.policy.pipeline import Pipeline
from sipguard.server import Server

from .udp_peer import Peer

pytestmark = pytest.mark.usefixtures("reset_structlog")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




def invite(peer: Peer, target: int, call_id: str, caller: str = "+12125550100") -> bytes:
    return (
        f"INVITE sip:+18005550199@127.0.0.1:{target} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{peer.port};branch=z9hG4bK-{call_id};rport\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:{caller}@127.0.0.1>;tag=t{call_id}\r\n"
        f"To: <sip:+18005550199@127.0.0.1>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:{caller}@127.0.0.1:{peer.port}>\r\nContent-Length: 0\r\n\r\n"
    ).encode()



async def start(core: Peer, rules: str = "") -> tuple[Server, int]:
    port = _free_udp_port()
    cfg = parse_config(f"listen: [udp://127.0.0.1:{port}]\ncore: udp://127.0.0.1:{core.port}\n"
                       f"{rules}")
    server = Server(cfg)
    await server.start()
    return server, port


class Later:
    """A rule that answers after a real await (like a certificate fetch)."""

    name = "later"
    mode = "enforce"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def decide(self, call: CallInfo, now: float) -> Awaitable[Verdict | None]:
        async def fetch() -> Verdict | None:
            await asyncio.sleep(0.01)
            if self.fail:
                raise RuntimeError("fetch blew up")
            return None

        return fetch()


async def test_a_decision_that_waits_for_io_is_resolved_through_the_core(
    peers: tuple[Peer, Peer],
) -> None:
    """An INVITE whose rule awaits reaches the core once the awaitable finishes."""
    caller, core = peers
    server, port = await start(core)
    try:
        server.policy.default = Pipeline([Later()])
        caller.sock.sendto(invite(caller, port, "io-1"), ("127.0.0.1", port))
        got = await core.recv_until(b"INVITE ")
        assert b"Call-ID: io-1" in got
    finally:
        await server.stop()


async def test_a_decision_that_raises_is_answered_500(peers: tuple[Peer, Peer]) -> None:
    """An awaited rule that raises: the caller hears 500, nothing reaches the core."""
    caller, core = peers
    server, port = await start(core)
    try:
        server.policy.default = Pipeline([Later(fail=True)])
        caller.sock.sendto(invite(caller, port, "io-2"), ("127.0.0.1", port))
        answer = await caller.recv_until(b"SIP/2.0 5")
        assert answer.startswith(b"SIP/2.0 500 ")
        with pytest.raises(TimeoutError):
            await core.recv_until(b"INVITE ", timeout=0.3)
        assert server.counters["internal_errors"] == 1
    finally:
        await server.stop()


async def test_concurrent_reloads_newest_wins(peers: tuple[Peer, Peer]) -> None:
    """Two reloads at once: only the newer one is swapped in, the older reports it lost."""
    caller, core = peers
    server, port = await start(core)
    try:
        base = f"listen: [udp://127.0.0.1:{port}]\ncore: udp://127.0.0.1:{core.port}\n"
        older = parse_config(base + "rules:\n  concurrency: {per_caller: 5}\n")
        newer = parse_config(base + "rules:\n  concurrency: {per_caller: 1}\n")
        results = await asyncio.gather(server.reload(older), server.reload(newer))
        assert results == [False, True]
        assert server.cfg is newer
        assert server.counters["reloads_superseded"] == 1
        # The newer limit is the one in force: one call passes, the second is refused.
        caller.sock.sendto(invite(caller, port, "r-1"), ("127.0.0.1", port))
        await core.recv_until(b"INVITE ")
        caller.sock.sendto(invite(caller, port, "r-2"), ("127.0.0.1", port))
        assert (await caller.recv_until(b"SIP/2.0 4")).startswith(b"SIP/2.0 403 ")
    finally:
        await server.stop()


async def test_reload_keeps_live_calls_counted(peers: tuple[Peer, Peer]) -> None:
    """A call admitted before a reload still holds its slot under the new policy."""
    caller, core = peers
    server, port = await start(core, "rules:\n  concurrency: {per_caller: 1}\n")
    try:
        caller.sock.sendto(invite(caller, port, "k-1"), ("127.0.0.1", port))
        await core.recv_until(b"INVITE ")
        assert await server.reload(server.cfg)
        caller.sock.sendto(invite(caller, port, "k-2"), ("127.0.0.1", port))
        assert (await caller.recv_until(b"SIP/2.0 4")).startswith(b"SIP/2.0 403 ")
    finally:
        await server.stop()


async def test_a_former_core_is_trusted_by_the_flood_guard_while_its_calls_are_up(
    peers: tuple[Peer, Peer],
) -> None:
    """A reload moves ``core`` from A to B with a call up on A: the flood guard keeps trusting
    A (its BYE must not be rate-limited). Once A's calls have ended, the next reload no
    longer trusts it — a core taken out of service keeps no exemption for its address."""
    caller, core = peers
    server, port = await start(core, "rules:\n  flood: {key: ip_port}\n")
    other = Peer()
    try:
        caller.sock.sendto(invite(caller, port, "f-1"), ("127.0.0.1", port))
        got = await core.recv_until(b"INVITE ")
        head = got.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        vias = [h for h in head if h.startswith(b"Via:")]
        keep = [h for h in head if h.split(b":", 1)[0] in (b"From", b"Call-ID", b"CSeq",
                                                          b"Record-Route")]
        ok = b"\r\n".join([b"SIP/2.0 200 OK", *vias, *keep,
                            b"To: <sip:+18005550199@127.0.0.1>;tag=core1",
                            f"Contact: <sip:agent@127.0.0.1:{core.port}>".encode(),
                            b"Content-Length: 0", b"", b""])
        core.sock.sendto(ok, ("127.0.0.1", port))
        answered = await caller.recv_until(b"SIP/2.0 200 ")
        assert len(server.proxy.dialogs) == 1
        [rr] = [h for h in answered.split(b"\r\n") if h.startswith(b"Record-Route:")]
        a = ("127.0.0.1", core.port)
        base = f"listen: [udp://127.0.0.1:{port}]\nrules:\n  flood: {{key: ip_port}}\n"
        moved = parse_config(base + f"core: udp://127.0.0.1:{other.port}\n")
        assert await server.reload(moved)
        flood = server.policy.flood
        assert flood is not None and a in flood.trusted
        assert ("127.0.0.1", other.port) in flood.trusted
        # the caller hangs up: its BYE goes on to A, A's 200 ends the call; then a reload
        bye = b"\r\n".join([
            f"BYE sip:agent@127.0.0.1:{core.port} SIP/2.0".encode(),
            f"Via: SIP/2.0/UDP 127.0.0.1:{caller.port};branch=z9hG4bK-f-1-bye;rport".encode(),
            b"Max-Forwards: 70", b"Route:" + rr.split(b":", 1)[1],
            b"From: <sip:+12125550100@127.0.0.1>;tag=tf-1",
            b"To: <sip:+18005550199@127.0.0.1>;tag=core1", b"Call-ID: f-1",
            b"CSeq: 2 BYE", b"Content-Length: 0", b"", b""])
        caller.sock.sendto(bye, ("127.0.0.1", port))
        got = await core.recv_until(b"BYE ")
        head = got.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        answer = b"\r\n".join([b"SIP/2.0 200 OK", *[h for h in head if h.split(b":", 1)[0] in
                                                     (b"Via", b"From", b"To", b"Call-ID",
                                                      b"CSeq")], b"Content-Length: 0", b"", b""])
        core.sock.sendto(answer, ("127.0.0.1", port))
        await caller.recv_until(b"SIP/2.0 200 ")
        assert not server.proxy.dialogs
        assert await server.reload(moved)
        flood = server.policy.flood
        assert flood is not None and a not in flood.trusted
        assert ("127.0.0.1", other.port) in flood.trusted
    finally:
        other.sock.close()
        await server.stop()


def _observer() -> tuple[Observer, io.StringIO]:
    out = io.StringIO()
    configure_logging(LogSettings(), out)
    from sipguard.ops.logging import get_logger

    log = get_logger("test")
    clock = [0.0]
    metrics = Metrics()
    return Observer(metrics, log, CallLogger("test"), SampledLogger(log, 1.0,
                                                                    clock=lambda: clock[0])), out


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    flush_logs()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_observer_logs_a_new_ban_once_and_counts_every_flagged_message() -> None:
    """SourceFlagged events: each is counted; a new ban also writes one source_banned line."""
    obs, out = _observer()
    obs.observe(SourceFlagged("flood", ("203.0.113.9", 5060), True, True))
    obs.observe(SourceFlagged("banned", ("203.0.113.9", 5060), False, True))
    assert obs.counters["flood_dropped_flood"] == 1
    assert obs.counters["flood_dropped_banned"] == 1
    assert obs.counters["flood_banned_flood"] == 1
    banned = [e for e in _lines(out) if e["event"] == "source_banned"]
    assert len(banned) == 1 and banned[0]["source"] == "203.0.113.9"


def test_observer_counts_and_logs_a_failure() -> None:
    """A Failed event is counted as internal_errors and logged with where it happened."""
    obs, out = _observer()
    obs.observe(Failed("decide", "Traceback ...", Flow("udp", ("198.51.100.7", 5062), 0)))
    assert obs.counters["internal_errors"] == 1
    lines = [e for e in _lines(out) if e["event"] == "message_failed"]
    assert lines and lines[0]["where"] == "decide" and lines[0]["source"] == "198.51.100.7"


async def test_garbage_collection_young_passes_freeze_survivors_full_pass_reaches_them(
    peers: tuple[Peer, Peer],
) -> None:
    """A cycle made since the last pass goes at the next (young) pass; what survives a pass is
    frozen, so a cycle that becomes garbage later waits for the full pass — which a due time
    while overloaded puts off, and which then finds it and is counted."""
    import gc

    from sipguard.ops.collector import FULL_PUT_OFF_S

    _, core = peers
    server, _ = await start(core)
    enabled = gc.isenabled()
    gc.disable()  # as the CLI leaves it: the passes are sipguard's own
    try:
        class Node:
            def __init__(self) -> None:
                self.me = self

        young = Node()
        del young
        server.collect_garbage()  # a young pass
        assert server.counters["gc_collected"] >= 1
        old = Node()
        server.collect_garbage()  # it survives a young pass: frozen now
        assert gc.get_freeze_count() > 0 and gc.get_count()[0] < 10
        ref = [old]
        del old
        ref.clear()  # garbage now, but frozen
        before = server.counters["gc_collected"]
        for _ in range(3):
            server.collect_garbage()
        assert server.counters["gc_collected"] == before
        now = server.loop.time()
        server.collector.full_at = now  # due
        server.core.overloaded = True
        server.collect_garbage()  # put off: a pause now would only deepen the queue
        assert server.counters["gc_full_runs"] == 0
        assert server.collector.full_at >= now + FULL_PUT_OFF_S - 1
        assert server.counters["gc_collected"] == before
        server.core.overloaded = False
        server.collector.full_at = now
        server.collect_garbage()  # the full pass
        assert server.counters["gc_full_runs"] == 1
        assert server.counters["gc_collected"] > before
        assert gc.get_freeze_count() > 0  # what survived it is frozen again
        gauges = server._gauges()
        assert gauges["gc_full_pause_seconds"] > 0
        assert gauges["gc_young_pause_max_seconds"] > 0
        assert server._gauges()["gc_young_pause_max_seconds"] == 0  # taken by the scrape
    finally:
        gc.unfreeze()  # give the test process its collector back
        if enabled:
            gc.enable()
        await server.stop()


async def test_garbage_collection_passes_leave_automatic_collection_alone(
    peers: tuple[Peer, Peer],
) -> None:
    """With the collector's automatic runs on (sipguard embedded, the test process) the
    passes do nothing: nothing of the host process is frozen."""
    import gc

    _, core = peers
    server, _ = await start(core)
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        server.collect_garbage()
        server.collector.full_at = 0.0
        server.collect_garbage()
        assert gc.get_freeze_count() == frozen
        assert server.counters["gc_full_runs"] == 0
    finally:
        await server.stop()


async def test_a_long_pass_sends_every_flush_every_datagrams(peers: tuple[Peer, Peer]) -> None:
    """Answers wait for the end of the event-loop pass, but no longer than FLUSH_EVERY
    datagrams: the INVITEs read early in a long pass reach the core while it goes on."""
    from sipguard.server import FLUSH_EVERY

    caller, core = peers
    server, port = await start(core)
    try:
        n = FLUSH_EVERY + 3
        for i in range(n):  # one pass of the loop: datagrams handed over back to back
            server._on_datagram(invite(caller, port, f"pass-{i}", f"+1212555{i:04d}"),
                                Flow("udp", ("127.0.0.1", caller.port), 0))
            # the 100 Trying and the forwarded INVITE of every datagram since the last send
            assert len(server.core.outbox) == 2 * ((i + 1) % FLUSH_EVERY), i
        got = [await core.recv_until(b"INVITE ") for _ in range(FLUSH_EVERY)]
        assert len(got) == FLUSH_EVERY
        await asyncio.sleep(0.05)  # the pass ends: the rest goes out
        assert not server.core.outbox
        rest = [await core.recv_until(b"INVITE ") for _ in range(n - FLUSH_EVERY)]
        assert len(rest) == n - FLUSH_EVERY
    finally:
        await server.stop()


async def test_notifies_for_the_cores_subscription_reach_it_over_udp(
    peers: tuple[Peer, Peer],
) -> None:
    """Real sockets: the core subscribes to a party outside through sipguard (BLF); the
    party's NOTIFY, routed back by sipguard's Record-Route, reaches the core, and one beyond
    ``sip.max_subscriptions`` is forgotten (counted; its NOTIFY hears 481)."""
    party, core = peers
    server, port = await start(core, "sip: {max_subscriptions: 1}\n")
    try:
        async def subscribe(call_id: str) -> bytes:
            core.sock.sendto((
                f"SUBSCRIBE sip:ext100@127.0.0.1:{party.port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{core.port};branch=z9hG4bK-{call_id};rport\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:agent@127.0.0.1>;tag=core-{call_id}\r\n"
                f"To: <sip:ext100@127.0.0.1>\r\nCall-ID: {call_id}\r\nCSeq: 1 SUBSCRIBE\r\n"
                f"Event: dialog\r\nExpires: 600\r\nContact: <sip:agent@127.0.0.1:{core.port}>\r\n"
                f"Content-Length: 0\r\n\r\n").encode(), ("127.0.0.1", port))
            got = await party.recv_until(b"SUBSCRIBE ")
            head = got.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
            ok = [h for h in head[1:] if h.split(b":", 1)[0] in
                  (b"Via", b"From", b"Call-ID", b"CSeq", b"Record-Route")]
            party.sock.sendto(b"\r\n".join([
                b"SIP/2.0 200 OK", *ok, b"To: <sip:ext100@127.0.0.1>;tag=pbx",
                f"Contact: <sip:ext100@127.0.0.1:{party.port}>".encode(), b"Expires: 600",
                b"Content-Length: 0", b"", b""]), ("127.0.0.1", port))
            await core.recv_until(b"SIP/2.0 200 ")
            return got

        async def notify(call_id: str, cseq: int = 1) -> None:
            party.sock.sendto((
                f"NOTIFY sip:agent@127.0.0.1:{core.port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{party.port};branch=z9hG4bK-{call_id}-{cseq};"
                f"rport\r\n"
                f"Route: <sip:127.0.0.1:{port};lr>\r\nMax-Forwards: 70\r\n"
                f"From: <sip:ext100@127.0.0.1>;tag=pbx\r\n"
                f"To: <sip:agent@127.0.0.1>;tag=core-{call_id}\r\nCall-ID: {call_id}\r\n"
                f"CSeq: {cseq} NOTIFY\r\nEvent: dialog\r\n"
                f"Subscription-State: active;expires=600\r\n"
                f"Content-Length: 0\r\n\r\n").encode(), ("127.0.0.1", port))

        got = await subscribe("blf-a")
        assert f"127.0.0.1:{port};lr".encode() in got  # record-routed
        await notify("blf-a")
        assert b"Call-ID: blf-a" in await core.recv_until(b"NOTIFY ")
        await subscribe("blf-b")  # the table holds one: blf-a is forgotten
        await notify("blf-a", 2)
        assert (await party.recv_until(b"SIP/2.0 ")).startswith(b"SIP/2.0 481 ")
        await notify("blf-b")
        assert b"Call-ID: blf-b" in await core.recv_until(b"NOTIFY ")
        assert server.counters["noticed_subscription_forgotten"] == 1
    finally:
        await server.stop()


async def test_sends_to_a_host_name_wait_for_one_lookup(peers: tuple[Peer, Peer]) -> None:
    """A core named by a host name: INVITEs sent before the name is resolved wait for one
    lookup of it (not a task and a resolver job each) and all reach the core; a name that
    does not resolve is not asked again for a while, its messages counted as send_failed."""
    caller, core = peers
    port = _free_udp_port()
    cfg = parse_config(f"listen: [udp://127.0.0.1:{port}]\ncore: udp://localhost:{core.port}\n")
    server = Server(cfg)
    await server.start()
    try:
        for i in range(3):
            caller.sock.sendto(invite(caller, port, f"dns-{i}"), ("127.0.0.1", port))
        got = {(await core.recv_until(b"INVITE ")).split(b"Call-ID: ")[1][:5] for _ in range(3)}
        assert got == {b"dns-0", b"dns-1", b"dns-2"}
        assert server.counters["resolve_failed"] == 0 and not server._resolving
        # a name that failed: its sends are dropped at once until UNRESOLVED_S has passed
        server._unresolved["nowhere.invalid"] = server.loop.time() + 30
        before = server.counters["send_failed"]
        server._send(Flow("udp", ("nowhere.invalid", 5060), 0), b"OPTIONS x SIP/2.0\r\n\r\n")
        assert server.counters["send_failed"] == before + 1 and not server._resolving
        # a name the resolver refuses before asking (a label of 64+ characters: UnicodeError)
        server._send(Flow("udp", ("a" * 70 + ".example", 5060), 0), b"OPTIONS x SIP/2.0\r\n\r\n")
        for _ in range(50):
            await asyncio.sleep(0.01)
            if not server._resolving:
                break
        assert not server._resolving and server.counters["resolve_failed"] == 1
    finally:
        await server.stop()


async def test_the_loops_busy_share_is_measured_and_moves_auto_signature_checks(
    peers: tuple[Peer, Peer],
) -> None:
    """Every load report (50 ms) the server measures its event loop's busy share (gauge
    ``event_loop_busy_ratio``): an idle loop reads near 0, a loop kept busy reads near 1, and
    the work threads can take (``auto``: signature checks, UDP sends) goes to them from
    ``OFFLOAD_ABOVE`` on, and comes back below ``OFFLOAD_BELOW``."""
    from sipguard.server import OFFLOAD_ABOVE, OFFLOAD_BELOW
    _, core = peers
    server, _ = await start(core)
    try:
        await asyncio.sleep(0.12)  # idle: two reports
        idle = server._gauges()["event_loop_busy_ratio"]
        assert 0.0 <= idle < 0.3, idle
        assert not server.offload and not server.verifier.offload
        end = time.monotonic() + 0.3
        while time.monotonic() < end:  # the loop's thread busy, then one report
            sum(range(1000))
        server._watch_load()
        busy = server._gauges()["event_loop_busy_ratio"]
        assert OFFLOAD_ABOVE <= busy <= 1.0, busy
        assert server.offload and server.verifier.offload
        server._busy_at -= 0.2  # 0.2 s with 0.12 s busy (0.6) since the last report: still busy
        server._busy_cpu -= 0.12
        server._watch_load()
        assert server.offload
        server._busy_at -= 1.0  # a second, next to nothing busy: back to the loop
        server._watch_load()
        assert server.loop_busy < OFFLOAD_BELOW and not server.offload
        assert not server.verifier.offload
    finally:
        await server.stop()
