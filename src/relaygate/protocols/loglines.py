"""Login lines of POP3/IMAP servers: syslog, Dovecot's own log, journald export.

Theory of operation
-------------------
``relaygate watch-log`` opens a relay window when a POP3/IMAP server logs a
successful login. A log is full of text that clients choose (a MAIL FROM, a
HELO name, a failed user name), so a line only counts when *both* the daemon
tag and the whole message have exactly the shape that daemon writes:

1. the line is split into a :class:`LogRecord` (tag, pid, message) by a header
   parser anchored at the start of the line: RFC 3164 syslog as written to
   files (``Mmm dd hh:mm:ss [host] tag[pid]: message``, with or without the
   host; also RFC 3339 timestamps, and RFC 5424's ``<pri>1 ts host app procid
   msgid sd message``); Solaris' ``[ID nnn facility.level]`` message tag is
   removed; Dovecot's own ``log_path`` file (``Mmm dd hh:mm:ss pop3-login:
   Info: message``); Qpopper's own log file (``ctime [pid] message``); Apple
   Mail Server's log file (``Mmm dd yyyy hh:mm:ss message``); or one entry of
   journald's export format (``SYSLOG_IDENTIFIER``, ``SYSLOG_PID``, ``MESSAGE``;
   https://systemd.io/JOURNAL_EXPORT_FORMATS/);
2. a pattern applies only to its own daemon tags (full match), and its message
   regex must match the *whole* message (``re.fullmatch``); fields a client
   could influence (user names, reverse-DNS names) exclude the characters that
   would let them imitate the fields after them, and lines where a key such as
   ``rip=`` appears twice are ignored as ambiguous.

So ``postfix/smtpd[1]: ... from=<dovecot: imap-login: Login: user=<x>, ...>``
never matches: its tag is ``postfix/smtpd``. Syslog daemons escape control
characters, so a client cannot start a new line.

A pattern has a *kind*: ``login`` (one line with the client address: opens a
window), ``connect`` (the address of a connection, remembered by daemon and
pid), ``auth`` (the success of that connection, later, same daemon and pid:
opens the window for the remembered address), ``logout`` (a session ended).
:class:`relaygate.protocols.logsessions.LoginTracker` turns these into
windows; :meth:`LoginMatcher.classify` only reads one record.

Custom patterns (``NAME=REGEX``) are full-matched against ``TAG[PID]: MESSAGE``
(``TAG: MESSAGE`` when there is no pid): the part of a syslog line after the
timestamp and host. They must have a named group ``ip`` and may have ``user``.

Everything here works on bytes and never touches a file: the watcher in
``relaygate.integrations.logwatch`` feeds it.

Speed: most lines of a mail log belong to daemons no pattern knows (Postfix).
The matcher remembers, per tag seen, which patterns apply to it (a small
bounded cache), so such a line costs one header regex and one dict lookup.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from relaygate.addresses import parse_ip
from relaygate.errors import ConfigError, InvalidAddress

#: Longest log line looked at. syslog's classic limit is 1024 bytes and
#: rsyslog's default 8 KiB; longer lines are dropped, not truncated (a cut
#: line could end where a forged one would).
MAX_LINE_LENGTH = 8192

#: journald export: largest field accepted (journald's own default line max is 48 KiB).
MAX_JOURNAL_FIELD = 64 * 1024
#: journald export: most fields in one entry (journald entries carry ~30).
MAX_JOURNAL_FIELDS = 256

_TS_BSD = rb"[A-Z][a-z]{2} [ 0-9]?[0-9] [0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
_TS_ISO = (rb"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:[.,][0-9]{1,9})?"
           rb"(?:Z|[+-][0-9]{2}:?[0-9]{2})?")
_TS = rb"(?:" + _TS_BSD + rb"|" + _TS_ISO + rb")"
_TAGCHARS = rb"[A-Za-z0-9_./-]{1,64}"
_TAG = rb"(?P<tag>" + _TAGCHARS + rb")(?:\[(?P<pid>[0-9]{1,10})\])?"

#: ``TIMESTAMP HOST TAG[PID]: MESSAGE``; a host never ends in ":" (that is a
#: host-less line's ``tag:``), so the two readings never overlap.
_SYSLOG = re.compile(_TS + rb" (?P<host>[^ \t]{0,254}[^ \t:]) " + _TAG + rb": (?P<msg>.*)")
#: The same header without the message: where it matches, _SYSLOG fullmatches the
#: line with the same tag (``.*`` takes any rest of a line), so a line whose tag no
#: pattern knows is skipped before any record is built.
_SYSLOG_HEAD = re.compile(_TS + rb" [^ \t]{0,254}[^ \t:] " + _TAG + rb": ")
#: ``TIMESTAMP TAG[PID]: MESSAGE``: syslog without the host (some syslogds, and
#: Dovecot's own ``log_path`` file, whose tag may be ``imap(user)<pid><session>``).
_SYSLOG_NOHOST = re.compile(_TS + rb" " + _TAG + rb": (?P<msg>.*)")
_DOVECOT_LOG = re.compile(
    _TS + rb" (?P<tag>[a-z0-9-]{1,32}(?:\([^()\s]{0,255}\)(?:<[0-9]{1,10}>)?"
    rb"(?:<[^<>\s]{0,64}>)?)?): (?P<msg>.*)")
#: RFC 5424 as rsyslog writes it to files (``RSYSLOG_SyslogProtocol23Format``):
#: ``<PRI>1 TIMESTAMP HOST APP-NAME PROCID MSGID SD MSG``; SD is ``-`` or elements.
_RFC5424 = re.compile(
    rb"(?:<[0-9]{1,3}>)?1 " + _TS_ISO + rb" [^ ]{1,255} (?P<tag>" + _TAGCHARS + rb") "
    rb"(?:(?P<pid>[0-9]{1,10})|-|[^ ]{1,128}) [^ ]{1,32} "
    rb"(?:-|(?:\[[^\]\x00-\x1f]*\])+) ?(?:\xef\xbb\xbf)?(?P<msg>.*)")
#: Solaris syslogd's message ID, put in front of the message: ``[ID 813155 mail.info] ``.
_SOLARIS_ID = re.compile(rb"\[ID [0-9]{1,12} [a-z0-9]{1,16}\.[a-z]{1,8}\] ")
#: Qpopper's own log file (``-t FILE``; pop_log.c writes ``ctime() [pid] message``).
_QPOPPER_LOG = re.compile(
    rb"[A-Z][a-z]{2} [A-Z][a-z]{2} [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2} [0-9]{4} "
    rb"\[(?P<pid>[0-9]{1,10})\] (?P<msg>.*)")
#: Apple Mail Server's own log files (/Library/Logs/MailService/AppleMailServer.*.log):
#: ``Mmm dd yyyy hh:mm:ss message``.
_APPLE_LOG = re.compile(
    rb"[A-Z][a-z]{2} [ 0-9]?[0-9] [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} (?P<msg>.*)")

FORMATS = ("auto", "syslog", "dovecot-log", "qpopper-log", "apple-log", "journal-export")

#: the tag given to records of Qpopper's and Apple's own log files
QPOPPER_FILE_TAG = b"popper"
APPLE_FILE_TAG = b"AppleMailServer"


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One log message: the daemon tag, its pid (if any) and the message text."""

    tag: bytes
    pid: bytes | None
    message: bytes

    def tagged(self) -> bytes:
        """``TAG[PID]: MESSAGE`` (what custom patterns see)."""
        if self.pid is not None:
            return self.tag + b"[" + self.pid + b"]: " + self.message
        return self.tag + b": " + self.message


