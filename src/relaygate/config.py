"""Configuration: one frozen Settings, built once at the edge.

Sources, highest precedence first:

1. command-line options (the CLI passes them as dotted keys, e.g. ``smtp.listen``);
2. environment variables ``RELAYGATE_*`` (see ``ENV_VARS``);
3. a TOML file (``--config`` / ``RELAYGATE_CONFIG``), sections as in ``Settings``;
4. an envdir-style directory (``--envdir /etc/relay-ctrl``): one variable per
   file, its first line, as daemontools' ``envdir`` reads it (``RELAY_CTRL_DIR``,
   ``RELAY_CTRL_EXPIRY``, ``RELAY_CTRL_RELAYCLIENT``, ``RELAY_CTRL_LOG_IPS``);
5. built-in defaults (embedded: SQLite in ``./relaygate-data``, loopback listeners).

Every bad value stops start-up with a ConfigError naming its source (file and
line, or the variable) and the value. Nothing below the CLI reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from relaygate.errors import ConfigError


@dataclass(frozen=True)
class TlsSettings:
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class SmtpSettings:
    listen: tuple[str, ...] = ("127.0.0.1:2525",)
    submission: tuple[str, ...] = ("127.0.0.1:2587",)
    #: implicit TLS (RFC 8314); only started when a certificate is configured
    smtps: tuple[str, ...] = ("127.0.0.1:2465",)
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    max_connections_per_ip: int = 20
    bad_command_limit: int = 10
    #: AUTH only after STARTTLS, except on loopback listeners
    auth_require_tls: bool = True
    #: loopback listeners count as safe for plaintext AUTH; turn off when a local proxy
    #: (stunnel, a balancer without PROXY headers) forwards remote clients to a loopback
    #: listener (with trusted_proxies, a forwarded client's own address decides)
    loopback_plaintext_auth: bool = True
    #: refused RCPTs (unknown user, relay denied) before the session is ended with 421:
    #: a dictionary-attack guard, separate from the bad-command budget
    max_refused_recipients: int = 50
    #: bytes of message data held in memory by all DATA transfers together (the rest
    #: is on disk already); at the limit transfers pause reading until writes finish
    data_memory_limit: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class Pop3Settings:
    listen: tuple[str, ...] = ("127.0.0.1:1110",)
    listen_tls: tuple[str, ...] = ("127.0.0.1:1995",)
    #: RFC 1939 section 3: at least 10 minutes
    idle_timeout: float = 600.0
    #: unknown, misplaced or malformed commands before the server hangs up
    bad_command_limit: int = 10
    #: commands in one session (ends NOOP loops that defeat the idle timeout)
    max_commands: int = 200_000
    #: simultaneous connections from one client address (real clients use one or two)
    max_connections_per_ip: int = 20


@dataclass(frozen=True)
class ImapSettings:
    listen: tuple[str, ...] = ("127.0.0.1:1143",)
    listen_tls: tuple[str, ...] = ("127.0.0.1:1993",)
    #: RFC 3501 section 5.4: at least 30 minutes
    idle_timeout: float = 1800.0
    #: largest literal accepted before login (bytes)
    max_literal_unauth: int = 8192
    #: largest APPEND literal after login (bytes)
    max_literal: int = 50 * 1024 * 1024
    #: simultaneous connections from one client address: mail clients keep several
    #: (one per watched folder), and an office behind NAT shares one address
    max_connections_per_ip: int = 50


@dataclass(frozen=True)
class AuthSettings:
    #: plaintext passwords without TLS are refused unless the listener is loopback or this is set
    allow_plaintext: bool = False
    throttle_failures: int = 5
    throttle_window: float = 300.0
    throttle_lockout: float = 900.0
    #: every failed login is answered after this delay (unknown users cost the same)
    failure_delay: float = 1.0
    #: seconds a verified password is remembered (mail/accounts/cache.py); 0 = no cache
    cache_ttl: float = 0.0
    #: most verified logins remembered at once (least recently used dropped first)
    cache_size: int = 10_000


@dataclass(frozen=True)
class QueueSettings:
    lifetime: float = 5 * 24 * 3600.0
    #: seconds before each retry; the last one repeats until the lifetime ends
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
    concurrency: int = 20
    per_destination: int = 5
    connect_timeout: float = 30.0
    postmaster: str = "postmaster"
    #: seconds to wait for each reply of the next hop (RFC 5321 section 4.5.3.2: 5 minutes)
    command_timeout: float = 300.0
    #: send a "delayed" DSN once a message has waited this long (0 = never, the default)
    delay_warning: float = 0.0


@dataclass(frozen=True)
class PolicySettings:
    listen: tuple[str, ...] = ()
    #: permissions of a UNIX policy socket (octal); Postfix's smtpd must be able to write it
    socket_mode: str = "0660"
    #: group of a UNIX policy socket (e.g. postfix); empty = the daemon's own group
    socket_group: str | None = None
    #: seconds a policy connection may stay silent; Postfix closes its own after 300 s
    idle_timeout: float = 600.0
    #: threads running store lookups in batches for redis and spool stores (sqlite and
    #: memory are looked up on the event loop); more only help a high-latency store
    threads: int = 1


@dataclass(frozen=True)
class SocketmapSettings:
    listen: tuple[str, ...] = ()
    #: the value answered with OK for an address that may relay (Sendmail's rulesets see
    #: it; OK is also a Postfix access(5) action, so check_client_access works as is)
    value: str = "OK"
    #: permissions of a UNIX socketmap socket (octal); the MTA must be able to write it
    socket_mode: str = "0660"
    #: group of a UNIX socketmap socket (e.g. smmsp or postfix); empty = the daemon's own
    socket_group: str | None = None
    #: seconds a socketmap connection may stay silent (Sendmail and Postfix reconnect)
    idle_timeout: float = 600.0
    #: threads running store lookups for redis and spool stores (as policy.threads)
    threads: int = 1


@dataclass(frozen=True)
class LogwatchSettings:
    #: extra login-line patterns NAME=REGEX (group ip, optional user), matched on TAG[PID]: MESSAGE
    patterns: tuple[str, ...] = ()
    #: built-in pattern families in use (default all; see docs/log-watcher.md)
    builtins: tuple[str, ...] = (
        "dovecot", "dovecot-log", "courier", "uw", "qpopper", "cyrus", "gnu-pop3d", "vchkpw",
        "vm-pop3d", "popa3d", "perdition", "solid-pop3d", "teapop", "cucipop", "apple")
    #: seconds between checks of followed files for new lines, rotation and truncation
    interval: float = 0.25
    #: seconds a session never logged out keeps its address's window open (0 = only the login)
    max_session: float = 43200.0


@dataclass(frozen=True)
class MetricsSettings:
    listen: str | None = None
    #: the HTML status page at / of the metrics listener: "loopback" (only when the listener
    #: is on a loopback address or a UNIX socket), "always" or "off"
    status_page: str = "loopback"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("relaygate-data")
    #: local domains: mail to them is accepted from anyone (qmail's rcpthosts)
    domains: tuple[str, ...] = ()
    rcpthosts_file: Path | None = None
    #: grant store URL; default sqlite in the data directory
    store: str | None = None
    expiry: float = 900.0
    relayclient: str = ""
    rules_file: Path | None = None
    smtproutes_file: Path | None = None
    smtproutes: tuple[str, ...] = ()
    hostname: str = ""
    log_format: str = "text"
    log_level: str = "info"
    #: write log lines to this file (ISO time on each text line; reopened on SIGHUP and
    #: when logrotate moves it) instead of stderr
    log_file: Path | None = None
    #: log to the local syslog socket (facility mail) instead of stderr
    syslog: bool = False
    #: the syslog socket --syslog writes to
    syslog_socket: str = "/dev/log"
    log_ips: bool = False
    sender_binding: bool = False
    #: IPv6 clients share per-address limits (connections, login failures) per this prefix
    ipv6_prefix: int = 64
    user: str | None = None
    group: str | None = None
    #: seconds between aging runs in ``serve``
    age_interval: float = 60.0
    #: seconds ``serve`` lets transactions in flight finish after SIGTERM
    shutdown_grace: float = 30.0
    #: load balancers (addresses or CIDR networks) whose PROXY protocol header names the
    #: client, as Exim's hosts_proxy: a connection from one must start with a header,
    #: and no relay window is ever opened for their own addresses
    trusted_proxies: tuple[str, ...] = ()
    #: seconds a trusted proxy has to send its PROXY header before the connection is closed
    proxy_timeout: float = 5.0
    tls: TlsSettings = field(default_factory=TlsSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    pop3: Pop3Settings = field(default_factory=Pop3Settings)
    imap: ImapSettings = field(default_factory=ImapSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    socketmap: SocketmapSettings = field(default_factory=SocketmapSettings)
    logwatch: LogwatchSettings = field(default_factory=LogwatchSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @property
    def store_url(self) -> str:
        if self.store:
            return self.store
        return f"sqlite://{(self.data_dir / 'grants.db').absolute()}"

    @property
    def local_domains(self) -> tuple[str, ...]:
        return self.domains or (self.hostname,)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


#: RELAYGATE_* variables and the settings they set.
ENV_VARS: dict[str, str] = {
    "RELAYGATE_DATA_DIR": "data_dir",
    "RELAYGATE_STORE": "store",
    "RELAYGATE_EXPIRY": "expiry",
    "RELAYGATE_RELAYCLIENT": "relayclient",
    "RELAYGATE_RULES": "rules_file",
    "RELAYGATE_DOMAINS": "domains",
    "RELAYGATE_SMTPROUTES": "smtproutes_file",
    "RELAYGATE_HOSTNAME": "hostname",
    "RELAYGATE_LOG_FORMAT": "log_format",
    "RELAYGATE_LOG_LEVEL": "log_level",
    "RELAYGATE_LOG_FILE": "log_file",
    "RELAYGATE_TRUSTED_PROXIES": "trusted_proxies",
}

#: envdir variables (relay-ctrl's) and the settings they set.
ENVDIR_VARS: dict[str, str] = {
    "RELAY_CTRL_DIR": "store",
    "RELAY_CTRL_EXPIRY": "expiry",
    "RELAY_CTRL_RELAYCLIENT": "relayclient",
    "RELAY_CTRL_LOG_IPS": "log_ips",
}

#: settings whose repeatable command-line option is named in the singular
_CLI_OPTIONS: dict[str, str] = {"trusted_proxies": "trusted-proxy", "domains": "domain"}

_CHOICES: dict[str, tuple[str, ...]] = {
    "log_format": ("text", "json"),
    "log_level": ("debug", "info", "warning", "error"),
    "metrics.status_page": ("loopback", "always", "off"),
}
_POSITIVE = {
    "expiry", "age_interval", "shutdown_grace", "proxy_timeout",
    "smtp.max_message_size", "smtp.max_recipients",
    "smtp.command_timeout", "smtp.data_timeout", "smtp.max_connections_per_ip",
    "smtp.bad_command_limit", "pop3.idle_timeout", "imap.idle_timeout",
    "pop3.bad_command_limit", "pop3.max_commands", "pop3.max_connections_per_ip",
    "smtp.max_refused_recipients",
    "imap.max_literal_unauth", "imap.max_literal", "imap.max_connections_per_ip",
    "auth.throttle_failures",
    "auth.throttle_window", "auth.throttle_lockout", "queue.lifetime", "queue.concurrency",
    "queue.per_destination", "queue.connect_timeout", "queue.command_timeout",
    "policy.idle_timeout", "policy.threads", "logwatch.interval",
    "socketmap.idle_timeout", "socketmap.threads",
}
#: lower bounds above zero, with why
_MINIMUM: dict[str, int] = {
    # one message may hold this much on its way to disk (servers/smtp/data.MESSAGE_BUFFER)
    "smtp.data_memory_limit": 1024 * 1024,
    # 0 turns sessions off; a negative time means nothing
    "logwatch.max_session": 0,
    # 0 turns the credential cache off
    "auth.cache_ttl": 0,
    "auth.cache_size": 1,
}
#: the longest credential-cache TTL (one day: a cached login outliving a day is an oversight)
AUTH_CACHE_MAX_TTL = 86_400
#: the most credential-cache entries (each ~200 bytes: 1,000,000 is ~200 MB)
AUTH_CACHE_MAX_SIZE = 1_000_000
#: upper bounds, with why
_MAXIMUM: dict[str, int] = {
    "auth.cache_ttl": AUTH_CACHE_MAX_TTL,
    "auth.cache_size": AUTH_CACHE_MAX_SIZE,
}


@dataclass(frozen=True)
class _Value:
    value: Any
    source: str
    line: int | None = None


def load_settings(
    *,
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
    envdir: str | Path | None = None,
) -> Settings:
    """Build Settings from all sources (see the module docstring for precedence)."""
    environ = {} if environ is None else environ
    layers: dict[str, _Value] = {}
    if envdir is not None:
        layers.update(_read_envdir(Path(envdir)))
    cfg = config_file if config_file is not None else environ.get("RELAYGATE_CONFIG") or None
    if cfg is not None:
        layers.update(_read_toml(Path(cfg)))
    for var, key in ENV_VARS.items():
        if var in environ:
            layers[key] = _Value(environ[var], f"${var}")
    for key, value in (cli or {}).items():
        if value is not None:
            option = _CLI_OPTIONS.get(key) or key.split('.')[-1].replace('_', '-')
            layers[key] = _Value(value, f"option --{option}")
    return _build(layers)


def _build(layers: Mapping[str, _Value]) -> Settings:
    hints = _hints()
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, v in layers.items():
        if key not in hints:
            raise ConfigError(f"unknown setting {key!r}", source=v.source, line=v.line)
        value = _convert(key, hints[key], v)
        if "." in key:
            sec, name = key.split(".", 1)
            sections.setdefault(sec, {})[name] = value
        else:
            top[key] = value
    section_hints = get_type_hints(Settings)
    for sec, values in sections.items():
        cls = section_hints[sec]
        top[sec] = cls(**values)
    if not top.get("hostname"):
        top["hostname"] = socket.gethostname() or "localhost"
    if "domains" in top:
        top["domains"] = tuple(_domain(d, layers["domains"]) for d in top["domains"])
    if top.get("store"):
        _store_url(top["store"], layers["store"])
    if top.get("trusted_proxies"):
        origin = layers["trusted_proxies"]
        top["trusted_proxies"] = _networks(top["trusted_proxies"], origin)
    if "ipv6_prefix" in top:
        from relaygate.addresses import check_ipv6_prefix

        try:
            check_ipv6_prefix(top["ipv6_prefix"])
        except ValueError as exc:
            v = layers["ipv6_prefix"]
            raise ConfigError(f"ipv6_prefix: {exc}", source=v.source, line=v.line,
                              value=v.value) from None
    settings = Settings(**top)
    if (settings.tls.cert is None) != (settings.tls.key is None):
        src = layers.get("tls.cert") or layers.get("tls.key")
        raise ConfigError("tls.cert and tls.key must be given together",
                          source=src.source if src else None, line=src.line if src else None)
    return settings


def _domain(d: str, origin: _Value) -> str:
    out = d.strip().rstrip(".").lower()
    if not out or not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?|\[[0-9a-f:.IPv]+\]", out,
                                   flags=re.IGNORECASE):
        raise ConfigError("bad domain name", source=origin.source, line=origin.line, value=d)
    return out


def _networks(specs: tuple[str, ...], origin: _Value) -> tuple[str, ...]:
    from relaygate.networks import Networks

    try:
        return Networks(specs).specs
    except ConfigError as exc:
        raise ConfigError(exc.message, source=origin.source, line=origin.line,
                          value=exc.value) from None


def _store_url(url: str, origin: _Value) -> None:
    from relaygate.stores import check_url

    try:
        check_url(url)
    except ConfigError as exc:
        raise ConfigError(exc.message, source=origin.source, line=origin.line,
                          value=exc.value) from None  # exc.value hides a password


def _hints() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, tp in get_type_hints(Settings).items():
        if dataclasses.is_dataclass(tp):
            for sub, stp in get_type_hints(tp).items():
                out[f"{name}.{sub}"] = stp
        else:
            out[name] = tp
    return out


def _convert(key: str, tp: Any, v: _Value) -> Any:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{key}: {why}", source=v.source, line=v.line, value=v.value)

    raw = v.value
    optional = False
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        tp = args[0]
    if optional and (raw is None or raw == ""):
        return None
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            s = raw.strip().lower()
            if s in ("1", "yes", "true", "on"):
                return True
            if s in ("", "0", "no", "false", "off"):
                return False
        raise bad("expected true or false")
    if key == "expiry":  # one reader of window lengths everywhere (relaygate.expiry)
        from relaygate.expiry import parse_expiry

        try:
            return float(parse_expiry(raw))
        except ValueError as exc:
            raise bad(str(exc)) from None
    if tp in (int, float):
        if isinstance(raw, bool):
            raise bad("expected a number")
        try:
            num = tp(raw) if not isinstance(raw, str) else tp(raw.strip())
        except (TypeError, ValueError):
            raise bad("expected a number") from None
        if isinstance(num, float) and num != num:
            raise bad("expected a number")
        if key in _POSITIVE and num <= 0:
            raise bad("must be greater than zero")
        if key in _MINIMUM and num < _MINIMUM[key]:
            raise bad(f"must be at least {_MINIMUM[key]}")
        if key in _MAXIMUM and num > _MAXIMUM[key]:
            raise bad(f"must be at most {_MAXIMUM[key]}")
        return num
    if tp is str:
        if not isinstance(raw, str):
            raise bad("expected a string")
        if key in _CHOICES and raw not in _CHOICES[key]:
            raise bad(f"must be one of {', '.join(_CHOICES[key])}")
        return raw
    if tp is Path:
        if not isinstance(raw, (str, Path)) or str(raw) == "":
            raise bad("expected a path")
        return Path(raw)
    if get_origin(tp) is tuple:
        (elem,) = get_args(tp)[:1]
        if isinstance(raw, str):
            items: list[Any] = [s for s in re.split(r"[,\s]+", raw.strip()) if s]
        elif isinstance(raw, (list, tuple)):
            items = list(raw)
        else:
            raise bad("expected a list")
        if items == ["off"]:
            items = []
        out = []
        for item in items:
            if isinstance(item, (bool, dict, list)):
                raise bad(f"bad list item {item!r}")
            try:
                out.append(elem(item))
            except (TypeError, ValueError):
                raise bad(f"bad list item {item!r}") from None
        return tuple(out)
    raise bad("unsupported setting type")


def _read_toml(path: Path) -> dict[str, _Value]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("configuration file not found", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file ({exc})", source=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(f"TOML syntax error: {exc}", source=str(path),
                          line=int(m.group(1)) if m else None) from None
    lines = text.splitlines()
    out: dict[str, _Value] = {}
    for k, val in data.items():
        if isinstance(val, dict):
            for sk, sval in val.items():
                if isinstance(sval, dict):
                    raise ConfigError(f"unexpected table [{k}.{sk}]", source=str(path))
                key = f"{k}.{sk}"
                out[key] = _Value(sval, str(path), _find_line(lines, k, sk))
        else:
            out[k] = _Value(val, str(path), _find_line(lines, None, k))
    return out


def _find_line(lines: list[str], section: str | None, key: str) -> int | None:
    """The line of ``key`` (in ``[section]``, or written ``section.key =`` or as an
    inline table ``section = {...}`` at the top), or None."""
    current: str | None = None
    pat = re.compile(rf"^\s*{re.escape(key)}\s*=")
    dotted = inline = None
    if section is not None:
        dotted = re.compile(rf"^\s*{re.escape(section)}\s*\.\s*{re.escape(key)}\s*=")
        inline = re.compile(rf"^\s*{re.escape(section)}\s*=")
    fallback: int | None = None
    for i, line in enumerate(lines, 1):
        s = line.strip()
        if s.startswith("[") and not s.startswith("[[") and "]" in s:
            current = s[1 : s.index("]")].strip()
            continue
        if current == section and pat.match(line):
            return i
        if current is None and dotted is not None and inline is not None:
            if dotted.match(line):
                return i
            if fallback is None and inline.match(line):
                fallback = i
    return fallback


def read_envdir(path: Path) -> dict[str, str | None]:
    """Read a daemontools envdir: file name = variable, first line = value.

    As ``envdir`` does: an empty file removes the variable (value None), trailing
    spaces and tabs are dropped, NUL bytes become newlines. Files whose names
    start with a dot are ignored.
    """
    if not path.is_dir():
        raise ConfigError("envdir is not a directory", source=str(path))
    out: dict[str, str | None] = {}
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        try:
            data = entry.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read ({exc})", source=str(entry)) from None
        if not data:
            out[entry.name] = None
            continue
        first = data.split(b"\n", 1)[0].rstrip(b" \t").replace(b"\0", b"\n")
        try:
            out[entry.name] = first.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("value is not UTF-8", source=str(entry), line=1) from None
    return out


def _read_envdir(path: Path) -> dict[str, _Value]:
    out: dict[str, _Value] = {}
    for name, value in read_envdir(path).items():
        key = ENVDIR_VARS.get(name)
        if key is None or value is None:
            continue
        src = str(path / name)
        if name == "RELAY_CTRL_DIR":
            if not value:
                raise ConfigError("RELAY_CTRL_DIR is empty", source=src, line=1)
            out[key] = _Value(f"spool://{os.path.abspath(value)}", src, 1)
        elif name == "RELAY_CTRL_LOG_IPS":
            out[key] = _Value(bool(value), src, 1)
        else:
            out[key] = _Value(value, src, 1)
    return out
