"""``relaygate doctor exim`` against the real Exim with good and bad configurations."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaygate.integrations.exim_doctor import Report, Statement, check_acl, parse_acls

from .mta_support import EXIM, RELAYGATE, Daemon, exim_config, free_port, need, start_relaygate


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="relaygate-eximdoc-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def policyd(root: Path) -> Iterator[tuple[Daemon, str, int]]:
    need(EXIM, "Exim")
    store = f"sqlite://{root / 'grants.db'}"
    port = free_port()
    daemon = start_relaygate(["--store", store, "policyd", "--listen", f"127.0.0.1:{port}"],
                             root / "policyd.err", port=port)
    yield daemon, store, port
    daemon.stop()


def doctor(store: str, conf: Path, *extra: str) -> tuple[int, str]:
    out = subprocess.run([RELAYGATE, "--store", store, "doctor", "exim", "--exim", str(EXIM),
                          "--config", str(conf), *extra], capture_output=True, text=True,
                         timeout=300)
    return out.returncode, out.stdout + out.stderr


def test_good_configuration(root: Path, policyd: tuple[Daemon, str, int]) -> None:
    conf = exim_config(root / "good", f"inet:127.0.0.1:{policyd[2]}")
    code, out = doctor(policyd[1], conf)
    assert code == 0, out
    assert "Exim 4.96" in out and "user Debian-exim" in out
    assert "before the relay check" in out
    assert f"policy service inet:127.0.0.1:{policyd[2]} accepts connections" in out
    assert "exim -bh 192.0.2.53 (open window): RCPT to a remote domain accepted" in out
    assert "exim -bh 192.0.2.54 (no window): RCPT to a remote domain refused (550)" in out
    # the test window is gone again
    listed = subprocess.run([RELAYGATE, "--store", policyd[1], "list"], capture_output=True,
                            text=True, timeout=60).stdout
    assert "192.0.2.53" not in listed


def test_include_after_the_relay_check(root: Path, policyd: tuple[Daemon, str, int]) -> None:
    conf = exim_config(root / "late", f"inet:127.0.0.1:{policyd[2]}", late=True)
    code, out = doctor(policyd[1], conf)
    assert code == 1, out
    assert "the relay check (statement 4: require message = relay not permitted) comes " \
           "before relaygate's question" in out
    assert "(open window): RCPT to a remote domain got 550, not 250" in out


def test_no_relaygate_in_the_acl(root: Path, policyd: tuple[Daemon, str, int]) -> None:
    conf = exim_config(root / "none", f"inet:127.0.0.1:{policyd[2]}", include_acl=False)
    code, out = doctor(policyd[1], conf, "--no-session")
    assert code == 1, out
    assert "does not ask relaygate" in out


def test_service_not_running(root: Path, policyd: tuple[Daemon, str, int]) -> None:
    port = free_port()
    conf = exim_config(root / "down", f"inet:127.0.0.1:{port}")
    code, out = doctor(policyd[1], conf)
    assert code == 1, out
    assert f"policy service inet:127.0.0.1:{port} is not reachable" in out
    assert "got 451, not 250" in out


def test_unix_socket_the_exim_user_cannot_write(root: Path,
                                                 policyd: tuple[Daemon, str, int]) -> None:
    run = Path(tempfile.mkdtemp(prefix="relaygate-test-", dir="/run"))
    os.chmod(run, 0o755)
    try:
        sock = run / "policy.sock"
        daemon = start_relaygate(["--store", policyd[1], "policyd", "--listen",
                                  f"unix:{sock}"], root / "policyd-unix.err", path=sock)
        try:
            conf = exim_config(root / "unix", str(sock))
            code, out = doctor(policyd[1], conf, "--no-session")
            assert code == 1, out
            assert f"the Exim user Debian-exim cannot write {sock} (mode 0660" in out
            assert "--socket-group Debian-exim" in out
        finally:
            daemon.stop()
        daemon = start_relaygate(["--store", policyd[1], "policyd", "--listen",
                                  f"unix:{sock}", "--socket-group", "Debian-exim"],
                                 root / "policyd-unix2.err", path=sock)
        try:
            code, out = doctor(policyd[1], conf)
            assert code == 0, out
            assert f"policy socket {sock} is writable by the Exim user Debian-exim" in out
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_exim_missing_is_111(root: Path) -> None:
    out = subprocess.run([RELAYGATE, "--store", "memory:", "doctor", "exim", "--exim",
                          str(root / "no-such-exim")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 111, out
    assert "not found" in out.stderr


# -- the ACL reader, without Exim ---------------------------------------------------------

CONFIG = """\
# Exim Configuration (4.96)
primary_hostname = x
begin acl

  acl_check_rcpt:
    accept
    hosts = :
    warn
    set acl_m_rg = ${readsocket{/run/rg.sock}{request=smtpd_access_policy\\n\\n}{5s}{ }{x}}
    accept
    condition = ${if match{$acl_m_rg}{action=OK}}
    require
    message = relay not permitted
    domains = +local_domains
    accept

  acl_check_data:
    accept
begin routers
r:
  driver = accept
"""


def test_parse_acls() -> None:
    acls = parse_acls(CONFIG)
    assert set(acls) == {"acl_check_rcpt", "acl_check_data"}
    rcpt = acls["acl_check_rcpt"]
    assert [s.verb for s in rcpt] == ["accept", "warn", "accept", "require", "accept"]
    assert rcpt[3] == Statement("require", ("message = relay not permitted",
                                            "domains = +local_domains"))


def test_check_acl_order() -> None:
    report = Report(acl="acl_check_rcpt")
    rcpt = parse_acls(CONFIG)["acl_check_rcpt"]
    assert check_acl(rcpt, report) == "/run/rg.sock"
    assert report.problems == []
    moved = [rcpt[0], rcpt[3], rcpt[1], rcpt[2], rcpt[4]]
    report = Report(acl="acl_check_rcpt")
    check_acl(moved, report)
    assert len(report.problems) == 1 and "comes before relaygate's question" in \
        report.problems[0]
    # the question early, the accept after the relay check: still wrong
    report = Report(acl="acl_check_rcpt")
    check_acl([rcpt[0], rcpt[1], rcpt[3], rcpt[2], rcpt[4]], report)
    assert len(report.problems) == 1 and "before relaygate's accept" in report.problems[0]
