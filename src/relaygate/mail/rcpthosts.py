"""Local domains: qmail's ``control/rcpthosts`` (+ ``morercpthosts``) and TOML ``domains``.

Theory of operation
-------------------
Mail to a domain listed here is accepted from anyone (RFC 5321 section 2.3.5:
the server is the destination); mail to any other domain is relaying and
needs a relay permission. The file format is qmail's (``qmail-smtpd(8)``,
``control/rcpthosts``): one domain a line; blank lines and lines starting
with ``#`` are ignored; trailing white space is dropped; a line
``.example.com`` matches every subdomain of ``example.com`` (not
``example.com`` itself, which needs its own line), exactly as qmail's
``rcpthosts.c`` looks up the domain and then each of its ``.suffix`` forms.
qmail keeps overflow entries in ``morercpthosts`` (compiled to a cdb); we
read the text file ``morercpthosts`` next to ``rcpthosts`` when it exists.
Address literals such as ``[192.0.2.1]`` may be listed too.

Every entry and every looked-up domain goes through
:func:`relaygate.protocols.smtp_address.canonical_domain`, so case,
one trailing dot and IDNA spellings (U-labels or ``xn--``) are one domain.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relaygate.errors import ConfigError
from relaygate.protocols.smtp_address import AddressError, canonical_domain

if TYPE_CHECKING:
    from relaygate.config import Settings

#: qmail's companion file for long lists, read next to ``rcpthosts``.
MORE_RCPTHOSTS = "morercpthosts"
#: lines longer than this are not domain names (a DNS name is at most 253 characters).
MAX_LINE = 1024


@dataclass(frozen=True)
class RcptHosts:
    """A set of local domains (exact) and subdomain suffixes (``.example.com`` lines)."""

    exact: frozenset[str] = frozenset()
    #: canonical parent domains whose *sub*domains are local
    parents: frozenset[str] = frozenset()
    #: the first exact domain, used to qualify ``<Postmaster>``
    primary: str | None = None
    sources: tuple[str, ...] = field(default=())

    def __contains__(self, domain: object) -> bool:
        """True when the canonical ``domain`` is local (see the module docstring)."""
        if not isinstance(domain, str):
            return False
        if domain in self.exact:
            return True
        if not self.parents or domain.startswith("["):
            return False
        rest = domain
        while True:
            _, dot, rest = rest.partition(".")
            if not dot:
                return False
            if rest in self.parents:
                return True

    def __len__(self) -> int:
        return len(self.exact) + len(self.parents)

    def is_local(self, domain: str) -> bool:
        """Canonicalise ``domain`` and test it; an invalid domain is not local."""
        try:
            return canonical_domain(domain) in self
        except AddressError:
            return False

    @classmethod
    def build(cls, domains: Iterable[str], files: Iterable[Path] = ()) -> RcptHosts:
        """Merge TOML/CLI ``domains`` with rcpthosts files (missing files are an error)."""
        exact: list[str] = []
        parents: set[str] = set()
        sources: list[str] = []
        for d in domains:
            _add(d, "setting domains", None, exact, parents)
        if exact or parents:
            sources.append("settings")
        for path in files:
            for lineno, line in _read_lines(path):
                _add(line, str(path), lineno, exact, parents)
            sources.append(str(path))
        return cls(frozenset(exact), frozenset(parents), exact[0] if exact else None,
                   tuple(sources))

    @classmethod
    def parse(cls, text: str, source: str = "<rcpthosts>") -> RcptHosts:
        exact: list[str] = []
        parents: set[str] = set()
        for lineno, line in _lines(text):
            _add(line, source, lineno, exact, parents)
        return cls(frozenset(exact), frozenset(parents), exact[0] if exact else None,
                   (source,))

    @classmethod
    def from_settings(cls, settings: Settings) -> RcptHosts:
        """Domains from ``settings.domains`` and ``settings.rcpthosts_file`` (+ morercpthosts).

        When neither names a domain, the host name is the one local domain
        (qmail's ``control/me`` default).
        """
        path = settings.rcpthosts_file
        files: list[Path] = []
        if path is not None:
            files.append(path)
            more = path.with_name(MORE_RCPTHOSTS)
            if path.name == "rcpthosts" and more.is_file():
                files.append(more)
        hosts = cls.build(settings.domains, files)
        if len(hosts) == 0:
            hosts = cls.build([settings.hostname or "localhost"])
        return hosts


def _add(raw: str, source: str, line: int | None, exact: list[str],
         parents: set[str]) -> None:
    text = raw.strip()
    try:
        if text.startswith("."):
            parents.add(canonical_domain(text[1:]))
        else:
            d = canonical_domain(text)
            if d not in exact:
                exact.append(d)
    except AddressError as exc:
        raise ConfigError(f"bad local domain ({exc.detail})", source=source, line=line,
                          value=raw) from None


def _read_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("rcpthosts file not found", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read rcpthosts file ({exc})", source=str(path)) from None
    return _lines(text, str(path))


def _lines(text: str, source: str = "<rcpthosts>") -> list[tuple[int, str]]:
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_LINE:
            raise ConfigError("line too long", source=source, line=lineno)
        out.append((lineno, line))
    return out


def addresses_outside(accounts: Iterable[Any], hosts: RcptHosts) -> dict[str, list[str]]:
    """Mailbox addresses whose domain is not local, by domain (sorted).

    Mail to such an address is not delivered to the mailbox: the SMTP server
    treats it as remote and relays it (for a client that may relay) to the
    domain's MX. That is the trap of running ``serve`` without ``--domain``:
    the host name becomes the one local domain.
    """
    out: dict[str, set[str]] = {}
    for account in accounts:
        for address in (account.primary_address, *account.addresses):
            domain = address.rpartition("@")[2]
            if domain and not hosts.is_local(domain):
                out.setdefault(domain.lower(), set()).add(address)
    return {d: sorted(a) for d, a in sorted(out.items())}


#: how many addresses the start-up warning names (the count says the rest)
_SHOWN_ADDRESSES = 3


def warn_addresses_outside(settings: Settings, directory: Any) -> dict[str, list[str]]:
    """Log one warning when the user database has addresses outside the local domains.

    Called by the SMTP servers at start-up; returns what it found (tests).
    """
    lister = getattr(directory, "list", None)
    if not callable(lister):
        return {}
    hosts = RcptHosts.from_settings(settings)
    found = addresses_outside(lister(), hosts)
    if found:
        import logging

        addresses = [a for group in found.values() for a in group]
        shown = ", ".join(addresses[:_SHOWN_ADDRESSES])
        more = len(addresses) - _SHOWN_ADDRESSES
        if more > 0:
            shown += f" and {more} more"
        local = ", ".join(sorted(hosts.exact | {f".{p}" for p in hosts.parents})) or "none"
        wanted = " ".join(f"--domain {d}" for d in found)
        logging.getLogger("relaygate.smtp").warning(
            "the user database has addresses outside the local domains (%s): %s; mail to "
            "them is not delivered here but relayed to their domain's MX; make them local "
            "with %s (or domains = [...] in the configuration, or an rcpthosts file)",
            local, shown, wanted)
    return found
