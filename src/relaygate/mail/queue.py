"""The outbound queue: durable files that make "250 OK" mean "delivered or bounced".

Theory of operation
-------------------
RFC 5321 section 6.1: once an SMTP server has answered 250 to the end of DATA
it has taken responsibility for the message and must deliver it or report the
failure; it must not lose it, even in a crash. This module is that promise on
disk; :mod:`relaygate.mail.delivery.worker` is the worker that keeps it.

On-disk format (``settings.data_dir / "queue"``, every directory mode 0700)::

    msg/<id>          the message, raw bytes exactly as accepted (CRLF lines)
    env/<id>          the envelope, one JSON object (below), UTF-8
    tmp/              files being written; never read as queue entries
    quarantine/       corrupt envelopes (<id>.env, <id>.msg, <id>.why), orphaned
                      messages (orphan-<id>.msg); kept for the administrator
    quarantine/postmaster/
                      double bounces when there is no postmaster mailbox
    hold/<id>         envelopes on hold (``relaygate queue hold``): the worker
                      does not see them; ``queue release`` moves them back
    lock              flock()ed by the one delivery worker of this directory
    flush             present = "retry everything now" (``relaygate queue flush``)

``<id>`` is 24 lower-case hex digits: nanoseconds since the epoch (16 digits,
so ids sort by arrival) and 32 random bits. The envelope::

    {"version": 1, "id": "<id>", "sender": "a@example.org" or "" (null sender),
     "recipients": [{"addr": "b@example.net", "state": "pending|done|failed",
                     "attempts": 0, "last_error": null, "status": null,
                     "remote_mta": null, "diagnostic_type": "smtp",
                     "notified": false}],
     "created": 1718000000.5, "size": 1234, "attempts": 0,
     "next_attempt": 1718000000.5, "last_error": null, "warned": false}

``state`` is per recipient: ``done`` (a server answered 2xx to DATA),
``failed`` (permanent failure, or the lifetime ran out) and ``notified``
once the DSN to the sender has been written (delivered or itself queued).

Write order (crash safety; every step is fsync + rename + directory fsync):

1. ``enqueue`` (or a :class:`QueueWriter` from ``open_message``, for a message
   written as it arrives) writes the message to ``tmp/``, fsyncs it, renames it to
   ``msg/<id>`` and fsyncs ``msg/``; then the envelope the same way into
   ``env/``. It returns only after both are durable, so the SMTP server may
   then answer 250. **The envelope's presence is what makes a message
   exist**: a crash before step 2 leaves an orphaned ``msg/<id>`` that was
   never acknowledged.
2. Envelope updates write a new file in ``tmp/`` and rename it over the old
   one, so a reader sees the old or the new envelope, never a mix. A
   recipient becomes ``done`` only after the remote 250; a SIGKILL during
   delivery leaves it ``pending`` and it is delivered again after restart
   (at least once; RFC 5321 section 6.3 accepts the rare duplicate).
3. A failed recipient's DSN is written before the recipient is marked
   ``notified``; a crash in between sends the DSN twice, never zero times.
4. When no recipient is pending, the envelope is removed first (the message
   stops existing), then the message file.

Start-up clean-up (:meth:`Queue.cleanup`): files in ``tmp/`` older than
``STALE_AGE`` are deleted: they are half-written messages never acknowledged
or envelope updates whose old version is still in place. A ``msg/<id>``
without an envelope older than ``STALE_AGE`` is *moved* to
``quarantine/orphan-<id>.msg``, not deleted: it was never acknowledged, but a
human may still want it. The age threshold keeps clean-up away from an
``enqueue`` in progress in another process (e.g. the SMTP server).

Corrupt envelopes (not JSON, wrong fields, wrong id) and envelopes whose
message file is missing are moved to ``quarantine/`` with a ``.why`` file and
logged, never deleted, and never stop the worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from relaygate.errors import RelaygateError
from relaygate.mail.dirsync import sync_dir

log = logging.getLogger("relaygate.queue")

PENDING, DONE, FAILED = "pending", "done", "failed"
STATES = (PENDING, DONE, FAILED)
FORMAT_VERSION = 1
#: leftovers younger than this may belong to an enqueue in progress in another process
STALE_AGE = 3600.0
#: an envelope larger than this is not ours (bounds memory when reading a corrupt file)
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
#: RFC 5321 section 4.5.3.1.8 requires at least 100 recipients; this bounds one envelope
MAX_RECIPIENTS = 10_000
ID_RE = re.compile(r"[0-9a-f]{24}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class QueueError(RelaygateError):
    """A queue operation failed (disk error, bad argument)."""


class CorruptEnvelope(QueueError):
    """An envelope file that cannot be trusted; it goes to quarantine."""


class MessageGone(QueueError):
    """The message was deleted (``relaygate queue delete``) while being worked on."""


class QueueBusy(QueueError):
    """Another process is already running the delivery worker for this queue."""


@dataclass
class Recipient:
    addr: str
    state: str = PENDING
    attempts: int = 0
    #: the last reply or local diagnostic, e.g. "451 4.7.1 greylisted"
    last_error: str | None = None
    #: RFC 3463 enhanced status of the final outcome (for the DSN)
    status: str | None = None
    remote_mta: str | None = None
    #: RFC 3464 diagnostic type of last_error: "smtp" (a server's reply) or "x-relaygate"
    diagnostic_type: str = "smtp"
    #: the DSN for a failed recipient has been written
    notified: bool = False


@dataclass
class Envelope:
    id: str
    sender: str
    recipients: list[Recipient]
    created: float
    size: int = 0
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    #: a "delayed" DSN has been sent (QueueSettings.delay_warning)
    warned: bool = False

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {"version": FORMAT_VERSION, **asdict(self)}
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, qid: str, raw: bytes) -> Envelope:
        """Parse and validate; anything unexpected raises CorruptEnvelope."""
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptEnvelope(f"not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise CorruptEnvelope("not a JSON object")
        if doc.get("version") != FORMAT_VERSION:
            raise CorruptEnvelope(f"unknown version {doc.get('version')!r}")
        if doc.get("id") != qid:
            raise CorruptEnvelope(f"id {doc.get('id')!r} does not match the file name")
        sender = doc.get("sender")
        rcpts = doc.get("recipients")
        if not isinstance(sender, str) or not isinstance(rcpts, list) or not rcpts:
            raise CorruptEnvelope("sender or recipients missing")
        out: list[Recipient] = []
        for r in rcpts:
            if not isinstance(r, dict) or not isinstance(r.get("addr"), str):
                raise CorruptEnvelope("bad recipient entry")
            if r.get("state", PENDING) not in STATES:
                raise CorruptEnvelope(f"bad recipient state {r.get('state')!r}")
            out.append(Recipient(
                addr=r["addr"], state=r.get("state", PENDING),
                attempts=_int(r.get("attempts", 0)),
                last_error=_opt_str(r.get("last_error")), status=_opt_str(r.get("status")),
                remote_mta=_opt_str(r.get("remote_mta")),
                diagnostic_type=_opt_str(r.get("diagnostic_type")) or "smtp",
                notified=bool(r.get("notified"))))
        return cls(
            id=qid, sender=sender, recipients=out, created=_num(doc.get("created")),
            size=_int(doc.get("size", 0)), attempts=_int(doc.get("attempts", 0)),
            next_attempt=_num(doc.get("next_attempt", 0.0)),
            last_error=_opt_str(doc.get("last_error")), warned=bool(doc.get("warned")))


def _num(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise CorruptEnvelope(f"expected a number, got {v!r}")
    return float(v)


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise CorruptEnvelope(f"expected a count, got {v!r}")
    return v


def _opt_str(v: object) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise CorruptEnvelope(f"expected a string, got {v!r}")


@dataclass
class QueueStats:
    """What ``relaygate status`` shows: ``queued`` never tried yet, ``deferred`` tried and
    waiting, ``oldest`` the arrival time of the oldest message (epoch seconds)."""

    total: int = 0
    queued: int = 0
    deferred: int = 0
    oldest: float | None = None
    oldest_age: float | None = None
    #: quarantined items (a corrupt envelope with its message counts once)
    quarantined: int = 0
    #: messages on hold (``relaygate queue hold``)
    held: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QuarantineItem:
    """One thing in ``quarantine/``, named for ``relaygate queue ... --quarantine NAME``.

    ``kind``: ``envelope`` (``<id>.env``/``<id>.msg`` with a ``.why``: corrupt
    envelope or missing message), ``orphan`` (``orphan-<id>.msg``: a message
    never acknowledged) or ``double-bounce`` (``postmaster/<file>.eml``: a
    bounce nobody could receive).
    """

    name: str
    kind: str
    when: float
    size: int
    reason: str
    paths: tuple[Path, ...]


#: names ``quarantined()`` hands out; nothing else is accepted back (no path tricks)
QUARANTINE_NAME_RE = re.compile(
    r"(?P<id>[0-9a-f]{24})|orphan-(?P<orphan>[0-9a-f]{24})"
    r"|bounce-(?P<bounce>[0-9a-f]{24}\.[0-9a-f]{8})")


@dataclass
class CleanupReport:
    tmp_removed: list[str] = field(default_factory=list)
    orphans_moved: list[str] = field(default_factory=list)



def _write_file(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist), write everything and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


class QueueLock:
    """An exclusive flock on ``queue/lock``: one delivery worker per queue directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QueueBusy(f"{path.parent}: another process is running the delivery "
                            "worker for this queue") from None
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> QueueLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class QueueWriter:
    """One message entering the queue piece by piece (:meth:`Queue.open_message`).

    Synchronous (run it on a thread from asyncio). :meth:`discard` removes the
    temporary file and may be called any number of times, but not while
    another thread is in :meth:`write`.
    """

    def __init__(self, queue: Queue, sender: str, recipients: list[str]) -> None:
        self.queue = queue
        self.sender = sender
        self.recipients = recipients
        self.qid = queue.new_id()
        self.tmp = queue.tmp_dir / f"{self.qid}.msg"
        self.size = 0
        self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None, "write after commit or discard"
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.size += len(data)

    def commit(self) -> str:
        """fsync and enqueue (message, then envelope: the module docstring); the queue id."""
        assert self._fd is not None, "commit after commit or discard"
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            return self.queue._commit(self)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Close and remove the temporary file (nothing was queued)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)


