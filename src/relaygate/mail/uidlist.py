"""A Maildir folder's index: its ``dovecot-uidlist`` and its message files, kept in memory.

pymap's maildir backend re-read and re-parsed the whole ``dovecot-uidlist``
for every message of a FETCH and stat()ed every file on the event loop, so a
FETCH of N messages cost O(N^2), and UID entries of deleted files stayed in the
list forever (relaygate's POP3 DELE only unlinks the file). An :class:`Index` is
one immutable snapshot; :func:`refresh` (blocking: call it in a thread, once per
IMAP command) builds the next one from the previous:

- the directories are listed (``new/`` before ``cur/``, so a file moving from
  one to the other is seen at least once) and only names not known before are
  stat()ed (their modification time is INTERNALDATE, their size is cached);
- the uidlist is re-read only when its (inode, mtime, size) stamp changed;
- files without an entry get UIDs in delivery order, and entries whose file is
  gone (expunged, or deleted over POP3) are pruned after a second listing
  confirms it. Both are written under Dovecot's dotlock
  (``dovecot-uidlist.lock``, created exclusively, written and renamed over the
  uidlist, as Dovecot and pymap do), so Dovecot can take the Maildir over.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from pymap.backend.maildir.uidlist import Record, UidList
from pymap.parsing.specials import ObjectId

from relaygate.mail.mailbox import delivery_order

#: a lock file older than this (seconds) was left by a crashed writer (pymap's value)
LOCK_STALE = 600.0
#: how long a writer waits for another's lock before giving up (seconds)
LOCK_WAIT = 30.0
COLON = ":"

log = logging.getLogger("relaygate.mailbox")


class IndexLockTimeout(TimeoutError):
    """The uidlist stayed locked by another writer for :data:`LOCK_WAIT` seconds."""


@dataclass(frozen=True, slots=True)
class FileMeta:
    """One message file: where it is and what stat() said when it was first seen."""

    subdir: str
    name: str
    mtime: float
    size: int

    @property
    def info(self) -> str:
        _, sep, info = self.name.partition(COLON)
        return info if sep else ""

    @property
    def flags(self) -> str:
        info = self.info
        return info[2:] if info.startswith("2,") else ""


@dataclass(frozen=True)
class Index:
    """One snapshot of a folder: UID records and the files that exist."""

    uid_validity: int = 0
    next_uid: int = 1
    global_uid: bytes = b""
    records: Mapping[int, Record] = field(default_factory=dict)
    files: Mapping[str, FileMeta] = field(default_factory=dict)
    stamp: tuple[int, int, int] | None = None

    def live(self) -> Iterable[tuple[Record, FileMeta]]:
        """Records whose file exists, in UID order."""
        files = self.files
        for uid in sorted(self.records):
            rec = self.records[uid]
            meta = files.get(rec.key)
            if meta is not None:
                yield rec, meta

    def lookup(self, uid: int) -> tuple[Record, FileMeta] | None:
        rec = self.records.get(uid)
        if rec is None:
            return None
        meta = self.files.get(rec.key)
        return None if meta is None else (rec, meta)


def _key(name: str) -> str:
    return name.split(COLON, 1)[0]


def _list(root: str) -> dict[str, tuple[str, str]]:
    """key -> (subdir, name) of every message file (``new/`` first)."""
    found: dict[str, tuple[str, str]] = {}
    for subdir in ("new", "cur"):
        try:
            names = os.listdir(os.path.join(root, subdir))
        except FileNotFoundError:
            continue
        for name in names:
            if not name.startswith("."):
                found[_key(name)] = (subdir, name)
    return found


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(UidList.get_file(path))
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _read_uidlist(path: str) -> UidList:
    return UidList.file_read(path)


class _Lock:
    """A held dotlock: its descriptor, and whether :func:`_commit` renamed it away."""

    __slots__ = ("committed", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.committed = False


@contextlib.contextmanager
def _dotlock(path: str) -> Iterator[_Lock]:
    """Dovecot's dotlock on the uidlist."""
    lock = UidList.get_lock(path)
    deadline = time.monotonic() + LOCK_WAIT
    delay = 0.005
    while True:
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(lock).st_mtime >= LOCK_STALE:
                    os.unlink(lock)
                    continue
            if time.monotonic() > deadline:
                raise IndexLockTimeout(lock) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    held = _Lock(fd)
    try:
        yield held
    finally:
        os.close(fd)
        if not held.committed:
            # Once renamed over the uidlist the name is free: another writer may
            # already hold a new lock file by that name, which is not ours to remove.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)


def _commit(path: str, uidl: UidList, held: _Lock) -> None:
    """Write ``uidl`` into the held lock file and rename it over the uidlist."""
    buf = io.StringIO()
    uidl.write(buf)
    data = buf.getvalue().encode("utf-8")
    view = memoryview(data)
    while view:
        view = view[os.write(held.fd, view):]
    os.fsync(held.fd)
    os.replace(UidList.get_lock(path), UidList.get_file(path))
    held.committed = True
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _to_index(uidl: UidList, files: Mapping[str, FileMeta],
              stamp: tuple[int, int, int] | None) -> Index:
    return Index(uidl.uid_validity, uidl.next_uid, uidl.global_uid,
                 {rec.uid: rec for rec in uidl.records}, files, stamp)


