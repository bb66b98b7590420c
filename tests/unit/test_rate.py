"""Rule ``rate``: GCRA per caller, callee, peer and source address, with a fake clock."""

from __future__ import annotations

import pytest

from sipguard.ops.config_load import ConfigError, parse_config
from sipguard.policy.rate import Buckets
from sipguard.policy.state import RuleState
from tests.unit.rule_calls import MINIMAL, config_example, decide, make_call, policy

PER_CALLER = "rules:\n  rate: {per_caller: {rate: 1, burst: 3}}\n"


def test_burst_then_one_per_second_exactly() -> None:
    """With rate 1/s burst 3, three calls pass at once, the fourth gets 503 + Retry-After, and
    then exactly one passes per second, on the second."""
    p = policy(PER_CALLER)
    passed = [decide(p, make_call(), 0.0).action for _ in range(4)]
    assert passed == ["accept", "accept", "accept", "reject"]
    v = decide(p, make_call(), 0.0)
    assert (v.status, v.phrase, v.rule, v.reason) == (503, "Service Unavailable", "rate",
                                                      "per_caller")
    assert v.headers == ("Retry-After: 1",)
    assert v.detail == {"limit": "per_caller", "key": "+12125550100", "retry_after": 1}
    assert v.sample == "rate:per_caller:+12125550100"
    assert decide(p, make_call(), 0.999).action == "reject"
    assert decide(p, make_call(), 1.0).action == "accept"
    assert decide(p, make_call(), 1.5).action == "reject"
    assert decide(p, make_call(), 2.0).action == "accept"
    assert decide(p, make_call(), 2.0).action == "reject"


def test_long_run_at_the_exact_rate_never_limited() -> None:
    """10,000 calls spaced exactly at 10 calls/s all pass (no float drift)."""
    p = policy("rules:\n  rate: {per_caller: {rate: 10, burst: 1}}\n")
    assert all(decide(p, make_call(), i / 10).accepted for i in range(10_000))


def test_over_the_rate_passes_burst_plus_rate_times_time() -> None:
    """A caller at 50 calls/s from t=0 to t=4 with rate 1/s burst 3 gets exactly 3 + 4 calls
    through: the burst, then one at t=1, 2, 3 and 4 (the e2e expectation)."""
    p = policy(PER_CALLER)
    passed = sum(decide(p, make_call(), i / 50).accepted for i in range(201))
    assert passed == 3 + 4


def test_retry_after_is_the_wait_rounded_up() -> None:
    """Retry-After is the time until the call would pass, rounded up (rate 1 per 10 s)."""
    p = policy("rules:\n  rate: {per_caller: {rate: 1, per_s: 10}}\n")
    assert decide(p, make_call(), 0.0).accepted
    assert decide(p, make_call(), 0.5).headers == ("Retry-After: 10",)
    assert decide(p, make_call(), 7.2).headers == ("Retry-After: 3",)


def test_retry_after_fixed_or_off_and_custom_answer() -> None:
    """retry_after_s fixes the value (0: no header); answer sets status, phrase, headers."""
    p = policy("rules:\n  rate:\n    per_caller: {rate: 1}\n    retry_after_s: 30\n"
               "    answer: {status: 486, phrase: Busy Here, headers: ['X-Why: rate']}\n")
    decide(p, make_call(), 0.0)
    v = decide(p, make_call(), 0.0)
    assert (v.status, v.phrase, v.headers) == (486, "Busy Here", ("Retry-After: 30",
                                                                   "X-Why: rate"))
    p = policy("rules:\n  rate: {per_caller: {rate: 1}, retry_after_s: 0}\n")
    decide(p, make_call(), 0.0)
    assert decide(p, make_call(), 0.0).headers == ()


def test_a_call_limited_by_one_limit_consumes_no_other() -> None:
    """A call rejected per callee takes nothing from its caller's bucket."""
    p = policy("rules:\n  rate:\n    per_caller: {rate: 1, burst: 2}\n"
               "    per_callee: {rate: 1, burst: 1}\n")
    assert decide(p, make_call("+12125550100", "+18005550001"), 0.0).accepted
    v = decide(p, make_call("+12125550100", "+18005550001"), 0.0)
    assert v.reason == "per_callee"
    # the caller still has its second burst slot
    assert decide(p, make_call("+12125550100", "+18005550002"), 0.0).accepted
    assert decide(p, make_call("+12125550100", "+18005550003"), 0.0).reason == "per_caller"


