"""Tests for the config file: schema, error reports with field path and line, overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml

from sipguard.ops.config import Config, LogSettings, SipSettings
from sipguard.ops.config_load import (
    ConfigError,
    ConfigIssue,
    config_with_overrides,
    load_config,
    parse_config,
    region_advice,
)
from sipguard.ops.endpoints import Endpoint
from sipguard.policy.settings import ConfigPath

REPO = Path(__file__).resolve().parents[2]
MINIMAL = "listen:\n  - udp://127.0.0.1:5060\ncore: udp://127.0.0.1:5080\n"


def issues_of(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="test.yaml")
    return caught.value.issues


def test_minimal_text_takes_defaults() -> None:
    """A config holding only listen and core is valid and every other setting is its default."""
    cfg = parse_config(MINIMAL)
    assert cfg.listen == (Endpoint("udp", "127.0.0.1", 5060),)
    assert cfg.core == Endpoint("udp", "127.0.0.1", 5080)
    assert cfg.mode == "enforce"
    assert cfg.sip == SipSettings()
    assert cfg.sip.max_message_size == 65535 and cfg.sip.timer_c_s == 185
    assert cfg.log == LogSettings(level="info", format="json", parse_error_sample_s=1.0)


def test_minimal_file_loads() -> None:
    """config/minimal.yaml loads from disk."""
    cfg = load_config(REPO / "config" / "minimal.yaml")
    assert cfg.core == Endpoint("udp", "127.0.0.1", 5080)


def test_example_file_loads() -> None:
    """config/sipguard.yaml loads and listens on UDP and TCP 127.0.0.1:5060."""
    cfg = load_config(REPO / "config" / "sipguard.yaml")
    assert cfg.listen == (
        Endpoint("udp", "127.0.0.1", 5060),
        Endpoint("tcp", "127.0.0.1", 5060),
    )
    assert cfg.core == Endpoint.parse("udp://127.0.0.1:5080")


def test_example_file_writes_out_every_setting_at_its_default() -> None:
    """The example names every setting of every section, each set to its default."""
    path = REPO / "config" / "sipguard.yaml"
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == set(Config.model_fields) - {"metrics"}  # `metrics:`: admin's old name
    assert set(raw["sip"]) == set(SipSettings.model_fields)
    assert set(raw["log"]) == set(LogSettings.model_fields)
    cfg = load_config(path)
    assert cfg.sip == SipSettings() and cfg.log == LogSettings() and cfg.mode == "enforce"


def test_unknown_top_level_key_reports_path_and_line() -> None:
    """An unknown top-level key is an error naming the key and its line."""
    (issue,) = issues_of(MINIMAL + "\nbogus: 1\n")
    assert issue.path == "bogus"
    assert issue.line == 5
    assert "unknown key 'bogus'" in issue.message


def test_unknown_nested_key_reports_dotted_path_line_and_suggestion() -> None:
    """A misspelt nested key reports sip.<key>, its own line, and the likely intended name."""
    text = MINIMAL + "sip:\n  record_route: false\n  max_mesage_size: 2000\n"
    (issue,) = issues_of(text)
    assert issue.path == "sip.max_mesage_size"
    assert issue.line == 6
    assert "did you mean 'max_message_size'" in issue.message


def test_bad_port_in_second_listen_entry_reports_index_and_line() -> None:
    """A bad port in listen[1] is reported as listen[1] at that item's line."""
    text = (
        "listen:\n  - udp://127.0.0.1:5060\n  - tcp://127.0.0.1:70000\ncore: udp://10.0.0.1:5060\n"
    )
    (issue,) = issues_of(text)
    assert issue == ConfigIssue("listen[1]", 3, "port must be 1..65535, got '70000'")


def test_out_of_range_value_reports_path_and_line() -> None:
    """A value outside its range names the field and the line it is on."""
    (issue,) = issues_of(MINIMAL + "sip:\n  max_message_size: 100\n")
    assert (issue.path, issue.line) == ("sip.max_message_size", 5)
    assert "1024" in issue.message


