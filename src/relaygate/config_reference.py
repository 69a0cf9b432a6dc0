"""Every setting, described once: the commented ``relaygate.toml`` and the reference table.

Theory of operation
-------------------
``relaygate init`` writes a TOML file (TOML 1.0) with every field of
:class:`relaygate.config.Settings`, each commented out and showing its default,
so the file loads to exactly the defaults and an admin uncomments what they
change. ``relaygate init --reference`` prints the same knowledge as the
Markdown table of ``docs/configuration.md``. Both are generated from the
dataclasses, so a setting added to ``config.py`` appears in both: its
description comes from :data:`DESCRIPTIONS`, else from the ``#:`` comment above
the field in ``config.py``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path
from typing import Any, get_type_hints

from relaygate.config import ENV_VARS, Settings

#: one line per setting; the ones missing here fall back to config.py's ``#:`` comments
DESCRIPTIONS: dict[str, str] = {
    "data_dir": "Data directory: SQLite grants (grants.db), users.db, Maildirs (mail/), "
                "queue/, status.json and the lock file.",
    "domains": "Local domains: mail to them is accepted from anyone (qmail's rcpthosts). "
               "Empty: the host name.",
    "rcpthosts_file": "A qmail rcpthosts file whose domains are local too.",
    "store": "Grant store URL: sqlite:///PATH, spool:///DIR (relay-ctrl), "
             "redis://HOST:PORT/DB (several hosts; redis+sentinel://, redis+cluster://), memory:. "
             "Empty: SQLite in the data directory.",
    "expiry": "Seconds a login keeps the relay window of its address open: a whole number "
              "from 1 to 31536000 (also RELAY_CTRL_EXPIRY in an envdir).",
    "relayclient": "RELAYCLIENT value a window grants (appended to each recipient; "
                   "empty = plain relay).",
    "rules_file": "Static rules (tcprules syntax and CIDR), e.g. 127.0.0.1:allow,RELAYCLIENT=\"\".",
    "smtproutes_file": "qmail smtproutes file (domain:host:port) for outbound delivery.",
    "smtproutes": "smtproutes lines given inline (domain:host:port).",
    "hostname": "This host's name in greetings and Received: lines. Empty: the system's name.",
    "log_format": "Log line format: text (syslog/journald/multilog) or json.",
    "log_level": "debug, info, warning or error.",
    "log_file": "Write log lines to this file instead of stderr, each text line with an ISO 8601 "
                "time; reopened on SIGHUP and when logrotate moves it (also --log-file, before the "
                "subcommand or after serve, smtpd, pop3d, imapd).",
    "syslog": "Log to the local syslog socket, facility mail, instead of stderr (also "
              "--syslog, before the subcommand or after serve, smtpd, pop3d, imapd).",
    "syslog_socket": "The syslog socket syslog = true writes to.",
    "metrics.status_page": "The HTML status page at / of the metrics listener: \"loopback\" "
                           "(only when the listener is on a loopback address or a UNIX socket; "
                           "elsewhere / answers the metrics), \"always\" or \"off\".",
    "log_ips": "Log client addresses in relay-ctrl style chain programs.",
    "sender_binding": "A window opened by alice relays only mail from alice's addresses.",
    "ipv6_prefix": "IPv6 clients are counted per network of this prefix length (32-128) for "
                   "connection limits and login throttling; relay windows stay per address.",
    "user": "serve: after binding the listeners as root, run as this user.",
    "group": "serve: group to run as (default: the user's primary group).",
    "age_interval": "serve: seconds between removals of expired windows.",
    "trusted_proxies": "Load balancers (addresses or CIDR) that send a PROXY protocol header "
                       "(HAProxy send-proxy / send-proxy-v2): on every listener a connection from "
                       "one must start with a header naming the client; no window is opened for "
                       "their own addresses. Others are served directly and never believed.",
    "proxy_timeout": "Seconds a trusted proxy has to send its PROXY header before the "
                     "connection is closed.",
    "shutdown_grace": "serve and every service command: seconds transactions in flight may take "
                      "to finish after SIGTERM.",
    "tls.cert": "PEM certificate chain; enables STARTTLS/STLS and the implicit-TLS listeners "
                "(reloaded on SIGHUP).",
    "tls.key": "PEM private key for tls.cert (reloaded on SIGHUP).",
    "smtp.listen": "SMTP (port 25) listeners, HOST:PORT or [V6]:PORT; [] turns it off.",
    "smtp.submission": "Submission (RFC 6409, port 587) listeners, with STARTTLS; "
                       "same relay rules as smtp.",
    "smtp.smtps": "Implicit-TLS submission (RFC 8314, port 465); only with a certificate.",
    "smtp.max_message_size": "Largest message accepted, in bytes (SIZE, RFC 1870).",
    "smtp.max_recipients": "Most RCPT TO per message.",
    "smtp.command_timeout": "Seconds a client may idle between commands.",
    "smtp.data_timeout": "Seconds DATA may stay silent (time since the last bytes received).",
    "smtp.data_memory_limit": "Bytes of message data all DATA transfers together hold in "
                              "memory on the way to disk (at least 1048576); at the limit "
                              "transfers pause reading until writes finish.",
    "smtp.max_connections_per_ip": "Concurrent SMTP connections from one address.",
    "smtp.bad_command_limit": "Bad commands before the connection is closed.",
    "smtp.auth_require_tls": "AUTH only after STARTTLS, except on loopback listeners.",
    "pop3.listen": "POP3 listeners (port 110); [] turns POP3 off.",
    "pop3.listen_tls": "POP3S listeners (port 995); only with a certificate.",
    "pop3.idle_timeout": "Seconds of inactivity before the server closes (RFC 1939: >= 600).",
    "imap.listen": "IMAP listeners (port 143); [] turns IMAP off.",
    "imap.listen_tls": "IMAPS listeners (port 993); only with a certificate.",
    "imap.idle_timeout": "Seconds of inactivity before the server closes (RFC 3501: >= 1800).",
    "imap.max_literal_unauth": "Largest literal accepted before login, in bytes.",
    "imap.max_literal": "Largest APPEND literal after login, in bytes.",
    "imap.max_connections_per_ip": "Concurrent IMAP connections from one address (IPv6: from "
                                   "one network of ipv6_prefix bits); more are told BYE.",
    "auth.allow_plaintext": "Allow plaintext passwords without TLS on non-loopback listeners.",
    "auth.throttle_failures": "Failed logins (per address and per user) before a lockout.",
    "auth.throttle_window": "Seconds over which failures are counted.",
    "auth.throttle_lockout": "Seconds a throttled address or user is locked out.",
    "auth.failure_delay": "Seconds every failed login waits before its answer.",
    "auth.cache_ttl": "Seconds a verified password is remembered, so the same user and "
                      "password skip the argon2id check (throttling still applies; a "
                      "passwd/disable/del or SIGHUP invalidates at once); 0 = off (0-86400, "
                      "see docs/users.md).",
    "auth.cache_size": "Most verified logins the credential cache holds; the least recently "
                       "used is dropped first (1-1000000).",
    "queue.lifetime": "Seconds a message is retried before it bounces.",
    "queue.retry_schedule": "Seconds before each retry; the last one repeats.",
    "queue.concurrency": "Deliveries in parallel.",
    "queue.per_destination": "Deliveries in parallel to one destination domain.",
    "queue.connect_timeout": "Seconds to connect to a remote MX.",
    "queue.postmaster": "Sender of bounces and recipient of double bounces.",
    "policy.listen": "Postfix policy service listeners (HOST:PORT or unix:PATH); [] = off.",
    "socketmap.listen": "Socketmap listeners for Sendmail and Postfix (HOST:PORT or "
                        "unix:PATH); [] = off.",
    "metrics.listen": "Prometheus scrape listener HOST:PORT (GET /metrics); empty = off.",
}

#: examples shown for settings whose default is "unset"
EXAMPLES: dict[str, Any] = {
    "rcpthosts_file": "/var/qmail/control/rcpthosts",
    "store": "redis://127.0.0.1:6379/0",
    "rules_file": "/etc/relaygate/rules",
    "smtproutes_file": "/etc/relaygate/smtproutes",
    "user": "relaygate",
    "group": "relaygate",
    "tls.cert": "/etc/relaygate/tls/fullchain.pem",
    "tls.key": "/etc/relaygate/tls/privkey.pem",
    "metrics.listen": "127.0.0.1:9187",
    "domains": ["example.org"],
    "smtproutes": ["example.net:127.0.0.1:2526"],
}

#: settings whose empty default is computed at start-up
COMPUTED: dict[str, str] = {
    "hostname": "this machine's host name",
    "domains": "the host name",
    "store": "sqlite in the data directory",
}


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: dotted key, section, default, description."""

    key: str
    section: str | None
    name: str
    default: Any
    type_name: str
    description: str

    @property
    def unset(self) -> bool:
        return self.default is None