def test_other_callers_are_untouched() -> None:
    """One caller over its limit does not limit a second party calling at 5 calls/s from 5
    numbers (each at its 1/s)."""
    p = policy(PER_CALLER)
    second = 0
    for i in range(200):
        now = i / 50
        decide(p, make_call("+12125550100"), now)
        if i % 10 == 0:
            second += decide(p, make_call(f"+1646555{(i // 10) % 5:04d}"), now).accepted
    assert second == 20


def test_per_peer_without_peers_is_all_traffic_and_per_source_ip() -> None:
    """per_peer with no peers limits all traffic as one peer '-'; per_source_ip per address."""
    p = policy("rules:\n  rate: {per_peer: {rate: 1, burst: 2}}\n")
    assert decide(p, make_call("+1", source=("203.0.113.1", 5060)), 0).accepted
    assert decide(p, make_call("+2", source=("203.0.113.2", 5060)), 0).accepted
    v = decide(p, make_call("+3", source=("203.0.113.3", 5060)), 0)
    assert (v.reason, v.detail and v.detail["key"]) == ("per_peer", "-")
    p = policy("rules:\n  rate: {per_source_ip: {rate: 1}}\n")
    assert decide(p, make_call("+1", source=("203.0.113.1", 5060)), 0).accepted
    assert decide(p, make_call("+2", source=("203.0.113.2", 5060)), 0).accepted
    assert decide(p, make_call("+3", source=("203.0.113.1", 5061)), 0).reason == "per_source_ip"


def test_peer_override_gives_a_peer_its_own_limit() -> None:
    """A peer's rules.rate override replaces the top-level limit for its traffic only, key by
    key (its burst is kept)."""
    peers = (
        "peers:\n"
        "  - {name: big, networks: [203.0.113.0/24], rules: {rate: {per_caller: {rate: 100}}}}\n"
        "  - {name: small, networks: [198.51.100.0/24]}\n"
    )
    p = policy(PER_CALLER, extra=peers)
    big = [decide(p, make_call("+1", source=("203.0.113.9", 5060)), 0.0).accepted
           for _ in range(5)]
    small = [decide(p, make_call("+2", source=("198.51.100.9", 5060)), 0.0).accepted
             for _ in range(5)]
    assert big == [True, True, True, False, False]  # burst 3 kept, rate 100/s
    assert decide(p, make_call("+1", source=("203.0.113.9", 5060)), 0.011).accepted
    assert small == [True, True, True, False, False]
    assert not decide(p, make_call("+2", source=("198.51.100.9", 5060)), 0.011).accepted


def test_per_peer_key_is_the_peer_name() -> None:
    """per_peer counts all of a peer's addresses together."""
    peers = "peers:\n  - {name: carrier, networks: [203.0.113.0/24]}\n"
    p = policy("rules:\n  rate: {per_peer: {rate: 1, burst: 2}}\n", extra=peers)
    assert decide(p, make_call("+1", source=("203.0.113.1", 5060)), 0).accepted
    assert decide(p, make_call("+2", source=("203.0.113.2", 5060)), 0).accepted
    v = decide(p, make_call("+3", source=("203.0.113.3", 5060)), 0)
    assert v.detail is not None and v.detail["key"] == "carrier"


def test_monitor_mode_forwards_and_reports() -> None:
    """In monitor mode an over-limit call is forwarded, marked monitored, naming the rule."""
    p = policy("rules:\n  rate: {per_caller: {rate: 1}, mode: monitor}\n")
    assert decide(p, make_call(), 0.0).accepted
    v = decide(p, make_call(), 0.0)
    assert v.accepted and v.monitored and (v.rule, v.reason) == ("rate", "per_caller")
    assert v.sample == "rate:per_caller:+12125550100"


def test_reload_keeps_the_buckets() -> None:
    """A Policy rebuilt on the same RuleState (a reload) keeps every bucket."""
    state = RuleState()
    p = policy(PER_CALLER, state)
    for _ in range(3):
        decide(p, make_call(), 0.0)
    p2 = policy(PER_CALLER.replace("burst: 3", "burst: 4"), state)
    assert decide(p2, make_call(), 0.0).accepted  # the 4th of the new burst
    assert not decide(p2, make_call(), 0.0).accepted


