"""``relaygate tcpserver``: ucspi-tcp's tcpserver, with the relay decision built in.

Theory of operation
-------------------
A qmail SMTP service is ``tcpserver -x smtp.cdb ... 0 smtp qmail-smtpd``:
tcpserver accepts each connection, looks the client up in its rules, sets the
UCSPI-TCP environment (``PROTO``, ``TCPREMOTEIP``, ``TCPREMOTEPORT``,
``TCPLOCALIP``, ``TCPLOCALPORT``, ``TCPLOCALHOST``, plus the rule's
variables) and runs the program with the connection on descriptors 0 and 1.
POP-before-SMTP then costs a second program per connection
(``relay-ctrl-check``: a Python start-up, or 0.7 ms for the C one).

This server takes tcpserver's command line as qmail run scripts use it and
makes the relay decision in-process, asking :class:`RelayControl` (the spool,
SQLite or Redis store) when no rule set ``RELAYCLIENT`` already: when the
client's window is open the program gets ``RELAYCLIENT`` (the rule's value or
``$RELAY_CTRL_RELAYCLIENT``) and the window's ``USER``/``DOMAIN``. A store
failure means no ``RELAYCLIENT`` and a warning (fail closed); the program
still runs, so local mail still arrives.

Process model, chosen for speed: one process, no asyncio. A selector waits
on the listeners and on a self-pipe written by the SIGCHLD handler
(``signal.set_wakeup_fd``); each ready listener is drained with non-blocking
``accept``; each connection becomes a child through ``posix_spawn`` (glibc
uses ``clone(CLONE_VM|CLONE_VFORK)``: no page tables copied), with
``dup2(conn, 0)``, ``dup2(conn, 1)`` as spawn file actions and SIGPIPE/SIGXFSZ
back to their defaults (CPython ignores them; qmail-smtpd must not inherit
that). Children are reaped with ``waitpid(WNOHANG)`` after each wake-up.
With ``-c LIMIT`` children running, the listeners are dropped from the
selector until one exits, as tcpserver does.

Rules (``-x FILE``) are tcpserver's: a ``.cdb`` built by ``tcprules`` (read
here with a small cdb reader; keys are the address, its prefixes ending in
``.`` or ``:``, then the empty default key; values are ``D`` for deny and
``+VAR=value`` entries, each NUL-terminated) or a rules text file (relaygate's
tcprules syntax with CIDR, :mod:`relaygate.rules`). The file is re-read when
it changes (tcprules replaces it atomically), and a rules file that cannot be
read drops the connection, as tcpserver does (``-X`` allows a missing one).

PROXY protocol (``--trusted-proxy``, ``trusted_proxies``): a connection from a
trusted proxy is not handed over at once: its descriptor joins the selector until
its v1 or v2 header is complete (read with ``MSG_PEEK``, so not a byte of the
client's data is taken), then the header's source address is ``TCPREMOTEIP`` and
``TCPREMOTEPORT`` and the address the rules and the relay decision look at. A
proxy that sends no valid header within ``proxy_timeout`` seconds, or garbage, is
dropped with a warning; a v2 LOCAL header (a health check) is the proxy's own
connection. Waiting connections count against ``-c``; no blocking read ever holds
up the accept loop. Connections from other addresses are handed over as before:
a header they send is the program's input, never believed.

Not done: host-name (``-h``/``-p``) and ident (``-r``) look-ups. They cost
DNS round trips per connection and qmail run scripts turn them off with
``-H -R``; the flags are accepted, ``TCPREMOTEHOST``/``TCPREMOTEINFO`` stay
unset and ``=host`` rules never match.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from relaygate.addresses import parse_ip
from relaygate.control import RelayControl
from relaygate.decision import Verdict
from relaygate.errors import ConfigError, InvalidAddress, RelaygateError
from relaygate.networks import Networks
from relaygate.protocols.proxy import MAX_HEADER_LENGTH, ProxyHeaderError, header_part
from relaygate.rules import RuleSet

#: tcpserver's default limit on simultaneous children (-c).
DEFAULT_LIMIT = 40
#: tcpserver's default listen backlog (-b).
DEFAULT_BACKLOG = 20
#: Seconds before replacing a worker that failed (a crash loop must not spin).
WORKER_RESTART_DELAY = 1.0
#: Worker processes by default: posix_spawn blocks its caller until the child
#: execs, so a second worker accepts meanwhile; more than the CPUs gains nothing.
DEFAULT_WORKERS = max(2, min(4, os.cpu_count() or 1))
#: Connections accepted from one listener per wake-up before looking at the others.
ACCEPT_BATCH = 64
#: A rules file larger than this is not a rules file (read whole into memory).
MAX_RULES_BYTES = 64 * 1024 * 1024
#: Variables tcpserver sets or clears for every connection.
UCSPI_VARS = (
    "PROTO", "TCPLOCALHOST", "TCPLOCALIP", "TCPLOCALPORT", "TCPREMOTEHOST",
    "TCPREMOTEINFO", "TCPREMOTEIP", "TCPREMOTEPORT",
    "TCP6LOCALIP", "TCP6LOCALPORT", "TCP6REMOTEIP", "TCP6REMOTEPORT",
)
#: CPython ignores these at start-up; the programs we run get the default back.
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
#: Longest part of a client-controlled value shown in a log line.
MAX_LOGGED = 100


class RulesUnavailable(RelaygateError):
    """The rules file could not be read; tcpserver drops the connection."""


# -- cdb (D. J. Bernstein's constant database), read-only ----------------------------


def cdb_hash(key: bytes) -> int:
    """cdb's hash: h = 5381; h = ((h << 5) + h) ^ c, 32 bits."""
    h = 5381
    for c in key:
        h = (((h << 5) + h) & 0xFFFFFFFF) ^ c
    return h


