"""Message data on its way to disk: per-message files, written as the data arrives.

Theory of operation
-------------------
The SMTP server decodes DATA piece by piece
(:class:`relaygate.protocols.smtp_data.DataDecoder`) and hands each piece of
content to an :class:`IncomingMessage`, which writes it to every file of the
message at once (the queue's ``tmp/<id>.msg`` for relayed recipients, a
Maildir ``tmp/`` file for each local mailbox; their headers were written
when the files were opened). So the memory one transfer holds is what waits
for the disk, never the message.

Writes run on the delivery threads, one at a time per message (in order);
what arrives meanwhile is gathered and written by the next one, so a busy
disk gets fewer, larger writes. The first ``WRITE_AT`` bytes wait for more
before a write starts: a small message (most mail) is written by the same
thread hop that commits it (:meth:`IncomingMessage.commit`), so it costs two
hops (open before ``354``, write and commit at the end), not three. Two
bounds keep the waiting bytes small:

- per message, ``MESSAGE_BUFFER``: past it, the transfer waits for its own
  write before it reads more;
- for all messages together, :class:`DataBudget` (``smtp.data_memory_limit``):
  a transfer that would go over it waits, first come first served, until
  writes finish.

Waiting means the transfer stops reading: the client's bytes stay in the
kernel, TCP's window closes and the client slows down to what the disk
takes. Nothing is refused: the limit is reached only when the disk is slower
than the network, which passes, and a ``451`` in the middle of DATA would make
the client send the whole message again later. The wait cannot deadlock:
what a waiting transfer already handed over is being written, and every
finished write gives its bytes back.

A write that fails (disk full) stops the writing; the rest of the data is
read and the message is answered ``451``. :meth:`IncomingMessage.discard`
(refused message, client gone mid-DATA, failed write) removes every
temporary file; when a write is in flight the files go when it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol

log = logging.getLogger("relaygate.smtp")

#: bytes of one message that may wait for the disk before its transfer stops reading
MESSAGE_BUFFER = 1024 * 1024
#: bytes gathered before a write starts during the transfer (the rest goes with the commit)
WRITE_AT = 64 * 1024


class MessageFile(Protocol):
    """A file being written (``MaildirWriter``, ``QueueWriter``); blocking calls."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def commit(self) -> Any:
        """Make the message durable and visible; the writer's result (path, queue id)."""
        ...

    def discard(self) -> None: ...


