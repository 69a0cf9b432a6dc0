"""Queue throughput: messages per second from the queue to a loopback SMTP sink.

Usage: python bench/outbound.py [--quick] [--messages N] [--repeats R]

What it measures (all on 127.0.0.1, 1 KB messages, one recipient each, all
to the same destination through an smtproutes default route):

* ``enqueue``: durable ``Queue.enqueue`` calls per second (4 fsyncs each).
* delivery with 1 and 20 concurrent connections (``queue.concurrency`` and
  ``queue.per_destination``), with the connection cache on (default) and off,
  to Postfix's ``smtp-sink`` (if installed) and to an aiosmtpd sink; each sink
  runs in its own process, so the CPU column is the worker's alone
  (``time.process_time``: user + system time of all the worker's threads,
  which includes the fsyncs of removing delivered messages).

Each configuration runs ``--repeats`` times on a fresh copy of the same
pre-filled queue; the table shows medians and the speed relative to one
connection with the same sink. Nothing is asserted: this prints numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from relaygate.config import QueueSettings, Settings
from relaygate.context import Context
from relaygate.control import RelayControl
from relaygate.mail.delivery.routes import StaticResolver
from relaygate.mail.delivery.worker import DeliveryWorker, make_worker
from relaygate.mail.queue import Queue
from relaygate.metrics import Metrics
from relaygate.stores.memory import MemoryStore

SMTP_SINK = "/usr/sbin/smtp-sink"

AIOSMTPD_SINK = r"""
import asyncio, sys
from aiosmtpd.smtp import SMTP

class Handler:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 OK"

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Handler(), decode_data=False, hostname="sink", ident="sink"),
        "127.0.0.1", int(sys.argv[1]), backlog=1000)
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_sink(kind: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if kind == "smtp-sink":
        cmd = [SMTP_SINK]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [f"127.0.0.1:{port}", "1000"]
    else:
        cmd = [sys.executable, "-c", AIOSMTPD_SINK, str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def one_kb_message(i: int) -> bytes:
    head = (f"From: <bench@local.test>\r\nTo: <rcpt{i}@remote.test>\r\n"
            f"Subject: bench {i}\r\nMessage-ID: <{i}.bench@local.test>\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    body = (line * 20)[: 1024 - len(head)]
    return head + body


def fill_queue(directory: Path, n: int) -> tuple[float, float]:
    q = Queue(directory)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        q.enqueue("bench@local.test", [f"rcpt{i}@remote.test"], one_kb_message(i))
    return time.perf_counter() - t0, time.process_time() - c0


@dataclass
class Run:
    wall: float
    cpu: float
    delivered: int


async def deliver(template: Path, workdir: Path, port: int, conns: int, reuse: bool) -> Run:
    if workdir.exists():
        shutil.rmtree(workdir)
    shutil.copytree(template, workdir / "queue")
    settings = Settings(data_dir=workdir, hostname="bench.test", domains=("local.test",),
                        smtproutes=(f":127.0.0.1:{port}",),
                        queue=QueueSettings(concurrency=conns, per_destination=conns))
    ctx = Context(settings, RelayControl(MemoryStore()), Metrics(), None,
                  Queue(workdir / "queue"))
    worker = make_worker(ctx, resolver=StaticResolver())
    assert isinstance(worker, DeliveryWorker)
    if not reuse:
        worker.client.cache_size = 0
    t0, c0 = time.perf_counter(), time.process_time()
    await worker.run_once()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    delivered = ctx.metrics.registry.get_sample_value(
        "relaygate_messages_total", {"event": "delivered"}) or 0
    left = len(ctx.queue.ids())
    if left:
        raise SystemExit(f"bench: {left} messages left in the queue (sink on port {port})")
    return Run(wall, cpu, int(delivered))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (few messages, 1 repeat)")
    ap.add_argument("--messages", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    n = args.messages or (100 if args.quick else 500)
    repeats = args.repeats or (1 if args.quick else 3)

    sinks = ["aiosmtpd"]
    if os.access(SMTP_SINK, os.X_OK):
        sinks.insert(0, "smtp-sink")
    else:
        print(f"({SMTP_SINK} not installed: aiosmtpd sink only)")

    base = Path(tempfile.mkdtemp(prefix="relaygate-bench-queue-"))
    try:
        template = base / "template"
        enq_wall, enq_cpu = fill_queue(template, n)
        rows: list[tuple[str, ...]] = []
        rows.append(("enqueue (durable)", "-", "-", str(n), f"{n / enq_wall:.0f}",
                     f"{enq_cpu / n * 1000:.2f}", "-"))
        configs = [(1, True), (20, True), (20, False)]
        for sink in sinks:
            proc, port = start_sink(sink)
            try:
                base_rate: float | None = None
                for conns, reuse in configs:
                    runs = [asyncio.run(deliver(template, base / "run", port, conns, reuse))
                            for _ in range(repeats)]
                    rate = statistics.median(r.delivered / r.wall for r in runs)
                    cpu_ms = statistics.median(r.cpu / r.delivered * 1000 for r in runs)
                    if base_rate is None:
                        base_rate = rate
                    rows.append((f"deliver to {sink}", str(conns), "yes" if reuse else "no",
                                 str(n), f"{rate:.0f}", f"{cpu_ms:.2f}",
                                 f"{rate / base_rate:.2f}x"))
            finally:
                proc.terminate()
                proc.wait(10)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    header = ("what", "conns", "conn cache", "messages", "msg/s (median)",
              "CPU ms/msg (median)", "vs 1 conn")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\nqueue -> loopback sink, 1 KB messages, {repeats} repeat(s) per row, "
          f"{os.cpu_count()} CPU(s)\n")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
