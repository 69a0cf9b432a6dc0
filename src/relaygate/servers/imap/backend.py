"""The IMAP folders: pymap's maildir backend over relaygate's Maildirs, raw bytes in and out.

INBOX is the account's Maildir root (the one POP3 reads and SMTP delivers to);
other folders are Maildir++ subfolders (``.Sent``, ``.Lists.Work`` for
``Lists/Work``). FETCH serves the file's own bytes (bare LF made CRLF), APPEND
and COPY write the bytes durably (:func:`relaygate.mail.maildir.deliver`), and a
folder whose directories and uidlist have not changed is not rescanned. See the
package's service module for the whole picture.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterable, Iterable, Sequence
from datetime import datetime
from mailbox import MaildirMessage
from pathlib import Path
from typing import Any, Final, cast

from pymap.backend.maildir import Config as MaildirConfig
from pymap.backend.maildir import FilterSet
from pymap.backend.maildir import Session as MaildirSession
from pymap.backend.maildir.layout import DefaultLayout
from pymap.backend.maildir.mailbox import (
    LoadedMessage,
    MailboxData,
    MailboxSet,
    Maildir,
    Message,
)
from pymap.backend.maildir.uidlist import Record, UidList
from pymap.concurrent import Event
from pymap.exceptions import ResponseError
from pymap.flags import FlagOp
from pymap.interfaces.message import CachedMessage
from pymap.mime import MessageContent
from pymap.parsing.message import AppendMessage
from pymap.parsing.response import (
    Response,
    ResponseCode,
    ResponseNo,
)
from pymap.parsing.specials import FetchRequirement, ObjectId, SequenceSet
from pymap.parsing.specials.flag import Flag, Seen
from pymap.selected import SelectedMailbox

from relaygate.interfaces import Account
from relaygate.mail.maildir import deliver
from relaygate.mail.uidlist import FileMeta, Index, forget, read_messages, refresh
from relaygate.servers.imap.notify import IdleWait

log = logging.getLogger("relaygate.imap")

#: longest Maildir++ directory name in octets: "A/B/C" is stored as ".A.B.C",
#: one directory entry, and file systems stop at 255
MAX_FOLDER_NAME = 255
#: a FETCH or SEARCH reads message files in batches of about this many bytes per thread hop
READ_AHEAD_BYTES = 1 << 20
#: a folder whose stamps (directory and uidlist mtimes) are older than this is
#: "unchanged" when they are equal; fresher ones may hide a second change made
#: within the same file-system clock tick, so they always mean "rescan"
SIGNATURE_SETTLE_NS = 2_000_000_000
#: IMAP hierarchy delimiter (pymap's maildir backend): "Lists/Work" is ".Lists.Work"
DELIMITER = "/"
#: pymap's per-folder keyword table (replaced, like the uidlist, when it changes)
_KEYWORDS_FILE = "dovecot-keywords"


def to_crlf(data: bytes) -> bytes:
    """Turn bare LF line ends into CRLF (RFC 5322 2.3; IMAP sizes count CRLF).

    Every CRLF is made LF and every LF CRLF: the same as replacing each LF not
    preceded by CR, several times faster than a regular expression, and a
    message already in CRLF is returned as it is.
    """
    if data.count(b"\n") == data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class RawMessage(MaildirMessage):
    """What FETCH reads: the message file's own bytes (CRLF), not a re-serialisation."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self._raw = raw

    def __bytes__(self) -> bytes:
        return self._raw


class RawMaildir(Maildir):
    """pymap's Maildir whose messages are read as raw bytes."""

    @property
    def root(self) -> Path:
        return Path(self._path)

    def file_of(self, key: str) -> Path:
        return self.root / self._lookup(key)

    def get_message(self, key: str) -> MaildirMessage:
        # Called by pymap's Message.load_content for FETCH/SEARCH; it parses
        # bytes(result). KeyError/FileNotFoundError mean "expunged meanwhile".
        return RawMessage(to_crlf(self.file_of(key).read_bytes()))


