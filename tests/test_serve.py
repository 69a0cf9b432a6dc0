"""The frame of ``relaygate serve`` with stand-in services: lock, start/stop, reload,
aging, status file, metrics listener, signals, privilege drop."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trustme

from _serve_standins import LineService, current_user, line_factory
from conftest import free_port, wait_port
from relaygate.config import Settings, SmtpSettings
from relaygate.errors import StoreError
from relaygate.grants import Grant
from relaygate.mail.directory import StaticDirectory
from relaygate.servers import serve as serve_mod
from relaygate.servers.serve import ServeError, Server, resolve_target
from relaygate.status import LOCK_FILE, STATUS_FILE, read_status

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def _settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(data_dir=tmp_path / "data", store="memory:",
                                hostname="test.example", user=current_user(),
                                shutdown_grace=5.0)
    base.update(kw)
    return Settings(**base)


def _server(settings: Settings, port: int, **kw: Any) -> Server:
    return Server(settings, factories=[("line", line_factory("127.0.0.1", port))],
                  open_directory=lambda s: StaticDirectory(), open_queue=lambda s: None,
                  install_signals=False, setup_log=False, announce=lambda text: None, **kw)


async def _started(server: Server, task: asyncio.Task[int]) -> None:
    for _ in range(200):
        if server.started_at:
            return
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    raise AssertionError("server did not start")


async def _talk(port: int, line: bytes, *, ssl_ctx: ssl.SSLContext | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_ctx,
                                                   server_hostname="test.example"
                                                   if ssl_ctx else None)
    writer.write(line + b"\n")
    await writer.drain()
    answer = await reader.readline()
    writer.close()
    return answer.strip()


async def test_runs_services_writes_status_and_stops_gracefully(tmp_path: Path) -> None:
    port = free_port()
    server = _server(_settings(tmp_path), port)
    server.prepare()
    task = asyncio.create_task(server.main())
    try:
        await _started(server, task)
        assert await _talk(port, b"PING") == b"PONG"
        # the status file appears with the services and their listeners
        for _ in range(100):
            doc = read_status(tmp_path / "data")
            if doc:
                break
            await asyncio.sleep(0.05)
        assert doc is not None and doc["state"] == "running"
        assert doc["pid"] == os.getpid()
        assert {"name": "line", "listeners": [f"127.0.0.1:{port}"]} in doc["services"]
        # a transaction in flight when the stop begins still completes
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"SLOW 0.5\n")
        await writer.drain()
        assert (await reader.readline()).strip() == b"BUSY"
        server.request_stop()
        assert (await reader.readline()).strip() == b"DONE"
        writer.close()
        assert await asyncio.wait_for(task, 10) == 0
    finally:
        server.close()
    svc = server.services[0]
    assert isinstance(svc, LineService) and svc.stopped_with == 5.0
    doc = read_status(tmp_path / "data")
    assert doc is not None and doc["state"] == "stopped"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)


async def test_second_instance_on_same_data_dir_is_refused(tmp_path: Path) -> None:
    first = _server(_settings(tmp_path), free_port())
    first.prepare()
    try:
        second = _server(_settings(tmp_path), free_port())
        with pytest.raises(ServeError) as exc:
            second.prepare()
        msg = str(exc.value)
        assert "already running" in msg and f"pid {os.getpid()}" in msg
        assert str((tmp_path / "data").absolute()) in msg
    finally:
        first.close()
    # released with the process (here: close): a new one may start
    third = _server(_settings(tmp_path), free_port())
    third.prepare()
    third.close()


async def test_port_in_use_is_a_clear_start_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = _server(_settings(tmp_path), port)
        server.prepare()
        try:
            with pytest.raises(ServeError, match="line: cannot listen"):
                await server.main()
        finally:
            server.close()


def test_bad_listener_setting_names_its_source(tmp_path: Path) -> None:
    from relaygate.errors import ConfigError

    s = _settings(tmp_path, smtp=SmtpSettings(listen=("no-port",)))
    with pytest.raises(ConfigError, match=r"smtp\.listen.*HOST:PORT"):
        _server(s, free_port()).prepare()


def test_root_needs_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    # The embedded default listens on loopback at unprivileged ports: a trial run as root.
    assert resolve_target(Settings(data_dir=tmp_path)) is None
    for smtp in (SmtpSettings(listen=("0.0.0.0:2525",)), SmtpSettings(listen=("127.0.0.1:25",)),
                 SmtpSettings(listen=("[::]:2525",))):
        with pytest.raises(ServeError, match="refusing to run as root"):
            resolve_target(Settings(data_dir=tmp_path, smtp=smtp))
    with pytest.raises(ServeError, match="--group needs --user"):
        resolve_target(Settings(data_dir=tmp_path, group="nogroup"))
    with pytest.raises(ServeError, match="no such user"):
        resolve_target(Settings(data_dir=tmp_path, user="no-such-user-xyz"))
    target = resolve_target(Settings(data_dir=tmp_path, user="nobody"))
    assert target is not None and target.uid == pwd.getpwnam("nobody").pw_uid


def test_user_without_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(ServeError, match="switching users needs root"):
        resolve_target(Settings(data_dir=tmp_path, user="nobody"))
    assert resolve_target(Settings(data_dir=tmp_path, user="4242")) is None
    assert resolve_target(Settings(data_dir=tmp_path)) is None


async def test_aging_counts_expired_windows(tmp_path: Path) -> None:
    server = _server(_settings(tmp_path), free_port())
    ctx = server.build_context()
    now = time.time()
    ctx.control.allow(Grant("127.0.0.7", "alice", "test.example", "pop3", now - 10, now - 1))
    ctx.control.allow(Grant("127.0.0.8", "bob", "test.example", "imap", now, now + 100))
    assert await server.age_once(ctx) == 1
    assert ctx.metrics.windows.labels(event="expired")._value.get() == 1
    assert [g.ip for g in ctx.control.list()] == ["127.0.0.8"]


class _BrokenStore:
    kind = "broken"

    def __init__(self) -> None:
        self.broken = True
        self.grants: list[Grant] = []

    def _check(self) -> None:
        if self.broken:
            raise StoreError("connection refused")

    def put(self, grant: Grant) -> None:
        self._check()

    def get(self, ip: str, now: float) -> Grant | None:
        self._check()
        return None

    def delete(self, ip: str) -> bool:
        self._check()
        return False

    def delete_user(self, user: str) -> int:
        self._check()
        return 0

    def age(self, now: float) -> int:
        self._check()
        return 0

    def list(self, now: float) -> list[Grant]:
        self._check()
        return []

    def close(self) -> None:
        pass


async def test_store_failure_is_logged_never_fatal_and_recovers(tmp_path: Path) -> None:
    import logging

    server = _server(_settings(tmp_path, age_interval=0.05), free_port())
    logging.getLogger("relaygate").addHandler(server.errors)
    server.prepare()
    task = asyncio.create_task(server.main())
    try:
        await _started(server, task)
        assert server.ctx is not None
        store = _BrokenStore()
        server.ctx.control.store = store
        for _ in range(100):
            if server.store_ok is False:
                break
            await asyncio.sleep(0.02)
        assert server.store_ok is False
        assert not task.done()
        # relaying fails closed meanwhile
        assert server.ctx.control.decide("127.0.0.3").verdict.value == "tempfail"
        assert any("grant store unreachable" in e["msg"] for e in server.errors.items())
        store.broken = False
        for _ in range(100):
            if server.store_ok:
                break
            await asyncio.sleep(0.02)
        assert server.store_ok is True
        server.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    finally:
        logging.getLogger("relaygate").removeHandler(server.errors)
        server.close()


def _write_cert(ca: trustme.CA, d: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("test.example")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    return d / "cert.pem", d / "key.pem"


async def test_sighup_reload_rules_tls_users_and_services(tmp_path: Path) -> None:
    from relaygate.config import TlsSettings

    ca1, ca2 = trustme.CA(), trustme.CA()
    cert, key = _write_cert(ca1, tmp_path)
    rules = tmp_path / "rules"
    rules.write_text("")
    port = free_port()

    class Users(StaticDirectory):
        reloads = 0

        def reload(self) -> None:
            Users.reloads += 1

    s = _settings(tmp_path, rules_file=rules, tls=TlsSettings(cert=cert, key=key))
    server = Server(s, factories=[("line", line_factory("127.0.0.1", port))],
                    open_directory=lambda _: Users(), open_queue=lambda _: None,
                    install_signals=False, setup_log=False, announce=lambda text: None)
    server.prepare()
    task = asyncio.create_task(server.main())
    try:
        await _started(server, task)
        assert server.ctx is not None
        assert server.ctx.ssl_context is server.ssl_context
        client1 = ssl.create_default_context()
        ca1.configure_trust(client1)
        assert await _talk(port, b"PING", ssl_ctx=client1) == b"PONG"
        assert server.ctx.control.decide("127.0.0.9").verdict.value == "deny"

        rules.write_text('127.0.0.9:allow,RELAYCLIENT=""\n')
        _write_cert(ca2, tmp_path)
        done = await server.reload()
        assert set(done) >= {"rules", "tls", "users", "line"}
        assert Users.reloads == 1
        assert server.ctx.control.decide("127.0.0.9").verdict.value == "allow"
        client2 = ssl.create_default_context()
        ca2.configure_trust(client2)
        assert await _talk(port, b"PING", ssl_ctx=client2) == b"PONG"
        with pytest.raises(ssl.SSLError):
            await _talk(port, b"PING", ssl_ctx=client1)

        # a broken rules file or key is logged and the old one kept
        rules.write_text("garbage line without colon\n")
        key.write_text("not a key")
        done = await server.reload()
        assert "rules" not in done and "tls" not in done
        assert server.ctx.control.decide("127.0.0.9").verdict.value == "allow"
        assert await _talk(port, b"PING", ssl_ctx=client2) == b"PONG"
        server.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    finally:
        server.close()


async def test_metrics_listener(tmp_path: Path) -> None:
    from relaygate.config import MetricsSettings

    mport = free_port()
    server = _server(_settings(tmp_path, metrics=MetricsSettings(listen=f"127.0.0.1:{mport}")),
                     free_port())
    server.prepare()
    task = asyncio.create_task(server.main())
    try:
        await _started(server, task)
        assert server.ctx is not None
        server.ctx.metrics.windows.labels(event="opened").inc(3)

        def get(path: str, method: str = "GET") -> tuple[int, bytes]:
            req = urllib.request.Request(f"http://127.0.0.1:{mport}{path}", method=method)
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        status, body = await asyncio.to_thread(get, "/metrics")
        assert status == 200
        assert b'relaygate_windows_total{event="opened"} 3.0' in body
        assert b"process_resident_memory_bytes" in body
        assert (await asyncio.to_thread(get, "/nope"))[0] == 404
        assert (await asyncio.to_thread(get, "/metrics", "POST"))[0] == 405
        status, body = await asyncio.to_thread(get, "/metrics", "HEAD")
        assert status == 200 and body == b""
        # an oversized request head is refused, not buffered
        r, w = await asyncio.open_connection("127.0.0.1", mport)
        w.write(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
        await w.drain()
        assert (await r.readline()).startswith(b"HTTP/1.1 431")
        w.close()
        server.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
    finally:
        server.close()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(SRC), env.get("PYTHONPATH", "")])
    return env


def _start_standin(data: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "_serve_standins", str(data), str(port),
                             *extra], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_port("127.0.0.1", port, 20)
    except OSError:
        proc.kill()
        _out, err = proc.communicate()
        raise AssertionError(f"stand-in serve did not start: {err.decode()}") from None
    # ready once the first status file is written (after the privilege drop)
    for _ in range(400):
        doc = read_status(data)
        if doc and doc.get("pid") == proc.pid:
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("stand-in serve wrote no status file")


def _ask(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(line + b"\n")
        return s.makefile("rb").readline().strip()


def test_sigterm_finishes_transaction_then_exits_0(tmp_path: Path) -> None:
    port = free_port()
    proc = _start_standin(tmp_path / "data", port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rb")
            s.sendall(b"SLOW 1\n")
            assert f.readline().strip() == b"BUSY"
            proc.send_signal(signal.SIGTERM)
            assert f.readline().strip() == b"DONE"
        assert proc.wait(15) == 0
        _out, err = proc.communicate()
        assert b"serve.stopping" in err and b"serve.stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_refuses_second_instance(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    proc = _start_standin(data, port)
    try:
        r = subprocess.run([sys.executable, "-m", "relaygate", "serve", "--data-dir", str(data),
                            "--user", current_user(), "--smtp", f"127.0.0.1:{free_port()}"],
                           env=_env(), capture_output=True, timeout=30)
        assert r.returncode == 111
        err = r.stderr.decode()
        assert "already running" in err and f"pid {proc.pid}" in err
        assert _ask(port, b"PING") == b"PONG"
    finally:
        proc.terminate()
        proc.wait(15)


def test_sighup_in_process_signal_reloads(tmp_path: Path) -> None:
    port = free_port()
    proc = _start_standin(tmp_path / "data", port)
    try:
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert _ask(port, b"PING") == b"PONG"
        proc.terminate()
        assert proc.wait(15) == 0
        _out, err = proc.communicate()
        assert b"serve.reloaded" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_privilege_drop_as_root(tmp_path: Path) -> None:
    import tempfile

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="relaygate-drop-"))
    os.chmod(base, 0o755)  # nobody must be able to reach the data dir
    data = base / "data"
    port = free_port()
    proc = _start_standin(data, port, "nobody")
    try:
        assert _ask(port, b"WHO") == str(nobody.pw_uid).encode()
        status_line = [ln for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                       if ln.startswith(("Uid:", "Gid:", "Groups:"))]
        assert status_line[0].split()[1:] == [str(nobody.pw_uid)] * 4
        assert status_line[1].split()[1:] == [str(nobody.pw_gid)] * 4
        assert status_line[2].split()[1:] == []
        for p in (data, data / "grants.db", data / LOCK_FILE):
            assert p.stat().st_uid == nobody.pw_uid, p
        for _ in range(100):
            if (data / STATUS_FILE).exists():
                break
            time.sleep(0.05)
        assert (data / STATUS_FILE).stat().st_uid == nobody.pw_uid
        proc.terminate()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks need root")
def test_data_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 12345, 12345)
    s = _settings(tmp_path, user="nobody")
    server = _server(s, free_port())
    with pytest.raises(ServeError, match="belongs to uid 12345"):
        server.prepare()


def test_default_parts_follow_listener_settings() -> None:
    from relaygate.config import ImapSettings, PolicySettings, Pop3Settings, SmtpSettings

    s = Settings()
    assert [p.name for p in serve_mod.PARTS if p.enabled(s)] == ["queue", "smtp", "pop3", "imap"]
    off = Settings(smtp=SmtpSettings(listen=(), submission=()), pop3=Pop3Settings(listen=()),
                   imap=ImapSettings(listen=()), policy=PolicySettings(listen=("unix:/x",)))
    assert [p.name for p in serve_mod.PARTS if p.enabled(off)] == ["queue", "policy"]


def test_status_json_shape_is_stable(tmp_path: Path) -> None:
    server = _server(_settings(tmp_path), free_port())
    doc = server.status_doc("running")
    json.dumps(doc)
    assert {"state", "pid", "services", "errors", "store", "updated_at"} <= set(doc)



def test_listening_events_name_each_listener_kind() -> None:
    class Svc:
        name = "pop3"

        def listeners(self) -> list[str]:
            return ["pop3 127.0.0.1:1110", "pop3s 127.0.0.1:1995", "[::1]:1110",
                    "unix:/run/x.sock"]

    assert serve_mod._listening(Svc()) == [  # type: ignore[arg-type]
        ("pop3", "127.0.0.1:1110"), ("pop3s", "127.0.0.1:1995"), ("pop3", "[::1]:1110"),
        ("pop3", "unix:/run/x.sock")]


def test_start_up_warns_about_mailboxes_outside_the_local_domains(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # README's rules example without --domain: the host name is the one local domain, and
    # mail to alice@example.org would be relayed to example.org's MX (issue 17 point 4).
    from relaygate.mail.directory import Account

    directory = StaticDirectory()
    directory.add(Account("alice@example.org", "example.org", tmp_path / "m1",
                          ("alice@example.org", "a.l@example.org")), "pw")
    directory.add(Account("bob", "sub.example.net", tmp_path / "m2"), "pw")
    for domains, warned in (((), True), (("example.org", "sub.example.net"), False)):
        caplog.clear()
        settings = _settings(tmp_path, domains=domains)
        server = Server(settings, factories=[], open_directory=lambda s: directory,
                        open_queue=lambda s: None, install_signals=False, setup_log=False,
                        announce=lambda text: None)
        with caplog.at_level("WARNING"):
            server.build_context()
        server.close()
        text = " ".join(r.getMessage() for r in caplog.records)
        assert ("outside the local domains (test.example)" in text) is warned, text
        if warned:
            assert "a.l@example.org, alice@example.org, bob@sub.example.net" in text
            assert "--domain example.org --domain sub.example.net" in text


def test_first_run_banner_names_the_command_as_the_user_ran_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    prog = venv_bin / "relaygate"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert serve_mod.command_name(".venv/bin/relaygate") == ".venv/bin/relaygate"
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")
    assert serve_mod.command_name(".venv/bin/relaygate") == "relaygate"
    assert serve_mod.command_name("/x/relaygate/__main__.py").endswith(" -m relaygate")

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sys, "argv", [".venv/bin/relaygate", "serve"])
    shown: list[str] = []
    server = Server(_settings(tmp_path, data_dir=Path("relaygate-data")), factories=[],
                    open_directory=lambda s: StaticDirectory(), open_queue=lambda s: None,
                    install_signals=False, setup_log=False, announce=shown.append)
    server.first_run = True
    server._banner()
    assert "    .venv/bin/relaygate users add alice@test.example" in shown[0]
    assert "local domains: test.example (this host's name; give --domain" in shown[0]
