"""Rule ``dialer``: each analytic's tag and block thresholds, cooldowns, monitor mode, reload,
bounded memory, and a legitimate agent pattern that is never touched."""

from __future__ import annotations

import random

import pytest

from sipguard.ops.config_load import ConfigError, parse_config
from sipguard.policy.dialer_state import DialerState
from sipguard.policy.engine import Policy
from sipguard.policy.state import RuleState
from sipguard.sip.parser import parse_message
from tests.unit.proxy_helpers import invite
from tests.unit.rule_calls import MINIMAL, decide, dialog, make_call, policy

OFF = "distinct_callees: null, short_calls: null, asr: null, sequential: null"
REASON = 'Reason: SIP;cause=603;text="v=analytics1";location=RPN'


def only(analytic: str, block_s: float = 300) -> str:
    """A rules block with the dialer and only ``analytic`` (a YAML mapping entry) on."""
    name = analytic.split(":", 1)[0]
    off = ", ".join(part for part in OFF.split(", ") if not part.startswith(name + ":"))
    return f"rules:\n  dialer: {{{off}, block_s: {block_s}, {analytic}}}\n"


@pytest.mark.parametrize(("own", "url"), [
    ("", "https://example.com/cid"),  # none of its own: rule callerid's
    (", redress: {url: 'https://example.com/dialer'}", "https://example.com/dialer"),
])
def test_a_block_carries_the_redress_of_rule_callerid_unless_it_has_its_own(
        own: str, url: str) -> None:
    """The 603+ Reason of a dialer block names rule callerid's redress contact when the
    dialer sets none, as rule national_cli does; its own when it sets one."""
    rules = only("distinct_callees: {tag: 3, block: 5}" + own)
    rules += "  callerid: {redress: {url: 'https://example.com/cid'}}\n"
    p = policy(rules)
    verdicts = [decide(p, make_call("+12125550100", f"+1646555{7 * i:04d}"), float(i))
                for i in range(5)]
    assert verdicts[4].headers == (
        f'Reason: SIP;cause=603;text="v=analytics1;url={url}";location=RPN',)


def state(p: Policy) -> DialerState:
    s = p.state.dialer
    assert isinstance(s, DialerState)
    return s


def end(p: Policy, caller: str, *, at: float, talk: float | None) -> None:
    """Report a call of ``caller`` that ended at ``at`` after ``talk`` seconds (None: not
    answered)."""
    answered = None if talk is None else at - talk
    p.dialog_ended(dialog(caller, "+18005550199", started=at - (talk or 0) - 5,
                          answered=answered, ended=at), at)


def test_distinct_callees_tags_then_blocks_then_cools_down() -> None:
    """One caller dialing many numbers is tagged at 3 distinct, blocked with 603+ at 5, then
    every call of it is answered at once for block_s, and evaluated again afterwards."""
    p = policy(only("distinct_callees: {tag: 3, block: 5}", block_s=100))
    verdicts = [decide(p, make_call("+12125550100", f"+1646555{7 * i:04d}"), float(i))
                for i in range(5)]
    assert [v.action for v in verdicts] == ["accept"] * 4 + ["reject"]
    assert verdicts[1].forward_headers == ()
    assert verdicts[2].forward_headers == ("X-Sipguard-Verdict: dialer.distinct_callees",)
    v = verdicts[4]
    assert (v.status, v.phrase, v.rule, v.reason) == (603, "Network Blocked", "dialer",
                                                      "distinct_callees")
    assert v.headers == (REASON,)
    assert v.detail == {"scope": "caller", "key": "+12125550100", "value": "5", "block": "5"}
    again = decide(p, make_call("+12125550100", "+16465550000"), 50.0)
    assert (again.action, again.reason) == ("reject", "distinct_callees_cooldown")
    assert again.sample == "dialer:caller:+12125550100"
    other = decide(p, make_call("+12125550111", "+16465559999"), 50.0)
    assert other.accepted
    assert decide(p, make_call("+12125550100", "+16465550000"), 104.1).accepted


def test_same_callee_again_is_not_distinct_and_window_slides() -> None:
    """Calling one number repeatedly counts once; numbers older than the window drop out."""
    p = policy(only("distinct_callees: {tag: 2, block: 3, window_s: 10}"))
    for i in range(10):
        assert decide(p, make_call(callee="+16465550001"), float(i)).forward_headers == ()
    assert decide(p, make_call(callee="+16465550002"), 10.0).forward_headers != ()
    # 30 s later both have left the window
    assert decide(p, make_call(callee="+16465550003"), 40.0).forward_headers == ()
    assert decide(p, make_call(callee="+16465550004"), 41.0).forward_headers != ()
    assert decide(p, make_call(callee="+16465550005"), 42.0).reason == "distinct_callees"


