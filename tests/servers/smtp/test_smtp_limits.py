"""Limits: size, recipients, line lengths, budgets, timeouts, connections per address, stop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from test_smtp_support import LOCAL, STRANGER_IP, WINDOW_IP, RawClient, SmtpHarness

MSG = b"Subject: limits\r\n\r\nhello\r\n"


def harness(tmp_path: Path, **smtp: Any) -> SmtpHarness:
    return SmtpHarness(tmp_path, smtp=smtp)


def session(h: SmtpHarness, source: str = STRANGER_IP) -> RawClient:
    r = RawClient("127.0.0.1", h.port(), source)
    assert r.cmd("EHLO client.example").startswith("250")
    return r


def test_message_size_limit(tmp_path: Path) -> None:
    h = harness(tmp_path, max_message_size=1000)
    try:
        r = session(h)
        assert r.cmd("MAIL FROM:<a@sender.example> SIZE=2000").startswith("552")
        assert r.cmd("MAIL FROM:<a@sender.example> SIZE=900").startswith("250")
        assert r.cmd(f"RCPT TO:<bob@{LOCAL}>").startswith("250")
        assert r.cmd("DATA").startswith("354")
        body = b"".join(b"x" * 70 + b"\r\n" for _ in range(20))
        assert r.cmd(b"Subject: big\r\n\r\n" + body + b".").startswith("552")
        r.close()
        assert h.maildir_messages("bob") == []
    finally:
        h.stop()


def test_default_size_is_advertised(tmp_path: Path) -> None:
    h = harness(tmp_path)
    try:
        r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
        assert "250-SIZE 26214400" in r.cmd("EHLO client.example")
        r.close()
    finally:
        h.stop()


def test_recipient_limit(tmp_path: Path) -> None:
    h = harness(tmp_path, max_recipients=3)
    try:
        r = session(h)
        r.cmd("MAIL FROM:<a@sender.example>")
        for _ in range(3):
            assert r.cmd(f"RCPT TO:<bob@{LOCAL}>").startswith("250")
        assert r.cmd(f"RCPT TO:<bob@{LOCAL}>") == "452 4.5.3 Too many recipients"
        assert r.cmd("DATA").startswith("354")
        assert r.cmd(MSG + b".").startswith("250")
        r.close()
        assert len(h.maildir_messages("bob")) == 1  # one copy per mailbox
    finally:
        h.stop()


def test_line_length_limits(tmp_path: Path) -> None:
    h = harness(tmp_path)
    try:
        r = session(h)
        assert r.cmd("NOOP " + "x" * 600).startswith("500")
        r.cmd("MAIL FROM:<a@sender.example>")
        r.cmd(f"RCPT TO:<bob@{LOCAL}>")
        assert r.cmd("DATA").startswith("354")
        assert r.cmd(b"Subject: long\r\n\r\n" + b"y" * 1100 + b"\r\n.").startswith("500")
        assert r.cmd("NOOP").startswith("250")
        r.close()
        assert h.maildir_messages("bob") == []
    finally:
        h.stop()


def test_bad_command_budget_ends_the_session(tmp_path: Path) -> None:
    h = harness(tmp_path, bad_command_limit=3)
    try:
        r = session(h)
        assert r.cmd("RCPT TO:<bob@example.org>").startswith("503")
        assert r.cmd("MAIL FROM:<a..b@x.example>").startswith("501")
        r.send(b"MAIL FROM:<a..b@x.example>\r\n")
        assert r.reply().startswith("501")
        assert r.reply().startswith("421 4.7.0")
        assert r.closed()
    finally:
        h.stop()


def test_refused_recipient_budget(tmp_path: Path) -> None:
    h = harness(tmp_path, max_refused_recipients=4, bad_command_limit=2)
    try:
        r = session(h)
        r.cmd("MAIL FROM:<a@sender.example>")
        # refused recipients do not eat the (small) bad-command budget...
        for i in range(3):
            assert r.cmd(f"RCPT TO:<nobody{i}@{LOCAL}>").startswith("550 5.1.1")
        r.send(b"RCPT TO:<x@remote.invalid>\r\n")
        assert r.reply().startswith("553")
        # ...but they have their own
        assert r.reply().startswith("421 4.7.0")
        assert r.closed()
    finally:
        h.stop()


def test_unknown_commands_end_the_session(tmp_path: Path) -> None:
    h = harness(tmp_path)
    try:
        r = session(h)
        replies = [r.cmd(f"XYZZY{i}") for i in range(5)]
        assert replies[0].startswith("500")
        assert replies[-1].startswith("502 5.5.1")
        assert r.closed()
    finally:
        h.stop()


def test_idle_client_times_out(tmp_path: Path) -> None:
    h = harness(tmp_path, command_timeout=0.5)
    try:
        r = session(h)
        r.sock.settimeout(10)
        assert r.reply().startswith("421 4.4.2")
        assert r.closed()
    finally:
        h.stop()


def test_each_command_moves_the_idle_deadline_on(tmp_path: Path) -> None:
    """The timer is not remade per command: one that fires early must re-arm, not close."""
    h = harness(tmp_path, command_timeout=0.8)
    try:
        r = session(h)
        start = time.monotonic()
        last = start
        while time.monotonic() - start < 2.5:  # three timeouts' worth, never idle for one
            assert r.cmd("NOOP").startswith("250")
            last = time.monotonic()
            time.sleep(0.3)
        r.sock.settimeout(10)
        assert r.reply().startswith("421 4.4.2")
        assert 0.6 < time.monotonic() - last < 5
        assert r.closed()
    finally:
        h.stop()


def test_slowloris_command_times_out(tmp_path: Path) -> None:
    h = harness(tmp_path, command_timeout=0.8)
    try:
        r = session(h)
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 8:
            try:
                r.send(b"N")  # never a complete line
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            r.sock.settimeout(0.01)
            try:
                if r.sock.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed
    finally:
        h.stop()


def test_data_timeout_is_inactivity_not_total(tmp_path: Path) -> None:
    h = harness(tmp_path, command_timeout=0.6, data_timeout=1.5)
    try:
        r = session(h)
        r.cmd("MAIL FROM:<a@sender.example>")
        r.cmd(f"RCPT TO:<bob@{LOCAL}>")
        assert r.cmd("DATA").startswith("354")
        r.send(b"Subject: slow\r\n\r\n")
        for _ in range(12):  # 2.4 s in all: longer than both timeouts, never idle for long
            time.sleep(0.2)
            r.send(b"line\r\n")
        assert r.cmd(b".").startswith("250")
        # a stalled DATA is cut off
        r.cmd("MAIL FROM:<a@sender.example>")
        r.cmd(f"RCPT TO:<bob@{LOCAL}>")
        assert r.cmd("DATA").startswith("354")
        r.send(b"Subject: stalled\r\n")
        r.sock.settimeout(15)
        assert r.reply().startswith("421 4.4.2")
        assert r.closed()
        assert len(h.maildir_messages("bob")) == 1
    finally:
        h.stop()


def test_connections_per_address(tmp_path: Path) -> None:
    h = harness(tmp_path, max_connections_per_ip=2)
    try:
        a = RawClient("127.0.0.1", h.port(), STRANGER_IP)
        b = RawClient("127.0.0.1", h.port(), STRANGER_IP)
        assert a.greeting.startswith("220") and b.greeting.startswith("220")
        c = RawClient("127.0.0.1", h.port(), STRANGER_IP)
        assert c.greeting.startswith("421 4.7.0")
        assert c.closed()
        other = RawClient("127.0.0.1", h.port(), WINDOW_IP)
        assert other.greeting.startswith("220")
        a.cmd("QUIT")
        a.close()
        assert h.wait_for(lambda: h.services[0].limiter.counts.get(STRANGER_IP) == 1)
        d = RawClient("127.0.0.1", h.port(), STRANGER_IP)
        assert d.greeting.startswith("220")
        for x in (b, d, other):
            x.close()
    finally:
        h.stop()


def test_connection_limit_counts_ipv6_per_network() -> None:
    from relaygate.servers.listeners import AddressLimiter

    lim = AddressLimiter(2)  # default /64
    assert lim.acquire("2001:db8:1:2::1") and lim.acquire("2001:db8:1:2::ffff")
    assert not lim.acquire("2001:db8:1:2:1:2:3:4")  # the same /64: full
    assert lim.acquire("2001:db8:1:3::1")  # the next /64
    assert lim.acquire("192.0.2.1") and lim.acquire("::ffff:192.0.2.1")
    assert not lim.acquire("192.0.2.1")  # v4-mapped counted as the IPv4 address
    lim.release("2001:db8:1:2::1")
    assert lim.acquire("2001:db8:1:2::99")
    wide = AddressLimiter(1, ipv6_prefix=48)
    assert wide.acquire("2001:db8:1:2::1") and not wide.acquire("2001:db8:1:ffff::1")
    narrow = AddressLimiter(1, ipv6_prefix=128)
    assert narrow.acquire("2001:db8:1:2::1") and narrow.acquire("2001:db8:1:2::2")


def test_stop_lets_the_transaction_in_flight_finish(tmp_path: Path) -> None:
    h = harness(tmp_path)
    try:
        idle = session(h, WINDOW_IP)
        busy = session(h)
        busy.cmd("MAIL FROM:<a@sender.example>")
        busy.cmd(f"RCPT TO:<bob@{LOCAL}>")
        assert busy.cmd("DATA").startswith("354")
        busy.send(b"Subject: in flight\r\n\r\n")
        service = h.services[0]
        fut = asyncio.run_coroutine_threadsafe(service.stop(10.0), h.loop)
        assert idle.reply().startswith("421 4.3.2")
        assert idle.closed()
        busy.send(b"the rest\r\n")
        assert busy.cmd(b".").startswith("250")
        assert busy.closed()
        fut.result(10)
        assert len(h.maildir_messages("bob")) == 1
        with pytest.raises(OSError):
            RawClient("127.0.0.1", h.port(), STRANGER_IP, timeout=2)
    finally:
        try:
            h.stop()
        except concurrent.futures.TimeoutError:
            pass


@pytest.mark.parametrize("tls", [False, True])
def test_fast_protocol_setup_matches_aiosmtpd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              tls: bool) -> None:
    """RelaySMTP skips aiosmtpd's per-connection inspection: it must set what aiosmtpd sets."""
    from test_smtp_support import tls_files

    from relaygate.servers.smtp import service

    h = SmtpHarness(tmp_path, tls=tls_files(tmp_path)[0] if tls else None)
    try:
        smtp = h.services[0]
        info = service.ListenerInfo("smtp", plaintext_auth=not tls)

        async def make() -> service.RelaySMTP:
            return smtp.make_protocol(info)

        fast = h.call(make())
        monkeypatch.setattr(service, "_FAST_INIT", False)
        slow = h.call(make())
    finally:
        h.stop()
    ours, theirs = vars(fast), vars(slow)
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        if isinstance(value, dict):
            assert set(ours[name]) == set(value), name
            for key, item in value.items():
                mine = ours[name][key]
                bound = getattr(item, "handler", item)
                other = getattr(mine, "handler", mine)
                assert getattr(other, "__func__", other) == getattr(bound, "__func__", bound), (
                    name, key)
                assert getattr(mine, "is_builtin", None) == getattr(item, "is_builtin", None)
        elif isinstance(value, weakref.ref):
            assert type(ours[name]()) is type(value()), name
        elif callable(value):
            assert getattr(ours[name], "__func__", ours[name]) == getattr(value, "__func__",
                                                                          value), name
        elif type(value).__eq__ is object.__eq__:
            assert type(ours[name]) is type(value), name  # a per-connection object
        else:
            assert ours[name] == value, name