def _field_comments(cls: type) -> dict[str, str]:
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in src.splitlines():
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
            continue
        m = re.match(r"(\w+)\s*:", s)
        if m and pending:
            out[m.group(1)] = " ".join(pending)
        pending = []
    return out


def _type_name(tp: Any) -> str:
    text = str(tp).replace("typing.", "").replace("pathlib.", "")
    text = re.sub(r"<class '(\w+)'>", r"\1", text)
    return text.replace("tuple[str, ...]", "list of strings").replace(
        "tuple[float, ...]", "list of numbers")


def options() -> list[Option]:
    """Every setting in Settings order: top-level ones first, then each section."""
    defaults = Settings()
    top: list[Option] = []
    sections: list[Option] = []
    comments = _field_comments(Settings)
    for f in dataclasses.fields(Settings):
        tp = get_type_hints(Settings)[f.name]
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(tp):
            sub_comments = _field_comments(tp)  # type: ignore[arg-type]
            for sf in dataclasses.fields(tp):
                key = f"{f.name}.{sf.name}"
                stp = get_type_hints(tp)[sf.name]
                sections.append(Option(
                    key, f.name, sf.name, getattr(value, sf.name), _type_name(stp),
                    DESCRIPTIONS.get(key) or sub_comments.get(sf.name, "")))
        else:
            top.append(Option(f.name, None, f.name, value, _type_name(tp),
                              DESCRIPTIONS.get(f.name) or comments.get(f.name, "")))
    return top + sections


