"""Day-2 operations without servers: process records and the configuration admin
commands adopt, log files and syslog, who-relayed lines of the policy service, the
status page's HTML."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaygate.config import PolicySettings, Settings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.grants import Grant
from relaygate.log import configure_logging, reopen_log_files
from relaygate.metrics import Metrics
from relaygate.processes import ProcessRecord, adopt, processes
from relaygate.protocols.policy import format_request
from relaygate.servers.policy import make_service
from relaygate.statuspage import DecisionRate, render
from relaygate.stores.memory import MemoryStore


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger("relaygate")
    handlers, level, propagate = list(root.handlers), root.level, root.propagate
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    root.propagate = propagate


# -- process records and adopted configuration ------------------------------------------

def test_record_lists_and_adopts_the_running_servers_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.write_text('127.0.0.1:allow,RELAYCLIENT=""\n')
    running = Settings(data_dir=tmp_path, rules_file=rules, domains=("example.org",))
    rec = ProcessRecord(running, "serve")
    assert rec.write([{"name": "smtp", "listeners": ["127.0.0.1:25"]}])
    [doc] = processes(tmp_path)
    assert doc["state"] == "running" and doc["command"] == "serve"
    assert doc["config"]["rules_file"] == str(rules)
    admin, used = adopt(Settings(data_dir=tmp_path))
    assert used is not None and admin.rules_file == rules
    # a rules file the admin names wins
    other = tmp_path / "other"
    assert adopt(Settings(data_dir=tmp_path, rules_file=other))[0].rules_file == other
    rec.remove()
    assert processes(tmp_path) == []
    assert adopt(Settings(data_dir=tmp_path)) == (Settings(data_dir=tmp_path), None)


def test_a_redacted_store_url_is_never_adopted(tmp_path: Path) -> None:
    ProcessRecord(Settings(data_dir=tmp_path, store="redis://:s3cret@127.0.0.1:6379/0"),
                  "policyd").write()
    [doc] = processes(tmp_path)
    assert "s3cret" not in (tmp_path / "run" / Path(doc["file"]).name).read_text()
    assert doc["config"]["store"] == "redis://:***@127.0.0.1:6379/0"
    assert adopt(Settings(data_dir=tmp_path))[0].store is None
    # without a password the running store is the one to read
    ProcessRecord(Settings(data_dir=tmp_path / "b", store="redis://127.0.0.1:6379/3"),
                  "serve").write()
    assert adopt(Settings(data_dir=tmp_path / "b"))[0].store == "redis://127.0.0.1:6379/3"


def test_a_record_whose_pid_is_gone_is_stale(tmp_path: Path) -> None:
    rec = ProcessRecord(Settings(data_dir=tmp_path), "watch-log")
    rec.pid = _dead_pid()
    rec.path = rec.path.with_name(f"watch-log-{rec.pid}.json")
    rec.write()
    [doc] = processes(tmp_path)
    assert doc["state"] == "stale" and doc["pid"] == rec.pid
    assert adopt(Settings(data_dir=tmp_path))[1] is None


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- logs ------------------------------------------------------------------------------

def test_log_file_iso_times_and_reopen_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "relaygate.log"
    configure_logging(Settings(log_file=path))
    log = logging.getLogger("relaygate.test")
    log.info("first")
    os.rename(path, tmp_path / "relaygate.log.1")
    log.info("second")  # the inode changed: a new file of the same name
    assert "second" in path.read_text() and "first" in (tmp_path / "relaygate.log.1").read_text()
    os.rename(path, tmp_path / "relaygate.log.2")
    assert reopen_log_files()  # SIGHUP
    log.warning("third")
    line = path.read_text().strip()
    assert line.endswith(f"relaygate[{os.getpid()}]: warning: third")
    stamp = line.split(" ", 1)[0]
    assert abs(time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.time()) < 60


def test_syslog_facility_mail(tmp_path: Path) -> None:
    sock_path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        sock.settimeout(5)
        configure_logging(Settings(syslog=True, syslog_socket=sock_path))
        logging.getLogger("relaygate.test").warning("over syslog")
        data = sock.recv(4096)
    # <PRI>: facility mail (2) * 8 + warning (4) = 20
    assert data.startswith(b"<20>relaygate[") and b"warning: over syslog" in data


def test_unreachable_syslog_and_unwritable_log_file_are_config_errors(tmp_path: Path) -> None:
    from relaygate.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot reach syslog at"):
        configure_logging(Settings(syslog=True, syslog_socket=str(tmp_path / "nothing")))
    with pytest.raises(ConfigError, match="cannot open the log file"):
        configure_logging(Settings(log_file=tmp_path / "no" / "such" / "dir.log"))


def test_cli_takes_log_file_and_syslog_for_every_command(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from relaygate.cli import main

    r = CliRunner().invoke(main, ["--help"])
    assert "--log-file FILE" in r.output and "--syslog" in r.output
    for command in ("serve", "smtpd", "pop3d", "imapd"):
        r = CliRunner().invoke(main, [command, "--help"])
        assert "--log-file FILE" in r.output and "--syslog" in r.output, command


@pytest.mark.parametrize("where", ["group", "serve"])
def test_startup_error_reaches_the_log_file_too(tmp_path: Path, where: str) -> None:
    # A daemon's admin reads the log file: the reason it exited must be there, not
    # only on a stderr nobody keeps. --log-file works before and after "serve".
    import subprocess
    import sys

    path = tmp_path / "relaygate.log"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "relaygate", "--data-dir", str(tmp_path / "data"),
             *(["--log-file", str(path)] if where == "group" else []), "serve",
             *(["--log-file", str(path)] if where == "serve" else []), "--user", "root",
             "--smtp", f"127.0.0.1:{port}",
             *[x for flag in ("--submission", "--smtps", "--pop3", "--pop3s", "--imap",
                              "--imaps") for x in (flag, "127.0.0.1:0")]],
            capture_output=True, text=True, timeout=120)
    assert r.returncode == 111, r.stderr
    assert "cannot listen" in r.stderr
    logged = path.read_text()
    assert "error: smtp: cannot listen: " in logged and str(port) in logged, logged


# -- who relayed: the policy service --------------------------------------------------

async def test_policy_ok_logs_who_relayed(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    now = time.time()
    store.put(Grant("192.0.2.7", "alice", "example.org", "pop3", now, now + 600))
    settings = Settings(policy=PolicySettings(listen=("127.0.0.1:0",)))
    service = make_service(Context(settings, RelayControl(store, expiry=600), Metrics()))
    caplog.set_level(logging.INFO, logger="relaygate.events")
    await service.start()
    try:
        port = int(service.listeners()[0].rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(format_request({
            "request": "smtpd_access_policy", "protocol_state": "RCPT",
            "client_address": "192.0.2.7", "helo_name": "laptop.example",
            "sender": "alice@example.org", "recipient": "bob@far.example",
            "queue_id": "4XyZ1Q"}))
        assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 10) == b"action=OK\n\n"
        writer.close()
    finally:
        await service.stop(1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("relayed ")]
    assert len(lines) == 1
    assert lines[0].startswith(
        "relayed service=policy ip=192.0.2.7 action=OK user=alice basis=grant "
        "sender=alice@example.org "
        "recipient=bob@far.example helo=laptop.example queue_id=4XyZ1Q reason=")


# -- the status page ----------------------------------------------------------------

def test_status_page_escapes_everything_and_needs_no_script() -> None:
    now = 1_800_000_000.0
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    g = Grant("192.0.2.9", evil, "example.org", evil, now - 60, now + 540)
    page = render(now=now, host=evil, windows=[g], windows_error=None,
                  rate=[(now - 60, {"allow": 3, "deny": 1, "tempfail": 0})],
                  queue={"queued": 2, "deferred": 1, "error": None},
                  errors=[{"ts": now, "level": "warning", "msg": evil}],
                  processes=[{"command": evil, "pid": 1, "state": "running",
                              "started_at": now - 5, "services": []}])
    assert "<script" not in page and "<img" not in page
    assert page.count("&lt;script&gt;") == 6  # title, heading, user, source, error, command
    assert '<meta http-equiv="refresh" content="10">' in page
    assert "192.0.2.9" in page and ">9m<" in page


def test_decision_rate_per_minute_for_an_hour() -> None:
    rate = DecisionRate()
    t0 = 1_800_000_000.0 - 1_800_000_000.0 % 60
    rate.sample({"allow": 0}, t0 + 1)
    rate.sample({"allow": 5, "deny": 2}, t0 + 50)
    rate.sample({"allow": 6, "deny": 2, "tempfail": 1}, t0 + 70)
    assert rate.per_minute() == [
        (t0 + 60, {"allow": 1, "deny": 0, "tempfail": 1}),
        (t0, {"allow": 5, "deny": 2, "tempfail": 0}),
    ]
    for m in range(2, 200):
        rate.sample({"allow": 6 + m}, t0 + 60 * m)
    assert len(rate.per_minute()) == 60
