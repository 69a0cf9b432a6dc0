"""``relaygate doctor exim``: does the running Exim ask relaygate before its relay check?

Theory of operation
-------------------
Exim runs the RCPT ACL (``acl_smtp_rcpt``) statement by statement; the first
``accept``, ``deny``, ``defer`` or ``require`` that decides ends it. Relaying is
refused by a statement that insists on a local (or relay) domain: Debian's

    require
      message = relay not permitted
      domains = +local_domains : +relay_to_domains

So relaygate's question (a ``${readsocket}`` sending ``smtpd_access_policy``, as
in deploy/exim/relaygate-rcpt.conf) and the ``accept`` that acts on its answer
must both come before that statement. The doctor reads the configuration Exim
itself runs: ``exim -bV`` names the file, ``exim -bP acl_smtp_rcpt`` the ACL,
``exim -bP exim_user exim_group`` the user the ACL runs as, and ``exim -bP
config`` the whole configuration with includes and macros expanded and
continuation lines joined.

Then the socket: a UNIX socket must be writable by the Exim user (and every
directory above it searchable); a TCP endpoint must accept a connection.
Last, a real session: ``exim -bh ADDRESS`` runs an SMTP dialogue through the
ACLs without a daemon; a recipient in a remote domain must be accepted for an
address with an open window and refused for a stranger.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relaygate.addresses import parse_ip
from relaygate.control import RelayControl
from relaygate.errors import RelaygateError, StoreError

#: Seconds one exim invocation may take. A ``-bh`` session may wait for reverse DNS
#: and for the policy service's own timeout.
EXIM_TIMEOUT = 60.0
#: Seconds to wait for a TCP connection to the policy service.
CONNECT_TIMEOUT = 5.0

#: ACL verbs (Exim spec, "Format of an ACL").
VERBS = frozenset({"accept", "defer", "deny", "discard", "drop", "require", "warn"})

#: The recipient of the test session: a remote domain, so only a relay grant accepts it.
TEST_RECIPIENT = "relaygate-doctor@relaygate-doctor.invalid"

_READSOCKET = re.compile(r"\$\{readsocket\{([^}]*)\}")


class EximDoctorError(RelaygateError):
    """Exim could not be run, or gave output we cannot read."""


@dataclass(frozen=True)
class Statement:
    """One ACL statement: its verb and its condition/modifier lines."""

    verb: str
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def describe(self) -> str:
        first = next((ln for ln in self.lines if ln), "")
        return f"{self.verb} {first}".strip()


@dataclass
class Report:
    version: str = ""
    config_file: str = ""
    acl: str = ""
    user: str = ""
    group: str = ""
    findings: list[tuple[str, str]] = field(default_factory=list)

    def add(self, level: str, message: str) -> None:
        self.findings.append((level, message))

    @property
    def problems(self) -> list[str]:
        return [m for lvl, m in self.findings if lvl == "problem"]


def parse_acls(config: str) -> dict[str, list[Statement]]:
    """The ACLs of ``exim -bP config`` output, by name."""
    acls: dict[str, list[Statement]] = {}
    in_acl = False
    current: list[Statement] | None = None
    for raw in config.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("begin "):
            in_acl = line.split()[1] == "acl"
            current = None
            continue
        if not in_acl:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_\-./]+):", line)
        if m is not None:
            current = acls.setdefault(m.group(1), [])
            continue
        if current is None:
            continue
        word, _, rest = line.partition(" ")
        if word in VERBS:
            current.append(Statement(word, (rest.strip(),) if rest.strip() else ()))
        elif current:
            last = current[-1]
            current[-1] = Statement(last.verb, (*last.lines, line))
    return acls


def asks_relaygate(st: Statement) -> bool:
    return "readsocket" in st.text and "smtpd_access_policy" in st.text


def is_relay_check(st: Statement) -> bool:
    """A statement that refuses recipients outside the local/relay domains."""
    text = st.text
    if st.verb == "require" and re.search(r"^domains\s*=", text, re.MULTILINE):
        return True
    if st.verb in ("deny", "drop"):
        if re.search(r"^domains\s*=\s*!", text, re.MULTILINE):
            return True
        if re.search(r"^message\s*=.*relay", text, re.MULTILINE | re.IGNORECASE):
            return True
    return False


def _acts_on_answer(st: Statement, variable: str | None) -> bool:
    if st.verb != "accept" or "action=OK" not in st.text:
        return False
    return variable is None or variable in st.text or asks_relaygate(st)


def check_acl(statements: Sequence[Statement], report: Report) -> str | None:
    """Check the order of the RCPT ACL; return the readsocket endpoint it uses."""
    ask = next((i for i, st in enumerate(statements) if asks_relaygate(st)), None)
    gate = next((i for i, st in enumerate(statements) if is_relay_check(st)), None)
    if ask is None:
        report.add("problem", f"ACL {report.acl} does not ask relaygate (no ${{readsocket}} "
                              "sending smtpd_access_policy): include "
                              "deploy/exim/relaygate-rcpt.conf (docs/exim.md)")
        return None
    endpoint_m = _READSOCKET.search(statements[ask].text)
    endpoint = endpoint_m.group(1) if endpoint_m else None
    var_m = re.search(r"set\s+(acl_[cm]_?\w+)\s*=\s*\$\{readsocket", statements[ask].text)
    variable = var_m.group(1) if var_m else None
    grant = next((i for i in range(ask, len(statements))
                  if _acts_on_answer(statements[i], variable)), None)
    if grant is None:
        report.add("problem", f"ACL {report.acl} asks relaygate (statement {ask + 1}) but no "
                              "later accept acts on action=OK")
        return endpoint
    if gate is None:
        report.add("warning", f"ACL {report.acl} has no recognisable relay check (a "
                              "'require domains = +local_domains...' or a deny for other "
                              f"domains); relaygate's accept is statement {grant + 1}")
    elif gate < ask or gate < grant:
        report.add("problem", f"ACL {report.acl}: the relay check (statement {gate + 1}: "
                              f"{statements[gate].describe()}) comes before relaygate's "
                              f"{'question' if gate < ask else 'accept'} (statement "
                              f"{(ask if gate < ask else grant) + 1}): relaying is refused "
                              "before relaygate is asked; move the include up (docs/exim.md)")
    else:
        report.add("ok", f"ACL {report.acl} asks relaygate (statement {ask + 1}) and accepts "
                         f"on action=OK (statement {grant + 1}) before the relay check "
                         f"(statement {gate + 1})")
    return endpoint


def _user_ids(user: str, group: str) -> tuple[int, set[int]]:
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise EximDoctorError(f"Exim user {user!r} does not exist") from None
    gids = {pw.pw_gid}
    if group:
        try:
            gids.add(grp.getgrnam(group).gr_gid if not group.isdigit() else int(group))
        except KeyError:
            pass
    gids |= {g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem}
    return pw.pw_uid, gids


def _may(st: os.stat_result, uid: int, gids: set[int], bit: int) -> bool:
    """``bit`` is 4 (read), 2 (write) or 1 (search/execute)."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid in gids:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def check_endpoint(endpoint: str, report: Report) -> None:
    """Is the policy endpoint reachable, by the Exim user for a UNIX socket?"""
    if endpoint.startswith("inet:"):
        hostport = endpoint[5:]
        if hostport.startswith("["):
            host, _, port_s = hostport[1:].partition("]:")
        else:
            host, _, port_s = hostport.rpartition(":")
        if not port_s.isdigit():
            report.add("problem", f"cannot read the TCP endpoint {endpoint!r}")
            return
        try:
            with socket.create_connection((host, int(port_s)), timeout=CONNECT_TIMEOUT):
                pass
        except OSError as exc:
            report.add("problem", f"policy service {endpoint} is not reachable: {exc}")
            return
        report.add("ok", f"policy service {endpoint} accepts connections")
        return
    path = Path(endpoint)
    if not path.is_absolute():
        report.add("problem", f"readsocket endpoint {endpoint!r} is neither inet:HOST:PORT "
                              "nor an absolute socket path")
        return
    try:
        st = os.stat(path)
    except OSError as exc:
        report.add("problem", f"policy socket {path}: {exc.strerror}")
        return
    if not stat.S_ISSOCK(st.st_mode):
        report.add("problem", f"{path} is not a socket")
        return
    try:
        uid, gids = _user_ids(report.user, report.group)
    except EximDoctorError as exc:
        report.add("problem", str(exc))
        return
    for parent in reversed(path.parents):
        try:
            pst = os.stat(parent)
        except OSError:
            continue
        if not _may(pst, uid, gids, 1):
            report.add("problem", f"the Exim user {report.user} cannot reach {path}: "
                                  f"no search permission on {parent}")
            return
    if not _may(st, uid, gids, 2):
        report.add("problem", f"the Exim user {report.user} cannot write {path} (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}, owner {st.st_uid}:"
                              f"{st.st_gid}): run relaygate with --socket-group "
                              f"{report.group or report.user}")
        return
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(CONNECT_TIMEOUT)
            s.connect(str(path))
    except OSError as exc:
        report.add("problem", f"policy socket {path} does not accept connections: {exc}")
        return
    report.add("ok", f"policy socket {path} is writable by the Exim user {report.user} and "
                     "accepts connections")


