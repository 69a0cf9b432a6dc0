"""Throwaway Postfix and Dovecot instances on loopback, for tests and benchmarks.

Used by ``tests/integrations/postfix_dovecot`` (loaded by file path)
and by ``bench/postfix.py``. Everything lives under one temporary directory
that the Postfix and Dovecot users can traverse (pytest's own tmp dirs are
0700, which smtpd and the delivery agents cannot enter):

- Postfix: ``postfix -c DIR start-fg`` with main.cf built by ``postconf -e``
  (queue, data directory, log file and Maildirs under the root; mail for the
  test domain goes to Maildirs through ``virtual``; everything else is
  discarded, so nothing leaves the machine), master.cf from
  ``/usr/share/postfix/master.cf.dist`` with the port-25 listener replaced by
  loopback high ports, chroot off;
- Dovecot: ``dovecot -F -c FILE`` with a passwd-file, plaintext logins allowed
  (Dovecot 2.3 only trusts same-address connections as secure), its own
  ``log_path`` and optional post-login scripts for pop3 and imap.

Facts found the hard way are in docs/postfix-dovecot.md ("Testing").
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import poplib
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
DOVECOT = "/usr/sbin/dovecot"
MASTER_CF_DIST = "/usr/share/postfix/master.cf.dist"

#: The domain whose mail the test Postfix delivers into Maildirs.
LOCAL_DOMAIN = "example.test"
#: A domain that is not local: mail to it is a relay attempt.
REMOTE_DOMAIN = "remote.test"


def make_root(prefix: str) -> Path:
    """A fresh directory under /tmp that the postfix/dovecot users can traverse."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    return root


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_both() -> int:
    """A port free on both 127.0.0.1 and ::1 (for servers listening on both)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
                s.bind(("::1", port))
            return port
        except OSError:
            continue
    raise OSError("no port free on both 127.0.0.1 and ::1")


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _nobody() -> tuple[int, int]:
    import pwd

    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


class PostfixTestbed:
    """A private Postfix instance: ``configure()``, then ``start()``/``stop()``."""

    def __init__(self, root: Path, *, port: int, v6_port: int | None = None,
                 relay_restrictions: str = "", recipient_restrictions: str = "",
                 mynetworks: str = "127.0.0.1/32", users: Sequence[str] = ("alice",)) -> None:
        self.root = root
        self.etc = root / "etc"
        self.port = port
        self.v6_port = v6_port
        self.relay_restrictions = relay_restrictions
        self.recipient_restrictions = recipient_restrictions
        self.mynetworks = mynetworks
        self.users = tuple(users)
        self.log_file = root / "log" / "postfix.log"
        self.mail = root / "mail"
        self.proc: subprocess.Popen[bytes] | None = None

    def postconf(self, *args: str) -> str:
        out = subprocess.run([POSTCONF, "-c", str(self.etc), *args], check=True,
                             capture_output=True, text=True, timeout=30)
        if any(a.startswith(("-e", "-X", "-M", "-F", "-P")) for a in args):
            # Postfix re-reads a main.cf younger than a second until it "settles"
            # (1.5 s per command here); the tests' files are complete when written.
            past = time.time() - 5
            for name in ("main.cf", "master.cf"):
                os.utime(self.etc / name, (past, past))
        return out.stdout

    def set(self, **params: str) -> None:
        self.postconf("-e", *(f"{k}={v}" for k, v in params.items()))

    def configure(self) -> PostfixTestbed:
        self.etc.mkdir(parents=True, exist_ok=True)
        for sub in ("queue", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        self.mail.mkdir(exist_ok=True)
        uid, gid = _nobody()
        if os.geteuid() == 0:  # postconf alone (relaygate doctor tests) needs no root
            shutil.chown(data, "postfix")
            os.chown(self.mail, uid, gid)
        shutil.copy(MASTER_CF_DIST, self.etc / "master.cf")
        (self.etc / "main.cf").write_text("")
        (self.etc / "vmailbox").write_text(
            "".join(f"{u}@{LOCAL_DOMAIN} {LOCAL_DOMAIN}/{u}/\n" for u in self.users))
        self.set(
            compatibility_level="3.6",
            queue_directory=str(self.root / "queue"),
            data_directory=str(data),
            mail_owner="postfix",
            setgid_group="postdrop",
            # Without syslog Postfix's errors would vanish: log to a file (its
            # directory must be listed in maillog_file_prefixes).
            maillog_file=str(self.log_file),
            maillog_file_prefixes=str(self.root),
            inet_interfaces="loopback-only",
            inet_protocols="all",
            myhostname="mx.relaygate.test",
            mydomain="relaygate.test",
            mydestination="",
            mynetworks=self.mynetworks,
            # Local mailboxes without Unix accounts: virtual(8) into Maildirs.
            local_transport="virtual",
            virtual_mailbox_domains=LOCAL_DOMAIN,
            virtual_mailbox_base=str(self.mail),
            virtual_mailbox_maps=f"texthash:{self.etc / 'vmailbox'}",
            virtual_uid_maps=f"static:{uid}",
            virtual_gid_maps=f"static:{gid}",
            # Relayed mail must never leave the machine.
            default_transport="discard",
            relay_transport="discard",
            smtpd_peername_lookup="no",
            smtpd_relay_restrictions=self.relay_restrictions,
            smtpd_recipient_restrictions=self.recipient_restrictions,
            alias_maps="",
            alias_database="",
            biff="no",
            smtputf8_enable="no",
            # Tests provoke many 554s from one address; do not slow them down.
            smtpd_error_sleep_time="0",
            smtpd_soft_error_limit="1000",
            smtpd_hard_error_limit="1000",
            smtpd_junk_command_limit="1000",
        )
        self.postconf("-F", "*/*/chroot = n")
        self.postconf("-MX", "smtp/inet")
        self.postconf("-M", f"127.0.0.1:{self.port}/inet = 127.0.0.1:{self.port} inet n - n - - "
                            "smtpd")
        if self.v6_port is not None:
            self.postconf("-M", f"[::1]:{self.v6_port}/inet = [::1]:{self.v6_port} inet n - n "
                                "- - smtpd")
        return self

    def start(self) -> None:
        # "postfix check" creates the queue's subdirectories with the right owners.
        subprocess.run([POSTFIX, "-c", str(self.etc), "check"], check=True, timeout=60,
                       capture_output=True)
        self.proc = subprocess.Popen([POSTFIX, "-c", str(self.etc), "start-fg"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port("127.0.0.1", self.port)
            if self.v6_port is not None:
                wait_port("::1", self.v6_port)
        except OSError:
            self.stop()
            raise RuntimeError(f"Postfix did not start; see {self.log_file}:\n"
                               f"{self.log_tail()}") from None

    def reload(self) -> None:
        subprocess.run([POSTFIX, "-c", str(self.etc), "reload"], check=True, timeout=60,
                       capture_output=True)

    def stop(self) -> None:
        if self.proc is None:
            return
        subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], timeout=60,
                       capture_output=True, check=False)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def delivered(self, user: str) -> list[Path]:
        new = self.mail / LOCAL_DOMAIN / user / "new"
        return sorted(new.iterdir()) if new.is_dir() else []


class DovecotTestbed:
    """A private Dovecot (POP3 and IMAP) with a passwd-file and optional post-login hooks."""

    def __init__(self, root: Path, *, pop3_port: int, imap_port: int,
                 users: dict[str, str], postlogin: dict[str, Sequence[str]] | None = None,
                 listen: str = "127.0.0.1") -> None:
        self.root = root
        self.pop3_port = pop3_port
        self.imap_port = imap_port
        self.users = users
        #: protocol ("pop3", "imap") -> post-login command (script-login runs it)
        self.postlogin = dict(postlogin or {})
        self.listen = listen
        self.conf = root / "dovecot.conf"
        self.log_file = root / "dovecot.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def configure(self) -> DovecotTestbed:
        for sub in ("run", "state", "mail"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        uid, gid = _nobody()
        os.chown(self.root / "mail", uid, gid)
        (self.root / "users").write_text(
            "".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items()))
        hooks = ""
        for proto, command in self.postlogin.items():
            script = " ".join(command)
            hooks += (
                f"service {proto} {{\n  executable = {proto} {proto}-postlogin\n}}\n"
                f"service {proto}-postlogin {{\n"
                f"  executable = script-login {script}\n"
                f"  user = root\n"
                f"  unix_listener {proto}-postlogin {{\n  }}\n}}\n")
        self.conf.write_text(f"""\
