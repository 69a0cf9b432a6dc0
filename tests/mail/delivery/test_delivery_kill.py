"""Crash safety: SIGKILL the worker (`relaygate queue run`) mid-delivery, restart it.

A message acknowledged by the queue must be delivered at least once: the
killed delivery leaves its recipients pending, and the restarted worker sends
every message, the interrupted one included.
"""

from __future__ import annotations

import asyncio
import email
import os
import signal
import sys
from pathlib import Path
from typing import Any

from relaygate.mail.queue import Queue

from ..test_queue_helpers import Sink, message, wait_until

N_MESSAGES = 5


class HoldingSink(Sink):
    """Holds its reply to the first DATA (the worker is killed meanwhile)."""

    held = False

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not self.held:
            self.held = True
            self.data_started += 1
            await asyncio.sleep(60)
            return "451 4.3.0 too late"
        return await super().handle_DATA(server, session, envelope)


async def start_worker(config: Path, data_dir: Path) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYGATE_")}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relaygate.cli", "--config", str(config),
        "--data-dir", str(data_dir), "queue", "run",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)


async def test_sigkill_mid_delivery_then_restart_loses_nothing(tmp_path: Path) -> None:
    sink = await HoldingSink().start()
    data_dir = tmp_path / "data"
    config = tmp_path / "relaygate.toml"
    config.write_text(
        'hostname = "relay.test"\n'
        f'smtproutes = [":127.0.0.1:{sink.port}"]\n'
        "[queue]\nretry_schedule = [0.2]\nconcurrency = 1\nper_destination = 1\n")
    q = Queue(data_dir / "queue")
    ids = [q.enqueue("alice@local.test", [f"u{i}@remote.test"], message(f"kill {i}"))
           for i in range(N_MESSAGES)]
    proc = await start_worker(config, data_dir)
    try:
        await wait_until(lambda: sink.data_started >= 1, timeout=30)
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        # Nothing acknowledged by the sink yet, so nothing may have left the queue.
        assert sorted(q.ids()) == sorted(ids)
        assert all(r.state == "pending" for qid in ids for r in q.load(qid).recipients)

        proc = await start_worker(config, data_dir)
        await wait_until(lambda: not q.ids(), timeout=30)
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 30)
        stderr = (await proc.stderr.read()).decode() if proc.stderr else ""
        assert rc == 0, stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await sink.stop()
    subjects = [email.message_from_bytes(m.data)["Subject"] for m in sink.received]
    assert set(subjects) == {f"kill {i}" for i in range(N_MESSAGES)}
    assert len(subjects) >= N_MESSAGES
    assert not list(q.tmp_dir.iterdir())
