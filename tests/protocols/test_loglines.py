"""Login-line patterns and framing: real lines match, forged ones never do."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.errors import ConfigError
from relaygate.protocols.loglines import (
    BUILTIN,
    JournalExportReader,
    LineSplitter,
    LoginMatcher,
    compile_custom,
    looks_like_journal_export,
    parse_dovecot_log,
    parse_syslog,
    record_from_journal,
)

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
    assert M.match_line(dovecot_file, "syslog") is None
    assert M.match_line(dovecot_file, "dovecot-log") is not None
    assert M.match_line(syslog, "dovecot-log") is None
    assert parse_syslog(dovecot_file) is None  # "pop3-login:" is not a host name
    rec = parse_dovecot_log(dovecot_file)
    assert rec is not None and rec.tag == b"pop3-login"
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
    assert set(BUILTIN) == {"dovecot", "dovecot-log", "courier", "uw", "qpopper", "cyrus"}


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