def test_sequential_run_per_caller() -> None:
    """Called numbers going up by one are tagged at a run of 3 and blocked at 5; a repeated
    number neither breaks nor extends the run."""
    p = policy(only("sequential: {tag: 3, block: 5, per_origin: false}"))
    callees = ["+16465552000", "+16465552001", "+16465552001", "+16465552002",
               "+16465552003", "+16465552004"]
    verdicts = [decide(p, make_call(callee=c), float(i)) for i, c in enumerate(callees)]
    assert [v.forward_headers != () for v in verdicts[:5]] == [False, False, False, True, True]
    assert (verdicts[5].action, verdicts[5].reason) == ("reject", "sequential")


def test_sequential_run_broken_by_a_jump() -> None:
    """A jump starts a new run: 2000, 2001, 2002, 5000, 5001 never reaches a run of 4."""
    p = policy(only("sequential: {tag: 4, block: 4, per_origin: false}"))
    for i, c in enumerate(["2000", "2001", "2002", "5000", "5001"]):
        assert decide(p, make_call(callee="+164655" + c), float(i)).accepted


def test_sequential_per_origin_sees_a_scan_with_rotating_callers_interleaved() -> None:
    """A scan that changes caller number every call, interleaved with other traffic from the
    same source, is caught per source and the whole source is blocked."""
    p = policy(only("sequential: {tag: 5, block: 8, per_origin: true}"))
    rng = random.Random(5)
    results = []
    for i in range(8):
        decide(p, make_call(f"+1303555{rng.randrange(10000):04d}",
                            f"+1720555{rng.randrange(10000):04d}"), i + 0.5)
        results.append(decide(p, make_call(f"+1212555{i:04d}", f"+1646555{3000 + i:04d}"),
                              float(i + 1)))
    assert all(v.accepted for v in results[:7])
    assert (results[7].reason, results[7].detail and results[7].detail["scope"]) == (
        "sequential_origin", "origin")
    blocked = decide(p, make_call("+13035550000", "+17205559999"), 20.0)
    assert blocked.reason == "sequential_origin_cooldown"


def test_short_call_ratio_blocks_after_min_calls() -> None:
    """Answered calls of 1 s: nothing happens before min_calls ended; then the ratio (100 %)
    blocks the caller."""
    p = policy(only("short_calls: {tag: 0.2, block: 0.5, min_calls: 5}"))
    for i in range(4):
        assert decide(p, make_call(), float(i)).accepted
        end(p, "+12125550100", at=i + 1.5, talk=1.0)
    assert decide(p, make_call(), 5.0).accepted
    end(p, "+12125550100", at=5.5, talk=1.0)
    v = decide(p, make_call(), 6.0)
    assert (v.reason, v.detail and v.detail["value"]) == ("short_calls", "1.000")


def test_short_call_ratio_tag_between_thresholds() -> None:
    """3 short calls out of 10 answered (30 %) is tagged with tag 0.2, not blocked at 0.5."""
    p = policy(only("short_calls: {tag: 0.2, block: 0.5, min_calls: 10}"))
    decide(p, make_call(), 0.0)
    for i in range(10):
        end(p, "+12125550100", at=10.0 + i, talk=2.0 if i < 3 else 60.0)
    v = decide(p, make_call(), 20.0)
    assert v.accepted and v.forward_headers == ("X-Sipguard-Verdict: dialer.short_calls",)


def test_asr_floor_blocks_low_answer_ratio() -> None:
    """A caller whose calls are mostly unanswered is tagged below 0.5 and blocked below 0.2
    once min_calls ended."""
    p = policy(only("asr: {tag: 0.5, block: 0.2, min_calls: 10}"))
    decide(p, make_call(), 0.0)
    for i in range(10):
        end(p, "+12125550100", at=1.0 + i, talk=30.0 if i < 4 else None)
    v = decide(p, make_call(), 12.0)
    assert v.accepted and v.forward_headers == ("X-Sipguard-Verdict: dialer.asr",)
    for i in range(15):
        end(p, "+12125550100", at=13.0 + i, talk=None)
    assert decide(p, make_call(), 29.0).reason == "asr"  # 4 of 25 answered


