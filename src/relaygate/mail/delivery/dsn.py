"""Delivery status notifications (bounces): RFC 3464 inside RFC 6522 multipart/report.

Theory of operation
-------------------
A DSN is a ``multipart/report; report-type=delivery-status`` message (RFC 6522)
with three parts:

1. a human-readable ``text/plain`` explanation;
2. ``message/delivery-status`` (RFC 3464 section 2): per-message fields
   (``Reporting-MTA``, ``Arrival-Date``) then, per recipient, a block with
   ``Final-Recipient``, ``Action`` (failed or delayed), ``Status`` (RFC 3463
   enhanced code), ``Remote-MTA``, ``Diagnostic-Code`` and ``Last-Attempt-Date``;
3. the original message's header (``text/rfc822-headers``, RFC 6522 section 4),
   or the whole message (``message/rfc822``) for a postmaster copy.

When a recipient address is not ASCII, RFC 6533 applies: the report becomes
``message/global-delivery-status`` with ``utf-8`` address types, and 8-bit
original headers travel as ``message/global-headers``.

The DSN comes from ``MAILER-DAEMON@<hostname>`` and carries
``Auto-Submitted: auto-replied`` (RFC 3834); the caller sends it with the null
envelope sender (RFC 5321 section 4.5.5) so it can never be bounced back.

Everything taken from the remote server or the original message is untrusted:
diagnostic texts are reduced to one printable line, and the boundary is
checked against the content it wraps.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate, make_msgid

#: at most this much of the original header block is returned (a DSN stays small)
MAX_RETURNED_HEADERS = 64 * 1024
#: a postmaster copy returns the whole failed message up to this size, else headers only
MAX_RETURNED_MESSAGE = 1024 * 1024
#: a diagnostic text longer than this is cut (RFC 5322 lines must stay under 998 octets)
MAX_DIAGNOSTIC = 900

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class DsnRecipient:
    address: str
    #: "failed" or "delayed" (RFC 3464 section 2.3.3)
    action: str
    #: RFC 3463 enhanced status, e.g. "5.1.1"
    status: str
    #: what the remote server (or we) said, e.g. "550 5.1.1 no such user"
    diagnostic: str | None = None
    remote_mta: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None
    #: RFC 3464 section 2.3.6 diagnostic-type: "smtp" for a server's reply, else ours
    diagnostic_type: str = "smtp"
    #: extra words for the human-readable part (e.g. why we gave up)
    note: str | None = None


def enhanced_status(code: int, text: str, *, default_detail: str = "0.0") -> str:
    """The RFC 3463 status from a reply: its own ``x.y.z`` if it has one, else derived."""
    m = _ENHANCED.match(text.strip())
    cls = str(code // 100) if 200 <= code < 600 else "4"
    if m and m.group(1) == cls:
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
    return f"{cls}.{default_detail}"


def one_line(text: str, limit: int = MAX_DIAGNOSTIC) -> str:
    """A server's (multi-line) reply as one printable line of at most ``limit`` chars."""
    s = _UNPRINTABLE.sub(" ", text).strip()
    return s if len(s) <= limit else s[: limit - 3] + "..."


def original_headers(data: bytes, limit: int = MAX_RETURNED_HEADERS) -> bytes:
    """The header block of ``data`` (up to the first empty line), CRLF lines."""
    end = len(data)
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i != -1:
            end = min(end, i)
    head = data[: min(end, limit)]
    head = re.sub(rb"\r?\n", b"\r\n", head).rstrip(b"\r\n")
    return head + b"\r\n"


def _ascii(s: str) -> bool:
    return s.isascii()


def _date(t: float) -> str:
    return format_datetime(datetime.fromtimestamp(t, UTC))


