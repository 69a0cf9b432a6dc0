"""The IMAP server: pymap 0.36.7 embedded behind a thin relaygate adapter.

Theory of operation
-------------------
IMAP4rev1 (RFC 3501) is large, so relaygate does not implement it: it embeds
pymap (pinned exactly; this is the ONLY module that imports pymap, pysasl or
proxyprotocol) and wraps it where relaygate needs something pymap does not do,
or does wrong. pymap parses commands, keeps the selected-mailbox state, and
implements SELECT/EXAMINE, LIST/LSUB, STATUS, FETCH (ENVELOPE, BODYSTRUCTURE,
BODY[...]/BODY.PEEK, RFC822.SIZE, INTERNALDATE), STORE, SEARCH, COPY/MOVE,
the UID variants, EXPUNGE, CLOSE, APPEND (RFC 3502 MULTIAPPEND), CREATE,
DELETE, RENAME, IDLE (RFC 2177), UIDPLUS (RFC 4315) and LITERAL+ (RFC 7888)
on its maildir backend. The adapter supplies:

* **Login** (RFC 3501 6.2.2 LOGIN, 6.2.3 AUTHENTICATE; RFC 4616 PLAIN): the
  credentials go to relaygate's :class:`~relaygate.mail.directory.Directory`
  (argon2id and throttling live there). A success opens the relay window for
  the client address (POP/IMAP-before-SMTP) and, while the connection lives, a
  background task refreshes it every ``expiry / 3`` seconds, so a client that
  keeps IMAP open (IDLE) can always send. A throttled login never opens one.
* **The account's own Maildir**: INBOX is the Maildir root (``new``/``cur``),
  the one POP3 reads and SMTP delivers to; other folders are Maildir++
  subfolders (``.Sent``, ``.Lists.Work`` for ``Lists/Work``; the IMAP
  hierarchy delimiter is ``/``). pymap keeps UIDs in ``dovecot-uidlist``.
* **Defect fixes in pymap's maildir backend**: FETCH re-serialised every
  message through :mod:`email` (bare LF, wrong RFC822.SIZE): the adapter
  serves the file's bytes, bare LF turned into CRLF (RFC 3501 2.3.4 sizes and
  5.1 literals are in CRLF octets); APPEND stored an ``email``-re-serialised,
  unsynced copy: the adapter stores the literal as sent, fsynced
  (:func:`relaygate.mail.maildir.deliver`); COPY wrote an EMPTY message (it
  copied a metadata-only object): the adapter copies the bytes; its small
  metadata files (uidlist, keywords, subscriptions) were written through a
  temporary file in ``/tmp`` and renamed into the Maildir, which fails across
  file systems and was never fsynced: the adapter writes them next to the
  target and fsyncs.
* **Limits pymap lacks** (RFC 3501 section 5.4, RFC 7888 section 4, RFC 7889):
  a line longer than :data:`MAX_LINE` ends the session; a literal larger than
  ``imap.max_literal_unauth`` before login or ``imap.max_literal`` after is
  refused before it is read (a synchronizing literal gets ``NO [TOOBIG]``, a
  LITERAL+ one ``BYE [TOOBIG]`` since its bytes are already on the way), and so
  is a command whose literals add up past that; pymap read LITERAL+ literals of
  any size before login. Idle timeout ``imap.idle_timeout`` (30 minutes, RFC
  3501 5.4) once logged in, :data:`PREAUTH_TIMEOUT` before; a client that does
  not read its replies is dropped after the same time; at most
  :data:`MAX_PREAUTH_COMMANDS` commands and :data:`MAX_AUTH_FAILURES` failed
  logins per connection, :data:`MAX_BAD_COMMANDS` BAD replies per session
  (pymap itself drops after 5 in a row) and :data:`MAX_SESSION_COMMANDS`
  commands per session.
* **Plaintext passwords** (RFC 3501 6.2.3, RFC 2595 3.2): LOGIN and
  AUTHENTICATE are refused and ``LOGINDISABLED`` advertised until STARTTLS,
  unless the listener is loopback, implicit TLS, or ``auth.allow_plaintext``.
  Pipelined commands after STARTTLS end the session (no plaintext injection
  into the TLS session).
* **Errors never reach the client**: anything unexpected is logged and the
  client gets pymap's generic ``BYE [SERVERBUG]`` or a ``NO [UNAVAILABLE]``.

pymap runs with its asyncio "subsystem": commands run on the event loop
beside SMTP and POP3 (its thread subsystem would tie a worker thread to every
IDLE session). Maildir reads are small synchronous file operations on the
loop; message writes (APPEND, COPY) run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import secrets
import ssl
import tempfile
import time
import uuid
from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from mailbox import MaildirMessage
from pathlib import Path
from typing import Any, Final, cast

from proxyprotocol.noop import ProxyProtocolNoop
from proxyprotocol.sock import SocketInfo
from pymap.backend.maildir import Config as MaildirConfig
from pymap.backend.maildir import FilterSet
from pymap.backend.maildir import Session as MaildirSession
from pymap.backend.maildir.io import FileWriteable
from pymap.backend.maildir.layout import DefaultLayout
from pymap.backend.maildir.mailbox import MailboxData, MailboxSet, Maildir, Message
from pymap.backend.maildir.uidlist import Record, UidList
from pymap.concurrent import Event, Subsystem
from pymap.context import connection_exit, current_command
from pymap.exceptions import AuthorizationFailure, InvalidAuth, NotAllowedError, ResponseError
from pymap.imap import IMAPConnection
from pymap.imap.state import ConnectionState
from pymap.interfaces.login import IdentityInterface, LoginInterface
from pymap.mime import MessageBody
from pymap.parsing import Params
from pymap.parsing.command import Command
from pymap.parsing.command.nonauth import AuthenticateCommand, LoginCommand, StartTLSCommand
from pymap.parsing.commands import Commands
from pymap.parsing.message import AppendMessage
from pymap.parsing.response import (
    CommandResponse,
    Response,
    ResponseBad,
    ResponseBye,
    ResponseCode,
    ResponseContinuation,
    ResponseNo,
    ResponseOk,
)
from pymap.parsing.specials import ObjectId
from pymap.parsing.state import ExpectContinuation, ParsingInterrupt, ParsingState
from pymap.selected import SelectedMailbox
from pymap.token import AllTokens
from pymap.user import UserMetadata
from pysasl import SASLAuth
from pysasl.creds.server import ServerCredentials
from pysasl.exception import MechanismUnusable

from relaygate.addresses import is_loopback
from relaygate.control import WindowRefused
from relaygate.errors import ConfigError, StoreError
from relaygate.log import event
from relaygate.mail.directory import Account, LoginResult
from relaygate.mail.mailbox import delivery_order
from relaygate.mail.maildir import deliver, ensure_maildir
from relaygate.servers.accept import (
    Listener,
    Peer,
    ProxyPolicy,
    listen_tcp_or_unix,
    stream_factory,
)
from relaygate.servers.base import Context, Listen, parse_listen

log = logging.getLogger("relaygate.imap")

# -- limits ------------------------------------------------------------------

#: longest command line: RFC 7162 section 4 asks for at least 8192 octets; long
#: UID sets from real clients fit easily in 64 KiB, and the read buffer is capped
MAX_LINE = 64 * 1024
#: seconds a client may stay silent before logging in; it holds a connection
#: without having proved anything (RFC 3501 5.4's 30 minutes is for sessions)
PREAUTH_TIMEOUT = 180.0
#: commands accepted before a successful login; a real client needs about five
MAX_PREAUTH_COMMANDS = 30
#: failed LOGIN/AUTHENTICATE per connection before BYE (throttling is per address too)
MAX_AUTH_FAILURES = 3
#: tagged BAD replies per session before BYE; pymap only counts them in a row
MAX_BAD_COMMANDS = 50
#: tagged BAD replies in a row before BYE (pymap's own rule, kept)
CONSECUTIVE_BAD_LIMIT = 5
#: seconds spent trying to deliver a BYE to a client that is being dropped
BYE_TIMEOUT = 10.0
#: commands per session: bounds one runaway client; a client polling every 10 s
#: reaches it only after 115 days connected
MAX_SESSION_COMMANDS = 1_000_000
#: the window is refreshed this many times per expiry while a session lives, so
#: one lost refresh (store briefly down) still leaves the window open
REFRESH_PER_EXPIRY = 3
#: seconds a TLS handshake may take (implicit TLS and STARTTLS)
TLS_HANDSHAKE_TIMEOUT = 30.0
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
_LITERAL_PLUS = re.compile(rb"\{(\d+)\+\}\r?\n\Z")
_BARE_LF = re.compile(rb"(?<!\r)\n")
#: RFC 3501 9: tag = 1*<ASTRING-CHAR except "+">
_TAG = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c-\x7e]{1,64} ")
#: literal lengths beyond this many digits are refused without int() (Python
#: refuses to convert more than 4300 digits, and no literal needs 13)
_MAX_LENGTH_DIGITS = 12


def to_crlf(data: bytes) -> bytes:
    """Turn bare LF line ends into CRLF (RFC 5322 2.3; IMAP sizes count CRLF)."""
    return _BARE_LF.sub(b"\r\n", data)


# -- pymap's maildir backend, with the defects fixed ----------------------------


def _file_write(self: FileWriteable) -> None:
    """pymap's metadata write (uidlist, keywords, subscriptions), made safe.

    pymap writes a NamedTemporaryFile in ``/tmp`` and renames it into the
    Maildir: EXDEV when ``/tmp`` is another file system, and never fsynced,
    so a crash could roll ``dovecot-uidlist`` back and re-use UIDs. This
    writes the temporary file beside the target, fsyncs it and the directory.
    """
    target = self.get_file(self.path)
    directory = os.path.dirname(target) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pymap-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fp:
            self.write(fp)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    self._touched = False


FileWriteable.file_write = _file_write  # type: ignore[method-assign]

_pymap_find_parts = MessageBody._find_parts.__func__  # type: ignore[attr-defined]


def _find_parts(cls: type[MessageBody], data: bytes, view: memoryview,
                lines: Sequence[tuple[int, int, int]],
                boundary: bytes) -> Sequence[Sequence[tuple[int, int, int]]]:
    """pymap's multipart splitter, with RFC 2046 5.1.1's rule applied.

    "The CRLF preceding the boundary delimiter line is conceptually attached
    to the boundary": pymap kept it in the part, so BODY[n] and the part sizes
    in BODYSTRUCTURE had two octets too many. A line is (start, end of text,
    end including the line break); the last line of a part loses its break.
    """
    parts = _pymap_find_parts(cls, data, view, lines, boundary)
    out: list[Sequence[tuple[int, int, int]]] = []
    for part in parts:
        if part:
            start, end, _ = part[-1]
            part = [*part[:-1], (start, end, end)]
        out.append(part)
    return out


MessageBody._find_parts = classmethod(_find_parts)  # type: ignore[assignment]


class _RawMessage(MaildirMessage):
    """What FETCH reads: the message file's own bytes (CRLF), not a re-serialisation."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self._raw = raw

    def __bytes__(self) -> bytes:
        return self._raw