def test_a_2xx_the_caller_never_acked_is_no_answered_call() -> None:
    """Calls whose 200 the caller never ACKs (sipguard ends them ack_timeout after 64*T1):
    each is a seizure that set up nothing — counted unanswered for the ASR (and not as a
    long answered call for the short-call ratio)."""
    p = policy(only("asr: {tag: 0.6, block: 0.6, min_calls: 10}"))
    decide(p, make_call(), 0.0)
    for i in range(10):
        d = dialog("+12125550100", "+18005550199", started=i, answered=i + 1.0,
                   ended=i + 33.0)
        d.end_reason = "ack_timeout"
        p.dialog_ended(d, i + 33.0)
    assert decide(p, make_call(), 50.0).reason == "asr"  # 0 of 10 answered


@pytest.mark.parametrize("status", [401, 407, 420, 421, 422, 494, 302])
def test_asr_does_not_count_attempts_the_caller_sends_again(status: int) -> None:
    """A challenge (401/407), an extension or session-interval answer, a redirect: the
    caller sends the INVITE again, so that attempt is no seizure. 10 calls each answered
    after one such attempt keep an ASR of 100 %; the same 10 attempts ending 480 block."""
    p = policy(only("asr: {tag: 0.6, block: 0.6, min_calls: 10}"))
    decide(p, make_call(), 0.0)
    for i in range(10):
        p.dialog_ended(dialog("+12125550100", "+18005550199", started=i, answered=None,
                              ended=i + 0.1, status=status), i + 0.1)
        end(p, "+12125550100", at=i + 1.0, talk=0.5)
    v = decide(p, make_call(), 12.0)
    assert v.accepted and v.forward_headers == ()
    for i in range(10):
        end(p, "+12125550100", at=13.0 + i, talk=None)
    assert decide(p, make_call(), 24.0).reason == "asr"  # 10 of 20 answered


def test_dialog_ends_of_unseen_callers_are_ignored() -> None:
    """Dialog ends for numbers the rule never saw create nothing (other peers' calls)."""
    p = policy(only("asr: {min_calls: 1}"))
    end(p, "+19995550000", at=1.0, talk=None)
    assert len(state(p).callers) == 0


def test_caller_rotation_blocks_the_source() -> None:
    """A source presenting a new caller number for every call is tagged at 5 one-off numbers
    and blocked at 10; numbers used more than max_uses times stop counting."""
    p = policy(only("caller_rotation: {tag: 5, block: 10, max_uses: 2}"))
    for i in range(3):  # one number used 3 times: not a one-off
        decide(p, make_call("+12125550000", f"+1646555{i:04d}"), float(i))
    verdicts = [decide(p, make_call(f"+1212555{1000 + i}", "+16465559999"), 10.0 + i)
                for i in range(10)]
    assert [bool(v.forward_headers) for v in verdicts[:9]] == [False] * 4 + [True] * 5
    assert (verdicts[9].reason, verdicts[9].detail and verdicts[9].detail["key"]) == (
        "caller_rotation", "198.51.100.7")
    assert decide(p, make_call("+12125550000", "+16465550001"), 30.0).reason == (
        "caller_rotation_cooldown")


def test_caller_rotation_is_per_peer_and_off_by_default() -> None:
    """Rotation is counted per peer when peers are configured, and only where enabled."""
    peers = ("peers:\n  - {name: dialer-a, networks: [203.0.113.0/24], rules: {dialer: "
             "{caller_rotation: {tag: 2, block: 3}}}}\n"
             "  - {name: carrier, networks: [198.51.100.0/24]}\n")
    p = policy(f"rules:\n  dialer: {{{OFF}}}\n", extra=peers)
    for i in range(20):
        assert decide(p, make_call(f"+1212555{i:04d}"), float(i)).accepted
    got = [decide(p, make_call(f"+1303555{i:04d}", source=("203.0.113.5", 5060)), 30.0 + i)
           for i in range(3)]
    assert got[2].reason == "caller_rotation"
    assert got[2].detail is not None and got[2].detail["key"] == "dialer-a"


def test_pumping_to_one_number_blocks_calls_to_it_from_anyone() -> None:
    """Many calls to one number from many callers are tagged, then blocked; calls to that
    number are blocked for everyone, other numbers pass; exempt numbers are never counted."""
    p = policy(only("pumping: {per_callee: {tag: 3, block: 5}, exempt: ['+18005550100']}"))
    verdicts = [decide(p, make_call(f"+1212555{i:04d}", "+12925550123"), float(i))
                for i in range(5)]
    assert [bool(v.forward_headers) for v in verdicts[:4]] == [False, False, True, True]
    assert (verdicts[4].reason, verdicts[4].detail and verdicts[4].detail["scope"]) == (
        "pumping", "callee")
    assert decide(p, make_call("+13035550000", "+12925550123"), 10.0).reason == (
        "pumping_cooldown")
    assert decide(p, make_call("+13035550000", "+12925550124"), 10.0).accepted
    assert all(decide(p, make_call(f"+1212555{i:04d}", "+18005550100"), 20.0).accepted
               for i in range(20))


