"""New-mail notification for IMAP IDLE: inotify watches shared per folder, polling as fallback.

pymap woke every IDLE session once a second to look at its folder (500 sessions
on empty mailboxes: 7.6 % of a CPU). Here a session in IDLE sleeps until the
kernel reports a change in its folder's ``new/`` or ``cur/`` directory:

- one :class:`Notifier` per IMAP service holds one inotify descriptor, read by
  the event loop (``loop.add_reader``; no thread);
- the first IDLE session on a folder adds the folder's two watches, later ones
  share them (reference-counted), the last one to leave IDLE removes them;
- an event wakes only the sessions of that folder, which then run their normal
  update (the folder index is refreshed in a thread and the differences are
  sent as untagged EXISTS / EXPUNGE / FETCH responses).

Every change a client can see moves a name in ``new/`` or ``cur/``: a delivery
(relaygate's SMTP, or any MTA writing the Maildir: rename or link from
``tmp/``), a flag change (a rename in ``cur/``), an EXPUNGE or a POP3 DELE (an
unlink), POP3 or IMAP taking a message out of ``new/`` (a rename). The
``dovecot-uidlist`` is not watched: relaygate rewrites it only after such a
change, and each session that woke re-reads it when its stamp changed.

A session also looks once every :data:`SAFETY_NET_INTERVAL` seconds even when
nothing was reported (Dovecot's ``mailbox_idle_check_interval`` is 30 s too):
inotify sees only changes made through the local kernel, so a Maildir on NFS
written by another host, or a change made while the watch was being set up on
a file system that lost it, still shows within that time; the look costs four
``stat()`` calls when nothing changed. Where inotify is unavailable (not
Linux, ``fs.inotify.max_user_instances`` or ``fs.inotify.max_user_watches``
reached, a folder that cannot be watched) the session polls every
:data:`POLL_INTERVAL` seconds, pymap's behaviour; the reason is logged once
per service.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from pymap.concurrent import Event

try:
    from inotify_simple import INotify
    from inotify_simple import flags as in_flags
except ImportError:  # not Linux: the library is a Linux-only dependency
    INotify = None
    in_flags = None

log = logging.getLogger("relaygate.imap")

#: seconds between looks at a watched folder when inotify reported nothing
SAFETY_NET_INTERVAL = 30.0
#: seconds between looks at a folder that cannot be watched (pymap's interval)
POLL_INTERVAL = 1.0
#: the message directories of a Maildir folder that are watched
WATCHED = ("new", "cur")

#: the service's notifier, for the sessions of the connection (set per connection task)
current: contextvars.ContextVar[Notifier | None] = contextvars.ContextVar(
    "relaygate_imap_notifier", default=None)


def _mask() -> int:
    assert in_flags is not None
    return int(in_flags.CREATE | in_flags.MOVED_TO | in_flags.MOVED_FROM | in_flags.DELETE
               | in_flags.DELETE_SELF | in_flags.MOVE_SELF | in_flags.ONLYDIR)


class Subscription:
    """One session's interest in one folder; :meth:`close` it when done."""

    __slots__ = ("_notifier", "_watch", "wake")

    def __init__(self, notifier: Notifier, watch: _FolderWatch, wake: Callable[[], None]) -> None:
        self._notifier = notifier
        self._watch: _FolderWatch | None = watch
        self.wake = wake

    @property
    def live(self) -> bool:
        """True while the kernel reports this folder's changes."""
        return self._watch is not None and self._watch.live

    def close(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            self._notifier._release(watch, self)


class _FolderWatch:
    """The shared watches of one folder and the sessions waiting on it."""

    __slots__ = ("key", "live", "subs", "wds")

    def __init__(self, key: str) -> None:
        self.key = key
        self.wds: list[int] = []
        self.subs: set[Subscription] = set()
        self.live = False


class Notifier:
    """One inotify descriptor for an IMAP service, shared by all its IDLE sessions."""

    def __init__(self, *, enabled: bool = True) -> None:
        self._inotify: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: why inotify cannot be used at all (logged once), or None
        self._broken: str | None = None if enabled else "disabled"
        self._limit_logged = False
        self._folders: dict[str, _FolderWatch] = {}
        #: watch descriptor -> folders using it (one directory reached by two paths
        #: gets one descriptor from the kernel)
        self._owners: dict[int, set[_FolderWatch]] = {}
        #: events read and folders woken, for tests and the status of the service
        self.events = 0
        self.wakeups = 0

    @property
    def watches(self) -> int:
        """Kernel watches held now."""
        return len(self._owners)

    @property
    def folders(self) -> int:
        """Folders watched now."""
        return len(self._folders)

    def subscribe(self, root: str, wake: Callable[[], None]) -> Subscription:
        """Call ``wake`` when the Maildir folder at ``root`` changes (on the loop)."""
        key = os.path.abspath(root)
        watch = self._folders.get(key)
        if watch is None:
            watch = self._folders[key] = _FolderWatch(key)
            self._add_watches(watch)
        sub = Subscription(self, watch, wake)
        watch.subs.add(sub)
        return sub

    def close(self) -> None:
        """Drop every watch and the descriptor; subscribers fall back to polling."""
        for watch in self._folders.values():
            watch.live = False
            watch.wds.clear()
        self._folders.clear()
        self._owners.clear()
        ino, self._inotify = self._inotify, None
        if ino is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(ino.fileno())
            ino.close()
        self._loop = None

    # the descriptor and its watches

    def _open(self) -> Any:
        if self._inotify is not None or self._broken is not None:
            return self._inotify
        if INotify is None:
            self._give_up("inotify is not available on this system")
            return None
        try:
            ino = INotify(nonblocking=True)
        except (OSError, AttributeError) as exc:
            # EMFILE: fs.inotify.max_user_instances reached; AttributeError: a libc
            # without inotify_init1
            self._give_up(f"cannot open an inotify descriptor ({exc})")
            return None
        loop = asyncio.get_running_loop()
        loop.add_reader(ino.fileno(), self._readable)
        self._inotify, self._loop = ino, loop
        return ino

    def _give_up(self, why: str) -> None:
        self._broken = why
        log.warning("%s: IMAP IDLE sessions look for new mail every %g s instead of "
                    "being woken by the kernel", why, POLL_INTERVAL)

    def _add_watches(self, watch: _FolderWatch) -> None:
        ino = self._open()
        if ino is None:
            return
        mask = _mask()
        for sub in WATCHED:
            try:
                wd = ino.add_watch(os.path.join(watch.key, sub), mask)
            except OSError as exc:
                if exc.errno == errno.ENOSPC and not self._limit_logged:
                    self._limit_logged = True
                    log.warning("inotify watch limit reached (fs.inotify.max_user_watches): "
                                "IMAP IDLE on %s and other folders beyond the limit looks "
                                "for new mail every %g s", watch.key, POLL_INTERVAL)
                elif exc.errno != errno.ENOSPC:
                    log.info("cannot watch %s (%s): IMAP IDLE there looks for new mail "
                             "every %g s", os.path.join(watch.key, sub), exc, POLL_INTERVAL)
                self._drop_watches(watch)
                return
            watch.wds.append(wd)
            self._owners.setdefault(wd, set()).add(watch)
        watch.live = True

    def _drop_watches(self, watch: _FolderWatch) -> None:
        for wd in watch.wds:
            owners = self._owners.get(wd)
            if owners is None:
                continue
            owners.discard(watch)
            if not owners:
                del self._owners[wd]
                if self._inotify is not None:
                    try:
                        self._inotify.rm_watch(wd)
                    except OSError:
                        pass  # EINVAL: the kernel dropped it already (directory deleted)
        watch.wds.clear()
        watch.live = False

    def _release(self, watch: _FolderWatch, sub: Subscription) -> None:
        watch.subs.discard(sub)
        if watch.subs:
            return
        if self._folders.get(watch.key) is watch:
            del self._folders[watch.key]
        self._drop_watches(watch)

    def _readable(self) -> None:
        ino = self._inotify
        if ino is None:
            return
        try:
            events = ino.read(timeout=0)
        except OSError as exc:
            log.warning("reading inotify events failed: %s", exc)
            return
        assert in_flags is not None
        self.events += len(events)
        touched: set[_FolderWatch] = set()
        for ev in events:
            if ev.mask & in_flags.Q_OVERFLOW:  # events were lost: wake everyone
                touched.update(self._folders.values())
                continue
            owners = self._owners.get(ev.wd)
            if not owners:
                continue
            if ev.mask & in_flags.IGNORED:
                # the kernel removed the watch: the directory was deleted or its
                # file system unmounted; those sessions poll from now on
                del self._owners[ev.wd]
                for watch in owners:
                    if ev.wd in watch.wds:
                        watch.wds.remove(ev.wd)
                    watch.live = False
            elif ev.name.startswith("."):
                continue  # not a message (Maildir readers skip dot files)
            touched.update(owners)
        for watch in touched:
            for sub in list(watch.subs):
                self.wakeups += 1
                sub.wake()


class IdleWait:
    """What one IDLE command waits on: the client's DONE, or a change in its folder.

    The folder is watched from the moment this is made until ``done`` is set
    (the client ended the IDLE or went away).
    """

    def __init__(self, root: str, done: Event) -> None:
        self.done = done
        self.changed = Event.for_asyncio()
        self._either = done.or_event(self.changed)
        notifier = current.get()
        self._sub = notifier.subscribe(root, self.changed.set) if notifier is not None else None
        self._closer: asyncio.Task[None] | None = None
        if self._sub is not None:
            self._closer = asyncio.create_task(self._close_when_done())

    @property
    def live(self) -> bool:
        return self._sub is not None and self._sub.live

    async def wait(self) -> bool:
        """Sleep until a change, DONE or the next look is due; True if a change was reported."""
        if not self.changed.is_set() and not self.done.is_set():
            await self._either.wait(timeout=SAFETY_NET_INTERVAL if self.live else POLL_INTERVAL)
        changed = self.changed.is_set()
        self.changed.clear()
        self._either.clear()
        return changed

    async def _close_when_done(self) -> None:
        try:
            await self.done.wait()
        finally:
            if self._sub is not None:
                self._sub.close()
