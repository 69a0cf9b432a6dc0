"""Group commit of directory fsyncs: concurrent callers share one ``fsync``.

Theory of operation
-------------------
A message is durable when its file is fsynced *and* the directory entry
that names it (the rename into ``new/``, ``msg/``, ``env/``) is: the
directory has to be fsynced after the rename. When twenty SMTP transfers end
together, twenty fsyncs of the same directory would each wait for the disk,
although one fsync started after the last rename makes all twenty entries
durable at once.

:func:`sync_dir` is that shared fsync. Each call takes a ticket (a number,
per directory) *after* its own rename. A caller whose ticket is not yet
covered either starts an fsync itself, covering every ticket taken so far
(the fsync starts after those renames, so it covers their entries), or,
when an fsync of that directory is already running (it may have started
before this caller's rename, so it does not count), waits for it and then
looks again: by then either a later fsync covered the ticket, or this
caller starts the next one for everybody who arrived meanwhile. So a call
returns only once an fsync that *began after the call began* has finished,
exactly what a private fsync would promise, and N concurrent callers cost
about two fsyncs instead of N.

A failed fsync raises in the caller that ran it; the callers it would have
covered are not told it worked: they wake and one of them tries again (and
gets its own error if the disk is really gone).

Blocking; call it from the delivery threads, never from the event loop.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

#: guards every directory's state (held only to read or change numbers)
_lock = threading.Lock()


class _Dir:
    """The group-commit state of one directory."""

    __slots__ = ("cond", "covered", "running", "tickets", "users")

    def __init__(self) -> None:
        self.cond = threading.Condition(_lock)
        #: tickets handed out so far
        self.tickets = 0
        #: every ticket up to this one is durable (an fsync that began after it finished)
        self.covered = 0
        #: an fsync of the directory is running
        self.running = False
        #: callers inside sync_dir for this directory (the state is dropped at zero)
        self.users = 0


_dirs: dict[str, _Dir] = {}


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync one directory (its entries: creations, renames, unlinks)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: str | os.PathLike[str] | Path) -> None:
    """Make every change to directory ``path`` made before this call durable.

    Concurrent callers for the same directory share fsyncs (see the module
    docstring); the result is the same as calling :func:`fsync_dir`.
    """
    key = os.fspath(path)
    with _lock:
        state = _dirs.get(key)
        if state is None:
            state = _dirs[key] = _Dir()
        state.users += 1
        state.tickets += 1
        ticket = state.tickets
        try:
            while state.covered < ticket:
                if state.running:
                    state.cond.wait()
                    continue
                state.running = True
                cover = state.tickets
                _lock.release()
                failed = True
                try:
                    fsync_dir(key)
                    failed = False
                finally:
                    _lock.acquire()
                    state.running = False
                    if not failed and cover > state.covered:
                        state.covered = cover
                    state.cond.notify_all()
        finally:
            state.users -= 1
            if state.users == 0:
                del _dirs[key]
