"""`make demo` (loadtest/demo.py) end to end: sipguard in front of a SIPp UAS, each labelled
call answered as its rule says (docs/rules.md, "What the caller hears")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]

# expect class -> (statuses the caller may hear, rule the decision line names)
EXPECTED = {
    "accept": ({200}, None),
    "callerid": ({603, 403}, "callerid"),  # 603 Network Blocked (603+), caller_not_owned
    "concurrency": ({403}, "concurrency"),  # per_caller_exceeded
    "dialer": ({603}, "dialer"),  # distinct_callees, then its cooldown
    "rate": ({503}, "rate"),  # 503 + Retry-After
    "suspended": ({403}, "suspended"),  # caller_suspended
}


def test_demo_mix() -> None:
    sipguard = Path(sys.executable).parent / "sipguard"
    done = subprocess.run(
        [sys.executable, str(REPO / "loadtest" / "demo.py"), "--json", "--sipguard", str(sipguard)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    calls = result["calls"]
    assert {c["expect"] for c in calls} == set(EXPECTED)
    for c in calls:
        statuses, rule = EXPECTED[c["expect"]]
        assert c["status"] in statuses, c
        if c["logged"]:  # rate-limited and cooldown lines are sampled per number
            assert c["rule"] == (rule or "-"), c
    by_label = {c["label"]: c for c in calls}
    assert by_label["legitimate"]["status"] == 200
    assert by_label["concurrent 3/3"]["reason"] == "per_caller_exceeded"
    assert by_label["suspended caller"]["reason"] == "caller_suspended"
    assert by_label["before suspend"]["status"] == 200
    # the first rejection of each kind is always logged (sampling starts after it)
    for label in ("spoofed caller", "concurrent 3/3", "dialer burst 3/4", "rate burst 4/5",
                  "suspended caller"):
        assert by_label[label]["logged"], by_label[label]