def test_high_cost_prefixes_block_the_source_for_those_only() -> None:
    """Calls from one source to high-cost prefixes are blocked past the threshold; its other
    calls still pass."""
    p = policy(only("pumping: {per_callee: null, high_cost_prefixes: ['+1900*'], "
                    "high_cost: {tag: 2, block: 3}}"))
    got = [decide(p, make_call(f"+1212555{i:04d}", f"+1900555{3 * i:04d}"), float(i))
           for i in range(3)]
    assert got[2].reason == "high_cost"
    assert decide(p, make_call("+12125559999", "+19005551111"), 5.0).reason == (
        "high_cost_cooldown")
    assert decide(p, make_call("+12125559999", "+16465551111"), 5.0).accepted


def test_monitor_mode_forwards_with_monitored_tag() -> None:
    """In monitor mode a block is forwarded marked monitored with 'dialer.<reason>;monitored';
    its cooldown is honoured in monitor mode only."""
    rule_state = RuleState()
    rules = only("distinct_callees: {tag: 2, block: 3}").replace("block_s: 300",
                                                                 "block_s: 300, mode: monitor")
    p = policy(rules, rule_state)
    got = [decide(p, make_call(callee=f"+1646555{i:04d}"), float(i)) for i in range(3)]
    v = got[2]
    assert v.accepted and v.monitored and (v.rule, v.reason) == ("dialer", "distinct_callees")
    assert v.forward_headers == ("X-Sipguard-Verdict: dialer.distinct_callees;monitored",)
    assert decide(p, make_call(callee="+16465559999"), 4.0).reason == (
        "distinct_callees_cooldown")
    enforce = policy(only("distinct_callees: {tag: 2, block: 30}"), rule_state)
    assert decide(enforce, make_call(callee="+16465550000"), 5.0).accepted


def test_forged_verdict_header_is_stripped() -> None:
    """A peer's own X-Sipguard-Verdict is removed from the forwarded call; a call without one
    gets no header edits at all."""
    p = policy(only("distinct_callees: {}"))
    assert decide(p, make_call(), 0.0).replace_headers == ()
    forged = make_call()
    forged.msg = parse_message(invite(extra="X-Sipguard-Verdict: dialer.none\r\n"))
    v = decide(p, forged, 1.0)
    assert ("x-sipguard-verdict", None) in v.replace_headers


def test_reload_keeps_windows_and_cooldowns() -> None:
    """A rebuilt Policy on the same RuleState keeps the counts and an active cooldown."""
    rule_state = RuleState()
    p = policy(only("distinct_callees: {tag: 3, block: 4}"), rule_state)
    for i in range(3):
        decide(p, make_call(callee=f"+1646555{i:04d}"), float(i))
    p2 = policy(only("distinct_callees: {tag: 3, block: 4}"), rule_state)
    assert decide(p2, make_call(callee="+16465559999"), 3.0).reason == "distinct_callees"
    p3 = policy(only("distinct_callees: {tag: 30, block: 40}"), rule_state)
    assert decide(p3, make_call(callee="+16465559998"), 4.0).reason == (
        "distinct_callees_cooldown")


def test_lift_and_list_blocks() -> None:
    """Cooldowns are listable (bounded, by scope or key) and liftable (for the admin API);
    lifting starts the number afresh: the call that would have crossed the threshold again
    passes."""
    p = policy(only("distinct_callees: {tag: 1, block: 2}"))
    for i in range(2):
        decide(p, make_call(callee=f"+1646555{i:04d}"), float(i))
    listed, total = state(p).cooldowns(2.0)
    assert total == 1 and [(s, k, b.reason, b.monitor, b.until) for s, k, b in listed] == [
        ("caller", "+12125550100", "distinct_callees", False, 301.0)]
    assert state(p).cooldowns(2.0, scope="origin") == ([], 0)
    assert state(p).cooldowns(2.0, key="+12125550100")[1] == 1
    assert state(p).cooldowns(302.0) == ([], 0)  # ran out
    block = state(p).lift("caller", "+12125550100", 3.0)
    assert block is not None and block.reason == "distinct_callees"
    assert state(p).lift("caller", "+12125550100", 3.0) is None
    assert decide(p, make_call(callee="+16465550002"), 3.0).accepted  # a third callee: 1
    assert decide(p, make_call(callee="+16465550003"), 3.5).action == "reject"  # two again