@dataclass(frozen=True, slots=True)
class LoginEvent:
    """A successful login seen in a log: who, from where, found by which pattern."""

    ip: str
    user: str | None
    domain: str | None
    service: str
    pattern: str
    #: a session's window kept open (not a new login)
    refresh: bool = False


#: the kinds of line a pattern recognises
KINDS = ("login", "connect", "auth", "logout")


@dataclass(frozen=True, slots=True)
class LogEvent:
    """What one line says: a login, a connection, a later success, or a session's end.

    ``key`` correlates lines: for ``connect``/``auth`` it is (family, tag, pid);
    for ``login``/``logout`` of a pattern that keeps sessions it is the session
    group (e.g. family, service, user), and ``sid`` names one session in it
    when the server logs an id (Dovecot's ``session=<...>``).
    """

    kind: str
    pattern: str
    family: str
    ip: str | None
    user: str | None
    domain: str | None
    service: str
    key: tuple[bytes | str, ...] = ()
    sid: bytes | None = None
    sessions: bool = False

    def login(self) -> LoginEvent:
        assert self.ip is not None
        return LoginEvent(self.ip, self.user, self.domain, self.service, self.pattern)


def _strip_solaris_id(msg: bytes) -> bytes:
    if msg.startswith(b"[ID "):
        m = _SOLARIS_ID.match(msg)
        if m is not None:
            return msg[m.end():]
    return msg


def parse_syslog(line: bytes) -> LogRecord | None:
    """A syslog file line (RFC 3164 with or without host, RFC 3339 or 5424), or None."""
    m = _SYSLOG.fullmatch(line) or _SYSLOG_NOHOST.fullmatch(line)
    if m is None:
        m = _RFC5424.fullmatch(line)
        if m is None:
            return None
    return LogRecord(m["tag"], m["pid"], _strip_solaris_id(m["msg"]))


def parse_dovecot_log(line: bytes) -> LogRecord | None:
    """A line of Dovecot's own log file (``log_path``), or None."""
    m = _DOVECOT_LOG.fullmatch(line)
    if m is None:
        return None
    return LogRecord(m["tag"], None, m["msg"])


def parse_qpopper_log(line: bytes) -> LogRecord | None:
    """A line of Qpopper's own log file (``ctime [pid] message``), or None."""
    m = _QPOPPER_LOG.fullmatch(line)
    if m is None:
        return None
    return LogRecord(QPOPPER_FILE_TAG, m["pid"], m["msg"])


def parse_apple_log(line: bytes) -> LogRecord | None:
    """A line of Apple Mail Server's own log file, or None."""
    m = _APPLE_LOG.fullmatch(line)
    if m is None:
        return None
    return LogRecord(APPLE_FILE_TAG, None, m["msg"])


def record_from_journal(entry: dict[bytes, bytes]) -> LogRecord | None:
    """The record of a journald entry (SYSLOG_IDENTIFIER, SYSLOG_PID or _PID, MESSAGE)."""
    tag = entry.get(b"SYSLOG_IDENTIFIER")
    msg = entry.get(b"MESSAGE")
    if not tag or msg is None or re.fullmatch(_TAGCHARS, tag) is None:
        return None
    pid = entry.get(b"SYSLOG_PID") or entry.get(b"_PID")
    if pid is not None and re.fullmatch(rb"[0-9]{1,10}", pid) is None:
        pid = None
    return LogRecord(tag, pid, msg)


# -- patterns ------------------------------------------------------------------

#: An address as servers print it: digits, hex, colons, dots (validated by parse_ip after).
_IPCHARS = rb"[0-9A-Fa-f:.]{2,45}"
_IP = rb"(?P<ip>" + _IPCHARS + rb")"
#: A reverse-DNS name as servers print it: no space or bracket, so it cannot imitate "[ip]".
_HOST = rb"[^\s\[\]()]{1,255}"
#: Free text to the end of the message (no control characters).
_REST = rb"[^\x00-\x1f]*"


