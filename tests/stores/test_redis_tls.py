"""The Redis store over TLS, against real servers that listen on TLS ports only.

The whole store contract runs over ``rediss://``, Sentinel and Cluster with TLS
(tests/stores/conftest.py: the ``rediss``, ``redis-sentinel-tls`` and
``redis-cluster-tls`` backends, client certificates required). This file checks the
refusals: a server certificate from a CA we do not trust, a certificate that names
another host, a missing or foreign client certificate, and an ACL user's password.
Each one must make relaying fail closed (TEMPFAIL, never ALLOW) with an error that
names the problem; a static rule still works.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need_program
from relaygate.control import RelayControl
from relaygate.decision import Verdict
from relaygate.errors import StoreError
from relaygate.rules import RuleSet
from relaygate.stores import open_store
from relaygate.stores.base import GrantStore

from .conftest import Pki, _Single
from .redis_servers import Cluster, SentinelSet, Server, start_server

DEPLOYMENTS = ("rediss", "redis_sentinel_tls", "redis_cluster_tls")
Deployment = _Single | SentinelSet | Cluster

_n = iter(range(1_000_000))


def _url(dep: Deployment, query: str, prefix: str) -> str:
    """``dep``'s store URL with our own TLS options ``query`` (not the deployment's)."""
    if isinstance(dep, _Single):
        return f"rediss://localhost:{dep.server.port}/0?prefix={prefix}&{query}"
    base = dep.url().partition("?")[0]
    return f"{base}?ssl=true&prefix={prefix}&{query}"


@pytest.fixture(params=DEPLOYMENTS)
def deployment(request: pytest.FixtureRequest) -> Deployment:
    dep: Deployment = request.getfixturevalue(request.param)
    return dep


@pytest.fixture
def prefix() -> str:
    return f"tls{next(_n)}:{time.time_ns()}:"


@pytest.fixture
def opened() -> Iterator[list[GrantStore]]:
    stores: list[GrantStore] = []
    yield stores
    for s in stores:
        s.close()


def fails_closed(store: GrantStore, *fragments: str) -> str:
    """Relaying through ``store`` is TEMPFAIL with a reason naming ``fragments`` (and
    a window cannot be opened); a static rule still allows. Returns the reason."""
    control = RelayControl(store, RuleSet.parse('10.9.9.9:allow,RELAYCLIENT=""\n'))
    d = control.decide("192.0.2.1")
    assert d.verdict is Verdict.TEMPFAIL and d.kind == "store", d
    for fragment in fragments:
        assert fragment in d.reason, d.reason
    with pytest.raises(StoreError):
        control.open_window("192.0.2.9", user="mallory", source="pop3")
    assert control.decide("10.9.9.9").verdict is Verdict.ALLOW
    return d.reason


def open_window(url: str, opened: list[GrantStore]) -> None:
    """Open a window for 192.0.2.1 through a correctly configured store."""
    good = open_store(url)
    opened.append(good)
    control = RelayControl(good)
    control.open_window("192.0.2.1", user="alice", source="pop3")
    assert control.decide("192.0.2.1").verdict is Verdict.ALLOW


def with_client_cert(pki: Pki) -> str:
    return f"ssl_certfile={pki.client_cert}&ssl_keyfile={pki.client_key}"


# -- server certificates -------------------------------------------------------------------


@pytest.mark.parametrize("ca", ["rogue", "system"])
def test_server_certificate_from_an_unknown_ca_is_refused(
    deployment: Deployment, pki: Pki, opened: list[GrantStore], prefix: str, ca: str
) -> None:
    """A window is open in the store, but a client that does not trust the server's CA
    (another CA, or the system's bundle) must not read it: TEMPFAIL, saying why."""
    open_window(_url(deployment, pki.tls().query(), prefix), opened)
    ca_opt = f"ssl_ca_certs={pki.rogue_ca_file}&" if ca == "rogue" else ""
    store = open_store(_url(deployment, ca_opt + with_client_cert(pki), prefix))
    opened.append(store)
    fails_closed(store, "CERTIFICATE_VERIFY_FAILED")


def test_certificate_reqs_none_turns_every_check_off(
    pki: Pki, rediss: _Single, opened: list[GrantStore], prefix: str
) -> None:
    """What ``ssl_cert_reqs=none`` means (docs/stores.md warns against it): a server
    certificate no CA of ours signed is accepted."""
    open_window(_url(rediss, pki.tls().query(), prefix), opened)
    store = open_store(_url(rediss, f"ssl_ca_certs={pki.rogue_ca_file}&ssl_cert_reqs=none&"
                                    + with_client_cert(pki), prefix))
    opened.append(store)
    assert RelayControl(store).decide("192.0.2.1").verdict is Verdict.ALLOW


@pytest.fixture
def localhost_only(tmp_path: Path, pki: Pki) -> Iterator[Server]:
    """A TLS server whose certificate names ``localhost`` only (not 127.0.0.1)."""
    cert, key = pki.issue("localhost-only", "localhost")
    server = start_server(need_program("redis-server"), tmp_path / "server",
                          tls=pki.tls(cert, key, auth_clients="no"))
    # our own client checks no name: it connects to 127.0.0.1
    yield server
    server.stop()


def test_hostname_is_checked(localhost_only: Server, pki: Pki, opened: list[GrantStore],
                             prefix: str) -> None:
    port = localhost_only.port
    ca = f"ssl_ca_certs={pki.ca_file}&prefix={prefix}"
    open_window(f"rediss://localhost:{port}/0?{ca}", opened)
    # the same server by an address its certificate does not name: refused by default
    wrong = open_store(f"rediss://127.0.0.1:{port}/0?{ca}")
    opened.append(wrong)
    fails_closed(wrong, "CERTIFICATE_VERIFY_FAILED", "mismatch", "127.0.0.1")
    # and with ssl_check_hostname=true said out loud
    wrong = open_store(f"rediss://127.0.0.1:{port}/0?{ca}&ssl_check_hostname=true")
    opened.append(wrong)
    fails_closed(wrong, "mismatch")
    # ssl_check_hostname=false: the certificate is still verified, the name is not
    unnamed = open_store(f"rediss://127.0.0.1:{port}/0?{ca}&ssl_check_hostname=false")
    opened.append(unnamed)
    assert RelayControl(unnamed).decide("192.0.2.1").verdict is Verdict.ALLOW
    rogue = open_store(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={pki.rogue_ca_file}"
                       f"&prefix={prefix}&ssl_check_hostname=false")
    opened.append(rogue)
    fails_closed(rogue, "CERTIFICATE_VERIFY_FAILED")


def test_ha_hostname_is_checked_against_the_announced_addresses(
    tmp_path: Path, pki: Pki, opened: list[GrantStore], prefix: str
) -> None:
    """Cluster nodes are reached at the addresses the cluster announces (here 127.0.0.1),
    not the startup host's name: a certificate naming only ``localhost`` is refused
    even when the URL says ``localhost``."""
    from .redis_servers import start_cluster

    cert, key = pki.issue("cluster-localhost-only", "localhost")
    cluster = start_cluster(need_program("redis-server"), need_program("redis-cli"), tmp_path,
                            tls=pki.tls(cert, key, auth_clients="no"))
    try:
        hosts = ",".join(f"localhost:{n.port}" for n in cluster.nodes)
        store = open_store(f"redis+cluster://{hosts}?ssl=true&ssl_ca_certs={pki.ca_file}"
                           f"&prefix={prefix}")
        opened.append(store)
        fails_closed(store, "mismatch", "127.0.0.1")
        store = open_store(f"redis+cluster://{hosts}?ssl=true&ssl_ca_certs={pki.ca_file}"
                           f"&prefix={prefix}&ssl_check_hostname=false")
        opened.append(store)
        assert RelayControl(store).decide("192.0.2.1").verdict is Verdict.DENY
    finally:
        cluster.stop()


# -- client certificates ---------------------------------------------------------------------


def test_client_certificate_required(
    deployment: Deployment, pki: Pki, opened: list[GrantStore], prefix: str
) -> None:
    """The servers say ``tls-auth-clients yes``: the contract suite passes with our
    client certificate; without one every operation is TEMPFAIL, and the error says
    that a client certificate may be what is missing."""
    open_window(_url(deployment, pki.tls().query(), prefix), opened)
    store = open_store(_url(deployment, f"ssl_ca_certs={pki.ca_file}", prefix))
    opened.append(store)
    fails_closed(store, "client certificate", "ssl_certfile")


def test_client_certificate_of_another_ca_is_refused(
    deployment: Deployment, pki: Pki, opened: list[GrantStore], prefix: str
) -> None:
    open_window(_url(deployment, pki.tls().query(), prefix), opened)
    cert, key = pki.issue("foreign-client", "client.relaygate.test", ca=pki.rogue_ca)
    store = open_store(_url(deployment, f"ssl_ca_certs={pki.ca_file}&ssl_certfile={cert}"
                                        f"&ssl_keyfile={key}", prefix))
    opened.append(store)
    fails_closed(store, "client certificate", str(cert))


def test_plain_text_to_a_tls_port_says_so(rediss: _Single, opened: list[GrantStore]) -> None:
    store = open_store(f"redis://127.0.0.1:{rediss.server.port}/0")
    opened.append(store)
    fails_closed(store, "rediss://")


# -- passwords over TLS ------------------------------------------------------------------------

#: What the store needs (docs/stores.md): its own commands and those its Lua scripts call.
ACL_COMMANDS = ("+ping +hgetall +zrangebyscore +evalsha +eval +script|load +hget +hset +del "
                "+srem +sadd +smembers +pttl +time +pexpireat +zadd +zrem")


@pytest.fixture
def acl_server(tmp_path: Path, pki: Pki) -> Iterator[Server]:
    """A TLS server with the default user behind a password and an ACL user ``relay``
    limited to the keys ``rgacl:*`` and the commands the store needs."""
    server = start_server(need_program("redis-server"), tmp_path / "acl",
                          "--requirepass", "admin-pw",
                          "--user", "relay", "on", ">relay-pw", "~rgacl:*", "resetchannels",
                          "-@all", *ACL_COMMANDS.split(),
                          password="admin-pw", tls=pki.tls(auth_clients="optional"))
    yield server
    server.stop()


def test_acl_user_over_tls(acl_server: Server, pki: Pki, opened: list[GrantStore]) -> None:
    now = time.time()
    base = f"localhost:{acl_server.port}/0?ssl_ca_certs={pki.ca_file}"
    store = open_store(f"rediss://relay:relay-pw@{base}&prefix=rgacl:")
    opened.append(store)
    control = RelayControl(store)
    # every operation, with the commands the ACL allows
    control.open_window("192.0.2.1", user="alice", source="pop3")
    control.open_window("2001:db8::1", user="alice", source="imap")
    control.open_window("192.0.2.2", user="bob", source="pop3", now=now - 10_000)
    assert control.decide("192.0.2.1").verdict is Verdict.ALLOW
    assert [g.ip for g in store.list(now)] == ["192.0.2.1", "2001:db8::1"]
    assert store.age(now) == 1
    assert store.delete("2001:db8::1") is True
    assert store.delete_user("alice") == 1
    assert control.decide("192.0.2.1").verdict is Verdict.DENY
    raw = acl_server.client()
    try:
        assert raw.acl_whoami() == "default"
        assert raw.exists("rgacl:@expiry") == 0 or raw.zcard("rgacl:@expiry") == 0
    finally:
        raw.close()

    control.open_window("192.0.2.1", user="alice", source="pop3")
    wrong = open_store(f"rediss://relay:not-the-password@{base}&prefix=rgacl:")
    opened.append(wrong)
    fails_closed(wrong, "AuthenticationError", "invalid username-password pair")
    # a prefix outside the user's key pattern
    outside = open_store(f"rediss://relay:relay-pw@{base}&prefix=other:")
    opened.append(outside)
    fails_closed(outside, "NoPermissionError", "no permissions to access one of the keys")


@pytest.mark.parametrize("option", ["ssl_ca_certs", "ssl_certfile", "ssl_keyfile"])
def test_a_missing_tls_file_is_named(deployment: Deployment, pki: Pki, opened: list[GrantStore],
                                     prefix: str, tmp_path: Path, option: str) -> None:
    """The files are read when a connection is made: one that is missing is TEMPFAIL, and
    the error names the option and the file (the OS error alone names neither)."""
    files = {"ssl_ca_certs": pki.ca_file, "ssl_certfile": pki.client_cert,
             "ssl_keyfile": pki.client_key}
    files[option] = tmp_path / "gone.pem"
    store = open_store(_url(deployment, "&".join(f"{k}={v}" for k, v in files.items()), prefix))
    opened.append(store)
    fails_closed(store, f"cannot read {option}={tmp_path / 'gone.pem'}")
