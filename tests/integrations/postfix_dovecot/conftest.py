"""Real Postfix, Dovecot and ``relaygate policyd`` on loopback, started once per module."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .pfdc_support import (
    Stack,
    have_ipv6_loopback,
    hook_commands,
    need_servers,
    start_dovecot,
    start_policyd,
    testbed,
)


@pytest.fixture(scope="module")
def ipv6() -> bool:
    return bool(have_ipv6_loopback())


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = testbed.make_root("relaygate-pfdc-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(root: Path, ipv6: bool) -> Iterator[Stack]:
    """policyd + Postfix asking it in smtpd_relay_restrictions, one SQLite store."""
    need_servers()
    store = f"sqlite://{root / 'grants.db'}"
    policyd = start_policyd(root, store, ipv6=ipv6)
    (root / "postfix").mkdir()
    postfix = testbed.PostfixTestbed(
        root / "postfix", port=testbed.free_port(),
        v6_port=testbed.free_port("::1") if ipv6 else None,
        relay_restrictions=("permit_mynetworks, permit_sasl_authenticated, "
                            f"check_policy_service inet:127.0.0.1:{policyd.port}, "
                            "reject_unauth_destination"),
    )
    postfix.configure()
    try:
        postfix.start()
    except BaseException:
        policyd.stop()
        raise
    yield Stack(root, store, policyd, postfix, ipv6)
    postfix.stop()
    policyd.stop()


@pytest.fixture(scope="module")
def dovecot_hooked(stack: Stack) -> Iterator[testbed.DovecotTestbed]:
    """Dovecot whose POP3 and IMAP logins run relaygate's post-login hook."""
    dovecot = start_dovecot(stack.root / "dovecot", ipv6=stack.ipv6,
                            postlogin=hook_commands(stack.store))
    yield dovecot
    dovecot.stop()


@pytest.fixture(scope="module")
def dovecot_plain(stack: Stack) -> Iterator[testbed.DovecotTestbed]:
    """Dovecot without hooks: only its log file tells who logged in."""
    dovecot = start_dovecot(stack.root / "dovecot-plain", ipv6=stack.ipv6)
    yield dovecot
    dovecot.stop()