@dataclass(frozen=True)
class Pattern:
    """A line shape: daemon tags (full match) and the whole message (full match).

    ``unique`` lists byte strings that must occur exactly once in the message
    (a second ``rip=`` means someone tried to smuggle one in). ``family`` is
    the server (what ``--builtin`` selects); ``kind`` what the line says (see
    :data:`KINDS`); ``sessions``: the server logs logouts, so a login opens a
    session that keeps its window open until the logout.
    """

    name: str
    tag: re.Pattern[bytes]
    message: re.Pattern[bytes]
    unique: tuple[bytes, ...] = ()
    #: match against ``TAG[PID]: MESSAGE`` instead (custom patterns)
    tagged: bool = False
    kind: str = "login"
    family: str = ""
    sessions: bool = False
    #: where the format comes from (shown by the pattern tester)
    source: str = ""

    def match(self, record: LogRecord) -> re.Match[bytes] | None:
        if self.tagged:
            return self.message.fullmatch(record.tagged())
        if self.tag.fullmatch(record.tag) is None:
            return None
        return self.match_message(record)

    def match_message(self, record: LogRecord) -> re.Match[bytes] | None:
        """The message check alone (the caller has checked the tag)."""
        m = self.message.fullmatch(record.message)
        if m is None:
            return None
        for key in self.unique:
            if record.message.count(key) != 1:
                return None
        return m


def _p(name: str, tag: bytes, message: bytes, *, kind: str = "login", family: str = "",
       unique: tuple[bytes, ...] = (), sessions: bool = False, source: str = "") -> Pattern:
    return Pattern(name, re.compile(tag), re.compile(message), unique, False, kind,
                   family or name, sessions, source)


_DOVECOT_ELEMENTS = (
    rb"user=<(?P<user>[^<>\x00-\x1f]{0,255})>, method=[A-Za-z0-9_-]{1,32}, "
    rb"rip=" + _IP + rb", lip=" + _IPCHARS + rb"(?:, " + _REST + rb")?"
)
_DOVECOT_FIELDS = rb"Login: " + _DOVECOT_ELEMENTS
_DOVECOT_SERVICE = rb"(?P<service>pop3|imap|submission|managesieve)"
#: proxy(USER): started proxying to HOST:PORT[/REMOTEUSER][ (master M)]: ELEMENTS
_DOVECOT_PROXY = (
    rb"proxy\((?P<puser>[^()\s<>]{1,255})\): started proxying to [^\s<>]{1,300}:[0-9]{1,5}"
    rb"(?:/[^\s()<>]{1,255})?(?: \(master [^()\s<>]{1,255}\))?: " + _DOVECOT_ELEMENTS
)
_DOVECOT_PROXY_END = (
    rb"proxy\((?P<user>[^()\s<>]{1,255})\): disconnecting " + _IP + rb"(?: \(" + _REST
    + rb"\))?"
)
#: The mail process (imap/pop3) of a logged-in user: "imap(alice)" (2.2), with
#: "<pid><session>" (2.3's default mail_log_prefix), then how the session ended.
_DOVECOT_MAIL_PREFIX = (
    rb"(?P<service>imap|pop3)\((?P<user>[^()\x00-\x1f]{1,255})\)(?:<(?P<mpid>[0-9]{1,10})>)?"
    rb"(?:<(?P<sid>[^<>\s]{0,64})>)?"
)
_DOVECOT_END = rb"(?:Disconnected|Logged out|Connection closed)\b" + _REST

_COURIER_TAG = rb"(?:courier)?(?:pop3|imap)(?:login|d|d-ssl)"
_UW_TAG = rb"(?:ipop3s?d|imaps?d)"
_UW_HOSTFIELD = rb"host=(?:" + _HOST + rb" )?\[" + _IP + rb"\]"
_QPOPPER_TAG = rb"(?:in\.)?q?popper"
#: "connect from ADDR" as tcpd (TCP wrappers) logs it under the wrapped daemon's
#: name and pid (tcpd then execs the daemon, so the pid is the daemon's).
_TCPD_CONNECT = rb"connect from " + _IP

