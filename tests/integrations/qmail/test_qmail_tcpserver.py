"""POP-before-SMTP the qmail way, end to end: the real Debian tcpserver and envdir running
a POP login stand-in through relay-ctrl-allow and an SMTP stand-in through
relay-ctrl-check; then the same scenario through ``relaygate tcpserver``."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import (
    BIN,
    Server,
    have_ipv6_loopback,
    need_program,
    parse_env,
    program,
    run,
    skip_or_fail,
    start_debian_tcpserver,
    start_relaygate_tcpserver,
    talk,
)

GOLDEN = b"USER=alice\0DOMAIN=example.org\0"

#: qmail-popup + checkpassword in four lines: "USER PASSWORD" on one line; the right
#: password sets $USER/$DOMAIN and runs the rest of the command line (relay-ctrl-allow ...).
POP_STANDIN = """#!/bin/sh
read -r user pass
if [ "$pass" = "secret" ]; then USER=$user DOMAIN=example.org; export USER DOMAIN; exec "$@"; fi
echo "-ERR authorization failed"; exit 1
"""

SMTP_RULES = '127.0.0.4:allow,RELAYCLIENT=""\n127.0.0.6:deny\n:allow\n'


def write_script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def standins(tmp_path: Path) -> dict[str, str]:
    need_program("envdir")
    rules = tmp_path / "smtp.rules"
    rules.write_text(SMTP_RULES)
    cdb = tmp_path / "smtp.cdb"
    subprocess.run([need_program("tcprules"), str(cdb), str(tmp_path / "smtp.tmp")],
                   input=SMTP_RULES.encode(), check=True)
    return {
        "pop": write_script(tmp_path / "pop-standin", POP_STANDIN),
        "cdb": str(cdb),
        "rules": str(rules),
    }


def pop_login(port: int, source: str, password: str = "secret",
              host: str = "127.0.0.1") -> bytes:
    return talk(port, source=source, host=host, send=f"alice {password}\n".encode())


def smtp_env(port: int, source: str, host: str = "127.0.0.1") -> dict[str, str]:
    return parse_env(talk(port, source=source, host=host))


def test_pop_then_smtp_under_debian_tcpserver_and_envdir(
    tmp_path: Path, spool: Path, envdir: Path, standins: dict[str, str], servers: list[Server],
) -> None:
    envdir_exe = need_program("envdir")
    pop = start_debian_tcpserver(
        [], [envdir_exe, str(envdir), standins["pop"], program("relay-ctrl-allow"),
             "sh", "-c", 'echo "+OK $USER"'], {}, tmp_path / "pop.log")
    smtp = start_debian_tcpserver(
        ["-x", standins["cdb"]], [envdir_exe, str(envdir), program("relay-ctrl-check"), "env"],
        {}, tmp_path / "smtp.log")
    servers += [pop, smtp]

    # 127.0.0.2 logs in; 127.0.0.3 gives a wrong password
    assert pop_login(pop.port, "127.0.0.2") == b"+OK alice\n"
    assert pop_login(pop.port, "127.0.0.3", password="wrong") == b"-ERR authorization failed\n"
    assert sorted(p.name for p in spool.iterdir()) == ["127.0.0.2"]
    assert (spool / "127.0.0.2").read_bytes() == GOLDEN
    assert stat.S_IMODE((spool / "127.0.0.2").stat().st_mode) == 0o600

    env = smtp_env(smtp.port, "127.0.0.2")
    assert env["TCPREMOTEIP"] == "127.0.0.2"
    assert env["RELAYCLIENT"] == ""
    assert (env["USER"], env["DOMAIN"]) == ("alice", "example.org")
    env = smtp_env(smtp.port, "127.0.0.3")
    assert env["TCPREMOTEIP"] == "127.0.0.3" and "RELAYCLIENT" not in env
    env = smtp_env(smtp.port, "127.0.0.4")  # the tcprules line, not a login
    assert env["RELAYCLIENT"] == "" and "USER" not in env
    assert smtp_env(smtp.port, "127.0.0.6") == {}  # denied by the rules

    # the window closes after RELAY_CTRL_EXPIRY (600 s in the envdir)
    t = time.time() - 700
    os.utime(spool / "127.0.0.2", (t, t))
    assert "RELAYCLIENT" not in smtp_env(smtp.port, "127.0.0.2")
    assert not (spool / "127.0.0.2").exists()

    log = smtp.stop()
    pop.stop()
    assert "relay-ctrl-check[" in log
    assert "]: IP 127.0.0.2 found, setting $RELAYCLIENT" in log
    assert "]: IP 127.0.0.3 not found" in log
    assert "]: $RELAYCLIENT already set, not checking IP" in log
    assert "]: Expired IP 127.0.0.2 found, removing" in log


def test_ipv6_client_through_envdir(spool: Path, envdir: Path) -> None:
    """Debian's tcpserver is IPv4 only: run the chain as it would for ::1."""
    envdir_exe = need_program("envdir")
    result = run([envdir_exe, str(envdir), program("relay-ctrl-allow"), "true"],
                 {"TCPREMOTEIP": "::1", "USER": "alice", "DOMAIN": "example.org"})
    assert result.returncode == 0, result.stderr
    assert (spool / "::1").read_bytes() == GOLDEN
    result = run([envdir_exe, str(envdir), program("relay-ctrl-check"), "env"],
                 {"TCPREMOTEIP": "::1"})
    env = parse_env(result.stdout)
    assert env["RELAYCLIENT"] == "" and env["USER"] == "alice"
    result = run([envdir_exe, str(envdir), program("relay-ctrl-check"), "env"],
                 {"TCPREMOTEIP": "::2"})
    assert "RELAYCLIENT" not in parse_env(result.stdout)


