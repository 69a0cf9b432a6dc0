"""Fixes to pymap 0.36.7 defects that cannot be fixed by subclassing: applied by
:func:`apply`, which the IMAP service calls when it is built; importing relaygate
changes nothing in pymap.

- ``FileWriteable.file_write`` wrote the uidlist, keywords and subscriptions
  through a temporary file in ``/tmp`` renamed into the Maildir (EXDEV across
  file systems) and never fsynced them;
- ``MessageBody._find_parts`` kept the CRLF before a multipart boundary in the
  part (RFC 2046 5.1.1), so BODY[n] and BODYSTRUCTURE sizes were two octets long;
- ``get_raw`` (the bytes spanned by a header's or body's lines) answered
  ``view[0:-1]`` for an empty list of lines: a message with no empty line
  after its header lost its last octet in BODY[] and RFC822.SIZE, and its
  empty header or body read as nearly the whole message.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence

import pymap.mime
import pymap.mime._util
from pymap.backend.maildir.io import FileWriteable
from pymap.mime import MessageBody


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



def _find_parts(cls: type[MessageBody], data: bytes, view: memoryview,
                lines: Sequence[tuple[int, int, int]],
                boundary: bytes) -> Sequence[Sequence[tuple[int, int, int]]]:
    """pymap's multipart splitter, with RFC 2046 5.1.1's rule applied.

    "The CRLF preceding the boundary delimiter line is conceptually attached
    to the boundary": pymap kept it in the part, so BODY[n] and the part sizes
    in BODYSTRUCTURE had two octets too many. A line is (start, end of text,
    end including the line break); the last line of a part loses its break.
    """
    parts = _ORIGINAL_FIND_PARTS(cls, data, view, lines, boundary)
    out: list[Sequence[tuple[int, int, int]]] = []
    for part in parts:
        if part:
            start, end, _ = part[-1]
            part = [*part[:-1], (start, end, end)]
        out.append(part)
    return out


def _get_raw(view: memoryview, *lines: Sequence[tuple[int, int, int]]) -> memoryview:
    """The bytes from the first of ``lines`` to the end of the last one (each
    line is start, end of text, end including the line break); empty groups
    count for nothing, and no lines at all are no bytes."""
    groups = [group for group in lines if group]
    if not groups:
        return view[0:0]
    return view[groups[0][0][0]:groups[-1][-1][2]]


#: pymap's own functions, kept so the fixes can call them (and tests can compare)
_ORIGINAL_FILE_WRITE = FileWriteable.file_write
_ORIGINAL_FIND_PARTS = MessageBody._find_parts.__func__  # type: ignore[attr-defined]
_ORIGINAL_GET_RAW = pymap.mime._util.get_raw


def apply() -> None:
    """Install the fixes into pymap (idempotent; the IMAP service calls it)."""
    FileWriteable.file_write = _file_write  # type: ignore[method-assign]
    MessageBody._find_parts = classmethod(_find_parts)  # type: ignore[assignment]
    pymap.mime.get_raw = _get_raw  # type: ignore[attr-defined]
    pymap.mime._util.get_raw = _get_raw


def applied() -> bool:
    """True once :func:`apply` has run in this process."""
    return FileWriteable.file_write is _file_write