def test_all_issues_reported_at_once_and_rendered_file_line_field() -> None:
    """Every problem is listed, one `FILE:LINE: FIELD: message` line each, in file order."""
    text = "listen: [udp://1.2.3.4:0]\ncore: udp://1.2.3.4:6\nmode: block\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="edge.yaml")
    lines = str(caught.value).splitlines()
    assert lines == [
        "edge.yaml:1: listen[0]: port must be 1..65535, got '0'",
        "edge.yaml:3: mode: Input should be 'enforce' or 'monitor'",
    ]


def test_missing_core_points_at_parent_mapping() -> None:
    """A missing required field is reported by name at the line of its parent mapping."""
    (issue,) = issues_of("# comment\nlisten: [udp://127.0.0.1:5060]\n")
    assert issue == ConfigIssue("core", 2, "required setting is missing")


def test_empty_listen_list_is_rejected() -> None:
    """listen needs at least one address."""
    (issue,) = issues_of("listen: []\ncore: udp://127.0.0.1:5080\n")
    assert (issue.path, issue.line) == ("listen", 1)


def test_yaml_syntax_error_reports_line() -> None:
    """Broken YAML becomes a ConfigError carrying the line of the problem."""
    (issue,) = issues_of("listen:\n  - udp://127.0.0.1:5060\ncore: [udp://127.0.0.1:5080\n")
    assert issue.path == ""
    assert issue.line == 4
    assert issue.message.startswith("YAML syntax:")


@pytest.mark.parametrize("char", ["\x1b", "\x00", "\x07"])
def test_a_control_character_is_a_yaml_error_with_its_line(char: str) -> None:
    """A control character (a colour code pasted from a terminal, a NUL) is a config error
    naming its line, like any other YAML syntax error — not an exception."""
    (issue,) = issues_of(MINIMAL + f"# pasted: {char}[0m\n")
    assert issue.line == MINIMAL.count("\n") + 1
    assert issue.message.startswith("YAML syntax: unacceptable character")


def test_duplicate_key_is_an_error_with_both_lines() -> None:
    """A key given twice in one mapping is reported at the second, naming the first."""
    text = MINIMAL + "sip:\n  t1_ms: 400\n  t1_ms: 600\n"
    (issue,) = issues_of(text)
    assert issue == ConfigIssue("sip.t1_ms", 6, "duplicate key 't1_ms' (first at line 5)")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- udp://127.0.0.1:5060\n", "5\n"])
def test_empty_or_non_mapping_file_is_an_error(text: str) -> None:
    """An empty file or one whose top level is not a mapping is a ConfigError."""
    (issue,) = issues_of(text)
    assert issue.path == ""


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file is reported as a ConfigError naming the file."""
    with pytest.raises(ConfigError, match="absent.yaml: cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_tls_listener_needs_certificate_and_key() -> None:
    """A tls:// listener without tls.cert_file / tls.key_file is an error naming the fields."""
    (issue,) = issues_of("listen: [tls://127.0.0.1:5061]\ncore: tcp://127.0.0.1:5080\n")
    assert "tls.cert_file and tls.key_file are required" in issue.message
    assert "tls://127.0.0.1:5061" in issue.message
    assert Endpoint.parse("tls://127.0.0.1:5061") == Endpoint("tls", "127.0.0.1", 5061)


def test_tls_section_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """tls files resolve against the config file's folder; verify_clients needs ca_file, and
    cert_file and key_file come together."""
    path = tmp_path / "sg.yaml"
    path.write_text(
        "listen: [tls://127.0.0.1:5061, udp://127.0.0.1:5060]\ncore: tls://10.0.0.10:5061\n"
        "tls: {cert_file: c.pem, key_file: k.pem, ca_file: ca.pem, verify_clients: true,\n"
        "      core_ca_file: core-ca.pem, core_server_name: core.example.net}\n"
    )
    cfg = load_config(path)
    assert cfg.tls.cert_file == tmp_path / "c.pem" and cfg.tls.key_file == tmp_path / "k.pem"
    assert cfg.tls.ca_file == tmp_path / "ca.pem" and cfg.tls.verify_clients
    assert cfg.tls.core_ca_file == tmp_path / "core-ca.pem"
    assert cfg.core == Endpoint("tls", "10.0.0.10", 5061)
    (issue,) = issues_of(MINIMAL + "tls: {verify_clients: true}\n")
    assert "tls.verify_clients needs tls.ca_file" in issue.message
    (issue,) = issues_of(MINIMAL + "tls: {cert_file: c.pem}\n")
    assert "tls.key_file is missing" in issue.message