def test_anonymous_caller_is_not_limited_per_caller() -> None:
    """A call without a caller number skips per_caller (fails open)."""
    p = policy("rules:\n  rate: {per_caller: {rate: 1}}\n")
    assert all(decide(p, make_call(None), 0.0).accepted for _ in range(5))


def test_no_limit_builds_no_rule() -> None:
    """rules.rate without any limit adds nothing to the pipeline."""
    p = policy("rules:\n  rate: {}\n")
    assert p.rules == ()


def test_memory_follows_active_keys_under_churn() -> None:
    """100,000 one-off callers at 1,000 calls/s leave only the last few seconds' keys (rate 1/s
    burst 3: a key matters 3 s after its call)."""
    p = policy(PER_CALLER)
    biggest = 0
    for i in range(100_000):
        now = i / 1000
        decide(p, make_call(f"+1{i:010d}"), now)
        if i % 1000 == 0:
            buckets = p.state.buckets
            assert isinstance(buckets, Buckets)
            biggest = max(biggest, buckets.size()["per_caller"])
    assert biggest <= 2 * 3 * 1000 + 1000


def test_table_is_capped() -> None:
    """20,000 distinct callers at the same instant keep at most max_keys entries; the overflow
    is counted as dropped."""
    p = policy("rules:\n  rate: {per_caller: {rate: 1, burst: 3}, max_keys: 1000}\n")
    for i in range(20_000):
        assert decide(p, make_call(f"+1{i:010d}"), 5.0).accepted
    buckets = p.state.buckets
    assert isinstance(buckets, Buckets)
    table = buckets.tables["per_caller"]
    assert len(table) <= 1000 and table.dropped >= 19_000 - 1000


def test_a_peers_smaller_cap_does_not_shrink_the_shared_table() -> None:
    """The rate tables are shared by every peer: a peer override with max_keys 100 leaves
    them at the top level's 10,000, so 210 callers from elsewhere do not push a limited
    caller out and let it call again (the tables hold what the largest section asks)."""
    peers = ("peers:\n  - name: big\n    networks: [198.51.100.0/24]\n"
             "  - name: small\n    networks: [203.0.113.0/24]\n"
             "    rules: {rate: {max_keys: 100}}\n")
    p = policy("rules:\n  rate: {per_caller: {rate: 1, burst: 1}, max_keys: 10000}\n",
               extra=peers)
    buckets = p.state.buckets
    assert isinstance(buckets, Buckets)
    assert buckets.tables["per_caller"].max_keys == 10000
    assert decide(p, make_call("+12125550100"), 5.0).accepted
    assert not decide(p, make_call("+12125550100"), 5.0).accepted
    for i in range(210):
        decide(p, make_call(f"+1646555{i:04d}", source=("203.0.113.5", 5060)), 5.0)
    assert not decide(p, make_call("+12125550100"), 5.0).accepted


@pytest.mark.parametrize(
    "snippet",
    ["{per_caller: {rate: 0}}", "{per_caller: {rate: 1, burst: 0}}", "{per_calller: {rate: 1}}",
     "{per_caller: {rate: 1, per_s: -1}}", "{retry_after_s: -1}"],
)
def test_bad_settings_are_config_errors(snippet: str) -> None:
    """Zero or negative rates, bursts, periods and unknown keys are rejected with the path."""
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL + f"rules:\n  rate: {snippet}\n")
    assert all(issue.path.startswith("rules.rate") for issue in caught.value.issues)


def test_commented_examples_in_the_config_file_are_valid() -> None:
    """The rate, dialer and flood examples in config/sipguard.yaml parse once uncommented;
    the dialer and flood ones show exactly the defaults."""
    from sipguard.policy import dialer_settings, flood_settings

    cfg = parse_config(config_example("call-rate limits", "rate"))
    assert cfg.rules.rate is not None and cfg.rules.rate.per_caller is not None
    assert (cfg.rules.rate.per_caller.rate, cfg.rules.rate.per_caller.burst) == (1, 3)
    cfg = parse_config(config_example("dialer analytics", "dialer"))
    assert cfg.rules.dialer == dialer_settings.Settings()
    cfg = parse_config(config_example("flood and scanner defence", "flood"))
    assert cfg.rules.flood == flood_settings.Settings()
