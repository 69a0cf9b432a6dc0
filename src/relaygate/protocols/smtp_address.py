"""SMTP envelope addresses: strict parsing, canonical domains, and relay tricks.

Theory of operation
-------------------
The argument of ``MAIL FROM:`` / ``RCPT TO:`` is split into the path and its
ESMTP parameters by :func:`split_path`, then the path is parsed by
:func:`parse_mailbox` following RFC 5321 section 4.1.2 (``Path``,
``Mailbox``, ``Local-part``, ``Domain``, ``address-literal``) and the size
limits of section 4.5.3.1. Nothing here touches the network or the disk.

The server never hands a client address to a general e-mail header parser
(RFC 5322 allows comments and obsolete routes that silently change what an
address means); it parses the SMTP grammar itself and reports everything a
relay attacker could hide behind a local domain, as *tricks*:

``percent-hack``
    ``user%remote@local``: old sendmail rewrote this to ``user@remote``.
``bang-path``
    ``remote!user@local`` or ``remote!user``: UUCP routing.
``source-route``
    ``@local:user@remote`` (RFC 5321 section 4.1.1.3 and appendix C: a
    server SHOULD ignore the route; we report it so strangers are refused).
``quoted-local-part``
    ``"user@remote"@local``: a quoted local part that holds ``@``, ``%`` or
    ``!``.
``at-in-local-part``
    ``user@remote@local``: more than one unquoted ``@``.

Control characters (NUL, CR, LF, DEL, ...) anywhere in a path are never
accepted: :class:`AddressError` with reason ``control``.

Domains are compared in one canonical form (:func:`canonical_domain`): ASCII
lower case, one trailing dot removed, IDNA U-labels converted to A-labels and
``xn--`` labels checked to be valid A-labels (IDNA2008, RFC 5890/5891, via
the ``idna`` package). So ``EXAMPLE.com.``, ``xn--bcher-kva.example`` and
``bücher.example`` name the domains they name, no more and no less: full-width
letters, invalid Punycode or empty labels are not some other spelling of a
local domain, they are refused. Address literals (section 4.1.3) are
canonicalised as ``[192.0.2.1]`` and ``[IPv6:2001:db8::1]`` (RFC 5952 text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relaygate.addresses import parse_ip
from relaygate.errors import InvalidAddress

#: RFC 5321 4.5.3.1.3: a path is at most 256 octets including the angle brackets.
MAX_PATH_LENGTH = 256
#: RFC 5321 4.5.3.1.1: a local part is at most 64 octets.
MAX_LOCAL_PART_LENGTH = 64
#: RFC 5321 4.5.3.1.2 allows 255 octets; DNS names are at most 253 characters as text.
MAX_DOMAIN_LENGTH = 253
#: RFC 1035 2.3.4: labels are at most 63 octets.
MAX_LABEL_LENGTH = 63

TRICK_PERCENT = "percent-hack"
TRICK_BANG = "bang-path"
TRICK_ROUTE = "source-route"
TRICK_QUOTED = "quoted-local-part"
TRICK_AT = "at-in-local-part"

#: RFC 5322 atext: the characters of an unquoted local-part atom.
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


class AddressError(ValueError):
    """A path that is not an acceptable RFC 5321 address.

    ``reason`` is one of ``syntax``, ``control`` (a control character),
    ``too-long`` or ``domain`` (an invalid domain or address literal).
    The message is safe to log but is not meant for the client.
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class Mailbox:
    """A parsed path. ``local_part`` is unquoted (escapes removed).

    ``domain`` is canonical (see :func:`canonical_domain`) or ``None`` for an
    unqualified address such as ``<Postmaster>``. ``tricks`` names the relay
    tricks found (module docstring); ``route`` holds source-route domains as
    written.
    """

    local_part: str
    domain: str | None
    quoted: bool = False
    literal: bool = False
    route: tuple[str, ...] = ()
    tricks: frozenset[str] = frozenset()

    @property
    def null(self) -> bool:
        """True for the null reverse-path ``<>``."""
        return self.local_part == "" and self.domain is None

    @property
    def address(self) -> str:
        """The mailbox as RFC 5321 text (route dropped, local part quoted when needed)."""
        if self.null:
            return ""
        local = quote_local_part(self.local_part)
        return local if self.domain is None else f"{local}@{self.domain}"