_BUILTIN_LIST: tuple[Pattern, ...] = (
    # -- Dovecot ---------------------------------------------------------------------
    _p("dovecot", rb"dovecot",
       # Dovecot 1.x-2.3 via syslog/journald: "dovecot: imap-login: Login: user=<..>,
       # method=.., rip=.., lip=.., mpid=.., TLS, session=<..>" (login_log_format_elements,
       # default order).
       _DOVECOT_SERVICE + rb"-login: (?:Info: )?" + _DOVECOT_FIELDS,
       unique=(b"rip=", b"user=<"), sessions=True,
       source="Dovecot src/login-common/client-common.c (login_log_format_elements)"),
    _p("dovecot-log", rb"(?:pop3|imap|submission|managesieve)-login",
       # Dovecot 2.x's own log_path file: "pop3-login: Info: Login: user=<alice>, ...".
       rb"Info: " + _DOVECOT_FIELDS, family="dovecot-log",
       unique=(b"rip=", b"user=<"), sessions=True,
       source="Dovecot log_path file: the same message after 'SERVICE-login: Info: '"),
    _p("dovecot-proxy", rb"dovecot",
       # Dovecot proxy/director: the login happened here, the client is rip=.
       # login-proxy: "proxy(%s): started proxying to %s:%u" + "/remoteuser", " (master %s)",
       # then client_log's ": " + the login_log_format_elements.
       _DOVECOT_SERVICE + rb"-login: (?:Info: )?" + _DOVECOT_PROXY,
       family="dovecot", unique=(b"rip=", b"user=<"), sessions=True,
       source="Dovecot src/*-login/*-proxy.c: proxy(%s): started proxying to %s:%u"),
    _p("dovecot-log-proxy", rb"(?:pop3|imap|submission|managesieve)-login",
       rb"Info: " + _DOVECOT_PROXY, family="dovecot-log",
       unique=(b"rip=", b"user=<"), sessions=True,
       source="the proxy line in Dovecot's log_path file"),
    _p("dovecot-proxy-end", rb"dovecot",
       _DOVECOT_SERVICE + rb"-login: (?:Info: )?" + _DOVECOT_PROXY_END,
       kind="logout", family="dovecot",
       source="Dovecot login-proxy.c: proxy(%s): disconnecting %s (%s)"),
    _p("dovecot-log-proxy-end", rb"(?:pop3|imap|submission|managesieve)-login",
       rb"Info: " + _DOVECOT_PROXY_END, kind="logout", family="dovecot-log",
       source="the proxy end line in Dovecot's log_path file"),
    _p("dovecot-end", rb"dovecot",
       # The mail process ends: "imap(alice): Disconnected: Logged out in=.. out=..",
       # "imap(alice)<4242><sess>: Logged out ...", "Disconnected for inactivity", ...
       _DOVECOT_MAIL_PREFIX + rb": (?:Info: )?" + _DOVECOT_END,
       kind="logout", family="dovecot",
       source="Dovecot src/imap/imap-client.c, src/pop3/pop3-client.c (client_destroy)"),
    _p("dovecot-log-end", _DOVECOT_MAIL_PREFIX,
       rb"Info: " + _DOVECOT_END, kind="logout", family="dovecot-log",
       source="the mail process' end in Dovecot's log_path file"),
    # -- Courier ---------------------------------------------------------------------
    _p("courier", _COURIER_TAG,
       # "pop3d: LOGIN, user=alice, ip=[::ffff:192.0.2.1], port=[4321]" (also imapd,
       # pop3d-ssl, imapd-ssl, courierpop3login ...; imapd adds ", protocol=IMAP").
       rb"LOGIN, user=(?P<user>[^,\s]{1,255}), ip=\[" + _IP + rb"\](?:, " + _REST + rb")?",
       unique=(b"ip=[",), sessions=True,
       source="Courier imap/pop3dserver.c, imapd.c: LOGIN, user=%s, ip=[%s], port=[%s]"),
    _p("courier-end", _COURIER_TAG,
       # "imapd: LOGOUT, user=alice, ip=[::ffff:192.0.2.1], headers=0, body=0, rcvd=..",
       # TIMEOUT and DISCONNECTED the same way.
       rb"(?:LOGOUT|TIMEOUT|DISCONNECTED), user=(?P<user>[^,\s]{1,255}), ip=\[" + _IP
       + rb"\](?:, " + _REST + rb")?",
       kind="logout", family="courier", unique=(b"ip=[",),
       source="Courier imap/imapd.c, pop3dserver.c: LOGOUT|TIMEOUT|DISCONNECTED, user=.."),
    # -- UW imapd/ipop3d -----------------------------------------------------------
    _p("uw", _UW_TAG,
       # "Login user=alice host=name [192.0.2.1]" (+ " nmsgs=0/0" for ipop3d),
       # "Authenticated user=..", "Auth user=..", "APOP user=..". Solaris syslogd puts
       # "[ID 813155 mail.info] " in front (removed by the header parser).
       rb"(?:Login|Authenticated|Auth|APOP|Preauthenticated) user=(?P<user>[^\s\[\]]{1,255}) "
       + _UW_HOSTFIELD + rb"(?: (?:nmsgs=[0-9]{1,10}/[0-9]{1,10}|mech=[A-Za-z0-9_-]{1,32}))*",
       unique=(b"host=",), sessions=True,
       source="UW imap-2007 src/imapd/imapd.c, src/ipopd/ipop3d.c: %s user=%.80s host=%.80s"),
    _p("uw-end", _UW_TAG,
       # "Logout user=alice host=.. [ip]", "Autologout user=..", "Killed (lost mailbox
       # lock) user=..", "Command stream end of file, while reading line user=.." ...
       rb"(?!Login |Authenticated |Auth |APOP |Preauthenticated )"
       rb"[A-Z][^=\x00-\x1f]{0,120} user=(?P<user>[^\s\[\]]{1,255}) " + _UW_HOSTFIELD
       + rb"(?: [a-z]{1,16}=[0-9/]{1,24})*",
       kind="logout", family="uw", unique=(b"host=",),
       source="UW imapd.c/ipop3d.c: Logout|Autologout|Killed (..)|... user=%.80s host=%.80s"),
    # -- Qpopper -------------------------------------------------------------------
    _p("qpopper", _QPOPPER_TAG,
       # "(v4.0.9) POP login by user "alice" at (host.example.org) 192.0.2.1".
       rb"\(v[^()\s]{1,32}\) POP login by user \"(?P<user>[^\"\s]{1,255})\" at \((?:"
       + _HOST + rb")?\) " + _IP + rb"(?: \[[^\]\x00-\x1f]{0,255}\])?",
       unique=(b"POP login by user",),
       source="Qpopper 4 popper/pop_pass.c: POP login by user \"%s\" at (%s) %s"),
    _p("qpopper-stats", _QPOPPER_TAG + rb"|" + QPOPPER_FILE_TAG,
       # pop_updt.c at the end of a session (-s): "Stats: %s %d %ld %d %ld %s %s" (user,
       # deleted, bytes deleted, kept, bytes kept, client host, client address); via
       # syslog or in Qpopper's own log file. Qpopper 4 may add " [file.c:line]".
       rb"Stats: (?P<user>[^\s]{1,255}) [0-9]{1,10} [0-9]{1,20} [0-9]{1,10} [0-9]{1,20} "
       + _HOST + rb" " + _IP + rb"(?: \[[^\]\x00-\x1f]{0,255}\])?",
       family="qpopper", unique=(b"Stats: ",),
       source="Qpopper popper/pop_updt.c: Stats: %s %d %ld %d %ld %s %s"),
    # -- Cyrus ---------------------------------------------------------------------
    _p("cyrus", rb"(?:cyrus/)?(?:imap|pop3)(?:d|s)?",
       # "login: host.example.org [192.0.2.1] alice plaintext User logged in SESSIONID=<..>".
       rb"login: (?:" + _HOST + rb" )?\[" + _IP + rb"\] (?P<user>[^\s\[\]]{1,255}) "
       rb"[^\s\[\]]{1,64} User logged in(?: " + _REST + rb")?",
       unique=(b"User logged in",),
       source="Cyrus imap/imapd.c, pop3d.c: login: %s %s %s%s %s"),
    # -- GNU pop3d (GNU Mailutils) ---------------------------------------------------
    # Mailutils never logs the client address itself: it is tcpd's "connect from" line
    # under the same name and pid, then pop3d/user.c's success line.
    _p("gnu-pop3d-connect", rb"(?:gnu-)?pop3d", _TCPD_CONNECT, kind="connect",
       family="gnu-pop3d", source="tcpd (TCP wrappers): connect from %s"),
    _p("gnu-pop3d", rb"(?:gnu-)?pop3d",
       # mailutils 2.x/3.x: "user `alice' logged in with mailbox `mbox:/var/mail/alice' (3
       # messages)"; 0.x/1.x: "User 'alice' logged in with mailbox '...' (3 msgs)".
       rb"[Uu]ser [`']?(?P<user>[^`'\s]{1,255})'? logged in with mailbox " + _REST,
       kind="auth", source="GNU Mailutils pop3d/user.c: user `%s' logged in with mailbox `%s'"),
    # -- vpopmail's vchkpw (qmail) ---------------------------------------------------
    _p("vchkpw", rb"vpopmail",
       # vchkpw.c, openlog(LOG_NAME="vpopmail", LOG_PID): "vchkpw-pop3: (PLAIN) login success
       # alice@example.org:192.0.2.1"; pop3s, imap, imaps the same (smtp, submission and
       # webmail logins are not POP/IMAP logins). get_remote_ip() strips "::ffff:".
       rb"vchkpw-(?P<service>pop3s?|imaps?): \([A-Z0-9-]{1,14}\) login success "
       rb"(?P<user>[^@\s:]{1,255}@[^@\s:]{1,255}):" + _IP,
       source="vpopmail vchkpw.c: %s: (%s) login success %s@%s:%s"),
    _p("vchkpw-system", rb"vpopmail",
       rb"vchkpw-(?P<service>pop3s?|imaps?): system password login success "
       rb"(?P<user>[^@\s:]{1,255}):" + _IP,
       family="vchkpw", source="vpopmail vchkpw.c: %s: system password login success %s:%s"),
    # -- vm-pop3d --------------------------------------------------------------------
    _p("vm-pop3d", rb"vm-pop3d",
       # 1.1.7: "User 'alice' logged in from 192.0.2.1, nmsgs=3" (also 'alice@example.org',
       # "APOP User ...").
       rb"(?:APOP )?User '(?P<user>[^'\s]{1,255})' logged in from " + _IP
       + rb", nmsgs=[0-9]{1,10}",
       source="vm-pop3d 1.1.7 user.c/apop.c: User '%s' logged in from %s, nmsgs=%d"),
    _p("vm-pop3d-connect", rb"vm-pop3d", rb"(?:Connect|connect) from " + _IP,
       kind="connect", family="vm-pop3d",
       source="vm-pop3d vm-pop3d.c: Connect from %s (and tcpd's connect from)"),
    _p("vm-pop3d-auth", rb"vm-pop3d",
       # older vm-pop3d: "User 'alice' logged in", "User 'alice' of 'example.org' logged in",
       # APOP: "User alice logged in with mailbox /var/spool/mail/alice".
       rb"User (?:'(?P<user>[^'\s]{1,255})'(?: of '[^'\s]{1,255}')? logged in"
       rb"|(?P<user2>[^'\s]{1,255}) logged in with (?:shared )?mailbox [^\x00-\x1f]{1,1024})",
       kind="auth", family="vm-pop3d",
       source="vm-pop3d user.c: User '%s' logged in; apop.c: User %s logged in with %smailbox"),
    # -- popa3d ----------------------------------------------------------------------
    _p("popa3d-connect", rb"popa3d", rb"(?:Session|connect) from " + _IP,
       kind="connect", family="popa3d",
       source="popa3d standalone.c: Session from %s (child); tcpd: connect from %s"),
    _p("popa3d", rb"popa3d",
       rb"Authentication passed for (?P<user>[^\s@]{1,255}(?:@[^\s@]{1,255})?)",
       kind="auth", source="popa3d pop_auth.c log_pop_auth: Authentication %s for %s[@%s]"),
    _p("popa3d-patched", rb"popa3d",
       # popa3d with pop-before-smtp's contrib patch: "Authentication passed for alice --
       # [192.0.2.1]".
       rb"Authentication passed for (?P<user>[^\s@]{1,255}(?:@[^\s@]{1,255})?) -- \["
       + _IP + rb"\]",
       family="popa3d", source="popa3d + pop-before-smtp contrib patch: ... for %s -- [%s]"),
    # -- Perdition -------------------------------------------------------------------
    _p("perdition", rb"perdition(?:\.[a-z0-9]{1,16})?",
       # perdition.c perdition_log_auth (1.17+): "Auth: FROM:PORT->TO:PORT client-secure=..
       # authorisation_id=.. authentication_id="alice" server="h:110" protocol=POP3
       # server-secure=.. status="ok"" (FROM is getnameinfo(NI_NUMERICHOST)).
       rb"Auth: " + _IP + rb":[0-9]{1,5}->" + _IPCHARS + rb":[0-9]{1,5} "
       rb"client-secure=(?:plaintext|ssl|starttls) authorisation_id=(?:NONE|\"[^\"\x00-\x1f]*\") "
       rb"authentication_id=\"(?P<user>[^\"\x00-\x1f]{0,255})\"(?: passwd=\"[^\x00-\x1f]*\")? "
       rb"server=\"[^\"\x00-\x1f]{0,300}\" protocol=(?P<service>[A-Z0-9]{1,16})"
       rb"(?:,[A-Z0-9]{1,16})* "
       rb"server-secure=(?:plaintext|ssl|starttls) status=\"ok\"",
       source="perdition perdition.c perdition_log_auth: Auth:%s client-secure=%s ..."),
    _p("perdition-old", rb"perdition(?:\.[a-z0-9]{1,16})?",
       # perdition 1.x: "Auth: 192.0.2.1->198.51.100.1 user="alice" [passwd=".."] server=".."
       # port="110" status="ok"".
       rb"Auth: " + _IP + rb"->" + _IPCHARS + rb" user=\"(?P<user>[^\"\x00-\x1f]{0,255})\""
       rb"(?: passwd=\"[^\x00-\x1f]*\")? server=\"[^\"\x00-\x1f]{0,300}\" "
       rb"port=\"(?P<port>[0-9]{1,5})\" status=\"ok\"",
       family="perdition",
       source="perdition 1.x perdition.c: Auth: %suser=\"%s\" passwd=\"%s\" server=..."),
    # -- solid-pop3d -----------------------------------------------------------------
    _p("solid-pop3d", rb"(?:spop3d|solid-pop3d)",
       # built with --enable-logextend: "user alice authenticated - 192.0.2.1" (or
       # "- host.example.org (192.0.2.1)" with RESOLVE_HOSTNAME; "mapped user ..."; "...
       # authenticated through APOP - ...").
       rb"(?:mapped )?user (?P<user>[^\s]{1,40}) authenticated(?: through APOP)? - "
       rb"(?:" + _HOST + rb" \(" + _IP + rb"\)|(?P<ip2>" + _IPCHARS + rb"))",
       source="solid-pop3d src/main.c (LOG_EXTEND): user %.40s authenticated - %.384s"),
    _p("solid-pop3d-connect", rb"(?:spop3d|solid-pop3d)",
       rb"connect from (?:" + _HOST + rb" \(" + _IP + rb"\)|(?P<ip2>" + _IPCHARS + rb"))",
       kind="connect", family="solid-pop3d",
       source="solid-pop3d src/main.c, standalone.c: connect from %.384s"),
    _p("solid-pop3d-auth", rb"(?:spop3d|solid-pop3d)",
       rb"(?:mapped )?user (?P<user>[^\s]{1,40}) authenticated(?: through APOP)?",
       kind="auth", family="solid-pop3d",
       source="solid-pop3d src/main.c (without LOG_EXTEND): user %.40s authenticated"),
    # -- teapop ----------------------------------------------------------------------
    _p("teapop", rb"teapop(?:_ssl)?",
       # pop_auth.c: "Successful login for alice [local ip] from host.example.org [192.0.2.1]"
       # (alice@example.org with VPOP; the host is "unknown" when it does not resolve).
       rb"Successful login for (?P<user>[^\s\[\]]{1,255}) \[" + _IPCHARS + rb"\] from "
       + _HOST + rb" \[" + _IP + rb"\]",
       source="teapop pop_auth.c: Successful login for %s [%s] from %s [%s]"),
    # -- cucipop ---------------------------------------------------------------------
    _p("cucipop", rb"cucipop",
       # At the end of a session: "alice 192.0.2.1 3, 1 (2048), 2 (4096)" (user, address,
       # messages, deleted (bytes), kept (bytes)). No cucipop source was at hand: this
       # shape is the one pop-before-smtp's pattern file documents from a real log.
       rb"(?P<user>[^\s,()]{1,255}) " + _IP
       + rb" [0-9]{1,10}, [0-9]{1,10} \([0-9]{1,20}\), [0-9]{1,10} \([0-9]{1,20}\)",
       source="pop-before-smtp-conf.pl's cucipop sample (no source available)"),
    # -- Apple Mail Server (Mac OS X Server) -------------------------------------------
    _p("apple", APPLE_FILE_TAG,
       # AppleMailServer.IMAP.log: "... IMAP User "alice" log on successful from 192.0.2.1".
       # Closed source: the shape is the one pop-before-smtp documents from a real log.
       # Nothing before it may contain a quote, so a user name cannot start a fake one.
       rb"[^\"\x00-\x1f]{0,200}?(?P<service>IMAP|POP3?) User \"(?P<user>[^\"\s]{1,255})\" "
       rb"log on successful from " + _IP,
       unique=(b"log on successful",),
       source="pop-before-smtp-conf.pl's Apple IMAP Mail Server sample (closed source)"),
)