class _Maildir(Maildir):
    """pymap's Maildir whose messages are read as raw bytes."""

    @property
    def root(self) -> Path:
        return Path(self._path)

    def file_of(self, key: str) -> Path:
        return self.root / self._lookup(key)

    def get_message(self, key: str) -> MaildirMessage:
        # Called by pymap's Message.load_content for FETCH/SEARCH; it parses
        # bytes(result). KeyError/FileNotFoundError mean "expunged meanwhile".
        return _RawMessage(to_crlf(self.file_of(key).read_bytes()))


def _store(root: Path, data: bytes, *, recent: bool, flags: str,
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


class _MailboxData(MailboxData):
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
    def maildir(self) -> _Maildir:
        return cast(_Maildir, self._maildir)

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
            name = await asyncio.to_thread(_store, self.maildir.root, append_msg.literal,
                                           recent=recent, flags=flags, when=when)
        uid, key = await self._record(name, {"E": str(email_id), "T": str(thread_id)})
        metadata = self.maildir.get_message_metadata(key)
        return Message.from_maildir(uid, metadata, self.maildir, key, email_id, thread_id,
                                    self.maildir_flags)

    async def copy(self, uid: int, destination: MailboxData, *,
                   recent: bool = False) -> int | None:
        dest = cast(_MailboxData, destination)
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
            return _store(dest.maildir.root, data, recent=recent,
                          flags=metadata.get_flags(), when=mtime)

        async with dest.messages_lock.write_lock():
            name = await asyncio.to_thread(copy_file)
        if name is None:
            return None
        new_uid, _ = await dest._record(name, dict(record.fields))
        return new_uid


class _BadName(ResponseError):
    """A mailbox name that cannot be a Maildir++ folder."""

    def get_response(self, tag: bytes) -> Response:
        return ResponseNo(tag, b"Invalid mailbox name.", ResponseCode.of(b"CANNOT"))


def _valid_component(part: str) -> bool:
    """One level of a folder name, as it will appear inside ``.A.B`` on disk."""
    if not part or "." in part or "/" in part:
        return False
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in part)