def store_message(root: Path, data: bytes, *, recent: bool, flags: str,
           when: float | None) -> str:
    """Write one message durably into ``root`` (a Maildir); return its file name.

    ``recent`` messages go to ``new/`` (RFC 3501 \\Recent), others to ``cur/``
    with their flags. ``when`` sets the modification time, which pymap reports
    as INTERNALDATE.
    """
    path = deliver(root, data, subdir="new" if recent else "cur", flags=flags)
    if recent and flags:
        flagged = path.with_name(f"{path.name}:2,{flags}")
        os.rename(path, flagged)
        path = flagged
    if when is not None:
        os.utime(path, (when, when))
    return path.name


def _rename(root: str, meta: FileMeta, name: str) -> FileMeta | None:
    """Rename a message file to ``name`` in its directory (new flags); None if gone."""
    try:
        os.rename(os.path.join(root, meta.subdir, meta.name),
                  os.path.join(root, meta.subdir, name))
    except FileNotFoundError:
        return None
    return FileMeta(meta.subdir, name, meta.mtime, meta.size)


def _rename_all(root: str, renames: list[tuple[FileMeta, str]]) -> list[FileMeta | None]:
    """:func:`_rename` for several files (blocking: one thread hop)."""
    return [_rename(root, meta, name) for meta, name in renames]


def _expunge(path: str, root: str, files: list[tuple[str, FileMeta]]) -> None:
    """Unlink messages and drop their uidlist entries (blocking: one thread hop)."""
    for _, meta in files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, meta.subdir, meta.name))
    forget(path, [key for key, _ in files])


def _claim_new(root: str) -> set[str]:
    """Move every file of ``new/`` to ``cur/``; their keys (blocking)."""
    claimed: set[str] = set()
    new = os.path.join(root, "new")
    for name in os.listdir(new):
        if name.startswith("."):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.rename(os.path.join(new, name), os.path.join(root, "cur", name))
            claimed.add(name.split(":", 1)[0])
    return claimed