def _scan_files(root: str, previous: Mapping[str, FileMeta]) -> dict[str, FileMeta]:
    files: dict[str, FileMeta] = {}
    for key, (subdir, name) in _list(root).items():
        old = previous.get(key)
        if old is not None and old.subdir == subdir and old.name == name:
            files[key] = old
            continue
        try:
            st = os.stat(os.path.join(root, subdir, name))
        except FileNotFoundError:
            continue  # moved or deleted between listdir and stat: next scan sees it
        files[key] = FileMeta(subdir, name, st.st_mtime, st.st_size)
    return files


def refresh(previous: Index, path: str, root: str, *,
            expunged: Collection[str] = ()) -> Index:
    """The folder as it is now (blocking). ``path`` holds the uidlist, ``root``
    the ``new/`` and ``cur/`` directories; keys in ``expunged`` are known gone."""
    files = _scan_files(root, previous.files)
    stamp = _stamp(path)
    if stamp is not None and stamp == previous.stamp:
        index = Index(previous.uid_validity, previous.next_uid, previous.global_uid,
                      previous.records, files, stamp)
    else:
        index = _to_index(_read_uidlist(path), files, stamp)
    numbered = {rec.key for rec in index.records.values()}
    unnumbered = [key for key in files if key not in numbered]
    stale = [key for key in numbered if key not in files]
    if stale and not expunged:
        # a file renamed during the listing can be missing from it: confirm
        again = _list(root)
        stale = [key for key in stale if key not in again]
    if not unnumbered and not stale and stamp is not None:
        return index
    with _dotlock(path) as held:
        uidl = _read_uidlist(path)  # under the lock: another writer may have numbered
        keys = {rec.key: rec.uid for rec in uidl.records}
        gone = set(stale)
        for rec in list(uidl.records):
            if rec.key in gone:
                uidl.remove(rec.uid)
        for key in sorted(unnumbered, key=delivery_order):
            if key in keys:
                continue
            meta = files[key]
            fields = {"E": str(ObjectId.random_email_id()),
                      "T": str(ObjectId.random_thread_id())}
            uidl.set(Record(uidl.next_uid, fields, f"{key}{COLON}{meta.info}"))
            uidl.next_uid += 1
        _commit(path, uidl, held)
    return _to_index(uidl, files, _stamp(path))


def forget(path: str, keys: Collection[str]) -> None:
    """Drop the uidlist entries of ``keys`` (blocking; for POP3 DELE and expunge).

    Does nothing when the folder has no uidlist or none of the keys is listed.
    """
    if not keys or _stamp(path) is None:
        return
    wanted = set(keys)
    if not any(rec.key in wanted for rec in _read_uidlist(path).records):
        return
    with _dotlock(path) as held:
        uidl = _read_uidlist(path)
        for rec in list(uidl.records):
            if rec.key in wanted:
                uidl.remove(rec.uid)
        _commit(path, uidl, held)


def forget_deleted(path: str, keys: Collection[str]) -> None:
    """:func:`forget` for POP3 at QUIT: a failure is logged, never raised (the
    messages are gone; the next IMAP SELECT prunes what is left)."""
    try:
        forget(path, keys)
    except (OSError, ValueError) as exc:
        log.warning("cannot update %s: %s", UidList.get_file(path), exc)


def open_message(root: str, key: str, meta: FileMeta) -> int | None:
    """A read-only descriptor of the message file; None if it is gone (blocking).

    A file renamed since it was indexed (flags changed) is found by its key.
    """
    try:
        return os.open(os.path.join(root, meta.subdir, meta.name), os.O_RDONLY)
    except FileNotFoundError:
        pass
    for subdir in ("cur", "new"):
        try:
            names = os.listdir(os.path.join(root, subdir))
        except FileNotFoundError:
            continue
        for name in names:
            if _key(name) == key:
                with contextlib.suppress(FileNotFoundError):
                    return os.open(os.path.join(root, subdir, name), os.O_RDONLY)
    return None


def read_all(fd: int, size: int) -> bytes:
    """The rest of the file ``fd`` whose size stat() gave as ``size`` (blocking).

    A read shorter than asked is the end of a regular file, so a file that
    did not change is read in one system call.
    """
    parts = []
    want = size + 1
    while True:
        data = os.read(fd, want)
        parts.append(data)
        if len(data) < want:
            break
        want = 1 << 16
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_messages(root: str, metas: list[tuple[str, FileMeta]]) -> dict[str, bytes | None]:
    """The bytes of each (key, meta) file; None for a file that is gone (blocking)."""
    out: dict[str, bytes | None] = {}
    for key, meta in metas:
        fd = open_message(root, key, meta)
        if fd is None:
            out[key] = None
            continue
        try:
            out[key] = read_all(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    return out
