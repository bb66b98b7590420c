"""Several worker processes on one host: the config rules (`workers`, `worker_port_base`),
the ports each worker advertises, and the command line of a worker."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

from sipguard import cli
from sipguard.ops.config_load import ConfigError, ConfigIssue, config_with_overrides, parse_config
from sipguard.ops.reload import RESTART_KEYS
from sipguard.server import proxy_settings

REDIS = "state: {backend: redis, url: 'redis://127.0.0.1:6379/0'}\n"
TWO = "listen: [udp://127.0.0.1:5060, tcp://127.0.0.1:5060]\ncore: udp://127.0.0.1:5080\n"


def issues_of(text: str) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="test.yaml")
    return caught.value.issues


def test_one_worker_is_the_default() -> None:
    cfg = parse_config(TWO)
    assert cfg.workers == 1 and cfg.worker_port_base is None
    assert {"workers", "worker_port_base"} <= set(RESTART_KEYS)


def test_several_workers_need_a_shared_backend() -> None:
    """With the memory backend each worker would count its own calls: an error naming
    `workers` at its line. shared_memory and redis are shared."""
    (issue,) = issues_of(TWO + "workers: 4\n")
    assert (issue.path, issue.line) == ("workers", 3)
    assert issue.message == ("more than one worker needs state.backend: shared_memory or "
                             "redis (each worker would count its own calls)")
    assert parse_config(TWO + REDIS + "workers: 4\n").workers == 4
    cfg = parse_config(TWO + "state: {backend: shared_memory}\nworkers: 4\n")
    assert (cfg.workers, cfg.worker_spread) == (4, "caller")
    assert "worker_spread" in RESTART_KEYS
    assert issues_of(TWO + "worker_spread: nobody\n")[0].path == "worker_spread"


def test_workers_range() -> None:
    assert issues_of(TWO + REDIS + "workers: 0\n")[0].path == "workers"
    assert issues_of(TWO + REDIS + "workers: 65\n")[0].path == "workers"


def test_command_line_workers_override_is_validated() -> None:
    """`--workers N` replaces the file's value and is checked like it."""
    cfg = parse_config(TWO)
    with pytest.raises(ConfigError) as caught:
        config_with_overrides(cfg, workers=2)
    (issue,) = caught.value.issues
    assert issue.path == "workers" and "state.backend: shared_memory or redis" in issue.message
    assert config_with_overrides(parse_config(TWO + REDIS), workers=3).workers == 3