class IndexedMessage(Message):
    """A message listed by a folder's index; its content comes through the folder's
    read-ahead (files read and parsed in a thread, several per hop)."""

    __slots__ = ["_folder"]

    def __init__(self, *args: Any, folder: Folder | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._folder = folder

    @property
    def folder(self) -> Folder | None:
        return self._folder

    @property
    def key(self) -> str | None:
        return self._key

    async def load_content(self, requirement: FetchRequirement) -> LoadedMessage:
        key = self._key
        if self._folder is None or key is None \
                or requirement.has_none(FetchRequirement.CONTENT):
            return await super().load_content(requirement)
        content = await self._folder.content_of(key)
        return LoadedMessage(self, requirement, content)


def _load_batch(root: str, batch: list[tuple[str, FileMeta]]) -> dict[str, MessageContent | None]:
    """Read and parse a batch of messages (blocking: runs in a thread)."""
    out: dict[str, MessageContent | None] = {}
    for key, data in read_messages(root, batch).items():
        out[key] = None if data is None else MessageContent.parse(to_crlf(data))
    return out


class Folder(MailboxData):
    """One folder over an in-memory :class:`~relaygate.mail.uidlist.Index`.

    pymap re-read the uidlist for every message and stat()ed every file on the
    event loop. Here each command refreshes the index once, in a thread
    (:meth:`reset`); listing, FETCH metadata and snapshots are served from
    memory; message contents are read and parsed in a thread, up to
    :data:`READ_AHEAD_BYTES` per hop, in the order the command will ask for
    them. IDLE sleeps until the folder changes (:mod:`.notify`) and looks at
    the directories' stamps (:meth:`_signature`) before a rescan.
    """

    _idle_sig: tuple[int, ...] | None = None
    _idle: IdleWait | None = None

    def __init__(self, mailbox_id: ObjectId, maildir: Maildir, path: str) -> None:
        super().__init__(mailbox_id, maildir, path)
        self._index = Index()
        self._plan: dict[str, int] = {}
        self._plan_order: list[str] = []
        self._buffer: dict[str, MessageContent | None] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._messages: dict[str, tuple[Record, FileMeta, IndexedMessage]] = {}
        #: the Maildir's directory
        self.root: Final = str(maildir._path)

    @property
    def index(self) -> Index:
        return self._index

    def _signature(self) -> tuple[int, ...] | None:
        """The folder's change stamp, or None when it is too fresh to trust."""
        # Not the folder directory itself: pymap's lock files come and go in it.
        base = self.folder_path
        now = time.time_ns()
        sig: list[int] = []
        for name in ("new", "cur", UidList.FILE_NAME, _KEYWORDS_FILE):
            try:
                st = os.stat(os.path.join(base, name))
            except FileNotFoundError:
                if name == _KEYWORDS_FILE:
                    sig += (0, 0)
                    continue
                return None
            except OSError:
                return None
            if now - st.st_mtime_ns < SIGNATURE_SETTLE_NS:
                return None  # two changes within one clock tick can share an mtime
            sig += (st.st_ino, st.st_mtime_ns)
        return tuple(sig)

    async def _refresh(self) -> Index:
        self._index = await asyncio.to_thread(refresh, self._index, self.folder_path,
                                              str(self.maildir.root))
        self._uid_validity = self._index.uid_validity
        self._next_uid = self._index.next_uid
        return self._index

    async def reset(self) -> MailboxData:
        idle = self._idle
        if idle is not None and not idle.done.is_set():
            # pymap asks for the folder again before each wait of an IDLE;
            # update_selected rescans when the folder changed, not here
            return self
        await self._refresh()
        return self

    def _message(self, rec: Record, meta: FileMeta) -> IndexedMessage:
        # Every command lists the whole folder (pymap compares snapshots): the
        # message object of a record and file that did not change is reused
        # (pymap only modifies expunged copies of messages).
        key = rec.key
        known = self._messages.get(key)
        if known is not None and known[1] is meta and known[0] is rec:
            return known[2]
        flags = self.maildir_flags.from_maildir(meta.flags)
        msg = IndexedMessage(rec.uid, datetime.fromtimestamp(meta.mtime), flags,
                             email_id=ObjectId.maybe(rec.fields.get("E")),
                             thread_id=ObjectId.maybe(rec.fields.get("T")),
                             recent=meta.subdir == "new", maildir=self.maildir,
                             key=key, folder=self)
        if len(self._messages) > 2 * len(self._index.files) + 64:
            self._messages.clear()  # forget expunged messages now and then
        self._messages[key] = (rec, meta, msg)
        return msg

    async def messages(self) -> AsyncIterable[Message]:
        for rec, meta in list(self._index.live()):
            yield self._message(rec, meta)

    async def _get_maildir_msg(self, uid: int) -> tuple[Record, MaildirMessage]:
        found = self._index.lookup(uid)
        if found is None:
            raise KeyError(uid)
        rec, meta = found
        msg = MaildirMessage()
        msg.set_subdir("new" if meta.subdir == "new" else "cur")
        if meta.info:
            msg.set_info(meta.info)
        msg.set_date(meta.mtime)
        return rec, msg

    async def get(self, uid: int, cached_msg: CachedMessage) -> Message:
        found = self._index.lookup(uid)
        if found is None:
            return Message.copy_expunged(cached_msg)
        return self._message(*found)

    def get_now(self, uid: int, cached_msg: CachedMessage) -> Message:
        """:meth:`get` without a trip through the loop (everything is in memory)."""
        found = self._index.lookup(uid)
        if found is None:
            return Message.copy_expunged(cached_msg)
        return self._message(*found)

    async def update(self, uid: int, cached_msg: CachedMessage,
                     flag_set: frozenset[Flag], mode: FlagOp) -> Message:
        return (await self.update_many([(uid, cached_msg)], flag_set, mode))[0]

    async def update_many(self, messages: Sequence[tuple[int, CachedMessage]],
                          flag_set: frozenset[Flag], mode: FlagOp) -> list[Message]:
        """:meth:`update` for several messages, their files renamed in one thread hop."""
        out: list[Message | tuple[Record, FileMeta]] = []
        renames: list[tuple[int, FileMeta, str]] = []
        for uid, cached_msg in messages:
            found = self._index.lookup(uid)
            if found is None:
                msg = Message.copy_expunged(cached_msg)
                msg.permanent_flags = mode.apply(msg.permanent_flags, flag_set)
                out.append(msg)
                continue
            rec, meta = found
            old = self.maildir_flags.from_maildir(meta.flags)
            new = mode.apply(old, flag_set)
            if new != old:
                name = f"{rec.key}{self.maildir.colon}2,{self.maildir_flags.to_maildir(new)}"
                renames.append((len(out), meta, name))
            out.append(found)
        if renames:
            root = str(self.maildir.root)
            renamed = await asyncio.to_thread(_rename_all, root,
                                              [(meta, name) for _, meta, name in renames])
            files = cast(dict[str, FileMeta], self._index.files)
            for (i, _, _), meta_now in zip(renames, renamed, strict=True):
                if meta_now is not None:
                    rec = cast(tuple[Record, FileMeta], out[i])[0]
                    files[rec.key] = meta_now
                    out[i] = (rec, meta_now)
        return [item if isinstance(item, Message) else self._message(*item) for item in out]

    async def delete(self, uids: Iterable[int]) -> None:
        index = self._index
        gone = [found for found in map(index.lookup, uids) if found is not None]
        if gone:
            await asyncio.to_thread(_expunge, self.folder_path, str(self.maildir.root),
                                    [(rec.key, meta) for rec, meta in gone])

    async def claim_recent(self, selected: SelectedMailbox) -> None:
        claimed = await asyncio.to_thread(_claim_new, str(self.maildir.root))
        if claimed:
            index = await self._refresh()
            for rec in index.records.values():
                if rec.key in claimed:
                    selected.session_flags.add_recent(rec.uid)

    async def find(self, seq_set: SequenceSet, selected: SelectedMailbox
                   ) -> AsyncIterable[tuple[int, Message]]:
        found = [(seq, await self.get(cached.uid, cached))
                 for seq, cached in selected.messages.get_all(seq_set)]
        self.plan([msg for _, msg in found])
        for item in found:
            yield item

    def plan(self, messages: Sequence[Message]) -> None:
        """The order in which the current command will load these messages' contents."""
        self._buffer.clear()
        self._plan_order = [m._key for m in messages if isinstance(m, IndexedMessage)
                            and m._key is not None]
        self._plan = {key: i for i, key in enumerate(self._plan_order)}

    async def content_of(self, key: str) -> MessageContent | None:
        """The parsed content of a message, None if it is gone.

        Read in batches of about :data:`READ_AHEAD_BYTES` in a thread; while the
        loop sends one batch, the next one (in the planned order) is read.
        """
        if key not in self._buffer:
            task = self._inflight.get(key)
            if task is None:
                task = self._start_batch(key)
            if task is not None:
                await task
        content = self._buffer.pop(key, None)
        pos = self._plan.get(key)
        if pos is not None and not self._inflight:
            for later in self._plan_order[pos + 1:]:
                if later not in self._buffer:
                    self._start_batch(later)
                    break
        return content

    def _start_batch(self, key: str) -> asyncio.Task[None] | None:
        files = self._index.files
        meta = files.get(key)
        if meta is None:
            return None
        batch = [(key, meta)]
        pos = self._plan.get(key)
        if pos is not None:
            total = meta.size
            for later in self._plan_order[pos + 1:]:
                if total >= READ_AHEAD_BYTES:
                    break
                nxt = files.get(later)
                if nxt is None or later in self._buffer or later in self._inflight:
                    continue
                batch.append((later, nxt))
                total += nxt.size
        task = asyncio.ensure_future(self._load(batch))
        for k, _ in batch:
            self._inflight[k] = task
        return task

    async def _load(self, batch: list[tuple[str, FileMeta]]) -> None:
        try:
            found = await asyncio.to_thread(_load_batch, str(self.maildir.root), batch)
        except OSError as exc:
            log.warning("cannot read messages in %s: %s", self.maildir.root, exc)
            found = {}
        finally:
            for k, _ in batch:
                self._inflight.pop(k, None)
        for k, _ in batch:
            self._buffer[k] = found.get(k)

    async def update_selected(self, selected: SelectedMailbox, *,
                              wait_on: Event | None = None) -> SelectedMailbox:
        if wait_on is None:
            self._idle_sig = None
            return await super().update_selected(selected)
        # IDLE (pymap calls this in a loop until ``wait_on``, the client's DONE):
        # the first call watches the folder, then scans at once (it also reports
        # what earlier commands were not allowed to, e.g. expunges during FETCH);
        # later calls sleep until the kernel reports a change (see notify) or
        # the next look is due, and return only when there is something to scan.
        idle = self._idle
        if idle is None or idle.done is not wait_on:
            self._idle = IdleWait(str(self.maildir.root), wait_on)
            sig = self._signature()
        else:
            while True:
                changed = await idle.wait()
                if wait_on.is_set():
                    return selected
                sig = self._signature()
                if changed or sig is None or sig != self._idle_sig:
                    break
        await self._refresh()
        result = await super().update_selected(selected)
        self._idle_sig = sig
        return result

    @property
    def maildir(self) -> RawMaildir:
        return cast(RawMaildir, self._maildir)

    @property
    def folder_path(self) -> str:
        return self._path

    async def _record(self, path_name: str, fields: dict[str, str]) -> tuple[int, str]:
        key = path_name.split(self.maildir.colon, 1)[0]
        info = path_name[len(key) + 1:] if len(path_name) > len(key) else ""
        async with UidList.with_write(self.folder_path) as uidl:
            for existing in uidl.records:
                if existing.key == key:
                    # another session's rescan saw the new file first and
                    # numbered it: one message must not get two UIDs
                    return existing.uid, key
            rec = Record(uidl.next_uid, fields, f"{key}:{info}")
            uidl.next_uid += 1
            uidl.set(rec)
        return rec.uid, key

    async def append(self, append_msg: AppendMessage, *, recent: bool = False) -> Message:
        email_id = ObjectId.random_email_id()
        thread_id = ObjectId.random_thread_id()
        flags = self.maildir_flags.to_maildir(append_msg.flag_set)
        when = append_msg.when.timestamp() if append_msg.when is not None else None
        async with self.messages_lock.write_lock():
            name = await asyncio.to_thread(store_message, self.maildir.root, append_msg.literal,
                                           recent=recent, flags=flags, when=when)
        uid, key = await self._record(name, {"E": str(email_id), "T": str(thread_id)})
        metadata = self.maildir.get_message_metadata(key)
        return Message.from_maildir(uid, metadata, self.maildir, key, email_id, thread_id,
                                    self.maildir_flags)

    async def copy(self, uid: int, destination: MailboxData, *,
                   recent: bool = False) -> int | None:
        dest = cast(Folder, destination)
        try:
            record, metadata = await self._get_maildir_msg(uid)
        except KeyError:
            return None
        meta = self._index.files[record.key]
        source = self.maildir.root / meta.subdir / meta.name

        def copy_file() -> str | None:
            try:
                data = source.read_bytes()
                mtime = source.stat().st_mtime
            except FileNotFoundError:
                return None
            return store_message(dest.maildir.root, data, recent=recent,
                          flags=metadata.get_flags(), when=mtime)

        async with dest.messages_lock.write_lock():
            name = await asyncio.to_thread(copy_file)
        if name is None:
            return None
        new_uid, _ = await dest._record(name, dict(record.fields))
        return new_uid


class BadName(ResponseError):
    """A mailbox name that cannot be a Maildir++ folder."""

    def get_response(self, tag: bytes) -> Response:
        return ResponseNo(tag, b"Invalid mailbox name.", ResponseCode.of(b"CANNOT"))


def valid_component(part: str) -> bool:
    """One level of a folder name, as it will appear inside ``.A.B`` on disk."""
    if not part or "." in part or "/" in part:
        return False
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in part)


