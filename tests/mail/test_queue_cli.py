"""`relaygate queue list|show|flush|delete|run`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from relaygate.cli import main
from relaygate.mail.queue import Queue

from .test_queue_helpers import message


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def cli(data_dir: Path, *args: str, config: Path | None = None):
    pre = ["--data-dir", str(data_dir)]
    if config is not None:
        pre = ["--config", str(config), *pre]
    return CliRunner().invoke(main, [*pre, "queue", *args], catch_exceptions=False)


def test_list_never_invents_a_data_directory(tmp_path: Path) -> None:
    from relaygate.errors import ConfigError

    r = CliRunner().invoke(main, ["--data-dir", str(tmp_path / "none"), "queue", "list"])
    assert isinstance(r.exception, ConfigError) and "no data directory" in str(r.exception)
    assert not (tmp_path / "none").exists()


def test_list_empty(data_dir: Path) -> None:
    r = cli(data_dir, "list")
    assert r.exit_code == 0
    assert "queue is empty" in r.output
    assert json.loads(cli(data_dir, "list", "--json").output) == []


def test_list_and_show(data_dir: Path) -> None:
    q = Queue(data_dir / "queue")
    qid = q.enqueue("alice@example.org", ["bob@example.net", "carol@example.net"],
                    message("about lunch"))
    env = q.load(qid)
    env.attempts = 2
    env.next_attempt = time.time() + 600
    env.recipients[0].last_error = env.last_error = "451 4.7.1 greylisted"
    q.save(env)
    r = cli(data_dir, "list")
    assert r.exit_code == 0
    line = r.output.splitlines()[1]
    for part in (qid, "alice@example.org", "bob@example.net (+1)", "2", "in 9m",
                 "451 4.7.1 greylisted"):
        assert part in line
    (item,) = json.loads(cli(data_dir, "list", "--json").output)
    assert item["id"] == qid and item["attempts"] == 2
    assert [r_["addr"] for r_ in item["recipients"]] == ["bob@example.net", "carol@example.net"]
    shown = cli(data_dir, "show", qid)
    assert shown.exit_code == 0
    assert "Subject: about lunch" in shown.output
    assert "pending  bob@example.net  tries=0  (451 4.7.1 greylisted)" in shown.output
    doc = json.loads(cli(data_dir, "show", qid, "--json").output)
    assert doc["envelope"]["sender"] == "alice@example.org"
    assert "Subject: about lunch" in doc["headers"]


def test_show_unknown_and_bad_ids(data_dir: Path) -> None:
    assert cli(data_dir, "show", "0" * 24).exit_code == 1
    r = cli(data_dir, "show", "../../etc/passwd")
    assert r.exit_code == 2
    assert "not a queue id" in r.output


def test_list_shows_corrupt_envelopes(data_dir: Path) -> None:
    q = Queue(data_dir / "queue")
    qid = q.new_id()
    (q.env_dir / qid).write_bytes(b"{")
    assert "corrupt envelope" in cli(data_dir, "list").output
    assert "corrupt" in json.loads(cli(data_dir, "list", "--json").output)[0]


def test_delete_needs_yes(data_dir: Path) -> None:
    q = Queue(data_dir / "queue")
    qid = q.enqueue("a@b.c", ["d@e.f"], b"x")
    r = cli(data_dir, "delete", qid)
    assert r.exit_code == 2
    assert "--yes" in r.output
    assert q.ids() == [qid]
    r = cli(data_dir, "delete", qid, "--yes")
    assert r.exit_code == 0 and q.ids() == []
    assert not (q.msg_dir / qid).exists()
    assert cli(data_dir, "delete", qid, "--yes").exit_code == 1


def test_flush_without_worker_marks_all_due(data_dir: Path) -> None:
    q = Queue(data_dir / "queue")
    qid = q.enqueue("a@b.c", ["d@e.f"], b"x")
    env = q.load(qid)
    env.next_attempt = time.time() + 9999
    q.save(env)
    r = cli(data_dir, "flush")
    assert r.exit_code == 0 and "1 message marked due" in r.output
    assert q.load(qid).next_attempt <= time.time()
    assert not (q.directory / "flush").exists()


def test_flush_with_worker_running_asks_it(data_dir: Path) -> None:
    q = Queue(data_dir / "queue")
    with q.lock():
        r = cli(data_dir, "flush")
    assert r.exit_code == 0 and "asked the running delivery worker" in r.output
    assert (q.directory / "flush").exists()


def test_run_refuses_bad_smtproutes(data_dir: Path, tmp_path: Path) -> None:
    from relaygate.errors import ConfigError

    config = tmp_path / "c.toml"
    config.write_text('smtproutes = ["example.com:[::1"]\n')
    with pytest.raises(ConfigError) as err:
        cli(data_dir, "run", "--once", config=config)
    assert "smtproutes" in str(err.value)


def test_run_once_delivers(data_dir: Path, tmp_path: Path) -> None:
    import asyncio
    import sys

    from .test_queue_helpers import Sink

    async def scenario() -> list[str]:
        sink = await Sink().start()
        config = tmp_path / "c.toml"
        config.write_text(f'hostname = "relay.test"\nsmtproutes = [":127.0.0.1:{sink.port}"]\n')
        q = Queue(data_dir / "queue")
        q.enqueue("a@example.org", ["b@example.net"], message("cli"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relaygate.cli", "--config", str(config),
            "--data-dir", str(data_dir), "queue", "run", "--once",
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        await sink.stop()
        assert proc.returncode == 0, err.decode()
        assert q.ids() == []
        return sink.delivered_to()

    assert asyncio.run(scenario()) == ["b@example.net"]


def test_run_while_another_worker_runs_is_a_temporary_failure(data_dir: Path,
                                                              tmp_path: Path) -> None:
    import subprocess
    import sys

    q = Queue(data_dir / "queue")
    config = tmp_path / "c.toml"
    config.write_text('smtproutes = [":127.0.0.1:1"]\n')
    with q.lock():
        p = subprocess.run([sys.executable, "-m", "relaygate.cli", "--config", str(config),
                            "--data-dir", str(data_dir), "queue", "run", "--once"],
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 111
    assert "another process is running the delivery worker" in p.stderr


# -- issue 17 point 10: whole errors, bulk delete, hold/release, the quarantine ----------


def test_list_shows_the_whole_error_text(data_dir: Path) -> None:
    q = Queue(data_dir / "queue")
    qid = q.enqueue("a@example.org", ["b@example.net"], message("x"))
    env = q.load(qid)
    long_error = ("Connect call failed ('192.0.2.7', 25): connection refused by the remote "
                  "host after 30 seconds; next try in 5 minutes")
    env.attempts = 1
    env.last_error = long_error
    q.save(env)
    r = cli(data_dir, "list")
    assert long_error in r.output


def test_delete_all_deferred_keeps_fresh_mail(data_dir: Path) -> None:
    q = Queue(data_dir / "queue")
    fresh = q.enqueue("a@example.org", ["b@example.net"], message("fresh"))
    tried = []
    for i in range(3):
        qid = q.enqueue("a@example.org", ["b@example.net"], message(f"tried {i}"))
        env = q.load(qid)
        env.attempts = 1
        q.save(env)
        tried.append(qid)
    r = cli(data_dir, "delete", "--all-deferred")
    assert r.exit_code == 2 and "--yes" in r.output
    r = cli(data_dir, "delete", "--all-deferred", "--yes")
    assert r.exit_code == 0 and "deleted 3 deferred messages" in r.output
    assert q.ids() == [fresh]
    assert sorted(p.name for p in q.msg_dir.iterdir()) == [fresh]


def test_hold_and_release(data_dir: Path) -> None:
    q = Queue(data_dir / "queue")
    a = q.enqueue("a@example.org", ["b@example.net"], message("one"))
    b = q.enqueue("a@example.org", ["b@example.net"], message("two"))
    env = q.load(a)
    env.next_attempt = time.time() + 3600
    q.save(env)
    r = cli(data_dir, "hold", a)
    assert r.exit_code == 0 and f"held {a}" in r.output
    assert q.ids() == [b]  # the worker no longer sees it
    line = next(x for x in cli(data_dir, "list").output.splitlines() if a in x)
    assert "held" in line
    assert json.loads(cli(data_dir, "list", "--json").output)[0]["held"] is True
    assert q.stats().held == 1
    # held messages are not orphans: clean-up keeps their message files
    q.cleanup(time.time() + 10 * 3600)
    assert (q.msg_dir / a).exists()
    assert cli(data_dir, "hold", a).exit_code == 1  # no longer queued
    r = cli(data_dir, "release", a)
    assert r.exit_code == 0 and f"released {a}" in r.output
    assert q.ids() == [a, b] and q.load(a).next_attempt <= time.time()
    assert cli(data_dir, "release", a).exit_code == 1
    assert cli(data_dir, "hold", "--all").exit_code == 0
    assert q.ids() == [] and q.held_ids() == [a, b]
    assert cli(data_dir, "delete", b, "--yes").exit_code == 0  # held ones can be deleted
    assert cli(data_dir, "release", "--all").exit_code == 0
    assert q.ids() == [a] and not (q.msg_dir / b).exists()
    assert cli(data_dir, "hold").exit_code == 2


def test_quarantine_counted_listed_released_deleted(data_dir: Path, tmp_path: Path) -> None:
    q = Queue(data_dir / "queue")
    bad = q.enqueue("a@example.org", ["b@example.net"], message("repair me"))
    good_json = (q.env_dir / bad).read_bytes()
    q.quarantine(bad, "corrupt envelope: not JSON")
    (q.quarantine_dir / f"{bad}.env").write_bytes(b"garbage")
    bounce_file = q.keep_for_postmaster(message("double bounce"), Queue.new_id())
    orphan = Queue.new_id()
    (q.quarantine_dir / f"orphan-{orphan}.msg").write_bytes(message("orphan"))
    assert q.stats().quarantined == 3

    doc = json.loads(cli(data_dir, "list", "--quarantine", "--json").output)
    kinds = {d["kind"]: d for d in doc}
    assert set(kinds) == {"envelope", "double-bounce", "orphan"}
    assert kinds["envelope"]["name"] == bad and "not JSON" in kinds["envelope"]["reason"]
    bounce = kinds["double-bounce"]["name"]
    assert bounce == "bounce-" + bounce_file.name.removesuffix(".eml")
    text = cli(data_dir, "list", "--quarantine").output
    assert bad in text and bounce in text and f"orphan-{orphan}" in text

    # status counts them
    from relaygate.cli import main as root
    st = CliRunner().invoke(root, ["--data-dir", str(data_dir), "status", "--json"])
    assert json.loads(st.output)["queue"]["quarantined"] == 3

    # a still-corrupt envelope is refused; once repaired it goes back as it was
    r = cli(data_dir, "release", "--quarantine", bad)
    assert r.exit_code == 1 and "still corrupt" in r.output
    (q.quarantine_dir / f"{bad}.env").write_bytes(good_json)
    r = cli(data_dir, "release", "--quarantine", bad)
    assert r.exit_code == 0 and q.ids() == [bad]
    assert q.load(bad).recipients[0].addr == "b@example.net"
    assert not list(q.quarantine_dir.glob(f"{bad}.*"))

    # a double bounce goes to the postmaster; an orphan needs --to
    cfg = tmp_path / "relaygate.toml"
    cfg.write_text('domains = ["example.org"]\n')
    r = cli(data_dir, "release", "--quarantine", bounce, config=cfg)
    assert r.exit_code == 0 and "<postmaster@example.org>" in r.output, r.output
    new = r.output.split(" as ")[1].split()[0]
    assert q.load(new).sender == "" and q.load(new).recipients[0].addr == "postmaster@example.org"
    r = cli(data_dir, "release", "--quarantine", f"orphan-{orphan}")
    assert r.exit_code == 1 and "--to" in r.output
    assert cli(data_dir, "delete", "--quarantine", f"orphan-{orphan}").exit_code == 2
    r = cli(data_dir, "delete", "--quarantine", f"orphan-{orphan}", "--yes")
    assert r.exit_code == 0
    assert q.quarantined() == []
    assert cli(data_dir, "delete", "--quarantine", "../../etc/passwd", "--yes").exit_code == 2
    assert cli(data_dir, "delete", "--quarantine", f"orphan-{orphan}", "--yes").exit_code == 1