def cdb_get(data: bytes, key: bytes) -> bytes | None:
    """The first value stored under ``key`` in a cdb image, or None.

    Layout: 256 (position, slots) pairs of little-endian uint32 at the start;
    records (klen, dlen, key, data); then hash tables of (hash, record
    position) slots, probed linearly from ``(h >> 8) % slots``. A corrupt
    image raises RulesUnavailable.
    """
    try:
        h = cdb_hash(key)
        table, slots = struct.unpack_from("<II", data, (h & 255) * 8)
        if slots == 0:
            return None
        start = (h >> 8) % slots
        for i in range(slots):
            slot_hash, record = struct.unpack_from("<II", data, table + ((start + i) % slots) * 8)
            if record == 0:
                return None
            if slot_hash != h:
                continue
            klen, dlen = struct.unpack_from("<II", data, record)
            begin = record + 8
            if data[begin : begin + klen] == key:
                value = data[begin + klen : begin + klen + dlen]
                if len(value) != dlen:
                    raise RulesUnavailable("truncated cdb record")
                return value
        return None
    except struct.error:
        raise RulesUnavailable("corrupt cdb file") from None


def decode_instructions(value: bytes) -> tuple[bool, dict[str, str]]:
    """tcprules' encoded instructions: (deny, variables), parsed as tcpserver does.

    Each entry is NUL-terminated: ``D`` denies, ``+NAME=value`` sets a
    variable; anything else (and an unterminated tail) is ignored.
    """
    deny = False
    env: dict[str, str] = {}
    entries = value.split(b"\0")
    entries.pop()
    for entry in entries:
        if entry[:1] == b"D":
            deny = True
        elif entry[:1] == b"+":
            name, sep, val = entry[1:].partition(b"=")
            if sep and name:
                env[os.fsdecode(name)] = os.fsdecode(val)
    return deny, env


def cdb_keys(ip: str) -> list[bytes]:
    """tcpserver's lookup order without host names: the address, its prefixes
    ending at a ``.`` (or ``:`` for IPv6), longest first, then the empty key."""
    raw = ip.encode("ascii")
    keys = [raw]
    for i in range(len(raw) - 1, 0, -1):
        if raw[i - 1] in (0x2E, 0x3A):  # '.' ':'
            keys.append(raw[:i])
    keys.append(b"")
    return keys


# -- rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleHit:
    """What the rules say about one client: refuse it, and the variables to set."""

    deny: bool
    env: dict[str, str] = field(default_factory=dict)
    #: the key or line that matched, for the log
    name: str = ""


NO_RULE = RuleHit(False, {}, "")


