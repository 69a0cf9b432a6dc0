"""Benchmark: relaygate's Postfix policy service, measured against Postfix itself.

Usage: ``python bench/postfix.py [--quick]``. Prints a table, never asserts.
Needs root, Postfix (``postfix``, ``postconf``, ``smtp-source``).

1. Messages per second through a real Postfix (``smtp-source -s 20 -l 1024``
   into Maildirs, the configuration of the integration tests) with
   ``check_policy_service`` (relaygate policyd, SQLite store) in
   ``smtpd_recipient_restrictions`` vs. the same Postfix without it. Target:
   >= 0.9x. A third instance asks a constant policy server instead (the one of
   measure 2): what Postfix's own policy client costs, whoever answers. The
   three run side by side; rounds rotate which goes first, and every queue is
   drained and the Maildirs emptied before each measurement.
2. Policy decisions per second over persistent connections (20 clients, each
   sending the next request when the answer arrived, as smtpd does) against
   ``relaygate policyd`` (half the clients' addresses have an open window) vs.
   a bare asyncio server that answers ``action=DUNNO`` to anything, same load
   generator, alternating rounds. Target: >= 0.8x.

Medians of the rounds. Everything lives in a temporary directory under /tmp,
removed at the end; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
# Scripts in bench/ (queue.py) would shadow the standard library: drop our own directory.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _load_testbed() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_postfix_testbed", HERE / "_postfix_testbed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_postfix_testbed"] = module
    spec.loader.exec_module(module)
    return module


SMTP_SOURCE = "/usr/sbin/smtp-source"
RELAYGATE = str(Path(sys.executable).with_name("relaygate"))
TARGET_MSGS = 0.9
TARGET_DECISIONS = 0.8
CLIENTS = 20

REQUEST_TEMPLATE = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    "helo_name=client.example.org\nqueue_id=\nsender=alice@example.org\n"
    "recipient=bob@remote.example\nrecipient_count=0\nclient_address={ip}\n"
    "client_name=unknown\nreverse_client_name=unknown\ninstance=1a2b.5f3e.9c1d.0\n"
    "sasl_method=\nsasl_username=\nsasl_sender=\nsize=0\nccert_subject=\nccert_issuer=\n"
    "ccert_fingerprint=\nccert_pubkey_fingerprint=\nencryption_protocol=\n"
    "encryption_cipher=\nencryption_keysize=0\netrn_domain=\nstress=\n"
    "server_address=127.0.0.1\nserver_port=25\npolicy_context=\ncompatibility_level=3.6\n"
    "mail_version=3.7.11\n\n"
)


# -- helper processes (this script re-runs itself) ---------------------------------


def constant_server(port: int) -> None:
    """A bare asyncio policy server: answers DUNNO to every request, parses nothing."""

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.t = transport
            self.tail = b""

        def data_received(self, data: bytes) -> None:
            buf = self.tail + data
            n = buf.count(b"\n\n")
            if n:
                self.t.write(b"action=DUNNO\n\n" * n)
                buf = buf[buf.rfind(b"\n\n") + 2:]
            self.tail = buf

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Proto, "127.0.0.1", port, reuse_address=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())


def load_client(port: int, clients: int, seconds: float) -> None:
    """N persistent connections, one request in flight each; prints answers/s as JSON."""
    requests = [REQUEST_TEMPLATE.format(ip=f"127.0.{i % 2}.{10 + i}").encode()
                for i in range(clients)]

    class Proto(asyncio.Protocol):
        def __init__(self, req: bytes, counter: list[int]) -> None:
            self.req, self.counter, self.buf = req, counter, b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.t = transport
            transport.write(self.req)

        def data_received(self, data: bytes) -> None:
            self.buf += data
            if self.buf.endswith(b"\n\n"):
                self.buf = b""
                self.counter[0] += 1
                self.t.write(self.req)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        counter = [0]
        conns = [await loop.create_connection(lambda r=r: Proto(r, counter), "127.0.0.1", port)
                 for r in requests]
        await asyncio.sleep(0.3)  # warm-up
        start_count, start = counter[0], time.perf_counter()
        await asyncio.sleep(seconds)
        done, took = counter[0] - start_count, time.perf_counter() - start
        for t, _ in conns:
            t.close()
        # answers: everything answered since connecting (what the server's CPU time covers)
        print(json.dumps({"rate": done / took, "answers": counter[0]}))

    asyncio.run(main())


# -- the measurements ----------------------------------------------------------------


def start(cmd: list[str], port: int, tb: ModuleType) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tb.wait_port("127.0.0.1", port)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process (Linux /proc), to compare servers on a busy host."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def decisions(tb: ModuleType, root: Path, rounds: int, seconds: float
              ) -> tuple[list[float], list[float], list[float], list[float]]:
    store = f"sqlite://{root / 'decisions.db'}"
    for i in range(0, CLIENTS, 2):  # half the clients have an open window
        subprocess.run([RELAYGATE, "--store", store, "allow", f"127.0.0.{10 + i}", "--ttl",
                        "3600"], check=True, capture_output=True)
    p_rg, p_bare = tb.free_port(), tb.free_port()
    rg = start([RELAYGATE, "--store", store, "--log-format", "text", "policyd", "--listen",
                f"127.0.0.1:{p_rg}", "--log-level", "warning"], p_rg, tb)
    bare = start([sys.executable, __file__, "--constant-server", str(p_bare)], p_bare, tb)
    ours: list[float] = []
    base: list[float] = []
    cpu_ours: list[float] = []
    cpu_base: list[float] = []
    try:
        for _ in range(rounds):
            for proc, port, out, cpu in ((bare, p_bare, base, cpu_base),
                                         (rg, p_rg, ours, cpu_ours)):
                before = cpu_seconds(proc.pid)
                res = subprocess.run([sys.executable, __file__, "--client", str(port),
                                      str(CLIENTS), str(seconds)], capture_output=True,
                                     text=True, check=True)
                data = json.loads(res.stdout)
                out.append(data["rate"])
                cpu.append((cpu_seconds(proc.pid) - before) / data["answers"] * 1e6)
    finally:
        stop(rg)
        stop(bare)
    return ours, base, cpu_ours, cpu_base


def queue_empty(pf: object) -> bool:
    root = pf.root / "queue"  # type: ignore[attr-defined]
    return not any(any((root / d).iterdir()) for d in ("maildrop", "incoming", "active",
                                                        "deferred") if (root / d).is_dir())


def wait_drained(pf: object, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not queue_empty(pf) and time.monotonic() < deadline:
        time.sleep(0.2)


def messages(tb: ModuleType, root: Path, rounds: int, count: int
             ) -> tuple[list[float], list[float], list[float]]:
    """msgs/s through three Postfix instances: relaygate's policy, a constant policy
    server (what Postfix's own policy client costs), no policy."""
    store = f"sqlite://{root / 'postfix.db'}"
    pport, cport = tb.free_port(), tb.free_port()
    policyd = start([RELAYGATE, "--store", store, "policyd", "--listen", f"127.0.0.1:{pport}",
                     "--log-level", "warning"], pport, tb)
    constant = start([sys.executable, __file__, "--constant-server", str(cport)], cport, tb)
    with_policy = tb.PostfixTestbed(
        root / "with", port=tb.free_port(), recipient_restrictions=(
            f"check_policy_service inet:127.0.0.1:{pport}, reject_unauth_destination"))
    with_constant = tb.PostfixTestbed(
        root / "constant", port=tb.free_port(), recipient_restrictions=(
            f"check_policy_service inet:127.0.0.1:{cport}, reject_unauth_destination"))
    without = tb.PostfixTestbed(root / "without", port=tb.free_port(),
                                recipient_restrictions="reject_unauth_destination")
    ours: list[float] = []
    base: list[float] = []
    const: list[float] = []
    started = []
    try:
        for pf in (with_policy, with_constant, without):
            pf.root.mkdir()
            pf.configure()
            pf.start()
            started.append(pf)
        for pf in started:  # warm-up: spawn smtpd processes, policy connections
            run_source(pf, 100)
            wait_drained(pf)
        order = [(without, base), (with_policy, ours), (with_constant, const)]
        for _ in range(rounds):
            for pf, out in order:
                # Both queues drained: no measurement shares the machine with the other
                # instance's deliveries from the run before it.
                for other in started:
                    wait_drained(other)
                empty_maildirs(pf)
                out.append(count / run_source(pf, count))
            # Rotate who goes first: a machine that slows down during the run (other
            # jobs, page cache) must not always cost the same instance.
            order = order[1:] + order[:1]
    finally:
        for pf in started:
            pf.stop()
        stop(policyd)
        stop(constant)
    return ours, base, const


def empty_maildirs(pf: object) -> None:
    """Remove delivered messages: every round starts with empty Maildirs, so a
    directory grown by earlier rounds does not slow the later ones down."""
    for user in pf.users:  # type: ignore[attr-defined]
        for path in pf.delivered(user):  # type: ignore[attr-defined]
            path.unlink(missing_ok=True)


def run_source(pf: object, count: int) -> float:
    start_t = time.perf_counter()
    subprocess.run([SMTP_SOURCE, "-c", "-s", "20", "-l", "1024", "-m", str(count),
                    "-f", "sender@client.relaygate.test", "-t", "alice@example.test",
                    f"127.0.0.1:{pf.port}"],  # type: ignore[attr-defined]
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=600)
    return time.perf_counter() - start_t


def result(name: str, value: float, target: float) -> None:
    print("RESULT " + json.dumps({"name": name, "value": round(value, 3), "target": target,
                                  "ok": value >= target}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (a few seconds)")
    ap.add_argument("--only", choices=["messages", "decisions"], help="run one measure")
    ap.add_argument("--constant-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.constant_server:
        constant_server(args.constant_server)
        return 0
    if args.client:
        load_client(int(args.client[0]), int(args.client[1]), float(args.client[2]))
        return 0
    for prog in ("/usr/sbin/postfix", "/usr/sbin/postconf", SMTP_SOURCE):
        if not os.access(prog, os.X_OK):
            print(f"bench/postfix.py: {prog} is missing (install postfix)", file=sys.stderr)
            return 1
    if os.geteuid() != 0:
        print("bench/postfix.py: a private Postfix instance needs root", file=sys.stderr)
        return 1
    tb = _load_testbed()
    rounds = 3 if args.quick else 7
    count = 300 if args.quick else 2000
    seconds = 1.0 if args.quick else 3.0
    root = tb.make_root("relaygate-bench-postfix-")
    nan = [float("nan")]
    d_ours = d_base = m_ours = m_base = m_const = c_ours = c_base = nan
    try:
        if args.only in (None, "decisions"):
            d_ours, d_base, c_ours, c_base = decisions(tb, root, rounds, seconds)
        if args.only in (None, "messages"):
            m_ours, m_base, m_const = messages(tb, root, rounds, count)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    rows = [
        ("measure", "relaygate", "baseline", "ratio", "target"),
        (f"Postfix msgs/s, smtp-source -s 20 -m {count} (policy vs none)",
         f"{med(m_ours):.0f}", f"{med(m_base):.0f}", f"{med(m_ours) / med(m_base):.2f}x",
         f">= {TARGET_MSGS}x"),
        ("  the same, policy = a constant server vs none (Postfix's own policy cost)",
         f"{med(m_const):.0f}", f"{med(m_base):.0f}", f"{med(m_const) / med(m_base):.2f}x",
         "-"),
        ("  the same, relaygate's policy vs the constant server's",
         f"{med(m_ours):.0f}", f"{med(m_const):.0f}", f"{med(m_ours) / med(m_const):.2f}x",
         "-"),
        (f"policy decisions/s, {CLIENTS} persistent conns (policyd vs constant)",
         f"{med(d_ours):.0f}", f"{med(d_base):.0f}", f"{med(d_ours) / med(d_base):.2f}x",
         f">= {TARGET_DECISIONS}x"),
        ("server CPU us per decision (policyd vs constant; lower is better)",
         f"{med(c_ours):.0f}", f"{med(c_base):.0f}", f"{med(c_base) / med(c_ours):.2f}x",
         "-"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    load = os.getloadavg()[0]
    print(f"\nbench/postfix.py ({'quick' if args.quick else 'full'}; medians of {rounds} "
          f"rounds, order rotating; cpus={os.cpu_count()}, load average {load:.1f})")
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                        for j, (c, w) in enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    def show(xs: list[float]) -> str:
        return ", ".join(f"{x:.0f}" for x in xs)

    if args.only in (None, "messages"):
        print(f"\nrounds: msgs/s with policy [{show(m_ours)}], with a constant policy "
              f"[{show(m_const)}], without [{show(m_base)}]")
        result("Postfix msgs/s with policy / without", med(m_ours) / med(m_base), TARGET_MSGS)
    if args.only in (None, "decisions"):
        print(f"rounds: decisions/s policyd [{show(d_ours)}], constant [{show(d_base)}]; "
              f"CPU us/decision policyd [{show(c_ours)}], constant [{show(c_base)}]")
        result("policy decisions/s policyd / constant server", med(d_ours) / med(d_base),
               TARGET_DECISIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