def test_same_scenario_through_relaygate_tcpserver(
    tmp_path: Path, spool: Path, envdir: Path, standins: dict[str, str], servers: list[Server],
) -> None:
    envdir_exe = need_program("envdir")
    hosts = "127.0.0.1,::1" if have_ipv6_loopback() else "127.0.0.1"
    relaygate = [envdir_exe, str(envdir), str(BIN / "relaygate")]
    pop, pop_ports = _start_rg(["--no-relay"], [standins["pop"], program("relay-ctrl-allow"),
                               "sh", "-c", 'echo "+OK $USER"'], envdir, tmp_path / "pop.log",
                               hosts, relaygate)
    smtp, smtp_ports = _start_rg(["-x", standins["cdb"]], ["/usr/bin/env"], envdir,
                                 tmp_path / "smtp.log", hosts, relaygate)
    servers += [pop, smtp]

    assert pop_login(pop.port, "127.0.0.2") == b"+OK alice\n"
    assert (spool / "127.0.0.2").read_bytes() == GOLDEN
    env = smtp_env(smtp.port, "127.0.0.2")
    assert env["RELAYCLIENT"] == "" and (env["USER"], env["DOMAIN"]) == ("alice", "example.org")
    assert (env["PROTO"], env["TCPREMOTEIP"], env["TCPLOCALIP"]) == ("TCP", "127.0.0.2",
                                                                     "127.0.0.1")
    assert env["TCPLOCALPORT"] == str(smtp.port) and env["TCPREMOTEPORT"].isdigit()
    assert env["TCPLOCALHOST"] == "0" and "TCPREMOTEHOST" not in env
    assert "RELAYCLIENT" not in smtp_env(smtp.port, "127.0.0.3")
    env = smtp_env(smtp.port, "127.0.0.4")
    assert env["RELAYCLIENT"] == "" and "USER" not in env
    assert smtp_env(smtp.port, "127.0.0.6") == {}
    if len(smtp_ports) > 1:
        assert "RELAYCLIENT" not in smtp_env(smtp_ports[1], "::1", host="::1")
        assert pop_login(pop_ports[1], "::1", host="::1") == b"+OK alice\n"
        assert (spool / "::1").read_bytes() == GOLDEN
        env = smtp_env(smtp_ports[1], "::1", host="::1")
        assert (env["PROTO"], env["TCPREMOTEIP"], env["RELAYCLIENT"]) == ("TCP6", "::1", "")
    t = time.time() - 700
    os.utime(spool / "127.0.0.2", (t, t))
    assert "RELAYCLIENT" not in smtp_env(smtp.port, "127.0.0.2")

    log = smtp.stop()
    assert "tcpserver: relay 127.0.0.2 allow: window opened by alice" in log
    assert "tcpserver: deny " in log and ":127.0.0.6::" in log


def _start_rg(args: list[str], prog: list[str], envdir: Path, log: Path, hosts: str,
              prefix: list[str]) -> tuple[Server, list[int]]:
    argv = [*prefix, "tcpserver", "-v", "-1", "-R", "-H", "-l", "0", *args, hosts, "0", *prog]
    out = log.with_suffix(".port")
    with open(log, "wb") as err, open(out, "wb") as stdout:
        proc = subprocess.Popen(argv, env={"PATH": os.environ["PATH"]}, stdout=stdout,
                                stderr=err)
    deadline = time.monotonic() + 30
    while not out.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"relaygate tcpserver did not start: {log.read_text()}")
        time.sleep(0.05)
    ports = [int(p) for p in out.read_text().split()]
    return Server(proc, ports[0], log), ports