#: Built-in patterns, by family (what ``--builtin`` selects).
BUILTIN: dict[str, tuple[Pattern, ...]] = {}
for _pat in _BUILTIN_LIST:
    BUILTIN.setdefault(_pat.family, ())
    BUILTIN[_pat.family] += (_pat,)
del _pat


def compile_custom(spec: str) -> Pattern:
    """``NAME=REGEX`` -> a custom pattern, full-matched against ``TAG[PID]: MESSAGE``."""
    name, eq, regex = spec.partition("=")
    name = name.strip()
    if not eq or not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):
        raise ConfigError("custom pattern must be NAME=REGEX", source="logwatch.patterns",
                          value=spec)
    try:
        compiled = re.compile(regex.encode("utf-8"))
    except re.error as exc:
        raise ConfigError(f"custom pattern {name}: bad regex ({exc})",
                          source="logwatch.patterns", value=regex) from None
    if "ip" not in compiled.groupindex:
        raise ConfigError(f"custom pattern {name}: needs a named group (?P<ip>...)",
                          source="logwatch.patterns", value=regex)
    return Pattern(name, re.compile(rb".*"), compiled, tagged=True, family=name,
                   source="custom (--pattern / [logwatch] patterns)")


#: Most distinct tags remembered by a matcher's tag cache.
TAG_CACHE_SIZE = 4096


