"""The log follower (rotation, truncation, stdin) and the post-login hook, without servers."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relaygate.integrations.dovecot import parse_args
from relaygate.integrations.logwatch import LogWatcher
from relaygate.protocols.loglines import LoginEvent, LoginMatcher

from .pfdc_support import RELAYGATE


def login_line(ip: str, user: str = "alice") -> bytes:
    return (f"Nov 28 02:56:49 mx dovecot: pop3-login: Login: user=<{user}>, method=PLAIN, "
            f"rip={ip}, lip=192.0.2.1, mpid=1, session=<x>\n").encode()


class Collector:
    def __init__(self) -> None:
        self.events: list[LoginEvent] = []
        self.cond = threading.Condition()

    def __call__(self, ev: LoginEvent) -> None:
        with self.cond:
            self.events.append(ev)
            self.cond.notify_all()

    def wait_for(self, ip: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(e.ip == ip for e in self.events):
                left = deadline - time.monotonic()
                assert left > 0, f"no login seen for {ip}: {self.events}"
                self.cond.wait(left)

    @property
    def ips(self) -> list[str]:
        return [e.ip for e in self.events]


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


@pytest.fixture
def follow(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[tuple[LogWatcher, threading.Thread]] = []

    def start(*paths: Path, from_start: bool = False) -> Collector:
        col = Collector()
        w = LogWatcher([str(p) for p in paths], LoginMatcher(), col, interval=0.02,
                       from_start=from_start)
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        w.ready.wait(5)
        started.append((w, t))
        return col

    yield start
    for w, t in started:
        w.stop()
        t.join(5)


def test_starts_at_the_end_and_reads_appended_lines(tmp_path: Path, follow) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "mail.log"
    log.write_bytes(login_line("192.0.2.1"))
    col = follow(log)
    time.sleep(0.1)
    # A line written in two pieces counts once, when complete.
    line = login_line("192.0.2.2")
    append(log, line[:30])
    time.sleep(0.1)
    append(log, line[30:])
    col.wait_for("192.0.2.2")
    assert col.ips == ["192.0.2.2"]


def test_starting_inside_a_line_skips_its_rest(tmp_path: Path, follow) -> None:  # type: ignore[no-untyped-def]
    # The watcher starts while Postfix is writing a line whose MAIL FROM holds a complete
    # Dovecot login line: what follows the start position is not a line of its own.
    log = tmp_path / "mail.log"
    log.write_bytes(b"Nov 28 02:56:49 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from x[203.0.113"
                    b".1]: 554 5.7.1 Relay access denied; from=<")
    col = follow(log)
    time.sleep(0.1)
    append(log, login_line("203.0.113.9").rstrip(b"\n") + b"> to=<a@b.example>\n")
    append(log, login_line("192.0.2.30"))
    col.wait_for("192.0.2.30")
    assert col.ips == ["192.0.2.30"]


def test_from_start_reads_history(tmp_path: Path, follow) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "mail.log"
    log.write_bytes(login_line("192.0.2.1") + b"junk\n" + login_line("2001:db8::1"))
    col = follow(log, from_start=True)
    col.wait_for("2001:db8::1")
    assert col.ips == ["192.0.2.1", "2001:db8::1"]


def test_rename_rotation(tmp_path: Path, follow) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "mail.log"
    log.write_bytes(b"")
    col = follow(log)
    append(log, login_line("192.0.2.3"))
    col.wait_for("192.0.2.3")
    # logrotate: rename, the daemon keeps writing the old file a moment, then a new one.
    log.rename(tmp_path / "mail.log.1")
    append(tmp_path / "mail.log.1", login_line("192.0.2.4"))
    log.write_bytes(login_line("192.0.2.5"))
    col.wait_for("192.0.2.4")
    col.wait_for("192.0.2.5")
    append(log, login_line("192.0.2.6"))
    col.wait_for("192.0.2.6")
    assert col.ips == ["192.0.2.3", "192.0.2.4", "192.0.2.5", "192.0.2.6"]


def test_copytruncate(tmp_path: Path, follow) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "mail.log"
    log.write_bytes(b"x" * 500 + b"\n")
    col = follow(log)
    append(log, login_line("192.0.2.7"))
    col.wait_for("192.0.2.7")
    with open(log, "r+b") as f:
        f.truncate(0)
    time.sleep(0.1)
    append(log, login_line("192.0.2.8"))
    col.wait_for("192.0.2.8")
    assert col.ips == ["192.0.2.7", "192.0.2.8"]


def test_file_that_appears_later(tmp_path: Path, follow) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "later.log"
    col = follow(log)
    time.sleep(0.1)
    log.write_bytes(login_line("192.0.2.9"))
    col.wait_for("192.0.2.9")


def test_overlong_line_does_not_hide_the_next(tmp_path: Path, follow) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "mail.log"
    log.write_bytes(b"")
    col = follow(log)
    append(log, b"y" * 100_000 + login_line("203.0.113.5"))
    append(log, login_line("192.0.2.10"))
    col.wait_for("192.0.2.10")
    assert "203.0.113.5" not in col.ips


def journal(fields: dict[bytes, bytes], binary: bool = False) -> bytes:
    out = b""
    for k, v in fields.items():
        if binary and k == b"MESSAGE":
            out += k + b"\n" + struct.pack("<Q", len(v)) + v + b"\n"
        else:
            out += k + b"=" + v + b"\n"
    return out + b"\n"


def test_cli_reads_journal_export_from_stdin(tmp_path: Path) -> None:
    msg = (b"imap-login: Login: user=<bob@example.org>, method=PLAIN, rip=2001:db8::42, "
           b"lip=2001:db8::1, mpid=9, TLS, session=<s>")
    data = (journal({b"__CURSOR": b"c1", b"SYSLOG_IDENTIFIER": b"dovecot", b"_PID": b"7",
                     b"MESSAGE": msg})
            + journal({b"__CURSOR": b"c2", b"SYSLOG_IDENTIFIER": b"postfix/smtpd",
                       b"MESSAGE": b"from=<dovecot: " + msg.replace(b"42", b"66") + b">"})
            + journal({b"__CURSOR": b"c3", b"SYSLOG_IDENTIFIER": b"dovecot",
                       b"MESSAGE": msg.replace(b"::42", b"::43")}, binary=True))
    store = f"sqlite://{tmp_path / 'g.db'}"
    out = subprocess.run([RELAYGATE, "--store", store, "watch-log", "--once", "-"], input=data,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = subprocess.run([RELAYGATE, "--store", store, "list", "--json"],
                            capture_output=True, text=True, check=True, timeout=60)
    grants = {g["ip"]: g for g in json.loads(listed.stdout)}
    assert set(grants) == {"2001:db8::42", "2001:db8::43"}
    assert grants["2001:db8::42"]["user"] == "bob@example.org"
    assert grants["2001:db8::42"]["domain"] == "example.org"
    assert grants["2001:db8::42"]["source"] == "log"


def test_cli_dry_run_custom_pattern_and_stdin_end(tmp_path: Path) -> None:
    text = (b"Jan  1 00:00:00 mx popa3d[5]: Authentication passed for alice -- [192.0.2.20]\n"
            + login_line("192.0.2.21"))
    out = subprocess.run(
        [RELAYGATE, "watch-log", "--dry-run", "--builtin", "none", "--pattern",
         r"popa3d=popa3d\[\d+\]: Authentication passed for (?P<user>\S+) -- "
         r"\[(?P<ip>[0-9.]+)\]", "-"],
        input=text, capture_output=True, timeout=60)
    # Without --once the watcher runs until stdin ends, then exits 111 for a supervisor.
    assert out.returncode == 111, out.stderr
    assert out.stdout.decode().splitlines() == ["192.0.2.20 user=alice service=pop3 "
                                                "pattern=popa3d"]
    bad = subprocess.run([RELAYGATE, "watch-log", "--dry-run", "--pattern", "x=nogroup", "-"],
                         input=b"", capture_output=True, timeout=60)
    assert bad.returncode == 2 and b"ip" in bad.stderr


# -- the post-login hook ------------------------------------------------------

HOOK = [sys.executable, "-m", "relaygate.integrations.dovecot"]


def run_hook(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run([*HOOK, *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=60)


def test_hook_records_then_execs(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'g.db'}"
    out = run_hook(["--store", store, "--expiry", "60", "--", "/bin/sh", "-c",
                    "echo exec:$USER"], {"IP": "::ffff:192.0.2.50", "USER": "Bob@Example.ORG"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "exec:Bob@Example.ORG\n"  # the environment reaches the program
    assert out.stderr == ""  # quiet on success (Dovecot logs stderr as errors)
    listed = subprocess.run([RELAYGATE, "--store", store, "list", "--json"],
                            capture_output=True, text=True, check=True, timeout=60)
    (grant,) = json.loads(listed.stdout)
    assert (grant["ip"], grant["user"], grant["domain"], grant["source"]) == \
        ("192.0.2.50", "Bob@Example.ORG", "example.org", "dovecot")
    assert 55 < grant["expires_at"] - grant["opened_at"] <= 60


def test_hook_does_not_warn_about_a_world_writable_spool_at_every_login(tmp_path: Path
                                                                        ) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    spool.chmod(0o777)
    for _ in range(2):
        out = run_hook(["--store", f"spool://{spool}", "--", "/bin/true"],
                       {"IP": "192.0.2.51", "USER": "bob"})
        assert out.returncode == 0 and out.stderr == "", out.stderr
    assert (spool / "192.0.2.51").exists()


def test_hook_store_from_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "relaygate.toml"
    cfg.write_text(f'store = "sqlite://{tmp_path / "c.db"}"\nexpiry = 30\n')
    out = run_hook(["--config", str(cfg), "--verbose", "/bin/true"], {"IP": "192.0.2.51"})
    assert out.returncode == 0
    assert "window.opened ip=192.0.2.51" in out.stderr and "expiry=30" in out.stderr


def listed(store: str) -> dict[str, dict[str, object]]:
    out = subprocess.run([RELAYGATE, "--store", store, "list", "--json"],
                         capture_output=True, text=True, check=True, timeout=60)
    return {g["ip"]: g for g in json.loads(out.stdout)}


def test_hook_honours_relaygate_variables_when_it_gets_them(tmp_path: Path) -> None:
    # Dovecot does not pass them (docs/postfix-dovecot.md), but a wrapper or another
    # caller may: $RELAYGATE_STORE/$RELAYGATE_EXPIRY, $RELAYGATE_CONFIG, $RELAYGATE_DATA_DIR.
    env_store = f"sqlite://{tmp_path / 'env.db'}"
    out = run_hook(["/bin/true"], {"IP": "192.0.2.70", "RELAYGATE_STORE": env_store,
                                   "RELAYGATE_EXPIRY": "77"})
    assert out.returncode == 0 and out.stderr == ""
    grant = listed(env_store)["192.0.2.70"]
    assert grant["expires_at"] - grant["opened_at"] == pytest.approx(77, abs=1)

    cfg = tmp_path / "relaygate.toml"
    cfg_store = f"sqlite://{tmp_path / 'cfg.db'}"
    cfg.write_text(f'store = "{cfg_store}"\nexpiry = 33\n')
    out = run_hook(["/bin/true"], {"IP": "192.0.2.71", "RELAYGATE_CONFIG": str(cfg)})
    assert out.returncode == 0 and out.stderr == ""
    grant = listed(cfg_store)["192.0.2.71"]
    assert grant["expires_at"] - grant["opened_at"] == pytest.approx(33, abs=1)
    # An option on the command line wins over the environment.
    opt_store = f"sqlite://{tmp_path / 'opt.db'}"
    out = run_hook(["--store", opt_store, "/bin/true"],
                   {"IP": "192.0.2.72", "RELAYGATE_CONFIG": str(cfg)})
    assert out.returncode == 0, out.stderr
    assert "192.0.2.72" in listed(opt_store) and "192.0.2.72" not in listed(cfg_store)

    data = tmp_path / "data"
    out = run_hook(["/bin/true"], {"IP": "192.0.2.73", "RELAYGATE_DATA_DIR": str(data)})
    assert out.returncode == 0 and out.stderr == ""
    assert "192.0.2.73" in listed(f"sqlite://{data / 'grants.db'}")


def test_hook_data_dir_option_and_group_option(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = run_hook(["--data-dir", str(data), "/bin/true"], {"IP": "192.0.2.74"})
    assert out.returncode == 0 and out.stderr == ""
    cli = subprocess.run([RELAYGATE, "--data-dir", str(data), "dovecot-postlogin", "/bin/true"],
                         env={"PATH": os.environ["PATH"], "IP": "192.0.2.75"},
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and cli.stderr == ""
    assert {"192.0.2.74", "192.0.2.75"} <= set(listed(f"sqlite://{data / 'grants.db'}"))


@pytest.mark.parametrize("args, env, complaint", [
    (["--store", "sqlite:///proc/no/such/dir/g.db"], {"IP": "192.0.2.1"}, "no relay window"),
    (["--store", "redis://127.0.0.1:1/0"], {"IP": "192.0.2.1"}, "Connection refused"),
    (["--config", "/nonexistent/relaygate.toml"], {"IP": "192.0.2.1"}, "not found"),
    ([], {"IP": "192.0.2.1", "RELAYGATE_CONFIG": "/nonexistent/relaygate.toml"}, "not found"),
    (["--store", "memory:"], {"IP": "not-an-ip"}, "invalid client address"),
    (["--store", "memory:"], {}, "no $IP"),
    ([], {"IP": "192.0.2.1"}, "no grant store configured"),
    (["--store", "memory:", "--expiry", "soon"], {"IP": "192.0.2.1"}, "--expiry"),
    # the one reader of window lengths: no 1-second window from "1e3", none from "2.5"
    (["--store", "memory:", "--expiry", "1e3"], {"IP": "192.0.2.1"},
     "--expiry must be a whole number of seconds from 1 to 31536000, not '1e3'"),
    (["--store", "memory:", "--expiry", "2.5"], {"IP": "192.0.2.1"}, "not '2.5'"),
    (["--store", "memory:"], {"IP": "192.0.2.1", "RELAYGATE_EXPIRY": "30s"}, "not '30s'"),
    (["--bogus", "--store", "memory:"], {"IP": "192.0.2.1"}, "unknown option"),
])
def test_hook_failures_never_stop_the_login(args: list[str], env: dict[str, str],
                                            complaint: str) -> None:
    out = run_hook([*args, "/bin/sh", "-c", "echo still-logged-in"], env)
    assert out.returncode == 0
    assert out.stdout == "still-logged-in\n"
    assert complaint in out.stderr


def test_hook_slow_store_times_out(tmp_path: Path) -> None:
    # A Redis that accepts connections and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        start = time.monotonic()
        out = run_hook(["--store", f"redis://127.0.0.1:{port}/0", "--timeout", "1",
                        "/bin/true"], {"IP": "192.0.2.1"})
        took = time.monotonic() - start
    assert out.returncode == 0
    assert "recording took longer than 1.0s" in out.stderr
    assert took < 20


def test_hook_exec_failure_and_usage() -> None:
    out = run_hook(["--store", "memory:", "/nonexistent/program"], {"IP": "192.0.2.1"})
    assert out.returncode == 111
    assert "cannot execute" in out.stderr
    out = run_hook(["--store", "memory:"], {"IP": "192.0.2.1"})
    assert out.returncode == 2
    assert "usage" in out.stderr


def test_hook_cli_form_takes_group_options(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'g.db'}"
    out = subprocess.run([RELAYGATE, "--store", store, "dovecot-postlogin", "/bin/sh", "-c",
                          "echo $IP --store"], env={"PATH": os.environ["PATH"],
                                                    "IP": "192.0.2.60"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "192.0.2.60 --store\n"  # the program's own arguments are untouched
    listed = subprocess.run([RELAYGATE, "--store", store, "list", "--json"],
                            capture_output=True, text=True, check=True, timeout=60)
    assert [g["ip"] for g in json.loads(listed.stdout)] == ["192.0.2.60"]


def test_console_script_runs_the_hook_without_the_cli(tmp_path: Path) -> None:
    # `relaygate dovecot-postlogin ...` (the form dovecot.conf uses) skips click: it runs
    # once per login. The modules imported before the exec show it.
    store = f"sqlite://{tmp_path / 'g.db'}"
    code = ("import sys; from relaygate.entry import run; "
            f"sys.argv = ['relaygate', 'dovecot-postlogin', '--store', {store!r}, '/bin/true']; "
            "run()")
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                         env={"PATH": os.environ["PATH"], "IP": "192.0.2.61"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    imported = {line.rpartition("|")[2].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "relaygate.integrations.dovecot" in imported
    assert "click" not in imported and "relaygate.cli" not in imported
    listed = subprocess.run([RELAYGATE, "--store", store, "list", "--json"],
                            capture_output=True, text=True, check=True, timeout=60)
    assert [g["source"] for g in json.loads(listed.stdout)] == ["dovecot"]
    # Help still comes from the CLI.
    helped = subprocess.run([RELAYGATE, "dovecot-postlogin", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "exec PROGRAM" in helped.stdout


def test_parse_args() -> None:
    opts, program, problems = parse_args(["--store=memory:", "-v", "--expiry", "5", "--",
                                          "--weird-program", "-x"])
    assert opts == {"store": "memory:", "verbose": True, "expiry": "5"}
    assert program == ["--weird-program", "-x"]
    assert problems == []
    opts, program, problems = parse_args(["--store"])
    assert program == [] and problems == ["option --store needs a value"]
    # Dovecot appends its own program: everything from the first non-option on is kept.
    _, program, _ = parse_args(["--store", "x", "/usr/lib/dovecot/script-login", "--store"])
    assert program == ["/usr/lib/dovecot/script-login", "--store"]
