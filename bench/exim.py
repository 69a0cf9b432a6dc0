"""Benchmark: Exim's RCPT decisions with the relaygate ACL against the same Exim without it.

Usage: ``python bench/exim.py [--quick]``. Prints a table, never asserts.
Needs root and Exim unpacked where ``scripts/test`` puts it
(``$RELAYGATE_MTA_DIR``, default ``/var/cache/relaygate-tests/mta``).

Exim daemons (Debian's 4.96, ``-bd -oX PORT``) run side by side with the
same configuration but for one thing:

- **relaygate**: deploy/exim/relaygate-rcpt.conf included before the relay
  check, asking ``relaygate policyd`` (SQLite store) through ``${readsocket}``
  over TCP, and a third daemon doing the same over a UNIX socket;
- **static**: no lookup; the same clients are allowed to relay by a static
  ``hosts =`` list in the same place (so both give the same answers).

A fourth daemon asks a bare server that answers ``action=DUNNO`` at once, with
the same ACL: what ``${readsocket}`` costs Exim whoever answers (not a target).

Load: 10 persistent SMTP connections from 127.0.0.10-19 (half of them with an open
window / in the static list), each repeating ``MAIL``, ``RCPT`` to a remote
domain, ``RSET``; every transaction is a new message, so the relaygate ACL asks
once per RCPT (it caches the answer only within a message). Counted: RCPT
replies per second. Rounds alternate which daemon goes first. Target: >= 0.8x.

Medians of the rounds (ranges shown). Everything lives in a temporary directory,
removed at the end; all traffic stays on 127.0.0.1 and no message is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Scripts in bench/ (queue.py) would shadow the standard library: drop our own directory.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

ROOT = HERE.parent
MTA_DIR = Path(os.environ.get("RELAYGATE_MTA_DIR", "/var/cache/relaygate-tests/mta"))
EXIM = MTA_DIR / "usr/sbin/exim4"
RELAYGATE = str(Path(sys.executable).with_name("relaygate"))
TARGET = 0.8
CLIENTS = 10
SOURCES = [f"127.0.0.{10 + i}" for i in range(CLIENTS)]
WINDOWS = SOURCES[::2]
#: the daemons measured; the rounds rotate their order
NAMES = ["static", "relaygate", "relaygate-unix", "constant"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def exim_config(root: Path, *, policy: str | None) -> Path:
    root.mkdir(parents=True)
    for d in ("spool", "log"):
        (root / d).mkdir()
        os.chmod(root / d, 0o777)
    if policy is not None:
        macros = (f"RELAYGATE_POLICY = {policy}\n"
                  f".include {ROOT / 'deploy/exim/relaygate-macros.conf'}\n")
        decide = f".include {ROOT / 'deploy/exim/relaygate-rcpt.conf'}\n"
    else:
        macros = ""
        decide = f"  accept\n    hosts = {' : '.join(WINDOWS)}\n"
    conf = root / "exim.conf"
    conf.write_text(f"""\
{macros}primary_hostname = mx.relaygate.test
exim_path = {EXIM}
domainlist local_domains = local.test
domainlist relay_to_domains =
hostlist relay_from_hosts =
spool_directory = {root / 'spool'}
log_file_path = {root / 'log'}/%slog
pid_file_path = {root}/exim.pid
keep_environment =
local_interfaces = 127.0.0.1
host_lookup =
rfc1413_hosts =
smtp_accept_max = 100
smtp_accept_max_nonmail_hosts =
smtp_accept_max_per_connection = 0
smtp_accept_queue_per_connection = 0
acl_smtp_rcpt = acl_check_rcpt
begin acl
acl_check_rcpt:
  accept
    authenticated = *
{decide}
  require
    message = relay not permitted
    domains = +local_domains : +relay_to_domains
  accept