def test_lift_resets_only_the_scope_of_the_cooldown() -> None:
    """Lifting a peer/source's high-cost cooldown forgets its high-cost calls, not its caller
    rotation; a reset without a cooldown (found in the shared store) forgets the counts."""
    p = policy("rules:\n  dialer: {distinct_callees: null, short_calls: null, asr: null, "
               "sequential: null, caller_rotation: {tag: null, block: 50}, "
               "pumping: {per_callee: null, high_cost_prefixes: ['+1900*'], "
               "high_cost: {tag: null, block: 2}}}\n")
    for i in range(2):
        decide(p, make_call(f"+1212555{i:04d}", "+19005550100"), float(i))
    origin = next(k for k, _ in state(p).origins.items())
    assert state(p).lift("high_cost", origin, 2.0) is not None
    stats = state(p).origins.peek(origin)
    assert stats is not None and stats.high_cost is None and stats.one_offs == 2
    assert state(p).lift("origin", origin, 2.0) is None  # no cooldown, no reset asked
    assert state(p).origins.peek(origin) is not None
    assert state(p).lift("origin", origin, 2.0, reset=True) is None
    assert state(p).origins.peek(origin) is None


def test_legitimate_agents_are_never_touched() -> None:
    """50 agents over 8 simulated hours — calls of 30-300 s to varied numbers, 60 % answered,
    a few short calls — are never tagged or blocked with every analytic at its default."""
    p = policy("rules:\n  dialer: {caller_rotation: {}, pumping: {}}\n"
               "  rate: {per_caller: {rate: 1, burst: 3}}\n")
    rng = random.Random(42)
    agents = [f"+1212555{1000 + i}" for i in range(50)]
    busy_until = dict.fromkeys(agents, 0.0)
    now, calls = 0.0, 0
    while now < 8 * 3600:
        now += rng.expovariate(1 / 4.0)  # the whole floor: a call every 4 s on average
        agent = rng.choice(agents)
        if busy_until[agent] > now:
            continue
        callee = f"+1{rng.randrange(2012000000, 9899999999)}"
        v = decide(p, make_call(agent, callee), now)
        assert v.accepted and not v.forward_headers, (now, v)
        calls += 1
        answered = rng.random() < 0.6
        talk = rng.uniform(30, 300) if answered else 0.0
        if answered and rng.random() < 0.05:
            talk = rng.uniform(2, 5)  # a wrong number
        ring = rng.uniform(5, 25)
        busy_until[agent] = now + ring + talk + rng.uniform(10, 60)
        done = now + ring + talk
        p.dialog_ended(dialog(agent, callee, started=now, answered=now + ring if answered
                              else None, ended=done), done)
    assert calls > 3000


def test_memory_is_bounded_under_one_off_numbers() -> None:
    """60,000 one-off callers at 1,000 calls/s with a 5 s window keep at most two windows of
    numbers (10,000); at one instant the max_numbers cap holds."""
    p = policy("rules:\n  dialer: {window_s: 5, pumping: {}}\n")
    biggest = 0
    for i in range(60_000):
        decide(p, make_call(f"+1{i:010d}", f"+1{(i * 7919) % 10**10:010d}"), i / 1000)
        if i % 1000 == 0:
            biggest = max(biggest, len(state(p).callers), len(state(p).callees))
    assert 5000 <= biggest <= 10_000 + 1000
    p = policy("rules:\n  dialer: {window_s: 10, max_numbers: 1000}\n", RuleState())
    for i in range(5000):
        decide(p, make_call(f"+1{i:010d}", "+16465550000"), 1.0)
    assert len(state(p).callers) <= 1000


@pytest.mark.parametrize(
    "snippet",
    ["{distinct_callees: {tag: 10, block: 5}}", "{asr: {tag: 0.1, block: 0.5}}",
     "{short_calls: {block: 1.5}}", "{pumping: {high_cost_prefixes: ['abc']}}",
     "{window_s: 0}", "{sequential: {tag: 1}}", "{distinct_calees: {}}"],
)
def test_bad_settings_are_config_errors(snippet: str) -> None:
    """Inverted thresholds, ratios above 1, bad prefixes and unknown keys are config errors."""
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL + f"rules:\n  dialer: {snippet}\n")
    assert all(issue.path.startswith("rules.dialer") for issue in caught.value.issues)
