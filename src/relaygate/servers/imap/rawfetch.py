"""FETCH answered from the message files' bytes: framed in a worker thread, sent with back-pressure.

pymap answers FETCH by MIME-parsing every message and building each response's
bytes on the event loop. The requests mail clients make most need no parse:
``BODY[]``/``BODY.PEEK[]``, ``RFC822``, ``RFC822.SIZE``, ``RFC822.HEADER``,
``RFC822.TEXT``, ``BODY[HEADER]``, ``BODY[TEXT]``, ``BODY[HEADER.FIELDS (...)]``
and ``BODY[HEADER.FIELDS.NOT (...)]`` (each also with ``<partial>``), together
with ``UID``, ``FLAGS``, ``INTERNALDATE``, ``EMAILID``, ``THREADID``. Their
answer is the file's bytes with bare LF made CRLF (sizes count those bytes, as
everywhere in relaygate's IMAP), or a piece of them.

- :func:`eligible` says whether a FETCH qualifies (all its items are among
  those, and at least one needs the file); anything else keeps pymap's path.
- :func:`fetch` runs it as pymap's ``do_fetch`` does (\\Seen for ``BODY[]``
  and ``RFC822`` but not ``.PEEK``, UID and sequence sets, ``EXPUNGEISSUED``
  for messages expunged meanwhile) and answers with a :class:`RawFetchOk`
  that holds the messages and merges the command's other FETCH responses
  into theirs as pymap does; no per-message work is left on the loop.
- :func:`send` writes them: a worker thread renders the metadata items (with
  pymap's own value classes), opens and reads the files, fixes line ends,
  frames the literals and joins everything into chunks of about
  :data:`CHUNK` bytes, one thread hop per chunk, the next chunk built while
  the loop writes one and waits for the socket to drain. A file larger than
  :data:`STREAM_ABOVE` is never held whole: it is read twice in pieces of
  :data:`PIECE` bytes, once to count its size with CRLF line ends (a
  literal's length comes before it), once to send. When it needs no line-end
  fix (what relaygate's SMTP server stores) and the connection has no TLS,
  the loop sends it with ``os.sendfile`` (``loop.sendfile``: non-blocking,
  as much as the socket takes at a time) instead: no copy through Python,
  and no worker thread held while a slow client reads.
- What a FETCH learnt about a file (its size with CRLF line ends, whether it
  already has them) is kept per process (:func:`known_size`), so the next
  FETCH of it skips the check, and ``RFC822.SIZE`` needs no read.

A file that is gone when it is read answers as pymap's path does: empty
literals and size 0. ``tests/servers/imap/test_imap_rawfetch.py`` compares the
bytes of both paths.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Final

from pymap.fetch import DynamicFetchValue, MessageAttributes
from pymap.interfaces.message import MessageInterface
from pymap.interfaces.session import SessionInterface
from pymap.mime import MessageContent, MessageHeader
from pymap.parsing.command.select import FetchCommand
from pymap.parsing.response import CommandResponse, ResponseCode, ResponseOk, UntaggedResponse
from pymap.parsing.response.specials import FetchResponse
from pymap.parsing.specials import FetchAttribute, FetchValue
from pymap.selected import SelectedMailbox

from relaygate.mail.uidlist import FileMeta, open_message, read_all
from relaygate.servers.imap.backend import IndexedMessage, to_crlf

log = logging.getLogger("relaygate.imap")

#: bytes of responses assembled per thread hop (and handed to the socket at once)
CHUNK = 1 << 20
#: files larger than this are streamed in pieces, never held whole
STREAM_ABOVE = 1 << 20
#: bytes read per piece of a streamed file
PIECE = 256 * 1024

#: items answered from the index alone (by pymap's value classes)
_METADATA = frozenset({b"UID", b"FLAGS", b"INTERNALDATE", b"EMAILID", b"THREADID"})
_BODIES = frozenset({b"BODY", b"BODY.PEEK", b"RFC822", b"RFC822.HEADER", b"RFC822.TEXT"})
_SPECIFIERS = frozenset({None, b"HEADER", b"TEXT", b"HEADER.FIELDS", b"HEADER.FIELDS.NOT"})
_SIZE = b"RFC822.SIZE"
#: the end of a message's header, as pymap splits it: the first line made only of
#: white space (an empty line, or the empty "line" after a final line break)
_FIRST_LINE_BLANK = re.compile(rb"[ \t\r\x0b\x0c]*(?:\n|\Z)")
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*(?:\n|\Z)")
_BLANK_LINE_COMPLETE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")


def eligible(attributes: Sequence[FetchAttribute]) -> bool:
    """True when every item can be answered from the file's bytes or the index,
    and at least one needs the file."""
    needs_file = False
    for attr in attributes:
        name = attr.value
        if name in _METADATA:
            continue
        needs_file = True
        if name == _SIZE:
            continue
        section = attr.section
        if name not in _BODIES or section is None or section.parts \
                or section.specifier not in _SPECIFIERS:
            return False
    return needs_file


@dataclass(frozen=True, slots=True)
class Item:
    """One FETCH item answered from the file: what to send, under which name."""

    #: the item as the response names it (``BODY[]<0>``, ``RFC822.SIZE``, ...)
    name: bytes
    #: ``RFC822.SIZE``, or the section specifier (None: the whole message)
    what: bytes | None
    #: a ``<start.length>`` partial (length None: to the end), or None
    partial: tuple[int, int | None] | None = None
    #: HEADER.FIELDS(.NOT): the upper-cased field names
    fields: frozenset[bytes] = frozenset()

    @classmethod
    def of(cls, attr: FetchAttribute) -> Item:
        name = bytes(attr.for_response)
        if attr.value == _SIZE:
            return cls(name, _SIZE)
        section = attr.section
        assert section is not None
        partial = None if attr.partial is None \
            else (attr.partial.start, attr.partial.length)
        return cls(name, section.specifier, partial, section.headers or frozenset())

    def clip(self, start: int, end: int) -> tuple[int, int]:
        """The part of [start, end) this item sends (pymap slices the same way)."""
        if self.partial is None:
            return start, end
        n = end - start
        first, length = self.partial
        first = min(first, n)
        last = n if length is None else min(first + length, n)
        return start + first, start + last


@dataclass(frozen=True, slots=True)
class FileRange:
    """Octets the loop sends straight from the file (``os.sendfile``): a large
    file that needs no line-end fix, on a connection without TLS."""

    file: BinaryIO
    offset: int
    count: int


#: how one item of a FETCH is answered: a pymap metadata value class, or an Item
Answer = type[DynamicFetchValue] | Item


class RawFetchOk(ResponseOk):
    """The OK ending a raw FETCH, carrying its FETCH responses in compact form.

    pymap builds a FetchResponse per message and merges into it the FETCH
    responses the command's updates add for the same message (the FLAGS that
    \\Seen changed): :meth:`add_untagged` does the same merge here, and
    :func:`send` writes the messages' responses first, in order, as pymap
    would. ``bytes()`` of this response (pymap's logging) leaves them out.
    """

    def __init__(self, tag: bytes, text: bytes, template: dict[FetchAttribute, Answer],
                 selected: SelectedMailbox, messages: list[tuple[int, MessageInterface]]) -> None:
        super().__init__(tag, text)
        self.template: Final = template
        self.selected: Final = selected
        self.messages: Final = messages
        self._seqs = frozenset(seq for seq, _ in messages)
        #: seq -> FETCH items the command's updates added for that message
        self.merged: dict[int, dict[FetchAttribute, FetchValue]] = {}

    def add_untagged(self, *responses: UntaggedResponse) -> None:
        for resp in responses:
            if isinstance(resp, FetchResponse) and resp.seq in self._seqs:
                self.merged.setdefault(resp.seq, {}).update(resp.data)
            else:
                super().add_untagged(resp)


async def fetch(session: SessionInterface, selected: SelectedMailbox,
                cmd: FetchCommand) -> tuple[CommandResponse, SelectedMailbox]:
    """pymap's ``ConnectionState.do_fetch``, answering with :class:`RawFetchOk`."""
    if not cmd.uid:
        selected.hide_expunged = True
    set_seen = not selected.readonly and any(attr.set_seen for attr in cmd.attributes)
    messages, updates = await session.fetch_messages(selected, cmd.sequence_set, set_seen)
    template: dict[FetchAttribute, Answer] = {}
    for attr in cmd.attributes:
        if attr not in template:  # pymap keeps the first of equal items
            simple = MessageAttributes._simple_attrs.get(attr.value)
            template[attr] = simple if simple is not None else Item.of(attr)
    found = list(messages)
    resp = RawFetchOk(cmd.tag, cmd.command + b" completed.", template, selected, found)
    if any(msg.expunged for _, msg in found):
        resp.code = ResponseCode.of(b"EXPUNGEISSUED")
    return resp, updates


async def send(resp: RawFetchOk, writer: asyncio.StreamWriter) -> None:
    """Write the FETCH responses: chunks built in a worker thread, one hop per
    chunk, each written and drained while the next one is built; on a plain
    socket, large files that need no line-end fix are sent by ``os.sendfile``
    (non-blocking, on the loop: no thread waits for a slow client)."""
    sock = writer.get_extra_info("socket")
    plain = writer.get_extra_info("sslcontext") is None and sock is not None \
        and hasattr(os, "sendfile")
    chunks = produce(resp, ranges=plain)
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[Any] = loop.run_in_executor(None, next, chunks, None)
    try:
        while True:
            # shielded: a cancelled write must not abandon the thread's hop
            chunk = await asyncio.shield(pending)
            if chunk is None:
                break
            if isinstance(chunk, FileRange):
                # the producer (which owns the file) waits until the range is
                # sent; os.sendfile runs on the loop, non-blocking, as the socket
                # takes it (a thread waiting on a stalled client would hold one
                # of the few worker threads every session needs); read in
                # pieces when the socket does not take sendfile
                if writer.transport.is_closing():  # (loop.sendfile: RuntimeError)
                    raise ConnectionResetError("connection closed during FETCH")
                chunk.file.seek(chunk.offset)  # (asyncio's fallback seeks only to offset > 0)
                sent = await loop.sendfile(writer.transport, chunk.file, chunk.offset,
                                           chunk.count)
                if sent != chunk.count:
                    raise OSError("message file shrank while sent")
                pending = loop.run_in_executor(None, next, chunks, None)
                continue
            pending = loop.run_in_executor(None, next, chunks, None)
            writer.write(chunk)
            await writer.drain()
    finally:
        # the producer is closed (its file with it) when its thread's work is over
        pending.add_done_callback(lambda fut: _close(fut, chunks))


def _close(fut: asyncio.Future[Any],
           chunks: Generator[bytes | FileRange, None, None]) -> None:
    """After the last hop: close the producer (its open file), consume its outcome."""
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("FETCH stopped by %r", fut.exception())
    chunks.close()


# -- the worker thread -----------------------------------------------------------


@dataclass(slots=True)
class Job:
    """One message's FETCH response to render."""

    seq: int
    message: MessageInterface
    segments: list[tuple[FetchAttribute, Answer | FetchValue]]
    selected: SelectedMailbox

    def file(self) -> tuple[str, str | None, FileMeta | None]:
        """(Maildir, key, file) of the message; no file when it is gone."""
        msg = self.message
        if isinstance(msg, IndexedMessage) and not msg.expunged:
            folder, key = msg.folder, msg.key
            if folder is not None and key is not None:
                return folder.root, key, folder.index.files.get(key)
        return "", None, None


def jobs(resp: RawFetchOk) -> Iterator[Job]:
    template: list[tuple[FetchAttribute, Answer | FetchValue]] = list(resp.template.items())
    merged = resp.merged
    for seq, msg in resp.messages:
        extra = merged.get(seq)
        if extra is None:
            segments = template
        else:
            both: dict[FetchAttribute, Answer | FetchValue] = dict(template)
            both.update(extra)
            segments = list(both.items())
        yield Job(seq, msg, segments, resp.selected)


def produce(resp: RawFetchOk, *, ranges: bool = False
            ) -> Generator[bytes | FileRange, None, None]:
    """The responses' bytes in chunks of about :data:`CHUNK` (blocking: each
    ``next()`` runs in a worker thread; the session waits for it, so its
    messages and session flags do not change meanwhile)."""
    out: list[bytes | memoryview] = []
    size = 0
    for job in jobs(resp):
        for fragment in render(job, ranges=ranges):
            if isinstance(fragment, FileRange):
                if out:
                    yield b"".join(out)
                    out.clear()
                    size = 0
                yield fragment
                continue
            out.append(fragment)
            size += len(fragment)
            if size >= CHUNK:
                yield b"".join(out)
                out.clear()
                size = 0
    if out:
        yield b"".join(out)


def render(job: Job, *, ranges: bool = False) -> Iterator[bytes | memoryview | FileRange]:
    """One ``* n FETCH (...)`` response, in fragments (with ``ranges``, parts of
    large files that need no line-end fix as :class:`FileRange`)."""
    src: Source | None = None
    root, key, meta = job.file()
    try:
        yield b"* %d FETCH (" % job.seq
        first = True
        for attr, answer_with in job.segments:
            if not first:
                yield b" "
            first = False
            if isinstance(answer_with, Item):
                if src is None and answer_with.what == _SIZE and meta is not None \
                        and key is not None:
                    crlf = known_size(root, key, meta.size)
                    if crlf is not None:  # no need to open the file
                        yield b"%b %d" % (answer_with.name, crlf)
                        continue
                if src is None:
                    src = open_source(root, key, meta, ranges=ranges)
                yield from answer(answer_with, src)
            elif isinstance(answer_with, FetchValue):
                yield bytes(answer_with)
            else:
                yield bytes(answer_with(attr, message=job.message, selected=job.selected))
        yield b")\r\n"
    finally:
        if src is not None:
            src.close()


def answer(item: Item, src: Source) -> Iterator[bytes | memoryview | FileRange]:
    """One item: ``RFC822.SIZE n`` or ``NAME {n}\\r\\n`` and the literal's bytes."""
    if item.what == _SIZE:
        yield b"%b %d" % (item.name, src.size)
        return
    if item.what in (b"HEADER.FIELDS", b"HEADER.FIELDS.NOT"):
        data = src.fields(item.fields, inverse=item.what == b"HEADER.FIELDS.NOT")
        start, end = item.clip(0, len(data))
        yield b"%b {%d}\r\n" % (item.name, end - start)
        yield memoryview(data)[start:end]
        return
    if item.what is None:
        start, end = 0, src.size
    else:
        header_end = src.header_end()
        if item.what == b"HEADER":
            start, end = 0, (header_end or 0)
        else:  # TEXT
            start, end = (header_end or 0), src.size
    start, end = item.clip(start, end)
    yield b"%b {%d}\r\n" % (item.name, end - start)
    yield from src.window(start, end)


def open_source(root: str, key: str | None, meta: FileMeta | None, *,
                ranges: bool = False) -> Source:
    """The message's bytes: held, streamed, or gone (empty, as pymap answers)."""
    if meta is None or key is None:
        return GONE
    try:
        fd = open_message(root, key, meta)
        if fd is None:
            return GONE
        try:
            size = os.fstat(fd).st_size
            crlf = known_size(root, key, size)
            if size > STREAM_ABOVE:
                f = os.fdopen(fd, "rb")
                fd = -1  # the file object owns it now
                return Streamed(f, crlf, (root, key, size), ranges=ranges)
            data = read_all(fd, size)
            if crlf != len(data):  # not known to be CRLF already
                raw_size = len(data)
                data = to_crlf(data)
                learn_size(root, key, raw_size, len(data))
            return Source(data)
        finally:
            if fd >= 0:
                os.close(fd)
    except OSError as exc:
        log.warning("cannot read message %s in %s: %s", key, root, exc)
        return GONE


#: (Maildir, message key) -> (file size, size with CRLF line ends). A Maildir
#: message file never changes once delivered (flags change its name, not its
#: bytes; the key stays), so what one FETCH learnt serves the next ones: a
#: message whose sizes are equal needs no line-end fix, RFC822.SIZE needs no
#: read, and a large file no counting pass. The file size guards the entry.
_SIZES: dict[tuple[str, str], tuple[int, int]] = {}
#: entries kept (about 100 bytes each); the oldest half goes when it is full
MAX_KNOWN_SIZES = 200_000


def known_size(root: str, key: str, size: int) -> int | None:
    """The CRLF size of the message file of ``size`` octets, if known."""
    known = _SIZES.get((root, key))
    return known[1] if known is not None and known[0] == size else None


def learn_size(root: str, key: str, size: int, crlf_size: int) -> None:
    if len(_SIZES) >= MAX_KNOWN_SIZES:
        for old in list(itertools.islice(_SIZES, MAX_KNOWN_SIZES // 2)):
            _SIZES.pop(old, None)
    _SIZES[(root, key)] = (size, crlf_size)


def header_end(data: bytes | bytearray, *, final: bool = True, pos: int = 0) -> int | None:
    """Where the header ends (just after its blank line); None when it has none
    (pymap then reads the whole message as body). With ``final`` false, ``data``
    is only a beginning and a blank line must be complete to count; ``pos``
    (the index of a line break) skips lines already looked at."""
    if pos == 0:
        m = _FIRST_LINE_BLANK.match(data)
        if m is not None and (final or m.group().endswith(b"\n")):
            return m.end()
    m = (_BLANK_LINE if final else _BLANK_LINE_COMPLETE).search(data, pos)
    return None if m is None else m.end()


def header_fields(head: bytes, wanted: frozenset[bytes], *, inverse: bool) -> bytes:
    """HEADER.FIELDS (or .NOT) of a header: pymap's own folding, over the header only."""
    lines = MessageContent._find_lines(head)
    header_lines, _ = MessageContent._split_lines(head, lines)
    header = MessageHeader._parse(head, memoryview(head), header_lines)
    found = [bytes(value) for key, value in header.folded if inverse != (key.upper() in wanted)]
    return b"".join(found) + b"\r\n"


class Source:
    """A message's bytes with CRLF line ends, held in memory (small messages)."""

    def __init__(self, data: bytes, *, gone: bool = False) -> None:
        self._data = data
        self.gone = gone
        self._header_end: int | None = -1

    @property
    def size(self) -> int:
        return len(self._data)

    def header_end(self) -> int | None:
        if self._header_end == -1:
            self._header_end = header_end(self._data)
        return self._header_end

    def head(self, end: int) -> bytes:
        return self._data[:end]

    def fields(self, wanted: frozenset[bytes], *, inverse: bool) -> bytes:
        if self.gone:
            return b""
        end = self.header_end()
        return header_fields(self.head(end) if end is not None else b"", wanted,
                             inverse=inverse)

    def window(self, start: int, end: int) -> Iterator[bytes | memoryview | FileRange]:
        if end > start:
            yield memoryview(self._data)[start:end]

    def close(self) -> None:
        pass


#: the answer for a message whose file is gone
GONE: Final = Source(b"", gone=True)


class Streamed(Source):
    """A large message file, read in pieces of :data:`PIECE` bytes, never whole."""

    def __init__(self, f: BinaryIO, size: int | None, name: tuple[str, str, int], *,
                 ranges: bool = False) -> None:
        super().__init__(b"")
        self._f = f
        self._size = size
        self._name = name
        self._head = bytearray()
        #: hand parts that need no line-end fix to the loop as FileRange
        self._ranges = ranges

    @property
    def size(self) -> int:
        if self._size is None:
            self._size = crlf_size(self._f)
            root, key, raw_size = self._name
            learn_size(root, key, raw_size, self._size)
        return self._size

    def header_end(self) -> int | None:
        if self._header_end != -1:
            return self._header_end
        head = self._head
        head.clear()
        found: int | None = None
        for piece in crlf_pieces(self._f):
            resume = max(head.rfind(b"\n"), 0)
            head += piece
            found = header_end(head, final=False, pos=resume)
            if found is not None:
                break
        else:
            found = header_end(head)
        self._header_end = found
        return found

    def head(self, end: int) -> bytes:
        return bytes(self._head[:end])

    def window(self, start: int, end: int) -> Iterator[bytes | memoryview | FileRange]:
        if end <= start:
            return
        if self.size == self._name[2]:
            # no bare LF (what SMTP delivers): the file's own bytes, from where needed
            f = self._f
            if self._ranges and end - start >= PIECE:
                yield FileRange(f, start, end - start)
                return
            f.seek(start)
            while start < end:
                piece = f.read(min(PIECE, end - start))
                if not piece:
                    raise OSError(f"message file {self._name[1]} shrank while read")
                start += len(piece)
                yield piece
            return
        offset = 0
        for piece in crlf_pieces(self._f):
            n = len(piece)
            if offset + n > start:
                yield memoryview(piece)[max(start - offset, 0):min(end - offset, n)]
            offset += n
            if offset >= end:
                return

    def close(self) -> None:
        self._f.close()


def raw_pieces(f: BinaryIO) -> Iterator[bytes]:
    """The file from its start in pieces of about :data:`PIECE` bytes, none ending
    in CR: a CR ending one read is held back for the next, so a CRLF split
    between two reads stays one line end."""
    f.seek(0)
    carry = b""
    while True:
        raw = f.read(PIECE)
        if not raw:
            if carry:
                yield carry
            return
        data = carry + raw if carry else raw
        if data.endswith(b"\r"):
            carry, data = b"\r", data[:-1]
        else:
            carry = b""
        if data:
            yield data


def crlf_pieces(f: BinaryIO) -> Iterator[bytes]:
    """The file from its start, bare LF made CRLF, in pieces."""
    for data in raw_pieces(f):
        yield to_crlf(data)


def crlf_size(f: BinaryIO) -> int:
    """The file's size once bare LF are made CRLF (it is read, not converted)."""
    return sum(len(data) + data.count(b"\n") - data.count(b"\r\n") for data in raw_pieces(f))
