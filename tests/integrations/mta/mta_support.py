"""Helpers of the Exim, Sendmail and Postfix-socketmap tests.

Exim and Sendmail are not installed (their Debian packages conflict with Postfix):
``scripts/test`` unpacks them into ``$RELAYGATE_MTA_DIR`` (default
``/var/cache/relaygate-tests/mta``), where these helpers find them. Under
``RELAYGATE_REQUIRE_INTEGRATION=1`` a missing program fails the test.

Exim runs in host-checking mode (``-bh ADDRESS``: a whole SMTP session through the
ACLs on stdin, no daemon) or as a daemon on a free loopback port; Sendmail in
address-test mode (``-bt``) inside a private mount namespace whose /etc/hosts gives
this host a fully qualified name (without one Sendmail sleeps a minute at start).
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

TOP = Path(__file__).resolve().parents[3]
MTA_DIR = Path(os.environ.get("RELAYGATE_MTA_DIR", "/var/cache/relaygate-tests/mta"))
EXIM = MTA_DIR / "usr/sbin/exim4"
SENDMAIL = MTA_DIR / "usr/libexec/sendmail/sendmail"
SENDMAIL_CF = MTA_DIR / "usr/share/sendmail/cf"
DEPLOY = TOP / "deploy"
RELAYGATE = str(Path(sys.executable).with_name("relaygate"))

LOCAL_DOMAIN = "local.test"
REMOTE = "someone@remote.test"


def _load(name: str, path: Path) -> ModuleType:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_top = _load("relaygate_tests_top_conftest", TOP / "tests" / "conftest.py")
free_port = _top.free_port
have_ipv6_loopback = _top.have_ipv6_loopback


def need(path: Path, what: str) -> str:
    """``path`` if it is there; skip (fail under RELAYGATE_REQUIRE_INTEGRATION=1)."""
    if path.exists() and (path.is_dir() or os.access(path, os.X_OK)):
        return str(path)
    msg = f"{what} not unpacked at {path} (scripts/test does it)"
    if _top.REQUIRE_INTEGRATION:
        pytest.fail(f"{msg}; RELAYGATE_REQUIRE_INTEGRATION=1 forbids skipping")
    pytest.skip(msg)


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        if _top.REQUIRE_INTEGRATION:
            pytest.fail(f"{what} needs root")
        pytest.skip(f"{what} needs root")


# -- relaygate processes -------------------------------------------------------------


@dataclass
class Daemon:
    """A relaygate subprocess (policyd, socketmap, serve)."""

    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def start_relaygate(args: list[str], log: Path, *, port: int | None = None,
                    host: str = "127.0.0.1", path: Path | None = None) -> Daemon:
    """Start ``relaygate ARGS`` and wait until it listens on ``host:port`` or ``path``."""
    with open(log, "ab") as err:
        proc = subprocess.Popen([RELAYGATE, *args], stdout=subprocess.DEVNULL, stderr=err)
    daemon = Daemon(proc, log)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"relaygate {args} exited {proc.returncode}: {daemon.text()}")
        try:
            if path is not None:
                if path.exists():
                    break
            else:
                assert port is not None
                with socket.create_connection((host, port), timeout=1):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            daemon.stop()
            raise AssertionError(f"relaygate {args} did not listen: {daemon.text()}")
        time.sleep(0.05)
    return daemon


def allow(store: str, ip: str, ttl: int = 600) -> None:
    subprocess.run([RELAYGATE, "--store", store, "allow", ip, "--ttl", str(ttl)],
                   check=True, capture_output=True, timeout=60)


# -- Exim ------------------------------------------------------------------------------


def exim_config(root: Path, policy: str, *, extra_main: str = "", routers: str = "",
                include_acl: bool = True, timeout: str = "3s", late: bool = False) -> Path:
    """An Exim configuration shaped like Debian's acl_check_rcpt, with the shipped
    deploy/exim files included where docs/exim.md says (``late``: after the relay
    check, where Debian's CHECK_RCPT_LOCAL_ACL_FILE hook is: the mistake)."""
    spool = root / "spool"
    logs = root / "log"
    for d in (spool, logs):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o777)
    acl = f".include {DEPLOY / 'exim' / 'relaygate-rcpt.conf'}\n" if include_acl else ""
    early, late_acl = ("", acl) if late else (acl, "")
    conf = root / "exim.conf"
    conf.write_text(f"""\
RELAYGATE_POLICY = {policy}
RELAYGATE_TIMEOUT = {timeout}
.include {DEPLOY / 'exim' / 'relaygate-macros.conf'}
primary_hostname = mx.relaygate.test
# Exim re-executes itself to deliver: the unpacked binary, not /usr/sbin/exim4
exim_path = {EXIM}
domainlist local_domains = {LOCAL_DOMAIN}
domainlist relay_to_domains =
hostlist relay_from_hosts =
spool_directory = {spool}
log_file_path = {logs}/%slog
pid_file_path = {root}/exim.pid
keep_environment =
acl_smtp_rcpt = acl_check_rcpt
host_lookup =
rfc1413_hosts =
{extra_main}
begin acl

acl_check_rcpt:
  accept
    hosts = :
  accept
    hosts = +relay_from_hosts
    control = submission/sender_retain
  accept
    authenticated = *
    control = submission/sender_retain
{early}
  require
    message = relay not permitted
    domains = +local_domains : +relay_to_domains
{late_acl}
  accept

begin routers
{routers}
begin transports

sink_smtp:
  driver = smtp
  hosts_try_fastopen =
  allow_localhost

local_devnull:
  driver = appendfile
  file = /dev/null
  user = Debian-exim
""")
    return conf


