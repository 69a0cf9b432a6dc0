"""SMTP message data as it arrives: end of data, dot-unstuffing, and what was wrong with it.

Theory of operation
-------------------
After ``354`` the client sends the message as text lines and ends it with a
line holding a single dot (RFC 5321 section 4.1.1.4): the end of data is the
sequence ``<CRLF>.<CRLF>``, where the first CRLF may be the one that ended
the ``DATA`` command. A line the client starts with a dot was sent with one
more dot in front (transparency, section 4.5.2), which is taken off here.

:class:`DataDecoder` is fed the bytes as they arrive, in pieces of any size,
and hands back the message content of each piece at once, so a receiver
never holds more than one piece of a message (the message itself goes to
disk). It never ends data anywhere but at ``<CRLF>.<CRLF>``; what it learns
on the way decides the reply at the end, after the client has sent
everything (section 4.2.5):

``bare``
    a CR not followed by LF, or an LF not preceded by CR, somewhere in the
    data. Such data is refused (section 2.3.8): a next hop whose parser
    ends data at ``<LF>.<LF>`` would read a second, smuggled message in it.
``too_long``
    a text line longer than ``line_limit`` octets with its CRLF
    (section 4.5.3.1.6: 1000).
``size``
    the octets of message content so far (after unstuffing).

How: the input is scanned a piece at a time with ``bytes.find`` for the end
marker; the tail of a piece that could be the start of a marker split across
two pieces (at most four octets: ``\\r``, ``\\r\\n``, ``\\r\\n.``, ``\\r\\n.\\r``) is
held back until the next piece. A CRLF therefore never straddles two pieces
handed on, so counting CR, LF and CRLF per piece finds every bare one, and
``\\r\\n.`` -> ``\\r\\n`` per piece undoes every stuffed dot. The CRLF before
the first line is virtual (the one that ended ``DATA``).

Nothing here touches the network or the disk.
"""

from __future__ import annotations

#: <CRLF>.<CRLF>: the end of message data (RFC 5321 section 4.1.1.4)
END_MARKER = b"\r\n.\r\n"
#: RFC 5321 section 4.5.3.1.6: a text line is at most 1000 octets with its CRLF
LINE_LIMIT = 1000
_CRLF = b"\r\n"
_STUFFED = b"\r\n."
#: suffixes held back because the next piece may complete an end marker, longest first
_PARTIAL_MARKERS = tuple(END_MARKER[:k] for k in range(len(END_MARKER) - 1, 0, -1))


class DataDecoder:
    """Decodes one message's data; feed it the bytes received after ``354``."""

    def __init__(self, *, line_limit: int = LINE_LIMIT) -> None:
        self.line_limit = line_limit
        #: the end of data was seen; the decoder takes nothing more
        self.done = False
        #: a bare CR or LF was seen (the message must be refused)
        self.bare = False
        #: a line longer than ``line_limit`` was seen (the message must be refused)
        self.too_long = False
        #: octets of message content handed out so far
        self.size = 0
        # Bytes received but not handed on yet; starts with the virtual CRLF
        # that ended the DATA command, so a first line "." ends the data.
        self._held = _CRLF
        self._virtual = True
        # octets of the line being received that were already handed on (with the
        # stuffed dot, CRLF not included): a line may span many pieces
        self._line = 0

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """Take ``data``; return (message content, octets of ``data`` used).

        Fewer octets than ``len(data)`` are used only when the end of data is in
        ``data``: what follows it is the client's next command, to be read as one.
        """
        if self.done:
            return b"", 0
        held = self._held
        buf = held + data if held else data
        end = buf.find(END_MARKER)
        if end >= 0:
            piece = buf[:end + 2]
            used = end + len(END_MARKER) - len(held)
            self._held = b""
            self.done = True
        else:
            keep = 0
            for partial in _PARTIAL_MARKERS:
                if buf.endswith(partial):
                    keep = len(partial)
                    break
            piece = buf[:len(buf) - keep] if keep else buf
            self._held = buf[len(buf) - keep:] if keep else b""
            used = len(data)
        if not piece:
            return b"", used
        self._check(piece)
        content = piece.replace(_STUFFED, _CRLF)
        if self._virtual:
            # A piece that starts with the virtual CRLF is at least those 2 octets
            # long: a lone "\r" would have been held back.
            content = content[2:]
            self._virtual = False
        self.size += len(content)
        return content, used

    def _check(self, piece: bytes) -> None:
        crlf = piece.count(_CRLF)
        if not self.bare and (piece.count(b"\r") != crlf or piece.count(b"\n") != crlf):
            self.bare = True
        limit = self.line_limit - len(_CRLF)
        if crlf == 0:
            self._line += len(piece)
            if self._line > limit:
                self.too_long = True
            return
        if self.too_long:
            return
        if self._line + len(piece) <= limit:
            # no line in this piece can be too long: skip the split
            self._line = len(piece) - piece.rfind(_CRLF) - len(_CRLF)
            return
        lines = piece.split(_CRLF)
        first = self._line + len(lines[0])
        longest = max(map(len, lines[1:-1]), default=0)
        self._line = len(lines[-1])
        if first > limit or longest > limit or self._line > limit:
            self.too_long = True