def test_relaygate_tcpserver_store_failure_fails_closed(tmp_path: Path,
                                                        servers: list[Server]) -> None:
    server, _ = start_relaygate_tcpserver(
        [], ["/usr/bin/env"], {"RELAY_CTRL_DIR": str(tmp_path / "missing")},
        tmp_path / "log", host="127.0.0.1")
    servers.append(server)
    env = smtp_env(server.port, "127.0.0.2")
    assert env["TCPREMOTEIP"] == "127.0.0.2" and "RELAYCLIENT" not in env
    log = server.stop()
    assert "tcpserver: warning: not relaying for 127.0.0.2: grant store unreachable" in log


def test_relaygate_tcpserver_connection_limit(tmp_path: Path, spool: Path,
                                              servers: list[Server]) -> None:
    server, _ = start_relaygate_tcpserver(
        ["-c", "1"], ["sh", "-c", "echo start; cat >/dev/null; echo done"],
        {"RELAY_CTRL_DIR": str(spool)}, tmp_path / "log", host="127.0.0.1")
    servers.append(server)
    first = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    second = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    try:
        assert first.recv(100) == b"start\n"
        second.settimeout(1.0)
        with pytest.raises(TimeoutError):
            second.recv(100)  # queued by the kernel, not served while the first runs
        first.shutdown(socket.SHUT_WR)
        assert first.recv(100) == b"done\n"
        second.settimeout(20)
        assert second.recv(100) == b"start\n"
    finally:
        first.close()
        second.close()


def test_relaygate_tcpserver_text_rules_and_rule_variables(
    tmp_path: Path, spool: Path, servers: list[Server],
) -> None:
    rules = tmp_path / "rules.txt"
    rules.write_text('127.0.0.0/30:allow,RELAYCLIENT="@fixup",QMAILQUEUE="/bin/q"\n'
                     '127.0.0.9:deny\n:allow,DATABYTES="1000"\n')
    (spool / "127.0.0.5").write_bytes(b"USER=carol\0")
    server, _ = start_relaygate_tcpserver(
        ["-x", str(rules)], ["/usr/bin/env"],
        {"RELAY_CTRL_DIR": str(spool), "RELAY_CTRL_RELAYCLIENT": "@window"},
        tmp_path / "log", host="127.0.0.1")
    servers.append(server)
    env = smtp_env(server.port, "127.0.0.2")
    assert (env["RELAYCLIENT"], env["QMAILQUEUE"]) == ("@fixup", "/bin/q")
    env = smtp_env(server.port, "127.0.0.5")
    assert (env["RELAYCLIENT"], env["USER"], env["DATABYTES"]) == ("@window", "carol", "1000")
    assert smtp_env(server.port, "127.0.0.9") == {}


def test_relaygate_tcpserver_missing_rules_file_drops_connections(
    tmp_path: Path, servers: list[Server],
) -> None:
    server, _ = start_relaygate_tcpserver(
        ["-x", str(tmp_path / "none.cdb")], ["/usr/bin/env"], {}, tmp_path / "log",
        host="127.0.0.1")
    servers.append(server)
    assert talk(server.port, source="127.0.0.2") == b""
    allowed, _ = start_relaygate_tcpserver(
        ["-X", "-x", str(tmp_path / "none.cdb")], ["/usr/bin/env"], {}, tmp_path / "log2",
        host="127.0.0.1")
    servers.append(allowed)
    assert smtp_env(allowed.port, "127.0.0.2")["TCPREMOTEIP"] == "127.0.0.2"


# -- secure deployment ---------------------------------------------------------------------


def _interpreter_for(user: str, src: Path) -> str | None:
    """An interpreter the unprivileged user can run relaygate's chain code with."""
    setuidgid = need_program("setuidgid")
    for interp in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(
            [setuidgid, user, interp, "-IS", "-c",
             f"import sys; sys.path.insert(0, {str(src)!r}); "
             "import relaygate.integrations.qmail.check"],
            capture_output=True, check=False)
        if probe.returncode == 0:
            return interp
    return None