""")
    return conf


# -- helper processes (this script re-runs itself) ---------------------------------


def constant_server(port: int) -> None:
    """A bare asyncio policy server: DUNNO to every request, parses nothing."""

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.t = transport

        def data_received(self, data: bytes) -> None:
            if b"\n\n" in data:
                self.t.write(b"action=DUNNO\n\n")

        def eof_received(self) -> bool:
            return False  # close once the answer is out

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Proto, "127.0.0.1", port, reuse_address=True)
        stop_event = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop_event.set)
        async with server:
            await stop_event.wait()

    asyncio.run(main())


def load_client(port: int, seconds: float) -> None:
    """One persistent SMTP connection per source; prints RCPT replies/s as JSON."""

    async def session(source: str, counter: list[int], codes: dict[str, int],
                      stop: asyncio.Event, ready: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(source, 0))

        async def reply() -> str:
            while True:
                line = (await reader.readline()).decode()
                if not line:
                    raise ConnectionError("Exim closed the connection")
                if line[3:4] != "-":
                    return line[:3]

        await reply()
        writer.write(b"EHLO client.test\r\n")
        await reply()
        while not stop.is_set():
            writer.write(b"MAIL FROM:<a@client.test>\r\n")
            mail = await reply()
            if mail != "250":
                codes["MAIL " + mail] = codes.get("MAIL " + mail, 0) + 1
            writer.write(b"RCPT TO:<someone@remote.test>\r\n")
            code = await reply()
            counter[0] += 1
            codes[code] = codes.get(code, 0) + 1
            ready.set()
            writer.write(b"RSET\r\n")
            await reply()
        writer.write(b"QUIT\r\n")
        writer.close()

    async def main() -> None:
        counter = [0]
        codes: dict[str, int] = {}
        stop = asyncio.Event()
        ready = [asyncio.Event() for _ in SOURCES]
        tasks = [asyncio.create_task(session(s, counter, codes, stop, r))
                 for s, r in zip(SOURCES, ready, strict=True)]
        # warm-up: every connection has had its first answer (Exim forks per connection)
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 60)
        await asyncio.sleep(0.3)
        start_count, start = counter[0], time.perf_counter()
        await asyncio.sleep(seconds)
        done, took = counter[0] - start_count, time.perf_counter() - start
        stop.set()
        errors = [repr(r) for r in await asyncio.gather(*tasks, return_exceptions=True)
                  if r is not None]
        print(json.dumps({"rate": done / took, "codes": codes, "errors": errors}))

    asyncio.run(main())


# -- the measurement -----------------------------------------------------------------


def start(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(root: Path, rounds: int, seconds: float) -> dict[str, list[float]]:
    store = f"sqlite://{root / 'grants.db'}"
    for ip in WINDOWS:
        subprocess.run([RELAYGATE, "--store", store, "allow", ip, "--ttl", "3600"],
                       check=True, capture_output=True)
    p_policy = free_port()
    sock = root / "policy.sock"
    policyd = start([RELAYGATE, "--store", store, "policyd", "--listen",
                     f"127.0.0.1:{p_policy}", "--listen", f"unix:{sock}", "--socket-group",
                     "Debian-exim", "--log-level", "warning"], p_policy)
    p_const = free_port()
    constant = start([sys.executable, __file__, "--constant-server", str(p_const)], p_const)
    daemons: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    out: dict[str, list[float]] = {name: [] for name in NAMES}
    try:
        for name, policy in (("relaygate", f"inet:127.0.0.1:{p_policy}"),
                             ("relaygate-unix", str(sock)), ("static", None),
                             ("constant", f"inet:127.0.0.1:{p_const}")):
            conf = exim_config(root / name, policy=policy)
            port = free_port()
            daemons[name] = (start([str(EXIM), "-C", str(conf), "-bdf", "-oX", str(port)],
                                   port), port)
        for r in range(rounds):
            order = NAMES[r % len(NAMES):] + NAMES[:r % len(NAMES)]
            for name in order:
                res = subprocess.run([sys.executable, __file__, "--client",
                                      str(daemons[name][1]), str(seconds)],
                                     capture_output=True, text=True, check=True)
                data = json.loads(res.stdout)
                want = {"550"} if name == "constant" else {"250", "550"}
                if set(data["codes"]) != want or data["errors"]:
                    raise RuntimeError(f"{name}: unexpected RCPT replies {data['codes']}, "
                                       f"errors {data['errors']}")
                out[name].append(data["rate"])
    finally:
        for proc, _ in daemons.values():
            stop(proc)
        stop(policyd)
        stop(constant)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--client", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--constant-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.constant_server:
        constant_server(args.constant_server)
        return 0
    if args.client:
        load_client(int(args.client[0]), float(args.client[1]))
        return 0
    if os.geteuid() != 0 or not EXIM.exists():
        print(f"bench/exim.py needs root and Exim at {EXIM} (scripts/test unpacks it)",
              file=sys.stderr)
        return 2
    rounds, seconds = (3, 2.0) if args.quick else (7, 5.0)
    root = Path(tempfile.mkdtemp(prefix="relaygate-bench-exim-"))
    os.chmod(root, 0o755)  # Exim's delivery user must reach its spool
    try:
        m = measure(root, rounds, seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"Exim RCPT decisions/s, {CLIENTS} persistent SMTP connections, one RCPT per "
          f"message, {rounds} rounds of {seconds:.0f} s (median [min-max]):")
    labels = {"relaygate": "relaygate ACL, readsocket over TCP",
              "relaygate-unix": "relaygate ACL, readsocket over a UNIX socket",
              "static": "static hosts list, no lookup",
              "constant": "the ACL asking a constant server (TCP)"}
    for name in NAMES:
        print(f"  {labels[name]:<46}{statistics.median(m[name]):7.0f}  "
              f"[{min(m[name]):.0f}-{max(m[name]):.0f}]")
    base = statistics.median(m["static"])
    rows = []
    for name, what in (("relaygate", "TCP"), ("relaygate-unix", "UNIX socket"),
                       ("constant", "constant server")):
        ratios = [a / b for a, b in zip(m[name], m["static"], strict=True)]
        print(f"  {what} / static per round: {', '.join(f'{r:.2f}' for r in ratios)}")
        rows.append((f"Exim RCPT/s with relaygate ({what}) vs without (x)",
                     statistics.median(m[name]) / base))
    const = statistics.median(m["constant"])
    print(f"  (not a target) relaygate TCP / constant server: "
          f"{statistics.median(m['relaygate']) / const:.2f}x; what any readsocket costs "
          f"Exim: constant / static = {const / base:.2f}x")
    print()
    print(f"{'target':<56}{'measured':>10}{'limit':>8}{'ratio':>7}  verdict")
    print("-" * 92)
    for label, ratio in rows[:2]:
        verdict = "meets" if ratio >= TARGET else "MISSES"
        print(f"{label:<56}{ratio:>10.2f}{TARGET:>8.2f}{ratio / TARGET:>7.2f}  {verdict}")
    if args.quick:
        print("\n(--quick: fewer, shorter rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
