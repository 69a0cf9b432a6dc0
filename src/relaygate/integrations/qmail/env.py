"""What every qmail chain program shares: messages, exec, relay-ctrl's environment.

Theory of operation
-------------------
The chain programs follow qmail's conventions (SECURITY, "do as little as
possible"; each program documents its descriptors, environment and exit
codes): they read their configuration from the environment that ``envdir``
and ``tcpserver`` set up, do one small thing, and ``execvp`` the rest of their
argument vector, so every descriptor they were given (the client socket on 0
and 1, Courier's pipe on 3, ``$RELAY_CTRL_DIR_FD``...) reaches the next
program untouched. Exit 111 means a temporary failure, 1 a usage error.

Messages go to standard error in relay-ctrl's format (bglibs' ``msg``)::

    relay-ctrl-check[1234]: IP 1.2.3.4 found, setting $RELAYCLIENT
    relay-ctrl-check[1234]: Warning: $TCPREMOTEIP not set, not checking IP
    relay-ctrl-allow[1234]: Fatal: Must be run from tcp-env or tcpserver.

so existing log filters keep working. Untrusted values (the client address,
names found in a spool file) are shown with control characters escaped and
cut to :data:`MAX_SHOWN` characters: nobody can forge a log line.

Start-up cost matters (``relay-ctrl-check`` runs per SMTP connection): this
module imports only ``os`` and ``sys``; stores other than the spool are
imported only when ``$RELAYGATE_STORE`` asks for them, and the manual pages
only for ``--help``. ``os.execvp`` is not used because it imports ``warnings``.
"""

from __future__ import annotations

import os
import sys

from relaygate.expiry import DEFAULT_EXPIRY, parse_expiry

# Not `from typing import ...`: typing costs milliseconds of start-up on every SMTP
# connection. mypy treats a module-level TYPE_CHECKING name like typing's.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import MutableMapping
    from typing import NoReturn

    from relaygate.stores.base import GrantStore

#: qmail's "temporary failure": the caller (tcpserver, qmail-popup) may retry.
EXIT_TEMPFAIL = 111
#: relay-ctrl's exit code for a missing program argument.
EXIT_USAGE = 1

#: relay-ctrl's UDP port (relay-ctrl-send, relay-ctrl-udp).
DEFAULT_PORT = 811

#: Longest untrusted value echoed into a log line (a full IPv6 address is 45).
MAX_SHOWN = 80

#: relay-ctrl-chdir moves the directory descriptor to the highest free number at or
#: below this, out of the way of 0-2 and of the low numbers Courier and
#: checkpassword use (3, 4...), and below the usual 1024 descriptor limit.
HIGH_FD = 255
#: ... and not below this one.
LOW_FD = 10

#: The only spool-file variables relay-ctrl-check passes on to the SMTP server.
EXPORTED = ("USER", "DOMAIN")


# -- messages ---------------------------------------------------------------------