base_dir = {self.root}/run
state_dir = {self.root}/state
instance_name = relaygate-test-{self.root.name}
protocols = pop3 imap
listen = {self.listen}
log_path = {self.log_file}
disable_plaintext_auth = no
auth_failure_delay = 0
auth_mechanisms = plain login
ssl = no
mail_location = maildir:{self.root}/mail/%u
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.root}/users
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={self.root}/mail/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
{hooks}""")
        return self

    def start(self) -> None:
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        host = self.listen.split(",")[0].strip()
        try:
            wait_port(host, self.pop3_port)
            wait_port(host, self.imap_port)
        except OSError:
            err = b""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read()
            self.stop()
            raise RuntimeError(f"Dovecot did not start: {err.decode(errors='replace')}\n"
                               f"{self.log_tail()}") from None

    def stop(self) -> None:
        if self.proc is None:
            return
        subprocess.run([DOVECOT, "-c", str(self.conf), "stop"], timeout=30,
                       capture_output=True, check=False)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def reopen_log(self) -> None:
        subprocess.run(["doveadm", "-c", str(self.conf), "log", "reopen"], check=True,
                       timeout=30, capture_output=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


# -- clients bound to a chosen source address ----------------------------------


class _SourcePOP3(poplib.POP3):
    def __init__(self, source: str, host: str, port: int, timeout: float = 10.0) -> None:
        self._source = source
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


class _SourceIMAP(imaplib.IMAP4):
    def __init__(self, source: str, host: str, port: int, timeout: float = 10.0) -> None:
        self._source = source
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


class _SourceSMTP(smtplib.SMTP):
    def __init__(self, source: str, host: str, port: int, timeout: float = 30.0) -> None:
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection((host, port), timeout, source_address=(self._source, 0))


def pop3_login(source: str, host: str, port: int, user: str, password: str) -> bytes:
    """Log in over POP3 from ``source``; returns the PASS reply (raises on failure)."""
    client = _SourcePOP3(source, host, port)
    try:
        client.user(user)
        reply = client.pass_(password)
        client.stat()
        client.quit()
        return reply
    finally:
        with contextlib.suppress(OSError):
            client.close()


def imap_login(source: str, host: str, port: int, user: str, password: str) -> str:
    """Log in over IMAP from ``source``; returns the LOGIN status (raises on failure)."""
    client = _SourceIMAP(source, host, port)
    try:
        typ, _ = client.login(user, password)
        client.select("INBOX")
        client.logout()
        return typ
    finally:
        with contextlib.suppress(OSError):
            client.shutdown()


def smtp_rcpt(source: str, host: str, port: int, rcpt: str, *,
              send: bool = False) -> tuple[int, str]:
    """One SMTP session from ``source``: MAIL, RCPT (and DATA if accepted and ``send``)."""
    client = _SourceSMTP(source, host, port)
    try:
        client.ehlo("client.relaygate.test")
        client.mail("sender@client.relaygate.test")
        code, msg = client.rcpt(rcpt)
        if code == 250 and send:
            client.data(b"Subject: relaygate test\r\n\r\nhello\r\n")
        client.quit()
        return code, msg.decode(errors="replace")
    finally:
        with contextlib.suppress(OSError):
            client.close()


@contextlib.contextmanager
def running(*servers: PostfixTestbed | DovecotTestbed) -> Iterator[None]:
    started: list[PostfixTestbed | DovecotTestbed] = []
    try:
        for s in servers:
            s.start()
            started.append(s)
        yield
    finally:
        for s in reversed(started):
            s.stop()