class DataBudget:
    """Bytes of message data held in memory by every transfer of a process together."""

    def __init__(self, limit: int) -> None:
        if limit < MESSAGE_BUFFER:
            raise ValueError(f"data budget below {MESSAGE_BUFFER} bytes")
        self.limit = limit
        self.used = 0
        #: (bytes wanted, future) in arrival order
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Transfers waiting for room."""
        return len(self._waiters)

    async def take(self, n: int) -> None:
        """Take ``n`` bytes (at most MESSAGE_BUFFER), waiting in line while there is no room."""
        if not self._waiters and self.used + n <= self.limit:
            self.used += n
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.give(n)  # granted, but the transfer is gone
            elif entry in self._waiters:  # _grant may have dropped it already
                self._waiters.remove(entry)
                self._grant()  # someone behind may fit now
            raise

    def give(self, n: int) -> None:
        self.used -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.used + n > self.limit:
                return
            self._waiters.popleft()
            self.used += n
            fut.set_result(None)


class IncomingMessage:
    """The files of one message being received, and the bytes waiting to be written."""

    def __init__(self, files: Sequence[MessageFile], *, executor: Executor,
                 budget: DataBudget) -> None:
        self.files = list(files)
        self.executor = executor
        self.budget = budget
        #: the error of a failed write (the message is then discarded)
        self.error: BaseException | None = None
        #: True while the transfer waits for room (its idle time is not the client's)
        self.waiting = False
        self._pending = bytearray()
        self._in_flight = 0
        self._discarded = False
        self._committed = False
        self._progress = asyncio.Event()

    @property
    def discarded(self) -> bool:
        return self._discarded

    async def add(self, content: bytes) -> None:
        """Queue ``content`` for writing; waits while too much is waiting already."""
        if not content or self._discarded:
            return
        n = len(content)
        self.waiting = True
        try:
            while self._pending_bytes() and self._pending_bytes() + n > MESSAGE_BUFFER:
                self._kick()
                self._progress.clear()
                await self._progress.wait()
                if self._discarded:
                    return
            if self.budget.waiting or self.budget.used + n > self.budget.limit:
                # No room: what this transfer holds goes to the disk now (below
                # WRITE_AT it would wait for more), or the budget can fill with
                # bytes nobody writes while every transfer waits for room.
                self._kick()
            await self.budget.take(n)
        finally:
            self.waiting = False
        if self._discarded:
            self.budget.give(n)
            return
        self._pending += content
        if len(self._pending) >= WRITE_AT:
            self._kick()

    async def flush(self) -> None:
        """Wait until everything added is written; raises the write error, if any."""
        self._kick()
        while not self._discarded and (self._pending or self._in_flight):
            self._progress.clear()
            await self._progress.wait()
        if self.error is not None:
            raise self.error

    async def commit(self) -> list[Any]:
        """Write what waits and commit every file, in that order, in one thread hop.

        The results of the files' ``commit`` (paths, queue id), in file order.
        Raises the first error (a failed write, fsync or rename); the caller
        discards the message then.
        """
        while not self._discarded and self._in_flight:
            self._progress.clear()
            await self._progress.wait()
        if self.error is not None:
            raise self.error
        if self._discarded:
            raise RuntimeError("commit after discard")
        data, self._pending = self._pending, bytearray()
        self._in_flight = len(data) or 1

        def write_and_commit() -> list[Any]:
            if data:
                self._write(data)
            return [f.commit() for f in self.files]

        def done(fut: asyncio.Future[list[Any]]) -> None:
            # The hop may outlive a transfer cancelled meanwhile: the files stay
            # untouched until it ends (a discard then removes what is left).
            self._in_flight = 0
            self.budget.give(len(data))
            if not fut.cancelled() and fut.exception() is None:
                self._committed = True
            elif self._discarded:
                self._remove_files()
            self._progress.set()

        fut = asyncio.get_running_loop().run_in_executor(self.executor, write_and_commit)
        fut.add_done_callback(done)
        return await asyncio.shield(fut)

    def discard(self) -> None:
        """Drop what waits and remove every file (now, or when the write in flight ends).

        Nothing to do once :meth:`commit` succeeded: the files are the message.
        """
        if self._discarded or self._committed:
            return
        self._discarded = True
        if self._pending:
            self.budget.give(len(self._pending))
            self._pending = bytearray()
        self._progress.set()
        if not self._in_flight:
            self._remove_files()

    def _pending_bytes(self) -> int:
        return len(self._pending) + self._in_flight

    def _kick(self) -> None:
        if self._in_flight or not self._pending or self._discarded:
            return
        data, self._pending = self._pending, bytearray()
        self._in_flight = len(data)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.executor, self._write, data)
        fut.add_done_callback(self._written)

    def _write(self, data: bytearray) -> None:
        for f in self.files:
            f.write(data)

    def _written(self, fut: asyncio.Future[None]) -> None:
        n, self._in_flight = self._in_flight, 0
        self.budget.give(n)
        if not fut.cancelled() and fut.exception() is not None and self.error is None:
            self.error = fut.exception()
        if self.error is not None and not self._discarded:
            self.discard()
        elif self._discarded:
            self._remove_files()
        else:
            self._kick()
        self._progress.set()

    def _remove_files(self) -> None:
        for f in self.files:
            try:
                f.discard()
            except OSError as exc:
                log.warning("cannot remove a temporary message file: %s", exc)


def open_files(openers: Sequence[Callable[[], MessageFile]]) -> list[MessageFile]:
    """Call each opener (blocking); if one fails, remove the files already made and raise."""
    files: list[MessageFile] = []
    try:
        for opener in openers:
            files.append(opener())
    except BaseException:
        for f in files:
            try:
                f.discard()
            except OSError as exc:
                log.warning("cannot remove a temporary message file: %s", exc)
        raise
    return files