def quote_local_part(local: str) -> str:
    """``local`` as a Dot-string when it is one, else as a Quoted-string."""
    if local and _is_dot_string(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _is_dot_string(s: str, utf8: bool = False) -> bool:
    # RFC 6531 3.3: with SMTPUTF8, any non-ASCII character is also atext.
    return all(
        atom and all(c in _ATEXT or (utf8 and not c.isascii()) for c in atom)
        for atom in s.split(".")
    )


def split_path(arg: str) -> tuple[str, str] | None:
    """Split a ``MAIL``/``RCPT`` argument (keyword removed) into path text and parameters.

    ``<path> PARAMS`` gives ``(path, PARAMS)`` without the brackets; ``<>``
    gives ``("", "")``. A bare ``user@domain`` (no brackets, which RFC 5321
    does not allow but old clients send) is taken up to the first space.
    Returns None when the brackets do not close.
    """
    s = arg.lstrip(" ")
    if not s.startswith("<"):
        path, _, rest = s.partition(" ")
        return path, rest.strip(" ")
    i, n = 1, len(s)
    in_quote = False
    while i < n:
        c = s[i]
        if in_quote:
            if c == "\\":
                i += 1
            elif c == '"':
                in_quote = False
        elif c == '"':
            in_quote = True
        elif c == ">":
            rest = s[i + 1 :]
            if rest and not rest.startswith(" "):
                return None
            return s[1:i], rest.strip(" ")
        i += 1
    return None


def parse_mailbox(path: str | bytes, *, allow_utf8: bool = False) -> Mailbox:
    """Parse the text between ``<`` and ``>`` of an RFC 5321 path.

    ``""`` is the null path. Raises :class:`AddressError` for anything that
    is not an address; relay tricks do not raise, they are reported in
    :attr:`Mailbox.tricks` so the caller decides by who is asking.
    """
    text = _text(path, allow_utf8)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise AddressError("control", "control character in address")
    if len(text) + 2 > MAX_PATH_LENGTH:
        raise AddressError("too-long", f"path longer than {MAX_PATH_LENGTH} octets")
    if text == "":
        return Mailbox("", None)
    tricks: set[str] = set()
    route: tuple[str, ...] = ()
    if text.startswith("@"):
        head, sep, text = text.partition(":")
        if not sep:
            raise AddressError("syntax", "source route without a mailbox")
        route = tuple(_route_domains(head))
        tricks.add(TRICK_ROUTE)
    quoted = text.startswith('"')
    if quoted:
        local, rest = _quoted_string(text)
        if rest and not rest.startswith("@"):
            raise AddressError("syntax", "text after a quoted local part")
        domain_text = rest[1:] if rest else None
        if any(c in local for c in "@%!"):
            tricks.add(TRICK_QUOTED)
    else:
        at = text.rfind("@")
        local, domain_text = (text, None) if at < 0 else (text[:at], text[at + 1 :])
        if "@" in local:
            tricks.add(TRICK_AT)
        else:
            if not _is_dot_string(local, allow_utf8):
                raise AddressError("syntax", "local part is not a dot-string")
            if "%" in local:
                tricks.add(TRICK_PERCENT)
            if "!" in local:
                tricks.add(TRICK_BANG)
    if not local and not quoted:
        raise AddressError("syntax", "empty local part")
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL_PART_LENGTH:
        raise AddressError("too-long", f"local part longer than {MAX_LOCAL_PART_LENGTH} octets")
    domain: str | None = None
    literal = False
    if domain_text is not None:
        if domain_text == "":
            raise AddressError("syntax", "empty domain")
        literal = domain_text.startswith("[")
        domain = canonical_domain(domain_text)
    return Mailbox(local, domain, quoted, literal, route, frozenset(tricks))


def _text(value: str | bytes, allow_utf8: bool) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8" if allow_utf8 else "ascii")
        except UnicodeDecodeError:
            raise AddressError("syntax", "address is not valid text") from None
    if not allow_utf8 and not value.isascii():
        raise AddressError("syntax", "non-ASCII address without SMTPUTF8")
    if allow_utf8:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise AddressError("syntax", "address is not valid UTF-8") from None
    return value


def _route_domains(head: str) -> list[str]:
    # A-d-l = At-domain *( "," At-domain ); At-domain = "@" Domain
    out = []
    for part in head.split(","):
        if not part.startswith("@") or len(part) < 2:
            raise AddressError("syntax", "bad source route")
        out.append(canonical_domain(part[1:]))
    return out


def _quoted_string(text: str) -> tuple[str, str]:
    """Parse ``"..."`` at the start of ``text``; return (content, rest)."""
    out: list[str] = []
    i, n = 1, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n:
                break
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), text[i + 1 :]
        out.append(c)
        i += 1
    raise AddressError("syntax", "unterminated quoted local part")


