"""Helpers for the qmail chain-program tests: the installed scripts, servers, clients."""

from __future__ import annotations

import importlib.util
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def _root_conftest() -> ModuleType:
    """tests/conftest.py, by path: the module name "conftest" is not reliable, since any
    conftest.py in a directory without __init__.py is also imported under that name."""
    path = Path(__file__).resolve().parents[2] / "conftest.py"
    spec = importlib.util.spec_from_file_location("relaygate_tests_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_conftest = _root_conftest()
free_port = _conftest.free_port
have_ipv6_loopback = _conftest.have_ipv6_loopback
need_program = _conftest.need_program
wait_port = _conftest.wait_port
REQUIRE_INTEGRATION: bool = _conftest.REQUIRE_INTEGRATION


def skip_or_fail(why: str) -> NoReturn:
    """Skip locally; fail under RELAYGATE_REQUIRE_INTEGRATION=1 (CI must run every test)."""
    if REQUIRE_INTEGRATION:
        pytest.fail(f"{why} (RELAYGATE_REQUIRE_INTEGRATION=1 forbids skipping)")
    pytest.skip(why)

#: The chain programs, installed next to the interpreter running the tests.
BIN = Path(sys.executable).parent
PROGRAMS = ("relay-ctrl-allow", "relay-ctrl-age", "relay-ctrl-check", "relay-ctrl-chdir",
            "relay-ctrl-send", "relay-ctrl-udp")
#: A PATH for the programs we chain (our scripts first, then the system's).
PATH = f"{BIN}:/usr/local/bin:/usr/bin:/bin"


def program(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is not installed: run pip install -e . (setup.py builds it)")
    return str(path)


def run(argv: list[str], env: Mapping[str, str], *, timeout: float = 30,
        **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    """Run a program with exactly ``env`` (plus PATH), capturing its output."""
    full = {"PATH": PATH, **env}
    result: subprocess.CompletedProcess[bytes] = subprocess.run(
        argv, env=full, capture_output=True, timeout=timeout, check=False,
        **kwargs)  # type: ignore[call-overload]
    return result


def parse_env(output: bytes) -> dict[str, str]:
    """``env``'s output (NAME=value lines) as a dict."""
    out = {}
    for line in output.decode("utf-8", "replace").splitlines():
        name, sep, value = line.partition("=")
        if sep:
            out[name] = value
    return out


def talk(port: int, *, source: str = "127.0.0.1", host: str = "127.0.0.1",
         send: bytes = b"", timeout: float = 20) -> bytes:
    """Connect from ``source``, send, read until the server closes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect((host, port))
        if send:
            s.sendall(send)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


class Server:
    """A server process on a loopback port (Debian tcpserver or relaygate tcpserver)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text(errors="replace")


def start_debian_tcpserver(options: list[str], program_argv: list[str],
                           env: Mapping[str, str], log: Path) -> Server:
    """/usr/bin/tcpserver -R -H -l0 OPTIONS 127.0.0.1 PORT PROGRAM... on a free port."""
    exe = need_program("tcpserver")
    port = free_port()
    argv = [exe, "-R", "-H", "-l", "0", *options, "127.0.0.1", str(port), *program_argv]
    return _start(argv, env, log, port)


def start_relaygate_tcpserver(args: list[str], program_argv: list[str],
                              env: Mapping[str, str], log: Path,
                              host: str = "127.0.0.1,::1") -> tuple[Server, list[int]]:
    """relaygate tcpserver ARGS HOST 0 PROGRAM...; returns the server and its ports."""
    argv = [str(BIN / "relaygate"), "tcpserver", "-1", "-R", "-H", "-l", "0", *args,
            host, "0", *program_argv]
    full = {"PATH": PATH, **env}
    out = log.with_suffix(".port")
    with open(log, "wb") as err, open(out, "wb") as stdout:
        proc = subprocess.Popen(argv, env=full, stdout=stdout, stderr=err,
                                start_new_session=True)
    deadline = time.monotonic() + 30
    while not out.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"relaygate tcpserver did not start: {log.read_text()}")
        time.sleep(0.05)
    ports = [int(p) for p in out.read_text().split()]
    server = Server(proc, ports[0], log)
    return server, ports


def _start(argv: list[str], env: Mapping[str, str], log: Path, port: int) -> Server:
    full = {"PATH": PATH, **env}
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, env=full, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        wait_port("127.0.0.1", port, timeout=20)
    except OSError:
        proc.kill()
        raise
    return Server(proc, port, log)


__all__ = ["BIN", "PATH", "PROGRAMS", "Server", "free_port", "have_ipv6_loopback",
           "need_program", "parse_env", "program", "run", "start_debian_tcpserver",
           "start_relaygate_tcpserver", "talk", "wait_port"]
