"""The national_cli presets in config/examples/ load, build and behave as their names say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sipguard.contract import CallInfo, Flow, Verdict
from sipguard.ops.config_load import load_config
from sipguard.policy.engine import Policy
from sipguard.policy.state import RuleState
from sipguard.sip.parser import parse_message
from tests.unit.proxy_helpers import invite
from tests.unit.rule_calls import make_call

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"
PRESETS = sorted(EXAMPLES.glob("national_cli_*.yaml"))
INTL = ("203.0.113.9", 5060)


def test_there_are_three_presets() -> None:
    """fixed only, fixed and mobile, anonymise."""
    assert [p.stem for p in PRESETS] == [
        "national_cli_anonymise", "national_cli_fixed_and_mobile", "national_cli_fixed_only",
    ]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_passes_check_config_and_says_it_is_no_legal_advice(path: Path) -> None:
    """`sipguard check-config` accepts the preset, which is marked as an example to check."""
    done = subprocess.run([sys.executable, "-m", "sipguard", "check-config", str(path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "NOT LEGAL ADVICE" in path.read_text(encoding="utf-8")


def _verdict(path: Path, caller: str) -> Verdict:
    policy = Policy(load_config(path), RuleState())
    policy.activate()
    verdict = policy.decide(make_call(caller, source=INTL), 0.0)
    assert isinstance(verdict, Verdict)
    return verdict


def test_presets_act_on_their_number_types() -> None:
    """Fixed only blocks a French fixed number but not a mobile; anonymise anonymises."""
    fixed_only = EXAMPLES / "national_cli_fixed_only.yaml"
    assert _verdict(fixed_only, "+33123456789").status == 603
    assert _verdict(fixed_only, "+33612345678").accepted
    anonymise = _verdict(EXAMPLES / "national_cli_anonymise.yaml", "+31201234567")
    assert anonymise.accepted and anonymise.anonymise is not None


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_a_home_number_the_preset_cannot_read_as_e164_is_refused(path: Path) -> None:
    """0031…, 31… or a national 020… from the international peer: national_cli cannot tell
    it is a home number, so rule callerid refuses it (603 caller_not_e164) rather than let
    it through unchecked."""
    policy = Policy(load_config(path), RuleState())
    policy.activate()
    for caller in ("0031201234567", "0201234567"):
        msg = parse_message(invite(caller=caller))
        verdict = policy.decide(CallInfo(msg, Flow("udp", INTL, 0), 0.0), 0.0)
        assert isinstance(verdict, Verdict)
        assert (verdict.status, verdict.reason) == (603, "caller_not_e164"), (caller, verdict)
    if "national-carrier" in path.read_text(encoding="utf-8"):  # a domestic peer: unchanged
        msg = parse_message(invite(caller="0201234567"))
        verdict = policy.decide(CallInfo(msg, Flow("udp", ("198.51.100.7", 5060), 0), 0.0),
                                0.0)
        assert isinstance(verdict, Verdict) and verdict.accepted, verdict
