"""Maildir delivery (the tmp/ -> new/ protocol) shared by SMTP, bounces and APPEND.

A message is written to ``tmp/UNIQUE``, fsynced, then renamed to
``new/UNIQUE`` and the directory fsynced, so a reader never sees a partial
message and a crash after the reply loses nothing. Unique names follow the
modern convention ``SECONDS.M<usec>P<pid>Q<counter>.HOST`` (usec in six digits) with
``,S=<size>`` so readers can learn the size without a stat.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

_counter = itertools.count(1)
#: maildir subfolders
SUBDIRS = ("tmp", "new", "cur")


def _host() -> str:
    # '/' and ':' are not allowed in the host part of a unique name.
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


_HOST = _host()


def ensure_maildir(path: Path, mode: int = 0o700) -> None:
    """Create ``path`` with tmp/, new/ and cur/ if missing."""
    for sub in SUBDIRS:
        (path / sub).mkdir(parents=True, exist_ok=True, mode=mode)


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def deliver(maildir: Path, data: bytes, *, subdir: str = "new", flags: str = "") -> Path:
    """Durably deliver ``data`` into ``maildir`` (created if missing); return the final path.

    ``subdir="cur"`` with ``flags`` (e.g. ``"S"``) is for IMAP APPEND.
    """
    ensure_maildir(maildir)
    name = unique_name(len(data))
    tmp = maildir / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    final_name = name if subdir == "new" else f"{name}:2,{flags}"
    final = maildir / subdir / final_name
    os.rename(tmp, final)
    _fsync_dir(maildir / subdir)
    return final
