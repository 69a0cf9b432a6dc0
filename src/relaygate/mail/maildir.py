"""Maildir delivery (the tmp/ -> new/ protocol) shared by SMTP, bounces and APPEND.

A message is written to ``tmp/UNIQUE`` (all at once, or piece by piece as it
arrives: :class:`MaildirWriter`), fsynced, then renamed to
``new/UNIQUE,S=<size>`` and the directory fsynced, so a reader never sees a partial
message and a crash after the reply loses nothing. Unique names follow the
modern convention ``SECONDS.M<usec>P<pid>Q<counter>.HOST`` (usec in six digits) with
``,S=<size>`` so readers can learn the size without a stat.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from pathlib import Path

from relaygate.mail.dirsync import sync_dir

_counter = itertools.count(1)
#: maildir subfolders
SUBDIRS = ("tmp", "new", "cur")


def _host() -> str:
    # '/' and ':' are not allowed in the host part of a unique name.
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


_HOST = _host()


def ensure_maildir(path: Path, mode: int = 0o700) -> None:
    """Create ``path`` with tmp/, new/ and cur/ if missing.

    The entry of every directory made is fsynced in its parent: a message
    committed into a new (or recreated) ``new/`` must not vanish with it in a
    crash.
    """
    missing: list[Path] = []
    for d in (path, *path.parents):
        if d.is_dir():
            break
        missing.append(d)
    missing.reverse()
    missing += [path / sub for sub in SUBDIRS if not (path / sub).is_dir()]
    for d in missing:
        # made by a concurrent delivery meanwhile: its entry is synced below all the same
        with contextlib.suppress(FileExistsError):
            # parents with the default mode, as mkdir(parents=True) makes them
            d.mkdir(mode=mode) if d == path or d.parent == path else d.mkdir()
    for parent in dict.fromkeys(d.parent for d in missing):
        sync_dir(parent)


def unique_name(size: int | None = None) -> str:
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    # Microseconds zero-padded: names made in one second sort as text in the order
    # they were made (readers that order new/ by name, as the IMAP library does, would
    # otherwise put M130000 before M95000).
    name = f"{sec}.M{usec:06d}P{os.getpid()}Q{next(_counter)}.{_HOST}"
    if size is not None:
        name += f",S={size}"
    return name



class MaildirWriter:
    """One message written into ``maildir/tmp`` piece by piece, then moved to ``new/``.

    For messages that arrive over the network: each :meth:`write` goes to the
    file at once, so memory never holds the message. Synchronous (run it on a
    thread from asyncio); :meth:`discard` removes the file and may be called
    any number of times, but not while another thread is in :meth:`write`.
    """

    def __init__(self, maildir: Path, prefix: bytes = b"") -> None:
        self.maildir = maildir
        self.name = unique_name()
        self.tmp = maildir / "tmp" / self.name
        self.size = 0
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:
            # A new mailbox (or one an administrator removed): create it. Looked
            # for only when missing, not before every message.
            ensure_maildir(maildir)
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._fd: int | None = fd
        if prefix:
            try:
                self.write(prefix)
            except BaseException:
                self.discard()
                raise

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None, "write after commit or discard"
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.size += len(data)

    def commit(self, *, subdir: str = "new", flags: str = "") -> Path:
        """fsync, move into ``subdir`` (``cur`` takes ``flags``), fsync it; the final path."""
        assert self._fd is not None, "commit after commit or discard"
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            name = f"{self.name},S={self.size}"
            final = self.maildir / subdir / (name if subdir == "new" else f"{name}:2,{flags}")
            try:
                os.rename(self.tmp, final)
            except FileNotFoundError:
                if not self.tmp.exists():
                    raise
                ensure_maildir(self.maildir)  # tmp/ was there, new/ or cur/ was not
                os.rename(self.tmp, final)
        except BaseException:
            self.discard()
            raise
        sync_dir(self.maildir / subdir)
        return final

    def discard(self) -> None:
        """Close and remove the temporary file (nothing was delivered)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)


def deliver(maildir: Path, data: bytes, *, subdir: str = "new", flags: str = "") -> Path:
    """Durably deliver ``data`` into ``maildir`` (created if missing); return the final path.

    ``subdir="cur"`` with ``flags`` (e.g. ``"S"``) is for IMAP APPEND.
    """
    writer = MaildirWriter(maildir)
    try:
        writer.write(data)
    except BaseException:
        writer.discard()
        raise
    return writer.commit(subdir=subdir, flags=flags)
