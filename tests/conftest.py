"""Shared fixtures: real servers started on loopback, and the integration rule.

Tests that need a program that is not installed skip with a reason locally;
with ``RELAYGATE_REQUIRE_INTEGRATION=1`` (set by ``.ci/run``) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests judge behaviour, not speed: on a loaded 2-core machine one example
# can take longer than Hypothesis's default 200 ms deadline, which failed whole runs.
settings.register_profile("relaygate", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("relaygate")

REQUIRE_INTEGRATION = os.environ.get("RELAYGATE_REQUIRE_INTEGRATION") == "1"


def need_program(name: str, *candidates: str) -> str:
    """Path of a program the test needs; skip (or fail under CI) when missing."""
    for cand in (name, *candidates):
        path = shutil.which(cand) or (cand if os.path.isabs(cand) and os.access(cand, os.X_OK)
                                      else None)
        if path:
            return path
    msg = f"{name} is not installed"
    if REQUIRE_INTEGRATION:
        pytest.fail(f"{msg} (RELAYGATE_REQUIRE_INTEGRATION=1 forbids skipping)")
    pytest.skip(msg)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class RedisServer:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, workdir: Path) -> None:
        self.proc = proc
        self.port = port
        self.workdir = workdir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_redis(workdir: Path, port: int | None = None) -> RedisServer:
    exe = need_program("redis-server")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--daemonize", "no", "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port("127.0.0.1", port)
    except OSError:
        proc.kill()
        raise
    return RedisServer(proc, port, workdir)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole session (no persistence, loopback only)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
