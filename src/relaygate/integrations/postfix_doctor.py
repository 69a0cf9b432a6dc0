"""``relaygate doctor postfix``: is relaygate's policy where Postfix will ask it?

Theory of operation
-------------------
Postfix (>= 2.10) evaluates ``smtpd_relay_restrictions`` and then
``smtpd_recipient_restrictions`` for each RCPT TO; a recipient must pass
*both* (postconf(5), "smtpd_relay_restrictions"). Within one list the first
restriction that decides wins: ``OK`` from a policy service (an access(5)
action) ends that list with "permit", ``DUNNO`` moves on. Hence the rule this
doctor checks, for each of the two lists:

    if the list contains a relay gate (``reject_unauth_destination``,
    ``defer_unauth_destination``, or an unconditional ``reject``/``defer``),
    relaygate's ``check_policy_service`` must come before it in that list,
    and no unconditional ``permit`` may come before the policy.

The typical mistakes it names: the policy is missing; it sits after
``reject_unauth_destination`` (never asked for a relay); it is in
``smtpd_recipient_restrictions`` while ``smtpd_relay_restrictions`` still has
Postfix's default ``permit_mynetworks, permit_sasl_authenticated,
defer_unauth_destination`` (every stranger gets 454 first); or it is in the
relay restrictions while a legacy ``smtpd_recipient_restrictions`` still ends
in ``reject_unauth_destination`` (the OK is overruled there).

Values come from ``postconf -x`` (expanded ``$name`` references) with ``-c DIR``
for a private configuration, and ``postconf -P`` for master.cf ``-o``
overrides of smtpd services (reported as warnings: a submission service that
only takes SASL logins legitimately has no policy). ``--probe`` sends a test
request to the policy endpoint.
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relaygate.errors import RelaygateError

#: Seconds ``postconf`` may run (it reads two files) and a probe may wait for its answer.
POSTCONF_TIMEOUT = 30.0
PROBE_TIMEOUT = 5.0

#: Postfix's built-in default for smtpd_relay_restrictions (postconf -d, 2.10 and later).
DEFAULT_RELAY_RESTRICTIONS = (
    "permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination")

RELAY_LIST = "smtpd_relay_restrictions"
RCPT_LIST = "smtpd_recipient_restrictions"
OTHER_LISTS = ("smtpd_client_restrictions", "smtpd_helo_restrictions",
               "smtpd_sender_restrictions", "smtpd_data_restrictions",
               "smtpd_end_of_data_restrictions")

#: Restrictions that end a list for a stranger relaying (the "gates").
GATES = ("reject_unauth_destination", "defer_unauth_destination", "reject", "defer")

#: Restrictions that take the next token (or { ... } group) as their argument.
_TAKES_ARGUMENT = re.compile(
    r"check_[a-z_]+|reject_rbl_client|reject_rhsbl_[a-z_]+|permit_dnswl_client|"
    r"permit_rhswl_client|reject_dnsbl_client"
)


class DoctorError(RelaygateError):
    """postconf could not be run or gave output we cannot read."""


@dataclass(frozen=True)
class Restriction:
    name: str
    args: tuple[str, ...] = ()

    def __str__(self) -> str:
        if not self.args:
            return self.name
        if len(self.args) == 1:
            return f"{self.name} {self.args[0]}"
        return f"{self.name} {{ {', '.join(self.args)} }}"


@dataclass(frozen=True)
class Finding:
    level: str  # "ok", "warning", "problem"
    message: str


@dataclass
class Report:
    config_dir: str | None
    version: str
    values: dict[str, str]
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "problem"]

    def add(self, level: str, message: str) -> None:
        self.findings.append(Finding(level, message))


def _group_items(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_restrictions(value: str) -> list[Restriction]:
    """A restriction list as Restriction values (arguments attached to their restriction)."""
    # Re-split braces on commas only (a group may contain "timeout=10s" etc.).
    items: list[str | list[str]] = []
    for m in re.finditer(r"\{([^{}]*)\}|[^\s,{}]+", value):
        items.append(_group_items(m.group(1)) if m.group(1) is not None else m.group(0))
    out: list[Restriction] = []
    i = 0
    while i < len(items):
        item = items[i]
        if isinstance(item, list):
            # A bare group (Postfix 3.0 "{ name = value }"-style): not a restriction we know.
            out.append(Restriction("{group}", tuple(item)))
            i += 1
            continue
        if _TAKES_ARGUMENT.fullmatch(item) and i + 1 < len(items):
            arg = items[i + 1]
            out.append(Restriction(item, tuple(arg) if isinstance(arg, list) else (arg,)))
            i += 2
            continue
        out.append(Restriction(item))
        i += 1
    return out


def normalize_endpoint(spec: str, queue_directory: str = "/var/spool/postfix") -> str:
    """``inet:HOST:PORT``, ``HOST:PORT``, ``[V6]:PORT``, ``unix:PATH`` -> one comparable form."""
    s = spec.strip()
    if s.startswith("unix:"):
        path = s[5:]
        if not path.startswith("/"):
            path = str(Path(queue_directory) / path)
        return f"unix:{path}"
    if s.startswith("inet:"):
        s = s[5:]
    host, _, port = s.rpartition(":")
    host = host.strip("[]").lower()
    if host in ("localhost", ""):
        host = "127.0.0.1"
    return f"inet:{host}:{port}"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def run_postconf(args: Sequence[str], *, config_dir: str | None,
                 postconf: str = "postconf") -> str:
    cmd = [postconf]
    if config_dir:
        cmd += ["-c", config_dir]
    cmd += list(args)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=POSTCONF_TIMEOUT,
                              check=False)
    except FileNotFoundError:
        raise DoctorError(f"{postconf} not found (is Postfix installed?)") from None
    except subprocess.TimeoutExpired:
        raise DoctorError(f"{' '.join(cmd)} did not finish") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise DoctorError(f"{' '.join(cmd)} failed: {msg[-1] if msg else proc.returncode}")
    return proc.stdout


def _parse_assignments(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, eq, value = line.partition("=")
        if eq:
            out[name.strip()] = value.strip()
    return out


def check_lists(relay: str, rcpt: str, expected: Sequence[str], *, queue_directory: str,
                others: dict[str, str] | None = None, where: str = "main.cf"
                ) -> list[Finding]:
    """The placement rule (module docstring) for one set of restriction lists."""
    findings: list[Finding] = []
    wanted = {normalize_endpoint(e, queue_directory) for e in expected}
    lists = {RELAY_LIST: parse_restrictions(relay), RCPT_LIST: parse_restrictions(rcpt)}

    def is_ours(r: Restriction) -> bool:
        return (r.name == "check_policy_service" and bool(r.args)
                and normalize_endpoint(r.args[0], queue_directory) in wanted)

    found = {name: [i for i, r in enumerate(rs) if is_ours(r)] for name, rs in lists.items()}
    if not any(found.values()):
        foreign = [str(r) for rs in lists.values() for r in rs
                   if r.name == "check_policy_service"]
        elsewhere = [name for name, value in (others or {}).items()
                     if any(is_ours(r) for r in parse_restrictions(value))]
        msg = (f"{where}: relaygate's policy ({', '.join(sorted(wanted))}) is in neither "
               f"{RELAY_LIST} nor {RCPT_LIST}")
        if elsewhere:
            msg += f"; it is in {', '.join(elsewhere)}, where OK cannot allow relaying"
        if foreign:
            msg += f" (other policy services found: {', '.join(foreign)}; use --policy)"
        findings.append(Finding("problem", msg))
        return findings

    any_gate = False
    for name, rs in lists.items():
        gate = next((i for i, r in enumerate(rs) if r.name in GATES), None)
        if gate is None:
            continue
        any_gate = True
        ours = [i for i in found[name] if i < gate]
        if ours:
            first = ours[0]
            permit = next((i for i, r in enumerate(rs[:first]) if r.name == "permit"), None)
            if permit is not None:
                findings.append(Finding("problem", (
                    f"{where}: {name} has an unconditional 'permit' before relaygate's policy: "
                    f"every client may relay")))
            else:
                findings.append(Finding("ok", (
                    f"{where}: {name}: relaygate's policy comes before {rs[gate].name}")))
            continue
        if found[name]:
            findings.append(Finding("problem", (
                f"{where}: {name}: relaygate's policy sits after {rs[gate].name}: relay "
                f"attempts are refused before it is asked; move it before {rs[gate].name}")))
        elif name == RELAY_LIST:
            default = " (Postfix's default)" if _same(relay, DEFAULT_RELAY_RESTRICTIONS) else ""
            findings.append(Finding("problem", (
                f"{where}: relaygate's policy is only in {RCPT_LIST}, but {RELAY_LIST} = "
                f"{relay}{default} runs first and ends in {rs[gate].name}: strangers are "
                f"refused before the policy is asked; put the policy in {RELAY_LIST} before "
                f"{rs[gate].name}")))
        else:
            findings.append(Finding("problem", (
                f"{where}: {RCPT_LIST} has {rs[gate].name} and no relaygate policy before it: "
                f"relays the policy allowed in {RELAY_LIST} are refused there; put the policy "
                f"before {rs[gate].name} in {RCPT_LIST} too, or remove it from that list")))
    if not any_gate:
        findings.append(Finding("warning", (
            f"{where}: neither {RELAY_LIST} nor {RCPT_LIST} has reject_unauth_destination or "
            f"defer_unauth_destination: Postfix refuses to start (or relays for everybody)")))
    if found[RELAY_LIST] and found[RCPT_LIST]:
        findings.append(Finding("warning", (
            f"{where}: relaygate's policy is in both {RELAY_LIST} and {RCPT_LIST}: asked "
            f"twice per recipient (harmless, but one is enough)")))
    return findings


def host_addresses() -> set[str]:
    """This host's own addresses: loopback, its interfaces (Linux), its name's addresses."""
    import ipaddress

    out = {"127.0.0.1", "::1"}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            out.add(str(info[4][0]))
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                hexaddr = line.split()[0]
                out.add(str(ipaddress.IPv6Address(int(hexaddr, 16))))
    except (OSError, ValueError, IndexError):
        pass
    try:
        import fcntl
        import struct

        siocgifaddr = 0x8915
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(sock.fileno(), siocgifaddr,
                                         struct.pack("256s", name[:15].encode()))
                except OSError:
                    continue
                out.add(socket.inet_ntoa(packed[20:24]))
    except (OSError, ImportError):
        pass
    return out


def check_mynetworks(relay: str, rcpt: str, mynetworks: str, expected: Sequence[str], *,
                     queue_directory: str, own: set[str] | None = None,
                     where: str = "main.cf") -> list[Finding]:
    """Warn when ``permit_mynetworks`` comes before the policy and mynetworks is wider
    than this host: every client in it relays without a window (and without relaygate
    being asked)."""
    import ipaddress

    wanted = {normalize_endpoint(e, queue_directory) for e in expected}
    before: list[str] = []
    for name, value in ((RELAY_LIST, relay), (RCPT_LIST, rcpt)):
        rs = parse_restrictions(value)
        ours = next((i for i, r in enumerate(rs) if r.name == "check_policy_service" and r.args
                     and normalize_endpoint(r.args[0], queue_directory) in wanted), None)
        gate = next((i for i, r in enumerate(rs) if r.name in GATES), len(rs))
        mine = next((i for i, r in enumerate(rs) if r.name == "permit_mynetworks"), None)
        if mine is not None and mine < gate and (ours is None or mine < ours):
            before.append(name)
    if not before:
        return []
    own = host_addresses() if own is None else own
    wider: list[str] = []
    unknown: list[str] = []
    for token in mynetworks.replace(",", " ").split():
        try:
            net = ipaddress.ip_network(token.replace("[", "").replace("]", ""), strict=False)
        except ValueError:
            unknown.append(token)  # a file or a lookup table
            continue
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped \
                and net.prefixlen >= 96:
            net = ipaddress.ip_network(
                f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}", strict=False)
        if net.is_loopback:
            continue
        if net.num_addresses == 1 and str(net.network_address) in own:
            continue
        wider.append(token)
    lists = " and ".join(before)
    findings: list[Finding] = []
    if wider:
        findings.append(Finding("warning", (
            f"{where}: {lists}: permit_mynetworks comes before relaygate's policy, and "
            f"mynetworks is wider than this host ({', '.join(wider)}): every client there "
            f"relays without a window and relaygate is never asked; narrow mynetworks "
            f"(e.g. mynetworks = 127.0.0.0/8 [::1]/128) or move permit_mynetworks after "
            f"the policy")))
    else:
        findings.append(Finding("ok", (
            f"{where}: {lists}: permit_mynetworks comes before relaygate's policy; "
            f"mynetworks covers only this host")))
    if unknown:
        findings.append(Finding("warning", (
            f"{where}: mynetworks entries not checked (files or lookup tables): "
            f"{', '.join(unknown)}")))
    return findings


def _same(a: str, b: str) -> bool:
    return [str(r) for r in parse_restrictions(a)] == [str(r) for r in parse_restrictions(b)]


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT) -> str:
    """Send a test request (TEST-NET client 192.0.2.1) and return the action (raises OSError)."""
    from relaygate.protocols.policy import format_request

    request = format_request({
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
        "client_address": "192.0.2.1", "client_name": "unknown", "helo_name": "doctor.invalid",
        "sender": "doctor@doctor.invalid", "recipient": "doctor@doctor.invalid",
        "instance": "relaygate.doctor", "sasl_username": "",
    })
    if endpoint.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(endpoint[5:])
        except OSError:
            sock.close()
            raise
    else:
        host, _, port = endpoint[5:].rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    with sock:
        sock.sendall(request)
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("connection closed without an answer")
            data += chunk
            if len(data) > 4096:
                raise OSError("answer too long")
    line = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    if not line.startswith("action="):
        raise OSError(f"not a policy answer: {line!r}")
    return line[len("action="):]


def diagnose(*, config_dir: str | None = None, expected: Sequence[str] = ("127.0.0.1:10040",),
             postconf: str = "postconf", do_probe: bool = False) -> Report:
    """Read the configuration with postconf and check where the policy sits."""
    names = [RELAY_LIST, RCPT_LIST, *OTHER_LISTS, "mail_version", "queue_directory",
             "mynetworks"]
    values = _parse_assignments(run_postconf(["-x", *names], config_dir=config_dir,
                                             postconf=postconf))
    version = values.get("mail_version", "?")
    report = Report(config_dir, version, values)
    queue_dir = values.get("queue_directory", "/var/spool/postfix")
    relay = values.get(RELAY_LIST, "")
    if _version_tuple(version) and _version_tuple(version) < (2, 10):
        report.add("warning", f"Postfix {version} has no {RELAY_LIST}; only "
                              f"{RCPT_LIST} is checked")
        relay = ""
    others = {n: values.get(n, "") for n in OTHER_LISTS}
    report.findings += check_lists(relay, values.get(RCPT_LIST, ""), expected,
                                   queue_directory=queue_dir, others=others)
    report.findings += check_mynetworks(relay, values.get(RCPT_LIST, ""),
                                        values.get("mynetworks", ""), expected,
                                        queue_directory=queue_dir)

    # master.cf: smtpd services that override the lists (postconf -P, Postfix >= 2.11).
    try:
        services = run_postconf(["-M"], config_dir=config_dir, postconf=postconf)
        overrides = _parse_assignments(run_postconf(["-Px"], config_dir=config_dir,
                                                    postconf=postconf))
    except DoctorError as exc:
        report.add("warning", f"could not read master.cf overrides: {exc}")
        services, overrides = "", {}
    for line in services.splitlines():
        fields = line.split()
        if len(fields) < 8 or fields[7] != "smtpd":
            continue
        svc = f"{fields[0]}/{fields[1]}"
        own = {p: overrides[f"{svc}/{p}"] for p in (RELAY_LIST, RCPT_LIST)
               if f"{svc}/{p}" in overrides}
        if not own:
            continue
        findings = check_lists(own.get(RELAY_LIST, relay), own.get(RCPT_LIST,
                               values.get(RCPT_LIST, "")), expected, queue_directory=queue_dir,
                               where=f"master.cf {svc}")
        for f in findings:
            # A service with its own lists (submission) may rightly skip the policy.
            level = "warning" if f.level == "problem" else f.level
            report.add(level, f.message)

    if do_probe:
        for spec in expected:
            endpoint = normalize_endpoint(spec, queue_dir)
            try:
                action = probe(endpoint)
            except (OSError, ValueError) as exc:
                report.add("problem", f"policy service {endpoint} does not answer: {exc} "
                                      "(Postfix then answers 451 to every recipient that "
                                      "reaches it)")
            else:
                report.add("ok", f"policy service {endpoint} answers (action={action} "
                                 f"for a stranger)")
    return report