class Exim:
    """Runs the exim binary (with ``-C FILE`` when a configuration is given)."""

    def __init__(self, program: str, config: str | None = None) -> None:
        self.program = program
        self.config = config

    def run(self, *args: str, stdin: str | None = None) -> str:
        cmd = [self.program, *(["-C", self.config] if self.config else []), *args]
        try:
            out = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                                 timeout=EXIM_TIMEOUT, errors="replace")
        except FileNotFoundError:
            raise EximDoctorError(f"{self.program}: not found") from None
        except subprocess.TimeoutExpired:
            raise EximDoctorError(f"{' '.join(cmd)}: no answer in {EXIM_TIMEOUT:.0f}s") from None
        except OSError as exc:
            raise EximDoctorError(f"{self.program}: {exc}") from None
        if out.returncode != 0 and not out.stdout:
            err = out.stderr.strip().splitlines()
            raise EximDoctorError(f"{' '.join(cmd)} exited {out.returncode}: "
                                  f"{err[-1] if err else ''}")
        return out.stdout

    def option(self, name: str) -> str:
        out = self.run("-bP", name)
        for line in out.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == name:
                return value.strip()
        return ""

    def rcpt_code(self, address: str, recipient: str = TEST_RECIPIENT) -> int | None:
        """The reply to RCPT TO in a ``-bh`` session from ``address`` (None: no reply)."""
        session = ("EHLO doctor.relaygate.invalid\r\nMAIL FROM:<>\r\n"
                   f"RCPT TO:<{recipient}>\r\nQUIT\r\n")
        out = self.run("-bh", address, stdin=session)
        codes = [int(m.group(1)) for m in re.finditer(r"^(\d{3}) ", out, re.MULTILINE)]
        # 220 greeting, EHLO, MAIL, RCPT, QUIT
        return codes[3] if len(codes) >= 5 else None


