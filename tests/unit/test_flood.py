"""Rule ``flood``: per-source density bans, scanners, REGISTER from unknown sources, peer
exemptions, ban operations, and the shell dropping before parsing."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sipguard.ops.config_load import ConfigError, parse_config
from sipguard.policy import flood
from sipguard.policy.engine import Policy
from sipguard.policy.flood import FloodGuard, FloodState
from sipguard.policy.state import RuleState
from sipguard.server import Server
from tests.unit.rule_calls import MINIMAL

OPTIONS = (
    b"OPTIONS sip:192.0.2.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.9:5060;branch=z9hG4bK1\r\n"
    b"From: <sip:x@203.0.113.9>;tag=1\r\nTo: <sip:192.0.2.1>\r\nCall-ID: c1\r\n"
    b"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nUser-Agent: Acme PBX 1.0\r\nContent-Length: 0\r\n"
    b"\r\n"
)
SCAN = OPTIONS.replace(b"User-Agent: Acme PBX 1.0", b"user-agent:  Friendly-Scanner 0.9")
REGISTER = OPTIONS.replace(b"OPTIONS sip:", b"REGISTER sip:").replace(b"1 OPTIONS", b"1 REGISTER")
SRC = ("203.0.113.9", 5060)


def make_guard(
    rules: str = "{sampling_s: 1, density: 10, ban_s: 30}",
    peers: str = "",
    state: RuleState | None = None,
    mode: str = "enforce",
) -> FloodGuard:
    """The guard a Policy builds (``policy.flood``) with ``mode`` as the top-level mode and the
    core trusted, as the shell builds it."""
    cfg = parse_config(MINIMAL + f"mode: {mode}\n" + peers + f"rules:\n  flood: {rules}\n")
    policy = Policy(cfg, RuleState() if state is None else state,
                    trusted=((cfg.core.host, cfg.core.port),))
    policy.activate()  # as the edge core does when it swaps the policy in
    g = policy.flood
    assert g is not None
    return g


def test_density_bans_the_source_for_ban_s() -> None:
    """The 11th message in one sampling unit (density 10) bans the source: it and every
    later one is dropped until ban_s passes; other sources are untouched."""
    g = make_guard()
    got = [g.check(SRC, OPTIONS, 100.0 + i * 0.01) for i in range(12)]
    assert got == [None] * 10 + [flood.FLOOD, flood.BANNED]
    assert g.check(("203.0.113.10", 5060), OPTIONS, 100.5) is None
    assert g.check(SRC, OPTIONS, 129.0) == flood.BANNED
    assert g.check(SRC, OPTIONS, 130.2) is None
    assert g.state.bans == {}


def test_burst_across_a_unit_boundary_is_seen() -> None:
    """8 messages at the end of one unit and 8 at the start of the next exceed density 10
    (the previous unit counts in proportion)."""
    g = make_guard()
    got = [g.check(SRC, OPTIONS, 100.9 + i * 0.01) for i in range(8)]
    got += [g.check(SRC, OPTIONS, 101.0 + i * 0.01) for i in range(8)]
    assert flood.FLOOD in got


def test_steady_rate_below_density_is_never_banned() -> None:
    """A source at 9 messages per unit for a minute is never banned."""
    g = make_guard()
    assert all(g.check(SRC, OPTIONS, 100.0 + i / 9) is None for i in range(9 * 60))


def test_core_is_never_checked() -> None:
    """Messages from the core address are never counted or dropped."""
    g = make_guard()
    assert all(g.check(("10.0.0.10", 5080), SCAN, 100.0) is None for _ in range(100))


def test_exempt_peer_and_peer_with_own_density() -> None:
    """A peer with flood disabled is never limited; a peer with its own density is limited
    only above it (ban_peers: true bans it there); exempt networks are never banned."""
    peers = (
        "peers:\n"
        "  - {name: pbx, networks: [203.0.113.0/24], rules: {flood: {density: 100}}}\n"
        "  - {name: carrier, networks: [198.51.100.0/24], rules: {flood: {enabled: false}}}\n"
    )
    g = make_guard(peers=peers,
                   rules="{sampling_s: 1, density: 10, ban_s: 30, exempt: [192.0.2.0/28]}")
    got = [g.check(SRC, OPTIONS, 100.0 + i * 0.001) for i in range(101)]
    assert got[:100] == [None] * 100 and got[100] == flood.PEER_LIMITED
    carrier = ("198.51.100.1", 5060)
    assert all(g.check(carrier, OPTIONS, 100.0) is None for _ in range(1000))
    assert all(g.check(("192.0.2.5", 5060), OPTIONS, 100.0) is None for _ in range(1000))
    assert g.check(("192.0.2.17", 5060), OPTIONS, 100.0) is None
    g = make_guard(peers=peers, rules="{sampling_s: 1, density: 10, ban_peers: true}")
    got = [g.check(SRC, OPTIONS, 100.0 + i * 0.001) for i in range(101)]
    assert got[:100] == [None] * 100 and got[100] == flood.FLOOD


def test_a_peers_own_density_below_the_default_applies() -> None:
    """A peer's own density replaces the default also when it is lower: density 5 for the
    peer under a default of 20 limits it after 5 (it was looked up only past the default's
    half, so the peer got 19 of a burst of 19 through)."""
    peers = "peers:\n  - {name: pbx, networks: [203.0.113.0/24], rules: {flood: {density: 5}}}\n"
    g = make_guard(peers=peers, rules="{sampling_s: 1, density: 20, ban_s: 30}")
    got = [g.check(SRC, OPTIONS, 100.0 + i * 0.001) for i in range(19)]
    assert got[:5] == [None] * 5 and set(got[5:]) == {flood.PEER_LIMITED}
    other = ("198.51.100.9", 5060)  # the default's 20 for everyone else
    got = [g.check(other, OPTIONS, 100.0 + i * 0.001) for i in range(21)]
    assert got == [None] * 20 + [flood.FLOOD]


def test_a_burst_across_the_boundary_gets_density_through_not_half_again() -> None:
    """20 messages just before a unit's end and 15 just after, density 20: the previous
    unit counts from the first message of the next (half the density more got through)."""
    g = make_guard(rules="{sampling_s: 1, density: 20, ban_s: 30}")
    got = [g.check(SRC, OPTIONS, 100.98 + i * 0.0005) for i in range(20)]
    got += [g.check(SRC, OPTIONS, 101.0 + i * 0.0005) for i in range(15)]
    assert got[:20] == [None] * 20
    assert sum(1 for r in got if r is None) <= 21 and flood.FLOOD in got


def test_exempt_networks_and_peers_with_the_rule_off_are_never_dropped() -> None:
    """exempt and a peer with flood off: never counted, dropped or banned — a scanner's
    User-Agent (a monitoring probe's 'sipcli') or a REGISTER from there too."""
    peers = "peers:\n  - {name: mon, networks: [198.51.100.0/24], rules: {flood: {enabled: false}}}\n"
    g = make_guard(peers=peers,
                   rules="{sampling_s: 1, density: 10, ban_s: 30, exempt: [192.0.2.0/28]}")
    for src in (("192.0.2.5", 5060), ("198.51.100.1", 5060)):
        assert g.check(src, SCAN, 100.0) is None and g.check(src, REGISTER, 100.0) is None
    assert g.check(SRC, SCAN, 100.0) == flood.SCANNER  # anyone else's scan
    assert g.check(("203.0.113.77", 5060), REGISTER, 100.0) == flood.REGISTER_UNKNOWN


CARRIER = "peers:\n  - {name: carrier, networks: [203.0.113.0/24]}\n"


def test_peer_over_the_density_is_limited_never_banned() -> None:
    """A flood from a configured peer's address (spoofed or not) drops what exceeds the
    density in the sampling unit as peer_limited, and bans nothing: the peer's next message
    after the unit passes, where a ban would hold it for ban_s. Others are still banned."""
    g = make_guard(peers=CARRIER)
    got = [g.check(SRC, OPTIONS, 100.0 + i * 0.001) for i in range(50)]
    assert got == [None] * 10 + [flood.PEER_LIMITED] * 40
    assert g.state.bans == {} and not g.banned(SRC)
    assert g.check(SRC, OPTIONS, 102.0) is None  # ban_s is 30: no ban held it
    stranger = ("192.0.2.77", 5060)
    got = [g.check(stranger, OPTIONS, 100.0 + i * 0.001) for i in range(12)]
    assert got[10:] == [flood.FLOOD, flood.BANNED] and g.banned(stranger)


def test_a_peer_over_its_density_still_gets_its_acks_byes_cancels_and_answers_through() -> None:
    """Over its density a peer's new requests are dropped, but its ACK, BYE, CANCEL and
    responses pass (a dropped BYE would keep the call and its slots up for hours); a stranger
    sending BYEs over the density is banned like any flood."""
    g = make_guard(peers=CARRIER)
    for i in range(10):
        assert g.check(SRC, OPTIONS, 100.0 + i * 0.001) is None
    assert g.check(SRC, OPTIONS, 100.02) == flood.PEER_LIMITED
    bye = OPTIONS.replace(b"OPTIONS sip:", b"BYE sip:").replace(b"1 OPTIONS", b"2 BYE")
    ack = OPTIONS.replace(b"OPTIONS sip:", b"ACK sip:").replace(b"1 OPTIONS", b"1 ACK")
    cancel = OPTIONS.replace(b"OPTIONS sip:", b"CANCEL sip:").replace(b"1 OPTIONS", b"1 CANCEL")
    answer = b"SIP/2.0 200 OK\r\n" + OPTIONS.split(b"\r\n", 1)[1]
    for i, data in enumerate((bye, ack, cancel, answer) * 5):
        assert g.check(SRC, data, 100.03 + i * 0.001) is None, data[:10]
    assert g.check(SRC, OPTIONS, 100.06) == flood.PEER_LIMITED
    # up to four times the density: a flood of them is limited too
    got = [g.check(SRC, bye, 100.1 + i * 0.001) for i in range(40)]
    assert None in got and got[-1] == flood.PEER_LIMITED
    assert g.state.bans == {}
    stranger = ("192.0.2.77", 5060)
    got = [g.check(stranger, bye, 100.0 + i * 0.001) for i in range(12)]
    assert got[10:] == [flood.FLOOD, flood.BANNED]


def test_endless_flood_on_a_peer_still_lets_density_per_unit_through() -> None:
    """Dropped messages are not counted: a peer flooded at 10x its density for 10 units
    still gets about density messages per unit through (a rate limit, not a blackout), and
    the first message after the flood passes."""
    g = make_guard(peers=CARRIER)
    passed = [0] * 10
    for i in range(1000):  # 100 messages per 1 s unit, density 10
        t = 100.0 + i * 0.01
        if g.check(SRC, OPTIONS, t) is None:
            passed[int(t) - 100] += 1
    assert passed[0] == 10
    assert all(8 <= n <= 11 for n in passed[1:]), passed
    assert 95 <= sum(passed) <= 105
    assert g.check(SRC, OPTIONS, 110.05) is None
    assert g.state.bans == {}


def test_peer_limit_with_key_ip_port_and_own_density() -> None:
    """With key: ip_port the limit is per address and port; a peer's own density is the
    limit for its addresses."""
    g = make_guard("{sampling_s: 1, density: 10, key: ip_port}",
                   peers="peers:\n  - {name: pbx, networks: [203.0.113.0/24], "
                         "rules: {flood: {density: 20}}}\n")
    got = [g.check(SRC, OPTIONS, 100.0 + i * 0.001) for i in range(25)]
    assert got == [None] * 20 + [flood.PEER_LIMITED] * 5
    assert g.check(("203.0.113.9", 5062), OPTIONS, 100.1) is None
    assert g.state.bans == {}


def test_ban_peers_restores_banning_peers() -> None:
    """ban_peers: true bans a configured peer that exceeds its density, as before."""
    g = make_guard("{sampling_s: 1, density: 10, ban_s: 30, ban_peers: true}", peers=CARRIER)
    got = [g.check(SRC, OPTIONS, 100.0 + i * 0.001) for i in range(12)]
    assert got[10:] == [flood.FLOOD, flood.BANNED]
    assert g.check(SRC, OPTIONS, 102.0) == flood.BANNED


def test_peer_limited_is_no_new_ban_for_the_edge_core() -> None:
    """The reason is neither FLOOD nor SCANNER, which is what the edge core reads as "drop,
    no new ban" (counted flood_dropped_peer_limited)."""
    assert flood.PEER_LIMITED not in (flood.FLOOD, flood.SCANNER, flood.BANNED)


def test_scanner_user_agent_is_dropped_and_banned() -> None:
    """A friendly-scanner User-Agent (any case) is dropped and its source banned; a plain
    message from it then counts as banned."""
    g = make_guard()
    assert g.check(SRC, SCAN, 100.0) == flood.SCANNER
    assert g.banned(SRC)
    assert g.check(SRC, OPTIONS, 100.1) == flood.BANNED


@pytest.mark.parametrize("agent", [b"sipvicious", b"sipcli/v1.8", b"VaxSIPUserAgent/3.1",
                                   b"iWar", b"sundayddr", b"sip-scan"])
def test_known_scanners(agent: bytes) -> None:
    """Each default scanner User-Agent is recognised."""
    g = make_guard()
    assert g.check(SRC, OPTIONS.replace(b"Acme PBX 1.0", agent), 100.0) == flood.SCANNER


def test_scanner_name_in_the_body_or_other_headers_is_ignored() -> None:
    """Only the User-Agent header of the header block is read: the word in Subject or the
    body does not count."""
    g = make_guard()
    msg = OPTIONS.replace(b"Content-Length: 0\r\n\r\n",
                          b"Subject: friendly-scanner\r\nContent-Length: 30\r\n\r\n"
                          b"\nUser-Agent: friendly-scanner\r\n")
    assert g.check(SRC, msg, 100.0) is None


def test_configurable_scanner_list_and_no_ban() -> None:
    """scanners replaces the list; scanner_ban: false drops without banning."""
    g = make_guard("{scanners: [evil-bot], scanner_ban: false}")
    assert g.check(SRC, SCAN, 100.0) is None
    evil = OPTIONS.replace(b"Acme PBX 1.0", b"Evil-Bot 2")
    assert g.check(SRC, evil, 100.0) == flood.SCANNER
    assert not g.banned(SRC)


def test_scanner_through_a_peer_is_dropped_not_banned() -> None:
    """A scanner's message relayed by a configured peer is dropped, but the peer is not
    banned."""
    g = make_guard(peers="peers:\n  - {name: carrier, networks: [203.0.113.0/24]}\n")
    assert g.check(SRC, SCAN, 100.0) == flood.SCANNER
    assert g.check(SRC, OPTIONS, 100.0) is None


def test_register_from_unknown_source_dropped_only_with_peers() -> None:
    """With peers configured a REGISTER from elsewhere is dropped (not banned) and one from a
    peer passes; without peers REGISTER passes."""
    g = make_guard(peers="peers:\n  - {name: pbx, networks: [198.51.100.0/24]}\n")
    assert g.check(SRC, REGISTER, 100.0) == flood.REGISTER_UNKNOWN
    assert not g.banned(SRC)
    assert g.check(("198.51.100.4", 5060), REGISTER, 100.0) is None
    assert make_guard().check(SRC, REGISTER, 100.0) is None
    g = make_guard("{register_from_unknown: pass}",
                   peers="peers:\n  - {name: pbx, networks: [198.51.100.0/24]}\n")
    assert g.check(SRC, REGISTER, 100.0) is None


def test_key_ip_port_bans_one_port_only() -> None:
    """With key: ip_port, a flood from one port bans that port, not the address."""
    g = make_guard("{sampling_s: 1, density: 10, key: ip_port}")
    for i in range(11):
        g.check(SRC, OPTIONS, 100.0 + i * 0.01)
    assert g.check(SRC, OPTIONS, 100.5) == flood.BANNED
    assert g.check(("203.0.113.9", 5062), OPTIONS, 100.5) is None


def test_ban_operations_list_lift_sweep() -> None:
    """Bans are listed with reason, age, time left and drops; lifted one by one or all; swept
    once ended."""
    g = make_guard()
    g.check(SRC, SCAN, 100.0)
    g.check(SRC, OPTIONS, 101.0)
    g.check(("203.0.113.20", 5070), SCAN, 102.0)
    state = g.state
    assert state.list_bans(110.0) == [
        {"source": "203.0.113.9", "reason": "scanner", "banned_s": 10.0, "left_s": 20.0,
         "dropped": 1},
        {"source": "203.0.113.20", "reason": "scanner", "banned_s": 8.0, "left_s": 22.0,
         "dropped": 0},
    ]
    assert state.lift("203.0.113.9") and not state.lift("203.0.113.9")
    assert g.check(SRC, OPTIONS, 110.0) is None
    assert state.sweep(200.0) == 1 and state.bans == {}
    g.check(SRC, SCAN, 300.0)
    assert state.lift_all() == 1


def test_lift_by_address_and_port() -> None:
    """With key: ip_port a ban is lifted by 'ip:port'."""
    g = make_guard("{key: ip_port}")
    g.check(SRC, SCAN, 100.0)
    assert g.state.list_bans(100.0)[0]["source"] == "203.0.113.9:5060"
    assert g.state.lift("203.0.113.9:5060")


def test_bans_are_capped() -> None:
    """More banned sources than max_bans keep at most max_bans bans."""
    g = make_guard("{max_bans: 10}")
    for i in range(50):
        g.check((f"203.0.113.{i}", 5060), SCAN, 100.0)
    assert len(g.state.bans) <= 10


def test_reload_keeps_bans() -> None:
    """A guard rebuilt on the same RuleState (a reload) keeps the bans."""
    state = RuleState()
    g = make_guard(state=state)
    g.check(SRC, SCAN, 100.0)
    g2 = make_guard("{sampling_s: 2, density: 50}", state=state)
    assert g2.check(SRC, OPTIONS, 101.0) == flood.BANNED


def test_absent_or_disabled_builds_no_guard_and_no_pipeline_rule() -> None:
    """No rules.flood (or enabled: false) means no guard; the rule never joins the pipeline."""
    cfg = parse_config(MINIMAL)
    assert flood.guard(cfg.rules.flood, "enforce", FloodState()) is None
    assert Policy(cfg).flood is None
    cfg = parse_config(MINIMAL + "rules:\n  flood: {enabled: false}\n")
    assert flood.guard(cfg.rules.flood, "enforce", FloodState()) is None
    assert Policy(cfg).flood is None
    assert Policy(parse_config(MINIMAL + "rules:\n  flood: {}\n"), RuleState()).rules == ()


def test_monitor_mode_flag() -> None:
    """mode: monitor (rule or top level) marks the guard as not dropping."""
    assert make_guard("{mode: monitor}").monitor
    assert make_guard(mode="monitor").monitor
    assert not make_guard().monitor


@pytest.mark.parametrize("snippet", ["{density: 0}", "{exempt: [not-a-net]}", "{key: port}",
                                     "{scanners: ['']}", "{densty: 5}", "{ban_peers: maybe}"])
def test_bad_settings_are_config_errors(snippet: str) -> None:
    """Bad densities, networks, keys, empty scanner names and unknown keys are config errors."""
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL + f"rules:\n  flood: {snippet}\n")
    assert all(issue.path.startswith("rules.flood") for issue in caught.value.issues)