def test_ipv6_endpoint_parses_and_prints_with_brackets() -> None:
    """Bracketed IPv6 parses to a bare compressed host and prints back as a URI."""
    endpoint = Endpoint.parse("tcp://[2001:DB8:0::1]:5070")
    assert endpoint == Endpoint("tcp", "2001:db8::1", 5070)
    assert str(endpoint) == "tcp://[2001:db8::1]:5070"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("udp://::1:5060", "in brackets"),
        ("udp://host.example", "port is missing"),
        ("udp://10.0.0.1:0", "1..65535"),
        ("udp://10.0.0.300:5060", "not an IPv4 address"),
        ("udp://bad_host:5060", "not an IP address or hostname"),
        ("sctp://10.0.0.1:5060", "use udp://, tcp:// or tls://"),
        ("10.0.0.1:5060", "expected a URI"),
        ("udp://user@10.0.0.1:5060", "only HOST:PORT"),
    ],
)
def test_endpoint_parse_rejects_with_clear_message(text: str, needle: str) -> None:
    """Endpoint.parse raises ValueError saying what is wrong with the URI."""
    with pytest.raises(ValueError, match=needle):
        Endpoint.parse(text)


def test_core_must_not_be_a_listen_address() -> None:
    """A core equal to a listen address is refused (calls would loop)."""
    (issue,) = issues_of("listen: udp://127.0.0.1:5060\ncore: udp://127.0.0.1:5060\n")
    assert (issue.path, issue.line) == ("core", 2)
    assert "loop" in issue.message


def test_a_udp_core_needs_a_udp_listener() -> None:
    """UDP to the core leaves from a udp:// listener's socket: without one every forward
    would fail, so the config is refused, naming the core and its line."""
    (issue,) = issues_of("listen: [tcp://127.0.0.1:5060]\ncore: udp://127.0.0.1:5080\n")
    assert (issue.path, issue.line) == ("core", 2)
    assert "no listen address is" in issue.message
    parse_config("listen: [tcp://127.0.0.1:5060]\ncore: tcp://127.0.0.1:5080\n")


def test_timer_order_checked() -> None:
    """t2_ms below t1_ms is rejected, pointing at t2_ms (the check of the section names it);
    written on lines of their own, at t2_ms's line."""
    (issue,) = issues_of(MINIMAL + "sip: {t1_ms: 5000, t2_ms: 4000}\n")
    assert (issue.path, issue.line) == ("sip.t2_ms", 4)
    (issue,) = issues_of(MINIMAL + "sip:\n  t2_ms: 4000\n  t1_ms: 5000\n")
    assert (issue.path, issue.line) == ("sip.t2_ms", 5)


def test_advertise_normalised_and_ipv6_needs_brackets() -> None:
    """advertise accepts host[:port], bracketing IPv6, and refuses bare IPv6 with a port."""
    cfg = parse_config(MINIMAL + "sip: {advertise: '[2001:db8::1]:5060'}\n")
    assert cfg.sip.advertise == "[2001:db8::1]:5060"
    (issue,) = issues_of(MINIMAL + "sip: {advertise: '2001:db8::1'}\n")
    assert issue.path == "sip.advertise"


