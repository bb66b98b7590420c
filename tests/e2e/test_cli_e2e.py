"""The command line over real processes: check-config, start-up errors, SIGHUP reload."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .harness import HOST, REPO, E2EStack, SippProcess, free_port

pytestmark = pytest.mark.e2e


def sipguard(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sipguard", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_check_config_accepts_the_example_and_minimal_files() -> None:
    """check-config exits 0 for the shipped example configs."""
    for name in ("sipguard.yaml", "minimal.yaml"):
        res = sipguard("check-config", str(REPO / "config" / name))
        assert res.returncode == 0, res.stderr
        assert "OK" in res.stdout


def test_check_config_names_field_and_line(tmp_path: Path) -> None:
    """An invalid file exits 2 with FILE:LINE: FIELD: message for every problem."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "listen: [udp://127.0.0.1:5060]\ncore: udp://127.0.0.1:5080\n"
        "sip:\n  max_message_size: 10\n  bogus_key: 1\n"
    )
    res = sipguard("check-config", str(cfg))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert f"{cfg}:4: sip.max_message_size:" in lines[0]
    assert f"{cfg}:5: sip.bogus_key: unknown key" in lines[1]
    assert "Traceback" not in res.stderr


def test_check_config_reads_number_lists_as_run_does(tmp_path: Path) -> None:
    """A dno_file with a bad line passes the schema but not the rules' build: check-config
    exits 2 naming the file and the line, as `run` would, instead of saying OK."""
    numbers = tmp_path / "dno.txt"
    numbers.write_text("+18005550100\n+3120abc\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listen: [udp://127.0.0.1:5060]\ncore: udp://127.0.0.1:5080\n"
                   f"rules:\n  callerid: {{dno_file: {numbers}}}\n")
    res = sipguard("check-config", str(cfg))
    assert res.returncode == 2, res.stdout
    assert f"{numbers}:2:" in res.stderr and "Traceback" not in res.stderr
    assert "OK" not in res.stdout


