"""Benchmark: memory after floods of failed TLS handshakes on an implicit-TLS listener.

Usage: ``python bench/tlsflood.py [--quick] [--clients N] [--rounds N]``. Prints a
table, never asserts.

Two servers, each a subprocess of the same interpreter, take the same floods
side by side:

- ``asyncio ssl=``: a bare ``loop.create_server(..., ssl=context)`` (what
  relaygate's smtps/pop3s/imaps listeners were before; any asyncio TLS server);
- ``relaygate smtps``: ``relaygate serve``'s smtps listener.

A flood is N clients (1000; --quick 300) that connect at once, each send one
payload and close: ``garbage`` is the issue's ``b"\\x16\\x03\\x01garbage" * 10``;
``record`` is a well-formed record header with an 80-octet junk body, which
gets as far as OpenSSL. After each round the server's VmRSS is read once it
has settled; the table gives the growth over the idle RSS after the last
round (and after each round), per server and payload, and the ratio.
Target (issue 13): the relaygate listener grows by at most 40 MB after
1000 garbage handshakes. Each target is also printed as a ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_MB = 40.0
PAYLOADS = {
    "garbage": b"\x16\x03\x01garbage" * 10,
    "record": b"\x16\x03\x01\x00\x50" + b"g" * 0x50,
}
BARE_SERVER = """
import asyncio, ssl, sys
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(sys.argv[1])
class P(asyncio.Protocol):
    def connection_made(self, t):
        t.write(b"220 ready\\r\\n")
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[2]),
                                                         ssl=ctx, backlog=4096)
    await srv.serve_forever()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def settled(pid: int) -> float:
    last = rss_mb(pid)
    for _ in range(40):
        time.sleep(0.5)
        now = rss_mb(pid)
        if abs(now - last) < 0.5:
            return now
        last = now
    return last


def wait_port(port: int, proc: subprocess.Popen[bytes], err: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError("server exited: " + err.read_text(errors="replace"))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def start_bare(work: Path, pem: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    err = work / "bare.err"
    proc = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(pem), str(port)],
                            stdout=subprocess.DEVNULL, stderr=open(err, "wb"))
    wait_port(port, proc, err)
    return proc, port


def start_serve(work: Path, pem: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.pop("RELAYGATE_CONFIG", None)
    me = pwd.getpwuid(os.geteuid()).pw_name
    err = work / "serve.err"
    args = [sys.executable, "-m", "relaygate", "serve", "--data-dir", str(work / "data"),
            "--user", me, "--domain", "example.org", "--tls-cert", str(pem),
            "--tls-key", str(pem), "--smtp", f"127.0.0.1:{free_port()}",
            "--submission", "off", "--smtps", f"127.0.0.1:{port}", "--pop3", "off",
            "--imap", "off", "--pop3s", "off", "--imaps", "off", "--log-level", "warning"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(err, "wb"),
                            env=env, cwd=work)
    wait_port(port, proc, err)
    return proc, port


def flood(port: int, clients: int, payload: bytes) -> None:
    socks: list[socket.socket] = []
    try:
        for _ in range(clients):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        for s in socks:
            try:
                s.sendall(payload)
            except OSError:
                pass
        time.sleep(0.5)
    finally:
        for s in socks:
            s.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 clients, 2 rounds")
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    clients = args.clients or (300 if args.quick else 1000)
    rounds = args.rounds or (2 if args.quick else 3)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * clients + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    import trustme

    work = Path(tempfile.mkdtemp(prefix="relaygate-bench-tlsflood-"))
    rows: list[tuple[str, str, list[float]]] = []
    try:
        pem = work / "server.pem"
        trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            str(pem))
        for payload in PAYLOADS:
            for name, starter in (("asyncio ssl=", start_bare), ("relaygate smtps", start_serve)):
                proc, port = starter(work, pem)
                try:
                    base = settled(proc.pid)
                    growth = []
                    for _ in range(rounds):
                        flood(port, clients, PAYLOADS[payload])
                        growth.append(settled(proc.pid) - base)
                    print(f"  .. {name} {payload}: idle {base:.1f} MB, growth after each "
                          f"round {', '.join(f'{g:.1f}' for g in growth)} MB",
                          file=sys.stderr, flush=True)
                    rows.append((name, payload, growth))
                finally:
                    stop(proc)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"failed TLS handshakes, {clients} clients at once per round, {rounds} rounds: "
          f"python {platform.python_version()}, Linux {platform.release()}, "
          f"{os.cpu_count()} cpus")
    print()
    head = f"{'server':<18} {'payload':<8} {'after round 1':>14} {'after last':>11}  (MB)"
    print(head)
    print("-" * len(head))
    for name, payload, growth in rows:
        print(f"{name:<18} {payload:<8} {growth[0]:>14.1f} {growth[-1]:>11.1f}")
    print()
    by = {(n, p): g for n, p, g in rows}
    head = f"{'target':<52} {'measured':>9} {'limit':>7} {'ratio':>6}  verdict"
    print(head)
    print("-" * len(head))
    ours = by[("relaygate smtps", "garbage")][0]
    name = f"relaygate smtps RSS growth, {clients} garbage handshakes (MB)"
    ok = ours <= TARGET_MB
    print(f"{name:<52} {ours:>9.1f} {TARGET_MB:>7.1f} {ours / TARGET_MB:6.2f}  "
          f"{'meets' if ok else 'MISSES'}")
    for payload in PAYLOADS:
        bare, mine = by[("asyncio ssl=", payload)][-1], by[("relaygate smtps", payload)][-1]
        print(f"  {payload}: asyncio ssl= / relaygate growth after {rounds} rounds: "
              f"{bare:.1f} / {mine:.1f} MB = {bare / max(mine, 0.1):.1f}x")
    print()
    print("RESULT " + json.dumps({"name": name, "value": round(ours, 1), "unit": "MB",
                                  "target": TARGET_MB, "ok": ok}))


if __name__ == "__main__":
    main()