def toml_value(value: Any) -> str:
    """A TOML literal for a default value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _default_of(opt: Option) -> Any:
    # hostname is computed by load_settings; the dataclass default is the empty string
    return "" if opt.key == "hostname" else opt.default


HEADER = """\
# relaygate configuration (TOML). Written by `relaygate init`.
#
# Every setting is listed, commented out, with its default value: uncomment
# and edit what you change. Precedence, highest first: command-line options,
# RELAYGATE_* environment variables, this file, an --envdir directory, the
# defaults. Start with:   relaygate serve --config relaygate.toml
#
# Secure default: no address relays (not even this host) until a POP3/IMAP
# login opens a window for it, SMTP AUTH authorizes a session, or a rules
# file line says so, e.g.  127.0.0.1:allow,RELAYCLIENT=""
# Full reference: docs/configuration.md.
"""


def render_toml() -> str:
    """The commented ``relaygate.toml`` with every option."""
    out = [HEADER]
    section: str | None = None
    for opt in options():
        if opt.section != section:
            section = opt.section
            out.append(f"\n[{section}]")
        if opt.description:
            out.append("")
            out.extend(f"# {line}" for line in _wrap(opt.description, 76))
        default = _default_of(opt)
        if opt.unset:
            example = EXAMPLES.get(opt.key)
            if example is not None:
                out.append(f"# {opt.name} = {toml_value(example)}   # example; default: unset")
            else:
                out.append(f"# {opt.name} =   # default: unset")
        else:
            line = f"# {opt.name} = {toml_value(default)}"
            if opt.key in COMPUTED:
                line += f"   # default: {COMPUTED[opt.key]}"
            out.append(line)
            if opt.key in EXAMPLES and not opt.unset:
                out.append(f"#   e.g. {opt.name} = {toml_value(EXAMPLES[opt.key])}")
    return "\n".join(out).lstrip("\n") + "\n"


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(current)
    return lines


#: serve's command-line options and the settings they set
SERVE_FLAGS: dict[str, str] = {
    "data_dir": "--data-dir", "domains": "--domain", "store": "--store", "expiry": "--expiry",
    "rules_file": "--rules", "smtproutes_file": "--smtproutes", "log_format": "--log-format",
    "log_level": "--log-level", "user": "--user", "group": "--group",
    "hostname": "--hostname", "ipv6_prefix": "--ipv6-prefix",
    "tls.cert": "--tls-cert", "tls.key": "--tls-key",
    "smtp.listen": "--smtp", "smtp.submission": "--submission", "smtp.smtps": "--smtps",
    "pop3.listen": "--pop3", "pop3.listen_tls": "--pop3s", "imap.listen": "--imap",
    "imap.listen_tls": "--imaps", "policy.listen": "--policy", "metrics.listen": "--metrics",
    "socketmap.listen": "--socketmap",
}


def render_markdown() -> str:
    """The reference table of ``docs/configuration.md`` (generated; do not edit by hand)."""
    env_of = {v: k for k, v in ENV_VARS.items()}
    out = ["| setting | default | flag / environment | meaning |", "|---|---|---|---|"]
    section: str | None = None
    for opt in options():
        if opt.section != section:
            section = opt.section
            out.append(f"| **[{section}]** | | | |")
        if opt.key in COMPUTED and not opt.default:
            default = COMPUTED[opt.key]
        elif opt.unset:
            default = "unset"
        else:
            default = f"`{toml_value(_default_of(opt))}`"
        where = [f"`{SERVE_FLAGS[opt.key]}`"] if opt.key in SERVE_FLAGS else []
        if opt.key in env_of:
            where.append(f"`${env_of[opt.key]}`")
        desc = opt.description.replace("|", "\\|")
        out.append(f"| `{opt.name}` | {default} | {' '.join(where)} | {desc} |")
    return "\n".join(out) + "\n"