def test_overrides_replace_listen_and_core() -> None:
    """CLI overrides replace listen and core and keep everything else."""
    cfg = parse_config(MINIMAL + "mode: monitor\n")
    new = config_with_overrides(
        cfg, [Endpoint.parse("tcp://[::1]:5062")], Endpoint.parse("tcp://10.0.0.9:5060")
    )
    assert new.listen == (Endpoint("tcp", "::1", 5062),)
    assert new.core == Endpoint("tcp", "10.0.0.9", 5060)
    assert new.mode == "monitor"
    assert config_with_overrides(cfg, None, None) == cfg
    assert cfg.core == Endpoint("udp", "127.0.0.1", 5080)  # the original is untouched


def test_overrides_are_validated() -> None:
    """An override that makes the config invalid raises ConfigError naming the field."""
    cfg = parse_config(MINIMAL)
    with pytest.raises(ConfigError) as caught:
        config_with_overrides(cfg, None, Endpoint.parse("udp://127.0.0.1:5060"))
    assert caught.value.issues[0].path == "core"
    assert str(caught.value).startswith("<command line>: core: ")


def test_config_is_frozen() -> None:
    """Assigning to a loaded config or its sections or endpoints raises."""
    cfg = parse_config(MINIMAL)
    with pytest.raises(pydantic.ValidationError):
        cfg.mode = "monitor"
    with pytest.raises(pydantic.ValidationError):
        cfg.sip.t1_ms = 1
    with pytest.raises(AttributeError):
        cfg.core.port = 1  # type: ignore[misc]


def test_dump_round_trips() -> None:
    """A dumped config (endpoints as URI strings) validates back to an equal config."""
    cfg = parse_config(MINIMAL)
    dumped = cfg.model_dump()
    assert dumped["core"] == "udp://127.0.0.1:5080"
    assert Config.model_validate(dumped) == cfg


def test_config_path_resolves_against_base_dir(tmp_path: Path) -> None:
    """A ConfigPath setting is resolved against base_dir; absolute paths are kept."""

    class WithFile(pydantic.BaseModel):
        dno_file: ConfigPath

    ctx = {"base_dir": tmp_path}
    assert WithFile.model_validate({"dno_file": "dno.txt"}, context=ctx).dno_file == (
        tmp_path / "dno.txt"
    )
    assert WithFile.model_validate({"dno_file": "/etc/x"}, context=ctx).dno_file == Path("/etc/x")


def test_overload_thresholds_checked() -> None:
    """Overload protection is on by default; resume must sit below shed; null turns it off."""
    assert parse_config(MINIMAL).sip.overload_shed_above == 0.5
    (issue,) = issues_of(MINIMAL + "sip: {overload_shed_above: 0.3, overload_resume_below: 0.4}\n")
    assert (issue.path, issue.line) == ("sip.overload_resume_below", 4)
    (issue,) = issues_of(MINIMAL + "sip: {overload_shed_above: 1.5}\n")
    assert issue.path == "sip.overload_shed_above"
    assert parse_config(MINIMAL + "sip: {overload_shed_above: null}\n").sip.overload_shed_above is None


@pytest.mark.parametrize(("extra", "path", "line"), [
    ("rules:\n  concurrency: {per_caller: yes}\n", "rules.concurrency.per_caller", 5),
    ("rules:\n  concurrency:\n    max_diversions: off\n", "rules.concurrency.max_diversions", 6),
    ("rules:\n  dialer: {window_s: on}\n", "rules.dialer.window_s", 5),
    ("sip:\n  t1_ms: true\n", "sip.t1_ms", 5),
    ("rules:\n  rate: {per_caller: {rate: yes, burst: 5}}\n", "rules.rate.per_caller.rate", 5),
    ("log:\n  queue_bytes: yes\n", "log.queue_bytes", 5),
])
def test_a_yaml_boolean_is_no_number(extra: str, path: str, line: int) -> None:
    """YAML's yes/no/on/off/true/false where a number is wanted is an error naming the field
    and the line: pydantic alone took `max_diversions: off` as 0 (every forwarded call
    refused) and `per_caller: yes` as 1."""
    found = [i for i in issues_of(MINIMAL + extra) if i.path == path]
    assert found and found[0].line == line, issues_of(MINIMAL + extra)
    assert "boolean" in found[0].message