def build_dsn(
    *,
    reporting_mta: str,
    to: str,
    recipients: Sequence[DsnRecipient],
    original: bytes,
    arrival: float,
    now: float,
    queue_id: str = "",
    original_sender: str | None = None,
    return_message: bool = False,
    postmaster_copy: bool = False,
) -> bytes:
    """Build one DSN covering ``recipients`` (all "failed" or all "delayed"), CRLF lines.

    ``to`` is the header recipient (the original sender, or the postmaster for a
    double bounce). ``return_message`` returns the whole original message
    instead of only its header (postmaster copies).
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    delayed = all(r.action == "delayed" for r in recipients)
    utf8 = not all(_ascii(r.address) for r in recipients) or not _ascii(to)
    head = original_headers(original)
    head_8bit = any(b > 0x7F for b in head)
    host = reporting_mta or "localhost"

    lines: list[str] = []
    if postmaster_copy:
        lines += [f"This is the mail system at host {host}.", "",
                  "A delivery status notification could not be delivered to its",
                  f"recipient (the original sender was {original_sender or '<>'}).",
                  "It is attached below for the postmaster.", ""]
    elif delayed:
        lines += [f"This is the mail system at host {host}.", "",
                  "####################################################################",
                  "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
                  "####################################################################",
                  "", "Your message could not be delivered yet. The mail system will keep",
                  "trying; you will be told if it finally gives up.", ""]
    else:
        lines += [f"This is the mail system at host {host}.", "",
                  "I'm sorry to have to inform you that your message could not",
                  "be delivered to one or more recipients. It's attached below.", ""]
    for r in recipients:
        diag = one_line(r.diagnostic) if r.diagnostic else r.status
        via = f" (remote server {r.remote_mta})" if r.remote_mta else ""
        note = f"{r.note}; last error: " if r.note else ""
        lines.append(f"<{r.address}>{via}: {note}{diag}")
    human = "\r\n".join(lines) + "\r\n"

    status_lines = [f"Reporting-MTA: dns; {host}"]
    if queue_id:
        status_lines.append(f"X-Relaygate-Queue-ID: {queue_id}")
    if original_sender is not None:
        status_lines.append(f"X-Original-Sender: rfc822; {original_sender or '<>'}")
    status_lines.append(f"Arrival-Date: {_date(arrival)}")
    for r in recipients:
        addr_type = "rfc822" if _ascii(r.address) else "utf-8"
        block = ["", f"Final-Recipient: {addr_type}; {r.address}",
                 f"Action: {r.action}", f"Status: {r.status}"]
        if r.remote_mta:
            block.append(f"Remote-MTA: dns; {one_line(r.remote_mta, 255)}")
        if r.diagnostic:
            diag = one_line(r.diagnostic)
            if not utf8:
                diag = diag.encode("ascii", "replace").decode("ascii")
            dtype = re.sub(r"[^A-Za-z0-9-]", "", r.diagnostic_type) or "smtp"
            block.append(f"Diagnostic-Code: {dtype}; {diag}")
        if r.last_attempt is not None:
            block.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if r.will_retry_until is not None:
            block.append(f"Will-Retry-Until: {_date(r.will_retry_until)}")
        status_lines += block
    status = "\r\n".join(status_lines) + "\r\n"

    if return_message and len(original) <= MAX_RETURNED_MESSAGE:
        third_type = "message/global" if any(b > 0x7F for b in original) else "message/rfc822"
        third = re.sub(rb"\r?\n", b"\r\n", original)
        if not third.endswith(b"\r\n"):
            third += b"\r\n"
    else:
        third_type = "message/global-headers" if head_8bit else "text/rfc822-headers"
        third = head

    body_bytes = [human.encode("utf-8"), status.encode("utf-8"), third]
    boundary = _boundary(queue_id, host, body_bytes)
    report_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    subject = ("Postmaster Copy: Undelivered Mail" if postmaster_copy
               else "Delayed Mail (still being retried)" if delayed
               else "Undelivered Mail Returned to Sender")
    human_cte = "7bit" if _ascii(human) else "8bit"
    header = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{to}>",
        f"Subject: {subject}",
        f"Date: {formatdate(now, localtime=False, usegmt=True)}",
        f"Message-ID: {make_msgid(domain=host)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    parts: list[bytes] = ["\r\n".join(header).encode("utf-8")]
    parts.append(f"--{boundary}\r\nContent-Description: Notification\r\n"
                 f"Content-Type: text/plain; charset=utf-8\r\n"
                 f"Content-Transfer-Encoding: {human_cte}\r\n\r\n".encode("ascii"))
    parts.append(body_bytes[0])
    parts.append(f"\r\n--{boundary}\r\nContent-Description: Delivery report\r\n"
                 f"Content-Type: {report_type}\r\n\r\n".encode("ascii"))
    parts.append(body_bytes[1])
    third_cte = "8bit" if any(b > 0x7F for b in third) else "7bit"
    parts.append(f"\r\n--{boundary}\r\nContent-Description: Undelivered message\r\n"
                 f"Content-Type: {third_type}\r\n"
                 f"Content-Transfer-Encoding: {third_cte}\r\n\r\n".encode("ascii"))
    parts.append(third)
    parts.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return b"".join(parts)


def _boundary(queue_id: str, host: str, contents: Sequence[bytes]) -> str:
    # RFC 2046 section 5.1.1: the boundary must not occur in the encapsulated content.
    safe_host = re.sub(r"[^A-Za-z0-9.-]", "", host)[:60] or "localhost"
    while True:
        b = f"{queue_id or 'dsn'}.{secrets.token_hex(8)}/{safe_host}"
        marker = b.encode("ascii")
        if not any(marker in c for c in contents):
            return b