class ConnectionRules:
    """tcpserver's ``-x`` rules: a tcprules cdb or a rules text file, reloaded on change."""

    def __init__(self, path: str, *, allow_missing: bool = False) -> None:
        self.path = path
        self.allow_missing = allow_missing
        self.is_cdb = path.endswith(".cdb")
        self._identity: tuple[int, int, int, int] | None = None
        self._cdb = b""
        self._text: RuleSet | None = None
        self._missing = False

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if not self.allow_missing:
                raise RulesUnavailable(f"unable to read {self.path}: file does not exist") from None
            self._missing = True
            self._identity = None
            return
        except OSError as exc:
            raise RulesUnavailable(f"unable to read {self.path}: {exc.strerror}") from None
        identity = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if identity == self._identity:
            return
        if st.st_size > MAX_RULES_BYTES:
            raise RulesUnavailable(f"unable to read {self.path}: larger than {MAX_RULES_BYTES}")
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_RULES_BYTES + 1)
        except OSError as exc:
            raise RulesUnavailable(f"unable to read {self.path}: {exc.strerror}") from None
        if self.is_cdb:
            if len(data) < 2048:
                raise RulesUnavailable(f"unable to read {self.path}: not a cdb file")
            self._cdb = data
        else:
            try:
                self._text = RuleSet.parse(data.decode("utf-8"), self.path)
            except (UnicodeDecodeError, ConfigError) as exc:
                raise RulesUnavailable(f"unable to read {self.path}: {exc}") from None
        self._missing = False
        self._identity = identity

    def lookup(self, ip: str) -> RuleHit:
        """The rule for a canonical address (NO_RULE when none applies)."""
        self._refresh()
        if self._missing:
            return NO_RULE
        if self.is_cdb:
            for key in cdb_keys(ip):
                value = cdb_get(self._cdb, key)
                if value is not None:
                    deny, env = decode_instructions(value)
                    return RuleHit(deny, env, key.decode("ascii"))
            return NO_RULE
        assert self._text is not None
        rule = self._text.match(ip)
        if rule is None:
            return NO_RULE
        return RuleHit(not rule.allow, dict(rule.env), rule.describe())


# -- the server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Listener:
    sock: socket.socket
    family: int
    #: the bound address, or None for a wildcard (then asked per connection)
    local_ip: str | None
    local_port: str


@dataclass
class TcpServerOptions:
    """tcpserver's command line (see ``relaygate tcpserver --help``)."""

    host: str
    port: str
    argv: list[str]
    limit: int = DEFAULT_LIMIT
    backlog: int = DEFAULT_BACKLOG
    rules: str | None = None
    allow_missing_rules: bool = False
    uid: int | None = None
    gid: int | None = None
    verbosity: int = 1
    local_host: str | None = None
    banner: bytes = b""
    nodelay: bool = False
    print_port: bool = False
    relay: bool = True
    #: PROXY protocol: connections from these must start with a header naming the client
    trusted_proxies: Networks = field(default_factory=Networks)
    #: seconds such a connection has to complete its header
    proxy_timeout: float = 5.0


@dataclass
class _Pending:
    """A connection from a trusted proxy whose PROXY header is not complete yet."""

    peer: tuple[str, int]
    listener: _Listener
    deadline: float
    seen: bytearray = field(default_factory=bytearray)


def resolve_program(name: str, path: str) -> str:
    """The file ``execvp`` would run for ``name`` (looked up once, at start)."""
    if "/" in name:
        if os.path.isfile(name) and os.access(name, os.X_OK):
            return name
        why = "no such program" if not os.path.exists(name) else "not an executable file"
        raise ConfigError(why, value=name)
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError("program not found in $PATH", value=name)


