"""servers/runtime.py: the one lifecycle of serve and every single-service command."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest
import trustme

from relaygate.config import Settings, TlsSettings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.mail.directory import StaticDirectory
from relaygate.metrics import Metrics
from relaygate.servers.listeners import server_tls_context
from relaygate.servers.runtime import Runtime, StartError
from relaygate.stores.memory import MemoryStore


class Standin:
    def __init__(self, name: str, log: list[str], *, listening: bool = True,
                 fail_start: bool = False, fail_reload: bool = False,
                 stop_takes: float = 0.0) -> None:
        self.name = name
        self.log = log
        self.listening = listening
        self.fail_start = fail_start
        self.fail_reload = fail_reload
        self.stop_takes = stop_takes
        self.grace: float | None = None

    def listeners(self) -> list[str]:
        return [f"{self.name} 127.0.0.1:1"] if self.listening else []

    async def start(self) -> None:
        if self.fail_start:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self.log.append(f"start {self.name}")

    def reload(self) -> None:
        if self.fail_reload:
            raise RuntimeError("broken")
        self.log.append(f"reload {self.name}")

    async def stop(self, grace: float = 30.0) -> None:
        self.grace = grace
        await asyncio.sleep(self.stop_takes)
        self.log.append(f"stop {self.name}")


class Users(StaticDirectory):
    reloads = 0

    def reload(self) -> None:
        Users.reloads += 1


def _ctx(tmp_path: Path, **settings: object) -> Context:
    s = Settings(data_dir=tmp_path, shutdown_grace=7.0, **settings)  # type: ignore[arg-type]
    return Context(s, RelayControl(MemoryStore()), Metrics(), Users(),
                   ssl_context=server_tls_context(s))


async def test_start_in_order_stop_listening_first_then_quiet(tmp_path: Path) -> None:
    log: list[str] = []
    worker = Standin("queue", log, listening=False)
    smtp = Standin("smtp", log)
    rt = Runtime("test", _ctx(tmp_path), [worker, smtp])
    await rt.start()
    assert log == ["start queue", "start smtp"]
    assert rt.status() == [{"name": "queue", "listeners": []},
                           {"name": "smtp", "listeners": ["127.0.0.1:1"]}]
    rt.request_stop()
    await asyncio.wait_for(rt.wait(), 1)
    await rt.shutdown()
    # the worker stops last: mail accepted meanwhile still reaches the queue
    assert log[2:] == ["stop smtp", "stop queue"]
    assert smtp.grace == worker.grace == 7.0  # shutdown_grace, for every command


async def test_a_service_that_cannot_bind_stops_those_started(tmp_path: Path) -> None:
    log: list[str] = []
    rt = Runtime("test", _ctx(tmp_path), [Standin("a", log), Standin("b", log, fail_start=True),
                                          Standin("c", log)])
    with pytest.raises(StartError, match="b: cannot listen: Address already in use"):
        await rt.start()
    assert log == ["start a", "stop a"]


async def test_a_second_stop_request_stops_waiting(tmp_path: Path) -> None:
    log: list[str] = []
    slow = Standin("slow", log, stop_takes=30.0)
    rt = Runtime("test", _ctx(tmp_path), [slow], grace=30.0)
    await rt.start()
    rt.request_stop()
    shutdown = asyncio.create_task(rt.shutdown())
    await asyncio.sleep(0.05)
    assert not shutdown.done()
    rt.request_stop()  # the second SIGTERM
    await asyncio.wait_for(shutdown, 2)
    assert "stop slow" not in log


async def test_reload_rules_tls_users_and_services_keeping_what_fails(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued = ca.issue_cert("127.0.0.1")
    issued.private_key_and_cert_chain_pem.write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    rules = tmp_path / "rules"
    rules.write_text('127.0.0.9:allow,RELAYCLIENT=""\n')
    ctx = _ctx(tmp_path, rules_file=rules, tls=TlsSettings(cert, key))
    log: list[str] = []
    rt = Runtime("test", ctx, [Standin("ok", log), Standin("bad", log, fail_reload=True)])
    Users.reloads = 0
    done = await rt.reload()
    assert done == ["rules", "tls", "users", "ok"]
    assert Users.reloads == 1 and log == ["reload ok"]
    assert ctx.control.decide("127.0.0.9").allowed
    assert "reload: bad failed: broken" in caplog.text
    # a broken rules file or certificate is logged and the old one kept
    rules.write_text("not a rule\n")
    key.write_text("not a key\n")
    done = await rt.reload()
    assert "rules" not in done and "tls" not in done
    assert ctx.control.decide("127.0.0.9").allowed
    assert "keeping the old rules" in caplog.text
    assert "keeping the old TLS certificate" in caplog.text