@pytest.fixture
def secure_layout() -> Iterator[tuple[Path, Path, Path]]:
    """/var/spool/relay-ctrl as the secure deployment has it, in a world-traversable temp dir:
    parent 0700 root, allow/ 0770 root:nogroup (the group of the unprivileged user)."""
    if os.geteuid() != 0:
        skip_or_fail("the privilege-drop deployment test needs root")
    base = Path(tempfile.mkdtemp(prefix="relaygate-secure-", dir="/tmp"))
    base.chmod(0o755)
    parent = base / "relay-ctrl"
    parent.mkdir(mode=0o700)
    allow = parent / "allow"
    allow.mkdir()
    os.chown(allow, 0, 65534)
    allow.chmod(0o770)
    yield base, parent, allow
    subprocess.run(["rm", "-rf", str(base)], check=False)


def test_secure_deployment_with_relay_ctrl_chdir(secure_layout: tuple[Path, Path, Path]) -> None:
    base, parent, allow = secure_layout
    setuidgid = need_program("setuidgid")
    import relaygate

    src = Path(relaygate.__file__).resolve().parent.parent
    interp = _interpreter_for("nobody", src)
    if interp is None:
        skip_or_fail("no Python interpreter here can be run by 'nobody'")
    bindir = base / "bin"
    bindir.mkdir()
    bindir.chmod(0o755)
    for name in ("allow", "check"):
        write_script(bindir / f"relay-ctrl-{name}",
                     f"#!{interp} -IS\nimport sys\nsys.path[:0] = [{str(src)!r}]\n"
                     f"from relaygate.integrations.qmail.{name} import main\nmain()\n")
    env = {"RELAY_CTRL_DIR": str(allow), "TCPREMOTEIP": "127.0.0.2", "USER": "alice"}

    # no directory anywhere is world-writable; the unprivileged user cannot reach the spool
    for d in (parent, allow):
        assert not d.stat().st_mode & stat.S_IWOTH
    assert stat.S_IMODE(parent.stat().st_mode) == 0o700
    planted = run([setuidgid, "nobody", "sh", "-c", f"echo USER=x > {allow}/127.0.0.9"], {})
    assert planted.returncode != 0 and not (allow / "127.0.0.9").exists()

    # without the descriptor the dropped-privilege login cannot record the window ...
    result = run([setuidgid, "nobody", str(bindir / "relay-ctrl-allow"), "true"], env)
    assert result.returncode == 0 and b"Could not record 127.0.0.2" in result.stderr
    assert list(allow.iterdir()) == []
    # ... with relay-ctrl-chdir (run as root, before setuidgid) it can
    result = run([program("relay-ctrl-chdir"), setuidgid, "nobody",
                  str(bindir / "relay-ctrl-allow"), "id", "-u"], env)
    assert result.stdout == b"65534\n", result.stderr
    assert (allow / "127.0.0.2").read_bytes() == b"USER=alice\0"
    assert (allow / "127.0.0.2").stat().st_uid == 65534
    # and the SMTP side, also unprivileged, reads it through the descriptor
    result = run([program("relay-ctrl-chdir"), setuidgid, "nobody",
                  str(bindir / "relay-ctrl-check"), "env"],
                 {"RELAY_CTRL_DIR": str(allow), "TCPREMOTEIP": "127.0.0.2"})
    env_out = parse_env(result.stdout)
    assert env_out.get("RELAYCLIENT") == "" and env_out.get("USER") == "alice", result.stderr


def test_relaygate_tcpserver_with_redis(tmp_path: Path, redis_server: object,
                                        servers: list[Server]) -> None:
    """The cluster set-up: relay-ctrl-allow on a POP host writes to Redis, the SMTP
    host's relaygate tcpserver reads it."""
    url = f"{redis_server.url}?prefix=qmail-tcpserver-test:"  # type: ignore[attr-defined]
    result = run([program("relay-ctrl-allow")],
                 {"TCPREMOTEIP": "127.0.0.2", "USER": "alice", "RELAYGATE_STORE": url})
    assert result.returncode == 0, result.stderr
    server, _ = start_relaygate_tcpserver([], ["/usr/bin/env"], {"RELAYGATE_STORE": url},
                                          tmp_path / "log", host="127.0.0.1")
    servers.append(server)
    env = smtp_env(server.port, "127.0.0.2")
    assert (env.get("RELAYCLIENT"), env.get("USER")) == ("", "alice")
    assert "RELAYCLIENT" not in smtp_env(server.port, "127.0.0.3")