def exim_bh(conf: Path, ip: str, rcpts: list[str], *, sender: str = "a@client.test",
            env: dict[str, str] | None = None) -> list[int]:
    """The reply codes to RCPT TO for each of ``rcpts`` in one ``exim -bh ip`` session."""
    exim = need(EXIM, "Exim")
    session = "EHLO client.test\r\n" + f"MAIL FROM:<{sender}>\r\n"
    session += "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts) + "QUIT\r\n"
    out = subprocess.run([exim, "-C", str(conf), "-bh", ip], input=session.encode(),
                         capture_output=True, timeout=120, env=env).stdout.decode(errors="replace")
    codes = [int(m.group(1)) for m in re.finditer(r"^(\d{3})[ -]", out, re.MULTILINE)
             if not m.group(0).endswith("-")]
    # 220 greeting, 250 EHLO (last line), 250 MAIL, then one per RCPT, 221 QUIT
    assert codes[:3] == [220, 250, 250] and codes[-1] == 221, out
    got = codes[3:-1]
    assert len(got) == len(rcpts), out
    return got


# -- Sendmail --------------------------------------------------------------------------


def sendmail_cf(root: Path, socketmap: str) -> Path:
    """sendmail.cf from a minimal .mc that includes deploy/sendmail/relaygate.mc."""
    cfdir = need(SENDMAIL_CF, "sendmail-cf")
    mc = root / "test.mc"
    mc.write_text(f"""\
divert(-1)
include(`{cfdir}/m4/cf.m4')
VERSIONID(`relaygate test')
OSTYPE(`linux')dnl
define(`confDOMAIN_NAME', `mx.relaygate.test')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confQUEUE_DIR', `{root}/mqueue')dnl
define(`confLOG_LEVEL', `0')dnl
MAILER(`local')dnl
MAILER(`smtp')dnl
define(`RELAYGATE_SOCKETMAP', `{socketmap}')dnl
include(`{DEPLOY / 'sendmail' / 'relaygate.mc'}')dnl
""")
    (root / "mqueue").mkdir(exist_ok=True)
    cf = root / "sendmail.cf"
    with open(cf, "wb") as out:
        subprocess.run(["m4", f"-D_CF_DIR_={cfdir}/", str(mc)], stdout=out, check=True,
                       timeout=60)
    return cf


def sendmail_bt(root: Path, cf: Path, lines: list[str]) -> str:
    """Run ``sendmail -bt`` with ``lines`` on stdin in a namespace where this host has a
    fully qualified name; returns the output."""
    need_root("Sendmail's address test mode in a private mount namespace")
    sendmail = need(SENDMAIL, "Sendmail")
    hosts = root / "hosts"
    name = socket.gethostname()
    hosts.write_text(f"127.0.0.1 localhost\n127.0.1.1 {name}.relaygate.test {name}\n"
                     "::1 localhost\n")
    script = f'mount --bind "{hosts}" /etc/hosts && exec "{sendmail}" -C "{cf}" -bt'
    out = subprocess.run(["unshare", "-m", "sh", "-c", script],
                         input="".join(f"{ln}\n" for ln in lines).encode(),
                         capture_output=True, timeout=60)
    return out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