def shown(value: str | bytes) -> str:
    """An untrusted value made safe for one log line (escaped, cut)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "backslashreplace")
    cut = len(value) > MAX_SHOWN
    out = []
    for ch in value[:MAX_SHOWN]:
        if ch.isprintable() and ch != "\\" and ord(ch) < 0xD800:
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
    return "".join(out) + ("..." if cut else "")


class Messages:
    """bglibs-style messages of one program: ``name[pid]: [Warning: |Fatal: ]text``."""

    def __init__(self, program: str, show_pid: bool = True) -> None:
        self.program = program
        self.show_pid = show_pid

    def _write(self, kind: str, text: str) -> None:
        head = f"{self.program}[{os.getpid()}]: " if self.show_pid else f"{self.program}: "
        line = f"{head}{kind}{text}\n".encode("utf-8", "backslashreplace")
        try:
            os.write(2, line)
        except OSError:
            pass  # no standard error: nothing better to do, and never a reason to fail

    def msg(self, text: str) -> None:
        self._write("", text)

    def warn(self, text: str) -> None:
        self._write("Warning: ", text)

    def die(self, code: int, text: str) -> NoReturn:
        self._write("Fatal: ", text)
        raise SystemExit(code)


# -- environment values -----------------------------------------------------------


def client_address(raw: str | None, say: Messages) -> str:
    """The canonical client address from ``$TCPREMOTEIP``, or exit 111.

    Unset or empty: relay-ctrl's own message (not run from tcpserver). Set but
    not an address (``../x``): says so and shows the value (escaped, cut).
    """
    from relaygate.addresses import parse_ip
    from relaygate.errors import InvalidAddress

    if not raw:
        say.die(EXIT_TEMPFAIL, "Must be run from tcp-env or tcpserver.")
    try:
        return parse_ip(raw)
    except InvalidAddress:
        say.die(EXIT_TEMPFAIL, f"Invalid $TCPREMOTEIP '{shown(raw)}': not an IPv4 or IPv6 "
                               "address.")


def expiry_from_env(env: MutableMapping[str, str]) -> int:
    """``$RELAY_CTRL_EXPIRY`` in seconds (relay-ctrl's 900 when unset).

    Raises ValueError with a one-line message naming the value when it is not a
    plain positive integer (see :mod:`relaygate.expiry`); the program decides
    what that means (check: every window closed; allow: nothing recorded).
    """
    value = env.get("RELAY_CTRL_EXPIRY")
    if value is None:
        return DEFAULT_EXPIRY
    try:
        return parse_expiry(value)
    except ValueError as exc:
        raise ValueError(f"$RELAY_CTRL_EXPIRY '{shown(value)}' {exc}") from None


def parse_port(value: str | None, default: int = DEFAULT_PORT) -> int:
    """relay-ctrl's ``atoi``-then-default reading of $RELAY_CTRL_PORT."""
    if value is None:
        return default
    text = value.strip()
    digits = 0
    while digits < len(text) and text[digits].isdigit() and text[digits].isascii():
        digits += 1
    port = int(text[:digits]) if digits else 0
    return port if 0 < port < 65536 else default


def parse_uint(value: str) -> int | None:
    """A plain unsigned decimal (a descriptor or a count), or None."""
    if not value or not value.isascii() or not value.isdigit() or len(value) > 9:
        return None
    return int(value)


def courier_authenticated(env: MutableMapping[str, str]) -> bool:
    """relay-ctrl's ``is_authenticated``: under Courier ($AUTHUSER and $AUTHARGV0 set)
    only a non-empty $AUTHENTICATED counts; otherwise the caller (checkpassword)
    runs us only after a successful login."""
    if "AUTHUSER" in env and "AUTHARGV0" in env:
        return bool(env.get("AUTHENTICATED"))
    return True


def wants_help(argv: list[str], program: str) -> None:
    """Print the manual page and exit 0 when ``--help`` is the first argument."""
    if len(argv) > 1 and argv[1] == "--help":
        from relaygate.integrations.qmail.manpages import page

        sys.stdout.write(page(program))
        sys.stdout.flush()
        raise SystemExit(0)


# -- exec -------------------------------------------------------------------------

#: What CPython sets $LC_CTYPE to when it coerces the C locale (PEP 538), in its order.
_COERCED_LOCALES = ("C.UTF-8", "C.utf8", "UTF-8")


def undo_locale_coercion(env: MutableMapping[str, str]) -> None:
    """Give the next program the locale we were given, not the one Python chose.

    Started in the C locale (``env -`` in a run script), CPython sets
    ``LC_CTYPE=C.UTF-8`` in its own environment (PEP 538), which ``exec`` would
    pass on to qmail-smtpd: a C program in its place passes nothing. The
    environment the kernel gave us is still in ``/proc/self/environ``; restore
    ``LC_CTYPE`` from it (or remove it). Without /proc nothing is changed.
    """
    if env.get("LC_CTYPE") not in _COERCED_LOCALES or "LC_ALL" in env:
        return
    try:
        fd = os.open("/proc/self/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:
        return
    finally:
        os.close(fd)
    original = None
    for entry in b"".join(chunks).split(b"\0"):
        if entry.startswith(b"LC_CTYPE="):
            original = entry[len(b"LC_CTYPE="):]
    if original is None:
        del env["LC_CTYPE"]
    else:
        env["LC_CTYPE"] = os.fsdecode(original)



def exec_next(argv: list[str], say: Messages) -> NoReturn:
    """``execvp`` argv (descriptors and environment are passed on); exit 111 on failure.

    The PATH search mirrors ``execvp(3)``: a name with a slash is run as is;
    otherwise each ``$PATH`` entry is tried, a permission error is remembered
    while later entries are tried, and the first other error stops the search.
    """
    name = argv[0]
    env = os.environ
    undo_locale_coercion(env)
    error: OSError | None = None
    if "/" in name:
        candidates = [name]
    else:
        path = env.get("PATH", os.defpath)
        candidates = [os.path.join(d or ".", name) for d in path.split(os.pathsep)]
    for candidate in candidates:
        try:
            os.execv(candidate, argv)  # noqa: S606 - chaining is the job: exec argv as given
        except OSError as exc:
            if exc.errno in (2, 20):  # ENOENT, ENOTDIR: try the next directory
                if error is None:
                    error = exc
                continue
            error = exc
            if exc.errno != 13:  # EACCES: keep looking, as execvp does
                break
    why = error.strerror if error is not None and error.strerror else "not found"
    say.die(EXIT_TEMPFAIL, f"execution of program failed!: {shown(name)}: {why}")


# -- the grant store ----------------------------------------------------------------


class StoreChoice:
    """Which store the environment names, and how to reach a spool directly."""

    def __init__(
        self, store: GrantStore, spool_path: str | None, dir_fd: int | None
    ) -> None:
        self.store = store
        #: the spool directory path (None for other stores or a bare descriptor)
        self.spool_path = spool_path
        #: $RELAY_CTRL_DIR_FD when the spool came as a descriptor
        self.dir_fd = dir_fd

    @property
    def is_spool(self) -> bool:
        return self.store.kind == "spool"


def open_store_from_env(
    env: MutableMapping[str, str], expiry: float, say: Messages
) -> StoreChoice | None:
    """The store the chain programs use, from their environment, or None (warned).

    ``$RELAYGATE_STORE`` (``sqlite:///...``, ``redis://...``, ``spool:///...``)
    wins; otherwise ``$RELAY_CTRL_DIR_FD`` (a directory descriptor handed down
    by ``relay-ctrl-chdir``), otherwise ``$RELAY_CTRL_DIR``, as relay-ctrl's
    ``do_chdir`` does. Raises StoreError/ConfigError for a store that cannot be
    opened; the caller decides what that means (check: no relaying).
    """
    url = env.get("RELAYGATE_STORE")
    if url:
        if not url.startswith(("spool:", "sqlite:", "memory:")):
            with_site_packages()  # the Redis client lives there; -S left it off sys.path
        from relaygate.stores import open_store

        return StoreChoice(open_store(url, expiry=float(expiry)), None, None)
    from relaygate.stores.spool import SpoolStore

    fd_text = env.get("RELAY_CTRL_DIR_FD")
    if fd_text is not None:
        fd = parse_uint(fd_text)
        if fd is None:
            say.warn("Invalid value for $RELAY_CTRL_DIR_FD")
            return None
        path = env.get("RELAY_CTRL_DIR") or f"(descriptor {fd})"
        store = SpoolStore(path, float(expiry), dir_fd=fd, warn=False)
        return StoreChoice(store, None, fd)
    directory = env.get("RELAY_CTRL_DIR")
    if directory is None:
        say.warn("$RELAY_CTRL_DIR is not set")
        return None
    return StoreChoice(SpoolStore(directory, float(expiry), warn=False), directory, None)


def with_site_packages() -> None:
    """Put site-packages on sys.path (the scripts run with -S), once, when needed."""
    if "site" not in sys.modules:
        import site

        site.main()


def close_dir_fd(choice: StoreChoice | None) -> None:
    """Close $RELAY_CTRL_DIR_FD before exec, as relay-ctrl does after its fchdir:
    the SMTP or POP server never gets a handle on the spool."""
    if choice is not None and choice.dir_fd is not None and choice.dir_fd > 2:
        try:
            os.close(choice.dir_fd)
        except OSError:
            pass
