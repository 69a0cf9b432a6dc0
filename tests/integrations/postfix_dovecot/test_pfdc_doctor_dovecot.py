"""``relaygate doctor dovecot`` against real doveconf, run as root (issue 17 point 8)."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import need_program
from relaygate.cli import main
from relaygate.integrations.dovecot_doctor import hook_store_args, parse_services

CONF = """\
protocols = {protocols}
ssl = no
base_dir = {base}/run
service pop3 {{
  executable = pop3 pop3-postlogin
}}
service pop3-postlogin {{
  executable = script-login {program} dovecot-postlogin --store sqlite://{store}/grants.db
  user = $default_internal_user
  unix_listener pop3-postlogin {{
  }}
}}
"""


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory the dovecot user can reach (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="relaygate-doctor-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def setup(tmp: Path, program: Path, store: Path, protocols: str = "pop3") -> Path:
    need_program("doveconf")
    if os.geteuid() != 0:
        pytest.skip("doctor dovecot tests run as root (they switch to the dovecot user)")
    try:
        pwd.getpwnam("dovecot")
    except KeyError:
        pytest.fail("the dovecot user is missing (Debian's dovecot-core creates it)")
    conf = tmp / "dovecot.conf"
    conf.write_text(CONF.format(protocols=protocols, base=tmp, program=program, store=store))
    return conf


def hook(d: Path) -> Path:
    program = d / "relaygate"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    return program


def doctor(conf: Path) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["doctor", "dovecot", "-c", str(conf)])
    return r.exit_code, r.output


def test_good_hook(public_dir: Path) -> None:
    store = public_dir / "store"
    store.mkdir()
    shutil.chown(store, "dovecot")
    code, out = doctor(setup(public_dir, hook(public_dir), store))
    assert code == 0, out
    assert "ok: service pop3: post-login service pop3-postlogin runs relaygate" in out
    assert f"ok: service pop3-postlogin: dovecot (groups dovecot) can run {public_dir}" in out
    assert "ok: service pop3-postlogin: dovecot can write the store sqlite://" in out
    assert out.rstrip().endswith("Dovecot's logins open relay windows")


def test_hook_under_root_home_and_unwritable_store(tmp_path: Path, public_dir: Path) -> None:
    # tmp_path is mode 0700, root's: like a virtualenv under /root
    code, out = doctor(setup(public_dir, hook(tmp_path), public_dir, protocols="pop3 imap"))
    assert code == 1, out
    assert f"problem: service pop3-postlogin: dovecot cannot run {tmp_path}/relaygate" in out
    assert "Permission denied" in out and "refuses every login" in out
    assert f"dovecot cannot write the store sqlite://{public_dir}/grants.db: {public_dir} " \
           "(directory)" in out
    assert "problem: service imap: executable = imap has no post-login service" in out


def test_no_store_on_the_command_line_and_foreign_hook(public_dir: Path) -> None:
    conf = setup(public_dir, hook(public_dir), public_dir)
    conf.write_text(conf.read_text().replace(f" --store sqlite://{public_dir}/grants.db", ""))
    code, out = doctor(conf)
    assert code == 1 and "the hook names no store" in out
    conf.write_text(conf.read_text().replace(f"script-login {public_dir}/relaygate "
                                             "dovecot-postlogin", "script-login /bin/true"))
    code, out = doctor(conf)
    assert code == 1
    assert "post-login pop3-postlogin does not run relaygate dovecot-postlogin" in out


def test_doveconf_missing_is_a_temporary_failure() -> None:
    r = CliRunner().invoke(main, ["doctor", "dovecot", "--doveconf", "/nonexistent/doveconf"])
    assert r.exit_code == 111 and "not found" in r.output


def test_parsing_pure() -> None:
    services = parse_services("service a {\n  executable = x y\n  unix_listener l {\n"
                              "    user = z\n  }\n  user = u\n}\nservice b {\n}\n")
    assert services == {"a": {"executable": "x y", "user": "u"}, "b": {}}
    assert hook_store_args(["dovecot-postlogin", "--verbose", "--store=redis://h/0",
                            "--data-dir", "/d", "/usr/lib/dovecot/script-login"]) == {
        "store": "redis://h/0", "data_dir": "/d"}
    assert hook_store_args(["dovecot-postlogin", "--", "--store", "x"]) == {}
