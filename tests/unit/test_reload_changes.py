"""What a reload reports as changed (``changed`` in its answer and its log line)."""

from __future__ import annotations

import pytest

from sipguard.ops.config_load import parse_config
from sipguard.ops.reload import changed_keys

BASE = "listen: [udp://127.0.0.1:5060]\ncore: udp://127.0.0.1:5080\n"


def _config(rules: str, peer_rules: str = "", peer_net: str = "192.0.2.1/32") -> str:
    peer = f"peers:\n  - name: a\n    networks: [{peer_net}]\n"
    if peer_rules:
        peer += f"    rules: {peer_rules}\n"
    return BASE + peer + f"rules: {rules}\n"


@pytest.mark.parametrize(("before", "after", "changed"), [
    # the top-level rules alone: every peer's merged rules follow, the peers did not change
    (_config("{concurrency: {per_caller: 2}}"), _config("{concurrency: {per_caller: 3}}"),
     ["rules"]),
    (_config("{concurrency: {per_caller: 2}}", "{rate: {per_caller: {rate: 1, burst: 2}}}"),
     _config("{concurrency: {per_caller: 3}}", "{rate: {per_caller: {rate: 1, burst: 2}}}"),
     ["rules"]),
    # a peer's own override changed, alone or with the top level
    (_config("{concurrency: {per_caller: 2}}", "{concurrency: {per_caller: 5}}"),
     _config("{concurrency: {per_caller: 2}}", "{concurrency: {per_caller: 6}}"), ["peers"]),
    (_config("{concurrency: {per_caller: 2}}", "{concurrency: {per_caller: 5}}"),
     _config("{concurrency: {per_caller: 3}}", "{concurrency: {per_caller: 6}}"),
     ["peers", "rules"]),
    (_config("{concurrency: {per_caller: 2}}"),
     _config("{concurrency: {per_caller: 3}}", "{concurrency: {per_caller: 9}}"),
     ["peers", "rules"]),
    (_config("{concurrency: {per_caller: 2}}", "{concurrency: {per_caller: 9}}"),
     _config("{concurrency: {per_caller: 3}}"), ["peers", "rules"]),
    # another field of a peer, with the top-level rules
    (_config("{concurrency: {per_caller: 2}}"),
     _config("{concurrency: {per_caller: 3}}", peer_net="192.0.2.2/32"), ["peers", "rules"]),
    (_config("{concurrency: {per_caller: 2}}"), _config("{concurrency: {per_caller: 2}}"), []),
])
def test_a_top_level_rules_change_is_not_reported_as_a_peers_change(
    before: str, after: str, changed: list[str]
) -> None:
    assert changed_keys(parse_config(before), parse_config(after)) == changed
