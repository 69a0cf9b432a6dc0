"""A real HAProxy on its own loopback address, in TCP mode, in front of relaygate.

The tests and bench/proxy.py start it with its own configuration file (never the
system service): every frontend listens on ``PROXY_ADDRESS`` and every backend
line connects *from* that address (``source``), so relaygate sees exactly one
proxy address, the one given to ``--trusted-proxy``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

#: the proxy's own loopback address: frontends bind it, backends connect from it
PROXY_ADDRESS = "127.0.0.9"


def free_port(host: str = PROXY_ADDRESS) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Route:
    """One frontend: HAProxy's port -> a relaygate listener, with v1 or v2 headers."""

    name: str
    backend_port: int
    #: "send-proxy" (v1), "send-proxy-v2", or "" (no header at all)
    send: str = "send-proxy-v2"
    #: health checks with a PROXY header (v2: a LOCAL command) every second
    check: bool = False
    backend_host: str = "127.0.0.1"


@dataclass
class HAProxy:
    workdir: Path
    routes: list[Route]
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        lines = [
            "global",
            "    maxconn 4096",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 60s",
            "    timeout server 60s",
        ]
        for route in self.routes:
            port = self.ports.setdefault(route.name, free_port())
            server = (f"    server s1 {route.backend_host}:{route.backend_port} "
                      f"source {PROXY_ADDRESS}")
            if route.send:
                server += f" {route.send}"
            if route.check:
                server += " check inter 1s check-send-proxy"
            lines += [
                f"frontend fe_{route.name}",
                f"    bind {PROXY_ADDRESS}:{port}",
                f"    default_backend be_{route.name}",
                f"backend be_{route.name}",
                server,
            ]
        return "\n".join(lines) + "\n"

    def start(self, program: str | None = None) -> HAProxy:
        exe = program or shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(self.config())
        check = subprocess.run([exe, "-c", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c failed: {check.stdout}{check.stderr}")
        self.log = open(self.workdir / "haproxy.log", "ab")
        # -db: stay in the foreground, no daemon (the test owns the process)
        self.proc = subprocess.Popen([exe, "-db", "-f", str(cfg)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        for port in self.ports.values():
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"haproxy exited {self.proc.returncode}: {self.output()}")
                try:
                    with socket.create_connection((PROXY_ADDRESS, port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"haproxy did not listen: {self.output()}") from None
                    time.sleep(0.05)
        return self

    def output(self) -> str:
        try:
            return (self.workdir / "haproxy.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        log = getattr(self, "log", None)
        if log is not None:
            log.close()