def listen_addresses(host: str, port: str) -> list[tuple[int, str, int, bool]]:
    """(family, address, port, dual_stack) to bind for tcpserver's host and port.

    ``0`` is every IPv4 address; ``::`` (or ``0::0``) every IPv6 address and,
    when it is the only one, IPv4 too (dual stack); a comma-separated list binds
    each; a name is resolved. The port is a number or a service name (``smtp``).
    """
    if port.isdigit():
        number = int(port)
    else:
        try:
            number = socket.getservbyname(port, "tcp")
        except OSError:
            raise ConfigError("unknown port or service name", value=port) from None
    if not 0 <= number <= 65535:
        raise ConfigError("port out of range", value=port)
    hosts = [h for h in host.split(",") if h]
    if not hosts:
        raise ConfigError("no host to listen on", value=host)
    out: list[tuple[int, str, int, bool]] = []
    for h in hosts:
        if h == "0":
            out.append((socket.AF_INET, "0.0.0.0", number, False))
            continue
        try:
            addr = parse_ip(h)
        except InvalidAddress:
            try:
                infos = socket.getaddrinfo(h, number, type=socket.SOCK_STREAM)
            except OSError:
                raise ConfigError("cannot resolve host", value=h) from None
            for family, _, _, _, sockaddr in infos:
                out.append((family, str(sockaddr[0]), number, False))
            continue
        if ":" in addr:
            out.append((socket.AF_INET6, addr, number, addr == "::" and len(hosts) == 1))
        else:  # IPv4, including ::ffff:a.b.c.d (folded by parse_ip)
            out.append((socket.AF_INET, addr, number, False))
    return out


