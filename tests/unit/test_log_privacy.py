"""log.numbers: masked and hashed decision log lines and config checks carry no full number."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from sipguard.contract import DialogEnded, InviteDecided, Verdict
from sipguard.ops.calllog import CallLogger
from sipguard.ops.config import LogSettings
from sipguard.ops.config_load import ConfigError, parse_config
from sipguard.ops.logging import SampledLogger, configure_logging, get_logger
from sipguard.ops.metrics import Metrics
from sipguard.ops.observe import Observer
from sipguard.ops.privacy import NumberPrivacy, number_privacy
from tests.unit.rule_calls import MINIMAL, dialog, make_call

CALLER, CALLEE, DIVERTER = "+31201234567", "+18005550199", "+4930123456789"
NUMBERS = (CALLER, CALLEE, DIVERTER)


pytestmark = pytest.mark.usefixtures("reset_structlog")


def logged(privacy: NumberPrivacy | None) -> list[dict[str, Any]]:
    """The lines an Observer writes for one decided call (with a number in its detail) and
    one ended dialog."""
    stream = io.StringIO()
    configure_logging(LogSettings(format="json"), stream=stream)
    log = get_logger("sipguard")
    observer = Observer(Metrics(), log, CallLogger("sipguard"), SampledLogger(log, 1.0))
    observer.privacy = privacy
    call = make_call(CALLER, CALLEE)
    call.diverters = (DIVERTER,)
    verdict = Verdict("reject", rule="concurrency", reason="per_caller_exceeded", status=403,
                      detail={"limit": "per_caller", "number": CALLER, "count": 2})
    observer.observe(InviteDecided(call, verdict))
    observer.observe(InviteDecided(call, Verdict("reject", rule="rate", reason="per_caller",
                                                 status=503, detail={"key": CALLER},
                                                 sample=f"rate:per_caller:{CALLER}")))
    ended = dialog(CALLER, CALLEE, started=0, answered=1, ended=5)
    ended.call_id = "ended-1@caller"  # the helper names it after its numbers
    observer.observe(DialogEnded(ended, "bye_caller"))
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def digits_anywhere(lines: list[dict[str, Any]], number: str) -> bool:
    text = json.dumps(lines)
    return number in text or number[1:] in text


def test_full_mode_writes_the_numbers() -> None:
    """full (the default) writes the numbers as they are."""
    lines = logged(None)
    assert lines[0]["caller"] == CALLER and lines[0]["diverters"] == [DIVERTER]
    assert lines[-1]["event"] == "dialog_ended" and lines[-1]["caller"] == CALLER


def test_masked_lines_keep_country_code_and_last_three_digits_only() -> None:
    """masked: +31 and the last 3 digits; no full number in any line, detail included."""
    lines = logged(NumberPrivacy("masked"))
    assert [ln["event"] for ln in lines] == ["invite_decided", "invite_decided", "dialog_ended"]
    assert lines[0]["caller"] == "+31******567"
    assert lines[0]["callee"] == "+1*******199"
    assert lines[0]["detail"]["number"] == "+31******567"
    assert lines[1]["detail"]["key"] == "+31******567"
    for number in NUMBERS:
        assert not digits_anywhere(lines, number)


def test_hashed_lines_follow_one_number_without_writing_it(tmp_path: Path) -> None:
    """hashed: the same 16-hex HMAC token for one number in every line, never the number."""
    key = tmp_path / "key"
    key.write_text("a-secret-key-of-32-bytes-or-so!!\n")
    privacy = number_privacy("hashed", key)
    lines = logged(privacy)
    token = lines[0]["caller"]
    assert token.startswith("h:") and len(token) == 18
    assert lines[-1]["caller"] == token and lines[0]["detail"]["number"] == token
    assert lines[0]["callee"] != token
    for number in NUMBERS:
        assert not digits_anywhere(lines, number)
    other = tmp_path / "other"
    other.write_text("another-key-another-key-another!!")
    assert number_privacy("hashed", other)(CALLER) != token  # keyed: no dictionary attack


def test_hashed_needs_a_key_file_named_in_the_error(tmp_path: Path) -> None:
    """log.numbers: hashed without hash_key_file, or with a short key, is a config error."""
    with pytest.raises(ConfigError, match="hash_key_file"):
        parse_config(MINIMAL + "log: {numbers: hashed}\n")
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ConfigError, match="hash_key_file"):
        parse_config(MINIMAL + f"log: {{numbers: hashed, hash_key_file: {short}}}\n")
    good = tmp_path / "good"
    good.write_text("0123456789abcdef0123")
    cfg = parse_config(MINIMAL + f"log: {{numbers: hashed, hash_key_file: {good}}}\n")
    assert cfg.log.numbers == "hashed"


def test_masking_short_numbers_and_prefixes_hides_them() -> None:
    """An extension is all stars; a prefix keeps its country code; other text is left alone."""
    m = NumberPrivacy("masked")
    assert m("1001") == "****"
    assert m.text("+3120*") == "+31***"
    assert m.text("carrier-a") == "carrier-a"
    assert m(None) is None


def test_every_rule_in_monitor_mode_that_objects_is_counted_and_logged() -> None:
    """dialer (distinct callees, block at 2) and rate (1 call) both in monitor mode: the 2nd
    call is named by the first monitored rule, the other in also_monitored, both counted.
    With callerid enforcing after them (a DNO caller), its refusal still lists and counts
    the monitored hits before it."""
    from sipguard.policy.engine import Policy
    from tests.unit.rule_calls import decide

    monitored = ("rules:\n"
                 "  dialer: {mode: monitor, distinct_callees: {tag: 2, block: 2}, "
                 "short_calls: null, asr: null, sequential: null}\n"
                 "  rate: {mode: monitor, per_caller: {rate: 1, burst: 1}}\n")
    stream = io.StringIO()
    configure_logging(LogSettings(format="json"), stream=stream)
    log = get_logger("sipguard")
    observer = Observer(Metrics(), log, CallLogger("sipguard"), SampledLogger(log, 0.0))
    for extra in ("", "  callerid: {dno: ['+12125550100']}\n"):
        p = Policy(parse_config(MINIMAL + monitored + extra))
        verdicts = []
        for i in range(2):
            call = make_call("+12125550100", f"+1800555{i:04d}")
            verdicts.append(decide(p, call, 0.0))
            observer.observe(InviteDecided(call, verdicts[-1]))
        v = verdicts[1]
        if not extra:
            assert v.monitored and (v.rule, v.reason) == ("dialer", "distinct_callees")
            assert [(a.rule, a.reason) for a in v.also] == [("rate", "per_caller")]
        else:
            assert (v.action, v.rule, v.reason) == ("reject", "callerid", "caller_dno")
            assert [(a.rule, a.reason) for a in v.also] == [
                ("dialer", "distinct_callees"), ("rate", "per_caller")]
    c = observer.counters
    assert c["rule_rate_per_caller"] == 2 and c["rule_dialer_distinct_callees"] == 2, c
    assert c["rule_callerid_caller_dno"] == 2, c
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    decided = [x for x in lines if x.get("event") == "invite_decided" and "also_monitored" in x]
    assert [x["also_monitored"] for x in decided] == [
        "rate:per_caller", "dialer:distinct_callees,rate:per_caller"], decided


def test_a_rule_is_listed_once_however_many_of_its_limits_are_over() -> None:
    """With the shared store a rule in monitor mode may report two limits over (per_caller
    and per_callee): only its first is kept, as the memory backend reports one."""
    from types import SimpleNamespace

    from sipguard.policy.pipeline import _Run

    run, rule = _Run(), SimpleNamespace(mode="monitor", name="concurrency")
    for reason in ("per_caller_exceeded", "per_callee_exceeded"):
        assert run.take(rule, Verdict("reject", rule="concurrency", reason=reason,
                                      status=403)) is None
    v = run.result()
    assert (v.rule, v.reason, v.also) == ("concurrency", "per_caller_exceeded", ())
