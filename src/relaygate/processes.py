"""Which relaygate processes run on a data directory, and with what configuration.

Theory of operation
-------------------
Every long-running relaygate process (``serve``, ``policyd``, ``socketmap``,
``smtpd``, ``pop3d``, ``imapd``, ``queue run``, ``watch-log``) records itself
while it runs: the runtime (:class:`relaygate.servers.runtime.Runtime`, and
``watch-log`` with :func:`recorded`) writes one small JSON file per process,
``run/NAME-PID.json`` in the data directory, with its pid, command, listeners,
start time and *effective configuration* (data directory, store URL with the
password redacted, local domains, rules file, expiry). A clean stop removes
the file; a process killed with SIGKILL leaves it behind, and readers find it
stale because its pid no longer runs (:func:`running`).

The admin commands (``status``, ``check``, ``list``, ``revoke``, ``age``,
``queue``) read these files when they run against the same data directory:
``status`` lists every process, and ``check`` decides with the rules file the
running server uses (:func:`adopt`), so its answer is the server's answer.

Files are written atomically (temporary file, then ``rename``); nothing here
talks to the network.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relaygate.stores import redact_url

if TYPE_CHECKING:
    from relaygate.config import Settings

log = logging.getLogger("relaygate.processes")

#: the directory of process records inside the data directory
RUN_DIR = "run"
#: largest record read (a record is a few hundred bytes; a bigger file is not ours)
MAX_RECORD = 64 * 1024
#: the order in which admin commands look for a running configuration to adopt
ADOPT_ORDER = ("serve", "policyd", "socketmap", "smtpd", "pop3d", "imapd", "queue", "watch-log")


def effective_config(settings: Settings) -> dict[str, Any]:
    """What a process runs with, as admin commands need it (no secrets)."""
    rules = settings.rules_file
    return {
        "data_dir": str(settings.data_dir.absolute()),
        "store": redact_url(settings.store_url),
        "store_default": settings.store is None,
        "domains": list(settings.local_domains),
        "rules_file": str(rules.absolute()) if rules is not None else None,
        "expiry": settings.expiry,
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class ProcessRecord:
    """This process's record file: :meth:`write` at start (and when listeners change),
    :meth:`remove` at a clean stop."""

    def __init__(self, settings: Settings, command: str, *,
                 argv: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.command = command
        self.pid = os.getpid()
        self.argv = list(sys.argv if argv is None else argv)
        self.started_at = time.time()
        self.path = settings.data_dir / RUN_DIR / f"{command.replace(' ', '-')}-{self.pid}.json"

    def doc(self, services: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "command": self.command,
            "argv": self.argv,
            "started_at": round(self.started_at, 3),
            "services": list(services),
            "config": effective_config(self.settings),
        }

    def write(self, services: Sequence[dict[str, Any]] = ()) -> bool:
        """Write (or rewrite) the record; False (logged) when the data directory is not
        writable: a process that cannot record itself still runs."""
        run = self.path.parent
        tmp = run / f".{self.path.name}.tmp"
        try:
            run.mkdir(parents=True, exist_ok=True, mode=0o755)
            tmp.write_text(json.dumps(self.doc(services), indent=1, sort_keys=True),
                           encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot record this process in %s (relaygate status will not "
                        "see it): %s", run, exc.strerror or exc)
            return False
        return True

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


@contextlib.contextmanager
def recorded(settings: Settings, command: str,
             services: Sequence[dict[str, Any]] = ()) -> Iterator[ProcessRecord]:
    """Record this process for the block (for processes that do not run a Runtime)."""
    rec = ProcessRecord(settings, command)
    rec.write(services)
    try:
        yield rec
    finally:
        rec.remove()


def processes(data_dir: Path) -> list[dict[str, Any]]:
    """Every record of the data directory, each with ``state``: ``running`` or ``stale``
    (its pid is gone: killed without a clean stop). Oldest first."""
    out: list[dict[str, Any]] = []
    try:
        entries = sorted((data_dir / RUN_DIR).glob("*.json"))
    except OSError:
        return out
    for path in entries:
        try:
            with path.open("rb") as fh:
                raw = fh.read(MAX_RECORD + 1)
            doc = json.loads(raw) if len(raw) <= MAX_RECORD else None
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("pid"), int):
            continue
        doc["state"] = "running" if _pid_alive(doc["pid"]) else "stale"
        doc["file"] = str(path)
        out.append(doc)
    out.sort(key=lambda d: (d.get("started_at") or 0, d["pid"]))
    return out


def running(data_dir: Path) -> list[dict[str, Any]]:
    """The records whose process still runs."""
    return [d for d in processes(data_dir) if d["state"] == "running"]


def adopt(settings: Settings) -> tuple[Settings, dict[str, Any] | None]:
    """Settings for an admin command, completed from the running server of its data
    directory: its rules file (when the command was given none) and its store (when
    the command names none and the server's URL carries no redacted password).

    Returns the settings and the record adopted (None when nothing runs).
    """
    procs = running(settings.data_dir)
    procs.sort(key=lambda d: ADOPT_ORDER.index(d.get("command"))
               if d.get("command") in ADOPT_ORDER else len(ADOPT_ORDER))
    for rec in procs:
        cfg = rec.get("config")
        if not isinstance(cfg, dict):
            continue
        changes: dict[str, Any] = {}
        rules = cfg.get("rules_file")
        if settings.rules_file is None and isinstance(rules, str):
            changes["rules_file"] = Path(rules)
        store = cfg.get("store")
        if (settings.store is None and not cfg.get("store_default") and isinstance(store, str)
                and "***" not in store):
            changes["store"] = store
        return (settings.replace(**changes) if changes else settings), rec
    return settings, None