class TcpServer:
    """Accept, decide, spawn (see the module docstring)."""

    def __init__(
        self,
        options: TcpServerOptions,
        *,
        control: RelayControl | None,
        environ: Mapping[str, str],
        write: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self.control = control if options.relay else None
        self.rules = (
            ConnectionRules(options.rules, allow_missing=options.allow_missing_rules)
            if options.rules else None
        )
        base = {k: v for k, v in environ.items() if k not in UCSPI_VARS}
        base["PROTO"] = "TCP"
        if options.local_host is not None:
            base["TCPLOCALHOST"] = options.local_host
        self._base_env = base
        self.program = resolve_program(options.argv[0], environ.get("PATH", os.defpath))
        self._write = write or _stderr
        self.listeners: list[_Listener] = []
        self.children: dict[int, str] = {}
        self._stopping = False
        self._exclusive = False
        self._workers: dict[int, int] = {}  # supervisor only: worker pid -> its share of -c
        self._wake_r = -1
        self._wake_w = -1
        #: connections from trusted proxies waiting for their header, by descriptor
        self._pending: dict[int, _Pending] = {}
        self._poller: _Poller | None = None

    # -- logging -------------------------------------------------------------------

    def log(self, level: int, text: str) -> None:
        """tcpserver's log lines: level 1 warnings and errors, level 2 with -v."""
        if self.options.verbosity >= level:
            self._write(f"tcpserver: {text}\n")

    def status(self) -> None:
        self.log(2, f"status: {len(self.children)}/{self.options.limit}")

    # -- set-up -----------------------------------------------------------------------

    def bind(self) -> list[int]:
        """Create the listeners; returns the bound ports (useful with port 0)."""
        ports = []
        for family, address, port, dual in listen_addresses(self.options.host, self.options.port):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
                sock.bind((address, port))
                sock.listen(self.options.backlog)
            except OSError as exc:
                sock.close()
                raise ConfigError(f"unable to bind: {exc.strerror}",
                                  value=f"{address} port {port}") from None
            sock.setblocking(False)
            bound = sock.getsockname()
            fixed = None if address in ("0.0.0.0", "::") else parse_ip(bound[0])
            self.listeners.append(_Listener(sock, family, fixed, str(bound[1])))
            ports.append(int(bound[1]))
        return ports

    def drop_privileges(self) -> None:
        """tcpserver's -g/-u: switch group, then user, after binding."""
        gid, uid = self.options.gid, self.options.uid
        if gid is not None:
            if os.geteuid() == 0:
                os.setgroups([gid])
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)

    # -- the loop ---------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to end (signal-safe: it only sets a flag and wakes the loop)."""
        self._stopping = True
        for pid in self._workers:  # the supervisor passes it on (os.wait is not interrupted)
            _kill(pid, signal.SIGTERM)
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def serve_forever(self) -> None:
        """Accept and spawn in this process until :meth:`stop` (SIGTERM/SIGINT)."""
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        old_chld = signal.signal(signal.SIGCHLD, _on_sigchld)
        poller = self._poller = _Poller(exclusive=self._exclusive)
        poller.add(self._wake_r)
        by_fd = {listener.sock.fileno(): listener for listener in self.listeners}
        registered = False
        self.status()
        try:
            while not self._stopping:
                self.reap()
                busy = len(self.children) + len(self._pending)
                want = busy < self.options.limit
                if want != registered:
                    for fd in by_fd:
                        if want:
                            poller.add(fd)
                        else:
                            poller.remove(fd)
                    registered = want
                for fd in poller.wait(self._next_deadline()):
                    if fd == self._wake_r:
                        _drain(self._wake_r)
                    elif fd in self._pending:
                        self._proxy_ready(fd)
                    elif fd in by_fd and len(self.children) + len(self._pending) \
                            < self.options.limit:
                        self._accept(by_fd[fd])
                self._expire_pending()
        finally:
            for fd in list(self._pending):
                self._drop_pending(fd, None)
            self._poller = None
            poller.close()
            signal.signal(signal.SIGCHLD, old_chld)
            signal.set_wakeup_fd(old_wakeup)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
            for listener in self.listeners:
                listener.sock.close()

    def serve(self, workers: int = 1) -> None:
        """Serve with ``workers`` processes sharing the listeners (see the module docstring).

        ``posix_spawn`` blocks its caller until the child has reached ``exec``;
        with several workers one accepts while another waits. The ``-c`` limit
        is split between them, so the total never exceeds it. A worker that
        dies is replaced; SIGTERM/SIGINT (:meth:`stop`) stops them all.
        """
        workers = max(1, min(workers, self.options.limit))
        if workers == 1:
            self.serve_forever()
            return
        limit = self.options.limit
        shares = [limit // workers + (1 if i < limit % workers else 0) for i in range(workers)]
        running = self._workers
        self._exclusive = True
        try:
            while True:
                while not self._stopping and len(running) < workers:
                    share = shares[len(running)]
                    pid = self._start_worker(share)
                    running[pid] = share
                if self._stopping:
                    for pid in running:
                        _kill(pid, signal.SIGTERM)
                if not running:
                    return
                try:
                    pid, status = os.wait()
                except ChildProcessError:
                    return
                if running.pop(pid, None) is not None and not self._stopping:
                    code = os.waitstatus_to_exitcode(status)
                    self.log(1, f"warning: worker {pid} ended ({code}), starting another")
                    if code != 0:
                        time.sleep(WORKER_RESTART_DELAY)
        finally:
            for listener in self.listeners:
                listener.sock.close()

    def _start_worker(self, limit: int) -> int:
        pid = os.fork()
        if pid:
            return pid
        code = 0
        try:
            self.options.limit = limit
            self._stopping = False
            self._workers = {}
            self.children = {}
            signal.signal(signal.SIGTERM, lambda signum, frame: self.stop())
            signal.signal(signal.SIGINT, lambda signum, frame: self.stop())
            self.serve_forever()
        except BaseException as exc:  # a worker must never return into the supervisor's code
            self.log(1, f"warning: worker failed: {exc!r}")
            code = 111
        finally:
            os._exit(code)

    def reap(self) -> None:
        """Collect every child that has exited (tcpserver's "end" lines)."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            if self.children.pop(pid, None) is not None:
                code = os.waitstatus_to_exitcode(status)
                if code >= 0:
                    self.log(2, f"end {pid} status {code}")
                else:
                    self.log(2, f"end {pid} signal {-code}")
                self.status()

    def _accept(self, listener: _Listener) -> None:
        # (fd, peer) without building a socket object; socket.accept() is built on it
        accept = listener.sock._accept  # type: ignore[attr-defined]
        for _ in range(ACCEPT_BATCH):
            if len(self.children) + len(self._pending) >= self.options.limit:
                return
            try:
                fd, peer = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log(1, f"warning: unable to accept: {exc.strerror}")
                    return
                continue  # ECONNABORTED and the like: that client is gone
            if self.options.trusted_proxies and self._from_proxy(fd, peer, listener):
                continue
            try:
                self.handle(fd, peer, listener)
            finally:
                os.close(fd)

    # -- PROXY protocol ---------------------------------------------------------------

    def _from_proxy(self, fd: int, peer: tuple[str, int], listener: _Listener) -> bool:
        """Keep a connection from a trusted proxy until its header is in (True)."""
        try:
            ip = parse_ip(peer[0])
        except InvalidAddress:
            return False
        if ip not in self.options.trusted_proxies or self._poller is None:
            return False
        os.set_blocking(fd, False)
        self._pending[fd] = _Pending((ip, int(peer[1])), listener,
                                     time.monotonic() + self.options.proxy_timeout)
        self._poller.add(fd, listener=False)
        self._proxy_ready(fd)  # the header often came with the connection
        return True

    def _proxy_ready(self, fd: int) -> None:
        pending = self._pending[fd]
        sock = socket.socket(pending.listener.family, socket.SOCK_STREAM, 0, fd)
        try:
            chunk = sock.recv(MAX_HEADER_LENGTH - len(pending.seen), socket.MSG_PEEK)
            if not chunk:
                raise ProxyHeaderError("connection closed before the PROXY header ended")
            take, header = header_part(pending.seen, chunk)
            pending.seen += sock.recv(take)
        except (BlockingIOError, InterruptedError):
            return
        except ProxyHeaderError as exc:
            self._drop_pending(fd, exc.why)
            return
        except OSError as exc:
            self._drop_pending(fd, exc.strerror or str(exc))
            return
        finally:
            sock.detach()
        if header is None:
            return
        self._forget_pending(fd)
        try:
            if header.local or header.source is None:
                self.handle(fd, pending.peer, pending.listener)
            else:
                self.handle(fd, header.source, pending.listener)
        finally:
            os.close(fd)

    def _next_deadline(self) -> float | None:
        """Seconds until the first waiting header is due (None: nothing waits)."""
        if not self._pending:
            return None
        first = min(p.deadline for p in self._pending.values())
        return max(0.0, first - time.monotonic())

    def _expire_pending(self) -> None:
        now = time.monotonic()
        for fd, pending in list(self._pending.items()):
            if pending.deadline <= now:
                self._drop_pending(fd, f"no PROXY header within "
                                       f"{self.options.proxy_timeout:g}s")

    def _forget_pending(self, fd: int) -> _Pending:
        pending = self._pending.pop(fd)
        if self._poller is not None:
            self._poller.remove(fd)
        return pending

    def _drop_pending(self, fd: int, why: str | None) -> None:
        pending = self._forget_pending(fd)
        if why is not None:
            self.log(1, f"warning: dropping connection from proxy {pending.peer[0]}: {why}")
        os.close(fd)

    # -- one connection -------------------------------------------------------------

    def environment(
        self, fd: int, peer: tuple[str, int], listener: _Listener
    ) -> tuple[dict[str, str], str] | None:
        """The child's environment and the log description of one connection;
        None when the connection must be dropped (already logged)."""
        # The kernel's IPv4 text is already canonical; IPv6 (and mapped IPv4) is not.
        remote_ip = peer[0] if listener.family == socket.AF_INET else parse_ip(peer[0])
        remote_port = str(peer[1])
        local_ip, local_port = listener.local_ip, listener.local_port
        if local_ip is None:  # a wildcard listener: which of our addresses was it?
            sock = socket.socket(listener.family, socket.SOCK_STREAM, 0, fd)
            try:
                local = sock.getsockname()
            finally:
                sock.detach()
            local_ip = parse_ip(local[0])
        env = dict(self._base_env)
        if ":" in remote_ip:
            env["PROTO"] = "TCP6"
            env["TCP6REMOTEIP"] = remote_ip
            env["TCP6REMOTEPORT"] = remote_port
            env["TCP6LOCALIP"] = local_ip
            env["TCP6LOCALPORT"] = local_port
        env["TCPREMOTEIP"] = remote_ip
        env["TCPREMOTEPORT"] = remote_port
        env["TCPLOCALIP"] = local_ip
        env["TCPLOCALPORT"] = local_port
        who = f"{self.options.local_host or ''}:{local_ip}:{local_port} :{remote_ip}::{remote_port}"
        if self.rules is not None:
            try:
                hit = self.rules.lookup(remote_ip)
            except RulesUnavailable as exc:
                self.log(1, f"warning: dropping connection, {exc}")
                return None
            if hit.deny:
                self.log(2, f"deny {who}")
                return None
            env.update(hit.env)
        if self.control is not None and "RELAYCLIENT" not in env:
            self._decide(env, remote_ip)
        return env, who

    def _decide(self, env: dict[str, str], ip: str) -> None:
        assert self.control is not None
        try:
            decision = self.control.decide_canonical(ip)  # parsed once, in environment()
        except Exception as exc:  # a store bug must not take the listener down
            why = repr(exc)[:MAX_LOGGED]
            self.log(1, f"warning: not relaying for {ip}: relay check failed: {why}")
            return
        if decision.verdict is Verdict.ALLOW:
            env["RELAYCLIENT"] = decision.relayclient or ""
            if decision.user is not None:
                env["USER"] = decision.user
            if decision.domain is not None:
                env["DOMAIN"] = decision.domain
            if self.options.verbosity >= 2:
                self.log(2, f"relay {ip} allow: {decision.reason}")
        elif decision.verdict is Verdict.TEMPFAIL:
            self.log(1, f"warning: not relaying for {ip}: {decision.reason[:MAX_LOGGED]}")

    def handle(self, fd: int, peer: tuple[str, int], listener: _Listener) -> int | None:
        """Set up and spawn the program for one accepted connection; its pid or None."""
        try:
            if not os.get_blocking(fd):  # Linux never inherits O_NONBLOCK; BSDs do
                os.set_blocking(fd, True)
            if self.options.nodelay:
                sock = socket.socket(listener.family, socket.SOCK_STREAM, 0, fd)
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                finally:
                    sock.detach()
            prepared = self.environment(fd, peer, listener)
            if prepared is None:
                return None
            env, who = prepared
            banner = self.options.banner
            while banner:
                banner = banner[os.write(fd, banner):]
        except (OSError, InvalidAddress) as exc:
            self.log(1, f"warning: dropping connection: {exc}")
            return None
        try:
            pid = os.posix_spawn(
                self.program, self.options.argv, env,
                file_actions=[(os.POSIX_SPAWN_DUP2, fd, 0), (os.POSIX_SPAWN_DUP2, fd, 1)],
                setsigdef=RESET_SIGNALS,
            )
        except OSError as exc:
            self.log(1, f"warning: dropping connection, unable to run {self.program}: "
                        f"{exc.strerror}")
            return None
        self.children[pid] = env["TCPREMOTEIP"]
        if self.options.verbosity >= 2:
            self.log(2, f"pid {pid} from {env['TCPREMOTEIP']}")
            self.log(2, f"ok {pid} {who}")
            self.status()
        return pid


class _Poller:
    """epoll (EPOLLEXCLUSIVE for listeners shared by workers: one wakes, not all), else poll."""

    def __init__(self, *, exclusive: bool) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._poll = None if self._epoll is not None else select.poll()
        flags = select.POLLIN
        if self._epoll is not None:
            flags = select.EPOLLIN | (select.EPOLLEXCLUSIVE if exclusive else 0)
        self._flags = flags

    def add(self, fd: int, *, listener: bool = True) -> None:
        """Watch ``fd`` for input (a connection waiting for its PROXY header: not
        ``listener``, so never EPOLLEXCLUSIVE)."""
        if self._epoll is not None:
            self._epoll.register(fd, self._flags if listener else select.EPOLLIN)
        else:
            assert self._poll is not None
            self._poll.register(fd, self._flags)

    def remove(self, fd: int) -> None:
        if self._epoll is not None:
            self._epoll.unregister(fd)
        else:
            assert self._poll is not None
            self._poll.unregister(fd)

    def wait(self, timeout: float | None = None) -> list[int]:
        """Ready descriptors; at most ``timeout`` seconds (None: no limit)."""
        if self._epoll is not None:
            return [fd for fd, _ in self._epoll.poll(-1 if timeout is None else timeout)]
        assert self._poll is not None
        ms = None if timeout is None else max(1, int(timeout * 1000))
        return [fd for fd, _ in self._poll.poll(ms)]

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _on_sigchld(signum: int, frame: object) -> None:
    """Nothing to do here: set_wakeup_fd already woke the loop, which reaps."""


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _stderr(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