class FolderLayout(DefaultLayout[RawMaildir]):
    """pymap's Maildir++ layout, refusing names that are not plain folders.

    pymap joined the parts of any name with dots: ``CREATE "/"`` made the
    directory ``..``, i.e. the PARENT of the account's Maildir (the domain
    directory holding the other users' mail), and ``DELETE "/"`` then removed
    everything under it. Each level must be non-empty and dot-free (the dot is
    the on-disk separator) and without control characters, and the directory
    name must fit in :data:`MAX_FOLDER_NAME` octets.
    """

    @classmethod
    def _split(cls, name: str, delimiter: str) -> Sequence[str]:
        parts = super()._split(name, delimiter)
        if not all(valid_component(p) for p in parts):
            raise BadName()
        on_disk = "." + ".".join(parts)
        if len(on_disk.encode("utf-8", "surrogatepass")) > MAX_FOLDER_NAME:
            raise BadName()
        return parts

    def add_folder(self, name: str, delimiter: str) -> None:
        # RFC 3501 6.3.3: CREATE makes the superior levels a name needs;
        # pymap raised FileNotFoundError (a crash) for "a/b/c" without "a/b".
        parts = self._split(name, delimiter)
        for i in range(1, len(parts)):
            if not os.path.isdir(self._get_path(parts[:i])):
                super().add_folder(self._join(parts[:i], delimiter), delimiter)
        super().add_folder(name, delimiter)

    def _list_folders(self, parts: Sequence[str]) -> Iterable[Sequence[str]]:
        # directories that are not valid folders (made by hand or another
        # program) are left out rather than listed as odd names like ""
        for found in super()._list_folders(parts):
            if all(valid_component(p) for p in found):
                yield found


