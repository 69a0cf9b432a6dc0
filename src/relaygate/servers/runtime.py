"""One lifecycle for every long-running relaygate process.

``relaygate serve`` and each single-service command (``smtpd``, ``pop3d``,
``imapd``, ``policyd``, ``queue run``) run their services through a
:class:`Runtime`, so they start, reload and stop the same way:

- **start**: the services start in order (``serve`` starts the delivery worker
  first, so it is ready before SMTP accepts mail); when one cannot bind its
  address, those already started are stopped and :class:`StartError` names it;
- **SIGTERM/SIGINT**: every service stops accepting; the services with
  listeners get ``shutdown_grace`` seconds to finish the work in flight, then
  the quiet ones (the delivery worker) get theirs. A second signal stops
  waiting;
- **SIGHUP**: :meth:`Runtime.reload` re-reads the rules file, the TLS
  certificate (into the one context every listener shares), the user directory
  and whatever each service reads itself (``Service.reload``). A file that
  cannot be loaded is logged and the old one kept: a reload never stops a
  process;
- **status**: :meth:`Runtime.status` lists each service and its listeners.

``serve`` adds what only it does around this (privileges, the lock, the
status file, aging; see :mod:`relaygate.servers.serve`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from relaygate.errors import ConfigError, RelaygateError
from relaygate.log import event
from relaygate.rules import RuleSet
from relaygate.servers.listeners import reload_certificate

if TYPE_CHECKING:
    from relaygate.context import Context
    from relaygate.interfaces import Service

log = logging.getLogger("relaygate.runtime")

#: seconds added to the grace period before the runtime gives up waiting for services
STOP_SLACK = 5.0


class StartError(RelaygateError):
    """A service could not start (an address in use, a port that needs root...)."""

    def __init__(self, service: str, exc: OSError) -> None:
        self.service = service
        self.why = exc.strerror or str(exc)
        super().__init__(f"{service}: cannot listen: {self.why}")


class Runtime:
    """Start, reload and stop the services of one process; ``name`` prefixes its events
    (``serve.reloaded``, ``pop3d.reloaded``...).

    The Context and the services may be attached after the signals are installed
    (:meth:`attach`): a SIGTERM while ``serve`` is still building them is a clean stop.
    """

    def __init__(self, name: str, ctx: Context | None = None,
                 services: Sequence[Service] = (), *, grace: float | None = None) -> None:
        self.name = name
        self.ctx = ctx
        self.services = list(services)
        self._grace = grace
        self.started: list[Service] = []
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        #: SIGHUP reloads in progress (a reference, so the tasks are not collected)
        self._reloads: set[asyncio.Task[list[str]]] = set()

    def attach(self, ctx: Context, services: Sequence[Service]) -> None:
        self.ctx = ctx
        self.services = list(services)

    @property
    def grace(self) -> float:
        """Seconds each group of services gets to stop (``shutdown_grace`` by default)."""
        if self._grace is not None:
            return float(self._grace)
        return float(self.ctx.settings.shutdown_grace) if self.ctx is not None else 0.0

    # -- signals ------------------------------------------------------------------

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop (a second one hurries), SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_hup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does); a second call hurries it."""
        if self._stop.is_set():
            event(f"{self.name}.hurry")
            self._hurry.set()
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- start and stop -------------------------------------------------------------

    async def start(self) -> None:
        """Start every service in order; StartError (the others stopped) if one cannot."""
        try:
            for svc in self.services:
                try:
                    await svc.start()
                except OSError as exc:
                    raise StartError(svc.name, exc) from None
                self.started.append(svc)
        except BaseException:
            await _stop_all(self.started, 0.0)
            self.started.clear()
            raise

    async def wait(self) -> None:
        """Until a stop is requested."""
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Stop listening services, then quiet ones, each group within the grace period."""
        started, self.started = self.started, []
        listening = [s for s in started if s.listeners()]
        quiet = [s for s in started if not s.listeners()]
        for group in (listening, quiet):
            if not group:
                continue
            job = asyncio.ensure_future(_stop_all(group, self.grace))
            hurry = asyncio.ensure_future(self._hurry.wait())
            done, _ = await asyncio.wait({job, hurry}, timeout=self.grace + STOP_SLACK,
                                         return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
            if job not in done:
                log.warning("services did not stop in time; exiting anyway")
                job.cancel()
                await asyncio.gather(job, return_exceptions=True)
                return

    async def serve(self) -> None:
        """:meth:`start`, :meth:`wait` for a stop, :meth:`shutdown` (signals: the caller's)."""
        await self.start()
        try:
            await self.wait()
        finally:
            await self.shutdown()

    # -- reload and status ------------------------------------------------------------

    async def reload(self) -> list[str]:
        """SIGHUP: rules, TLS certificate, users and every service; returns what reloaded."""
        ctx = self.ctx
        if ctx is None:
            return []
        s = ctx.settings
        done: list[str] = []
        if s.rules_file is not None:
            try:
                rules = await asyncio.to_thread(RuleSet.load, s.rules_file)
            except ConfigError as exc:
                log.error("reload: keeping the old rules: %s", exc)
            else:
                ctx.control.rules = rules
                done.append("rules")
        if ctx.ssl_context is not None and reload_certificate(ctx.ssl_context, s):
            done.append("tls")
        targets: list[tuple[str, Any]] = []
        if ctx.directory is not None:
            targets.append(("users", ctx.directory))
        targets += [(svc.name, svc) for svc in self.services]
        for name, obj in targets:
            try:
                await asyncio.to_thread(obj.reload)
            except Exception as exc:
                log.error("reload: %s failed: %s", name, exc)
            else:
                done.append(name)
        event(f"{self.name}.reloaded", parts=",".join(done) or "nothing")
        return done

    def status(self) -> list[dict[str, Any]]:
        """Each service with the addresses it listens on (without its name in front)."""
        return [{"name": svc.name, "listeners": addresses(svc)} for svc in self.services]


async def _stop_all(services: Sequence[Service], grace: float) -> None:
    async def one(svc: Service) -> None:
        try:
            await svc.stop(grace)
        except Exception:
            log.exception("%s: error while stopping", svc.name)

    await asyncio.gather(*(one(s) for s in services))


def addresses(svc: Service) -> list[str]:
    """A service's listener addresses without the service name some put in front."""
    prefix = f"{svc.name} "
    return [a[len(prefix):] if a.startswith(prefix) else a for a in svc.listeners()]