class LoginMatcher:
    """Reads log records with the chosen patterns."""

    def __init__(self, builtins: Iterable[str] = tuple(BUILTIN),
                 custom: Iterable[str] = ()) -> None:
        patterns: list[Pattern] = []
        for name in builtins:
            if name not in BUILTIN:
                raise ConfigError(f"unknown built-in pattern {name!r} (known: "
                                  f"{', '.join(BUILTIN)})", source="logwatch.builtins")
            patterns.extend(BUILTIN[name])
        self.builtin = tuple(patterns)
        self.custom = tuple(compile_custom(spec) for spec in custom)
        self.patterns = self.builtin + self.custom
        self._by_tag: dict[bytes, tuple[Pattern, ...]] = {}

    def patterns_for(self, tag: bytes) -> tuple[Pattern, ...]:
        """The built-in patterns whose tag regex accepts ``tag`` (cached per tag)."""
        got = self._by_tag.get(tag)
        if got is None:
            got = tuple(p for p in self.builtin if p.tag.fullmatch(tag) is not None)
            if len(self._by_tag) >= TAG_CACHE_SIZE:
                self._by_tag.clear()
            self._by_tag[tag] = got
        return got

    def classify(self, record: LogRecord) -> LogEvent | None:
        """What the record says (login, connect, auth, logout), or None."""
        for pattern in self.patterns_for(record.tag):
            m = pattern.match_message(record)
            if m is not None:
                ev = event_of(pattern, record, m)
                if ev is not None:
                    return ev
        for pattern in self.custom:
            m = pattern.match(record)
            if m is not None:
                ev = event_of(pattern, record, m)
                if ev is not None:
                    return ev
        return None

    def classify_line(self, line: bytes, fmt: str = "auto") -> LogEvent | None:
        """:meth:`classify` of a text line's record; fast for daemons no pattern knows."""
        if fmt in ("auto", "syslog") and len(line) <= MAX_LINE_LENGTH:
            head = _SYSLOG_HEAD.match(line)
            if head is not None:
                tag = head["tag"]
                if not self.custom and not self.patterns_for(tag):
                    return None  # the common case: Postfix and friends
                msg = line[head.end():]
                if msg.endswith(b"\r"):
                    msg = msg[:-1]
                return self.classify(LogRecord(tag, head["pid"], _strip_solaris_id(msg)))
        for record in records_of_line(line, fmt):
            return self.classify(record)
        return None

    def match_record(self, record: LogRecord) -> LoginEvent | None:
        """A one-line login in the record (two-line logins need a LoginTracker)."""
        ev = self.classify(record)
        if ev is None or ev.kind != "login":
            return None
        return ev.login()

    def match_line(self, line: bytes, fmt: str = "auto") -> LoginEvent | None:
        """Match one text line (``fmt``: one of :data:`FORMATS` but journal-export)."""
        for record in records_of_line(line, fmt):
            event = self.match_record(record)
            if event is not None:
                return event
        return None


