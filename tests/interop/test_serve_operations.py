"""Day-2 operations against a real ``relaygate serve``: the admin commands see its
configuration, status lists every relaygate process, logs go to a file with ISO
times and answer "who relayed this", and the status page reads well in Chromium."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_harness import Serve, env, free_port, smtp

from conftest import need_program

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d relaygate\[\d+\]: ")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Serve]:
    metrics = free_port()
    s = Serve(tmp_path, rules='127.0.0.1:allow,RELAYCLIENT=""\n', services=("smtp",),
              extra=("--metrics", f"127.0.0.1:{metrics}"))
    s.metrics_port = metrics  # type: ignore[attr-defined]
    # the group option goes before the subcommand: rebuild the command line around it
    args = s.args
    s.args = lambda: [*args()[:3], "--log-file", str(tmp_path / "relaygate.log"),  # type: ignore[method-assign]
                      *args()[3:]]
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _wait_for(pred: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_check_uses_the_rules_of_the_running_serve(served: Serve) -> None:
    r = served.relaygate("check", "127.0.0.1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("allow 127.0.0.1: rule ")
    # without serve running, the same command has no rules to go by
    served.stop()
    r = served.relaygate("check", "127.0.0.1")
    assert r.returncode == 1 and r.stdout.startswith("deny"), r.stdout


def test_status_json_shows_the_running_configuration(served: Serve) -> None:
    r = served.relaygate("status", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    procs = [p for p in report["processes"] if p["command"] == "serve"]
    assert len(procs) == 1 and procs[0]["state"] == "running"
    cfg = procs[0]["config"]
    assert cfg["rules_file"] == str(served.workdir / "rules")
    assert cfg["data_dir"] == str(served.data_dir)
    assert cfg["domains"] == ["example.org"]
    assert cfg["expiry"] == 2.0
    assert cfg["store"].startswith("sqlite://")
    listeners = {a for svc in procs[0]["services"] for a in svc["listeners"]}
    assert f"127.0.0.1:{served.ports['smtp']}" in listeners
    assert report["serve"]["config"] == cfg
    # a clean stop removes the record
    served.stop()
    assert not list((served.data_dir / "run").glob("*.json"))


def test_log_file_has_iso_times_one_start_format_and_who_relayed(served: Serve) -> None:
    log = served.workdir / "relaygate.log"
    client = smtp("127.0.0.1", "127.0.0.1", served.ports["smtp"])
    client.sendmail("carol@sender.example", ["dave@far.example"],
                    b"Subject: hi\r\n\r\nhello\r\n")
    client.quit()
    _wait_for(lambda: b"relayed " in log.read_bytes(), "the relayed line")
    lines = log.read_text().splitlines()
    assert lines and all(ISO.match(line) for line in lines), lines[:5]
    relayed = [line for line in lines if " relayed " in line]
    assert len(relayed) == 1
    assert ("relayed service=smtp ip=127.0.0.1 basis=rule sender=carol@sender.example "
            "recipient=dave@far.example helo=client.test queue_id=") in relayed[0]
    # one format for the start-up lines: events only, no "smtp listening on ..."
    assert not any("listening on" in line for line in lines)
    assert any(f"serve.listening service=smtp address=127.0.0.1:{served.ports['smtp']}"
               in line for line in lines)
    # logrotate: rename, then SIGHUP; the next lines go to a new file of the same name
    os.rename(log, served.workdir / "relaygate.log.1")
    assert served.proc is not None
    served.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: log.exists() and b"serve.reloaded" in log.read_bytes(), "a new log file")
    assert "parts=log," in log.read_text()


def _status_page(served: Serve) -> str:
    url = f"http://127.0.0.1:{served.metrics_port}/"  # type: ignore[attr-defined]
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        return str(resp.read().decode("utf-8"))


def test_status_page_in_headless_chromium(served: Serve, tmp_path: Path) -> None:
    chromium = need_program("chromium", "chromium-browser")
    hostile = "<script>alert(1)</script>"
    r = served.relaygate("allow", "127.0.0.42", "--user", f"eve{hostile}", "--ttl", "600")
    assert r.returncode == 0, r.stderr
    client = smtp("127.0.0.1", "127.0.0.1", served.ports["smtp"])
    client.sendmail("carol@sender.example", ["dave@far.example"], b"Subject: x\r\n\r\nx\r\n")
    client.quit()
    html = _status_page(served)
    assert "<script" not in html and "&lt;script&gt;" in html
    assert 'http-equiv="refresh"' in html
    url = f"http://127.0.0.1:{served.metrics_port}/"  # type: ignore[attr-defined]
    profile = tempfile.mkdtemp(dir=tmp_path)
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout
    assert "Open relay windows" in text and "127.0.0.42" in text
    # the user name is text in the page, not markup: no script element was made
    assert "eve&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script" not in text
    assert re.search(r"<th>allow</th>", text) and "queued" in text
    shot = Path(os.environ.get("RELAYGATE_SCREENSHOT_DIR", str(tmp_path))) / "status-page.png"
    r2 = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1000,900", url],
                        capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and shot.stat().st_size > 5000, r2.stderr[-2000:]


def test_status_page_not_served_on_a_public_address_unless_configured(tmp_path: Path) -> None:
    from relaygate.servers.listeners import parse_listen
    from relaygate.servers.metrics_http import status_page_allowed

    assert status_page_allowed(parse_listen("127.0.0.1:9100"), "loopback")
    assert status_page_allowed(parse_listen("[::1]:9100"), "loopback")
    assert status_page_allowed(parse_listen("unix:/run/relaygate/metrics"), "loopback")
    assert not status_page_allowed(parse_listen("0.0.0.0:9100"), "loopback")
    assert not status_page_allowed(parse_listen("192.0.2.1:9100"), "loopback")
    assert status_page_allowed(parse_listen("0.0.0.0:9100"), "always")
    assert not status_page_allowed(parse_listen("127.0.0.1:9100"), "off")


def test_status_without_serve_sees_policyd(tmp_path: Path) -> None:
    """The Postfix+Dovecot deployment: policyd alone; status says it runs and exits 0."""
    data = tmp_path / "data"
    port = free_port()
    base = [sys.executable, "-m", "relaygate", "--data-dir", str(data)]
    proc = subprocess.Popen([*base, "policyd", "--listen", f"127.0.0.1:{port}"],
                            stderr=subprocess.PIPE, env=env())
    try:
        _wait_for(lambda: any((data / "run").glob("policyd-*.json")), "policyd's record")
        r = subprocess.run([*base, "status"], capture_output=True, text=True, env=env(),
                           timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"policyd: running, pid {proc.pid}" in r.stdout
        assert f"policy       127.0.0.1:{port}" in r.stdout
        assert "serve: not running" not in r.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    text = err.decode()
    assert f"policyd.started pid={proc.pid}" in text and f"policyd.stopped pid={proc.pid}" in text
    assert not list((data / "run").glob("*.json"))
    r = subprocess.run([*base, "status"], capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 1


def test_status_reports_a_killed_process_as_stale(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    base = [sys.executable, "-m", "relaygate", "--data-dir", str(data)]
    proc = subprocess.Popen([*base, "policyd", "--listen", f"127.0.0.1:{port}"],
                            stderr=subprocess.DEVNULL, env=env())
    _wait_for(lambda: any((data / "run").glob("policyd-*.json")), "policyd's record")
    proc.kill()
    proc.wait(10)
    r = subprocess.run([*base, "status", "--json"], capture_output=True, text=True, env=env(),
                       timeout=60)
    assert r.returncode == 1
    procs = json.loads(r.stdout)["processes"]
    assert [(p["command"], p["state"]) for p in procs] == [("policyd", "stale")]


def test_status_sees_watch_log_and_sighup_does_not_kill_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    watched = tmp_path / "mail.log"
    watched.write_text("")
    base = [sys.executable, "-m", "relaygate", "--data-dir", str(data)]
    proc = subprocess.Popen([*base, "--log-file", str(tmp_path / "w.log"), "watch-log",
                             str(watched)], stderr=subprocess.PIPE, env=env())
    try:
        _wait_for(lambda: any((data / "run").glob("watch-log-*.json")), "watch-log's record")
        proc.send_signal(signal.SIGHUP)  # logrotate's postrotate: reopen, not die
        time.sleep(0.5)
        assert proc.poll() is None
        r = subprocess.run([*base, "status"], capture_output=True, text=True, env=env(),
                           timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"watch-log: running, pid {proc.pid}" in r.stdout
        assert str(watched) in r.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert not list((data / "run").glob("*.json"))
    assert ISO.match((tmp_path / "w.log").read_text())