class Queue:
    """The queue directory. All methods are synchronous and thread-safe (call them from
    asyncio via ``asyncio.to_thread``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.msg_dir = self.directory / "msg"
        self.env_dir = self.directory / "env"
        self.tmp_dir = self.directory / "tmp"
        self.quarantine_dir = self.directory / "quarantine"
        for d in (self.directory, self.msg_dir, self.env_dir, self.tmp_dir,
                  self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    # -- listeners (the worker in this process wants to hear about new mail) --

    def add_listener(self, callback: Callable[[str], None]) -> None:
        """``callback(id)`` runs in the enqueuing thread after each durable enqueue."""
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[str], None]) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    # -- writing ---------------------------------------------------------------

    @staticmethod
    def new_id() -> str:
        return f"{time.time_ns():016x}{secrets.token_hex(4)}"

    def enqueue(self, sender: str, recipients: list[str], data: bytes) -> str:
        """Store a message durably and return its queue id (see the module docstring).

        ``sender`` "" is the null sender (bounces). Raises ValueError for bad
        arguments and OSError when the disk fails (the caller answers 451).
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError("message data must be bytes")
        writer = self.open_message(sender, recipients)
        try:
            writer.write(data)
        except BaseException:
            writer.discard()
            raise
        return writer.commit()

    def open_message(self, sender: str, recipients: list[str]) -> QueueWriter:
        """Start a message that arrives piece by piece (``enqueue`` for one written at once).

        The pieces go to ``tmp/<id>.msg``; :meth:`QueueWriter.commit` makes the
        message exist exactly as ``enqueue`` does. Raises ValueError for bad
        arguments, OSError when the disk fails.
        """
        if not isinstance(sender, str) or _CONTROL.search(sender):
            raise ValueError("bad sender address")
        if sender == "<>":
            sender = ""
        if not recipients or len(recipients) > MAX_RECIPIENTS:
            raise ValueError("need between 1 and MAX_RECIPIENTS recipients")
        for r in recipients:
            if not isinstance(r, str) or not r or _CONTROL.search(r):
                raise ValueError(f"bad recipient address {r!r}")
        return QueueWriter(self, sender, list(recipients))

    def _commit(self, writer: QueueWriter) -> str:
        qid = writer.qid
        now = time.time()
        env = Envelope(id=qid, sender=writer.sender,
                       recipients=[Recipient(r) for r in writer.recipients],
                       created=now, size=writer.size, next_attempt=now)
        env_tmp = self.tmp_dir / f"{qid}.env"
        os.rename(writer.tmp, self.msg_dir / qid)
        sync_dir(self.msg_dir)
        try:
            _write_file(env_tmp, env.to_json())
            os.rename(env_tmp, self.env_dir / qid)
            sync_dir(self.env_dir)
        except BaseException:
            # Not acknowledged: take the message back so no orphan is left behind.
            with contextlib.suppress(OSError):
                (self.msg_dir / qid).unlink()
            with contextlib.suppress(OSError):
                env_tmp.unlink()
            raise
        with self._lock:
            listeners = list(self._listeners)
        for cb in listeners:
            try:
                cb(qid)
            except Exception:
                log.exception("queue listener failed")
        return qid

    def save(self, env: Envelope) -> None:
        """Atomically replace the envelope. Raises MessageGone if it was deleted meanwhile."""
        final = self.env_dir / env.id
        if not final.exists():
            raise MessageGone(env.id)
        tmp = self.tmp_dir / f"{env.id}.{secrets.token_hex(4)}.env"
        _write_file(tmp, env.to_json())
        try:
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        sync_dir(self.env_dir)

    def remove(self, qid: str) -> bool:
        """Remove a finished (or deleted) message: envelope first, then message file."""
        _check_id(qid)
        try:
            (self.env_dir / qid).unlink()
        except FileNotFoundError:
            found = False
        else:
            found = True
            sync_dir(self.env_dir)
        with contextlib.suppress(FileNotFoundError):
            (self.msg_dir / qid).unlink()
        return found

    def delete(self, qid: str) -> bool:
        """Remove a message on request, whether queued or on hold."""
        found = self.remove(qid)
        held = self.directory / "hold" / qid
        try:
            held.unlink()
        except FileNotFoundError:
            return found
        with contextlib.suppress(FileNotFoundError):
            (self.msg_dir / qid).unlink()
        return True

    # -- hold and release (postsuper -h / -H) ----------------------------------

    @property
    def hold_dir(self) -> Path:
        return self.directory / "hold"

    def hold(self, qid: str) -> bool:
        """Put a queued message on hold; False when there is no such queued message.

        The envelope moves to ``hold/``, so the worker stops seeing it; a
        delivery already in flight ends as if the message had been deleted
        (the recipients it finished stay finished in the held envelope only
        when it had saved them before).
        """
        _check_id(qid)
        self.hold_dir.mkdir(exist_ok=True, mode=0o700)
        try:
            os.rename(self.env_dir / qid, self.hold_dir / qid)
        except FileNotFoundError:
            return False
        sync_dir(self.hold_dir)
        sync_dir(self.env_dir)
        return True

    def release(self, qid: str, now: float | None = None) -> bool:
        """Move a held message back to the queue, due now; False when it is not held.

        A running worker picks it up at its next directory scan
        (``RESCAN_INTERVAL``) or at once after ``queue flush``.
        """
        _check_id(qid)
        src = self.hold_dir / qid
        try:
            with open(src, "rb") as f:
                raw = f.read(MAX_ENVELOPE_BYTES + 1)
        except FileNotFoundError:
            return False
        env = Envelope.from_json(qid, raw)
        env.next_attempt = time.time() if now is None else now
        tmp = self.tmp_dir / f"{qid}.{secrets.token_hex(4)}.env"
        _write_file(tmp, env.to_json())
        os.rename(tmp, self.env_dir / qid)
        sync_dir(self.env_dir)
        src.unlink()
        sync_dir(self.hold_dir)
        return True

    def held_ids(self) -> list[str]:
        try:
            names = os.listdir(self.hold_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if ID_RE.fullmatch(n))

    def held_envelopes(self) -> Iterator[Envelope | tuple[str, CorruptEnvelope]]:
        """Every envelope on hold, in id order; corrupt ones as (id, error)."""
        for qid in self.held_ids():
            try:
                with open(self.hold_dir / qid, "rb") as f:
                    raw = f.read(MAX_ENVELOPE_BYTES + 1)
                yield Envelope.from_json(qid, raw)
            except FileNotFoundError:
                continue
            except CorruptEnvelope as exc:
                yield qid, exc

    # -- the quarantine ----------------------------------------------------------

    def quarantined(self) -> list[QuarantineItem]:
        """Everything in ``quarantine/``, oldest first (see :class:`QuarantineItem`)."""
        items: list[QuarantineItem] = []
        qdir = self.quarantine_dir
        try:
            names = set(os.listdir(qdir))
        except FileNotFoundError:
            return []
        ids = {n[:24] for n in names if ID_RE.fullmatch(n[:24]) and n[24:] in (".env", ".msg")}
        for qid in ids:
            paths = tuple(qdir / f"{qid}{s}" for s in (".env", ".msg", ".why")
                          if f"{qid}{s}" in names)
            reason = ""
            with contextlib.suppress(OSError):
                reason = (qdir / f"{qid}.why").read_text("utf-8", "replace").strip()
            items.append(self._item(qid, "envelope", reason or "(no reason recorded)", paths))
        for n in names:
            m = re.fullmatch(r"orphan-([0-9a-f]{24})\.msg", n)
            if m:
                items.append(self._item(f"orphan-{m.group(1)}", "orphan",
                                        "message without an envelope: never acknowledged",
                                        (qdir / n,)))
        with contextlib.suppress(FileNotFoundError):
            for n in os.listdir(qdir / "postmaster"):
                m = re.fullmatch(r"([0-9a-f]{24}\.[0-9a-f]{8})\.eml", n)
                if m:
                    items.append(self._item(f"bounce-{m.group(1)}", "double-bounce",
                                            "bounce nobody could receive (no postmaster mailbox)",
                                            (qdir / "postmaster" / n,)))
        items.sort(key=lambda i: (i.when, i.name))
        return items

    @staticmethod
    def _item(name: str, kind: str, reason: str, paths: tuple[Path, ...]) -> QuarantineItem:
        when, size = 0.0, 0
        for p in paths:
            with contextlib.suppress(OSError):
                st = p.stat()
                when = max(when, st.st_mtime)
                if p.suffix in (".msg", ".eml"):
                    size = st.st_size
        return QuarantineItem(name, kind, when, size, reason, paths)

    def find_quarantined(self, name: str) -> QuarantineItem | None:
        """The quarantined item called ``name`` (as listed), or None."""
        if not QUARANTINE_NAME_RE.fullmatch(name):
            raise QueueError(f"not a quarantine name: {name!r} (see `queue list --quarantine`)")
        for item in self.quarantined():
            if item.name == name:
                return item
        return None

    def read_quarantined(self, item: QuarantineItem) -> bytes:
        """The message bytes of a quarantined item (FileNotFoundError when it has none)."""
        for p in item.paths:
            if p.suffix in (".msg", ".eml"):
                return p.read_bytes()
        raise FileNotFoundError(f"{item.name}: no message file")

    def delete_quarantined(self, item: QuarantineItem) -> None:
        for p in item.paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def release_quarantined(self, item: QuarantineItem, to: str | None = None) -> str:
        """Put a quarantined item back into the queue; the queue id it now has.

        A quarantined envelope goes back as it is (the administrator repaired
        it): QueueError when it still does not parse or its message is
        missing. An orphan or a double bounce has no usable envelope: it is
        queued anew with the null sender to ``to`` (QueueError without one).
        """
        if item.kind == "envelope":
            qid = item.name
            env_q = self.quarantine_dir / f"{qid}.env"
            msg_q = self.quarantine_dir / f"{qid}.msg"
            if not msg_q.exists():
                raise QueueError(f"{qid}: the message file is missing; nothing to release")
            try:
                raw = env_q.read_bytes()
            except FileNotFoundError:
                raise QueueError(f"{qid}: the envelope is missing; nothing to release") from None
            try:
                env = Envelope.from_json(qid, raw)
            except CorruptEnvelope as exc:
                raise QueueError(f"{qid}: the envelope is still corrupt ({exc}); repair "
                                 f"{env_q} first") from None
            if to is not None:
                raise QueueError(f"{qid}: a quarantined envelope keeps its own recipients "
                                 "(no --to)")
            env.next_attempt = time.time()
            os.rename(msg_q, self.msg_dir / qid)
            sync_dir(self.msg_dir)
            tmp = self.tmp_dir / f"{qid}.{secrets.token_hex(4)}.env"
            _write_file(tmp, env.to_json())
            os.rename(tmp, self.env_dir / qid)
            sync_dir(self.env_dir)
            self.delete_quarantined(item)
            return qid
        if not to:
            raise QueueError(f"{item.name}: a {item.kind} has no envelope; say whom to send "
                             "it to (--to ADDRESS)")
        qid = self.enqueue("", [to], self.read_quarantined(item))
        self.delete_quarantined(item)
        return qid

    def quarantine(self, qid: str, why: str) -> Path:
        """Move envelope and message (whatever exists) to quarantine/ with a reason file."""
        _check_id(qid)
        qdir = self.quarantine_dir
        for src, suffix in ((self.env_dir / qid, "env"), (self.msg_dir / qid, "msg")):
            with contextlib.suppress(FileNotFoundError):
                os.rename(src, qdir / f"{qid}.{suffix}")
        reason = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {why}\n".encode("utf-8", "replace")
        with contextlib.suppress(FileExistsError):
            _write_file(qdir / f"{qid}.why", reason)
        sync_dir(qdir)
        sync_dir(self.env_dir)
        return qdir / f"{qid}.env"

    def keep_for_postmaster(self, data: bytes, name: str) -> Path:
        """Durably store a double bounce nobody could receive (quarantine/postmaster/)."""
        pdir = self.quarantine_dir / "postmaster"
        pdir.mkdir(exist_ok=True, mode=0o700)
        tmp = self.tmp_dir / f"{name}.{secrets.token_hex(4)}.pm"
        _write_file(tmp, data)
        final = pdir / f"{name}.{secrets.token_hex(4)}.eml"
        os.rename(tmp, final)
        sync_dir(pdir)
        return final

    # -- reading ---------------------------------------------------------------

    def ids(self) -> list[str]:
        """Ids of every message (every envelope), oldest first."""
        try:
            names = os.listdir(self.env_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if ID_RE.fullmatch(n))

    def load(self, qid: str) -> Envelope:
        """The envelope; FileNotFoundError if gone, CorruptEnvelope if unusable."""
        _check_id(qid)
        path = self.env_dir / qid
        with open(path, "rb") as f:
            raw = f.read(MAX_ENVELOPE_BYTES + 1)
        if len(raw) > MAX_ENVELOPE_BYTES:
            raise CorruptEnvelope("envelope file too large")
        return Envelope.from_json(qid, raw)

    def read_message(self, qid: str) -> bytes:
        _check_id(qid)
        with open(self.msg_dir / qid, "rb") as f:
            return f.read()

    def envelopes(self) -> Iterator[Envelope | tuple[str, CorruptEnvelope]]:
        """Every envelope in id order; corrupt ones as (id, error)."""
        for qid in self.ids():
            try:
                yield self.load(qid)
            except FileNotFoundError:
                continue
            except CorruptEnvelope as exc:
                yield qid, exc

    def stats(self, now: float | None = None) -> QueueStats:
        now = time.time() if now is None else now
        st = QueueStats()
        for item in self.envelopes():
            if isinstance(item, tuple):
                continue
            st.total += 1
            if item.attempts:
                st.deferred += 1
            else:
                st.queued += 1
            if st.oldest is None or item.created < st.oldest:
                st.oldest = item.created
        if st.oldest is not None:
            st.oldest_age = max(0.0, now - st.oldest)
        st.quarantined = len(self.quarantined())
        st.held = len(self.held_ids())
        return st

    # -- maintenance -----------------------------------------------------------

    def cleanup(self, now: float | None = None, *, stale_age: float = STALE_AGE) -> CleanupReport:
        """Remove stale tmp files; move old orphaned messages aside (module docstring)."""
        now = time.time() if now is None else now
        report = CleanupReport()
        for entry in os.scandir(self.tmp_dir):
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime > stale_age:
                    os.unlink(entry.path)
                    report.tmp_removed.append(entry.name)
        envs = set(self.ids()) | set(self.held_ids())
        for entry in os.scandir(self.msg_dir):
            if entry.name in envs or not ID_RE.fullmatch(entry.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime > stale_age and \
                        not (self.env_dir / entry.name).exists() and \
                        not (self.hold_dir / entry.name).exists():
                    os.rename(entry.path, self.quarantine_dir / f"orphan-{entry.name}.msg")
                    report.orphans_moved.append(entry.name)
        if report.orphans_moved:
            sync_dir(self.quarantine_dir)
            log.warning("queue: moved %d orphaned message file(s) to %s",
                        len(report.orphans_moved), self.quarantine_dir)
        return report

    def lock(self) -> QueueLock:
        """Take the worker lock (QueueBusy if another worker holds it)."""
        return QueueLock(self.directory / "lock")

    def request_flush(self) -> None:
        """Ask the running worker to retry everything now (it polls for this file)."""
        with open(self.directory / "flush", "ab"):
            pass

    def take_flush_request(self) -> bool:
        try:
            os.unlink(self.directory / "flush")
        except FileNotFoundError:
            return False
        return True

    def reschedule_all(self, when: float) -> int:
        """Set every pending message's next attempt to ``when`` (hold the lock!)."""
        n = 0
        for item in self.envelopes():
            if isinstance(item, tuple) or not item.pending():
                continue
            item.next_attempt = when
            with contextlib.suppress(MessageGone):
                self.save(item)
                n += 1
        return n


def _check_id(qid: str) -> None:
    # Ids come from the command line too: never let one name a path outside the queue.
    if not isinstance(qid, str) or not ID_RE.fullmatch(qid):
        raise QueueError(f"not a queue id: {qid!r}")