def test_booleans_stay_booleans() -> None:
    """Boolean settings still take yes/no/on/off."""
    cfg = parse_config(MINIMAL + "rules:\n  callerid: {require_e164: off, enabled: yes}\n"
                       "sip: {udp_send_thread: no}\n")
    assert cfg.sip.udp_send_thread is False


def test_a_yaml_boolean_is_no_number_in_a_union_with_a_word() -> None:
    """verify_threads takes a number or `auto`: `yes` is neither (pydantic alone made it 1)."""
    from sipguard.policy.identity_settings import Settings

    with pytest.raises(pydantic.ValidationError, match="boolean") as caught:
        Settings.model_validate({"verify_threads": True})
    assert [e["loc"] for e in caught.value.errors() if "boolean" in e["msg"]] == [
        ("verify_threads",)]
    with pytest.raises(pydantic.ValidationError, match="boolean") as caught:
        Settings.model_validate({"x5u_ports": [443, True]})  # `yes` in a list of ports
    assert ("x5u_ports",) in [e["loc"] for e in caught.value.errors()]


def test_a_peer_network_with_host_bits_set_is_an_error_naming_both_readings() -> None:
    """203.0.113.5/24 may mean the /24 or the one address: an error with the line, naming
    both spellings, rather than trusting 255 more addresses."""
    text = MINIMAL + "peers:\n  - name: a\n    networks: [203.0.113.0/24, 203.0.113.5/24]\n"
    (issue,) = issues_of(text)
    assert issue.path.startswith("peers") and issue.line == 6
    assert "host bits set" in issue.message and "203.0.113.0/24" in issue.message
    assert "203.0.113.5/32" in issue.message
    assert parse_config(MINIMAL + "peers:\n  - name: a\n    networks: [203.0.113.5]\n")


def test_two_peers_with_one_network_is_an_error() -> None:
    """An address belongs to one peer: the same network under two names (one of them would
    never match) is an error naming both; nested networks are fine (the most specific wins)."""
    text = (MINIMAL + "peers:\n  - name: a\n    networks: [10.0.0.0/8]\n"
            "  - name: b\n    networks: ['10.0.0.0/8']\n")
    (issue,) = issues_of(text)
    assert "'a'" in issue.message and "'b'" in issue.message and issue.path == "peers"
    assert parse_config(MINIMAL + "peers:\n  - name: a\n    networks: [10.0.0.0/8]\n"
                        "  - name: b\n    networks: [10.1.0.0/16]\n")


@pytest.mark.parametrize(("url", "says"), [
    ("redis://127.0.0.1:99999/0", "out of range"),
    ("redis://127.0.0.1:abc/0", "abc"),
    ("redis://:s3cret@[bad/0", "IPv6"),
    ("redis:///0", "no host"),
    ("redis://127.0.0.1:6379/x", "not a number"),
    ("http://127.0.0.1:6379/0", "is not redis://"),
])
def test_a_redis_url_the_client_would_refuse_is_a_config_error(url: str, says: str) -> None:
    """check-config refuses what the Redis client would refuse at start, naming the line,
    and never shows the password."""
    (issue,) = issues_of(MINIMAL + f"state:\n  backend: redis\n  url: '{url}'\n")
    assert issue.path.startswith("state") and says in issue.message, issue
    assert "s3cret" not in issue.message


def test_numbers_read_as_yaml_1_2_does() -> None:
    """010 is ten (YAML 1.1: eight), 0x10 and 0o17 keep their bases, and 4:00 (YAML 1.1: 240,
    base 60 — a lifetime of four minutes where four hours were meant) is an error naming the
    field and the line."""
    def lifetime(value: str) -> float:
        return parse_config(MINIMAL + f"sip: {{max_dialog_lifetime_s: {value}}}\n"
                            ).sip.max_dialog_lifetime_s
    assert (lifetime("010"), lifetime("0x10"), lifetime("0o17"), lifetime("7200")) == (
        10, 16, 15, 7200)
    (issue,) = issues_of(MINIMAL + "sip:\n  max_dialog_lifetime_s: 4:00\n")
    assert (issue.path, issue.line) == ("sip.max_dialog_lifetime_s", 5)


