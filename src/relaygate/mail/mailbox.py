"""Reading a Maildir as a mailbox: listing, wire sizes, seen flags, deletion, locking.

Theory of operation
-------------------
A Maildir (https://cr.yp.to/proto/maildir.html) keeps one file per message in
``new/`` (not yet seen by a reader) or ``cur/`` (seen; the name carries
``:2,FLAGS``). :meth:`MaildirMailbox.scan` lists both, oldest first (by the
seconds prefix of the unique name), and gives each message:

- a *unique id*: its base name (the part before ``:``), which never changes
  when flags change, so POP3 UIDL (RFC 1939 section 7) and IMAP agree on it.
  A base name that is not a valid UIDL (1-70 octets in 0x21-0x7E) is replaced
  by ``H`` plus 40 hex digits of its SHA-256;
- its *wire size*: octets as sent on the wire with CRLF line ends (a stored
  bare LF becomes CRLF, a last line without an end gets one), before
  dot-stuffing (RFC 1939 section 11: sizes count CRLF as two octets). That
  takes reading the file once; :class:`SizeCache` remembers sizes by inode,
  size and mtime, so a mailbox polled every minute is read once.

:meth:`mark_seen` moves ``new/NAME`` to ``cur/NAME:2,S`` (or adds ``S`` to the
flags in ``cur/``); :meth:`delete` unlinks. Both follow a message another
program renamed meanwhile (found again by its base name).

:func:`lock_mailbox` gives one session at a time a mailbox (RFC 1939 section 8
asks for an exclusive-access lock): an in-process table (sessions of one
server) plus ``flock(2)`` on ``<maildir>/.relaygate-pop3.lock`` (other
processes, e.g. a second ``relaygate pop3d``). The file lock dies with the
process, so a crash never leaves a mailbox locked.

Everything here blocks: servers call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from relaygate.mail.maildir import ensure_maildir

log = logging.getLogger("relaygate.mailbox")

#: read size when sizing or sending a message
CHUNK = 64 * 1024
#: RFC 1939 section 7: a unique-id is 1 to 70 octets of 0x21-0x7E
MAX_UID_LENGTH = 70
#: sizes remembered by SizeCache (an entry is ~150 bytes)
SIZE_CACHE_ENTRIES = 100_000
#: the lock file inside a Maildir (dot files are not messages to Maildir readers)
LOCK_NAME = ".relaygate-pop3.lock"


class MailboxError(Exception):
    """A mailbox could not be read (the server answers a temporary failure)."""


class MailboxInUse(MailboxError):
    """Another session holds the mailbox (POP3 ``-ERR [IN-USE]``)."""


@dataclass
class Message:
    """One message of a scanned mailbox."""

    name: str
    uid: str
    path: Path
    size: int

    @property
    def seen(self) -> bool:
        return self.path.parent.name == "cur" and "S" in _flags(self.path.name)


def wire_size(data: bytes) -> int:
    """Octets of ``data`` with CRLF line ends, before dot-stuffing (see module docstring)."""
    sizer = WireSizer()
    sizer.feed(data)
    return sizer.finish()


class WireSizer:
    """Streaming :func:`wire_size`: feed chunks, then ``finish()``."""

    def __init__(self) -> None:
        self._size = 0
        self._last = b""

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        lf = chunk.count(b"\n")
        crlf = chunk.count(b"\r\n")
        if self._last == b"\r" and chunk[:1] == b"\n":
            crlf += 1
        # Every LF not preceded by CR gains one octet.
        self._size += len(chunk) + lf - crlf
        self._last = chunk[-1:]

    def finish(self) -> int:
        if self._last == b"\r":
            return self._size + 1  # a trailing bare CR is read as a line end: CR -> CRLF
        if self._last and self._last != b"\n":
            return self._size + 2  # the last line gets its CRLF
        return self._size


def valid_uid(name: str) -> str:
    """The UIDL of a base name: itself when valid, else ``H`` + 40 hex digits."""
    if 0 < len(name) <= MAX_UID_LENGTH and all(0x21 <= ord(c) <= 0x7E for c in name):
        return name
    return "H" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class SizeCache:
    """Wire sizes by (device, inode, size, mtime): survives renames, not rewrites."""

    def __init__(self, entries: int = SIZE_CACHE_ENTRIES) -> None:
        self.entries = entries
        self._sizes: OrderedDict[tuple[int, int, int, int], int] = OrderedDict()
        self._lock = threading.Lock()

    def size_of(self, path: Path) -> int:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with self._lock:
                cached = self._sizes.get(key)
                if cached is not None:
                    self._sizes.move_to_end(key)
                    return cached
            sizer = WireSizer()
            while chunk := f.read(CHUNK):
                sizer.feed(chunk)
            size = sizer.finish()
        with self._lock:
            self._sizes[key] = size
            while len(self._sizes) > self.entries:
                self._sizes.popitem(last=False)
        return size


def _base(name: str) -> str:
    return name.split(":", 1)[0]


def _flags(name: str) -> str:
    _, sep, info = name.partition(":2,")
    return info if sep else ""


_UNIQUE_RE = re.compile(r"(\d+)\.(?:[^.]*?M(\d+))?(?:[^.]*?Q(\d+))?")


def delivery_order(name: str) -> tuple[int, int, int, str]:
    """Delivery order from a unique name: seconds, then microseconds (``M``), then the
    delivery counter (``Q``); names compare as text only as a last resort. POP3 lists
    and IMAP numbers new messages in this order."""
    m = _UNIQUE_RE.match(name)
    if m is None:
        return (0, 0, 0, name)
    sec, usec, counter = (int(g) if g else 0 for g in m.groups())
    return (sec, usec, counter, name)


class MaildirMailbox:
    """A Maildir seen as a list of messages (blocking calls)."""

    def __init__(self, path: Path, *, sizes: SizeCache | None = None) -> None:
        self.path = Path(path)
        self.sizes = sizes or SizeCache()

    def scan(self) -> list[Message]:
        """Messages in new/ and cur/, oldest first. Creates the Maildir if missing."""
        try:
            ensure_maildir(self.path)
            entries: list[tuple[str, Path]] = []
            for sub in ("new", "cur"):
                with os.scandir(self.path / sub) as it:
                    for e in it:
                        if not e.name.startswith(".") and e.is_file(follow_symlinks=False):
                            entries.append((e.name, Path(e.path)))
        except OSError as exc:
            raise MailboxError(f"cannot read {self.path}: {exc}") from exc
        entries.sort(key=lambda item: delivery_order(item[0]))
        out: list[Message] = []
        seen: set[str] = set()
        for name, path in entries:
            base = _base(name)
            if base in seen:
                continue  # the same message in new/ and cur/ mid-rename: count it once
            try:
                size = self.sizes.size_of(path)
            except FileNotFoundError:
                continue  # removed by another reader while we listed
            except OSError as exc:
                raise MailboxError(f"cannot read {path}: {exc}") from exc
            seen.add(base)
            out.append(Message(base, valid_uid(base), path, size))
        return out

    def locate(self, msg: Message) -> Path | None:
        """The message's current path (it may have been renamed), or None if gone."""
        if msg.path.exists():
            return msg.path
        for sub in ("cur", "new"):
            try:
                with os.scandir(self.path / sub) as it:
                    for e in it:
                        if _base(e.name) == msg.name:
                            msg.path = Path(e.path)
                            return msg.path
            except OSError:
                continue
        return None

    def open(self, msg: Message) -> BinaryIO:
        """Open a message for reading; MailboxError if it vanished."""
        path = self.locate(msg)
        if path is None:
            raise MailboxError(f"message {msg.name} has been removed")
        try:
            return open(path, "rb")
        except OSError as exc:
            raise MailboxError(f"cannot open {path}: {exc}") from exc

    def read(self, msg: Message, limit: int) -> tuple[bytes, BinaryIO | None]:
        """Open a message and read it in one call (one thread hop for the server).

        A message of at most ``limit`` octets comes back whole, its file closed:
        ``(data, None)``. A larger one comes back as its first ``limit`` octets
        and the open file, positioned after them, for the caller to go on
        reading and close. MailboxError if it vanished or cannot be read.

        Plain ``os`` calls (open, fstat, read, close): a buffered file object asks
        for a ``limit``-sized buffer and several more system calls, which cost
        several times the read of a small message.
        """
        try:
            fd = os.open(msg.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            path = self.locate(msg)  # renamed by another reader meanwhile?
            if path is None:
                raise MailboxError(f"message {msg.name} has been removed") from None
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise MailboxError(f"cannot open {path}: {exc}") from exc
        except OSError as exc:
            raise MailboxError(f"cannot open {msg.path}: {exc}") from exc
        try:
            data = os.read(fd, min(os.fstat(fd).st_size, limit) + 1)
            while len(data) <= limit:  # a short read, or a file that grew: read to the end
                more = os.read(fd, limit + 1 - len(data))
                if not more:
                    break
                data += more
        except OSError as exc:
            os.close(fd)
            raise MailboxError(f"cannot read {msg.path}: {exc}") from exc
        if len(data) <= limit:
            os.close(fd)
            return data, None
        f = os.fdopen(fd, "rb")
        f.seek(limit)
        return data[:limit], f

    def mark_seen_all(self, messages: list[Message]) -> None:
        """:meth:`mark_seen` for each message, in one call (one thread hop)."""
        for msg in messages:
            self.mark_seen(msg)

    def mark_seen(self, msg: Message) -> None:
        """``new/NAME`` -> ``cur/NAME:2,S``; in cur/, add ``S`` to the flags."""
        path = msg.path
        if path.parent.name == "new":
            # The common case, one system call: rename from where the scan saw it.
            target = self.path / "cur" / f"{msg.name}:2,S"
            try:
                os.rename(path, target)
                msg.path = target
                return
            except FileNotFoundError:
                pass  # renamed or removed by someone else meanwhile: look for it
            except OSError as exc:
                log.warning("cannot mark %s seen: %s", path, exc)
                return
        found = self.locate(msg)
        if found is None:
            return
        path = found
        if path.parent.name == "new":
            target = self.path / "cur" / f"{_base(path.name)}:2,S"
        else:
            _, sep, info = path.name.partition(":2,")
            if sep and "S" in info:
                return
            if not sep and ":" in path.name:
                return  # an info we do not understand: leave it alone
            flags = "".join(sorted(set(info) | {"S"}))
            target = self.path / "cur" / f"{_base(path.name)}:2,{flags}"
        try:
            os.rename(path, target)
            msg.path = target
        except OSError as exc:
            log.warning("cannot mark %s seen: %s", path, exc)

    def delete(self, msg: Message) -> bool:
        """Remove a message; True when it is gone (also if someone else removed it)."""
        path = self.locate(msg)
        if path is None:
            return True
        try:
            path.unlink()
        except FileNotFoundError:
            return True
        except OSError as exc:
            log.warning("cannot delete %s: %s", path, exc)
            return False
        return True


_held: set[str] = set()
_held_lock = threading.Lock()


class MailboxLock:
    """An exclusive hold on a mailbox; release() (or the process ending) frees it."""

    def __init__(self, key: str, fd: int) -> None:
        self.key = key
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            with _held_lock:
                _held.discard(self.key)

    def __enter__(self) -> MailboxLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_mailbox(path: Path) -> MailboxLock:
    """Take the mailbox for one session; raise MailboxInUse when someone has it."""
    key = os.path.realpath(path)
    with _held_lock:
        if key in _held:
            raise MailboxInUse(key)
        _held.add(key)
    try:
        ensure_maildir(Path(key))
        fd = os.open(os.path.join(key, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        with _held_lock:
            _held.discard(key)
        raise MailboxError(f"cannot lock {key}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        with _held_lock:
            _held.discard(key)
        raise MailboxInUse(key) from None
    return MailboxLock(key, fd)