class _Layout(DefaultLayout[_Maildir]):
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
        if not all(_valid_component(p) for p in parts):
            raise _BadName()
        on_disk = "." + ".".join(parts)
        if len(on_disk.encode("utf-8", "surrogatepass")) > MAX_FOLDER_NAME:
            raise _BadName()
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
            if all(_valid_component(p) for p in found):
                yield found


class _MailboxSet(MailboxSet):
    """The folders of one account; builds :class:`_MailboxData` folders."""

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
            mbx = cache[name] = _MailboxData(mailbox_id, maildir, path)
        return await mbx.reset()


class _Session(MaildirSession):
    """pymap's maildir session, knowing the relaygate account it belongs to."""

    def __init__(self, account: Account, config: MaildirConfig, mailbox_set: MailboxSet,
                 filter_set: FilterSet) -> None:
        super().__init__(account.login, config, mailbox_set, filter_set)
        self.account: Final = account


# -- login ---------------------------------------------------------------------


class _Unavailable(ResponseError):
    """A login that cannot be answered now (store or database trouble, lockout)."""

    def __init__(self, text: bytes) -> None:
        super().__init__()
        self._text = text

    def get_response(self, tag: bytes) -> Response:
        return ResponseNo(tag, self._text, ResponseCode.of(b"UNAVAILABLE"))


class _Secret:
    """A pysasl Identity that records the secret it is compared with.

    ``credentials.verify(identity)`` is pysasl's public way to check a secret;
    relaygate checks it itself (argon2id, off the loop), so this identity
    accepts any secret and keeps it for :meth:`Directory.authenticate`.
    """

    def __init__(self) -> None:
        self.secret: str | None = None

    @property
    def authcid(self) -> str:
        return ""

    def compare_authcid(self, authcid: str) -> bool:
        return True

    def compare_secret(self, secret: str) -> bool:
        self.secret = secret
        return True

    def get_clear_secret(self) -> str | None:
        return None


