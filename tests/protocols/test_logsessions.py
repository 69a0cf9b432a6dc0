"""Two-line logins and sessions kept open: LoginTracker driven by a fake clock."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.addresses import parse_ip
from relaygate.protocols.loglines import LoginEvent, LoginMatcher, record_of_line
from relaygate.protocols.logsessions import LOGOUT_REFRESH_MIN, LoginTracker

M = LoginMatcher()


class Feed:
    """A tracker fed line by line at chosen times."""

    def __init__(self, **kw: float) -> None:
        kw.setdefault("refresh_every", 450.0)
        self.tracker = LoginTracker(**kw)  # type: ignore[arg-type]

    def line(self, text: str, now: float) -> LoginEvent | None:
        rec = record_of_line(text.encode())
        assert rec is not None, text
        ev = M.classify(rec)
        return None if ev is None else self.tracker.feed(ev, now)

    def ip(self, text: str, now: float) -> str | None:
        got = self.line(text, now)
        return got.ip if got else None


def test_interleaved_two_line_sessions_of_several_pids() -> None:
    f = Feed()
    assert f.ip("Jan  1 00:00:01 mx popa3d[101]: Session from 192.0.2.1", 1) is None
    assert f.ip("Jan  1 00:00:01 mx popa3d[102]: Session from 192.0.2.2", 2) is None
    assert f.ip("Jan  1 00:00:01 mx spop3d[101]: connect from 192.0.2.9", 2.5) is None
    assert f.ip("Jan  1 00:00:01 mx popa3d[103]: Session from 2001:db8::3", 3) is None
    assert f.ip("Jan  1 00:00:02 mx popa3d[103]: Authentication passed for c", 4) == \
        "2001:db8::3"
    assert f.ip("Jan  1 00:00:02 mx popa3d[101]: Authentication passed for a", 5) == \
        "192.0.2.1"
    assert f.ip("Jan  1 00:00:02 mx spop3d[101]: user z authenticated", 5.5) == "192.0.2.9"
    assert f.ip("Jan  1 00:00:02 mx popa3d[102]: Authentication failed for b", 6) is None
    # the success consumed the connect line: a second success of the pid opens nothing
    assert f.ip("Jan  1 00:00:03 mx popa3d[101]: Authentication passed for a", 7) is None
    assert f.tracker.pending == 1  # 102 waits (and will expire)


def test_a_reused_pid_never_inherits_an_old_address() -> None:
    f = Feed()
    f.line("Jan  1 00:00:01 mx vm-pop3d[500]: Connect from 192.0.2.1", 1)
    assert f.ip("Jan  1 00:00:02 mx vm-pop3d[500]: User 'a' logged in", 2) == "192.0.2.1"
    # pid 500 again, later: a new process, whose connect line names its own client
    f.line("Jan  1 01:00:00 mx vm-pop3d[500]: Connect from 192.0.2.7", 3600)
    assert f.ip("Jan  1 01:00:01 mx vm-pop3d[500]: User 'b' logged in", 3601) == "192.0.2.7"
    # a reused pid whose connect line failed to parse (not an address): the old address
    # is not used either (it was consumed) ...
    assert f.ip("Jan  1 01:00:02 mx vm-pop3d[500]: User 'c' logged in", 3602) is None
    # ... and a connect line without success is replaced by the next one of its pid
    f.line("Jan  1 01:00:03 mx vm-pop3d[501]: Connect from 192.0.2.8", 3603)
    f.line("Jan  1 01:00:04 mx vm-pop3d[501]: Connect from 192.0.2.9", 3604)
    assert f.ip("Jan  1 01:00:05 mx vm-pop3d[501]: User 'd' logged in", 3605) == "192.0.2.9"


def test_a_connect_line_without_success_expires() -> None:
    f = Feed(pending_ttl=300)
    f.line("Jan  1 00:00:01 mx popa3d[7]: Session from 192.0.2.1", 0)
    assert f.tracker.pending == 1
    assert f.ip("Jan  1 00:10:00 mx popa3d[7]: Authentication passed for a", 301) is None
    assert f.tracker.pending == 0


def test_pending_connections_are_bounded() -> None:
    f = Feed(max_pending=100)
    for pid in range(1000):
        f.line(f"Jan  1 00:00:01 mx popa3d[{pid}]: Session from 192.0.2.1", 1)
    assert f.tracker.pending == 100
    # the oldest went first; the newest still work
    assert f.ip("Jan  1 00:00:02 mx popa3d[5]: Authentication passed for a", 2) is None
    assert f.ip("Jan  1 00:00:02 mx popa3d[999]: Authentication passed for a", 2) == \
        "192.0.2.1"


COURIER_IN = "Jan  1 00:00:01 mx imapd: LOGIN, user=a, ip=[::ffff:192.0.2.1], port=[1]"
COURIER_OUT = ("Jan  1 03:00:00 mx imapd: LOGOUT, user=a, ip=[::ffff:192.0.2.1], headers=0, "
               "body=0, rcvd=10, sent=20, time=10800")


def test_a_session_keeps_its_window_open_until_the_logout() -> None:
    f = Feed(refresh_every=450)  # expiry 900
    assert f.ip(COURIER_IN, 0) == "192.0.2.1"
    assert f.tracker.due(100) == []
    refreshed = []
    for t in range(0, 3 * 3600, 60):
        refreshed += [(t, ev.ip) for ev in f.tracker.due(t)]
    # refreshed every 450 s: never older than the 900 s expiry
    times = [0] + [t for t, _ in refreshed]
    assert all(b - a <= 450 + 60 for a, b in itertools.pairwise(times))
    assert {ip for _, ip in refreshed} == {"192.0.2.1"}
    # the logout: one last refresh (the window lasts the expiry after it), then none
    last = f.line(COURIER_OUT, 3 * 3600)
    assert last is not None and last.ip == "192.0.2.1" and last.refresh
    assert f.tracker.due(3 * 3600 + 1000) == []
    assert f.tracker.open_addresses() == set()


def test_logout_right_after_login_needs_no_refresh() -> None:
    f = Feed()
    f.line(COURIER_IN, 0)
    assert f.line(COURIER_OUT, LOGOUT_REFRESH_MIN / 2) is None
    assert f.tracker.sessions == 0


def test_two_sessions_of_one_address_the_last_logout_ends_it() -> None:
    f = Feed(refresh_every=450)
    uw_a = "Jan  1 00:00:01 mx imapd[10]: Login user=a host=h [192.0.2.1]"
    uw_b = "Jan  1 00:00:01 mx imapd[11]: Login user=b host=h [192.0.2.1]"
    f.line(uw_a, 0)
    f.line(uw_b, 10)
    assert f.line("Jan  1 00:00:01 mx imapd[10]: Logout user=a host=h [192.0.2.1]", 1000) \
        is None  # pid 11 is still logged in
    assert f.tracker.open_addresses() == {"192.0.2.1"}
    assert [e.ip for e in f.tracker.due(1500)] == ["192.0.2.1"]
    out = f.line("Jan  1 00:00:01 mx imapd[11]: Autologout user=b host=h [192.0.2.1]", 2000)
    assert out is not None and out.ip == "192.0.2.1"
    assert f.tracker.due(5000) == []


def test_a_logout_of_another_address_or_daemon_ends_nothing() -> None:
    f = Feed()
    f.line("Jan  1 00:00:01 mx imapd[10]: Login user=a host=h [192.0.2.1]", 0)
    f.line("Jan  1 00:00:01 mx imapd[12]: Logout user=a host=h [192.0.2.1]", 500)
    f.line("Jan  1 00:00:01 mx ipop3d[10]: Logout user=a host=h [192.0.2.1]", 500)
    f.line(COURIER_OUT, 500)
    assert f.tracker.open_addresses() == {"192.0.2.1"}


def test_dovecot_session_ends_by_session_id() -> None:
    f = Feed()
    login = ("Jan  1 00:00:01 mx dovecot: imap-login: Login: user=<a>, method=PLAIN, "
             "rip={ip}, lip=192.0.2.254, mpid={pid}, TLS, session=<{sid}>")
    f.line(login.format(ip="192.0.2.1", pid=1, sid="AAA"), 0)
    f.line(login.format(ip="192.0.2.2", pid=2, sid="BBB"), 1)
    # Dovecot 2.3's mail_log_prefix names the session: only 192.0.2.2's ends
    f.line("Jan  1 01:00:00 mx dovecot: imap(a)<2><BBB>: Logged out in=1 out=2", 3600)
    assert f.tracker.open_addresses() == {"192.0.2.1"}
    # 2.2's prefix has no id: the oldest session of the user ends
    f.line("Jan  1 01:00:00 mx dovecot: imap(a): Disconnected: Logged out in=1 out=2", 3601)
    assert f.tracker.open_addresses() == set()


def test_dovecot_log_file_and_proxy_sessions() -> None:
    f = Feed()
    f.line("Nov 28 02:56:49 imap-login: Info: Login: user=<a>, method=PLAIN, rip=::1, "
           "lip=::1, mpid=13016, secured, session=<e6J>", 0)
    f.line("Nov 28 02:56:49 imap-login: Info: proxy(b): started proxying to 10.0.0.2:143: "
           "user=<b>, method=PLAIN, rip=192.0.2.5, lip=192.0.2.254", 1)
    assert f.tracker.open_addresses() == {"::1", "192.0.2.5"}
    f.line("Nov 28 03:56:49 imap(a)<13016><e6J>: Info: Disconnected for inactivity in=0 "
           "out=10", 3600)
    f.line("Nov 28 03:56:49 imap-login: Info: proxy(b): disconnecting 192.0.2.5 "
           "(Disconnected by client: EOF(0s idle, in=10, out=20))", 3600)
    assert f.tracker.open_addresses() == set()


def test_a_session_never_logged_out_stops_counting() -> None:
    f = Feed(refresh_every=450, max_session=12 * 3600)
    f.line(COURIER_IN, 0)
    assert f.tracker.due(12 * 3600 - 1) != []
    assert f.tracker.due(12 * 3600) == []
    assert f.tracker.open_addresses() == set()
    # its logout, much later, opens nothing
    assert f.line(COURIER_OUT, 13 * 3600) is None


def test_sessions_off() -> None:
    f = Feed(max_session=0)
    assert f.ip(COURIER_IN, 0) == "192.0.2.1"
    assert f.tracker.sessions == 0
    assert f.tracker.due(10**6) == []


def test_sessions_are_bounded() -> None:
    f = Feed(max_sessions=50)
    for i in range(200):
        f.line(f"Jan  1 00:00:01 mx imapd[{i}]: Login user=a host=h [192.0.2.{i % 250}]", i)
    assert f.tracker.sessions == 50
    assert len(f.tracker.open_addresses()) == 50


# -- property: only real-shaped lines' client fields ever get a window ---------------

SHAPES = [
    ("dovecot", None, ["imap-login: Login: user=<{u}>, method=PLAIN, rip={ip}, "
                       "lip=192.0.2.254, mpid=1, session=<x>"]),
    ("imapd-ssl", None, ["LOGIN, user={u}, ip=[{ip}], port=[1]"]),
    ("imapd", "{pid}", ["Login user={u} host=h.example [{ip}]"]),
    ("popa3d", "{pid}", ["Session from {ip}", "Authentication passed for {u}"]),
    ("vm-pop3d", "{pid}", ["Connect from {ip}", "User '{u}' logged in"]),
    ("vpopmail", "{pid}", ["vchkpw-imap: (PLAIN) login success {u}@example.org:{ip}"]),
    ("perdition", "{pid}", ['Auth: {ip}:1->192.0.2.254:110 client-secure=plaintext '
                            'authorisation_id=NONE authentication_id="{u}" server="h:110" '
                            'protocol=POP3 server-secure=plaintext status="ok"']),
    ("teapop", "{pid}", ["Successful login for {u} [192.0.2.254] from h [{ip}]"]),
]

addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
)
text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@st.composite
def log_lines(draw: st.DrawFn) -> tuple[list[bytes], set[str]]:
    """Lines mixing real-shaped logins, their pieces under other tags, and noise."""
    lines: list[bytes] = []
    real: set[str] = set()
    for _ in range(draw(st.integers(1, 12))):
        tag, pid, messages = draw(st.sampled_from(SHAPES))
        ip = draw(addresses)
        user = draw(text)
        p = str(draw(st.integers(1, 5)))
        how = draw(st.sampled_from(["real", "other-tag", "garbage", "truncated"]))
        for m in messages:
            msg = m.format(u=user, ip=ip, pid=p)
            t = tag.format(pid=p) if pid is None else f"{tag}[{p}]"
            if how == "real":
                lines.append(f"Jan  1 00:00:01 mx {t}: {msg}".encode())
            elif how == "other-tag":
                lines.append(f"Jan  1 00:00:01 mx postfix/smtpd[{p}]: {msg}".encode())
            elif how == "truncated":
                cut = msg[: msg.index(ip)] if ip in msg else msg[:-1]
                lines.append(f"Jan  1 00:00:01 mx {t}: {cut}".encode())
            else:
                lines.append(draw(st.binary(max_size=120)))
        if how == "real":
            real.add(parse_ip(ip))
    return lines, real


@settings(max_examples=300, deadline=None)
@given(log_lines())
def test_windows_only_for_client_fields_of_real_shaped_lines(
        data: tuple[list[bytes], set[str]]) -> None:
    lines, real = data
    tracker = LoginTracker(refresh_every=10)
    opened: set[str] = set()
    for i, line in enumerate(lines):
        rec = record_of_line(line)
        if rec is None:
            continue
        ev = M.classify(rec)
        if ev is not None:
            got = tracker.feed(ev, float(i))
            if got is not None:
                opened.add(got.ip)
        opened |= {e.ip for e in tracker.due(float(i))}
    assert opened <= real


def test_dovecot_submission_logins_keep_no_session() -> None:
    # only imap and pop3 mail processes log a logout: a submission login's window just
    # expires (it would otherwise be refreshed until max_session)
    f = Feed()
    assert f.ip("Jan  1 00:00:01 mx dovecot: submission-login: Login: user=<a>, "
                "method=PLAIN, rip=192.0.2.1, lip=192.0.2.254, mpid=1", 0) == "192.0.2.1"
    assert f.tracker.sessions == 0


def test_max_session_setting() -> None:
    import pytest

    from relaygate.config import load_settings
    from relaygate.errors import ConfigError

    assert load_settings(cli={}).logwatch.max_session == 12 * 3600
    assert load_settings(cli={"logwatch.max_session": "0"}).logwatch.max_session == 0
    with pytest.raises(ConfigError, match="max_session"):
        load_settings(cli={"logwatch.max_session": "-1"})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=300),
                          st.sampled_from([m.format(u="u", ip="192.0.2.9", pid="3").encode()
                                           for _, _, ms in SHAPES for m in ms])),
                max_size=20),
       st.sampled_from(["auto", "syslog", "dovecot-log", "qpopper-log", "apple-log",
                        "journal-export"]))
def test_random_bytes_never_crash_the_watcher(chunks: list[bytes], fmt: str) -> None:
    # the watcher's own path: bytes -> decoder -> tracker -> handler, in any format
    from relaygate.integrations.logwatch import LogWatcher, _Decoder

    got: list[LoginEvent] = []
    w = LogWatcher([], M, got.append, fmt=fmt, refresh_every=1, clock=lambda: 0.0)
    decoder = _Decoder(M, fmt)
    for chunk in chunks:
        w._dispatch(decoder.feed(chunk + b"\n"))
    w.refresh()
    for ev in got:
        assert parse_ip(ev.ip) == ev.ip