def test_cli_refuses_workers_with_memory_state(tmp_path: object,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = f"{tmp_path}/sipguard.yaml"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(TWO)
    assert cli.main(["run", "--config", path, "--workers", "2"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "<command line>: workers: more than one worker needs state.backend: " \
        "shared_memory or redis" in err


def test_worker_ports_default_and_explicit() -> None:
    """Worker i on the listener at position L: base + L * workers + i; base defaults to the
    highest listen port + 100."""
    cfg = parse_config(TWO + REDIS + "workers: 3\n")
    assert [cfg.worker_port(0, i) for i in range(3)] == [5160, 5161, 5162]
    assert [cfg.worker_port(1, i) for i in range(3)] == [5163, 5164, 5165]
    cfg = parse_config(TWO + REDIS + "workers: 2\nworker_port_base: 7000\n")
    assert [cfg.worker_port(li, i) for li in (0, 1) for i in (0, 1)] == [7000, 7001, 7002, 7003]


def test_worker_ports_must_not_collide() -> None:
    """A worker's own port equal to a listen port or an admin port, or past 65535: an error
    naming worker_port_base."""
    text = ("listen: [udp://127.0.0.1:5060, tcp://127.0.0.1:5060, tls://127.0.0.1:5061]\n"
            "core: udp://127.0.0.1:5080\ntls: {cert_file: c.pem, key_file: k.pem}\n" + REDIS)
    (issue,) = [i for i in issues_of(text + "workers: 2\nworker_port_base: 5057\n")
                if i.path == "worker_port_base"]
    assert issue.message == ("port 5060 would be both listen tcp://127.0.0.1:5060 and worker "
                             "1's own port for tcp://127.0.0.1:5060")
    # UDP and TCP ports are apart: udp 5060's workers may use TCP ports of the same number
    ok = parse_config(TWO + REDIS + "workers: 2\nworker_port_base: 5061\n")
    assert ok.worker_port(1, 1) == 5064
    (issue,) = issues_of(TWO + REDIS + "workers: 2\nworker_port_base: 9000\n"
                         "admin: {listen: '127.0.0.1:9002'}\n")
    assert issue.path == "worker_port_base" and "admin API" in issue.message
    (issue,) = issues_of(TWO + REDIS + "workers: 2\nworker_port_base: 65534\n")
    assert issue.path == "worker_port_base" and "past 65535" in issue.message


def test_advertised_port_and_workers_do_not_mix() -> None:
    (issue,) = issues_of(TWO + REDIS + "workers: 2\nsip: {advertise: '192.0.2.1:5060'}\n")
    assert issue.path == "workers" and "sip.advertise" in issue.message
    cfg = parse_config(TWO + REDIS + "workers: 2\nsip: {advertise: 192.0.2.1}\n")
    locals_ = proxy_settings(cfg, worker=1).locals
    assert [(loc.host, loc.port) for loc in locals_[:2]] == [("192.0.2.1", 5161),
                                                            ("192.0.2.1", 5163)]


def test_a_worker_advertises_its_own_ports() -> None:
    """Worker i's Via / Record-Route name its own port; the shared public sockets are locals
    len(listen) + L, named like listener L (answers leave from where the request came)."""
    cfg = parse_config(TWO + REDIS + "workers: 2\n")
    one = proxy_settings(cfg)
    assert [(loc.index, loc.transport, loc.port) for loc in one.locals] == [
        (0, "udp", 5060), (1, "tcp", 5060)]
    w1 = proxy_settings(cfg, worker=1)
    assert [(loc.index, loc.transport, loc.hostport) for loc in w1.locals] == [
        (0, "udp", "127.0.0.1:5161"), (1, "tcp", "127.0.0.1:5163"),
        (0, "udp", "127.0.0.1:5161"), (1, "tcp", "127.0.0.1:5163")]
    assert w1.core.local == 0  # toward the core: from the worker's own UDP port


def test_worker_command_line_repeats_the_supervisors() -> None:
    args = argparse.Namespace(config="/etc/sipguard.yaml", listen=None, core=None)
    command = cli._worker_command(args, 4, "/dev/shm/sipguard-1-x")
    assert command(2, 9) == [sys.executable, "-m", "sipguard", "run", "--config",
                             "/etc/sipguard.yaml", "--workers", "4", "--group-dir",
                             "/dev/shm/sipguard-1-x", "--worker-index", "2",
                             "--supervisor-fd", "9"]
    parsed = cli.build_parser().parse_args(command(2, 9)[3:])
    assert (parsed.workers, parsed.worker_index, parsed.supervisor_fd, parsed.group_dir) == \
        (4, 2, 9, "/dev/shm/sipguard-1-x")


def test_shared_memory_refuses_distinct_callee_thresholds_it_cannot_count() -> None:
    """The shared-memory store counts distinct called numbers up to SET_CAP: a threshold
    above it could never fire, so it is a config error naming the rule."""
    from sipguard.state import _shm
    from sipguard.state.shared_memory import SET_CAP

    assert SET_CAP == _shm.SET_CAP
    base = TWO + "state: {backend: shared_memory}\n"
    ok = base + "rules:\n  dialer: {distinct_callees: {tag: 30, block: 128}}\n"
    assert parse_config(ok).rules.dialer is not None
    (issue,) = issues_of(base + "rules:\n  dialer: {distinct_callees: {tag: 30, block: 200}}\n")
    assert issue.path == "rules.dialer" and "distinct_callees.block is 200" in issue.message
    # the redis backend counts them with HyperLogLog: no such bound
    assert parse_config(TWO + REDIS + "rules:\n  dialer: {distinct_callees: {block: 200}}\n")


def test_workers_share_a_file_stdout_but_not_a_pipe(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A regular file (or /dev/null) takes the workers' whole-line writes directly; a pipe
    goes through the supervisor's relay."""
    from sipguard.supervisor import stdout_is_shareable

    with open(tmp_path / "log", "w", encoding="utf-8") as fh:
        monkeypatch.setattr(sys, "stdout", fh)
        assert stdout_is_shareable()
    with open(os.devnull, "w", encoding="utf-8") as fh:
        monkeypatch.setattr(sys, "stdout", fh)
        assert stdout_is_shareable()
    r, w = os.pipe()
    with os.fdopen(r, "rb"), os.fdopen(w, "w", encoding="utf-8") as wf:
        monkeypatch.setattr(sys, "stdout", wf)
        assert not stdout_is_shareable()


def test_directories_of_dead_supervisors_are_removed(tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL leaves its workers' directory (with a shared-memory
    segment of tens of MB) behind; the next supervisor removes those whose pid is gone, and
    keeps those of running ones and anything else."""
    import subprocess

    from sipguard.supervisor import remove_stale_groups

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"sipguard-{dead.pid}-abc123"
    (stale / "sub").mkdir(parents=True)
    (stale / "state.shm").write_bytes(b"x" * 1024)
    alive = tmp_path / f"sipguard-{os.getpid()}-def456"
    alive.mkdir()
    other = tmp_path / "sipguard-test-0123"
    other.mkdir()
    assert remove_stale_groups(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and alive.exists() and other.exists()
    # with a lock file, the lock decides, not the pid (PID namespaces sharing /dev/shm): a
    # held lock keeps the group of a pid this namespace does not see; a free one does not
    # keep the group of a pid that happens to be running here
    import fcntl

    from sipguard.supervisor import LOCK_NAME

    held = tmp_path / f"sipguard-{dead.pid}-held1"
    held.mkdir()
    fd = os.open(held / LOCK_NAME, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    (alive / LOCK_NAME).write_text("")  # nobody holds it: its supervisor is gone
    try:
        assert remove_stale_groups(str(tmp_path)) == [str(alive)]
        assert held.exists()
    finally:
        os.close(fd)
    assert remove_stale_groups(str(tmp_path)) == [str(held)]


def test_the_hang_timeout_outlasts_the_heartbeats() -> None:
    """worker_hang_timeout_s: 0 (off) or at least 3 s — a heartbeat comes every second."""
    assert parse_config(TWO + "worker_hang_timeout_s: 0\n").worker_hang_timeout_s == 0
    assert parse_config(TWO + "worker_hang_timeout_s: 3\n").worker_hang_timeout_s == 3
    with pytest.raises(ConfigError, match="worker_hang_timeout_s"):
        parse_config(TWO + "worker_hang_timeout_s: 1\n")


def _worker_source(path: Path, group: Path, *extra: str) -> cli.ConfigSource:
    args = cli.build_parser().parse_args(["run", "--config", str(path), *extra, "--workers",
                                          "2", "--group-dir", str(group), "--worker-index",
                                          "1", "--supervisor-fd", "9"])
    return cli.ConfigSource(str(path), args)


SHM = "state: {backend: shared_memory}\n"


def test_a_restarted_worker_runs_what_its_siblings_run(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker starts from the text the supervisor loaded, with the last reload that applied
    over it — not from the file as it is on disk now: an edit nobody reloaded, a changed
    `listen` (a restart key: it keeps the start's value, as in a reload) or a broken file.
    Relative paths in the copies resolve against the config file's folder, as the file's
    own do, wherever the worker is started from."""
    from sipguard.supervisor import CONFIG_START, write_text_atomic

    conf, group = tmp_path / "etc", tmp_path / "group"
    conf.mkdir()
    group.mkdir()
    path = conf / "sipguard.yaml"
    monkeypatch.chdir(tmp_path)
    start = TWO + SHM + "state_dir: data\nsuspended: ['+12125550100']\n"
    path.write_text(start)
    supervisor_args = cli.build_parser().parse_args(["run", "--config", str(path)])
    supervisor = cli.ConfigSource(str(path), supervisor_args)
    assert supervisor.running().workers == 1 and supervisor.text == start
    write_text_atomic(group / CONFIG_START, supervisor.text)

    # the file edited, not reloaded: a new number, a new listen port
    path.write_text(TWO.replace("5060", "5070") + SHM + "state_dir: data\n"
                    "suspended: ['+12125550100', '+12125550101']\n")
    cfg = _worker_source(path, group).running()
    assert cfg.suspended == ("+12125550100",)
    assert [ep.port for ep in cfg.listen] == [5060, 5060]
    assert cfg.state_dir == conf / "data"  # the file's folder, not the working directory
    path.write_text("listen: [\n")  # broken: the worker starts all the same
    assert _worker_source(path, group).running().suspended == ("+12125550100",)

    # a reload that applied (by any worker): what a worker started from now on runs, but
    # listen keeps the start's ports
    path.write_text(TWO.replace("5060", "5070") + SHM + "state_dir: data\n"
                    "suspended: ['+12125550101']\n")
    reloading = _worker_source(path, group)
    reloading.load()
    reloading.applied()
    path.write_text(TWO + SHM + "suspended: ['+12125550199']\n")  # edited again, not reloaded
    cfg = _worker_source(path, group).running()
    assert cfg.suspended == ("+12125550101",)
    assert [ep.port for ep in cfg.listen] == [5060, 5060]
    assert cfg.state_dir == conf / "data"
    # the command line's overrides apply to the copies as to the file
    cfg = _worker_source(path, group, "--core", "udp://127.0.0.1:5999").running()
    assert cfg.core.port == 5999


def test_workers_keep_api_suspensions_in_their_directory_without_state_dir(
        tmp_path: Path) -> None:
    """Without state_dir, a worker keeps the API's suspensions in the workers' directory (so
    one started again loads what its siblings hold); a reload sees no change there; one
    process, or a configured state_dir, is left as it is."""
    from sipguard.supervisor import STATE_DIR_NAME

    path = tmp_path / "sipguard.yaml"
    path.write_text(TWO + SHM)
    source = _worker_source(path, tmp_path)
    cfg = source.running()
    assert cfg.state_dir == tmp_path / STATE_DIR_NAME
    assert source.load().state_dir == cfg.state_dir  # a reload changes nothing there
    single = cli.ConfigSource(str(path), cli.build_parser().parse_args(
        ["run", "--config", str(path)]))
    assert single.running().state_dir is None
    path.write_text(TWO + SHM + "state_dir: /var/lib/sipguard\n")
    assert _worker_source(path, tmp_path).running().state_dir == Path("/var/lib/sipguard")
