"""``relaygate serve``: every service in one process and one asyncio loop.

Theory of operation
-------------------
Start-up follows qmail's "do as little as possible as root":

1. check every listener address and resolve ``--user``/``--group``
   (as root without ``--user``, serve refuses to start; ``--user root`` is the
   explicit, discouraged way to stay root);
2. create the data directory (0700) and give it to the service user; take
   ``relaygate.lock`` with ``flock`` (held for the process's life, so a second
   serve on the same data directory is refused with the first one's pid);
3. load the TLS certificate into ONE ``ssl.SSLContext``
   (``ctx.ssl_context``), which every TLS listener shares, so a
   SIGHUP reload reaches them all;
4. with the *effective* uid/gid of the service user, open the grant store,
   the user directory and the queue, and build the services, so every file
   they create belongs to that user;
5. back as root, start the services (they bind their sockets, ports below
   1024 included), then drop privileges for good: ``setgroups([])``,
   ``setgid``, ``setuid``, and check that root cannot be regained.

Start, signals and stop are :class:`relaygate.servers.runtime.Runtime`'s, the
lifecycle every service command shares. Then it runs the aging loop (every ``age_interval`` seconds,
``RelayControl.age`` in a thread; a store failure is logged, never fatal),
rewrites ``status.json`` every few seconds for ``relaygate status``, and
answers signals:

- SIGHUP: reload the rules file, the TLS certificate and key (into the shared
  SSLContext: new handshakes use the new certificate), the user directory and
  any service that has ``reload()``. A bad file is logged and the old one kept;
- SIGTERM/SIGINT: every service stops accepting and gets ``shutdown_grace``
  seconds to finish the transactions in flight (a message acknowledged with
  250 is already on disk), then serve exits 0. A second signal stops at once.

Relaying fails closed whenever the store fails (``RelayControl.decide``
answers TEMPFAIL); nothing in this loop lets a store error end the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import importlib
import inspect
import logging
import os
import pwd
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relaygate.config import Settings
from relaygate.context import Context
from relaygate.errors import RelaygateError, StoreError
from relaygate.interfaces import Service
from relaygate.log import configure_logging, event
from relaygate.metrics import Metrics
from relaygate.runtime import build_control
from relaygate.servers.listeners import (
    parse_listen,
    resolves_to_loopback,
    server_tls_context,
)
from relaygate.servers.runtime import Runtime, StartError, addresses
from relaygate.status import (
    LOCK_FILE,
    STATUS_INTERVAL,
    ErrorRing,
    lock_holder,
    queue_summary,
    write_status,
)
from relaygate.stores import redact_url

log = logging.getLogger("relaygate.serve")

#: a service factory: takes the Context, returns one Service or a list of them
Factory = Callable[[Context], Any]

#: seconds between "status file cannot be written" warnings (no log flood)
STATUS_WARN_EVERY = 60.0
#: seconds between queue gauge refreshes (Queue.stats reads every envelope)
QUEUE_STATS_INTERVAL = 10.0
#: how deep serve looks for root-owned files to hand to the service user at start
#: (data dir, store files, users.db, mail/DOMAIN/USER/{new,cur,tmp}; not messages)
OWNERSHIP_DEPTH = 4


class ServeError(RelaygateError):
    """serve cannot start (lock held, bad user, port in use...); the message says why."""


@dataclass(frozen=True)
class Part:
    """One piece serve composes: its factory and when it is wanted."""

    name: str
    #: "module:function" imported when the part is enabled
    target: str
    enabled: Callable[[Settings], bool]


def _tls(s: Settings) -> bool:
    return s.tls.cert is not None


#: the services of ``relaygate serve``, in start order (the queue worker first,
#: so it is ready before SMTP accepts mail; it is stopped last)
PARTS: tuple[Part, ...] = (
    Part("queue", "relaygate.mail.delivery.worker:make_worker", lambda s: True),
    Part("smtp", "relaygate.servers.smtp.service:make_services",
         lambda s: bool(s.smtp.listen or s.smtp.submission or (_tls(s) and s.smtp.smtps))),
    Part("pop3", "relaygate.servers.pop3:make_service",
         lambda s: bool(s.pop3.listen or (_tls(s) and s.pop3.listen_tls))),
    Part("imap", "relaygate.servers.imap.service:make_service",
         lambda s: bool(s.imap.listen or (_tls(s) and s.imap.listen_tls))),
    Part("policy", "relaygate.servers.policy:make_service", lambda s: bool(s.policy.listen)),
    Part("socketmap", "relaygate.servers.socketmap:make_service",
         lambda s: bool(s.socketmap.listen)),
)


def _import(target: str) -> Any:
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ServeError(f"{target} is not available ({exc})") from None


def default_factories(settings: Settings) -> list[tuple[str, Factory]]:
    return [(p.name, _import(p.target)) for p in PARTS if p.enabled(settings)]


def default_directory(settings: Settings) -> Any:
    open_directory = _import("relaygate.mail.accounts.db:open_directory")
    return open_directory(settings)


def default_queue(settings: Settings) -> Any:
    queue_cls = _import("relaygate.mail.queue:Queue")
    return queue_cls(settings.data_dir / "queue")


def listener_settings(settings: Settings) -> list[tuple[str, tuple[str, ...]]]:
    """Every listener setting with its dotted name (for checks and messages)."""
    s = settings
    out = [("smtp.listen", s.smtp.listen), ("smtp.submission", s.smtp.submission),
           ("pop3.listen", s.pop3.listen), ("imap.listen", s.imap.listen),
           ("policy.listen", s.policy.listen), ("socketmap.listen", s.socketmap.listen)]
    if _tls(s):
        out += [("smtp.smtps", s.smtp.smtps), ("pop3.listen_tls", s.pop3.listen_tls),
                ("imap.listen_tls", s.imap.listen_tls)]
    if s.metrics.listen:
        out.append(("metrics.listen", (s.metrics.listen,)))
    return out


def _trial_listeners_only(settings: Settings) -> bool:
    """True when every listener is on loopback at an unprivileged port (or a UNIX socket)."""
    for name, specs in listener_settings(settings):
        for spec in specs:
            listen = parse_listen(spec, origin=name)
            if not resolves_to_loopback(listen) or (listen.port is not None
                                                    and listen.port < 1024):
                return False
    return True


@dataclass(frozen=True)
class _Target:
    """The unprivileged user serve runs as after binding."""

    name: str
    uid: int
    gid: int


def resolve_target(settings: Settings) -> _Target | None:
    """The user to switch to, or None when serve stays who it is.

    Raises ServeError as root without ``--user`` (mail servers do not run as
    root by accident), and for ``--user`` without root unless it names the
    current user (so ``--user $(id -un)`` works everywhere).
    """
    euid = os.geteuid()
    if settings.user is None:
        if settings.group is not None:
            raise ServeError("--group needs --user")
        if euid == 0:
            if not _trial_listeners_only(settings):
                raise ServeError(
                    "refusing to run as root: give --user USER (and --group GROUP) so serve "
                    "drops to that user after binding its listeners (or --user root to stay "
                    "root, not recommended)")
            # The embedded default (loopback, unprivileged ports) is a trial run that no
            # remote client can reach: let it start, but say how production differs.
            log.warning("running as root on loopback trial listeners only; in production "
                        "give --user USER so serve drops root after binding")
        return None
    try:
        pw = pwd.getpwnam(settings.user)
    except KeyError:
        if not settings.user.isdigit():
            raise ServeError(f"--user {settings.user}: no such user") from None
        pw = None
    uid = pw.pw_uid if pw is not None else int(settings.user)
    gid = pw.pw_gid if pw is not None else uid
    if settings.group is not None:
        try:
            gid = grp.getgrnam(settings.group).gr_gid
        except KeyError:
            if not settings.group.isdigit():
                raise ServeError(f"--group {settings.group}: no such group") from None
            gid = int(settings.group)
    if euid != 0:
        if uid != euid:
            raise ServeError(f"--user {settings.user}: switching users needs root "
                             f"(running as uid {euid})")
        return None
    return _Target(settings.user, uid, gid)


def _chown_tree(root: Path, uid: int, gid: int, *, only_root_owned: bool,
                max_depth: int | None) -> int:
    """chown ``root`` and what is under it; returns how many entries changed."""
    changed = 0

    def fix(path: str, st: os.stat_result) -> None:
        nonlocal changed
        if (st.st_uid, st.st_gid) == (uid, gid):
            return
        if only_root_owned and st.st_uid != 0:
            return
        os.chown(path, uid, gid, follow_symlinks=False)
        changed += 1

    def walk(path: str, depth: int) -> None:
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            fix(entry.path, st)
            if entry.is_dir(follow_symlinks=False) and (max_depth is None or depth < max_depth):
                walk(entry.path, depth + 1)

    fix(str(root), root.stat())
    walk(str(root), 1)
    return changed


class Server:
    """One ``relaygate serve`` process. Build it with Settings, call :meth:`run`."""

    def __init__(
        self,
        settings: Settings,
        *,
        factories: Sequence[tuple[str, Factory]] | None = None,
        open_directory: Callable[[Settings], Any] | None = None,
        open_queue: Callable[[Settings], Any] | None = None,
        announce: Callable[[str], None] | None = None,
        install_signals: bool = True,
        setup_log: bool = True,
    ) -> None:
        self.settings = settings
        self._factories = factories
        self._open_directory = open_directory or default_directory
        self._open_queue = open_queue or default_queue
        self._announce = announce or (lambda text: print(text, flush=True))
        self._install_signals = install_signals
        self._setup_log = setup_log
        self.errors = ErrorRing()
        self.ctx: Context | None = None
        self.services: list[Service] = []
        self.ssl_context: ssl.SSLContext | None = None
        self.started_at = 0.0
        self.first_run = False
        self.store_ok: bool | None = None
        self._lock_fd: int | None = None
        self._target: _Target | None = None
        #: start, SIGHUP, SIGTERM and grace: the lifecycle every process shares
        self.runtime: Runtime | None = None
        self._last_status_warning = 0.0
        self._queue_checked = -QUEUE_STATS_INTERVAL

    # -- synchronous start-up (before the loop) ----------------------------

    def run(self) -> int:
        """Start everything, serve until SIGTERM, return the exit code (0)."""
        if self._setup_log:
            configure_logging(self.settings)
        logging.getLogger("relaygate").addHandler(self.errors)
        try:
            self.prepare()
            return asyncio.run(self.main())
        finally:
            logging.getLogger("relaygate").removeHandler(self.errors)
            self.close()

    def prepare(self) -> None:
        """Everything before the loop: checks, data directory, lock, TLS."""
        s = self.settings
        for name, specs in listener_settings(s):
            for spec in specs:
                parse_listen(spec, origin=name)
        self._target = resolve_target(s)
        self.first_run = self._prepare_data_dir()
        self._lock()
        self.ssl_context = server_tls_context(s)
        self._preload()

    def _preload(self) -> None:
        """Import every module serve will use while the files are still readable.

        After the privilege drop the service user may not be able to read the
        Python installation (e.g. one under /root), so nothing is left to a lazy
        import later: the service modules and the store backend load now.
        """
        if self._factories is None:
            self._factories = default_factories(self.settings)
        # asyncio.to_thread's pool is imported lazily by concurrent.futures
        importlib.import_module("concurrent.futures.thread")
        scheme = self.settings.store_url.partition(":")[0]
        backend = {"rediss": "redis", "redis+sentinel": "redis",
                   "redis+cluster": "redis"}.get(scheme, scheme)
        with contextlib.suppress(ImportError):
            importlib.import_module(f"relaygate.stores.{backend}")

    def _prepare_data_dir(self) -> bool:
        d = self.settings.data_dir
        created = not d.exists()
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ServeError(f"cannot create data directory {d}: {exc.strerror}") from None
        if not d.is_dir():
            raise ServeError(f"data directory {d} is not a directory")
        t = self._target
        if t is not None and t.uid != 0:
            owner = d.stat().st_uid
            if owner != t.uid:
                if owner != 0 and not created:
                    raise ServeError(
                        f"data directory {d.absolute()} belongs to uid {owner}, not to {t.name}: "
                        f"run `chown -R {t.name} {d.absolute()}` or choose another --data-dir")
                n = _chown_tree(d, t.uid, t.gid, only_root_owned=False, max_depth=None)
                event("serve.chown", path=str(d.absolute()), user=t.name, entries=n)
            else:
                # files an admin created as root since (users.db, a maildir) must stay usable
                n = _chown_tree(d, t.uid, t.gid, only_root_owned=True, max_depth=OWNERSHIP_DEPTH)
                if n:
                    event("serve.chown", path=str(d.absolute()), user=t.name, entries=n)
        elif not os.access(d, os.W_OK | os.X_OK):
            raise ServeError(f"data directory {d.absolute()} is not writable by uid "
                             f"{os.geteuid()}")
        return created

    def _lock(self) -> None:
        d = self.settings.data_dir
        path = d / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = lock_holder(d)
            who = f" (pid {pid})" if pid else ""
            raise ServeError(
                f"another relaygate serve{who} is already running on data directory "
                f"{d.absolute()}: stop it first, or give this one its own --data-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        if self._target is not None:
            os.fchown(fd, self._target.uid, self._target.gid)
        self._lock_fd = fd

    @contextlib.contextmanager
    def _as_service_user(self) -> Iterator[None]:
        """Run the block with the service user's effective ids (files it creates are theirs)."""
        t = self._target
        if t is None or t.uid == 0 or os.geteuid() != 0:
            yield
            return
        os.setgroups([])
        os.setegid(t.gid)
        os.seteuid(t.uid)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)

    def build_context(self) -> Context:
        s = self.settings
        control = build_control(s)
        self._probe_store(control.store)
        metrics = Metrics()
        directory = self._open_directory(s)
        cache_stats = getattr(directory, "cache_stats", None)
        if cache_stats is not None:  # the users database's credential cache
            metrics.watch_auth_cache(cache_stats)
        from relaygate.mail.rcpthosts import warn_addresses_outside

        warn_addresses_outside(s, directory)
        queue = self._open_queue(s)
        return Context(s, control, metrics, directory, queue, ssl_context=self.ssl_context)

    def _probe_store(self, store: Any) -> None:
        """One read at start: creates an SQLite file as the service user, reports Redis down."""
        try:
            store.get("127.0.0.1", time.time())
        except StoreError as exc:
            self.store_ok = False
            log.warning("grant store unreachable at start (relaying fails closed until it is "
                        "back): %s", exc)
        else:
            self.store_ok = True

    def _build_services(self, ctx: Context) -> list[Service]:
        factories = self._factories or []
        services: list[Service] = []
        for name, factory in factories:
            made = factory(ctx)
            items = made if isinstance(made, (list, tuple)) else [made]
            for svc in items:
                if svc is None:
                    continue
                if not all(hasattr(svc, a) for a in ("name", "listeners", "start", "stop")):
                    raise ServeError(f"{name}: factory returned {svc!r}, not a Service")
                services.append(svc)
        if self.settings.metrics.listen:
            from prometheus_client import ProcessCollector

            from relaygate.processes import processes
            from relaygate.servers.metrics_http import (
                MetricsService,
                StatusPage,
                status_page_allowed,
            )

            # process_resident_memory_bytes, open fds, CPU seconds: what an operator graphs
            ProcessCollector(registry=ctx.metrics.registry)
            listen = parse_listen(self.settings.metrics.listen, origin="metrics.listen")
            page = None
            if status_page_allowed(listen, self.settings.metrics.status_page):
                data_dir = self.settings.data_dir
                page = StatusPage(ctx, errors=self.errors.items,
                                  processes=lambda: processes(data_dir))
            services.append(MetricsService(listen, ctx.metrics.registry, page=page))
        return services

    def _drop_privileges(self) -> None:
        t = self._target
        if t is None or os.getuid() != 0:
            return
        if t.uid == 0:
            log.warning("running as root (--user root): every service keeps full privileges")
            return
        d = self.settings.data_dir
        # anything a service created as root while binding must stay usable afterwards
        _chown_tree(d, t.uid, t.gid, only_root_owned=True, max_depth=2)
        os.setgroups([])
        os.setgid(t.gid)
        os.setuid(t.uid)
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - the kernel would have to be broken
            raise ServeError("could not drop root privileges")
        event("serve.privileges_dropped", user=t.name, uid=t.uid, gid=t.gid)

    def close(self) -> None:
        ctx = self.ctx
        if ctx is not None:
            for obj in (ctx.directory, ctx.queue, ctx.control.store):
                closer = getattr(obj, "close", None)
                if callable(closer):
                    try:
                        result = closer()
                        if inspect.iscoroutine(result):
                            result.close()
                    except Exception:
                        log.exception("error while closing %r", obj)
            self.ctx = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the loop ------------------------------------------------------------

    async def main(self) -> int:
        self.runtime = runtime = Runtime("serve")
        if self._install_signals:
            # before anything starts: a SIGTERM during start-up is a clean stop, not a kill
            runtime.install_signals()
        with self._as_service_user():
            self.ctx = ctx = self.build_context()
            self.services = self._build_services(ctx)
        runtime.attach(ctx, self.services)
        try:
            await runtime.start()
        except StartError as exc:
            raise ServeError(str(exc)) from None
        try:
            self._drop_privileges()
        except BaseException:
            await runtime.shutdown()
            raise
        self.started_at = time.time()
        self._banner()
        tasks = [asyncio.create_task(self._aging_loop(), name="aging"),
                 asyncio.create_task(self._status_loop(), name="status")]
        await runtime.wait()
        event("serve.stopping", grace=self.settings.shutdown_grace)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runtime.shutdown()
        self._write_status("stopped")
        return 0

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does); a second call hurries it."""
        assert self.runtime is not None
        self.runtime.request_stop()

    async def reload(self) -> list[str]:
        """SIGHUP: rules, TLS certificate, users and every service; returns what reloaded."""
        if self.runtime is None or self.ctx is None:
            return []
        return await self.runtime.reload()

    async def _aging_loop(self) -> None:
        ctx = self.ctx
        assert ctx is not None
        while True:
            await asyncio.sleep(self.settings.age_interval)
            try:
                await self.age_once(ctx)
            except Exception:  # never let the loop die quietly
                log.exception("aging loop")

    async def age_once(self, ctx: Context) -> int:
        try:
            n = await asyncio.to_thread(ctx.control.age)
        except StoreError as exc:
            self.store_ok = False
            log.warning("aging: grant store unreachable (relaying fails closed): %s", exc)
            return 0
        except Exception as exc:  # a store bug must not end serve
            self.store_ok = False
            log.error("aging failed: %s", exc)
            return 0
        if self.store_ok is False:
            event("store.recovered", store=ctx.control.store.kind)
        self.store_ok = True
        if n:
            ctx.metrics.windows.labels(event="expired").inc(n)
            event("window.expired", count=n)
        return n

    async def _status_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._write_status, "running")
            except Exception:  # never let the loop die quietly
                log.exception("status loop")
            await asyncio.sleep(STATUS_INTERVAL)

    def status_doc(self, state: str) -> dict[str, Any]:
        s = self.settings
        doc: dict[str, Any] = {
            "state": state,
            "pid": os.getpid(),
            "version": _version(),
            "started_at": self.started_at,
            "updated_at": time.time(),
            "data_dir": str(s.data_dir.absolute()),
            "store": redact_url(s.store_url),
            "store_ok": self.store_ok,
            "domains": list(s.local_domains),
            "metrics": s.metrics.listen,
            "services": (self.runtime.status() if self.runtime is not None else []),
            "errors": self.errors.items(),
        }
        return doc

    def _write_status(self, state: str) -> None:
        ctx = self.ctx
        try:
            now = time.monotonic()
            if ctx is not None and now - self._queue_checked >= QUEUE_STATS_INTERVAL:
                self._queue_checked = now
                q = queue_summary(ctx.queue, self.settings.data_dir / "queue", time.time())
                for key in ("queued", "deferred"):
                    if isinstance(q.get(key), int):
                        ctx.metrics.queue_size.labels(state=key).set(q[key])
            write_status(self.settings.data_dir, self.status_doc(state))
        except Exception as exc:
            now = time.monotonic()
            if now - self._last_status_warning > STATUS_WARN_EVERY:
                self._last_status_warning = now
                log.warning("cannot write the status file: %s", exc)

    def _banner(self) -> None:
        s = self.settings
        if not (self.first_run or sys.stdout.isatty()):
            return
        lines = [f"relaygate serve (pid {os.getpid()}): data directory "
                 f"{s.data_dir.absolute()}, store {redact_url(s.store_url)}",
                 f"local domains: {', '.join(s.local_domains)}"
                 + ("" if s.domains or s.rcpthosts_file else
                    " (this host's name; give --domain for your mail domain)")]
        for svc in self.services:
            addrs = ", ".join(addresses(svc)) or "(no listeners)"
            lines.append(f"  {svc.name:<12} {addrs}")
        if self.first_run:
            dom = s.local_domains[0]
            dd = f" --data-dir {s.data_dir}" if s.data_dir != Settings().data_dir else ""
            lines += [
                "",
                f"First run: created {s.data_dir.absolute()} (grants, users, Maildirs, queue).",
                "Nothing may relay yet, not even this host: a POP3 or IMAP login opens a relay",
                "window for the client's address; SMTP AUTH lets one session relay.",
                "Next step, add a mailbox (the password is read from the terminal or stdin):",
                f"    {command_name()}{dd} users add alice@{dom}",
                "To let this host itself relay, put this line in a rules file and pass --rules:",
                '    127.0.0.1:allow,RELAYCLIENT=""',
            ]
        self._announce("\n".join(lines))


def command_name(argv0: str | None = None) -> str:
    """How the user started relaygate, for commands a message suggests.

    ``relaygate`` when that name on $PATH is this program; else the path as
    typed (``.venv/bin/relaygate`` after ``pip install`` in a venv that is
    not activated); ``python3 -m relaygate`` for the module form.
    """
    import shutil

    arg = sys.argv[0] if argv0 is None else argv0
    base = os.path.basename(arg)
    if base == "__main__.py":
        return f"{os.path.basename(sys.executable) or 'python3'} -m relaygate"
    if base != "relaygate" or os.sep not in arg:
        return "relaygate"
    found = shutil.which("relaygate")
    with contextlib.suppress(OSError):
        if found and os.path.samefile(found, arg):
            return "relaygate"
    return arg


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("relaygate")
    except Exception:
        return "unknown"


def serve(settings: Settings) -> int:
    """Run ``relaygate serve`` with these settings; returns the exit code."""
    return Server(settings).run()
