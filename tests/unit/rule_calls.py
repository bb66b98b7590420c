"""Helpers for rule tests that need no proxy: CallInfo and Dialog objects made cheaply, and a
Policy built from a YAML ``rules:`` snippet."""

from __future__ import annotations

from pathlib import Path

from sipguard.contract import CallInfo, Dialog, Flow, Verdict
from sipguard.ops.config_load import parse_config
from sipguard.policy.engine import Policy
from sipguard.policy.state import RuleState
from sipguard.sip.parser import parse_message
from tests.unit.proxy_helpers import invite

MINIMAL = "listen: [udp://192.0.2.1:5060]\ncore: udp://10.0.0.10:5080\n"
SOURCE = ("198.51.100.7", 5062)
_MSG = parse_message(invite())


def make_call(
    caller: str | None = "+12125550100",
    callee: str | None = "+18005550199",
    *,
    source: tuple[str, int] = SOURCE,
    transport: str = "udp",
    now: float = 0.0,
    call_id: str = "call-1@caller",
) -> CallInfo:
    """A CallInfo for an INVITE from ``source`` with the given numbers (the message is shared)."""
    call = CallInfo(_MSG, Flow(transport, source, 0), now)
    call.caller, call.callee = caller, callee
    call.call_id = call_id
    call.lease = f"{call_id}\n{_MSG.from_tag or ''}"  # as CallInfo derives it from the message
    return call


def policy(rules_yaml: str, state: RuleState | None = None, extra: str = "") -> Policy:
    """A Policy from the minimal config plus ``extra`` (e.g. peers) and a ``rules:`` block,
    built on ``state`` (a fresh RuleState when None) and activated, as the edge core does when
    it swaps a policy in."""
    p = Policy(parse_config(MINIMAL + extra + rules_yaml), RuleState() if state is None else state)
    p.activate()
    return p


def decide(p: Policy, call: CallInfo, now: float) -> Verdict:
    verdict = p.decide(call, now)
    assert isinstance(verdict, Verdict)
    return verdict


def dialog(
    caller: str | None,
    callee: str | None,
    *,
    started: float,
    answered: float | None,
    ended: float,
    peer: str | None = None,
    status: int = 0,
) -> Dialog:
    """A finished dialog: answered at ``answered`` (None: never), ended at ``ended`` with
    ``status`` (0: 200 when answered, else 480)."""
    d = Dialog(
        call_id=f"d-{caller}-{callee}-{started}",
        caller_tag="t",
        callee_tag=None,
        caller=caller,
        callee=callee,
        diverters=(),
        peer=peer,
        source=SOURCE,
        started=started,
        expires=started + 14400,
    )
    d.confirmed_at = answered
    d.status = status or (200 if answered is not None else 480)
    d.ended_at = ended
    d.state = "terminated"
    return d


def config_example(marker: str, rule: str) -> str:
    """The commented example of ``rule`` after ``# Example: <marker>`` in config/sipguard.yaml,
    uncommented, as a whole config text."""
    text = (Path(__file__).resolve().parents[2] / "config" / "sipguard.yaml").read_text()
    block = text.split(f"# Example: {marker}", 1)[1].split(f"#   {rule}:", 1)[1]
    lines = [f"{rule}:"]
    for line in block.splitlines()[1:]:
        if not line.startswith("#   "):
            break
        lines.append(line[4:])
    return MINIMAL + "rules:\n" + "".join(f"  {line}\n" for line in lines)