def diagnose(exim: Exim, *, session: Callable[[Exim, Report], None] | None = None) -> Report:
    """Read Exim's configuration and check it; ``session`` runs the test session."""
    report = Report()
    version = exim.run("-bV")
    m = re.search(r"Exim version (\S+)", version)
    if m is None:
        raise EximDoctorError(f"{exim.program} -bV did not say which Exim it is")
    report.version = m.group(1)
    m = re.search(r"Configuration file (?:is|search path is) (\S+)", version)
    report.config_file = m.group(1) if m else (exim.config or "?")
    report.acl = exim.option("acl_smtp_rcpt")
    report.user = exim.option("exim_user") or "root"
    report.group = exim.option("exim_group")
    if not report.acl:
        report.add("problem", "acl_smtp_rcpt is not set: Exim refuses every recipient of a "
                              "remote client and never asks relaygate")
        return report
    acls = parse_acls(exim.run("-bP", "config"))
    statements = acls.get(report.acl)
    if statements is None:
        report.add("problem", f"acl_smtp_rcpt names {report.acl!r}, which is not an ACL of "
                              "the configuration (a file of ACL statements is not read)")
        return report
    endpoint = check_acl(statements, report)
    if endpoint is not None:
        check_endpoint(endpoint, report)
    if session is not None:
        session(exim, report)
    return report


def window_session(control: RelayControl, address: str, stranger: str
                   ) -> Callable[[Exim, Report], None]:
    """The test session: ``address`` gets a 60-second window (unless it has one), its
    RCPT to a remote domain must be accepted; ``stranger`` (no window) must be refused.
    The window is revoked afterwards."""

    ip, other = parse_ip(address), parse_ip(stranger)

    def run(exim: Exim, report: Report) -> None:
        now = time.time()
        try:
            opened = control.store.get(ip, now) is None
            if opened:
                control.open_window(ip, user="relaygate-doctor", source="cli", ttl=60)
            stranger_has_window = control.store.get(other, now) is not None
        except StoreError as exc:
            report.add("problem", f"test session skipped: the grant store is unreachable "
                                  f"({exc})")
            return
        try:
            code = exim.rcpt_code(ip)
        finally:
            if opened:
                try:
                    control.revoke(ip)
                except StoreError as exc:
                    report.add("warning", f"could not revoke the test window for {ip}: {exc}")
        if code == 250:
            report.add("ok", f"exim -bh {ip} (open window): RCPT to a remote domain accepted")
        else:
            report.add("problem", f"exim -bh {ip} (open window): RCPT to a remote domain got "
                                  f"{code if code is not None else 'no reply'}, not 250")
        if stranger_has_window:
            report.add("warning", f"{other} has an open window: stranger test skipped")
            return
        code = exim.rcpt_code(other)
        if code == 250:
            report.add("problem", f"exim -bh {other} (no window): RCPT to a remote domain "
                                  "accepted: Exim relays for strangers")
        else:
            report.add("ok", f"exim -bh {other} (no window): RCPT to a remote domain refused "
                             f"({code if code is not None else 'no reply'})")

    return run