def _valid_text(value: str) -> bool:
    # pymap decodes LOGIN arguments with surrogateescape: invalid UTF-8 survives
    # as lone surrogates, which neither SQLite nor argon2 can encode.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


class _Identity(IdentityInterface):
    """A logged-in relaygate account, as pymap sees it."""

    def __init__(self, account: Account, config: MaildirConfig, typed: str) -> None:
        self.account = account
        self.config = config
        #: the login name as the client typed it (the SASL authzid is compared to it)
        self.typed = typed

    @property
    def name(self) -> str:
        return self.account.login

    @property
    def roles(self) -> frozenset[str]:
        return frozenset()

    async def new_token(self, *, expiration: datetime | None = None) -> str | None:
        return None

    @asynccontextmanager
    async def new_session(self) -> AsyncIterator[_Session]:
        root = self.account.maildir
        await asyncio.to_thread(ensure_maildir, root)
        layout = _Layout(str(root), _Maildir)
        inbox = _Maildir(str(root), create=False)
        yield _Session(self.account, self.config, _MailboxSet(inbox, layout),
                       FilterSet(str(root)))

    # pymap's user-administration API (its admin gRPC service): relaygate
    # manages users with ``relaygate users``, never through IMAP.
    async def get(self) -> UserMetadata:
        raise NotAllowedError("User metadata is managed by relaygate.")

    async def set(self, metadata: UserMetadata) -> int | None:
        raise NotAllowedError("User metadata is managed by relaygate.")

    async def delete(self) -> None:
        raise NotAllowedError("User metadata is managed by relaygate.")


class _Login(LoginInterface):
    """Checks LOGIN/AUTHENTICATE credentials against the relaygate directory.

    One per connection: it knows the client address.
    """

    def __init__(self, service: ImapService, conn: _ConnInfo) -> None:
        self._service = service
        self._conn = conn

    @property
    def tokens(self) -> AllTokens:
        return self._service.tokens

    async def authenticate(self, credentials: ServerCredentials) -> _Identity:
        svc = self._service
        captured = _Secret()
        try:
            usable = credentials.verify(captured)
        except MechanismUnusable:
            usable = False
        login = credentials.authcid
        password = captured.secret
        if not usable or password is None:
            raise InvalidAuth()
        if not _valid_text(login):
            login = login.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            login = login.replace("\x00", "\ufffd")
            password = secrets.token_hex(16)
        elif not _valid_text(password):
            # No stored password can match; still ask the directory, so the
            # failure is counted and costs the usual time.
            password = secrets.token_hex(16)
        result = await svc.check_password(login, password, self._conn)
        if result.throttled:
            raise _Unavailable(b"Too many failed logins; try again later.")
        if result.account is None or not result.ok:
            raise InvalidAuth()
        return _Identity(result.account, svc.config, credentials.authcid)

    async def authorize(self, authenticated: IdentityInterface, authzid: str) -> _Identity:
        if not isinstance(authenticated, _Identity):
            raise AuthorizationFailure()
        wanted = authzid.lower()
        if wanted and wanted not in (authenticated.typed.lower(), authenticated.name.lower()):
            raise AuthorizationFailure()
        return authenticated


# -- the connection ------------------------------------------------------------


@dataclass
class _ConnInfo:
    """Per-connection facts and counters shared by the adapter's pieces."""

    ip: str | None
    peer: str
    listener: Listen
    tls: bool
    plaintext_ok: bool
    authenticated: bool = False
    account: Account | None = None
    commands: int = 0
    bad: int = 0
    auth_failures: int = 0
    bad_in_a_row: int = 0
    #: set when the session must end: the BYE text
    kick: bytes | None = None
    refresher: asyncio.Task[None] | None = field(default=None, repr=False)


class _Disconnect(EOFError):
    """End the session quietly (the BYE, if any, has been sent). pymap breaks on EOFError."""


class _Refused(Command):
    """A command the adapter answers itself, before pymap sees it."""

    command = b"[REFUSED]"

    def __init__(self, tag: bytes, response: CommandResponse) -> None:
        super().__init__(tag)
        self.response = response

    @classmethod
    def parse(cls, buf: memoryview, params: Params) -> tuple[Command, memoryview]:
        # Never registered, so pymap never parses one; defined because Command requires it.
        return cls(params.tag, ResponseBad(params.tag, b"Invalid command.")), buf[0:0]