def test_relaygate_tcpserver_under_relay_ctrl_chdir(tmp_path: Path, spool: Path,
                                                    servers: list[Server]) -> None:
    """relay-ctrl-chdir relaygate tcpserver ...: the decision uses the descriptor, and the
    program it runs gets neither the descriptor nor $RELAY_CTRL_DIR_FD."""
    (spool / "127.0.0.2").write_bytes(GOLDEN)
    argv = [program("relay-ctrl-chdir"), str(BIN / "relaygate"), "tcpserver", "-1", "-H",
            "-R", "-l", "0", "127.0.0.1", "0", "sh", "-c",
            'env; ls /proc/self/fd | tr "\\n" " "']
    log, out = tmp_path / "log", tmp_path / "port"
    with open(log, "wb") as err, open(out, "wb") as stdout:
        proc = subprocess.Popen(argv, env={"PATH": os.environ["PATH"],
                                           "RELAY_CTRL_DIR": str(spool)},
                                stdout=stdout, stderr=err)
    deadline = time.monotonic() + 30
    while not out.read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    servers.append(Server(proc, int(out.read_text().split()[0]), log))
    text = talk(servers[-1].port, source="127.0.0.2").decode()
    env = parse_env(text.encode())
    assert env.get("RELAYCLIENT") == "" and env.get("USER") == "alice"
    assert "RELAY_CTRL_DIR_FD" not in env
    fds = text.strip().splitlines()[-1].split()
    assert all(int(fd) < 10 for fd in fds), fds  # 0-2 and ls's own; no directory handle


def test_relaygate_tcpserver_start_up_errors(tmp_path: Path) -> None:
    relaygate = str(BIN / "relaygate")
    env = {"RELAY_CTRL_DIR": str(tmp_path)}
    result = run([relaygate, "tcpserver", "127.0.0.1", "0", "no-such-program-here"], env)
    assert result.returncode == 111 and b"program not found" in result.stderr
    # a path, as run scripts write it: refused at start too, as --help promises (issue 17)
    result = run([relaygate, "tcpserver", "127.0.0.1", "0", "/nonexistent/prog"], env)
    assert result.returncode == 111 and b"no such program: '/nonexistent/prog'" in result.stderr
    not_executable = tmp_path / "prog"
    not_executable.write_text("#!/bin/sh\n")
    result = run([relaygate, "tcpserver", "127.0.0.1", "0", str(not_executable)], env)
    assert result.returncode == 111 and b"not an executable file" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run([relaygate, "tcpserver", "127.0.0.1", str(port), "true"], env)
    assert result.returncode == 111 and b"unable to bind" in result.stderr
    result = run([relaygate, "tcpserver", "-U", "127.0.0.1", "0", "true"], env)
    assert result.returncode == 2 and b"envuidgid" in result.stderr
    result = run([relaygate, "tcpserver", "-u", "nobody", "127.0.0.1", "0", "true"], env)
    assert result.returncode == 2 and b"numeric" in result.stderr
    # $RELAY_CTRL_DIR_FD that is not an open directory: one line naming it, exit 111
    result = run([relaygate, "tcpserver", "127.0.0.1", "0", "true"],
                 {"RELAY_CTRL_DIR_FD": "57"})
    assert result.returncode == 111, result.stderr
    assert b"$RELAY_CTRL_DIR_FD is not an open descriptor" in result.stderr
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["1e3", "30s", "abc", "-5", "0", "99999999999999999999"])
def test_relaygate_tcpserver_refuses_a_bad_expiry(tmp_path: Path, value: str) -> None:
    # From the environment (daemontools envdir) or from --envdir: one line naming the
    # variable or the file and the value, exit 111, nothing listening.
    relaygate = str(BIN / "relaygate")
    result = run([relaygate, "tcpserver", "127.0.0.1", "0", "true"],
                 {"RELAY_CTRL_DIR": str(tmp_path), "RELAY_CTRL_EXPIRY": value})
    assert result.returncode == 111, result.stderr
    assert result.stderr.decode() == (
        "relaygate: configuration error: $RELAY_CTRL_EXPIRY: expiry: must be a whole number "
        f"of seconds from 1 to 31536000: {value!r}\n")
    envdir = tmp_path / "env"
    envdir.mkdir()
    (envdir / "RELAY_CTRL_DIR").write_text(f"{tmp_path}\n")
    (envdir / "RELAY_CTRL_EXPIRY").write_text(f"{value}\n")
    result = run([relaygate, "--envdir", str(envdir), "tcpserver", "127.0.0.1", "0", "true"], {})
    assert result.returncode == 111, result.stderr
    assert result.stderr.decode() == (
        f"relaygate: configuration error: {envdir / 'RELAY_CTRL_EXPIRY'}:1: expiry: must be a "
        f"whole number of seconds from 1 to 31536000: {value!r}\n")
