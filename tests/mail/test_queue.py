"""The queue's on-disk format: durable enqueue, atomic updates, quarantine, clean-up."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.mail import queue as queue_mod
from relaygate.mail.queue import (
    CorruptEnvelope,
    Envelope,
    MessageGone,
    Queue,
    QueueBusy,
    QueueError,
    Recipient,
)


def test_enqueue_writes_message_and_envelope(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue")
    data = b"Subject: hi\r\n\r\nbody\r\n"
    before = time.time()
    qid = q.enqueue("alice@example.org", ["bob@example.net", "carol@example.com"], data)
    assert queue_mod.ID_RE.fullmatch(qid)
    assert (q.msg_dir / qid).read_bytes() == data
    doc = json.loads((q.env_dir / qid).read_text())
    assert doc["version"] == 1 and doc["id"] == qid
    assert doc["sender"] == "alice@example.org"
    assert [r["addr"] for r in doc["recipients"]] == ["bob@example.net", "carol@example.com"]
    assert {r["state"] for r in doc["recipients"]} == {"pending"}
    assert doc["size"] == len(data)
    assert before <= doc["created"] <= doc["next_attempt"] <= time.time()
    assert q.ids() == [qid]
    assert list(q.tmp_dir.iterdir()) == []
    for d in (q.directory, q.msg_dir, q.env_dir, q.tmp_dir, q.quarantine_dir):
        assert d.stat().st_mode & 0o777 == 0o700
    assert (q.msg_dir / qid).stat().st_mode & 0o777 == 0o600


def test_enqueue_fsyncs_files_and_directories_before_returning(tmp_path: Path,
                                                                monkeypatch) -> None:
    q = Queue(tmp_path / "queue")
    log: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst) -> None:
        log.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(queue_mod.os, "fsync", fsync)
    monkeypatch.setattr(queue_mod.os, "rename", rename)
    qid = q.enqueue("a@example.org", ["b@example.net"], b"x\r\n")
    tmp_msg, tmp_env = str(q.tmp_dir / f"{qid}.msg"), str(q.tmp_dir / f"{qid}.env")
    assert log == [
        ("fsync", tmp_msg), ("rename", str(q.msg_dir / qid)), ("fsync", str(q.msg_dir)),
        ("fsync", tmp_env), ("rename", str(q.env_dir / qid)), ("fsync", str(q.env_dir)),
    ]


def test_enqueue_failure_leaves_no_message_behind(tmp_path: Path, monkeypatch) -> None:
    q = Queue(tmp_path / "queue")
    real = queue_mod._write_file

    def failing(path: Path, data: bytes) -> None:
        if path.name.endswith(".env"):
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(queue_mod, "_write_file", failing)
    with pytest.raises(OSError):
        q.enqueue("a@example.org", ["b@example.net"], b"x\r\n")
    assert list(q.msg_dir.iterdir()) == []
    assert q.ids() == []


@pytest.mark.parametrize("sender, rcpts, data", [
    ("a@b", [], b"x"),
    ("a\r\nb@c", ["x@y"], b"x"),
    ("a@b", ["x@y\n"], b"x"),
    ("a@b", [""], b"x"),
    ("a@b", ["x@y"], "text"),
])
def test_enqueue_rejects_bad_arguments(tmp_path: Path, sender, rcpts, data) -> None:
    q = Queue(tmp_path / "queue")
    with pytest.raises(ValueError):
        q.enqueue(sender, rcpts, data)
    assert q.ids() == []


def test_listener_hears_about_each_enqueue(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue")
    heard: list[str] = []
    q.add_listener(heard.append)
    a = q.enqueue("", ["x@y.z"], b"x")
    q.remove_listener(heard.append)
    q.enqueue("", ["x@y.z"], b"x")
    assert heard == [a]


def test_save_is_atomic_and_refuses_deleted_messages(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue")
    qid = q.enqueue("a@b.c", ["d@e.f"], b"x")
    env = q.load(qid)
    env.attempts = 3
    env.recipients[0].state = "done"
    q.save(env)
    assert q.load(qid) == env
    assert list(q.tmp_dir.iterdir()) == []
    assert q.delete(qid) is True
    assert not (q.msg_dir / qid).exists()
    with pytest.raises(MessageGone):
        q.save(env)
    assert q.ids() == []
    assert q.delete(qid) is False


def test_ids_from_outside_never_name_other_files(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue")
    for bad in ("../lock", "x", "0" * 23 + "/", "A" * 24):
        with pytest.raises(QueueError):
            q.load(bad)
        with pytest.raises(QueueError):
            q.delete(bad)


def test_corrupt_envelopes_are_detected(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue")
    qid = q.new_id()
    cases = [b"", b"\xff\xfe", b"[]", b'{"version": 2}',
             json.dumps({"version": 1, "id": "0" * 24}).encode(),
             json.dumps({"version": 1, "id": qid, "sender": "a", "recipients": [],
                         "created": 1}).encode(),
             json.dumps({"version": 1, "id": qid, "sender": "a", "created": 1,
                         "recipients": [{"addr": "b", "state": "lost"}]}).encode(),
             json.dumps({"version": 1, "id": qid, "sender": "a", "created": "yesterday",
                         "recipients": [{"addr": "b"}]}).encode()]
    for raw in cases:
        (q.env_dir / qid).write_bytes(raw)
        with pytest.raises(CorruptEnvelope):
            q.load(qid)


def test_quarantine_keeps_everything(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue")
    qid = q.enqueue("a@b.c", ["d@e.f"], b"the message")
    (q.env_dir / qid).write_bytes(b"garbage")
    q.quarantine(qid, "corrupt envelope: not JSON")
    assert q.ids() == []
    assert (q.quarantine_dir / f"{qid}.env").read_bytes() == b"garbage"
    assert (q.quarantine_dir / f"{qid}.msg").read_bytes() == b"the message"
    assert "not JSON" in (q.quarantine_dir / f"{qid}.why").read_text()
    assert q.stats().quarantined == 1  # one message, however many files


def test_cleanup_removes_stale_tmp_and_moves_old_orphans(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue")
    live = q.enqueue("a@b.c", ["d@e.f"], b"live")
    old = time.time() - 2 * queue_mod.STALE_AGE
    stale_tmp = q.tmp_dir / "abc.env"
    stale_tmp.write_bytes(b"half")
    os.utime(stale_tmp, (old, old))
    young_tmp = q.tmp_dir / "def.msg"
    young_tmp.write_bytes(b"in progress")
    orphan = q.new_id()
    (q.msg_dir / orphan).write_bytes(b"never acknowledged")
    os.utime(q.msg_dir / orphan, (old, old))
    young_orphan = q.new_id()
    (q.msg_dir / young_orphan).write_bytes(b"enqueue in progress")
    os.utime(q.msg_dir / live, (old, old))
    report = q.cleanup()
    assert report.tmp_removed == ["abc.env"]
    assert report.orphans_moved == [orphan]
    assert not stale_tmp.exists() and young_tmp.exists()
    assert (q.quarantine_dir / f"orphan-{orphan}.msg").read_bytes() == b"never acknowledged"
    assert (q.msg_dir / young_orphan).exists()
    assert (q.msg_dir / live).exists()


def test_stats(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue")
    assert q.stats().total == 0 and q.stats().oldest is None
    a = q.enqueue("a@b.c", ["d@e.f"], b"x")
    q.enqueue("a@b.c", ["d@e.f"], b"x")
    env = q.load(a)
    env.attempts = 2
    q.save(env)
    st_ = q.stats(now=env.created + 10)
    assert (st_.total, st_.queued, st_.deferred) == (2, 1, 1)
    assert st_.oldest == env.created
    assert st_.oldest_age == pytest.approx(10)
    assert st_.as_dict()["deferred"] == 1


def test_one_worker_lock_per_queue(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue")
    with q.lock():
        with pytest.raises(QueueBusy):
            Queue(tmp_path / "queue").lock()
    q.lock().release()


def test_flush_request_and_reschedule(tmp_path: Path) -> None:
    q = Queue(tmp_path / "queue")
    assert q.take_flush_request() is False
    q.request_flush()
    assert q.take_flush_request() is True
    assert q.take_flush_request() is False
    qid = q.enqueue("a@b.c", ["d@e.f"], b"x")
    env = q.load(qid)
    env.next_attempt = time.time() + 3600
    q.save(env)
    assert q.reschedule_all(123.0) == 1
    assert q.load(qid).next_attempt == 123.0


addresses = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                    max_size=40)


@settings(max_examples=60, deadline=None)
@given(sender=st.one_of(st.just(""), addresses),
       rcpts=st.lists(st.tuples(addresses, st.sampled_from(["pending", "done", "failed"]),
                                st.integers(0, 50), st.one_of(st.none(), addresses),
                                st.booleans()), min_size=1, max_size=5),
       created=st.floats(0, 4e9), attempts=st.integers(0, 1000))
def test_envelope_json_round_trip(sender, rcpts, created, attempts) -> None:
    env = Envelope(id="0" * 24, sender=sender, created=created, attempts=attempts,
                   next_attempt=created + 1,
                   recipients=[Recipient(a, state=s, attempts=n, last_error=e, notified=b)
                               for a, s, n, e, b in rcpts])
    assert Envelope.from_json(env.id, env.to_json()) == env


@settings(max_examples=150, deadline=None)
@given(raw=st.one_of(st.binary(max_size=200),
                     st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                                  lambda c: st.lists(c, max_size=3)
                                  | st.dictionaries(st.sampled_from(
                                      ["version", "id", "sender", "recipients", "created",
                                       "addr", "state", "attempts"]), c, max_size=5),
                                  max_leaves=12).map(lambda v: json.dumps(v).encode())))
def test_any_garbage_is_valid_or_corrupt_never_a_crash(raw: bytes) -> None:
    try:
        Envelope.from_json("0" * 24, raw)
    except CorruptEnvelope:
        pass
