"""``relaygate init`` (the commented relaygate.toml), ``relaygate status`` and the
configuration reference in docs/configuration.md."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from click.testing import CliRunner

from relaygate.cli import main
from relaygate.config import load_settings
from relaygate.config_reference import options, render_markdown, render_toml
from relaygate.grants import Grant
from relaygate.status import (
    STATUS_FILE,
    ErrorRing,
    build_report,
    redact_url,
    render_text,
    serve_state,
    windows_summary,
    write_status,
)
from relaygate.stores import open_store

ROOT = Path(__file__).parent.parent


def test_init_writes_every_option_and_loads_to_the_defaults(tmp_path: Path) -> None:
    runner = CliRunner()
    path = tmp_path / "relaygate.toml"
    r = runner.invoke(main, ["init", "--path", str(path)])
    assert r.exit_code == 0, r.output
    assert "relaygate serve --config" in r.output
    text = path.read_text()
    for opt in options():
        assert re.search(rf"^# {re.escape(opt.name)} =", text, re.M), opt.key
        if opt.section:
            assert f"[{opt.section}]" in text
    assert load_settings(environ={}, config_file=path) == load_settings(environ={})
    # refuses to overwrite without --force
    r = runner.invoke(main, ["init", "--path", str(path)])
    assert r.exit_code == 1 and "--force" in r.output
    r = runner.invoke(main, ["init", "--path", str(path), "--force"])
    assert r.exit_code == 0


def test_init_defaults_shown_are_the_real_defaults(tmp_path: Path) -> None:
    # uncomment every line that shows a default (not the examples of unset settings):
    # the file must still be valid TOML and load to exactly the defaults
    unset = {o.key for o in options() if o.unset}
    lines = []
    section = ""
    for line in render_toml().splitlines():
        if line.startswith("["):
            section = line.strip("[]") + "."
        m = re.match(r"# (\w+) = (.*)$", line)
        if m and section + m.group(1) not in unset and not m.group(2).startswith(" "):
            lines.append(line[2:])
        else:
            lines.append(line)
    path = tmp_path / "uncommented.toml"
    path.write_text("\n".join(lines))
    uncommented = sum(1 for ln in lines if re.match(r"\w+ = ", ln))
    assert uncommented == len(options()) - len(unset)
    assert load_settings(environ={}, config_file=path) == load_settings(environ={})


def test_init_examples_are_valid_when_uncommented(tmp_path: Path) -> None:
    lines = [ln[2:] if re.match(r"# \w+ = \S.*# example", ln) else ln
             for ln in render_toml().splitlines()]
    path = tmp_path / "examples.toml"
    path.write_text("\n".join(lines))
    s = load_settings(environ={}, config_file=path)
    assert s.store == "redis://127.0.0.1:6379/0"
    assert s.user == "relaygate"
    assert s.metrics.listen == "127.0.0.1:9187"


def test_docs_configuration_md_is_current() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert render_markdown() in doc, (
        "docs/configuration.md is stale: regenerate the table with "
        "`relaygate init --reference`")


def test_reference_lists_every_setting() -> None:
    table = render_markdown()
    for opt in options():
        assert f"| `{opt.name}` |" in table
        assert opt.description, f"{opt.key} has no description"


def test_status_when_serve_never_ran(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["--data-dir", str(tmp_path / "d"), "status"])
    assert r.exit_code == 1
    assert "serve: not running (never started" in r.output
    assert f"windows: unknown (no grant store: {tmp_path / 'd' / 'grants.db'}" in r.output
    assert "queue: 0 queued, 0 deferred" in r.output
    assert not (tmp_path / "d").exists()


def test_status_reads_store_and_serve_status_file(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    store = open_store(f"sqlite://{data / 'grants.db'}")
    now = time.time()
    store.put(Grant("127.0.0.3", "alice", "example.org", "pop3", now - 30, now + 870))
    store.put(Grant("2001:db8::1", "bob", "example.org", "imap", now - 5, now + 895))
    store.put(Grant("127.0.0.4", None, None, "cli", now - 60, now + 840))
    store.close()
    write_status(data, {
        "state": "running", "pid": os.getpid(), "started_at": now - 3600,
        "updated_at": now, "services": [{"name": "smtp", "listeners": ["127.0.0.1:2525"]}],
        "errors": [{"ts": now - 10, "level": "warning", "logger": "relaygate.serve",
                    "msg": "grant store unreachable"}],
    })
    runner = CliRunner()
    r = runner.invoke(main, ["--data-dir", str(data), "status"])
    assert r.exit_code == 0, r.output
    assert f"serve: running, pid {os.getpid()}, up 60m" in r.output
    assert "smtp         127.0.0.1:2525" in r.output
    assert "windows: 3 open, newest 2001:db8::1 (bob via imap" in r.output
    assert "by source: cli 1, imap 1, pop3 1" in r.output
    assert "warning: grant store unreachable" in r.output
    r = runner.invoke(main, ["--data-dir", str(data), "status", "--json"])
    assert r.exit_code == 0
    doc = json.loads(r.output)
    assert doc["serve"]["state"] == "running"
    assert doc["windows"]["count"] == 3
    assert doc["windows"]["by_source"] == {"cli": 1, "imap": 1, "pop3": 1}
    assert doc["queue"]["queued"] == 0


def test_status_of_a_stopped_or_dead_serve(tmp_path: Path) -> None:
    now = time.time()
    assert serve_state(None, now) == "never"
    assert serve_state({"state": "stopped", "pid": os.getpid()}, now) == "stopped"
    dead = _dead_pid()
    assert serve_state({"state": "running", "pid": dead, "updated_at": now}, now) == "stopped"
    assert serve_state({"state": "running", "pid": os.getpid(), "updated_at": now - 3600},
                       now) == "stale"
    data = tmp_path / "d"
    data.mkdir()
    write_status(data, {"state": "running", "pid": dead, "updated_at": now - 100})
    report = build_report(data_dir=data, store_url="memory:", list_grants=None, queue=None,
                          now=now)
    text = render_text(report, now)
    assert "serve: not running (last seen 100s ago)" in text
    assert "windows: unknown (memory store: windows live only inside" in text
    assert (data / STATUS_FILE).exists()


def test_status_store_unreachable_is_shown_not_raised(tmp_path: Path) -> None:
    from relaygate.errors import StoreError

    def boom() -> list[Grant]:
        raise StoreError("redis 127.0.0.1:1: connection refused")

    report = build_report(data_dir=tmp_path, store_url="redis://:pw@127.0.0.1:1/0",
                          list_grants=boom, queue=None, now=time.time())
    assert report["windows"] is None
    assert report["store"]["url"] == "redis://:***@127.0.0.1:1/0"
    assert "connection refused" in report["store"]["error"]
    assert "windows: unknown (store unreachable)" in render_text(report, time.time())


def test_queue_summary_from_queue_stats(tmp_path: Path) -> None:
    from relaygate.mail.queue import Queue

    q = Queue(tmp_path / "queue")
    q.enqueue("a@example.org", ["b@example.net"], b"Subject: x\r\n\r\nhi\r\n")
    report = build_report(data_dir=tmp_path, store_url="memory:", list_grants=None, queue=q,
                          now=time.time() + 90)
    assert report["queue"]["queued"] == 1
    assert report["queue"]["deferred"] == 0
    assert 89 <= report["queue"]["oldest_age"] <= 91


def test_windows_summary_and_redaction() -> None:
    now = 1000.0
    s = windows_summary([], now)
    assert s == {"count": 0, "by_source": {}}
    assert redact_url("redis://user:secret@h:6379/0") == "redis://user:***@h:6379/0"
    assert redact_url("sqlite:///x/grants.db") == "sqlite:///x/grants.db"


def test_error_ring_keeps_the_last_warnings() -> None:
    import logging

    ring = ErrorRing(size=3)
    logger = logging.getLogger("relaygate.test-ring")
    logger.addHandler(ring)
    try:
        logger.info("not kept")
        for i in range(5):
            logger.warning("w%d", i)
    finally:
        logger.removeHandler(ring)
    assert [e["msg"] for e in ring.items()] == ["w2", "w3", "w4"]


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_deploy_examples_load_and_their_listeners_parse() -> None:
    from relaygate.rules import RuleSet
    from relaygate.servers.listeners import parse_listen
    from relaygate.servers.serve import listener_settings

    examples = sorted((ROOT / "deploy" / "examples").glob("*.toml"))
    assert len(examples) >= 4
    for path in examples:
        s = load_settings(environ={}, config_file=path)
        for name, specs in listener_settings(s):
            for spec in specs:
                parse_listen(spec, origin=f"{path.name} {name}")
    rules = RuleSet.load(ROOT / "deploy" / "examples" / "rules")
    assert rules.match("127.0.0.1") is not None and rules.match("127.0.0.1").relays  # type: ignore[union-attr]
    assert rules.match("2001:db8:10::5").relays  # type: ignore[union-attr]
    assert not rules.match("198.51.100.7").allow  # type: ignore[union-attr]


def test_systemd_units_run_serve_with_hardening() -> None:
    for name in ("relaygate.service", "relaygate-rootstart.service"):
        text = (ROOT / "deploy" / "systemd" / name).read_text()
        assert "relaygate serve" in text
        for option in ("ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
                       "ReadWritePaths=/var/lib/relaygate", "--user relaygate",
                       "ExecReload=/bin/kill -HUP $MAINPID"):
            assert option in text, (name, option)
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in (
        ROOT / "deploy" / "systemd" / "relaygate.service").read_text()
