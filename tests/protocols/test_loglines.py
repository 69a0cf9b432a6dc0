"""Login-line patterns and framing: real lines match, forged ones never do."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.errors import ConfigError
from relaygate.protocols.loglines import (
    BUILTIN,
    TAG_CACHE_SIZE,
    JournalExportReader,
    LineSplitter,
    LoginEvent,
    LoginMatcher,
    compile_custom,
    looks_like_journal_export,
    parse_dovecot_log,
    parse_syslog,
    record_from_journal,
    record_of_line,
)
from relaygate.protocols.logsessions import LoginTracker

M = LoginMatcher()

# (line, ip, user, service, pattern)
REAL = [
    # Dovecot 2.3 via syslog (Debian's /var/log/mail.log)
    (b"Nov 28 02:56:49 mx dovecot: pop3-login: Login: user=<alice>, method=PLAIN, "
     b"rip=192.0.2.7, lip=192.0.2.1, mpid=29189, session=<i0CPgU5hI5Z/AAAD>",
     "192.0.2.7", "alice", "pop3", "dovecot"),
    # Dovecot 2.2 with TLS, IMAP, day padded with a space
    (b"Nov  3 07:01:02 mx dovecot: imap-login: Login: user=<bob@example.org>, method=PLAIN, "
     b"rip=192.0.2.8, lip=192.0.2.1, mpid=123, TLS, session=<abc>",
     "192.0.2.8", "bob@example.org", "imap", "dovecot"),
    # Dovecot 1.x style with mapped IPv4, pid in the tag
    (b"Nov 28 02:56:49 mx dovecot[812]: imap-login: Login: user=<carol>, method=PLAIN, "
     b"rip=::ffff:192.0.2.9, lip=::ffff:192.0.2.1",
     "192.0.2.9", "carol", "imap", "dovecot"),
    # rsyslog's RFC 3339 timestamps, IPv6
    (b"2024-03-01T10:00:00.123456+01:00 mx dovecot: imap-login: Login: user=<dave>, "
     b"method=CRAM-MD5, rip=2001:db8::7, lip=2001:db8::1, mpid=1, secured, session=<x>",
     "2001:db8::7", "dave", "imap", "dovecot"),
    # Dovecot 2.3's own log_path file (this is what the tests' Dovecot writes)
    (b"Nov 28 02:56:49 pop3-login: Info: Login: user=<alice>, method=PLAIN, rip=127.0.0.2, "
     b"lip=127.0.0.1, mpid=29189, session=<i0CPgU5hI5Z/AAAD>",
     "127.0.0.2", "alice", "pop3", "dovecot-log"),
    (b"Nov 28 02:56:49 imap-login: Info: Login: user=<alice>, method=PLAIN, rip=::1, "
     b"lip=::1, mpid=13016, secured, session=<e6Jigk5he8UAAAAAAAAAAAAAAAAAAAAB>",
     "::1", "alice", "imap", "dovecot-log"),
    # Courier
    (b"Jul  5 00:30:34 mx pop3d: LOGIN, user=alice, ip=[::ffff:192.0.2.10], port=[41234]",
     "192.0.2.10", "alice", "pop3", "courier"),
    (b"Jul  5 00:30:34 mx imapd-ssl: LOGIN, user=bob@example.org, ip=[2001:db8::10], "
     b"port=[993], protocol=IMAP",
     "2001:db8::10", "bob@example.org", "imap", "courier"),
    # UW imapd / ipop3d
    (b"Jan  1 00:00:01 mx imapd[4242]: Login user=alice host=client.example.org [192.0.2.11]",
     "192.0.2.11", "alice", "imap", "uw"),
    (b"Jan  1 00:00:01 mx ipop3d[4243]: Login user=alice host=[192.0.2.12] nmsgs=3/3",
     "192.0.2.12", "alice", "pop3", "uw"),
    (b"Jan  1 00:00:01 mx imapd[4244]: Authenticated user=alice host=h.example [192.0.2.13] "
     b"mech=PLAIN",
     "192.0.2.13", "alice", "imap", "uw"),
    # Qpopper
    (b"Mar  8 12:53:46 localhost in.qpopper[7597]: (v4.0.9) POP login by user \"nick\" at "
     b"(yw-out-2526.google.com) 74.125.46.35 [pop_log.c:244]",
     "74.125.46.35", "nick", "pop3", "qpopper"),
    (b"Mar  8 12:53:46 localhost popper[7597]: (v4.1.0) POP login by user \"nick\" at "
     b"(192.0.2.14) 192.0.2.14",
     "192.0.2.14", "nick", "pop3", "qpopper"),
    # Cyrus
    (b"Feb  2 10:00:00 mx cyrus/imap[2001]: login: client.example.org [192.0.2.15] alice "
     b"plaintext User logged in SESSIONID=<cyrus-2001-1-1>",
     "192.0.2.15", "alice", "imap", "cyrus"),
    (b"Feb  2 10:00:00 mx pop3[2002]: login: [2001:db8::15] alice@example.org plaintext+TLS "
     b"User logged in",
     "2001:db8::15", "alice@example.org", "pop3", "cyrus"),
]


@pytest.mark.parametrize("line, ip, user, service, pattern", REAL)
def test_real_login_lines_match(line: bytes, ip: str, user: str, service: str,
                                pattern: str) -> None:
    ev = M.match_line(line)
    assert ev is not None
    assert (ev.ip, ev.user, ev.service, ev.pattern) == (ip, user, service, pattern)
    if "@" in user:
        assert ev.domain == user.rpartition("@")[2]


FORGED = [
    # A client's MAIL FROM in Postfix's log: the tag is postfix/smtpd.
    b"Nov 28 02:56:49 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from unknown[203.0.113.5]: "
    b"554 5.7.1 Relay access denied; from=<\"dovecot: imap-login: Login: user=<x>, "
    b"method=PLAIN, rip=203.0.113.5, lip=192.0.2.1\"@evil> to=<a@b> proto=ESMTP helo=<x>",
    # ... even if the text imitates a whole syslog header.
    b"Nov 28 02:56:49 mx postfix/smtpd[1]: warning: Nov 28 02:56:49 mx dovecot: imap-login: "
    b"Login: user=<x>, method=PLAIN, rip=203.0.113.5, lip=192.0.2.1",
    # A failed Dovecot login whose user name imitates a login line.
    b"Nov 28 02:56:49 mx dovecot: pop3-login: Disconnected (auth failed, 1 attempts in 2 "
    b"secs): user=<Login: user=<x>, method=PLAIN, rip=203.0.113.5, lip=1.2.3.4>, "
    b"method=PLAIN, rip=198.51.100.9, lip=192.0.2.1, session=<y>",
    b"Nov 28 02:56:49 pop3-login: Info: Disconnected (auth failed, 1 attempts in 2 secs): "
    b"user=<Login: user=<x>, method=PLAIN, rip=203.0.113.5, lip=1.2.3.4>, method=PLAIN, "
    b"rip=198.51.100.9, lip=192.0.2.1",
    # A user name that tries to inject its own rip= (two rip= -> ambiguous -> ignored).
    b"Nov 28 02:56:49 mx dovecot: imap-login: Login: user=<x>, method=PLAIN, "
    b"rip=203.0.113.5, lip=1.2.3.4, mpid=1, session=<>, method=PLAIN, rip=198.51.100.9, "
    b"lip=192.0.2.1",
    # Right message, wrong daemon.
    b"Nov 28 02:56:49 mx sshd[9]: imap-login: Login: user=<x>, method=PLAIN, "
    b"rip=203.0.113.5, lip=192.0.2.1",
    b"Nov 28 02:56:49 mx logger: LOGIN, user=x, ip=[203.0.113.5], port=[1]",
    # Dovecot's log-file form with the wrong level or service.
    b"Nov 28 02:56:49 pop3-login: Error: Login: user=<x>, method=PLAIN, rip=203.0.113.5, "
    b"lip=192.0.2.1",
    b"Nov 28 02:56:49 auth: Info: Login: user=<x>, method=PLAIN, rip=203.0.113.5, "
    b"lip=192.0.2.1",
    # Not anchored at the start of the line.
    b"junk Nov 28 02:56:49 mx dovecot: imap-login: Login: user=<x>, method=PLAIN, "
    b"rip=203.0.113.5, lip=192.0.2.1",
    # A reverse-DNS name that imitates "[ip]" (UW, Cyrus, Qpopper).
    b"Jan  1 00:00:01 mx imapd[1]: Login user=alice host=[203.0.113.5] [198.51.100.9] extra",
    b"Feb  2 10:00:00 mx imap[2]: login: evil[203.0.113.5] [198.51.100.9] alice plaintext "
    b"User logged in",
    # A bad address is not an address.
    b"Nov 28 02:56:49 mx dovecot: imap-login: Login: user=<x>, method=PLAIN, rip=::::, "
    b"lip=192.0.2.1",
    # Control characters (a syslog daemon would have escaped them).
    b"Nov 28 02:56:49 mx dovecot: imap-login: Login: user=<x\x07>, method=PLAIN, "
    b"rip=203.0.113.5, lip=192.0.2.1",
]


@pytest.mark.parametrize("line", FORGED)
def test_forged_or_foreign_lines_never_match(line: bytes) -> None:
    ev = M.match_line(line)
    assert ev is None or ev.ip != "203.0.113.5"


def test_uw_host_field_cannot_smuggle_an_address() -> None:
    # host= is a reverse-DNS name: it may not contain brackets, so only one [ip] is read.
    assert M.match_line(FORGED[10]) is None


def test_format_selection() -> None:
    dovecot_file = REAL[4][0]
    syslog = REAL[0][0]
    # Dovecot's log_path line is also a syslog line without a host ("pop3-login:" is
    # never read as a host name: a host does not end in ":").
    assert M.match_line(dovecot_file, "dovecot-log") is not None
    assert M.match_line(dovecot_file, "syslog") is not None
    assert M.match_line(syslog, "dovecot-log") is None
    rec = parse_syslog(dovecot_file)
    assert rec is not None and rec.tag == b"pop3-login"
    rec = parse_dovecot_log(dovecot_file)
    assert rec is not None and rec.tag == b"pop3-login"
    # the other formats read only their own files
    assert M.match_line(syslog, "qpopper-log") is None
    assert M.match_line(syslog, "apple-log") is None
    assert M.match_line(syslog + b"\r") is not None


def test_builtin_selection_and_custom_patterns() -> None:
    only_courier = LoginMatcher(["courier"])
    assert only_courier.match_line(REAL[0][0]) is None
    assert only_courier.match_line(REAL[6][0]) is not None
    custom = LoginMatcher([], [r"popa3d=popa3d\[\d+\]: Authentication passed for "
                               r"(?P<user>\S+) -- \[(?P<ip>[0-9.]+)\]"])
    line = b"Jan  1 00:00:00 mx popa3d[5]: Authentication passed for alice -- [192.0.2.20]"
    ev = custom.match_line(line)
    assert ev is not None and (ev.ip, ev.user, ev.pattern, ev.service) == \
        ("192.0.2.20", "alice", "popa3d", "pop3")
    # Full match on TAG[PID]: MESSAGE: the same text inside another daemon's line is not it.
    assert custom.match_line(b"Jan  1 00:00:00 mx postfix/smtpd[5]: from=<popa3d[5]: "
                             b"Authentication passed for alice -- [192.0.2.20]>") is None
    with pytest.raises(ConfigError, match="ip"):
        compile_custom("x=foo")
    with pytest.raises(ConfigError, match="regex"):
        compile_custom("x=(?P<ip>")
    with pytest.raises(ConfigError, match="NAME=REGEX"):
        compile_custom("no equals")
    with pytest.raises(ConfigError, match="unknown built-in"):
        LoginMatcher(["nope"])
    assert set(BUILTIN) == {"dovecot", "dovecot-log", "courier", "uw", "qpopper", "cyrus",
                            "gnu-pop3d", "vchkpw", "vm-pop3d", "popa3d", "perdition",
                            "solid-pop3d", "teapop", "cucipop", "apple"}


def test_line_splitter_drops_overlong_lines() -> None:
    sp = LineSplitter(max_line=10)
    assert sp.feed(b"short\n" + b"x" * 25) == [b"short"]
    assert sp.feed(b"yyy\nnext\n") == [b"next"]
    assert sp.dropped == 1
    assert sp.feed(b"par") == []
    sp.reset()
    assert sp.feed(b"tial\n") == [b"tial"]


def journal_entry(fields: dict[bytes, bytes], binary: tuple[bytes, ...] = ()) -> bytes:
    out = b""
    for k, v in fields.items():
        if k in binary:
            out += k + b"\n" + struct.pack("<Q", len(v)) + v + b"\n"
        else:
            out += k + b"=" + v + b"\n"
    return out + b"\n"


DOVECOT_MESSAGE = (b"imap-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.30, "
                   b"lip=192.0.2.1, mpid=5, session=<s>")


def test_journal_export_entries() -> None:
    data = (
        journal_entry({b"__CURSOR": b"s=1", b"__REALTIME_TIMESTAMP": b"1",
                       b"SYSLOG_IDENTIFIER": b"dovecot", b"_PID": b"812",
                       b"MESSAGE": DOVECOT_MESSAGE})
        + journal_entry({b"SYSLOG_IDENTIFIER": b"dovecot",
                         b"MESSAGE": DOVECOT_MESSAGE.replace(b"192.0.2.30", b"192.0.2.31")},
                        binary=(b"MESSAGE",))
        + journal_entry({b"SYSLOG_IDENTIFIER": b"postfix/smtpd",
                         b"MESSAGE": b"from=<" + DOVECOT_MESSAGE + b">"})
    )
    assert looks_like_journal_export(data)
    assert not looks_like_journal_export(REAL[0][0])
    for step in (len(data), 1, 7):
        reader = JournalExportReader()
        entries = []
        for i in range(0, len(data), step):
            entries += reader.feed(data[i : i + step])
        assert len(entries) == 3
        ips = []
        for e in entries:
            rec = record_from_journal(e)
            assert rec is not None
            ev = M.match_record(rec)
            ips.append(ev.ip if ev else None)
        assert ips == ["192.0.2.30", "192.0.2.31", None]


def test_journal_export_malformed_entry_is_skipped() -> None:
    reader = JournalExportReader(max_field=100)
    bad = b"bad name=1\nMESSAGE=x\n\n"
    huge = b"MESSAGE\n" + struct.pack("<Q", 10**9) + b"zz\n\n"
    good = journal_entry({b"SYSLOG_IDENTIFIER": b"dovecot", b"MESSAGE": b"hi"})
    assert reader.feed(bad + huge + good) == [{b"SYSLOG_IDENTIFIER": b"dovecot",
                                               b"MESSAGE": b"hi"}]
    assert reader.malformed == 2
    # A message with a newline (binary field) never matches a pattern.
    rec = record_from_journal({b"SYSLOG_IDENTIFIER": b"dovecot",
                               b"MESSAGE": DOVECOT_MESSAGE + b"\nrip=203.0.113.5"})
    assert rec is not None and M.match_record(rec) is None


# -- properties ----------------------------------------------------------------

@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_arbitrary_lines_never_crash(line: bytes) -> None:
    ev = M.match_line(line)
    if ev is not None:
        assert ev.ip and ev.service


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_arbitrary_journal_bytes_never_crash(chunks: list[bytes]) -> None:
    reader = JournalExportReader(max_field=256, max_fields=16)
    for chunk in chunks:
        for entry in reader.feed(chunk):
            assert len(entry) <= 16
            record_from_journal(entry)


# Text a client controls: anything printable (syslog escapes control characters).
client_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=120)

TEMPLATES = [
    # Postfix logs the envelope sender of a refused relay attempt.
    "Nov 28 02:56:49 mx postfix/smtpd[77]: NOQUEUE: reject: RCPT from unknown[198.51.100.1]: "
    "554 5.7.1 <a@b>: Relay access denied; from=<{t}> to=<a@b> proto=ESMTP helo=<{t}>",
    # Dovecot logs the user name of a failed login (syslog and log_path forms).
    "Nov 28 02:56:49 mx dovecot: imap-login: Disconnected (auth failed, 1 attempts in 2 secs): "
    "user=<{t}>, method=PLAIN, rip=198.51.100.1, lip=192.0.2.1, session=<x>",
    "Nov 28 02:56:49 pop3-login: Info: Aborted login (auth failed, 1 attempts in 2 secs): "
    "user=<{t}>, method=PLAIN, rip=198.51.100.1, lip=192.0.2.1",
    # Courier logs failed logins.
    "Jul  5 00:30:34 mx pop3d: LOGIN FAILED, user={t}, ip=[::ffff:198.51.100.1]",
]


@settings(max_examples=300)
@given(st.sampled_from(TEMPLATES), client_text)
def test_client_text_in_other_lines_never_opens_a_window(template: str, text: str) -> None:
    line = template.replace("{t}", text).encode()
    assert M.match_line(line) is None


@settings(max_examples=300)
@given(client_text)
def test_user_field_never_changes_the_address(user: str) -> None:
    # A successful login whose user name the client chose (e.g. a catch-all passdb):
    # the window, if any, is for the real rip, never for an address in the name.
    for line in (
        f"Nov 28 02:56:49 mx dovecot: pop3-login: Login: user=<{user}>, method=PLAIN, "
        f"rip=198.51.100.1, lip=192.0.2.1, mpid=1, session=<x>",
        f"Nov 28 02:56:49 pop3-login: Info: Login: user=<{user}>, method=PLAIN, "
        f"rip=198.51.100.1, lip=192.0.2.1, mpid=1, session=<x>",
        f"Jul  5 00:30:34 mx pop3d: LOGIN, user={user}, ip=[198.51.100.1], port=[1]",
        f"Jan  1 00:00:01 mx imapd[1]: Login user={user} host=h.example [198.51.100.1]",
        f"Feb  2 10:00:00 mx imap[2]: login: h.example [198.51.100.1] {user} plaintext "
        f"User logged in",
    ):
        ev = M.match_line(line.encode())
        assert ev is None or ev.ip == "198.51.100.1", line


# -- every server the watcher knows --------------------------------------------------
#
# Sample lines written from each server's own format strings (see the source= of each
# pattern in relaygate.protocols.loglines). A case is (name, tag, pid, messages, ip,
# user, service): the messages are logged in order by TAG[PID]; together they are one
# successful login of USER from IP. Two messages = a two-line login (connect, success).

CASES = [
    ("dovecot", "dovecot", None,
     ["imap-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.1, lip=192.0.2.254, "
      "mpid=7, TLS, session=<abc>"], "192.0.2.1", "alice", "imap"),
    ("dovecot-proxy", "dovecot", None,
     ["pop3-login: proxy(bob@example.org): started proxying to 10.0.0.2:110: "
      "user=<bob@example.org>, method=PLAIN, rip=2001:db8::2, lip=2001:db8::fe, session=<x>"],
     "2001:db8::2", "bob@example.org", "pop3"),
    ("dovecot-director", "dovecot", "812",
     ["imap-login: Info: proxy(carol): started proxying to 10.0.0.3:143/carol@backend "
      "(master admin): user=<carol>, method=PLAIN, rip=::ffff:192.0.2.3, lip=192.0.2.254, "
      "TLS"], "192.0.2.3", "carol", "imap"),
    ("courier", "imapd-ssl", None,
     ["LOGIN, user=dave, ip=[::ffff:192.0.2.4], port=[51234], protocol=IMAP"],
     "192.0.2.4", "dave", "imap"),
    ("uw", "ipop3d", "4243",
     ["Login user=erin host=client.example.org [2001:db8::5] nmsgs=3/3"],
     "2001:db8::5", "erin", "pop3"),
    ("uw-solaris", "imapd", "4244",
     ["[ID 813155 mail.info] Login user=erin host=[192.0.2.5]"], "192.0.2.5", "erin", "imap"),
    ("qpopper", "in.qpopper", "7597",
     ['(v4.0.9) POP login by user "frank" at (client.example.org) 192.0.2.6 '
      "[pop_log.c:244]"], "192.0.2.6", "frank", "pop3"),
    ("qpopper-stats", "popper", "7598",
     ["Stats: gina 0 0 3 4567 client.example.org 192.0.2.7"], "192.0.2.7", "gina", "pop3"),
    ("qpopper-stats-v6", "qpopper", "7599",
     ["Stats: gina 1 100 2 200 2001:db8::7 2001:db8::7"], "2001:db8::7", "gina", "pop3"),
    ("cyrus", "cyrus/pop3", "2002",
     ["login: [2001:db8::15] hank plaintext+TLS User logged in SESSIONID=<cyrus-1>"],
     "2001:db8::15", "hank", "pop3"),
    ("gnu-pop3d", "pop3d", "31",
     ["connect from 192.0.2.8",
      "user `ivan' logged in with mailbox `mbox:/var/mail/ivan' (3 messages)"],
     "192.0.2.8", "ivan", "pop3"),
    ("gnu-pop3d-old", "gnu-pop3d", "32",
     ["connect from ::ffff:192.0.2.9",
      "User 'ivan' logged in with mailbox '/var/mail/ivan' (1 msgs)"],
     "192.0.2.9", "ivan", "pop3"),
    ("vchkpw", "vpopmail", "90",
     ["vchkpw-pop3: (PLAIN) login success jack@example.org:192.0.2.10"],
     "192.0.2.10", "jack@example.org", "pop3"),
    ("vchkpw-imaps", "vpopmail", "91",
     ["vchkpw-imaps: (CRAM-MD5) login success jack@example.org:2001:db8::10"],
     "2001:db8::10", "jack@example.org", "imap"),
    ("vchkpw-system", "vpopmail", "92",
     ["vchkpw-pop3: system password login success kim:192.0.2.11"],
     "192.0.2.11", "kim", "pop3"),
    ("vm-pop3d", "vm-pop3d", "10",
     ["User 'lee@example.org' logged in from 192.0.2.12, nmsgs=0"],
     "192.0.2.12", "lee@example.org", "pop3"),
    ("vm-pop3d-two-line", "vm-pop3d", "11",
     ["Connect from 192.0.2.13", "User 'lee' of 'example.org' logged in"],
     "192.0.2.13", "lee", "pop3"),
    ("vm-pop3d-apop", "vm-pop3d", "12",
     ["Connect from 192.0.2.14", "User lee logged in with mailbox /var/spool/mail/lee"],
     "192.0.2.14", "lee", "pop3"),
    ("popa3d", "popa3d", "77",
     ["Session from 192.0.2.15", "Authentication passed for mo"], "192.0.2.15", "mo", "pop3"),
    ("popa3d-virtual", "popa3d", "78",
     ["Session from 2001:db8::16", "Authentication passed for mo@example.org"],
     "2001:db8::16", "mo@example.org", "pop3"),
    ("popa3d-tcpd", "popa3d", "80",
     ["connect from 192.0.2.25", "Authentication passed for mo"], "192.0.2.25", "mo", "pop3"),
    ("popa3d-patched", "popa3d", "79",
     ["Authentication passed for mo -- [192.0.2.17]"], "192.0.2.17", "mo", "pop3"),
    ("perdition", "perdition.pop3s", "5",
     ['Auth: 192.0.2.18:40000->192.0.2.254:995 client-secure=ssl authorisation_id=NONE '
      'authentication_id="nina" server="10.0.0.3:110" protocol=POP3S '
      'server-secure=plaintext status="ok"'], "192.0.2.18", "nina", "pop3"),
    ("perdition-v6", "perdition", "6",
     ['Auth: 2001:db8::19:40000->2001:db8::fe:143 client-secure=starttls '
      'authorisation_id="nina" authentication_id="nina" server="imap.example.org:143" '
      'protocol=IMAP4 server-secure=starttls status="ok"'], "2001:db8::19", "nina", "imap"),
    ("perdition-1.x", "perdition", "7",
     ['Auth: 192.0.2.20->192.0.2.254 user="oscar" server="10.0.0.3" port="110" status="ok"'],
     "192.0.2.20", "oscar", "pop3"),
    ("solid-pop3d", "solid-pop3d", "8",
     ["user pat authenticated - client.example.org (192.0.2.21)"], "192.0.2.21", "pat", "pop3"),
    ("spop3d-apop", "spop3d", "9",
     ["user pat authenticated through APOP - 2001:db8::21"], "2001:db8::21", "pat", "pop3"),
    ("solid-pop3d-two-line", "spop3d", "10",
     ["connect from 192.0.2.22", "mapped user pat authenticated"], "192.0.2.22", "pat", "pop3"),
    ("teapop", "teapop_ssl", "11",
     ["Successful login for quinn@example.org [192.0.2.254] from client.example.org "
      "[192.0.2.23]"], "192.0.2.23", "quinn@example.org", "pop3"),
    ("teapop-unresolved", "teapop", "13",
     ["Successful login for quinn [2001:db8::fe] from unknown [2001:db8::23]"],
     "2001:db8::23", "quinn", "pop3"),
    ("cucipop", "cucipop", "12",
     ["rita 192.0.2.24 3, 1 (2048), 2 (4096)"], "192.0.2.24", "rita", "pop3"),
]


def header_forms(tag: str, pid: str | None, msg: str, name: str) -> list[bytes]:
    """The line as each syslog spelling writes it (tag[pid]: or tag:, host or not, ...)."""
    t = f"{tag}[{pid}]" if pid else tag
    forms = [
        f"Jan  1 00:00:01 mx {t}: {msg}",
        f"Jan 11 00:00:01 mx.example.org {t}: {msg}",
        f"Jan  1 00:00:01 {t}: {msg}",  # no host
        f"2024-03-01T10:00:00.123456+01:00 mx {t}: {msg}",  # rsyslog's RFC 3339 stamp
        f"2024-03-01 10:00:00,5 {t}: {msg}",
    ]
    if not name.endswith("solaris"):
        forms.append(f"<22>1 2024-03-01T10:00:00.5Z mx {tag} {pid or '-'} - - {msg}")
    return [f.encode() for f in forms]


def run_lines(lines: list[bytes], matcher: LoginMatcher = M) -> list[LoginEvent]:
    tracker = LoginTracker(refresh_every=450)
    out = []
    for i, line in enumerate(lines):
        rec = record_of_line(line)
        if rec is None:
            continue
        ev = matcher.classify(rec)
        if ev is not None:
            got = tracker.feed(ev, float(i))
            if got is not None:
                out.append(got)
    return out


@pytest.mark.parametrize("name, tag, pid, messages, ip, user, service", CASES,
                         ids=[c[0] for c in CASES])
def test_every_server_login_opens_a_window(name: str, tag: str, pid: str | None,
                                           messages: list[str], ip: str, user: str,
                                           service: str) -> None:
    per_line = [header_forms(tag, pid, m, name) for m in messages]
    for form in range(len(per_line[0])):
        lines = [forms[form] for forms in per_line]
        got = run_lines(lines)
        assert [(e.ip, e.user, e.service) for e in got] == [(ip, user, service)], lines
        if "@" in user:
            assert got[0].domain == user.rpartition("@")[2]
    # a one-line login needs no pid: "name:" as well as "name[pid]:"
    if pid and len(messages) == 1:
        for line in header_forms(tag, None, messages[0], name):
            assert [(e.ip, e.user) for e in run_lines([line])] == [(ip, user)], line
    # journald entries of the same messages (SYSLOG_IDENTIFIER / SYSLOG_PID)
    if not name.endswith("solaris"):
        tracker = LoginTracker(refresh_every=450)
        got = []
        for i, msg in enumerate(messages):
            entry = {b"SYSLOG_IDENTIFIER": tag.encode(), b"MESSAGE": msg.encode()}
            if pid:
                entry[b"SYSLOG_PID"] = pid.encode()
            rec = record_from_journal(entry)
            assert rec is not None
            ev = M.classify(rec)
            assert ev is not None
            w = tracker.feed(ev, float(i))
            if w is not None:
                got.append(w.ip)
        assert got == [ip]


@pytest.mark.parametrize("name, tag, pid, messages, ip, user, service", CASES,
                         ids=[c[0] for c in CASES])
def test_every_server_line_under_another_daemon_opens_nothing(
        name: str, tag: str, pid: str | None, messages: list[str], ip: str, user: str,
        service: str) -> None:
    for other in ("postfix/smtpd[77]", "sshd[5]", "logger", "kernel", "cron[1]"):
        lines = [f"Jan  1 00:00:01 mx {other}: {m}".encode() for m in messages]
        assert run_lines(lines) == []
        # ... nor quoted inside another daemon's message (a MAIL FROM, say)
        quoted = [f"Jan  1 00:00:01 mx {other}: from=<{tag}[{pid}]: {m}>".encode()
                  for m in messages]
        assert run_lines(quoted) == []


@pytest.mark.parametrize("name, tag, pid, messages, ip, user, service", CASES,
                         ids=[c[0] for c in CASES])
def test_every_server_only_its_builtin_matches(name: str, tag: str, pid: str | None,
                                               messages: list[str], ip: str, user: str,
                                               service: str) -> None:
    lines = [header_forms(tag, pid, m, name)[0] for m in messages]
    hits = [fam for fam in BUILTIN if run_lines(lines, LoginMatcher([fam]))]
    assert len(hits) == 1
    assert run_lines(lines, LoginMatcher([f for f in BUILTIN if f != hits[0]])) == []


# Failed logins, as each server logs them: (tag, pid, messages) that open nothing.
FAILED = [
    ("dovecot", None, ["imap-login: Disconnected (auth failed, 1 attempts in 2 secs): "
                       "user=<x>, method=PLAIN, rip=203.0.113.5, lip=192.0.2.254, session=<y>"]),
    ("dovecot", None, ["pop3-login: Aborted login (auth failed, 2 attempts in 9 secs): "
                       "user=<x>, method=PLAIN, rip=203.0.113.5, lip=192.0.2.254"]),
    ("dovecot", None, ["imap-login: proxy(x): disconnecting 203.0.113.5 "
                       "(Disconnected by server)"]),
    ("imapd", None, ["LOGIN FAILED, user=x, ip=[::ffff:203.0.113.5]"]),
    ("imapd", None, ["LOGOUT, user=x, ip=[::ffff:203.0.113.5], headers=0, body=0"]),
    ("imapd", "1", ["Login failed user=x auth=x host=[203.0.113.5]"]),
    ("ipop3d", "2", ["Logout user=x host=[203.0.113.5] nmsgs=0 ndele=0"]),
    ("in.qpopper", "3", ['(v4.0.9) [AUTH] Password supplied for "x" is incorrect.']),
    ("imap", "4", ["badlogin: h.example [203.0.113.5] plaintext x SASL(-13): "
                   "authentication failure: checkpass failed"]),
    ("pop3d", "5", ["connect from 203.0.113.5", "APOP failed for `x'",
                    "session ended for no user"]),
    ("vpopmail", "6", ["vchkpw-pop3: password fail x@example.org:203.0.113.5"]),
    ("vpopmail", "6", ["vchkpw-pop3: vpopmail user not found x@example.org:203.0.113.5"]),
    ("vpopmail", "6", ["vchkpw-smtp: (PLAIN) login success x@example.org:203.0.113.5"]),
    ("vpopmail", "6", ["vchkpw-webmail: (PLAIN) login success x@example.org:203.0.113.5"]),
    ("vm-pop3d", "7", ["Connect from 203.0.113.5", "Non-existent user: x"]),
    ("popa3d", "8", ["Session from 203.0.113.5", "Authentication failed for UNKNOWN USER"]),
    ("popa3d", "8", ["Authentication failed for x -- [203.0.113.5]"]),
    ("perdition", "9", ['Auth: 203.0.113.5:1->192.0.2.254:110 client-secure=plaintext '
                        'authorisation_id=NONE authentication_id="x" server="h:110" '
                        'protocol=POP3 server-secure=plaintext status="failed: Re-Authentication '
                        'Failure"']),
    ("perdition", "9", ['Auth: 203.0.113.5->192.0.2.254 user="x" server="h" port="110" '
                        'status="failed: bad password"']),
    ("spop3d", "10", ["authentication failed for user x - 203.0.113.5"]),
    ("spop3d", "10", ["connect from 203.0.113.5", "authentication failed for user x"]),
    ("teapop", "11", ["Three failed login attempts from unknown [203.0.113.5] - "
                      "Possible account probe"]),
]


@pytest.mark.parametrize("tag, pid, messages", FAILED)
def test_failed_logins_open_nothing(tag: str, pid: str | None, messages: list[str]) -> None:
    for form in range(3):
        lines = [header_forms(tag, pid, m, "")[form] for m in messages]
        assert run_lines(lines) == []


def test_two_line_success_needs_its_own_connect_line() -> None:
    # A success line with no connect line of its pid opens nothing, and neither does a
    # success of another pid, nor of another daemon with the same pid.
    assert run_lines([b"Jan  1 00:00:01 mx popa3d[5]: Authentication passed for mo"]) == []
    assert run_lines([b"Jan  1 00:00:01 mx popa3d[5]: Session from 192.0.2.1",
                      b"Jan  1 00:00:02 mx popa3d[6]: Authentication passed for mo",
                      b"Jan  1 00:00:02 mx spop3d[5]: user mo authenticated"]) == []
    # no pid, nothing ties the lines together
    assert run_lines([b"Jan  1 00:00:01 mx popa3d: Session from 192.0.2.1",
                      b"Jan  1 00:00:02 mx popa3d: Authentication passed for mo"]) == []


# Templates whose {u} is a user name a client chose; the real client address is
# 198.51.100.1. Whatever the name says, a window is for that address or none.
USER_TEMPLATES = [
    ("dovecot", None, ["imap-login: Login: user=<{u}>, method=PLAIN, rip=198.51.100.1, "
                       "lip=192.0.2.254, mpid=1, session=<x>"]),
    ("dovecot", None, ["imap-login: proxy({u}): started proxying to 10.0.0.2:143: "
                       "user=<{u}>, method=PLAIN, rip=198.51.100.1, lip=192.0.2.254"]),
    ("pop3d", None, ["LOGIN, user={u}, ip=[198.51.100.1], port=[1]"]),
    ("imapd", "1", ["Login user={u} host=h.example [198.51.100.1]"]),
    ("popper", "2", ['(v4.0.9) POP login by user "{u}" at (h.example) 198.51.100.1']),
    ("popper", "2", ["Stats: {u} 0 0 3 4567 h.example 198.51.100.1"]),
    ("imap", "3", ["login: h.example [198.51.100.1] {u} plaintext User logged in"]),
    ("pop3d", "4", ["connect from 198.51.100.1",
                    "user `{u}' logged in with mailbox `mbox:/var/mail/x' (1 message)"]),
    ("vpopmail", "5", ["vchkpw-pop3: (PLAIN) login success {u}@example.org:198.51.100.1"]),
    ("vpopmail", "5", ["vchkpw-pop3: system password login success {u}:198.51.100.1"]),
    ("vm-pop3d", "6", ["User '{u}' logged in from 198.51.100.1, nmsgs=0"]),
    ("vm-pop3d", "6", ["Connect from 198.51.100.1", "User '{u}' logged in"]),
    ("popa3d", "7", ["Session from 198.51.100.1", "Authentication passed for {u}"]),
    ("popa3d", "7", ["Authentication passed for {u} -- [198.51.100.1]"]),
    ("perdition", "8", ['Auth: 198.51.100.1:1->192.0.2.254:110 client-secure=plaintext '
                        'authorisation_id=NONE authentication_id="{u}" server="h:110" '
                        'protocol=POP3 server-secure=plaintext status="ok"']),
    ("perdition", "8", ['Auth: 198.51.100.1->192.0.2.254 user="{u}" server="h" port="110" '
                        'status="ok"']),
    ("spop3d", "9", ["user {u} authenticated - 198.51.100.1"]),
    ("spop3d", "9", ["connect from 198.51.100.1", "user {u} authenticated"]),
    ("teapop", "10", ["Successful login for {u} [192.0.2.254] from h.example [198.51.100.1]"]),
    ("cucipop", "11", ["{u} 198.51.100.1 3, 1 (2048), 2 (4096)"]),
]


@settings(max_examples=150, deadline=None)
@given(client_text)
def test_user_names_never_change_the_address_any_server(user: str) -> None:
    for tag, pid, messages in USER_TEMPLATES:
        if ":" in user and "system password" in messages[0]:
            # vchkpw logs "%s:%s" (user, address): the user ends at the first colon, so
            # "alice:::1" is alice from ::1. A system password login succeeds only for a
            # passwd(5) name, and those never contain a colon (it is passwd's field
            # separator), so no real success line carries one.
            continue
        lines = [header_forms(tag, pid, m.replace("{u}", user), "")[0] for m in messages]
        for ev in run_lines(lines):
            assert ev.ip == "198.51.100.1", (lines, ev)


@settings(max_examples=150, deadline=None)
@given(client_text)
def test_forged_text_in_failed_logins_opens_nothing(text: str) -> None:
    # A failed login whose user name carries a whole success line: nothing opens.
    for _, tag, pid, messages, *_ in CASES:
        for m in messages:
            forged = f"{m} {text}"
            for fail in (f"vchkpw-pop3: password fail {forged}@x:198.51.100.1",
                         f"authentication failed for user {forged} - 198.51.100.1",
                         f"LOGIN FAILED, user={forged}, ip=[198.51.100.1]",
                         f"Authentication failed for {forged}"):
                lines = [header_forms(tag, pid, fail, "")[0]]
                assert run_lines(lines) == [], lines


def test_own_log_files_of_qpopper_and_apple() -> None:
    qp = b"Thu Mar  8 12:53:46 2001 [7597] Stats: kim 1 100 2 200 h.example 192.0.2.110"
    ev = M.match_line(qp)
    assert ev is not None and (ev.ip, ev.user, ev.pattern) == ("192.0.2.110", "kim",
                                                               "qpopper-stats")
    assert M.match_line(qp, "qpopper-log") is not None
    assert M.match_line(qp, "syslog") is None
    apple = b'Jan 12 2004 10:20:30 IMAP User "lee" log on successful from 192.0.2.120'
    ev = M.match_line(apple)
    assert ev is not None and (ev.ip, ev.user, ev.service) == ("192.0.2.120", "lee", "imap")
    assert M.match_line(apple, "apple-log") is not None
    # Apple's line: a quote before the user's means a forged user name; failures open nothing
    assert M.match_line(b'Jan 12 2004 10:20:30 IMAP User "x IMAP User "lee" log on '
                        b'successful from 203.0.113.5') is None
    assert M.match_line(b'Jan 12 2004 10:20:30 IMAP User "lee" log on failed from '
                        b'203.0.113.5') is None
    # Qpopper's file: only the Stats line of that file, no other daemon's shape
    assert M.match_line(b"Thu Mar  8 12:53:46 2001 [7597] LOGIN, user=x, "
                        b"ip=[203.0.113.5], port=[1]") is None


def test_tag_cache_is_bounded_and_consistent() -> None:
    m = LoginMatcher()
    for i in range(TAG_CACHE_SIZE + 10):
        m.patterns_for(f"daemon{i}".encode())
    assert len(m._by_tag) <= TAG_CACHE_SIZE
    assert [p.name for p in m.patterns_for(b"dovecot")][:1] == ["dovecot"]
    assert m.patterns_for(b"postfix/smtpd") == ()


def _slow(line: bytes, fmt: str = "auto") -> object:
    rec = record_of_line(line, fmt)
    return None if rec is None else M.classify(rec)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([c for c in CASES]), st.sampled_from(range(6)),
       st.sampled_from(["", "\r", " x", ": y"]), st.sampled_from(["auto", "syslog"]))
def test_fast_path_reads_lines_as_the_full_parser_does(case: tuple[object, ...], form: int,
                                                       tail: str, fmt: str) -> None:
    name, tag, pid, messages = case[0], case[1], case[2], case[3]
    assert isinstance(messages, list)
    for m in messages:
        forms = header_forms(str(tag), pid if isinstance(pid, str) else None, m, str(name))
        line = forms[form % len(forms)] + tail.encode()
        assert M.classify_line(line, fmt) == _slow(line, fmt)
        other = line.replace(str(tag).encode(), b"postfix/smtpd", 1)
        assert M.classify_line(other, fmt) is None and _slow(other, fmt) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fast_path_equals_full_parser_on_any_bytes(line: bytes) -> None:
    assert M.classify_line(line) == _slow(line)
    custom = LoginMatcher(["dovecot"], [r"x=k\[\d+\]: (?P<ip>\S+)"])
    rec = record_of_line(line)
    assert custom.classify_line(line) == (None if rec is None else custom.classify(rec))


def test_vchkpw_user_ends_at_the_first_colon() -> None:
    # "%s:%s" with an IPv6 client: the address keeps all the colons after the name.
    line = header_forms("vpopmail", "5",
                        "vchkpw-pop3: system password login success kim:::1", "")[0]
    (ev,) = run_lines([line])
    assert (ev.user, ev.ip) == ("kim", "::1")
    line = header_forms("vpopmail", "5",
                        "vchkpw-imap: (PLAIN) login success 0::@example.org:198.51.100.1",
                        "")[0]
    assert run_lines([line]) == []