class AccountMailboxes(MailboxSet):
    """The folders of one account; builds :class:`Folder` folders."""

    async def add_mailbox(self, name: str) -> ObjectId:
        try:
            return await super().add_mailbox(name)
        except KeyError:
            # pymap's session turns ValueError (not KeyError) into ALREADYEXISTS
            raise ValueError(name) from None

    async def rename_mailbox(self, before: str, after: str) -> None:
        layout = self._layout
        if before != "INBOX" and not os.path.isdir(layout.get_path(before, self.delimiter)):
            raise KeyError(before)  # pymap would answer OK and do nothing
        if os.path.exists(layout.get_path(after, self.delimiter)):
            raise ValueError(after)  # ALREADYEXISTS, not a crash on a non-empty target
        await super().rename_mailbox(before, after)

    async def get_mailbox(self, name: str) -> MailboxData:
        layout = self._layout
        if name == "INBOX":
            maildir = self._inbox_maildir
        else:
            try:
                maildir = layout.get_folder(name, self.delimiter)
            except FileNotFoundError as exc:
                raise KeyError(name) from exc
        cache: dict[str, MailboxData] = self._cache
        mbx = cache.get(name)
        if mbx is None:
            path = layout.get_path(name, self.delimiter)
            async with UidList.with_init(path) as uidl:
                mailbox_id = ObjectId(uidl.global_uid)
            mbx = cache[name] = Folder(mailbox_id, maildir, path)
        return await mbx.reset()


