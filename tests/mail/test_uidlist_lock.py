"""The uidlist dotlock (relaygate.mail.uidlist): a writer whose lock file became the
uidlist never removes the next writer's lock.

Regression: the first writer unlinked ``dovecot-uidlist.lock`` after renaming it
over the uidlist; a second writer that had meanwhile created a new lock file lost
it, and its own rename failed with FileNotFoundError (an IMAP EXPUNGE answered
``BYE [SERVERBUG]`` while another session's IDLE refresh numbered a message).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from pymap.backend.maildir.uidlist import UidList

from relaygate.mail import uidlist
from relaygate.mail.maildir import deliver, ensure_maildir


def test_a_committed_lock_is_not_removed_again(tmp_path: Path) -> None:
    root = tmp_path / "box"
    ensure_maildir(root)
    deliver(root, b"Subject: one\r\n\r\nx\r\n")
    path = str(root)
    uidlist.refresh(uidlist.Index(), path, path)  # creates the uidlist
    lock = Path(UidList.get_lock(path))
    with contextlib.ExitStack() as first:
        held = first.enter_context(uidlist._dotlock(path))
        uidlist._commit(path, uidlist._read_uidlist(path), held)
        assert not lock.exists()  # renamed over the uidlist: the name is free
        with uidlist._dotlock(path) as second:
            first.close()  # the first writer finishes after the second took the lock
            assert lock.exists(), "the first writer removed the second writer's lock"
            uidlist._commit(path, uidlist._read_uidlist(path), second)
    assert not lock.exists()
    assert len(UidList.file_read(path).records) == 1


def test_concurrent_writers_all_commit(tmp_path: Path) -> None:
    root = tmp_path / "box"
    ensure_maildir(root)
    path = str(root)
    keys = [deliver(root, f"Subject: {i}\r\n\r\nx\r\n".encode()).name for i in range(40)]
    uidlist.refresh(uidlist.Index(), path, path)
    errors: list[BaseException] = []

    def forget(some: list[str]) -> None:
        try:
            for key in some:
                uidlist.forget(path, [key])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=forget, args=(keys[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert list(UidList.file_read(path).records) == []
    assert not Path(UidList.get_lock(path)).exists()
