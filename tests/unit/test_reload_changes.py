"""What a reload reports as changed (``changed`` in its answer and its log line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sipguard.ops.config_load import parse_config
from sipguard.ops.reload import changed_keys, held_back

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


def test_a_list_file_edited_in_place_is_reported_at_its_setting(tmp_path: Path) -> None:
    """A reload after a number list or dno_file was edited (the config itself the same)
    reports the setting that names it — a file the top-level rules name once, at the top
    level, not again for each peer inheriting it; the held-back copy a reload runs keeps the
    stamps, so the next reload of unchanged files reports nothing."""
    nums, dno = tmp_path / "nums.txt", tmp_path / "dno.txt"
    nums.write_text("+1212555*\n")
    dno.write_text("+18005550100\n")
    text = (BASE + "peers:\n  - name: a\n    networks: [192.0.2.1/32]\n"
            f"    numbers_file: {nums}\n  - name: b\n    networks: [192.0.2.2/32]\n"
            f"rules:\n  callerid: {{dno_file: {dno}}}\n")
    first = parse_config(text)
    assert changed_keys(first, parse_config(text)) == []
    nums.write_text("+1212555*\n+1312555*\n")
    second = parse_config(text)
    assert changed_keys(first, second) == ["peers[0].numbers_file"]
    dno.write_text("+18005550100\n+18005550101\n")
    running = second.model_copy(update={"listen": second.listen})  # as held_back makes it
    third = parse_config(text)
    assert changed_keys(running, third) == ["rules.callerid.dno_file"]
    assert changed_keys(third, parse_config(text)) == []
    # a file named anew is the setting's change (``peers``), not an edit
    other = tmp_path / "other.txt"
    other.write_text("+1646*\n")
    assert changed_keys(third, parse_config(text.replace(str(nums), str(other)))) == ["peers"]


def test_a_reload_holds_back_the_numbering_regions_of_the_running_config() -> None:
    """default_region and a peer's keep their running values (the live calls' numbers were
    read with them), each reported; a peer new in the reload takes its own."""
    base = ("listen: [udp://127.0.0.1:5060]\ncore: udp://127.0.0.1:5080\n{top}"
            "peers:\n  - name: a\n    networks: [10.0.0.0/8]\n{a}"
            "{b}")
    old = parse_config(base.format(top="", a="", b=""))
    new = parse_config(base.format(top="default_region: US\n", a="    default_region: GB\n",
                                   b="  - name: b\n    networks: [11.0.0.0/8]\n"))
    kept, restart = held_back(old, new, changed_keys(old, new))
    assert restart == ["default_region", "peers[a].default_region"]
    assert kept.default_region is None
    assert [(p.name, p.default_region) for p in kept.peers] == [("a", None), ("b", "US")]
    same, nothing = held_back(old, old, [])
    assert nothing == [] and same is old
