"""The relay-ctrl 3.x spool directory as a grant store, byte-compatible.

Theory of operation
-------------------
One file per open window, named by the client address (canonical form from
:func:`relaygate.addresses.parse_ip`; IPv6 in the RFC 5952 section 4
compressed form). The content is what ``relay-ctrl-allow`` writes::

    USER=<value>\\0DOMAIN=<value>\\0

each entry only when the value is set. The window opened at the file's
mtime and stays open while ``mtime + expiry >= now`` (relay-ctrl-check's
test), so relaygate and the original C programs can share one spool during a
migration. A grant whose TTL differs from the store's expiry is written with
an mtime of ``expires_at - expiry``, so every reader, C or Python, sees the
same expiry; its ``opened_at`` then reads back as that mtime. The spool keeps
no source: grants read back have ``source="qmail"``.

Writes go to a temporary ``.<sec>.<usec>:<pid>`` in the same directory, which
is then ``rename(2)``d over the address file, so a reader sees the old file or
the new one, never half of one. Files are mode 0600, or 0666 when the
directory was handed down as a descriptor (``$RELAY_CTRL_DIR_FD`` from
``relay-ctrl-chdir``), as relay-ctrl does; with a descriptor every call is
relative to it (``openat``, ``renameat``, ``unlinkat``...).

Reading trusts nothing in the file: at most :data:`MAX_FILE_BYTES` are read
(relay-ctrl-check's buffer), only complete NUL-terminated entries count, only
``USER`` and ``DOMAIN`` are ever taken (a planted ``LD_PRELOAD=`` or
``RELAYCLIENT=`` is ignored), and content that does not parse is a grant with
no user. Symlinks and other non-regular files are not grants.

This module is imported by the per-connection chain program
``relay-ctrl-check``, so it imports only ``os``, ``stat``, ``errno``, ``time``
and the dependency-free relaygate model modules; ``logging`` is imported only
on the path that warns about a world-writable spool.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from relaygate.addresses import parse_ip, require_canonical
from relaygate.errors import InvalidAddress, StoreError
from relaygate.grants import Grant

#: relay-ctrl-check reads one buffer of this size; anything beyond it is ignored.
MAX_FILE_BYTES = 8192

#: relay-ctrl's default window (seconds) when RELAY_CTRL_EXPIRY is unset.
DEFAULT_EXPIRY = 900.0

#: Spool files keep no source; this names the program family that wrote them.
SPOOL_SOURCE = "qmail"

#: Mode of a grant file: private to the owner, as relay-ctrl-allow makes it when setuid.
PRIVATE_MODE = 0o600

#: Mode under RELAY_CTRL_DIR_FD: the chain programs then run as different users,
#: without setuid, and must all read and replace each other's files (relay-ctrl does this).
SHARED_MODE = 0o666

#: Attempts at a fresh temporary name when two writers of one process hit the same microsecond.
TEMP_NAME_TRIES = 100

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC



def _to_ns(t: float) -> int:
    """Epoch seconds to integer nanoseconds without float error (t * 1e9 is off by ~100 ns)."""
    whole = int(t // 1)
    return whole * 1_000_000_000 + round((t - whole) * 1e9)


def _from_ns(ns: int) -> float:
    """Integer nanoseconds to epoch seconds, exact to the float (st_mtime is not)."""
    sec, frac = divmod(ns, 1_000_000_000)
    return sec + frac / 1e9


def _text(value: bytes) -> str | None:
    """A USER/DOMAIN value, or None when unset, empty, not UTF-8 or with control bytes."""
    if not value:
        return None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.isprintable():
        return None
    return text


def parse_content(data: bytes) -> tuple[str | None, str | None]:
    """(user, domain) from the bytes of a spool file, as relay-ctrl-check would see them.

    Only NUL-terminated ``NAME=VALUE`` entries within the first
    :data:`MAX_FILE_BYTES` count; a later entry overrides an earlier one (as
    ``putenv`` does); every name other than USER and DOMAIN is ignored.
    """
    user: str | None = None
    domain: str | None = None
    entries = data[:MAX_FILE_BYTES].split(b"\0")
    entries.pop()  # the part after the last NUL is unterminated: relay-ctrl drops it
    for entry in entries:
        name, sep, value = entry.partition(b"=")
        if not sep:
            continue
        if name == b"USER":
            user = _text(value)
        elif name == b"DOMAIN":
            domain = _text(value)
    return user, domain


def format_content(user: str | None, domain: str | None) -> bytes:
    """The bytes relay-ctrl-allow writes for ``$USER``/``$DOMAIN`` (each only when set)."""
    parts: list[bytes] = []
    for name, value in (("USER", user), ("DOMAIN", domain)):
        if value is None:
            continue
        raw = value.encode("utf-8")
        if b"\0" in raw:
            raise ValueError(f"{name} must not contain NUL: {value!r}")
        parts.append(name.encode("ascii") + b"=" + raw + b"\0")
    return b"".join(parts)


class SpoolStore:
    """Grants as files in a relay-ctrl spool directory (see the module docstring).

    ``path`` names the directory (and is used in messages); when ``dir_fd``
    is given (``$RELAY_CTRL_DIR_FD``) every operation is relative to that open
    descriptor instead and files default to mode 0666. ``file_mode`` overrides
    the mode of the files written. ``warn=False`` skips the world-writable
    check (a per-connection program need not log it a thousand times a day).
    """

    kind = "spool"

    def __init__(
        self,
        path: str | os.PathLike[str],
        expiry: float = DEFAULT_EXPIRY,
        dir_fd: int | None = None,
        file_mode: int | None = None,
        *,
        warn: bool = True,
    ) -> None:
        if expiry <= 0:
            raise ValueError("expiry must be positive")
        self.path = os.fspath(path)
        self.expiry = float(expiry)
        self._dir_fd = dir_fd
        # Names are opened relative to dir_fd, or by "<dir>/<name>" when there is none.
        self._prefix = "" if dir_fd is not None else os.path.join(self.path, "")
        if file_mode is None:
            file_mode = SHARED_MODE if dir_fd is not None else PRIVATE_MODE
        self.file_mode = file_mode
        if warn:
            self._warn_if_world_writable()

    # -- helpers -------------------------------------------------------------

    #: spool paths already warned about in this process (once is enough: serve and
    #: policyd open their store more than once, e.g. on reload)
    _warned: set[str] = set()

    def _warn_if_world_writable(self) -> None:
        try:
            st = os.stat(self._dir_fd) if self._dir_fd is not None else os.stat(self.path)
        except OSError:
            return  # a missing directory is reported by the first operation, as StoreError
        if not st.st_mode & stat.S_IWOTH or self.path in SpoolStore._warned:
            return
        SpoolStore._warned.add(self.path)
        import logging

        message = (f"spool directory {self.path} is world-writable (mode "
                   f"{stat.S_IMODE(st.st_mode):04o}): any local user can open relaying for "
                   "any address; make it 0700 (or 0750 with a shared group)")
        logger = logging.getLogger("relaygate.stores.spool")
        if logger.hasHandlers():
            logger.warning("%s", message)
        else:
            # No logging set up (an admin command, the Dovecot hook): say who speaks,
            # as every other message of these programs does.
            import sys

            program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
            if not program or program.endswith(".py"):
                program = "relaygate"
            sys.stderr.write(f"{program}: warning: {message}\n")

    def _error(self, what: str, exc: OSError) -> StoreError:
        return StoreError(f"spool {self.path}: {what}: {exc.strerror or exc}")

    def _check_dir(self) -> None:
        """Raise StoreError unless the spool directory is still there (a miss must not hide it)."""
        try:
            if self._dir_fd is not None:
                if os.fstat(self._dir_fd).st_nlink == 0:
                    raise StoreError(f"spool {self.path}: directory was removed")
            elif not stat.S_ISDIR(os.stat(self.path).st_mode):
                raise StoreError(f"spool {self.path}: not a directory")
        except OSError as exc:
            raise self._error("cannot reach the spool directory", exc) from None

    def _open_dir(self) -> int:
        """A descriptor of the directory for scans (dup of dir_fd, or a fresh open)."""
        try:
            if self._dir_fd is not None:
                return os.dup(self._dir_fd)
            return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error("cannot open the spool directory", exc) from None

    def _read(
        self, name: str, now: float, dfd: int | None, prefix: str, remove_expired: bool
    ) -> Grant | None:
        """The live grant in file ``name`` or None; raises OSError except for ENOENT/ELOOP."""
        try:
            fd = os.open(prefix + name, _READ_FLAGS, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP):
                # missing, or a symlink someone planted: not a grant
                return None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            mtime = _from_ns(st.st_mtime_ns)
            if mtime + self.expiry < now:
                if remove_expired:
                    self._unlink_if_same(name, st, dfd, prefix)
                return None
            data = os.read(fd, MAX_FILE_BYTES)
        finally:
            os.close(fd)
        user, domain = parse_content(data)
        return Grant(name, user, domain, SPOOL_SOURCE, mtime, mtime + self.expiry)

    @staticmethod
    def _unlink_if_same(name: str, st: os.stat_result, dfd: int | None, prefix: str) -> None:
        # Only remove the very file we judged expired: a writer may have renamed a
        # fresh grant into place since we opened it (relay-ctrl does not check this).
        try:
            now_st = os.stat(prefix + name, dir_fd=dfd, follow_symlinks=False)
            if (now_st.st_ino, now_st.st_dev) == (st.st_ino, st.st_dev):
                os.unlink(prefix + name, dir_fd=dfd)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # failing to clean up is not a failure to read: age() will retry

    def _temp_name(self) -> str:
        t = time.time()
        sec = int(t)
        return f".{sec}.{int((t - sec) * 1_000_000)}:{os.getpid()}"

    # -- GrantStore ------------------------------------------------------------

    def put(self, grant: Grant) -> None:
        """Write the grant's file: temp file, exact mode, mtime = expires_at - expiry, rename."""
        name = require_canonical(grant.ip)
        body = format_content(grant.user, grant.domain)
        mtime_ns = _to_ns(grant.expires_at - self.expiry)
        dfd = self._dir_fd
        prefix = self._prefix
        tmp = ""
        fd = -1
        try:
            for _ in range(TEMP_NAME_TRIES):
                tmp = self._temp_name()
                try:
                    fd = os.open(prefix + tmp, _WRITE_FLAGS, self.file_mode, dir_fd=dfd)
                    break
                except FileExistsError:
                    continue
            else:
                raise StoreError(f"spool {self.path}: no free temporary name")
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view) :]
                # the umask must not change the agreed mode (0600, or 0666 for RELAY_CTRL_DIR_FD)
                os.fchmod(fd, self.file_mode)
                os.utime(fd, ns=(time.time_ns(), mtime_ns))
            finally:
                os.close(fd)
            os.rename(prefix + tmp, prefix + name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            if fd >= 0:
                try:
                    os.unlink(prefix + tmp, dir_fd=dfd)
                except OSError:
                    pass
            raise self._error(f"cannot write grant for {name}", exc) from None

    def get(self, ip: str, now: float) -> Grant | None:
        name = require_canonical(ip)
        try:
            grant = self._read(name, now, self._dir_fd, self._prefix, remove_expired=True)
        except OSError as exc:
            raise self._error(f"cannot read grant for {name}", exc) from None
        if grant is None:
            self._check_dir()
        return grant

    def delete(self, ip: str) -> bool:
        name = require_canonical(ip)
        try:
            os.unlink(self._prefix + name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            self._check_dir()
            return False
        except OSError as exc:
            raise self._error(f"cannot delete grant for {name}", exc) from None
        return True

    def _scan(self) -> list[Grant]:
        """Every grant file with a canonical address name, live or expired (not deleted)."""
        dfd = self._open_dir()
        grants: list[Grant] = []
        try:
            with os.scandir(dfd) as it:
                names = [e.name for e in it if not e.name.startswith(".")]
            for name in names:
                try:
                    if parse_ip(name) != name:
                        continue
                except InvalidAddress:
                    continue  # not ours: leave foreign files alone
                # read with now=-inf so expired grants come back too (callers filter)
                grant = self._read(name, float("-inf"), dfd, "", remove_expired=False)
                if grant is not None:
                    grants.append(grant)
        except OSError as exc:
            raise self._error("cannot scan the spool", exc) from None
        finally:
            os.close(dfd)
        return grants

    def delete_user(self, user: str) -> int:
        """Remove every file whose USER is ``user`` (one scan of the spool)."""
        dfd = self._open_dir()
        removed = 0
        try:
            for grant in self._scan():
                if grant.user != user:
                    continue
                try:
                    os.unlink(grant.ip, dir_fd=dfd)
                    removed += 1
                except FileNotFoundError:
                    pass
        except OSError as exc:
            raise self._error(f"cannot delete grants of {user}", exc) from None
        finally:
            os.close(dfd)
        return removed

    def age(self, now: float) -> int:
        """Delete every regular file with ``mtime + expiry < now``, stale temp files included.

        Returns how many grant files (names not starting with '.') it removed.
        One ``getdents`` scan, one ``fstatat`` per entry and ``unlinkat`` per
        expired file, all relative to the directory descriptor, as
        ``find DIR -type f -mmin +N -delete`` does.
        """
        # expired <=> mtime + expiry < now <=> mtime_ns < (now - expiry) in ns
        cutoff_ns = _to_ns(now - self.expiry)
        dfd = self._open_dir()
        removed = 0
        unlink = os.unlink
        try:
            with os.scandir(dfd) as it:
                for entry in it:
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        if entry.stat(follow_symlinks=False).st_mtime_ns >= cutoff_ns:
                            continue
                        unlink(entry.name, dir_fd=dfd)
                    except FileNotFoundError:
                        continue  # another ager (or a reader) got there first
                    if entry.name[0] != ".":
                        removed += 1
        except OSError as exc:
            raise self._error("cannot age the spool", exc) from None
        finally:
            os.close(dfd)
        return removed

    def list(self, now: float) -> list[Grant]:
        live = [g for g in self._scan() if g.live(now)]
        live.sort(key=lambda g: (g.opened_at, g.ip))
        return live

    def close(self) -> None:
        """Nothing to release: the directory descriptor belongs to whoever handed it down."""
