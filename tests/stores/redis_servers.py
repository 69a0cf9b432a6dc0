"""Real Redis (or Valkey) deployments on loopback, for the tests and bench/redis_ha.py.

No pytest here (the benchmark loads this file too): callers find the programs.

- :func:`start_server`: one ``redis-server`` (no persistence) on a free port;
- :func:`start_sentinel_set`: a master, one replica and three sentinels watching
  them with a short ``down-after-milliseconds``, so a killed master is replaced
  within seconds;
- :func:`start_cluster`: three masters joined by ``redis-cli --cluster create``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

#: How long a deployment may take to come up before we give up (seconds).
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: object, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except (redis.exceptions.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not happen within {timeout} s (last error: {last})")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    password: str | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2,
                           socket_connect_timeout=2, password=self.password)

    def kill(self) -> None:
        """SIGKILL: no goodbye to replicas or sentinels, as when a host dies."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(exe: str, workdir: Path, *args: str, port: int | None = None,
                 config: str | None = None, password: str | None = None) -> Server:
    """One server on 127.0.0.1 (``config``: text of a config file to start from;
    ``password``: its ``requirepass``, for our own client)."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [exe]
    if config is not None:
        conf = workdir / "server.conf"
        conf.write_text(config)
        cmd.append(str(conf))
    cmd += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
            "--daemonize", "no", "--logfile", str(workdir / "log"), *args]
    if "--sentinel" not in args:
        cmd += ["--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(proc, port, workdir, password)
    c = server.client()
    try:
        _wait(f"{exe} on port {port} answering", lambda: proc.poll() is None and c.ping())
    except RuntimeError:
        server.stop()
        raise
    finally:
        c.close()
    return server


@dataclass
class SentinelSet:
    master: Server
    replica: Server
    sentinels: list[Server]
    service: str
    stopped: list[Server] = field(default_factory=list)

    def url(self, query: str = "") -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}" + (f"?{query}" if query else "")

    def master_port(self) -> int | None:
        """The master port the first sentinel that answers names (None: none known)."""
        for s in self.sentinels:
            c = s.client()
            try:
                addr = c.sentinel_get_master_addr_by_name(self.service)
                return int(addr[1]) if addr else None
            except (redis.exceptions.RedisError, OSError):
                continue
            finally:
                c.close()
        return None

    def stop(self) -> None:
        for s in [*self.sentinels, self.replica, self.master]:
            s.stop()


def start_sentinel_set(exe: str, workdir: Path, *, service: str = "relaygate",
                       down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> SentinelSet:
    """A master with one replica, watched by three sentinels (quorum 2)."""
    master = start_server(exe, workdir / "master")
    replica = start_server(exe, workdir / "replica", "--replicaof", "127.0.0.1",
                           str(master.port))
    rc = replica.client()
    try:
        _wait("the replica's link to the master",
              lambda: rc.info("replication").get("master_link_status") == "up")
    finally:
        rc.close()
    sentinels = []
    for i in range(3):
        conf = (
            f"sentinel monitor {service} 127.0.0.1 {master.port} 2\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {service} 1\n"
        )
        sentinels.append(start_server(exe, workdir / f"sentinel{i}", "--sentinel", config=conf))
    ss = SentinelSet(master, replica, sentinels, service)

    def settled() -> bool:
        for s in sentinels:
            c = s.client()
            try:
                state = c.sentinel_master(service)
            finally:
                c.close()
            if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                return False
        return True

    try:
        _wait("three sentinels that know each other and the replica", settled)
    except RuntimeError:
        ss.stop()
        raise
    return ss


@dataclass
class Cluster:
    nodes: list[Server]

    def url(self, query: str = "") -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"redis+cluster://{hosts}" + (f"?{query}" if query else "")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def start_cluster(exe: str, cli: str, workdir: Path, masters: int = 3,
                  ports: list[int] | None = None) -> Cluster:
    """``masters`` cluster nodes (no replicas), slots split evenly by ``--cluster create``."""
    nodes = []
    ports = ports or [free_port() for _ in range(masters)]
    try:
        for i, port in enumerate(ports):
            nodes.append(start_server(
                exe, workdir / f"node{i}", "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--cluster-port", str(free_port()),
                "--cluster-node-timeout", "2000", port=port))
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

        def ok() -> bool:
            for n in nodes:
                c = n.client()
                try:
                    if c.cluster("INFO").get("cluster_state") != "ok":
                        return False
                finally:
                    c.close()
            return True

        _wait("cluster_state:ok on every node", ok)
    except BaseException:
        for n in nodes:
            n.stop()
        raise
    return Cluster(nodes)
