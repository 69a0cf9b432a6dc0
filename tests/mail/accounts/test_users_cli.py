"""``relaygate users``: add/passwd/del/list/import/enable/disable/apop/addresses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from relaygate.cli import main
from relaygate.config import AuthSettings
from relaygate.mail.accounts.db import UserDB


def run(data: Path, *args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--data-dir", str(data), *args], input=input)
    return result.exit_code, result.output


def db_of(data: Path) -> UserDB:
    return UserDB(data / "users.db", AuthSettings(failure_delay=0.0), data,
                  default_domain="example.test")


async def test_add_list_passwd_del(tmp_path: Path) -> None:
    data = tmp_path / "data"
    code, out = run(data, "users", "add", "alice", "--domain", "example.test",
                    "--address", "al@example.test", input="s3cret\n")
    assert code == 0, out
    assert "alice@example.test" in out
    code, out = run(data, "users", "list", "--json")
    assert code == 0
    (entry,) = json.loads(out)
    assert entry["login"] == "alice" and entry["enabled"] and entry["hash"] == "argon2id"
    assert entry["addresses"] == ["alice@example.test", "al@example.test"]
    assert Path(entry["maildir"], "new").is_dir()
    db = db_of(data)
    assert (await db.authenticate("alice", "s3cret", "127.0.0.2")).ok
    code, out = run(data, "users", "passwd", "alice", input="n3w\n")
    assert code == 0, out
    assert (await db.authenticate("alice", "n3w", "127.0.0.2")).ok
    assert not (await db.authenticate("alice", "s3cret", "127.0.0.2")).ok
    code, out = run(data, "users", "del", "alice")
    assert code == 0
    code, out = run(data, "users", "list")
    assert code == 0 and out == ""
    db.close()


def test_password_never_from_argv_and_not_empty(tmp_path: Path) -> None:
    data = tmp_path / "data"
    code, _ = run(data, "users", "add", "alice", "--domain", "example.test", input="\n")
    assert code == 2
    code, _ = run(data, "users", "add", "alice", "--password", "x")
    assert code == 2  # no such option


def test_prompt_on_a_terminal_asks_twice(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import relaygate.commands.users as users_cmd

    monkeypatch.setattr(users_cmd, "_interactive", lambda: True)
    data = tmp_path / "data"
    code, out = run(data, "users", "add", "bob", "--domain", "example.test",
                    input="one\ntwo\nsame\nsame\n")
    assert code == 0, out
    assert "do not match" in out.lower()
    assert "same" not in out  # hidden input


def test_exit_codes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run(data, "users", "add", "a/b", "--domain", "example.test", input="x\n")[0] == 2
    assert run(data, "users", "add", "carl", "--domain", "example.test", input="x\n")[0] == 0
    assert run(data, "users", "add", "carl", "--domain", "example.test", input="x\n")[0] == 1
    assert run(data, "users", "passwd", "nobody", input="x\n")[0] == 1
    assert run(data, "users", "del", "nobody")[0] == 1
    assert run(data, "users", "disable", "nobody")[0] == 1


async def test_enable_disable_apop_addresses(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert run(data, "users", "add", "dora@example.test", "--apop", input="pw\n")[0] == 0
    db = db_of(data)
    code, out = run(data, "users", "disable", "dora@example.test")
    assert code == 0
    db.reload()
    assert not (await db.authenticate("dora@example.test", "pw", "127.0.0.2")).ok
    run(data, "users", "enable", "dora@example.test")
    db.reload()
    assert (await db.authenticate("dora@example.test", "pw", "127.0.0.2")).ok
    code, out = run(data, "users", "apop", "dora@example.test")
    assert code == 0
    secret = out.strip().split(": ", 1)[1]
    db.reload()
    assert db.apop_secret("dora@example.test") == secret
    run(data, "users", "apop", "dora@example.test", "--off")
    db.reload()
    assert db.apop_secret("dora@example.test") is None
    code, out = run(data, "users", "addresses", "dora@example.test", "d@example.test")
    assert code == 0 and "d@example.test" in out
    db.reload()
    assert db.find_recipient("D@example.test") is not None
    db.close()


async def test_import(tmp_path: Path) -> None:
    from passlib.hash import sha512_crypt

    data = tmp_path / "data"
    good = tmp_path / "passwd"
    good.write_text(f"erin:{sha512_crypt.using(rounds=1000).hash('e-pw')}:1001:1001::/:\n")
    code, out = run(data, "users", "import", str(good), "--domain", "example.test")
    assert code == 0, out
    assert "imported 1" in out
    bad = tmp_path / "bad"
    bad.write_text("fred:plaintext\n")
    code, out = run(data, "users", "import", str(bad), "--domain", "example.test")
    assert code == 2 and "line 1" in out
    code, out = run(data, "users", "list")
    assert "hash=sha512_crypt" in out
    db = db_of(data)
    assert (await db.authenticate("erin", "e-pw", "127.0.0.2")).ok
    db.close()


def test_real_stdin_pipe(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "relaygate", "--data-dir", str(data), "users", "add",
         "gus", "--domain", "example.test"],
        input=b"piped-pw\n", capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert b"piped-pw" not in proc.stdout + proc.stderr
