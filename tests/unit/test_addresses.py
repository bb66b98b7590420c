"""How per-address limits count a source (sipguard.addresses): IPv4 per address, IPv6 per
network of ``sip.ipv6_prefix`` bits — in the flood guard, ``rate.per_source_ip``, the TCP
per-address cap and the ban operations."""

from __future__ import annotations

import pytest

from sipguard.addresses import source_key
from sipguard.ops.config_load import ConfigError, parse_config
from sipguard.policy import flood
from tests.unit.rule_calls import MINIMAL, make_call, policy
from tests.unit.test_flood import OPTIONS, make_guard


@pytest.mark.parametrize(("ip", "prefix", "key"), [
    ("192.0.2.7", 64, "192.0.2.7"),
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64, "2001:db8:1:2::/64"),
    ("2001:DB8:1:2::1", 64, "2001:db8:1:2::/64"),  # one network, however written
    ("2001:db8:1:2ff::1", 56, "2001:db8:1:200::/56"),
    ("2001:db8:1:2::1", 128, "2001:db8:1:2::1"),
    ("fe80::1%eth0", 64, "fe80::/64"),  # the scope id is not part of the key
    ("::ffff:192.0.2.7", 64, "::ffff:192.0.2.7"),  # a dual-stack socket's IPv4 source
    ("not-an-address", 64, "not-an-address"),
])
def test_source_keys(ip: str, prefix: int, key: str) -> None:
    assert source_key(ip, prefix) == key


def test_a_flood_from_many_addresses_of_one_network_bans_the_network() -> None:
    """11 messages from 11 addresses of one /64 (density 10) ban the /64: its other addresses
    are dropped, a neighbouring /64 is not; the ban lists as the network and lifts by any
    address inside it."""
    g = make_guard()
    got = [g.check((f"2001:db8:1:2::{i + 1:x}", 5060), OPTIONS, 100.0 + i * 0.01)
           for i in range(11)]
    assert got == [None] * 10 + [flood.FLOOD]
    assert g.check(("2001:db8:1:2:ffff::9", 5060), OPTIONS, 100.5) == flood.BANNED
    assert g.check(("2001:db8:1:3::1", 5060), OPTIONS, 100.5) is None
    assert g.banned(("2001:db8:1:2::77", 5060))
    assert [b["source"] for b in g.state.list_bans(101.0)] == ["2001:db8:1:2::/64"]
    assert g.state.key_of("[2001:db8:1:2::1234]") == "2001:db8:1:2::/64"
    assert g.state.lift("2001:db8:1:2::1234") and not g.state.bans


def test_a_peer_listed_by_address_keeps_its_own_counts_in_a_shared_64() -> None:
    """A peer at 2001:db8:1:2::10/128: a scanner next to it in the /64 bans the rest of the
    /64, never the peer, whose own density (100) still holds for it alone."""
    peers = ("peers:\n  - name: sbc\n    networks: ['2001:db8:1:2::10/128']\n"
             "    rules: {flood: {density: 100}}\n")
    g = make_guard(peers=peers)
    scan = OPTIONS.replace(b"User-Agent: Acme PBX 1.0", b"User-Agent: friendly-scanner")
    assert g.check(("2001:db8:1:2::66", 5060), scan, 100.0) == flood.SCANNER
    assert g.banned(("2001:db8:1:2::77", 5060))
    assert not g.banned(("2001:db8:1:2::10", 5060))
    assert all(g.check(("2001:db8:1:2::10", 5060), OPTIONS, 101.0 + i * 0.001) is None
               for i in range(50))


def test_a_prefix_change_by_reload_rekeys_the_bans() -> None:
    """sip.ipv6_prefix 64 -> 56 by reload: a /64 ban becomes its /56's, still in force."""
    from sipguard.policy.state import RuleState
    state = RuleState()
    g = make_guard(state=state)
    scan = OPTIONS.replace(b"User-Agent: Acme PBX 1.0", b"User-Agent: friendly-scanner")
    g.check(("2001:db8:1:2::66", 5060), scan, 100.0)
    g2 = make_guard(peers="sip: {ipv6_prefix: 56}\n", state=state)
    assert [b["source"] for b in state.flood.list_bans(101.0)] == ["2001:db8:1::/56"]
    assert g2.check(("2001:db8:1:ff::1", 5060), OPTIONS, 101.0) == flood.BANNED


def test_ipv6_prefix_128_counts_every_address_on_its_own() -> None:
    g = make_guard()
    cfg_guard = make_guard(peers="sip: {ipv6_prefix: 128}\n")
    assert cfg_guard.ipv6_prefix == 128 and g.ipv6_prefix == 64
    got = [cfg_guard.check((f"2001:db8:1:2::{i + 1:x}", 5060), OPTIONS, 100.0 + i * 0.01)
           for i in range(50)]
    assert got == [None] * 50


def test_an_ipv6_core_is_trusted_by_its_address_not_its_network() -> None:
    """The core's own address is never checked; its neighbours in the /64 are."""
    cfg = parse_config(MINIMAL.replace("udp://10.0.0.10:5080", "udp://[2001:db8::10]:5080")
                       + "rules:\n  flood: {sampling_s: 1, density: 10}\n")
    from sipguard.policy.engine import Policy
    from sipguard.policy.state import RuleState
    p = Policy(cfg, RuleState(), trusted=((cfg.core.host, cfg.core.port),))
    p.activate()
    g = p.flood
    assert g is not None
    assert all(g.check(("2001:db8::10", 5080), OPTIONS, 100.0) is None for _ in range(50))
    got = [g.check(("2001:db8::11", 5060), OPTIONS, 100.0) for _ in range(11)]
    assert got[-1] == flood.FLOOD


def test_per_source_ip_counts_an_ipv6_network() -> None:
    """rate.per_source_ip {rate: 1, burst: 3}: three calls from three addresses of one /64
    pass, the fourth from a fourth address is limited; another /64 is not."""
    p = policy("rules:\n  rate: {per_source_ip: {rate: 1, burst: 3}}\n")
    verdicts = [p.decide(make_call(source=(f"2001:db8:5:6::{i + 1}", 5060),
                                   call_id=f"c{i}"), 100.0)
                for i in range(4)]
    assert [getattr(v, "action", None) for v in verdicts[:3]] == ["accept"] * 3
    assert verdicts[3].action == "reject" and verdicts[3].status == 503
    assert verdicts[3].detail["key"] == "2001:db8:5:6::/64"
    other = p.decide(make_call(source=("2001:db8:5:7::1", 5060), call_id="c9"), 100.0)
    assert other.action == "accept"


@pytest.mark.parametrize("value", ["8", "129", "x"])
def test_ipv6_prefix_out_of_range_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="ipv6_prefix"):
        parse_config(MINIMAL + f"sip:\n  ipv6_prefix: {value}\n")