def canonical_domain(text: str) -> str:
    """The one canonical spelling of a domain or address literal (see module docstring).

    Raises :class:`AddressError` (reason ``domain``) for anything else.
    """
    if text.startswith("["):
        return canonical_literal(text)
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > MAX_DOMAIN_LENGTH:
        raise AddressError("domain", "empty or overlong domain")
    labels = name.split(".")
    out = [_canonical_label(label) for label in labels]
    result = ".".join(out)
    if len(result) > MAX_DOMAIN_LENGTH:
        raise AddressError("domain", "domain too long after IDNA conversion")
    return result


def canonical_address(address: str) -> str:
    """``address`` with its domain in the canonical spelling (case, trailing dot,
    IDNA); the local part is kept as written. Returned unchanged when it has no
    ``@`` or its domain is not valid."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address
    try:
        return f"{local}@{canonical_domain(domain)}"
    except AddressError:
        return address


def _canonical_label(label: str) -> str:
    if not label or len(label) > MAX_LABEL_LENGTH * 4:
        raise AddressError("domain", "empty or overlong label")
    if label.isascii():
        low = label.lower()
        if not _LDH_LABEL.match(low):
            raise AddressError("domain", "label is not letters, digits and hyphens")
        if low.startswith("xn--"):
            _check_alabel(low)
        return low
    return _to_alabel(label)


def _check_alabel(label: str) -> None:
    import idna  # imported on first use: its tables cost start-up time

    try:
        ulabel = idna.ulabel(label)
        back = idna.alabel(ulabel).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        raise AddressError("domain", "invalid A-label") from None
    if back != label:
        raise AddressError("domain", "A-label is not in canonical form")


def _to_alabel(label: str) -> str:
    import idna

    try:
        # Lower case first: IDNA2008 disallows upper-case code points, and
        # domain case is not significant (RFC 5321 2.4).
        out = idna.alabel(label.lower()).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        raise AddressError("domain", "invalid U-label") from None
    if len(out) > MAX_LABEL_LENGTH:
        raise AddressError("domain", "label too long after IDNA conversion")
    return out


def canonical_literal(text: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:<RFC 5952>]`` for an RFC 5321 4.1.3 address literal."""
    if not (text.startswith("[") and text.endswith("]")) or len(text) < 3:
        raise AddressError("domain", "unterminated address literal")
    inner = text[1:-1]
    tag, colon, value = inner.partition(":")
    if colon:
        if tag.lower() != "ipv6":
            # General-address-literal: no standardized tags besides IPv6.
            raise AddressError("domain", "unsupported address literal tag")
    elif not re.fullmatch(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}", inner):
        raise AddressError("domain", "bad IPv4 address literal")
    else:
        value = inner
    try:
        canonical = parse_ip(value)
    except InvalidAddress:
        raise AddressError("domain", "bad address literal") from None
    if colon and ":" in canonical:
        return f"[IPv6:{canonical}]"
    return f"[{canonical}]"