def test_peers_without_a_region_under_called_number_limits_are_noted(tmp_path: Path) -> None:
    """A peer without default_region under a limit on the called number: its national
    spellings of one number (16465558800, 6465558800) are counted apart, so check-config says
    so (stderr, still OK, exit 0) — and not for a peer with a region, or one whose own rules
    turn those limits (or the rules) off."""
    text = MINIMAL + (
        "rules:\n  concurrency: {per_callee: 2}\n  rate: {per_callee: {rate: 3, burst: 3}}\n"
        "peers:\n"
        "  - {name: pa, networks: [127.0.0.2/32], default_region: US}\n"
        "  - {name: pb, networks: [127.0.0.4/32]}\n"
        "  - {name: pc, networks: [127.0.0.5/32],\n"
        "     rules: {concurrency: {per_callee: null}, rate: {per_callee: null}}}\n"
        "  - {name: pd, networks: [127.0.0.6/32],\n"
        "     rules: {concurrency: {enabled: false}, rate: {enabled: false}}}\n"
    )
    (advice,) = region_advice(parse_config(text))
    assert "'pb'" in advice and "concurrency.per_callee, rate.per_callee" in advice
    path = tmp_path / "c.yaml"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "sipguard", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith(": OK"), done
    assert "note: peer 'pb' has no default_region" in done.stderr, done.stderr