@pytest.mark.parametrize(("extra", "words"), [
    ("tls: {cert_file: missing.pem, key_file: missing.key}\n", "cannot load tls.cert_file"),
    ("admin: {listen: 127.0.0.1:9999, token_file: no-token.txt}\n",
     ":3: admin.token_file: cannot read admin token_file"),
    ("admin:\n  listen: 0.0.0.0:9999\n",
     ":4: admin.listen: admin API on 0.0.0.0:9999 is not loopback-only: set admin.token_file"),
    ("metrics: {listen: 0.0.0.0:9999}\n", ":3: metrics.listen: admin API on 0.0.0.0:9999"),
])
def test_check_config_reads_the_files_run_reads(tmp_path: Path, extra: str, words: str) -> None:
    """The TLS certificate and key, the admin token file, and the admin API's need of one
    off loopback: check-config refuses (exit 2, naming the field) what `run` would refuse;
    the admin section's problems as FILE:LINE: FIELD: message, and `run` says the same."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("listen: [udp://127.0.0.1:5060]\ncore: udp://127.0.0.1:5080\n" + extra)
    res = sipguard("check-config", str(cfg))
    assert res.returncode == 2, res.stdout
    assert words in res.stderr and "Traceback" not in res.stderr and "OK" not in res.stdout
    if "admin" in words:
        assert res.stderr.startswith(f"{cfg}{words}"), res.stderr
        ran = sipguard("run", "--config", str(cfg))
        assert ran.returncode == 2 and ran.stderr.startswith(f"{cfg}{words}"), ran.stderr


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    """A listen port already taken stops start-up with exit 1 and one line, no traceback."""
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, port))
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"listen: [udp://{HOST}:{port}]\ncore: udp://{HOST}:{free_port()}\n")
        res = sipguard("run", "--config", str(cfg))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"sipguard: cannot listen on udp://{HOST}:{port}: Address already in use"
    ]


def test_reload_keeps_live_calls_and_rejects_a_bad_file(stack: E2EStack) -> None:
    """SIGHUP swaps a valid config in and keeps the old one for a bad file; calls survive."""
    uas = stack.uas("uas_basic.xml", calls=20, duration_ms=3000, timeout=40)
    guard, port = stack.sipguard(core_port=uas.local_port)
    uac = SippProcess(
        "uac", "uac_basic.xml", stack.workdir, local_port=free_port(),
        remote=(HOST, port), calls=20, rate=10, duration_ms=3000, timeout=40,
    ).start()
    stack.sipps.append(uac)
    guard.wait_event("invite_decided", 5, timeout=10)
    assert guard.proc is not None
    text = guard.config.read_text()
    guard.config.write_text(text + "log: {level: info, parse_error_sample_s: 2.0}\n")
    os.kill(guard.proc.pid, signal.SIGHUP)
    guard.wait_event("config_reloaded", 1, timeout=10)
    guard.config.write_text(text + "sip: {max_message_size: 1}\n")
    os.kill(guard.proc.pid, signal.SIGHUP)
    guard.wait_event("config_reload_failed", 1, timeout=10)
    res = uac.wait()
    assert res.successful == 20 and res.failed == 0, res.describe()
    assert guard.proc.poll() is None  # still running
    failed = [e for e in guard.events if e.get("event") == "config_reload_failed"]
    assert any("sip.max_message_size" in line for line in failed[0]["errors"])


def test_metrics_endpoint_counts_decisions_and_dialogs(stack: E2EStack) -> None:
    """GET /metrics exports INVITE decisions, ended dialogs, the decision histogram, gauges."""
    metrics_port = free_port()
    uas = stack.uas("uas_basic.xml", calls=10, duration_ms=100)
    guard, port = stack.sipguard(
        core_port=uas.local_port, config_extra=f"metrics: {{listen: {HOST}:{metrics_port}}}\n"
    )
    res = stack.uac("uac_basic.xml", remote_port=port, calls=10, rate=20, duration_ms=100)
    assert res.successful == 10, res.describe()
    guard.wait_event("dialog_ended", 10, timeout=10)
    base = f"http://{HOST}:{metrics_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as resp:
        assert resp.read() == b"ok\n"
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'sipguard_invites_total{peer="",rule="",verdict="accept"} 10.0' in text
    assert 'sipguard_dialogs_ended_total{peer="",reason="bye_caller"} 10.0' in text
    assert "sipguard_decision_seconds_count 10.0" in text
    assert "sipguard_live_dialogs 0.0" in text
    # the concurrency tracker's counts that must stay at zero, after 10 ordinary calls
    for name in ("unmatched_ends", "leases_expired", "underflows"):
        assert f"sipguard_concurrency_{name} 0.0" in text, name
    # The CLI turned the collector's automatic runs off and runs its own young passes (every
    # 50 ms, sipguard/ops/collector.py): the longest since start is > 0, and the scrape took it.
    young = re.search(r"^sipguard_gc_young_pause_max_seconds (\S+)$", text, re.M)
    assert young is not None and 0 < float(young[1]) < 0.5, text
    assert "sipguard_gc_full_pause_seconds 0.0" in text  # not due within the hour


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "sipguard exited"
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("sipguard's admin API never became ready")


def test_run_with_stdout_closed_and_stray_user_signals_stops_cleanly(tmp_path: Path) -> None:
    """Started with its stdout closed (``>&-``), sipguard opens it on /dev/null rather than
    let the event loop's descriptors take its number; SIGUSR1 / SIGUSR2 (whose default would
    kill it with calls up) are ignored; SIGTERM then stops it with exit 0."""
    admin_port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"listen: [udp://{HOST}:{free_port()}]\ncore: udp://{HOST}:{free_port()}\n"
        f"admin: {{listen: {HOST}:{admin_port}}}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sipguard", "run", "--config", str(cfg)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: os.close(1),  # noqa: PLW1509 - the child's stdout, closed
    )
    try:
        _wait_ready(f"http://{HOST}:{admin_port}", proc)
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            proc.send_signal(sig)
        time.sleep(0.3)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_operator_verbs_against_a_running_sipguard(tmp_path: Path) -> None:
    """suspend / suspensions / unsuspend / bans / reload work against a running sipguard through its
    admin API; a suspension that could not be saved is exit 1 and says so; an unreachable
    admin API is exit 1 and one line."""
    admin_port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"listen: [udp://{HOST}:{free_port()}]\ncore: udp://{HOST}:{free_port()}\n"
        f"admin: {{listen: {HOST}:{admin_port}}}\nstate_dir: state\n"
    )
    url = f"http://{HOST}:{admin_port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sipguard", "run", "--config", str(cfg)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_ready(url, proc)
        res = sipguard("suspend", "+31201234567", "--reason", "fraud", "--by", "alice",
                       "--admin", url)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["suspension"]["number"] == "+31201234567"
        res = sipguard("suspend", "+3130*", "--expires", "600", "--admin", url)
        assert res.returncode == 0, res.stderr
        res = sipguard("suspensions", "--admin", url)
        listed = json.loads(res.stdout)["suspensions"]
        assert {s.get("number") or s.get("prefix") for s in listed} == {"+31201234567", "+3130*"}
        res = sipguard("unsuspend", "+31201234567", "--by", "bob & co", "--admin", url)
        assert res.returncode == 0 and json.loads(res.stdout) == {
            "lifted": "+31201234567", "saved": True}
        res = sipguard("unsuspend", "+31201234567", "--admin", url)
        assert res.returncode == 1
        assert res.stderr.strip().splitlines() == [
            "sipguard: admin API answered 404: +31201234567 is not suspended through the API"
        ]
        res = sipguard("bans", "--source", "192.0.2.1", "--admin", url)
        assert res.returncode == 0 and json.loads(res.stdout) == {"bans": [], "total": 0}
        res = sipguard("bans", "--lift", "192.0.2.1", "--admin", url)
        assert res.returncode == 1 and "192.0.2.1 is not banned" in res.stderr
        cfg.write_text(cfg.read_text() + "rules:\n  concurrency: {per_caller: 2}\n")
        res = sipguard("reload", "--admin", url)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["changed"] == ["rules"]
        cfg.write_text(cfg.read_text() + "sip: {max_message_size: 10}\n")
        res = sipguard("reload", "--admin", url)
        assert res.returncode == 2
        assert "sip.max_message_size" in res.stderr and "Traceback" not in res.stderr
        # the state file cannot be written any more (a directory in its place): in force,
        # but the operator hears it will not survive a restart
        state = tmp_path / "state" / "suspensions.journal"
        state.unlink()
        (state / "x").mkdir(parents=True)
        res = sipguard("suspend", "+31401234567", "--admin", url)
        assert res.returncode == 1 and json.loads(res.stdout)["save_failed"] is True
        assert "not saved to state_dir" in res.stderr
        (state / "x").rmdir()
        state.rmdir()
        res = sipguard("suspend", "+31401234567", "--admin", url)  # saved again
        assert res.returncode == 0 and json.loads(res.stdout)["saved"] is True, res.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert (tmp_path / "state" / "suspensions.json").exists()
    lifted = [json.loads(line) for line in out.splitlines() if '"suspension_lifted"' in line]
    assert [(e["number"], e["by"]) for e in lifted] == [("+31201234567", "bob & co")]
    res = sipguard("suspensions", "--admin", url)
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"sipguard: cannot reach the admin API at {url}: ")