_PARSERS = {
    "syslog": (parse_syslog,),
    "dovecot-log": (parse_dovecot_log,),
    "qpopper-log": (parse_qpopper_log,),
    "apple-log": (parse_apple_log,),
    # Each header shape starts differently, so at most one of them reads a line.
    "auto": (parse_syslog, parse_dovecot_log, parse_qpopper_log, parse_apple_log),
}


def records_of_line(line: bytes, fmt: str = "auto") -> Iterator[LogRecord]:
    """The record a text line reads as in ``fmt`` (auto: the first header shape that fits)."""
    if len(line) > MAX_LINE_LENGTH:
        return
    if line.endswith(b"\r"):
        line = line[:-1]
    for parse in _PARSERS.get(fmt, ()):
        rec = parse(line)
        if rec is not None:
            yield rec
            return


def record_of_line(line: bytes, fmt: str = "auto") -> LogRecord | None:
    """The record of a text line, or None (see :func:`records_of_line`)."""
    for rec in records_of_line(line, fmt):
        return rec
    return None


def _service(raw: bytes) -> str:
    service = raw.decode("ascii", "replace").lower()
    if "pop" in service:
        return "pop3"
    if "imap" in service:
        return "imap"
    return service


#: the service of a well-known port (Perdition 1.x logs the port, not the protocol)
_PORT_SERVICE = {b"110": b"pop3", b"995": b"pop3", b"143": b"imap", b"993": b"imap"}

_SESSION_ID = re.compile(rb", session=<([A-Za-z0-9+/=_-]{1,64})>")


