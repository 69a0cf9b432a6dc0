"""A ``relaygate serve`` subprocess on free loopback ports, plain-socket clients that
can bind a source address (127.0.0.x, ::1), and a loopback SMTP sink.

Used by the end-to-end tests and by bench/serve.py.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"

#: seconds to wait for serve's listeners after start
START_TIMEOUT = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), e.get("PYTHONPATH", "")) if p)
    e.pop("RELAYGATE_CONFIG", None)
    return e


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Serve:
    """One ``relaygate serve`` process (see :meth:`start`)."""

    workdir: Path
    domain: str = "example.org"
    expiry: float = 2.0
    store: str | None = None
    rules: str | None = None
    smtproutes: str | None = None
    hosts: tuple[str, ...] = ("127.0.0.1",)
    services: tuple[str, ...] = ("smtp", "pop3", "imap")
    extra: tuple[str, ...] = ()
    #: --user (default: whoever runs the tests, so nothing changes users)
    user: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        for name in ("smtp", "submission", "pop3", "imap"):
            # one port for every address of a service, so clients find it on any of them
            self.ports.setdefault(name, _common_free_port(self.hosts))

    def args(self) -> list[str]:
        a = [sys.executable, "-m", "relaygate", "serve", "--data-dir", str(self.data_dir),
             "--user", self.user or me(), "--domain", self.domain, "--expiry", f"{self.expiry:g}"]
        for name in ("smtp", "submission", "pop3", "imap"):
            if name in self.services:
                for h in self.hosts:
                    a += [f"--{name}", _hostport(h, self.ports[name])]
            else:
                a += [f"--{name}", "off"]
        if self.store:
            a += ["--store", self.store]
        if self.rules is not None:
            rules = self.workdir / "rules"
            rules.write_text(self.rules)
            a += ["--rules", str(rules)]
        if self.smtproutes is not None:
            routes = self.workdir / "smtproutes"
            routes.write_text(self.smtproutes)
            a += ["--smtproutes", str(routes)]
        return a + list(self.extra)

    def start(self) -> Serve:
        self.out = open(self.workdir / "serve.out", "ab")
        self.err = open(self.workdir / "serve.err", "ab")
        self.proc = subprocess.Popen(self.args(), stdout=self.out, stderr=self.err, env=env(),
                                     cwd=self.workdir)
        deadline = time.monotonic() + START_TIMEOUT
        for name in ("smtp", "pop3", "imap", "submission"):
            if name not in self.services:
                continue
            for h in self.hosts:
                while True:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"serve exited {self.proc.returncode}: {self.log()}")
                    try:
                        with socket.create_connection((h, self.ports[name]), timeout=1):
                            break
                    except OSError:
                        if time.monotonic() > deadline:
                            self.stop()
                            raise RuntimeError(f"serve did not listen: {self.log()}") from None
                        time.sleep(0.05)
        # ready = the first status file: written once every service runs (after the
        # privilege drop)
        status = self.data_dir / "status.json"
        while True:
            try:
                if json.loads(status.read_text()).get("pid") == self.proc.pid:
                    break
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve wrote no status: {self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        try:
            return (self.workdir / "serve.err").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (getattr(self, "out", None), getattr(self, "err", None)):
            if f is not None:
                f.close()
        return int(self.proc.returncode)

    def relaygate(self, *args: str, input: str | None = None,
                  timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        base = [sys.executable, "-m", "relaygate", "--data-dir", str(self.data_dir)]
        if self.store:
            base += ["--store", self.store]
        return subprocess.run(base + list(args), input=input, capture_output=True, text=True,
                              env=env(), cwd=self.workdir, timeout=timeout)

    def add_user(self, login: str, password: str) -> None:
        r = self.relaygate("users", "add", login, "--domain", self.domain, input=password + "\n")
        if r.returncode != 0:
            raise RuntimeError(f"users add failed: {r.stdout} {r.stderr}")

    def maildir_count(self, local: str) -> int:
        new = self.data_dir / "mail" / self.domain / local / "new"
        cur = self.data_dir / "mail" / self.domain / local / "cur"
        return sum(len(os.listdir(d)) for d in (new, cur) if d.is_dir())


def _common_free_port(hosts: tuple[str, ...]) -> int:
    for _ in range(50):
        port = free_port(hosts[0])
        ok = True
        for h in hosts[1:]:
            family = socket.AF_INET6 if ":" in h else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no common free port")


# -- clients ----------------------------------------------------------------------


def smtp(source: str, host: str, port: int, timeout: float = 30.0) -> smtplib.SMTP:
    """An SMTP client whose connection comes from ``source`` (127.0.0.x or ::1)."""
    client = smtplib.SMTP(timeout=timeout, local_hostname="client.test",
                          source_address=(source, 0))
    client.connect(host, port)
    client.ehlo()
    return client


def try_relay(source: str, host: str, port: int, rcpt: str = "bob@example.net",
              body: str = "relayed") -> tuple[int, str]:
    """Send one message to ``rcpt``; the RCPT reply code (and DATA's when RCPT is 250)."""
    with smtp(source, host, port) as c:
        c.mail("alice@example.org")
        code, msg = c.rcpt(rcpt)
        if code != 250:
            return code, msg.decode(errors="replace")
        code, msg = c.data(f"Subject: {body}\r\nFrom: alice@example.org\r\n\r\n{body}\r\n")
        return code, msg.decode(errors="replace")


class LineClient:
    """A tiny text-protocol client (POP3/IMAP) bound to a source address."""

    def __init__(self, source: str, host: str, port: int, timeout: float = 30.0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.file = self.sock.makefile("rb")

    def line(self) -> bytes:
        data = self.file.readline()
        if not data:
            raise ConnectionError("server closed the connection")
        return data.rstrip(b"\r\n")

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\r\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def pop3_login(source: str, host: str, port: int, user: str, password: str) -> bool:
    c = LineClient(source, host, port)
    try:
        assert c.line().startswith(b"+OK")
        c.send(f"USER {user}")
        if not c.line().startswith(b"+OK"):
            return False
        c.send(f"PASS {password}")
        ok = c.line().startswith(b"+OK")
        c.send("QUIT")
        c.line()
        return ok
    finally:
        c.close()


def imap_login(source: str, host: str, port: int, user: str, password: str) -> bool:
    c = LineClient(source, host, port)
    try:
        assert c.line().startswith(b"* OK")
        c.send(f'a1 LOGIN "{user}" "{password}"')
        while True:
            line = c.line()
            if line.startswith(b"a1 "):
                ok = line.startswith(b"a1 OK")
                break
        c.send("a2 LOGOUT")
        while not c.line().startswith(b"a2 "):
            pass
        return ok
    finally:
        c.close()


class Sink:
    """A loopback SMTP server (aiosmtpd) that keeps every message it receives."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()
        self.port = free_port(host)
        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                with sink.lock:
                    sink.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                          bytes(envelope.original_content or b"")))
                return "250 2.0.0 OK"

        self.controller = Controller(Handler(), hostname=host, port=self.port)

    def __enter__(self) -> Sink:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    def wait_for(self, marker: str, timeout: float = 20.0) -> tuple[str, list[str], bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for m in self.messages:
                    if marker.encode() in m[2]:
                        return m
            time.sleep(0.05)
        raise AssertionError(f"no message containing {marker!r} reached the sink")
