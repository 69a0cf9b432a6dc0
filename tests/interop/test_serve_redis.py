"""Several hosts sharing one real Redis: a login on A opens relaying on B, ``relaygate
revoke`` on either closes it on both; Redis stopped mid-run fails closed (451 for relay,
local delivery and static rules keep working) and recovers by itself when it is back."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_harness import Serve, Sink, imap_login, pop3_login, smtp, try_relay

from conftest import RedisServer, start_redis

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    with Sink() as s:
        yield s


def _url(redis: RedisServer) -> str:
    return f"{redis.url}?prefix=e2e-{uuid.uuid4().hex[:8]}:"


def test_login_on_a_relays_on_b_and_revoke_on_either_closes_both(
        tmp_path: Path, redis_server: RedisServer, sink: Sink) -> None:
    url = _url(redis_server)
    routes = f"example.net:127.0.0.1:{sink.port}\n"
    a = Serve(tmp_path / "a", store=url, expiry=60, smtproutes=routes)
    b = Serve(tmp_path / "b", store=url, expiry=60, smtproutes=routes,
              services=("smtp",))
    a.add_user("alice", PASSWORD)
    a.start()
    b.start()
    try:
        for src in ("127.0.0.3", "127.0.0.4"):
            assert try_relay(src, "127.0.0.1", b.ports["smtp"])[0] == 553
        # a POP3 login on A: B lets the address relay right away
        assert pop3_login("127.0.0.3", "127.0.0.1", a.ports["pop3"], "alice", PASSWORD)
        code, msg = try_relay("127.0.0.3", "127.0.0.1", b.ports["smtp"], body="via-b")
        assert code == 250, msg
        sink.wait_for("via-b")
        assert try_relay("127.0.0.3", "127.0.0.1", a.ports["smtp"])[0] == 250
        # revoke on B closes it on A and B
        r = b.relaygate("revoke", "127.0.0.3")
        assert r.returncode == 0, r.stderr
        assert try_relay("127.0.0.3", "127.0.0.1", a.ports["smtp"])[0] == 553
        assert try_relay("127.0.0.3", "127.0.0.1", b.ports["smtp"])[0] == 553
        # revoke --user on A closes every window of the user, seen from B
        assert pop3_login("127.0.0.3", "127.0.0.1", a.ports["pop3"], "alice", PASSWORD)
        assert imap_login("127.0.0.4", "127.0.0.1", a.ports["imap"], "alice", PASSWORD)
        grants = {g["ip"]: g for g in json.loads(b.relaygate("list", "--json").stdout)}
        assert grants["127.0.0.4"]["source"] == "imap"
        assert grants["127.0.0.3"]["user"] == "alice"
        for src in ("127.0.0.3", "127.0.0.4"):
            assert try_relay(src, "127.0.0.1", b.ports["smtp"])[0] == 250
        r = a.relaygate("revoke", "--user", "alice")
        assert r.returncode == 0 and "revoked 2 windows" in r.stdout
        for src in ("127.0.0.3", "127.0.0.4"):
            assert try_relay(src, "127.0.0.1", b.ports["smtp"])[0] == 553
    finally:
        assert b.stop() == 0, b.log()
        assert a.stop() == 0, a.log()


def test_redis_down_fails_closed_then_recovers(tmp_path: Path, sink: Sink) -> None:
    redis = start_redis(tmp_path / "redis")
    port = redis.port
    s = Serve(tmp_path / "serve", store=redis.url, expiry=60,
              smtproutes=f"example.net:127.0.0.1:{sink.port}\n",
              rules='127.0.0.10:allow,RELAYCLIENT=""\n')
    s.add_user("alice", PASSWORD)
    s.start()
    try:
        assert pop3_login("127.0.0.3", "127.0.0.1", s.ports["pop3"], "alice", PASSWORD)
        assert try_relay("127.0.0.3", "127.0.0.1", s.ports["smtp"])[0] == 250

        redis.stop()
        # relaying by window fails closed with a temporary error
        code, msg = try_relay("127.0.0.3", "127.0.0.1", s.ports["smtp"])
        assert code == 451, msg
        # local delivery keeps working
        with smtp("127.0.0.3", "127.0.0.1", s.ports["smtp"]) as c:
            c.mail("someone@example.com")
            assert c.rcpt("alice@example.org")[0] == 250
            assert c.data("Subject: while redis is down\r\n\r\nstill here\r\n")[0] == 250
        box = s.data_dir / "mail" / "example.org" / "alice" / "new"
        assert any(b"still here" in p.read_bytes() for p in box.iterdir())
        # static rules keep working
        code, msg = try_relay("127.0.0.10", "127.0.0.1", s.ports["smtp"], body="static-down")
        assert code == 250, msg
        sink.wait_for("static-down")
        # a login still succeeds (the window cannot be stored), relaying still fails closed
        assert pop3_login("127.0.0.4", "127.0.0.1", s.ports["pop3"], "alice", PASSWORD)
        assert try_relay("127.0.0.4", "127.0.0.1", s.ports["smtp"])[0] == 451
        # status shows the store error; serve is alive
        r = s.relaygate("status", "--json")
        doc = json.loads(r.stdout)
        assert doc["serve"]["state"] == "running"
        assert doc["store"].get("error")
        assert s.proc is not None and s.proc.poll() is None

        # Redis is back (empty: a fresh server on the same port): serve recovers by itself
        redis = start_redis(tmp_path / "redis2", port=port)
        deadline = time.monotonic() + 30
        while True:
            code, _ = try_relay("127.0.0.3", "127.0.0.1", s.ports["smtp"])
            if code != 451 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert code == 553  # reachable again; the old window died with the old Redis
        assert pop3_login("127.0.0.3", "127.0.0.1", s.ports["pop3"], "alice", PASSWORD)
        code, msg = try_relay("127.0.0.3", "127.0.0.1", s.ports["smtp"], body="after-redis")
        assert code == 250, msg
        sink.wait_for("after-redis")
        assert "grant store unreachable" in s.log()
    finally:
        rc = s.stop()
        redis.stop()
    assert rc == 0, s.log()
