"""The relaygate CLI on the embedded default (SQLite in a data directory), as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RELAYGATE = [sys.executable, "-m", "relaygate"]


def run(data_dir: Path, *args: str, env: dict[str, str] | None = None,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("RELAYGATE_")}
    e.update(env or {})
    return subprocess.run([*RELAYGATE, "--data-dir", str(data_dir), *args], capture_output=True,
                          text=True, env=e, input=input, timeout=60)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_allow_check_list_revoke_on_default_store(data_dir: Path) -> None:
    r = run(data_dir, "allow", "::FFFF:192.0.2.5", "--user", "alice", "--domain", "example.test")
    assert r.returncode == 0, r.stderr
    assert "allowed 192.0.2.5" in r.stdout
    assert (data_dir / "grants.db").exists()
    assert (data_dir.stat().st_mode & 0o777) == 0o700
    r = run(data_dir, "check", "192.0.2.6")
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith("deny 192.0.2.6")

    r = run(data_dir, "check", "192.0.2.5")
    assert r.returncode == 0
    assert "window opened by alice via cli" in r.stdout

    r = run(data_dir, "check", "--json", "192.0.2.5")
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "allow" and doc["user"] == "alice" and doc["relayclient"] == ""

    r = run(data_dir, "allow", "2001:DB8:0:0::1", "--user", "bob", "--ttl", "60")
    assert r.returncode == 0
    r = run(data_dir, "list", "--json")
    grants = json.loads(r.stdout)
    assert {g["ip"] for g in grants} == {"192.0.2.5", "2001:db8::1"}
    r = run(data_dir, "list")
    assert "2001:db8::1" in r.stdout and "bob" in r.stdout and "EXPIRES IN" in r.stdout

    r = run(data_dir, "revoke", "--user", "alice")
    assert r.returncode == 0 and "revoked 1 window of alice" in r.stdout
    r = run(data_dir, "revoke", "2001:db8::1")
    assert r.returncode == 0
    r = run(data_dir, "revoke", "2001:db8::1")
    assert r.returncode == 1
    r = run(data_dir, "check", "2001:db8::1")
    assert r.returncode == 1


def test_age_removes_expired(data_dir: Path) -> None:
    assert run(data_dir, "--expiry", "1", "allow", "192.0.2.9").returncode == 0
    assert run(data_dir, "allow", "192.0.2.10").returncode == 0
    import time

    time.sleep(1.2)
    r = run(data_dir, "age")
    assert r.returncode == 0 and "removed 1 expired window" in r.stdout


@pytest.mark.parametrize("bad", ["../x", "1.2.3.4.5", "fe80::1%eth0", ""])
def test_invalid_address_refused_clearly(data_dir: Path, bad: str) -> None:
    r = run(data_dir, "allow", bad)
    assert r.returncode == 2
    assert "invalid client address" in r.stderr
    assert not (data_dir / "..x").exists()


def test_rules_check_and_static_rule_decision(tmp_path: Path, data_dir: Path) -> None:
    rules = tmp_path / "rules"
    rules.write_text('127.0.0.:allow,RELAYCLIENT=""\n10.0.0.1:deny\n')
    assert run(data_dir, "allow", "192.0.2.200").returncode == 0  # the store exists
    r = run(data_dir, "--rules", str(rules), "rules", "check", "127.0.0.9")
    assert r.returncode == 0 and f"{rules}:1 127.0.0." in r.stdout and "(relays)" in r.stdout
    r = run(data_dir, "--rules", str(rules), "rules", "check", "192.0.2.1")
    assert r.returncode == 1 and "no rule matches" in r.stdout
    r = run(data_dir, "--rules", str(rules), "check", "127.0.0.9")
    assert r.returncode == 0 and "rule" in r.stdout
    r = run(data_dir, "--rules", str(rules), "check", "10.0.0.1")
    assert r.returncode == 1 and "denies" in r.stdout


def test_bad_rules_file_names_file_and_line(tmp_path: Path, data_dir: Path) -> None:
    rules = tmp_path / "rules"
    rules.write_text('# c\n1.2.3.999:allow\n')
    assert run(data_dir, "allow", "192.0.2.200").returncode == 0  # the store exists
    r = run(data_dir, "--rules", str(rules), "check", "1.2.3.4")
    assert r.returncode == 111
    assert f"{rules}:2" in r.stderr and "1.2.3.999" in r.stderr


def test_unreachable_store_is_tempfail(data_dir: Path) -> None:
    r = run(data_dir, "--store", "redis://127.0.0.1:1/0", "check", "192.0.2.1")
    assert r.returncode == 111, (r.stdout, r.stderr)
    assert "allow" not in r.stdout


def test_data_dir_that_cannot_be_created_is_a_configuration_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run(blocker / "data", "allow", "192.0.2.1")
    assert r.returncode == 111, (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines() == [
        f"relaygate: configuration error: cannot create the data directory (Not a directory): "
        f"'{blocker / 'data'}'"]


def test_store_from_environment_and_envdir(tmp_path: Path, data_dir: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    envdir = tmp_path / "relay-ctrl"
    envdir.mkdir()
    (envdir / "RELAY_CTRL_DIR").write_text(f"{spool}\n")
    (envdir / "RELAY_CTRL_EXPIRY").write_text("600\n")
    r = run(data_dir, "--envdir", str(envdir), "allow", "192.0.2.44", "--user", "carol")
    assert r.returncode == 0, r.stderr
    assert (spool / "192.0.2.44").read_bytes() == b"USER=carol\0"
    r = run(data_dir, "check", "192.0.2.44", env={"RELAYGATE_STORE": f"spool://{spool}"})
    assert r.returncode == 0 and "carol" in r.stdout


def test_every_command_has_help(data_dir: Path) -> None:
    from relaygate.cli import COMMANDS

    for name in COMMANDS:
        r = run(data_dir, name, "--help")
        assert r.returncode == 0, (name, r.stderr)
        assert "Usage:" in r.stdout


@pytest.mark.parametrize("args", [["list"], ["check", "192.0.2.1"], ["revoke", "192.0.2.1"],
                                  ["age"], ["status"], ["list", "--json"]])
def test_read_only_commands_never_create_a_store(tmp_path: Path, args: list[str]) -> None:
    # Run from a directory with no configuration at all (issue 17 point 2).
    e = {k: v for k, v in os.environ.items() if not k.startswith("RELAYGATE_")}
    r = subprocess.run([*RELAYGATE, *args], capture_output=True, text=True, env=e,
                       cwd=tmp_path, timeout=60)
    assert r.returncode != 0
    assert str(tmp_path / "relaygate-data" / "grants.db") in r.stdout + r.stderr
    assert "no grant store" in r.stdout + r.stderr
    assert list(tmp_path.iterdir()) == []


def test_read_only_commands_never_create_an_explicit_store(tmp_path: Path) -> None:
    e = {k: v for k, v in os.environ.items() if not k.startswith("RELAYGATE_")}
    for url, path in ((f"sqlite://{tmp_path}/g.db", tmp_path / "g.db"),
                      (f"spool://{tmp_path}/spool", tmp_path / "spool")):
        r = subprocess.run([*RELAYGATE, "--store", url, "list"], capture_output=True, text=True,
                           env=e, cwd=tmp_path, timeout=60)
        assert r.returncode == 111 and str(path) in r.stderr
        assert not path.exists()


def test_shell_completion_as_the_readme_documents_it() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert '"$(_RELAYGATE_COMPLETE=bash_source relaygate)"' in readme
    e = {k: v for k, v in os.environ.items() if not k.startswith("RELAYGATE_")}
    script = subprocess.run([*RELAYGATE], env={**e, "_RELAYGATE_COMPLETE": "bash_source"},
                            capture_output=True, text=True, timeout=60)
    assert "complete -o nosort -F _relaygate_completion relaygate" in script.stdout
    done = subprocess.run([*RELAYGATE], capture_output=True, text=True, timeout=60,
                          env={**e, "_RELAYGATE_COMPLETE": "bash_complete",
                               "COMP_WORDS": "relaygate qu", "COMP_CWORD": "1"})
    assert "plain,queue" in done.stdout.splitlines()