class _State(ConnectionState):
    """pymap's per-connection state machine, with relaygate's login rules."""

    def __init__(self, login: _Login, config: _Config, conn: _ConnInfo,
                 service: ImapService) -> None:
        super().__init__(login, config)
        self._conn = conn
        self._service = service
        if conn.tls and b"STARTTLS" in self._capability:
            self._capability.remove(b"STARTTLS")

    async def do_greeting(self) -> CommandResponse:
        # Replaces pymap's, which allows plaintext logins from any loopback
        # *client*; relaygate decides by listener (and TLS), see _ConnInfo.
        self.auth = self.config.tls_auth if self._conn.plaintext_ok else self.config.initial_auth
        return ResponseOk(b"*", self.config.greeting, self.capability)

    async def do_command(self, cmd: Command) -> CommandResponse:
        if isinstance(cmd, _Refused):
            return cmd.response
        return await super().do_command(cmd)

    async def do_authenticate(self, cmd: AuthenticateCommand | LoginCommand,
                              creds: ServerCredentials | None) -> CommandResponse:
        if self._session is not None:
            # pymap runs AUTHENTICATE without its state check: a second login
            # on one connection would open a second session.
            return ResponseBad(cmd.tag, b"Already authenticated.")
        try:
            response = await super().do_authenticate(cmd, creds)
        except (InvalidAuth, _Unavailable):
            self._fail()
            raise
        except ResponseError:
            raise
        except Exception:
            log.exception("IMAP login from %s failed unexpectedly", self._conn.peer)
            raise _Unavailable(b"Login temporarily unavailable.") from None
        if creds is None:
            self._fail()
            return response
        session = self.session
        assert isinstance(session, _Session)
        await self._service.logged_in(session.account, self._conn)
        return response

    def _fail(self) -> None:
        self._conn.auth_failures += 1
        if self._conn.auth_failures >= MAX_AUTH_FAILURES:
            self._conn.kick = b"Too many failed logins."


