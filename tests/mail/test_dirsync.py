"""Group commit of directory fsyncs: fewer fsyncs, never a promise broken.

``os.fsync`` is replaced by a recorder that makes directory fsyncs slow (so
concurrent deliveries really overlap) and logs, in one global order, every
file fsync, rename and directory fsync start and end. The checks work on any
implementation: they count directory fsyncs and check each caller's
ordering, whatever code did them.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relaygate.mail import dirsync
from relaygate.mail.maildir import MaildirWriter
from relaygate.mail.queue import Queue

#: a directory fsync takes this long in the tests: long enough for callers to pile up
SLOW = 0.05


@dataclass
class Recorder:
    """Events from every thread, numbered in the order they happened."""

    events: list[tuple[int, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    fail_dirs: int = 0
    n: int = 0

    def note(self, kind: str, what: str) -> int:
        with self.lock:
            self.n += 1
            self.events.append((self.n, kind, what))
            return self.n

    def of(self, kind: str, what: str | None = None) -> list[int]:
        return [n for n, k, w in self.events if k == kind and (what is None or w == what)]

    def dir_fsyncs(self, path: Path) -> list[tuple[int, int]]:
        """(start, end) of every finished fsync of ``path``."""
        starts = self.of("dir-start", str(path))
        ends = self.of("dir-end", str(path))
        return list(zip(starts, ends, strict=False))


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    r = Recorder()
    real_fsync = os.fsync
    real_rename = os.rename

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            r.note("dir-start", path)
            time.sleep(SLOW)
            with r.lock:
                fail = r.fail_dirs > 0
                r.fail_dirs -= fail
            if fail:
                raise OSError(5, "Input/output error (test)")
            real_fsync(fd)
            r.note("dir-end", path)
        else:
            real_fsync(fd)
            r.note("file", path)

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_rename(src, dst)
        r.note("rename", os.fspath(dst))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    yield r


def together(n: int, fn: object) -> list[object]:
    """Run ``fn(i)`` in n threads released at the same moment; results or exceptions."""
    assert callable(fn)
    barrier = threading.Barrier(n)
    out: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_concurrent_maildir_deliveries_share_directory_fsyncs(rec: Recorder,
                                                              tmp_path: Path) -> None:
    n = 20
    maildir = tmp_path / "Maildir"
    writers = [MaildirWriter(maildir, b"Subject: %d\r\n\r\nbody\r\n" % i) for i in range(n)]
    returned: dict[int, int] = {}

    def commit(i: int) -> Path:
        path = writers[i].commit()
        returned[i] = rec.note("returned", str(i))
        return path

    paths = together(n, commit)
    assert all(isinstance(p, Path) and p.exists() for p in paths), paths
    fsyncs = rec.dir_fsyncs(maildir / "new")
    assert 1 <= len(fsyncs) < n, fsyncs
    for i, path in enumerate(paths):
        (file_synced,) = rec.of("file", str(maildir / "tmp" / writers[i].name))
        (renamed,) = rec.of("rename", str(path))
        assert file_synced < renamed
        # a directory fsync that began after the rename and ended before the return
        assert any(renamed < start and end < returned[i] for start, end in fsyncs), (
            i, renamed, returned[i], fsyncs)


def test_a_caller_never_rides_on_an_fsync_that_began_before_it(rec: Recorder,
                                                               tmp_path: Path) -> None:
    """The second caller arrives while the first one's fsync runs: it needs another."""
    d = tmp_path / "d"
    d.mkdir()
    first = threading.Thread(target=dirsync.sync_dir, args=(d,))
    first.start()
    while not rec.of("dir-start"):
        time.sleep(0.001)
    called = rec.note("called", "second")
    dirsync.sync_dir(d)
    back = rec.note("returned", "second")
    first.join()
    assert any(called < start and end < back for start, end in rec.dir_fsyncs(d))
    assert len(rec.dir_fsyncs(d)) == 2


def test_a_failed_fsync_is_not_taken_for_a_success(rec: Recorder, tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    rec.fail_dirs = 1
    results = together(8, lambda i: dirsync.sync_dir(d))
    errors = [r for r in results if isinstance(r, OSError)]
    # the one that ran the failing fsync gets the error; the others got a real fsync
    assert len(errors) == 1
    assert rec.dir_fsyncs(d), "nobody fsynced after the failure"
    assert dirsync._dirs == {}


def test_concurrent_queue_commits_share_directory_fsyncs(rec: Recorder,
                                                         tmp_path: Path) -> None:
    n = 20
    queue = Queue(tmp_path / "queue")
    writers = [queue.open_message("a@example.org", [f"r{i}@example.net"]) for i in range(n)]
    for w in writers:
        w.write(b"Subject: queued\r\n\r\nbody\r\n")
    returned: dict[str, int] = {}

    def commit(i: int) -> str:
        qid = writers[i].commit()
        returned[qid] = rec.note("returned", qid)
        return qid

    ids = together(n, commit)
    assert sorted(queue.ids()) == sorted(str(i) for i in ids)
    msg_syncs = rec.dir_fsyncs(queue.msg_dir)
    env_syncs = rec.dir_fsyncs(queue.env_dir)
    assert len(msg_syncs) < n and len(env_syncs) < n, (msg_syncs, env_syncs)
    for qid in ids:
        assert isinstance(qid, str)
        (msg_renamed,) = rec.of("rename", str(queue.msg_dir / qid))
        (env_renamed,) = rec.of("rename", str(queue.env_dir / qid))
        msg_durable = min(end for start, end in msg_syncs if start > msg_renamed)
        # the envelope (what makes the message exist) only once the message is durable
        assert msg_durable < env_renamed
        assert any(env_renamed < start and end < returned[qid] for start, end in env_syncs)