def test_check_config_says_every_number_list_line_and_file_problem_in_one_run(
        tmp_path: Path) -> None:
    """A peer's numbers_file with two bad lines and an admin API off loopback without a
    token: one run of check-config names both bad lines at the key's line of the config, and
    the admin problem; exit 2."""
    (tmp_path / "nums.txt").write_text("+1212555*\nnot-a-number\n+1646\n12a\n")
    path = tmp_path / "c.yaml"
    path.write_text(
        "listen: [udp://127.0.0.1:5060]\ncore: udp://127.0.0.1:5080\n"
        "admin: {listen: 0.0.0.0:9099}\n"
        "peers:\n  - name: lab\n    networks: [127.0.0.9/32]\n    numbers_file: nums.txt\n")
    done = subprocess.run([sys.executable, "-m", "sipguard", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert f"{path}:7: peers[0].numbers_file: peer lab: numbers_file: " in done.stderr
    assert "nums.txt:2: 'not-a-number' is not a number" in done.stderr
    assert "nums.txt:4: '12a' is not a number" in done.stderr
    assert "not loopback-only: set admin.token_file" in done.stderr, done.stderr


def test_a_number_list_names_its_first_bad_lines_and_counts_the_rest(tmp_path: Path) -> None:
    """25 bad lines: the first 20 named with FILE:LINE, then how many more."""
    from sipguard.policy.peers import BAD_LINES_SHOWN, read_number_file

    (tmp_path / "l.txt").write_text("+1212555*\n" + "".join(f"x{i}\n" for i in range(25)))
    with pytest.raises(ValueError) as info:
        read_number_file(tmp_path / "l.txt")
    lines = str(info.value).splitlines()
    assert len(lines) == BAD_LINES_SHOWN + 1 == 21
    assert lines[0] == f"{tmp_path / 'l.txt'}:2: 'x0' is not a number or a prefix pattern " \
        "like '+1212555*'"
    assert lines[-1] == f"{tmp_path / 'l.txt'}: and 5 more such lines"



def test_every_bad_item_of_a_number_list_is_said_at_once() -> None:
    """A peer's numbers, a DNO list and the suspended list, each with a bad text and an
    unquoted YAML number: one error per list, at its line, naming every bad item by its place
    (before, the type error came first and the bad text only after it was fixed)."""
    text = (
        "listen: [udp://127.0.0.1:5060]\ncore: udp://127.0.0.1:5080\n"
        "peers:\n  - name: a\n    networks: [127.0.0.2/32]\n"
        "    numbers: ['+1212555*', abc, '+1-212', 12125550100]\n"
        "rules:\n  callerid: {dno: ['+1800', x1, 18005550100]}\n"
        "suspended: ['+1 212', 'abc*']\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert [(i.line, i.path) for i in info.value.issues] == [
        (6, "peers[0].numbers"), (8, "rules.callerid.dno"), (9, "suspended")]
    numbers, dno, suspended = (i.message for i in info.value.issues)
    assert numbers == ("[1] 'abc' is not a number or a prefix pattern like '+1212555*'; "
                       "[3] 12125550100 is a YAML number, not text: quote it, as "
                       "'+12125550100' or '12125550100'")
    assert "[1] 'x1' is not" in dno and "[2] 18005550100 is a YAML number" in dno
    assert suspended == "[1] 'abc*' is not a telephone number"


def test_a_peers_region_is_read_in_any_case_and_an_unknown_one_named() -> None:
    """default_region 'us' is US (it was refused with the raw pattern); 'uk' is no region,
    and the error names the field, its line and GB."""
    text = MINIMAL + "peers:\n  - name: a\n    networks: [10.0.0.0/8]\n    default_region: {}\n"
    assert parse_config(text.format("us")).peers[0].default_region == "US"
    with pytest.raises(ConfigError) as err:
        parse_config(text.format("uk"))
    assert ":7: peers[0].default_region" in str(err.value) and "GB" in str(err.value)


def test_check_config_refuses_a_state_dir_run_would_refuse(tmp_path: Path) -> None:
    """state_dir that is a file, or whose suspensions file is not sipguard's: check-config
    says so (exit 2) as `run` would at start — it said OK; a folder still to be made under a
    writable one is fine, and check-config makes nothing."""
    (tmp_path / "file").write_text("x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "suspensions.json").write_text("not json")
    for state_dir, says in ((tmp_path / "file", "not a folder"),
                            (broken, "cannot read suspensions"), (tmp_path / "new" / "dir", "")):
        path = tmp_path / "c.yaml"
        path.write_text(MINIMAL + f"state_dir: {state_dir}\n")
        done = subprocess.run([sys.executable, "-m", "sipguard", "check-config", str(path)],
                              capture_output=True, text=True, timeout=60)
        if says:
            assert done.returncode == 2 and says in done.stderr + done.stdout, done
            assert "state_dir" in done.stderr + done.stdout, done
        else:
            assert done.returncode == 0, done
            assert not (tmp_path / "new").exists()


def test_an_admin_api_off_loopback_without_a_token_is_a_config_error_to_run_too(
        tmp_path: Path) -> None:
    """An admin API on a public address without admin.token_file: `run` refuses it with the
    same words and the same exit code (2) as check-config, before it binds anything."""
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL + "admin: {listen: 0.0.0.0:9}\n")
    codes = []
    for verb in (["check-config", str(path)], ["run", "--config", str(path)]):
        done = subprocess.run([sys.executable, "-m", "sipguard", *verb],
                              capture_output=True, text=True, timeout=60)
        assert "admin.token_file" in done.stderr, done
        codes.append(done.returncode)
    assert codes == [2, 2]


def test_a_section_check_points_at_the_key_it_names() -> None:
    """A check of a whole section whose message starts with one of its keys points at that
    key's line (rules.identity's cache_min_s, a peer's dialer tag), said once for the top
    level though every peer's rules inherit it."""
    text = (MINIMAL + "rules:\n  identity:\n    enabled: true\n    cache_min_s: 100\n"
            "    cache_max_s: 10\npeers:\n  - name: a\n    networks: [10.0.0.0/8]\n"
            "    rules:\n      dialer:\n        short_calls:\n          block: 0.5\n"
            "          tag: 0.9\n")
    issues = issues_of(text)
    assert [(i.path, i.line) for i in issues] == [
        ("rules.identity.cache_min_s", 7), ("peers[0].rules.dialer.short_calls.tag", 16)]
