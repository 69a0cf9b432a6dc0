"""The pattern tester: what each line did, and why near misses did not match."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from relaygate.integrations.logwatch import run_tester
from relaygate.protocols.loglines import LoginMatcher
from relaygate.protocols.logsessions import LoginTracker
from relaygate.protocols.logtester import explain, fits_up_to

M = LoginMatcher()


def say(line: bytes, matcher: LoginMatcher = M, tracker: LoginTracker | None = None) -> str:
    t = tracker or LoginTracker(refresh_every=450, max_session=0)
    return explain(matcher, line, t, now=0.0).render(1)


def test_a_login_says_pattern_address_and_user() -> None:
    out = say(b"Nov 28 02:56:49 mx dovecot: pop3-login: Login: user=<alice>, method=PLAIN, "
              b"rip=192.0.2.7, lip=192.0.2.1, mpid=1, session=<x>")
    assert out == ("1: login [dovecot] ip=192.0.2.7 user=alice service=pop3 -> window for "
                   "192.0.2.7\n")


def test_two_line_login_is_explained() -> None:
    t = LoginTracker(refresh_every=450, max_session=0)
    assert "remembered" in say(b"Jan  1 00:00:01 mx popa3d[5]: Session from 192.0.2.1", M, t)
    assert "-> window for 192.0.2.1" in say(
        b"Jan  1 00:00:02 mx popa3d[5]: Authentication passed for mo", M, t)
    assert "no connect line" in say(
        b"Jan  1 00:00:02 mx popa3d[6]: Authentication passed for mo", M, t)


def test_near_miss_says_where_the_shape_departs() -> None:
    out = say(b"Jan  1 00:00:07 mx dovecot: imap-login: Loginn: user=<x>, method=PLAIN, "
              b"rip=192.0.2.5, lip=192.0.2.1")
    assert "no match (dovecot)" in out
    assert "dovecot (login): the message departs from its shape at byte 17: 'n: user=" in out


def test_near_miss_wrong_daemon_tag() -> None:
    out = say(b"Jan  1 00:00:07 mx my-dovecot: imap-login: Login: user=<x>, method=PLAIN, "
              b"rip=192.0.2.5, lip=192.0.2.1")
    assert "dovecot: the message has its shape, but the tag 'my-dovecot'" in out
    assert "--pattern" in out


def test_near_miss_ambiguous_and_bad_address() -> None:
    out = say(b"Jan  1 00:00:07 mx dovecot: imap-login: Login: user=<x>, method=PLAIN, "
              b"rip=192.0.2.5, lip=192.0.2.1, rip=203.0.113.5")
    assert "'rip=' appears 2 times" in out
    out = say(b"Jan  1 00:00:07 mx dovecot: imap-login: Login: user=<x>, method=PLAIN, "
              b"rip=1.2.3.999, lip=192.0.2.1")
    assert "'1.2.3.999' is not an IP address" in out


def test_custom_pattern_that_matches_only_part_of_the_line() -> None:
    custom = LoginMatcher([], [r"p=Authentication passed for (?P<user>\S+) "
                               r"-- \[(?P<ip>[0-9.]+)\]"])
    out = say(b"Jan  1 00:00:00 mx popa3d[5]: Authentication passed for a -- [192.0.2.20]",
              custom)
    assert "p: matches only bytes 11-" in out and "must match all of it" in out
    fixed = LoginMatcher([], [r"p=popa3d\[\d+\]: Authentication passed for (?P<user>\S+) "
                              r"-- \[(?P<ip>[0-9.]+)\]"])
    out = say(b"Jan  1 00:00:00 mx popa3d[5]: Authentication passed for a -- [192.0.2.20]",
              fixed)
    assert out.startswith("1: login [p] ip=192.0.2.20 user=a")
    out = say(b"Jan  1 00:00:00 mx popa3d[5]: Authentication passed for a - [192.0.2.20]",
              fixed)
    assert "p: 'TAG[PID]: MESSAGE' departs from the pattern at byte 40: ' [192" in out


def test_lines_that_are_not_log_lines() -> None:
    assert "no log header" in say(b"hello world")
    assert "dropped: longer than" in say(b"x" * 9000)
    assert say(b"Jan  1 00:00:00 mx postfix/smtpd[1]: connect from x[192.0.2.1]") == \
        "1: no match (postfix/smtpd[1])\n"


def test_fits_up_to() -> None:
    p = M.patterns_for(b"dovecot")[0]
    msg = b"imap-login: Login: user=<x>, methox=PLAIN, rip=192.0.2.5, lip=192.0.2.1"
    assert fits_up_to(p, msg) == msg.index(b"methox") + len(b"metho")
    assert fits_up_to(p, msg[:10]) == 10


def test_run_tester_counts_and_summary(tmp_path: Path) -> None:
    lines = [b"Jan  1 00:00:01 mx popa3d[5]: Session from 192.0.2.1",
             b"Jan  1 00:00:02 mx popa3d[5]: Authentication passed for mo",
             b"Jan  1 00:00:07 mx dovecot: imap-login: Loginn: user=<x>, method=PLAIN, "
             b"rip=192.0.2.5, lip=192.0.2.1"]
    out = io.StringIO()
    summary = run_tester(lines, M, out)
    assert (summary.lines, summary.windows, summary.near_misses) == (3, 1, 1)
    assert out.getvalue().endswith("3 line(s), 1 would open a window, 1 near miss(es)\n")
    # the command: a file, and stdin (without a final newline)
    path = tmp_path / "mail.log"
    path.write_bytes(b"\n".join(lines) + b"\n")
    cmd = [sys.executable, "-m", "relaygate", "watch-log", "--test"]
    got = subprocess.run([*cmd, str(path)], capture_output=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stdout.decode() == out.getvalue()
    got = subprocess.run([*cmd, "-"], input=b"\n".join(lines), capture_output=True,
                         timeout=60)
    assert got.returncode == 0 and got.stdout.decode() == out.getvalue()
    got = subprocess.run([*cmd, str(tmp_path / "missing")], capture_output=True, timeout=60)
    assert got.returncode == 1 and b"missing" in got.stderr
    got = subprocess.run([sys.executable, "-m", "relaygate", "watch-log"],
                         capture_output=True, timeout=60)
    assert got.returncode == 2 and b"FILE" in got.stderr
