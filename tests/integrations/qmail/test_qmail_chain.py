"""The installed relay-ctrl-* programs, run directly with the environment tcpserver,
envdir and checkpassword would give them."""

from __future__ import annotations

import os
import re
import stat
import sys
import time
from pathlib import Path

import pytest

from .helpers import PROGRAMS, free_port, parse_env, program, run

GOLDEN = b"USER=alice\0DOMAIN=example.org\0"


def allow(spool: Path, ip: str, **env: str) -> bytes:
    result = run([program("relay-ctrl-allow"), "true"],
                 {"TCPREMOTEIP": ip, "RELAY_CTRL_DIR": str(spool), **env})
    assert result.returncode == 0, result.stderr
    return result.stderr


def check(spool: Path | None, ip: str | None, **env: str) -> tuple[dict[str, str], str, int]:
    """relay-ctrl-check env: (the environment qmail-smtpd would get, stderr, exit code)."""
    full = dict(env)
    if spool is not None:
        full["RELAY_CTRL_DIR"] = str(spool)
    if ip is not None:
        full["TCPREMOTEIP"] = ip
    result = run([program("relay-ctrl-check"), "env"], full)
    return parse_env(result.stdout), result.stderr.decode(), result.returncode


def age_file(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# -- installation -----------------------------------------------------------------


@pytest.mark.parametrize("name", PROGRAMS)
def test_scripts_start_python_isolated_without_wrapper(name: str) -> None:
    first, *rest = Path(program(name)).read_text().splitlines()
    interpreter, _, flags = first[2:].partition(" ")
    assert first.startswith("#!/") and flags == "-IS", first
    assert os.access(interpreter, os.X_OK)
    body = "\n".join(rest)
    assert "import re" not in body and "importlib" not in body and "entry_points" not in body


@pytest.mark.parametrize("name", PROGRAMS)
def test_help_is_a_manual_page(name: str) -> None:
    result = run([program(name), "--help"], {})
    assert result.returncode == 0
    page = result.stdout.decode()
    for section in ("NAME", "SYNOPSIS", "ENVIRONMENT", "DESCRIPTORS", "EXIT CODES"):
        assert f"\n{section}\n" in f"\n{page}", (name, section)
    assert name in page


# -- relay-ctrl-allow ------------------------------------------------------------------


def test_allow_writes_relay_ctrl_spool_bytes(spool: Path) -> None:
    before = time.time()
    allow(spool, "127.0.0.2", USER="alice", DOMAIN="example.org")
    f = spool / "127.0.0.2"
    assert f.read_bytes() == GOLDEN
    st = f.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert before - 1 <= st.st_mtime <= time.time() + 1
    assert [p.name for p in spool.iterdir()] == ["127.0.0.2"]  # temp file renamed away
    allow(spool, "127.0.0.3", USER="bob")
    assert (spool / "127.0.0.3").read_bytes() == b"USER=bob\0"
    allow(spool, "127.0.0.4")
    assert (spool / "127.0.0.4").read_bytes() == b""


def test_allow_ipv6_and_mapped_addresses(spool: Path) -> None:
    allow(spool, "::1", USER="v6")
    allow(spool, "::ffff:127.0.0.9", USER="mapped")
    allow(spool, "2001:DB8:0:0::1", USER="long")
    assert (spool / "::1").read_bytes() == b"USER=v6\0"
    assert (spool / "127.0.0.9").read_bytes() == b"USER=mapped\0"
    assert (spool / "2001:db8::1").read_bytes() == b"USER=long\0"


@pytest.mark.parametrize("ip", [None, "", "../x", "1.2.3.4/24", "example.org", "1.2.3.4 "])
def test_allow_refuses_a_missing_or_bad_address(spool: Path, ip: str | None) -> None:
    env = {"RELAY_CTRL_DIR": str(spool)}
    if ip is not None:
        env["TCPREMOTEIP"] = ip
    result = run([program("relay-ctrl-allow"), "true"], env)
    assert result.returncode == 111
    if not ip:  # not run from tcpserver at all: relay-ctrl's own words
        assert re.fullmatch(rb"relay-ctrl-allow\[\d+\]: Fatal: Must be run from tcp-env or "
                            rb"tcpserver\.\n", result.stderr)
    else:  # tcpserver ran it with a value that is no address: say that (issue 17)
        assert re.fullmatch(rb"relay-ctrl-allow\[\d+\]: Fatal: Invalid \$TCPREMOTEIP '"
                            + re.escape(ip.encode()) + rb"': not an IPv4 or IPv6 address\.\n",
                            result.stderr), result.stderr
    assert list(spool.iterdir()) == []
    assert list(spool.parent.iterdir()) == [spool]


def test_allow_chains_and_without_program_exits_zero(spool: Path) -> None:
    env = {"TCPREMOTEIP": "127.0.0.2", "RELAY_CTRL_DIR": str(spool)}
    assert run([program("relay-ctrl-allow")], env).returncode == 0
    result = run([program("relay-ctrl-allow"), "sh", "-c", "echo chained; exit 7"], env)
    assert (result.returncode, result.stdout) == (7, b"chained\n")


def test_allow_store_failure_still_logs_in(tmp_path: Path) -> None:
    result = run([program("relay-ctrl-allow"), "echo", "mail for you"],
                 {"TCPREMOTEIP": "127.0.0.2", "RELAY_CTRL_DIR": str(tmp_path / "missing")})
    assert (result.returncode, result.stdout) == (0, b"mail for you\n")
    assert b"Warning: Could not record 127.0.0.2" in result.stderr


def test_courier_mode(spool: Path) -> None:
    courier = {"AUTHUSER": "/usr/lib/courier/authlib/authdaemon", "AUTHARGV0": "imapd",
               "USER": "alice"}
    allow(spool, "127.0.0.2", **courier)
    allow(spool, "127.0.0.3", **courier, AUTHENTICATED="")
    assert list(spool.iterdir()) == []
    allow(spool, "127.0.0.4", **courier, AUTHENTICATED="alice")
    assert (spool / "127.0.0.4").read_bytes() == b"USER=alice\0"
    # AUTHUSER alone is not Courier: the caller vouches for the login
    allow(spool, "127.0.0.5", AUTHUSER="x", USER="bob")
    assert (spool / "127.0.0.5").exists()


# -- relay-ctrl-check -------------------------------------------------------------------


def test_check_sets_relayclient_and_exports_user_domain(spool: Path) -> None:
    (spool / "127.0.0.2").write_bytes(GOLDEN)
    env, err, rc = check(spool, "127.0.0.2", RELAY_CTRL_LOG_IPS="1")
    assert rc == 0
    assert env["RELAYCLIENT"] == ""
    assert (env["USER"], env["DOMAIN"]) == ("alice", "example.org")
    assert re.fullmatch(r"relay-ctrl-check\[\d+\]: IP 127\.0\.0\.2 found, setting \$RELAYCLIENT\n",
                        err)
    env, _, _ = check(spool, "127.0.0.2", RELAY_CTRL_RELAYCLIENT="@fixup")
    assert env["RELAYCLIENT"] == "@fixup"


def test_check_log_env(spool: Path) -> None:
    (spool / "127.0.0.2").write_bytes(GOLDEN)
    _, err, _ = check(spool, "127.0.0.2", RELAY_CTRL_LOG_ENV="1")
    assert re.search(r"relay-ctrl-check\[\d+\]: Setting USER=alice\n", err)
    assert re.search(r"relay-ctrl-check\[\d+\]: Setting DOMAIN=example.org\n", err)


def test_check_unknown_client_does_not_relay(spool: Path) -> None:
    (spool / "127.0.0.2").write_bytes(GOLDEN)
    env, err, rc = check(spool, "127.0.0.3", RELAY_CTRL_LOG_IPS="1")
    assert rc == 0 and "RELAYCLIENT" not in env and "USER" not in env
    assert re.fullmatch(r"relay-ctrl-check\[\d+\]: IP 127\.0\.0\.3 not found\n", err)
    env, err, _ = check(spool, "127.0.0.3")
    assert err == ""


def test_check_expiry(spool: Path) -> None:
    f = spool / "127.0.0.2"
    f.write_bytes(GOLDEN)
    age_file(f, 500)
    env, _, _ = check(spool, "127.0.0.2", RELAY_CTRL_EXPIRY="600")
    assert "RELAYCLIENT" in env
    age_file(f, 700)
    env, err, _ = check(spool, "127.0.0.2", RELAY_CTRL_EXPIRY="600", RELAY_CTRL_LOG_IPS="1")
    assert "RELAYCLIENT" not in env
    assert "Expired IP 127.0.0.2 found, removing" in err
    assert not f.exists()


#: $RELAY_CTRL_EXPIRY values relay-ctrl read as 1 s (1e3), 30 s (30s), 900 s (abc, -5,
#: 0, empty) or an absurd window (the huge one): each is a configuration error now
BAD_EXPIRY = ["1e3", "30s", "abc", "-5", "0", "99999999999999999999", "", "+600", "2.5",
              "31536001"]


@pytest.mark.parametrize("value", BAD_EXPIRY)
def test_check_bad_expiry_closes_every_window_but_runs_the_program(spool: Path,
                                                                   value: str) -> None:
    f = spool / "127.0.0.2"
    f.write_bytes(GOLDEN)
    age_file(f, 10)  # open under any sane expiry
    env, err, rc = check(spool, "127.0.0.2", RELAY_CTRL_EXPIRY=value)
    assert rc == 0 and env["TCPREMOTEIP"] == "127.0.0.2"  # qmail-smtpd (env) still ran
    assert "RELAYCLIENT" not in env and "USER" not in env
    assert re.fullmatch(
        rf"relay-ctrl-check\[\d+\]: Warning: \$RELAY_CTRL_EXPIRY '{re.escape(value)}' must be "
        r"a whole number of seconds from 1 to 31536000: every relay window counts as closed, "
        r"not setting \$RELAYCLIENT\n", err), err
    assert f.exists()  # nothing removed on the strength of a bad setting


@pytest.mark.parametrize("value", ["600", " 600 ", "0600", "31536000"])
def test_check_plain_integers_keep_relay_ctrls_meaning(spool: Path, value: str) -> None:
    f = spool / "127.0.0.2"
    f.write_bytes(GOLDEN)
    age_file(f, 590)
    env, err, _ = check(spool, "127.0.0.2", RELAY_CTRL_EXPIRY=value)
    assert "RELAYCLIENT" in env and err == ""
    if value.strip() in ("600", "0600"):
        age_file(f, 610)
        assert "RELAYCLIENT" not in check(spool, "127.0.0.2", RELAY_CTRL_EXPIRY=value)[0]


def test_check_unset_expiry_is_900(spool: Path) -> None:
    f = spool / "127.0.0.2"
    f.write_bytes(GOLDEN)
    age_file(f, 890)
    assert "RELAYCLIENT" in check(spool, "127.0.0.2")[0]
    age_file(f, 910)
    assert "RELAYCLIENT" not in check(spool, "127.0.0.2")[0]


@pytest.mark.parametrize("value", BAD_EXPIRY)
def test_allow_bad_expiry_records_nothing_but_runs_the_program(spool: Path,
                                                               value: str) -> None:
    result = run([program("relay-ctrl-allow"), "echo", "pop3d ran"],
                 {"TCPREMOTEIP": "127.0.0.2", "RELAY_CTRL_DIR": str(spool),
                  "RELAY_CTRL_EXPIRY": value, "USER": "alice"})
    assert result.returncode == 0 and result.stdout == b"pop3d ran\n"
    assert list(spool.iterdir()) == []
    err = result.stderr.decode()
    assert re.fullmatch(
        rf"relay-ctrl-allow\[\d+\]: Warning: \$RELAY_CTRL_EXPIRY '{re.escape(value)}' must be "
        r"a whole number of seconds from 1 to 31536000: not recording 127\.0\.0\.2\n", err), err


def test_allow_longest_expiry_leaves_the_file_time_now(spool: Path) -> None:
    # The file time is expires_at - expiry: with the longest window it must still be
    # "now", never in the past (relay-ctrl's absurd values ended 16 minutes back).
    before = time.time()
    allow(spool, "127.0.0.2", RELAY_CTRL_EXPIRY="31536000", USER="alice")
    mtime = (spool / "127.0.0.2").stat().st_mtime
    assert before - 0.01 <= mtime <= time.time() + 0.01
    env, _, _ = check(spool, "127.0.0.2", RELAY_CTRL_EXPIRY="31536000")
    assert "RELAYCLIENT" in env


@pytest.mark.parametrize("name", ["relay-ctrl-age", "relay-ctrl-udp"])
@pytest.mark.parametrize("value", ["1e3", "abc", "0", "99999999999999999999"])
def test_age_and_udp_refuse_a_bad_expiry(spool: Path, name: str, value: str) -> None:
    (spool / "127.0.0.2").write_bytes(GOLDEN)
    age_file(spool / "127.0.0.2", 5000)
    result = run([program(name)], {"RELAY_CTRL_DIR": str(spool), "RELAY_CTRL_EXPIRY": value,
                                   "RELAY_CTRL_PORT": str(free_port())}, timeout=10)
    assert result.returncode == 111
    assert re.fullmatch(rf"{name}: Fatal: \$RELAY_CTRL_EXPIRY '{re.escape(value)}' must be a "
                        r"whole number of seconds from 1 to 31536000\n",
                        result.stderr.decode()), result.stderr
    assert (spool / "127.0.0.2").exists()  # age removed nothing


def test_check_does_nothing_when_relayclient_is_set(spool: Path) -> None:
    (spool / "127.0.0.2").write_bytes(b"USER=alice\0")
    env, err, _ = check(spool, "127.0.0.2", RELAYCLIENT="@rule", RELAY_CTRL_LOG_IPS="1")
    assert env["RELAYCLIENT"] == "@rule" and "USER" not in env
    assert re.fullmatch(r"relay-ctrl-check\[\d+\]: \$RELAYCLIENT already set, not checking IP\n",
                        err)


def test_planted_spool_file_exports_only_user_and_domain(spool: Path) -> None:
    (spool / "127.0.0.2").write_bytes(
        b"LD_PRELOAD=/tmp/evil.so\0RELAYCLIENT=@evil.example\0QMAILQUEUE=/tmp/evil\0"
        b"PATH=/tmp\0USER=mallory\0DOMAIN=evil.example\0")
    env, err, rc = check(spool, "127.0.0.2")
    assert rc == 0
    assert env["RELAYCLIENT"] == ""  # $RELAY_CTRL_RELAYCLIENT's, not the file's
    assert "LD_PRELOAD" not in env and "QMAILQUEUE" not in env
    assert env["PATH"] != "/tmp"
    assert (env["USER"], env["DOMAIN"]) == ("mallory", "evil.example")
    assert "Warning: spool file for 127.0.0.2 also sets LD_PRELOAD, RELAYCLIENT, QMAILQUEUE, " \
           "PATH: ignored" in err


def test_check_refuses_a_path_before_opening_anything(spool: Path) -> None:
    outside = spool.parent / "x"
    outside.write_bytes(b"USER=intruder\0")
    env, err, rc = check(spool, "../x")
    assert rc == 0 and "RELAYCLIENT" not in env and "USER" not in env
    assert "Warning: $TCPREMOTEIP '../x' is not an IP address, not checking IP" in err
    age_file(outside, 5000)
    check(spool, "../x")
    assert outside.exists()  # the C program would have unlinked this "expired" file


def test_check_ipv6_clients(spool: Path) -> None:
    (spool / "2001:db8::1").write_bytes(b"USER=six\0")
    (spool / "127.0.0.2").write_bytes(b"USER=four\0")
    assert check(spool, "2001:0DB8:0:0:0:0:0:1")[0].get("USER") == "six"
    assert check(spool, "::ffff:127.0.0.2")[0].get("USER") == "four"
    assert "RELAYCLIENT" not in check(spool, "::1")[0]


def test_check_store_failure_fails_closed_and_still_runs(tmp_path: Path) -> None:
    env, err, rc = check(tmp_path / "missing", "127.0.0.2")
    assert rc == 0 and "PATH" in env and "RELAYCLIENT" not in env
    assert re.search(r"relay-ctrl-check\[\d+\]: Warning: grant store unusable, not setting "
                     r"\$RELAYCLIENT for 127\.0\.0\.2: .*missing", err)
    env, err, rc = check(None, "127.0.0.2", RELAYGATE_STORE="bogus://x")
    assert rc == 0 and "RELAYCLIENT" not in env and "grant store unusable" in err
    env, err, rc = check(None, "127.0.0.2")
    assert rc == 0 and "RELAYCLIENT" not in env and "$RELAY_CTRL_DIR is not set" in err


def test_check_with_redis_down_fails_closed() -> None:
    env, err, rc = check(None, "127.0.0.2",
                         RELAYGATE_STORE=f"redis://127.0.0.1:{free_port()}/0")
    assert rc == 0 and "PATH" in env and "RELAYCLIENT" not in env
    assert "grant store unusable" in err


def test_sqlite_store_through_the_chain(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'grants.db'}"
    result = run([program("relay-ctrl-allow")],
                 {"TCPREMOTEIP": "::1", "USER": "alice", "RELAYGATE_STORE": url})
    assert result.returncode == 0, result.stderr
    env, err, _ = check(None, "::1", RELAYGATE_STORE=url)
    assert env.get("RELAYCLIENT") == "" and env.get("USER") == "alice", err
    assert "RELAYCLIENT" not in check(None, "127.0.0.2", RELAYGATE_STORE=url)[0]


def test_check_usage_and_exec_failure(spool: Path) -> None:
    result = run([program("relay-ctrl-check")], {})
    assert result.returncode == 1
    assert re.fullmatch(rb"relay-ctrl-check\[\d+\]: Fatal: usage: relay-ctrl-check program "
                        rb"\[arguments\]\n", result.stderr)
    result = run([program("relay-ctrl-check"), "no-such-program-here"],
                 {"TCPREMOTEIP": "127.0.0.2", "RELAY_CTRL_DIR": str(spool)})
    assert result.returncode == 111
    assert b"Fatal: execution of program failed!" in result.stderr


def test_check_keeps_descriptors_and_environment(spool: Path, tmp_path: Path) -> None:
    (spool / "127.0.0.2").write_bytes(GOLDEN)
    extra = tmp_path / "extra"
    extra.write_text("through fd 5\n")
    fd = os.open(extra, os.O_RDONLY)  # a descriptor like Courier's pipe on 3
    try:
        result = run([program("relay-ctrl-check"), "sh", "-c", f"cat /dev/fd/{fd}; echo $KEEP"],
                     {"TCPREMOTEIP": "127.0.0.2", "RELAY_CTRL_DIR": str(spool), "KEEP": "me"},
                     pass_fds=(fd,))
    finally:
        os.close(fd)
    assert result.stdout == b"through fd 5\nme\n"


def test_no_locale_added_to_the_environment(spool: Path) -> None:
    env, _, _ = check(spool, "127.0.0.2")
    assert "LC_CTYPE" not in env and "LC_ALL" not in env
    env, _, _ = check(spool, "127.0.0.2", LC_CTYPE="C")
    assert env["LC_CTYPE"] == "C"


# -- relay-ctrl-chdir -------------------------------------------------------------------


def test_chdir_hands_the_spool_down_as_a_descriptor(spool: Path) -> None:
    env = {"RELAY_CTRL_DIR": str(spool), "TCPREMOTEIP": "127.0.0.2", "USER": "alice"}
    result = run([program("relay-ctrl-chdir"), "sh", "-c",
                  'echo "$RELAY_CTRL_DIR_FD"; test -d /proc/self/fd/$RELAY_CTRL_DIR_FD && '
                  'echo open'], env)
    fd_text, state = result.stdout.decode().split()
    assert 10 <= int(fd_text) <= 255 and state == "open"
    # allow through the descriptor: relay-ctrl's mode 0666, and the descriptor is closed
    # before the POP server runs
    result = run([program("relay-ctrl-chdir"), program("relay-ctrl-allow"), "sh", "-c",
                  'test -e /proc/self/fd/$RELAY_CTRL_DIR_FD && echo leaked || echo closed'],
                 env)
    assert result.stdout == b"closed\n", result.stderr
    assert stat.S_IMODE((spool / "127.0.0.2").stat().st_mode) == 0o666
    result = run([program("relay-ctrl-chdir"), program("relay-ctrl-check"), "env"],
                 {"RELAY_CTRL_DIR": str(spool), "TCPREMOTEIP": "127.0.0.2"})
    assert parse_env(result.stdout).get("USER") == "alice"


def test_chdir_errors(tmp_path: Path) -> None:
    chdir = program("relay-ctrl-chdir")
    assert run([chdir], {"RELAY_CTRL_DIR": str(tmp_path)}).returncode == 1
    result = run([chdir, "true"], {})
    assert result.returncode == 111 and b"$RELAY_CTRL_DIR is not set." in result.stderr
    (tmp_path / "file").write_text("")
    assert run([chdir, "true"], {"RELAY_CTRL_DIR": str(tmp_path / "file")}).returncode == 111
    assert run([chdir, "true"], {"RELAY_CTRL_DIR": str(tmp_path / "none")}).returncode == 111
    public = tmp_path / "public"
    public.mkdir()
    public.chmod(0o1777)
    result = run([chdir, "true"], {"RELAY_CTRL_DIR": str(public)})
    assert result.returncode == 0 and b"world-writable" in result.stderr


# -- relay-ctrl-age ---------------------------------------------------------------------


def test_age_removes_expired_entries_and_temp_files(spool: Path) -> None:
    for name, old in (("127.0.0.2", False), ("127.0.0.3", True),
                      (".1700000000.1:99", True), (".1700000000.2:99", False)):
        (spool / name).write_bytes(b"USER=x\0")
        if old:
            age_file(spool / name, 700)
    result = run([program("relay-ctrl-age")],
                 {"RELAY_CTRL_DIR": str(spool), "RELAY_CTRL_EXPIRY": "600"})
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert sorted(p.name for p in spool.iterdir()) == [".1700000000.2:99", "127.0.0.2"]


def test_age_without_spool_exits_1(tmp_path: Path) -> None:
    result = run([program("relay-ctrl-age")], {})
    assert result.returncode == 1 and b"relay-ctrl-age: Fatal: $RELAY_CTRL_DIR is not set." \
        in result.stderr
    result = run([program("relay-ctrl-age")], {"RELAY_CTRL_DIR": str(tmp_path / "none")})
    assert result.returncode == 1


def test_programs_run_without_site_packages() -> None:
    """The check path must not need anything site would add (the script inserts the path)."""
    result = run([program("relay-ctrl-check"), sys.executable, "-c",
                  "import os; print(os.environ.get('RELAYCLIENT', 'unset'))"],
                 {"TCPREMOTEIP": "127.0.0.2", "RELAY_CTRL_DIR": "/nonexistent"})
    assert result.stdout == b"unset\n"


def test_redis_store_shared_by_two_hosts(redis_server: object) -> None:
    """A login on the POP host, a lookup on the SMTP host: one Redis between them."""
    url = f"{redis_server.url}?prefix=qmail-chain-test:"  # type: ignore[attr-defined]
    result = run([program("relay-ctrl-allow")],
                 {"TCPREMOTEIP": "2001:db8::7", "USER": "alice", "DOMAIN": "example.org",
                  "RELAYGATE_STORE": url})
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    env, err, _ = check(None, "2001:db8:0::7", RELAYGATE_STORE=url)
    assert (env.get("RELAYCLIENT"), env.get("USER"), env.get("DOMAIN")) == (
        "", "alice", "example.org"), err
    assert "RELAYCLIENT" not in check(None, "2001:db8::8", RELAYGATE_STORE=url)[0]
    result = run([program("relay-ctrl-age")], {"RELAYGATE_STORE": url})
    assert result.returncode == 0, result.stderr