class AccountSession(MaildirSession):
    """pymap's maildir session, knowing the relaygate account it belongs to."""

    def __init__(self, account: Account, config: MaildirConfig, mailbox_set: MailboxSet,
                 filter_set: FilterSet) -> None:
        super().__init__(account.login, config, mailbox_set, filter_set)
        self.account: Final = account

    async def fetch_messages(self, selected: SelectedMailbox, sequence_set: SequenceSet,
                             set_seen: bool) -> tuple[Iterable[tuple[int, Message]],
                                                      SelectedMailbox]:
        # pymap's, with one thread hop for all \Seen renames rather than one
        # per message, and the order noted for the read-ahead
        mbx = await self._get_selected(selected)
        if not isinstance(mbx, Folder):
            return await super().fetch_messages(selected, sequence_set, set_seen)
        wanted = [(seq, cached) for seq, cached in selected.messages.get_all(sequence_set)]
        if set_seen:
            msgs = await mbx.update_many([(cached.uid, cached) for _, cached in wanted],
                                         frozenset({Seen}), FlagOp.ADD)
        else:
            msgs = [mbx.get_now(cached.uid, cached) for _, cached in wanted]
        found = [(seq, msg) for (seq, _), msg in zip(wanted, msgs, strict=True)]
        mbx.plan(msgs)  # a general-path FETCH loads contents in this order
        return found, await mbx.update_selected(selected)