def event_of(pattern: Pattern, record: LogRecord, m: re.Match[bytes]) -> LogEvent | None:
    """The event a matched line says (None when its address is not an address)."""
    groups = m.groupdict()
    if pattern.tag.groups:
        # fields in the tag itself (Dovecot's log_path prefix "imap(alice)<pid><session>")
        tm = pattern.tag.fullmatch(record.tag)
        if tm is not None:
            groups = {**tm.groupdict(), **{k: v for k, v in groups.items() if v is not None}}
    ip: str | None = None
    raw_ip = groups.get("ip") or groups.get("ip2")
    if pattern.kind in ("login", "connect") or raw_ip:
        if not raw_ip:
            return None
        try:
            ip = parse_ip(raw_ip)
        except InvalidAddress:
            return None
    raw_user = groups.get("user") or groups.get("user2") or groups.get("puser")
    user = raw_user.decode("utf-8", "replace") if raw_user else None
    domain = None
    if user and "@" in user:
        domain = user.rpartition("@")[2].lower() or None
    service = _service(groups.get("service") or _PORT_SERVICE.get(groups.get("port") or b"")
                       or record.tag)
    family = pattern.family or pattern.name
    key: tuple[bytes | str, ...] = ()
    sid: bytes | None = None
    if pattern.kind in ("connect", "auth"):
        if record.pid is None:
            return None  # nothing ties the two lines together
        key = (family, record.tag, record.pid)
    elif family in ("dovecot", "dovecot-log"):
        key = (family, service, user or "")
        if pattern.kind == "login":
            s = _SESSION_ID.search(record.message, m.start("ip"))
            sid = s[1] if s else None
        else:
            sid = groups.get("sid") or None
        if pattern.name.endswith("proxy") or pattern.name.endswith("proxy-end"):
            # proxied sessions end with the proxy's own line, which has the address
            key = (family, "proxy", service, user or "", ip or "")
            sid = None
    elif family == "courier":
        key = (family, service, user or "", ip or "")
    elif family == "uw":
        key = ((family, record.tag, record.pid) if record.pid is not None
               else (family, record.tag, user or "", ip or ""))
    # Only IMAP and POP3 mail processes log the logout that ends a Dovecot session
    # (submission and managesieve logins would stay "open" until max_session).
    sessions = pattern.sessions and (service in ("imap", "pop3") or family not in (
        "dovecot", "dovecot-log"))
    return LogEvent(pattern.kind, pattern.name, family, ip, user, domain, service, key, sid,
                    sessions)


# -- line and journald framing -------------------------------------------------


class LineSplitter:
    """Splits a byte stream into lines; over-long lines are dropped whole."""

    def __init__(self, max_line: int = MAX_LINE_LENGTH) -> None:
        self._buf = bytearray()
        self._max = max_line
        self._discarding = False
        #: lines dropped for being too long
        self.dropped = 0

    def feed(self, data: bytes) -> list[bytes]:
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return []
            self._discarding = False
            data = data[nl + 1:]
        self._buf += data
        if b"\n" not in data:
            if len(self._buf) > self._max:
                self.dropped += 1
                self._discarding = True
                self._buf.clear()
            return []
        lines = bytes(self._buf).split(b"\n")
        rest = lines.pop()
        self._buf = bytearray(rest)
        if len(rest) > self._max:
            self.dropped += 1
            self._discarding = True
            self._buf.clear()
        limit = self._max
        if any(len(line) > limit for line in lines):
            self.dropped += sum(1 for line in lines if len(line) > limit)
            lines = [line for line in lines if len(line) <= limit]
        return lines

    def reset(self) -> None:
        """Forget a partial line (the file was rotated or truncated)."""
        self._buf.clear()
        self._discarding = False


_JOURNAL_NAME = re.compile(rb"[A-Z0-9_]{1,64}")


class JournalExportReader:
    """Splits journald's export format into entries (dicts of field name -> value).

    Text fields are ``NAME=value\\n``; binary-safe ones are ``NAME\\n``, a 64-bit
    little-endian length, the data and ``\\n``; an empty line ends an entry.
    A malformed entry is skipped up to the next empty line and counted in
    ``malformed``.
    """

    def __init__(self, *, max_field: int = MAX_JOURNAL_FIELD,
                 max_fields: int = MAX_JOURNAL_FIELDS) -> None:
        self._buf = bytearray()
        self._entry: dict[bytes, bytes] = {}
        self._skipping = False
        self._max_field = max_field
        self._max_fields = max_fields
        self.malformed = 0

    def reset(self) -> None:
        self._buf.clear()
        self._entry = {}
        self._skipping = False

    def feed(self, data: bytes) -> list[dict[bytes, bytes]]:
        self._buf += data
        out: list[dict[bytes, bytes]] = []
        while True:
            got = self._step()
            if got is None:
                break
            if got:
                out.append(got)
        if len(self._buf) > self._max_field + 80:
            # No field may be this long: drop it and resynchronise at the next entry.
            self._bad()
            self._buf.clear()
        return out

    def _bad(self) -> None:
        if not self._skipping:
            self.malformed += 1
        self._skipping = True
        self._entry = {}

    def _step(self) -> dict[bytes, bytes] | None:
        """One field or entry end; None = need more data; {} = consumed without an entry."""
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            return None
        if nl == 0:
            del buf[:1]
            entry, self._entry = self._entry, {}
            skipped, self._skipping = self._skipping, False
            return {} if skipped or not entry else entry
        if self._skipping:
            del buf[: nl + 1]
            return {}
        line = bytes(buf[:nl])
        name, eq, value = line.partition(b"=")
        if _JOURNAL_NAME.fullmatch(name) is None or len(line) > self._max_field:
            del buf[: nl + 1]
            self._bad()
            return {}
        if eq:
            del buf[: nl + 1]
            return self._add(name, value)
        # binary field: NAME\n <u64 le size> <data> \n
        if len(buf) < nl + 1 + 8:
            return None
        size = int.from_bytes(buf[nl + 1 : nl + 9], "little")
        if size > self._max_field:
            del buf[: nl + 1]
            self._bad()
            return {}
        end = nl + 9 + size
        if len(buf) < end + 1:
            return None
        if buf[end] != 0x0A:
            del buf[: nl + 1]
            self._bad()
            return {}
        data = bytes(buf[nl + 9 : end])
        del buf[: end + 1]
        return self._add(name, data)

    def _add(self, name: bytes, value: bytes) -> dict[bytes, bytes]:
        if len(self._entry) >= self._max_fields:
            self._bad()
            return {}
        self._entry[name] = value
        return {}


def looks_like_journal_export(head: bytes) -> bool:
    """True when a stream starts like journald export (``__CURSOR=`` or ``NAME=`` fields)."""
    first = head.split(b"\n", 1)[0]
    name = first.partition(b"=")[0]
    return bool(first) and _JOURNAL_NAME.fullmatch(name) is not None and name.isupper()
