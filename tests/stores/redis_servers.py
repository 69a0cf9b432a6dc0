"""Real Redis (or Valkey) deployments on loopback, for the tests and bench/redis_ha.py.

No pytest here (the benchmark loads this file too): callers find the programs.

- :func:`start_server`: one ``redis-server`` (no persistence) on a free port;
- :func:`start_sentinel_set`: a master, one replica and three sentinels watching
  them with a short ``down-after-milliseconds``, so a killed master is replaced
  within seconds;
- :func:`start_cluster`: three masters (optionally with replicas) joined by
  ``redis-cli --cluster create``.

Each takes ``tls=Tls(...)``: then every server listens on a TLS port only
(``--port 0 --tls-port N``), replicas, sentinels and the cluster bus speak TLS
to each other too, and ``Server.client()`` connects with the test CA.
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


def free_ports(n: int) -> list[int]:
    """``n`` different free ports (all bound at once while choosing, so a cluster's
    client and bus ports never collide with each other)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


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


@dataclass(frozen=True)
class Tls:
    """PEM files of a TLS deployment: the server's certificate and key, the CA that
    clients (and the servers, for client certificates) trust, and a client certificate
    and key that CA signed. ``auth_clients``: ``--tls-auth-clients`` (yes, optional, no)."""

    cert: Path
    key: Path
    ca: Path
    client_cert: Path
    client_key: Path
    auth_clients: str = "optional"

    def server_args(self, port: int) -> list[str]:
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(self.cert),
                "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca),
                "--tls-auth-clients", self.auth_clients,
                # what a server uses when it is the client (replication, sentinel, bus)
                "--tls-client-cert-file", str(self.client_cert),
                "--tls-client-key-file", str(self.client_key)]

    def client_kwargs(self) -> dict[str, object]:
        # by address, whatever names the certificate holds (the store's tests check names)
        return {"ssl": True, "ssl_ca_certs": str(self.ca), "ssl_certfile": str(self.client_cert),
                "ssl_keyfile": str(self.client_key), "ssl_check_hostname": False}

    def query(self, *, client_cert: bool = True) -> str:
        """Store URL options for this deployment (with our client certificate)."""
        q = f"ssl_ca_certs={self.ca}"
        if client_cert:
            q += f"&ssl_certfile={self.client_cert}&ssl_keyfile={self.client_key}"
        return q


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    password: str | None = None
    tls: Tls | None = None

    def client(self) -> redis.Redis:
        extra = self.tls.client_kwargs() if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2,  # type: ignore[arg-type]
                           socket_connect_timeout=2, password=self.password, **extra)

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
                 config: str | None = None, password: str | None = None,
                 tls: Tls | None = None) -> Server:
    """One server on 127.0.0.1 (``config``: text of a config file to start from;
    ``password``: its ``requirepass``, for our own client; ``tls``: TLS port only)."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [exe]
    if config is not None:
        conf = workdir / "server.conf"
        conf.write_text(config)
        cmd.append(str(conf))
    cmd += [*(tls.server_args(port) if tls else ["--port", str(port)]),
            "--bind", "127.0.0.1", "--dir", str(workdir),
            "--daemonize", "no", "--logfile", str(workdir / "log"), *args]
    if "--sentinel" not in args:
        cmd += ["--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(proc, port, workdir, password, tls)
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
    tls: Tls | None = None

    def url(self, query: str = "") -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}" + _query(self.tls, query)

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


def _query(tls: Tls | None, query: str) -> str:
    if tls is not None:
        query = f"ssl=true&{tls.query()}" + (f"&{query}" if query else "")
    return f"?{query}" if query else ""


def start_sentinel_set(exe: str, workdir: Path, *, service: str = "relaygate",
                       down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                       tls: Tls | None = None) -> SentinelSet:
    """A master with one replica, watched by three sentinels (quorum 2); with ``tls``
    every link (clients, replication, sentinels) is TLS."""
    tls_repl = ("--tls-replication", "yes") if tls else ()
    master = start_server(exe, workdir / "master", *tls_repl, tls=tls)
    replica = start_server(exe, workdir / "replica", "--replicaof", "127.0.0.1",
                           str(master.port), *tls_repl, tls=tls)
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
        sentinels.append(start_server(exe, workdir / f"sentinel{i}", "--sentinel", *tls_repl,
                                      config=conf, tls=tls))
    ss = SentinelSet(master, replica, sentinels, service, tls=tls)

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
    tls: Tls | None = None

    def url(self, query: str = "") -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"redis+cluster://{hosts}" + _query(self.tls, query)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def start_cluster(exe: str, cli: str, workdir: Path, *args: str, masters: int = 3,
                  replicas: int = 0, ports: list[int] | None = None,
                  tls: Tls | None = None) -> Cluster:
    """``masters`` cluster masters with ``replicas`` replicas each, slots split evenly by
    ``--cluster create``; ``args`` go to every node; with ``tls`` clients and the cluster
    bus speak TLS."""
    nodes = []
    count = len(ports) if ports else masters * (1 + replicas)
    chosen = free_ports(count * 2)
    bus = [p for p in chosen if not ports or p not in ports][:count]
    ports = ports or chosen[count:]
    tls_args = ("--tls-cluster", "yes", "--tls-replication", "yes") if tls else ()
    cli_tls = [] if tls is None else [
        "--tls", "--cacert", str(tls.ca), "--cert", str(tls.client_cert),
        "--key", str(tls.client_key)]
    try:
        for i, port in enumerate(ports):
            nodes.append(start_server(
                exe, workdir / f"node{i}", "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--cluster-port", str(bus[i]),
                "--cluster-node-timeout", "2000", *tls_args, *args, port=port, tls=tls))
        subprocess.run(
            [cli, *cli_tls, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

        def ok() -> bool:
            for n in nodes:
                c = n.client()
                try:
                    if c.cluster("INFO").get("cluster_state") != "ok":
                        return False
                    repl = c.info("replication")
                    if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                        return False
                finally:
                    c.close()
            return True

        _wait("cluster_state:ok on every node (and every replica in sync)", ok)
    except BaseException:
        for n in nodes:
            n.stop()
        raise
    return Cluster(nodes, tls)
