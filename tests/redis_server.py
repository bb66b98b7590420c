"""A real ``redis-server`` for the tests: started on a free loopback port, stopped by PID.

Debian's ``redis-server`` package (``make test`` installs it when missing); Valkey's
``valkey-server`` is used when that is what the machine has. Nothing is saved to disk
(``--save ''``, no AOF) and the server listens on 127.0.0.1 only. ``stop()`` / ``start()``
on the same object restart it on the same port (the outage tests).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path


def server_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


def _free_port(below: int = 65536) -> int:
    """A free loopback port (below ``below``: a cluster node's bus port is its port + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < below:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000)) if below < 65536 else None
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


class RedisServer:
    """One redis-server process on 127.0.0.1."""

    def __init__(self, workdir: Path, port: int | None = None, *extra: str) -> None:
        self.workdir = workdir
        self.port = port or _free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = server_binary()
        if binary is None:
            raise RuntimeError("redis-server not found: install Debian package redis-server "
                               "(`make test` does)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes",
             *self.extra],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}; see "
                                   f"{self.workdir}/redis-{self.port}.log")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
                return reply.startswith((b"+PONG", b"-NOAUTH"))  # up (with a password)
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one inline command, return the raw reply (for test set-up and checks)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            parts = [f"*{len(args)}\r\n"] + [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
            s.sendall("".join(parts).encode())
            time.sleep(0.01)
            return s.recv(1 << 20)

    def flush(self) -> None:
        self.command("FLUSHALL")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """SIGKILL (an outage without a goodbye)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


class RedisCluster:
    """A three-master Redis Cluster on 127.0.0.1 (no replicas), made with ``redis-cli
    --cluster create``; stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.nodes = [RedisServer(workdir / f"node{i}", _free_port(55536), "--cluster-enabled", "yes",
                                  "--cluster-node-timeout", "2000") for i in range(3)]
        for node in self.nodes:
            node.extra = (*node.extra, "--cluster-config-file", f"nodes-{node.port}.conf")

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found (Debian package redis-tools)")
        try:  # a node that does not start, or a create that fails, stops the others
            for node in self.nodes:
                node.start()
            subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                check=True, capture_output=True, timeout=30,
            )
        except BaseException:
            self.stop()
            raise
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the cluster did not reach cluster_state:ok within 15 s")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinel:
    """One Redis master and one Sentinel watching it (``redis-server --sentinel``) as
    ``mymaster``, on 127.0.0.1; stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.master = RedisServer(workdir / "master")
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisSentinel:
        self.master.start()
        try:
            self._start_sentinel()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_sentinel(self) -> None:
        binary = server_binary()
        assert binary is not None
        conf = self.workdir / "sentinel.conf"
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                        f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 1\n")
        log = open(self.workdir / "sentinel.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        probe = RedisServer(self.workdir, self.port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if probe.ping():
                return
            time.sleep(0.05)
        raise RuntimeError("redis sentinel did not start")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(5)
        self.master.stop()
