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
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from mailbox import MaildirMessage
from pathlib import Path
from typing import Final, cast

from pymap.backend.maildir import Config as MaildirConfig
from pymap.backend.maildir import FilterSet
from pymap.backend.maildir import Session as MaildirSession
from pymap.backend.maildir.layout import DefaultLayout
from pymap.backend.maildir.mailbox import MailboxData, MailboxSet, Maildir, Message
from pymap.backend.maildir.uidlist import Record, UidList
from pymap.concurrent import Event
from pymap.exceptions import ResponseError
from pymap.parsing.message import AppendMessage
from pymap.parsing.response import (
    Response,
    ResponseCode,
    ResponseNo,
)
from pymap.parsing.specials import ObjectId
from pymap.selected import SelectedMailbox

from relaygate.interfaces import Account
from relaygate.mail.mailbox import delivery_order
from relaygate.mail.maildir import deliver

log = logging.getLogger("relaygate.imap")

#: longest Maildir++ directory name in octets: "A/B/C" is stored as ".A.B.C",
#: one directory entry, and file systems stop at 255
MAX_FOLDER_NAME = 255
#: seconds between an IDLE session's checks for new mail (pymap's interval)
IDLE_POLL_INTERVAL = 1.0
#: a folder whose stamps (directory and uidlist mtimes) are older than this is
#: "unchanged" when they are equal; fresher ones may hide a second change made
#: within the same file-system clock tick, so they always mean "rescan"
SIGNATURE_SETTLE_NS = 2_000_000_000
#: IMAP hierarchy delimiter (pymap's maildir backend): "Lists/Work" is ".Lists.Work"
DELIMITER = "/"
#: pymap's per-folder keyword table (replaced, like the uidlist, when it changes)
_KEYWORDS_FILE = "dovecot-keywords"
_BARE_LF = re.compile(rb"(?<!\r)\n")


def to_crlf(data: bytes) -> bytes:
    """Turn bare LF line ends into CRLF (RFC 5322 2.3; IMAP sizes count CRLF)."""
    return _BARE_LF.sub(b"\r\n", data)



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


class Folder(MailboxData):
    """One folder; APPEND and COPY write the bytes themselves; IDLE polls cheaply.

    pymap re-reads a folder (lock file, uidlist, listdir and a stat of every
    message) before every command and once a second per IDLE session. When
    the folder's directories and uidlist have not changed since the last scan,
    nothing can have changed: :meth:`reset` and IDLE's polls skip the scan.
    """

    _reset_sig: tuple[int, ...] | None = None
    _idle_sig: tuple[int, ...] | None = None

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

    async def reset(self) -> MailboxData:
        sig = self._signature()
        if sig is not None and sig == self._reset_sig:
            return self
        result = await super().reset()
        self._reset_sig = sig  # taken before the scan: a change during it is seen next time
        return result

    async def update_selected(self, selected: SelectedMailbox, *,
                              wait_on: Event | None = None) -> SelectedMailbox:
        if wait_on is None:
            self._idle_sig = None
            return await super().update_selected(selected)
        # IDLE: the first poll always scans (it also reports what earlier
        # commands were not allowed to, e.g. expunges during FETCH); later
        # polls scan only when the folder changed.
        await wait_on.wait(timeout=IDLE_POLL_INTERVAL)
        sig = self._signature()
        if sig is not None and sig == self._idle_sig:
            return selected
        result = await super().update_selected(selected)
        self._idle_sig = sig
        return result

    async def _get_keys(self) -> dict[str, str]:
        # pymap assigns UIDs to new files in this dict's order, which is
        # listdir order (arbitrary); RFC 3501 2.3.1.1 wants arrival order.
        keys = await super()._get_keys()
        # Same order as POP3 (seconds, microseconds, delivery counter).
        return dict(sorted(keys.items(), key=lambda kv: delivery_order(kv[0])))

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
            source = self.maildir.file_of(record.key)
        except (KeyError, FileNotFoundError):
            return None

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