def test_state_unit_change_restarts_counting() -> None:
    """A new sampling_s on reload starts counts afresh (units of different lengths do not
    mix)."""
    rule_state = RuleState()
    state = rule_state.flood
    state.cur[SRC[0]] = 99
    make_guard("{sampling_s: 3}", state=rule_state)
    assert state.cur == {}


def test_a_build_that_is_never_activated_changes_no_state() -> None:
    """A reload's build that is never swapped in (failed, or overtaken by a newer reload)
    leaves the live flood counts, rate tables and dialer tables as they were."""
    rule_state = RuleState()
    rule_state.flood.cur[SRC[0]] = 99
    horizon = rule_state.buckets.tables["per_caller"].horizon
    cfg = parse_config(MINIMAL + "rules:\n  flood: {sampling_s: 3}\n"
                       "  rate: {per_caller: {rate: 1, burst: 50}, max_keys: 777}\n"
                       "  dialer: {window_s: 600}\n")
    Policy(cfg, rule_state)
    assert rule_state.flood.cur == {SRC[0]: 99}
    assert rule_state.buckets.tables["per_caller"].horizon == horizon
    assert rule_state.buckets.tables["per_caller"].max_keys != 777


# --------------------------------------------------------------------------- the shell


async def test_shell_drops_scanner_and_flood_before_parsing() -> None:
    """A running sipguard on 127.0.0.1 answers a normal OPTIONS, drops a scanner's silently
    and bans it, bans a flooding port (key: ip_port), and counts each reason."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = parse_config(
        f"listen: [udp://127.0.0.1:{port}]\ncore: udp://127.0.0.1:9\n"
        "rules:\n  flood: {sampling_s: 5, density: 20, key: ip_port}\n"
    )
    server = Server(cfg)
    await server.start()
    try:
        loop = asyncio.get_running_loop()

        async def exchange(sock: socket.socket, data: bytes, count: int = 1) -> bytes | None:
            for _ in range(count):
                sock.sendto(data, ("127.0.0.1", port))
            try:
                return await asyncio.wait_for(loop.sock_recv(sock, 65535), 0.3)
            except TimeoutError:
                return None

        # answered by sipguard itself, to the source port (rport)
        ping = OPTIONS.replace(b"Max-Forwards: 70", b"Max-Forwards: 0").replace(
            b"branch=z9hG4bK1", b"branch=z9hG4bK1;rport")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as good, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as scanner, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flooder:
            for s in (good, scanner, flooder):
                s.bind(("127.0.0.1", 0))
                s.setblocking(False)
            reply = await exchange(good, ping)
            assert reply is not None and reply.startswith(b"SIP/2.0 200")
            assert await exchange(scanner, SCAN) is None
            assert await exchange(scanner, ping) is None
            await exchange(flooder, ping, 60)
            while True:  # drain the answers to the first 20
                try:
                    await asyncio.wait_for(loop.sock_recv(flooder, 65535), 0.1)
                except TimeoutError:
                    break
            assert await exchange(flooder, ping) is None
            reply = await exchange(good, ping)
            assert reply is not None and reply.startswith(b"SIP/2.0 200")
        c = server.counters
        assert c["flood_dropped_scanner"] == 1 and c["flood_banned_scanner"] == 1
        assert c["flood_banned_flood"] == 1
        assert c["flood_dropped_banned"] >= 40
        guard = server.policy.flood
        assert guard is not None and len(guard.state.list_bans(loop.time())) == 2
    finally:
        await server.stop()


@pytest.mark.parametrize("own, limit", [("", 20), (", rules: {flood: {density: 8}}", 8)],
                         ids=["default-density", "own-lower-density"])
async def test_shell_limits_a_flooding_peer_without_banning_it(own: str, limit: int) -> None:
    """A running sipguard with 127.0.0.1 as a configured peer: a flood of 60 OPTIONS from one
    peer port (density 20, or the peer's own 8) is answered about that many times, the rest
    dropped silently and counted flood_dropped_peer_limited; nothing is banned, and the same
    port is answered again once the sampling unit has passed (a ban would hold it for ban_s,
    300 s)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = parse_config(
        f"listen: [udp://127.0.0.1:{port}]\ncore: udp://127.0.0.1:9\n"
        f"peers:\n  - {{name: lab, networks: [127.0.0.1/32]{own}}}\n"
        "rules:\n  flood: {sampling_s: 0.5, density: 20, key: ip_port}\n"
    )
    server = Server(cfg)
    await server.start()
    try:
        loop = asyncio.get_running_loop()
        ping = OPTIONS.replace(b"Max-Forwards: 70", b"Max-Forwards: 0").replace(
            b"branch=z9hG4bK1", b"branch=z9hG4bK1;rport")

        async def answers(sock: socket.socket, wait: float = 0.3) -> list[bytes]:
            got = []
            while True:
                try:
                    got.append(await asyncio.wait_for(loop.sock_recv(sock, 65535), wait))
                except TimeoutError:
                    return got

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flooder:
            flooder.bind(("127.0.0.1", 0))
            flooder.setblocking(False)
            # start the burst just after a sampling unit begins (units are aligned on the
            # clock), so a slow machine does not spread it over two units
            position = loop.time() / 0.5
            await asyncio.sleep((int(position) + 1 - position) * 0.5 + 0.01)
            for _ in range(60):
                flooder.sendto(ping, ("127.0.0.1", port))
            answered = await answers(flooder)
            assert limit - 2 <= len(answered) <= limit + 4, len(answered)
            assert all(a.startswith(b"SIP/2.0 200") for a in answered)
            c = server.counters
            assert c["flood_dropped_peer_limited"] == 60 - len(answered)
            assert c["flood_banned_flood"] == 0 and c["flood_dropped_banned"] == 0
            guard = server.policy.flood
            assert guard is not None and guard.state.list_bans(loop.time()) == []
            await asyncio.sleep(0.6)
            flooder.sendto(ping, ("127.0.0.1", port))
            again = await answers(flooder)
            assert len(again) == 1 and again[0].startswith(b"SIP/2.0 200")
    finally:
        await server.stop()


# --- the User-Agent line search in C (sipguard/sip/_scan.c: line_start) -------------------

def _line_starts_reference(data: bytes, letters: bytes) -> list[int]:
    """Every LF followed by one of ``letters`` before the first CRLF CRLF: what the flood
    guard's Python code finds with bytes.find."""
    end = data.find(b"\r\n\r\n")
    end = len(data) if end < 0 else end
    found = set()
    for letter in letters:
        pos = data.find(b"\n" + bytes([letter]), 0, end)
        while pos >= 0:
            found.add(pos)
            pos = data.find(b"\n" + bytes([letter]), pos + 1, end)
    return sorted(found)


def _line_starts_c(data: bytes, letters: bytes) -> list[int]:
    assert flood.LINE_START is not None
    found, pos = [], flood.LINE_START(data, letters, 0)
    while pos >= 0:
        found.append(pos)
        pos = flood.LINE_START(data, letters, pos + 1)
    return found


LINE_CASES = [
    b"", b"\n", b"\nU", b"\nu", b"U", b"\r\n\r\n\nU", b"\nU\r\n\r\n\nu", b"x\r\n\r\nUser",
    b"\r\n\r\n", b"\n\r\n\r\nUa\r\n\nU", b"A\r\nUser-Agent: x\r\n\r\nv=0\r\nUser-Agent: y",
    b"A\nUser-Agent: x\n\nUser-Agent: y", b"\r\nU\r\nu\r\nV\r\n\r\n\r\nU", b"\n\r\n\r\n",
    b"\r\r\n\r\n\nU", b"\nU\nU\nU", b"\n\nU", b"A\r\n\r\nB\r\n\r\n\nU", b"\r\nU\r\n\r",
]


@pytest.mark.skipif(flood.LINE_START is None, reason="the C extension is not built")
def test_c_line_search_finds_what_find_finds() -> None:
    """line_start finds exactly the LF + letter positions bytes.find finds in the header
    block: edge cases, and every seed message (RFC 4475 included) cut at every length."""
    from tests.unit.test_robustness import SEEDS

    for data in LINE_CASES:
        for letters in (b"Uu", b"U", b"v", b"\r", b"\n"):
            expected = [p for p in _line_starts_reference(data, letters)
                        if data[p + 1:p + 2] not in (b"\r", b"\n")]
            assert _line_starts_c(data, letters) == expected, (data, letters)
    for seed in SEEDS:
        for cut in range(0, len(seed) + 1, max(1, len(seed) // 97)):
            data = seed[:cut]
            assert _line_starts_c(data, b"Uu") == _line_starts_reference(data, b"Uu"), data


@pytest.mark.skipif(flood.LINE_START is None, reason="the C extension is not built")
def test_scanner_check_is_the_same_in_c_and_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard's verdict on scanner User-Agents is the same with and without the C search,
    for User-Agent lines anywhere: first, last, in the body, folded, lower case."""
    g = make_guard("{}")
    scanner = g.scanner
    assert scanner is not None
    messages = [
        b"OPTIONS sip:a@b SIP/2.0\r\nUser-Agent: friendly-scanner\r\n\r\n",
        b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\nuser-agent:sipvicious\r\n\r\n",
        b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\nUser-Agent: pbx\r\n\r\nUser-Agent: sipvicious",
        b"OPTIONS sip:a@b SIP/2.0\r\nUser-Agent: pbx\r\nUser-Agent: friendly-scanner",
        b"OPTIONS sip:a@b SIP/2.0\r\nUser-Agent: pbx\r\n friendly-scanner\r\n\r\n",
        b"OPTIONS sip:a@b SIP/2.0\nUser-Agent: friendly-scanner\n\n",
        b"SIP/2.0 200 OK\r\nUnsupported: x\r\nUSER-AGENT:\tFriendly-Scanner 1\r\n\r\n",
    ]
    fast = [flood._scanner_line(scanner, m) for m in messages]
    monkeypatch.setattr(flood, "LINE_START", None)
    assert [flood._scanner_line(scanner, m) for m in messages] == fast
    assert fast == [True, True, False, True, False, True, True]


@pytest.mark.parametrize("c_search", [True, False])
def test_many_user_agent_lines_cost_linear_time(c_search: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A datagram of 16,000 lines starting with U (hostile) is checked in one pass, with or
    without the C search: no rescan from the start per line (that would be 128 million
    steps here)."""
    import time

    g = make_guard("{}")
    scanner = g.scanner
    assert scanner is not None
    if not c_search:
        monkeypatch.setattr(flood, "LINE_START", None)
    data = b"OPTIONS sip:a@b SIP/2.0\r\n" + b"U: 1\r\n" * 16000 + b"\r\n"
    start = time.process_time()
    assert not flood._scanner_line(scanner, data)
    assert time.process_time() - start < 0.5


def test_scanner_names_with_control_characters_are_config_errors() -> None:
    """A scanner name is matched within one header line: CR, LF or another control
    character in it is a config error naming the field."""
    with pytest.raises(ConfigError, match="scanners"):
        make_guard('{scanners: ["evil\\r\\nbot"]}')


def test_a_ban_made_in_monitor_mode_is_not_honoured_once_enforcing() -> None:
    """A source flagged while the rule is on trial (monitor) is listed as a monitor ban with
    what it would have dropped; after a reload to enforce with a higher density, its next
    messages pass (counted afresh) instead of being dropped for the rest of the ban."""
    state = RuleState()
    trial = make_guard("{sampling_s: 1, density: 10, ban_s: 300, mode: monitor}", state=state)
    got = [trial.check(SRC, OPTIONS, 100.0 + i * 0.01) for i in range(13)]
    assert got[10:] == [flood.FLOOD, flood.BANNED, flood.BANNED]  # decided, not dropped
    [listed] = state.flood.list_bans(100.5)
    assert listed["monitor"] is True and listed["monitored"] == 2 and "dropped" not in listed
    assert trial.banned(SRC)
    enforcing = make_guard("{sampling_s: 1, density: 5000, ban_s: 300}", state=state)
    assert not enforcing.banned(SRC)  # no spurious new_ban for it either
    assert [enforcing.check(SRC, OPTIONS, 110.0 + i * 0.01) for i in range(5)] == [None] * 5
    # an enforce-mode flood from it still bans it for real
    tight = make_guard("{sampling_s: 1, density: 10, ban_s: 300}", state=state)
    got = [tight.check(SRC, OPTIONS, 120.0 + i * 0.01) for i in range(12)]
    assert got[10:] == [flood.FLOOD, flood.BANNED]
    [listed] = state.flood.list_bans(120.5)
    assert "monitor" not in listed and listed["dropped"] == 1
