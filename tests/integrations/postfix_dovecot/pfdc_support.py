"""Helpers of the Postfix/Dovecot tests: start policyd, Dovecot; shared constants.

The Postfix/Dovecot configuration code is shared with ``bench/postfix.py``:
it lives in ``bench/_postfix_testbed.py`` and is imported from there.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

TOP = Path(__file__).resolve().parents[3]


def _load(name: str, path: Path) -> ModuleType:
    # Loaded by path, not through sys.path: neither bench/ nor tests/conftest.py
    # is an importable package.
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


testbed = _load("_postfix_testbed", TOP / "bench" / "_postfix_testbed.py")


def _top_conftest() -> ModuleType:
    # need_program keeps its CI rule (fail instead of skip under RELAYGATE_REQUIRE_INTEGRATION).
    return _load("relaygate_tests_top_conftest", TOP / "tests" / "conftest.py")


need_program = _top_conftest().need_program
have_ipv6_loopback = _top_conftest().have_ipv6_loopback

#: The console script of this venv (what Dovecot's post-login hook runs).
RELAYGATE = str(Path(sys.executable).with_name("relaygate"))
#: Relay windows in these tests last this long (seconds): long enough to relay
#: once even on a loaded machine (2 s was too short: login, policy round trip and
#: the check through Postfix took longer under load), short enough to watch them expire.
EXPIRY = 4  # seconds; a whole number, as every expiry setting must be


def need_servers() -> None:
    need_program("postfix", testbed.POSTFIX)
    need_program("dovecot", testbed.DOVECOT)
    if os.geteuid() != 0:
        why = "a private Postfix instance needs root (mail_owner, setgid_group)"
        if _top_conftest().REQUIRE_INTEGRATION:
            pytest.fail(why)
        pytest.skip(why)


@dataclass
class Policyd:
    proc: subprocess.Popen[bytes]
    port: int
    store: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_policyd(root: Path, store: str, *, ipv6: bool, extra: list[str] | None = None
                  ) -> Policyd:
    port = testbed.free_port()
    listen = ["--listen", f"127.0.0.1:{port}"]
    if ipv6:
        listen += ["--listen", f"[::1]:{port}"]
    log = root / f"policyd-{port}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([RELAYGATE, "--store", store, "policyd", *listen,
                                 "--log-level", "debug", *(extra or [])],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        testbed.wait_port("127.0.0.1", port)
    except OSError:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"policyd did not start:\n{log.read_text()}") from None
    return Policyd(proc, port, store, log)


@dataclass
class Stack:
    root: Path
    store: str
    policyd: Policyd
    postfix: testbed.PostfixTestbed
    ipv6: bool


USERS = {"alice": "secret", "bob@example.test": "hunter2"}


def start_dovecot(root: Path, *, ipv6: bool,
                  postlogin: dict[str, list[str]] | None = None) -> testbed.DovecotTestbed:
    root.mkdir(parents=True, exist_ok=True)
    pick = testbed.free_port_both if ipv6 else testbed.free_port
    dovecot = testbed.DovecotTestbed(
        root, pop3_port=pick(), imap_port=pick(), users=USERS,
        postlogin=postlogin, listen="127.0.0.1, ::1" if ipv6 else "127.0.0.1")
    dovecot.configure()
    dovecot.start()
    return dovecot


def hook_commands(store: str) -> dict[str, list[str]]:
    """POP3 runs the CLI form, IMAP the fast ``python -m`` form: both are tested."""
    opts = ["--store", store, "--expiry", str(EXPIRY), "--verbose"]
    return {
        "pop3": [RELAYGATE, "dovecot-postlogin", *opts],
        "imap": [sys.executable, "-m", "relaygate.integrations.dovecot", *opts],
    }