class _Connection(IMAPConnection):
    """pymap's connection loop with relaygate's limits on everything it reads."""

    def __init__(self, commands: Commands, config: _Config, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, sock_info: SocketInfo, conn: _ConnInfo,
                 service: ImapService) -> None:
        super().__init__(commands, config, reader, writer, sock_info)
        self.conn = conn
        self.service = service
        self.budget = 0
        self.closing = False

    # limits and timeouts

    @property
    def timeout(self) -> float:
        idle = self.service.settings.imap.idle_timeout
        return idle if self.conn.authenticated else min(idle, PREAUTH_TIMEOUT)

    @property
    def literal_cap(self) -> int:
        imap = self.service.settings.imap
        return imap.max_literal if self.conn.authenticated else imap.max_literal_unauth

    async def bye(self, text: bytes, code: bytes | None = None) -> None:
        """Send BYE, then end the session (raises :class:`_Disconnect`)."""
        if not self.closing:
            self.closing = True
            resp = ResponseBye(text, ResponseCode.of(code) if code else None)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(BYE_TIMEOUT):
                    await self._write(resp)
        raise _Disconnect()

    async def _read(self, coro: Awaitable[bytes]) -> bytes:
        # asyncio.timeout, not wait_for: no extra task, no extra trip through
        # the loop (see start_tls for why that matters)
        try:
            async with asyncio.timeout(self.timeout):
                return await coro
        except TimeoutError:
            await self.bye(b"Autologout; idle for too long.")
            raise  # unreachable: bye() raises

    def _charge(self, n: int) -> bool:
        self.budget -= n
        return self.budget >= 0

    async def _line(self) -> bytes:
        try:
            line = await self._read(self.reader.readline())
        except ValueError:  # asyncio: the line is longer than the stream limit
            await self.bye(b"Command line too long.", b"TOOBIG")
            raise
        if not self._charge(len(line)):
            await self.bye(b"Command too large.", b"TOOBIG")
        return line

    async def readline(self) -> memoryview:
        # pymap's version reads LITERAL+ literals of any size (RFC 7888); here
        # each must fit the literal cap and the command's byte budget.
        buf = bytearray(await self._line())
        while True:
            if not buf.endswith(b"\n"):
                raise EOFError()
            m = _LITERAL_PLUS.search(buf)
            if m is None:
                return memoryview(buf)
            digits = m.group(1)
            n = int(digits) if len(digits) <= _MAX_LENGTH_DIGITS else -1
            if n < 0 or n > self.literal_cap or not self._charge(n):
                await self.bye(b"Literal too large.", b"TOOBIG")
            buf += await self._read(self.reader.readexactly(n))
            buf += await self._line()

    async def read_continuation(self, literal_length: int) -> memoryview:
        extra = b""
        if literal_length:
            extra = await self._read(self.reader.readexactly(literal_length))
        line = await self.readline()
        return memoryview(extra + bytes(line))

    async def read_command(self, state: ConnectionState) -> Command:
        conn = self.conn
        if conn.kick is not None:
            await self.bye(conn.kick)
        conn.commands += 1
        if conn.commands > (MAX_SESSION_COMMANDS if conn.authenticated
                            else MAX_PREAUTH_COMMANDS):
            await self.bye(b"Too many commands.")
        cap = self.literal_cap
        self.budget = cap + MAX_LINE
        line = await self.readline()
        conts: list[memoryview] = []
        while True:
            params = self.params.copy(ParsingState(continuations=conts))
            try:
                cmd, _ = self.commands.parse(line, params)
            except ParsingInterrupt as interrupt:
                expected = interrupt.expected
                if not isinstance(expected, ExpectContinuation):
                    return self._refuse(line, b"Unexpected command structure.")
                n = expected.literal_length
                if n > cap or n > self.budget:
                    # A synchronizing literal: the client waits for "+", so
                    # refusing leaves the stream in sync (RFC 7889 TOOBIG).
                    return _Refused(_tag_of(line), ResponseNo(
                        _tag_of(line), b"Literal too large.", ResponseCode.of(b"TOOBIG")))
                self.budget -= n
                await self.write_response(ResponseContinuation(expected.message))
                conts.append(await self.read_continuation(n))
            except Exception:
                # e.g. int() of a 5000-digit literal length inside pymap's parser
                log.debug("unparseable IMAP command from %s", conn.peer, exc_info=True)
                return self._refuse(line, b"Invalid command.")
            else:
                return cmd

    def _refuse(self, line: memoryview | bytes, text: bytes) -> _Refused:
        tag = _tag_of(line)
        return _Refused(tag, ResponseBad(tag, text))

    async def read_idle_done(self, cmd: Any) -> bool:
        self.budget = MAX_LINE
        return await super().read_idle_done(cmd)

    async def authenticate(self, state: ConnectionState, mech_name: bytes) \
            -> ServerCredentials | None:
        self.budget = MAX_LINE * 2
        return await super().authenticate(state, mech_name)

    # writing

    async def _write(self, resp: Response) -> None:
        writer = self.writer
        if isinstance(resp, CommandResponse):
            # One untagged response at a time, draining in between, so FETCH
            # 1:* BODY[] holds one message in memory, not the whole mailbox.
            for untagged in resp._untagged:
                await untagged.async_write(writer)
                await writer.drain()
            Response.write(resp, writer)
        else:
            await resp.async_write(writer)
        await writer.drain()

    async def write_response(self, resp: Response) -> None:
        conn = self.conn
        if isinstance(resp, CommandResponse) and resp.tag not in (b"*", b"+"):
            if isinstance(resp, ResponseBad):
                conn.bad += 1
                conn.bad_in_a_row += 1
                if conn.bad >= MAX_BAD_COMMANDS:
                    conn.kick = b"Too many errors."
            else:
                conn.bad_in_a_row = 0
            if (isinstance(resp, ResponseOk)
                    and isinstance(current_command.get(None), StartTLSCommand)):
                # Written without a trip through the loop: the client's TLS
                # ClientHello may follow at once, and must reach the TLS layer
                # that start_tls() installs, not the plaintext read buffer.
                resp.write(self.writer)
                return
        try:
            async with asyncio.timeout(self.service.settings.imap.idle_timeout):
                await self._write(resp)
                if conn.bad_in_a_row >= CONSECUTIVE_BAD_LIMIT:
                    # pymap adds its BYE after writing the reply, so it never
                    # reaches the client; pymap then closes the connection.
                    conn.bad_in_a_row = 0
                    await self._write(ResponseBye(b"Too many errors, disconnecting."))
        except (TimeoutError, ConnectionError, OSError):
            # the client stopped reading (or is gone): drop it
            self.closing = True
            self.writer.transport.abort()
            raise _Disconnect() from None

    async def send_error_disconnect(self) -> None:
        if self.closing:
            return
        self.closing = True
        with contextlib.suppress(Exception):
            await super().send_error_disconnect()

    async def start_tls(self) -> None:
        # Bytes that arrived after STARTTLS, before the handshake, were sent in
        # plaintext: executing them as if protected is CVE-2011-0411's bug.
        if getattr(self.reader, "_buffer", b""):
            log.info("IMAP client %s pipelined data after STARTTLS; disconnecting",
                     self.conn.peer)
            raise ConnectionError("data after STARTTLS")
        # Called right after the OK was written, with no await in between:
        # loop.start_tls pauses reading before anything else reads the socket.
        await self.writer.start_tls(self.config.ssl_context,
                                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        self.conn.tls = True


def _tag_of(line: memoryview | bytes) -> bytes:
    m = _TAG.match(bytes(line[:80]))
    return m.group(0)[:-1] if m else b"*"


# -- configuration and service -------------------------------------------------


class _Config(MaildirConfig):
    """pymap's configuration, built from relaygate Settings (pymap's CLI is not used)."""

    def __init__(self, service: ImapService, ssl_context: ssl.SSLContext | None) -> None:
        settings = service.settings
        asyncio_subsystem = Subsystem.for_asyncio()
        super().__init__(
            Namespace(passlib_cfg=None, proxy_protocol=None, debug=False),
            host=None, port=0, base_dir=str(settings.data_dir), layout="++", colon=None,
            subsystem=asyncio_subsystem, cpu_subsystem=asyncio_subsystem,
            # pymap builds a context from $CERT_FILE when given none: give one
            ssl_context=ssl_context or ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
            tls_enabled=ssl_context is not None,
            proxy_protocol=ProxyProtocolNoop(), reject_dnsbl=False,
            max_append_len=settings.imap.max_literal,
            bad_command_limit=CONSECUTIVE_BAD_LIMIT,
            invalid_user_sleep=0.0,
        )
        self._hostname = settings.hostname or "localhost"
        # Built once: SASLAuth.named() scans the installed entry points (~15 ms).
        # Plaintext mechanisms only: passwords are checked against argon2id
        # hashes, so CRAM-MD5 style mechanisms cannot work.
        self._plain_auth = SASLAuth.named([b"PLAIN", b"LOGIN"])
        self._no_auth = SASLAuth([])

    @property
    def greeting(self) -> bytes:
        # pymap's reads $FQDN; relaygate's hostname setting is the source here
        name = self._hostname.encode("ascii", "replace")
        return b"relaygate IMAP4rev1 ready on " + name

    @property
    def parsing_params(self) -> Params:
        # No APPEND limit inside pymap's parser: the adapter checks literal
        # sizes itself (before and after login) and answers NO [TOOBIG].
        return Params()

    @property
    def initial_auth(self) -> SASLAuth:
        return self._no_auth

    @property
    def tls_auth(self) -> SASLAuth:
        return self._plain_auth


class ImapService:
    """The ``imap`` service: listeners, connections, windows."""

    name = "imap"

    def __init__(self, ctx: Context) -> None:
        if ctx.directory is None:
            raise ConfigError("the IMAP server needs a user directory")
        self.ctx = ctx
        self.settings = ctx.settings
        self.directory = ctx.directory
        s = ctx.settings
        self.plain = [parse_listen(x, origin="imap.listen") for x in s.imap.listen]
        self._own_context = False
        self.implicit = ([parse_listen(x, origin="imap.listen_tls") for x in s.imap.listen_tls]
                         if s.tls.cert is not None else [])
        self.ssl_context = self._ssl_context()
        self.config = _Config(self, self.ssl_context)
        self.tokens = AllTokens(self.config)
        self.commands = self.config.commands
        self.proxies = ProxyPolicy.from_settings(s)
        self._servers: list[Listener] = []
        self._bound: list[str] = []
        #: live connections: their task and their stream (to abort at stop)
        self._tasks: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._refreshers: set[asyncio.Task[None]] = set()
        try:
            params = inspect.signature(self.directory.authenticate).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        self._auth_kwargs: dict[str, Any] = {"service": "imap"} if "service" in params else {}

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.tls.cert is None or s.tls.key is None:
            return None
        shared = self.ctx.extra.get("ssl_context")
        if isinstance(shared, ssl.SSLContext):
            return shared  # ``serve`` shares one context and reloads it on SIGHUP
        self._own_context = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(s.tls.cert, s.tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate: {exc}",
                              source=str(s.tls.cert)) from None
        return context

    def reload(self) -> None:
        """SIGHUP: re-read the certificate (new handshakes use it); keep the old one on error."""
        s = self.settings
        if not self._own_context or self.ssl_context is None or s.tls.cert is None \
                or s.tls.key is None:
            return
        try:
            self.ssl_context.load_cert_chain(s.tls.cert, s.tls.key)
        except (OSError, ssl.SSLError) as exc:
            log.error("IMAP: keeping the old TLS certificate: cannot load %s: %s",
                      s.tls.cert, exc)

    def listeners(self) -> list[str]:
        if self._bound:
            return list(self._bound)
        return ([f"imap {x}" for x in self.plain] + [f"imaps {x}" for x in self.implicit])

    # lifecycle

    async def start(self) -> None:
        if not self.plain and not self.implicit:
            return
        if self.ssl_context is None and not self.settings.auth.allow_plaintext:
            for listen in self.plain:
                if not listen.loopback:
                    log.warning("IMAP listener %s has no TLS and is not loopback: logins are "
                                "refused there (LOGINDISABLED)", listen)
        try:
            for listen in self.plain:
                await self._listen(listen, implicit_tls=False)
            for listen in self.implicit:
                await self._listen(listen, implicit_tls=True)
        except BaseException:
            await self.stop(0)
            raise

    async def _listen(self, listen: Listen, *, implicit_tls: bool) -> None:
        async def cb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: Peer) -> None:
            await self._accept(listen, implicit_tls, reader, writer, peer)

        server = await listen_tcp_or_unix(
            listen.host, listen.port, listen.path, stream_factory(cb, limit=MAX_LINE),
            service="imaps" if implicit_tls else "imap", proxies=self.proxies,
            ssl_context=self.ssl_context if implicit_tls else None,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        self._servers.append(server)
        kind = "imaps" if implicit_tls else "imap"
        for sock in server.sockets:
            addr = sock.getsockname()
            if isinstance(addr, tuple):
                host, port = addr[0], addr[1]
                self._bound.append(f"{kind} [{host}]:{port}" if ":" in host
                                   else f"{kind} {host}:{port}")
            else:
                self._bound.append(f"{kind} unix:{addr}")

    def bound_ports(self) -> list[int]:
        """TCP ports actually bound (useful with port 0), in listener order."""
        ports: list[int] = []
        for server in self._servers:
            for sock in server.sockets:
                addr = sock.getsockname()
                if isinstance(addr, tuple):
                    ports.append(int(addr[1]))
        return ports

    async def stop(self, grace: float = 30.0) -> None:
        for server in self._servers:
            server.close()
        # IMAP sessions live for hours: tell them BYE now (pymap answers a
        # cancelled read with "BYE [UNAVAILABLE]") and wait for them to go.
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(grace, 0.1))
            for task in pending:  # e.g. a client that does not read its BYE
                writer = self._tasks.get(task)
                if writer is not None:
                    writer.transport.abort()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for task in list(self._refreshers):
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()

    # connections

    async def _accept(self, listen: Listen, implicit_tls: bool, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, peer: Peer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks[task] = writer
        gauge = self.ctx.metrics.connections.labels("imap")
        gauge.inc()
        ip = peer.ip
        # A listener on loopback is trusted for plaintext logins, unless a proxy
        # forwarded the connection from elsewhere: then the client's address counts.
        local = (is_loopback(ip) if ip is not None else True) if peer.proxy \
            else listen.loopback
        conn = _ConnInfo(
            ip=ip, peer=ip or "local", listener=listen, tls=implicit_tls,
            plaintext_ok=(implicit_tls or local or self.settings.auth.allow_plaintext))
        try:
            sock_info = SocketInfo.get(writer, None, unique_id=uuid.uuid4().bytes)
            connection = _Connection(self.commands, self.config, reader, writer, sock_info,
                                     conn, self)
            state = _State(_Login(self, conn), self.config, conn, self)
            async with AsyncExitStack() as stack:
                connection_exit.set(stack)
                stack.push_async_callback(self._stop_refresh, conn)
                await connection.run(state)
        except (_Disconnect, ConnectionError, EOFError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("IMAP session with %s ended by an unexpected error", conn.peer)
        finally:
            gauge.dec()
            self._tasks.pop(task, None)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5.0)
            except (Exception, asyncio.CancelledError):
                writer.transport.abort()

    # login and windows

    async def check_password(self, login: str, password: str, conn: _ConnInfo) -> LoginResult:
        """Ask the directory; count and log the outcome (never raises for bad input)."""
        logins = self.ctx.metrics.logins
        try:
            result = await self.directory.authenticate(login, password, conn.ip or "",
                                                       **self._auth_kwargs)
        except Exception:
            log.exception("user directory failed during an IMAP login from %s", conn.peer)
            logins.labels("imap", "error").inc()
            raise _Unavailable(b"Login temporarily unavailable.") from None
        if result.throttled:
            logins.labels("imap", "throttled").inc()
        elif not result.ok:
            logins.labels("imap", "failed").inc()
        return result

    async def logged_in(self, account: Account, conn: _ConnInfo) -> None:
        """A login succeeded: open the window and keep it open while connected."""
        conn.authenticated = True
        conn.account = account
        conn.commands = 0
        self.ctx.metrics.logins.labels("imap", "ok").inc()
        event("login.ok", service="imap", user=account.login, ip=conn.peer,
              tls="yes" if conn.tls else "no")
        if conn.ip is None:
            return  # a UNIX-socket client has no address to open a window for
        await self._open_window(account, conn.ip, "opened")
        interval = self.ctx.control.expiry / REFRESH_PER_EXPIRY
        task = asyncio.create_task(self._refresh(account, conn.ip, interval))
        conn.refresher = task
        self._refreshers.add(task)
        task.add_done_callback(self._refreshers.discard)

    async def _open_window(self, account: Account, ip: str, what: str) -> None:
        try:
            grant = await asyncio.to_thread(self.ctx.control.open_window, ip,
                                            user=account.login, domain=account.domain,
                                            source="imap")
        except WindowRefused:
            event("window.refused", ip=ip, user=account.login, source="imap",
                  reason="trusted proxy")
            return
        except StoreError as exc:
            # The login stands; relaying fails closed until the store is back.
            log.warning("IMAP login of %s from %s: cannot record the relay window: %s",
                        account.login, ip, exc)
            self.ctx.metrics.windows.labels("failed").inc()
            return
        self.ctx.metrics.windows.labels(what).inc()
        # ``expires``: the window's length in seconds, as POP3 logs it
        expires = int(grant.expires_at - grant.opened_at)
        if what == "opened":
            event("window.opened", ip=grant.ip, user=account.login, domain=account.domain,
                  source="imap", expires=expires)
        else:
            event("window.refreshed", level=logging.DEBUG, ip=grant.ip, user=account.login,
                  source="imap", expires=expires)

    async def _refresh(self, account: Account, ip: str, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._open_window(account, ip, "refreshed")
            except Exception:
                log.exception("IMAP window refresh for %s failed", ip)

    async def _stop_refresh(self, conn: _ConnInfo) -> None:
        task = conn.refresher
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def make_service(ctx: Context) -> ImapService:
    """The IMAP service for ``relaygate serve`` / ``relaygate imapd``."""
    return ImapService(ctx)


#: re-exported for tests and docs: when the adapter last changed behaviour of
#: pymap, in one place (pymap is pinned to this version in pyproject.toml)
PYMAP_VERSION = "0.36.7"

__all__ = ["DELIMITER", "MAX_LINE", "PYMAP_VERSION", "ImapService", "make_service", "to_crlf"]
