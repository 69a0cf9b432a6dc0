"""Benchmark: does one IMAP client repeating a 10 MB FETCH slow SMTP in the same process?

Usage: ``python bench/imapstall.py [--quick]``. Prints a table, never asserts.

One ``relaygate serve`` subprocess (SMTP and IMAP on free loopback ports, its
own data directory under /tmp, memory store) and two users: ``bench``, whose
Maildir holds a 10 MB message of 70-character lines (CRLF line ends, as
relaygate's SMTP server stores what it receives; ``--bare-lf`` writes LF ends
instead, so that every FETCH also fixes line ends), and ``mail``, to whom the
SMTP messages go. Rounds alternate between:

- **idle**: Postfix's ``smtp-source -s 1 -l 1024 -m N`` (one connection at a
  time, one message each: greeting, EHLO, MAIL, RCPT to the local user, DATA,
  QUIT; each message fsynced into ``mail``'s Maildir before its 250) against
  the SMTP listener; the latency per message is the run's wall time / N;
- **loaded**: the same while another process, logged in over IMAP as
  ``bench``, repeats ``FETCH 1 BODY.PEEK[]`` of the 10 MB message as fast as
  it can read it;
- **control** (for reading): the same FETCH load, served by a separate
  ``relaygate imapd`` process over the same Maildir: what the machine's CPUs
  (shared by the IMAP client, the server and smtp-source) cost SMTP without
  any sharing of serve's event loop.

Without ``smtp-source`` (Debian package postfix) a Python client does the same
dialogue. Medians and ranges over the rounds; target: loaded / idle <= 2.
Also printed, for reading: the FETCH throughput during the loaded rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "example.org"
PASSWORD = "bench password 0123456789"
BIG = 10 * 1024 * 1024
TARGET = 2.0

#: the IMAP client: log in, select, repeat the FETCH until SIGTERM; print rounds and bytes
FETCHER = r"""
import re, signal, socket, sys, time
port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
s = socket.create_connection(("127.0.0.1", port))
f = s.makefile("rb", buffering=1 << 20)
f.readline()
def command(tag, text):
    s.sendall(tag + b" " + text + b"\r\n")
    got = 0
    while True:
        line = f.readline()
        if not line:
            raise SystemExit("connection closed")
        got += len(line)
        m = re.search(rb"\{(\d+)\}\r\n$", line)
        if m:
            n = int(m.group(1))
            while n:
                chunk = f.read(min(n, 1 << 20))
                n -= len(chunk)
                got += len(chunk)
        elif line.startswith(tag + b" "):
            if not line.startswith(tag + b" OK"):
                raise SystemExit(line)
            return got
command(b"a", b'LOGIN %s "%s"' % (user.encode(), password.encode()))
command(b"b", b"SELECT INBOX")
print("ready", flush=True)
rounds = total = 0
start = time.perf_counter()
while not stop:
    total += command(b"c", b"FETCH 1 BODY.PEEK[]")
    rounds += 1
print(rounds, total, time.perf_counter() - start, flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], err: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError("serve exited: " + err.read_text())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"),
                                                    out.get("PYTHONPATH", "")) if p)
    return out


def setup(work: Path, eol: bytes) -> Path:
    """The data directory with one user and a 10 MB message in its Maildir."""
    sys.path.insert(0, str(ROOT / "src"))
    from relaygate.config import Settings
    from relaygate.mail.accounts.db import open_directory
    from relaygate.mail.maildir import deliver

    data = work / "data"
    users = open_directory(Settings(data_dir=data, domains=(DOMAIN,), hostname="mx.example.org"))
    users.add("bench", PASSWORD, domain=DOMAIN, addresses=[f"bench@{DOMAIN}"])
    users.add("mail", PASSWORD, domain=DOMAIN, addresses=[f"mail@{DOMAIN}"])
    account = users.find_account("bench")
    users.close()
    assert account is not None
    line = b"x" * 70 + eol
    head = b"From: a@example.org%bTo: bench@example.org%bSubject: big%b%b" % (eol, eol, eol, eol)
    deliver(account.maildir, head + line * ((BIG - len(head)) // len(line)))
    return data


def smtp_source_round(exe: str, port: int, n: int) -> float:
    """Seconds per message, one connection and message at a time."""
    argv = [exe, "-s", "1", "-l", "1024", "-m", str(n), "-f", "sender@bench.example",
            "-t", f"mail@{DOMAIN}", "-M", "bench.example", f"127.0.0.1:{port}"]
    started = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - started
    if p.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({p.returncode}): {p.stderr.strip()[:300]}")
    return took / n


def python_round(port: int, n: int) -> float:
    """The same as smtp-source -s 1, with smtplib (when smtp-source is not installed)."""
    body = "Subject: bench\r\n\r\n" + ("y" * 70 + "\r\n") * 13
    started = time.perf_counter()
    for _ in range(n):
        with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.example") as c:
            c.sendmail("sender@bench.example", [f"mail@{DOMAIN}"], body)
    return (time.perf_counter() - started) / n


def fmt(values: list[float], scale: float, unit: str) -> str:
    return (f"{statistics.median(values) * scale:.3g} {unit} "
            f"[{min(values) * scale:.3g}-{max(values) * scale:.3g}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bare-lf", action="store_true",
                        help="store the 10 MB message with LF line ends")
    args = parser.parse_args()
    rounds, per_round = (3, 50) if args.quick else (5, 150)
    exe = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    have_source = os.access(exe, os.X_OK)
    work = Path(tempfile.mkdtemp(prefix="relaygate-bench-imapstall-"))
    smtp_port, imap_port, other_port = free_port(), free_port(), free_port()
    serve: subprocess.Popen[bytes] | None = None
    imapd: subprocess.Popen[bytes] | None = None
    idle: list[float] = []
    loaded: list[float] = []
    control: list[float] = []
    fetch_mbs: list[float] = []
    try:
        data = setup(work, b"\n" if args.bare_lf else b"\r\n")
        err = work / "serve.err"
        with open(err, "wb") as err_f:
            serve = subprocess.Popen(
                [sys.executable, "-m", "relaygate", "serve", "--data-dir", str(data),
                 "--domain", DOMAIN, "--hostname", "mx.example.org", "--store", "memory:",
                 "--smtp", f"127.0.0.1:{smtp_port}", "--submission", "off",
                 "--pop3", "off", "--imap", f"127.0.0.1:{imap_port}", "--log-level", "warning"],
                stdout=subprocess.DEVNULL, stderr=err_f, env=env(), cwd=work)
        wait_port(smtp_port, serve, err)
        wait_port(imap_port, serve, err)
        other_err = work / "imapd.err"
        with open(other_err, "wb") as err_f:
            imapd = subprocess.Popen(
                [sys.executable, "-m", "relaygate", "--data-dir", str(data), "--store", "memory:",
                 "imapd", "--listen", f"127.0.0.1:{other_port}", "--listen-tls", "off",
                 "--log-level", "warning"],
                stdout=subprocess.DEVNULL, stderr=err_f, env=env(), cwd=work)
        wait_port(other_port, imapd, other_err)

        def one_round() -> float:
            if have_source:
                return smtp_source_round(exe, smtp_port, per_round)
            return python_round(smtp_port, per_round)

        one_round()  # warm-up: first deliveries, imports
        phases = ["idle", "loaded", "control"]
        for r in range(rounds):
            for phase in phases[r % 3:] + phases[:r % 3]:
                if phase == "idle":
                    idle.append(one_round())
                    continue
                port = imap_port if phase == "loaded" else other_port
                fetcher = subprocess.Popen(
                    [sys.executable, "-c", FETCHER, str(port), "bench", PASSWORD],
                    stdout=subprocess.PIPE, env=env())
                assert fetcher.stdout is not None
                if fetcher.stdout.readline().strip() != b"ready":
                    raise RuntimeError("the IMAP client did not log in")
                time.sleep(0.5)  # the FETCHes are under way
                try:
                    (loaded if phase == "loaded" else control).append(one_round())
                finally:
                    fetcher.send_signal(signal.SIGTERM)
                    out, _ = fetcher.communicate(timeout=120)
                n, total, secs = out.split()
                if int(n) < 2:
                    raise RuntimeError(f"only {n} FETCH completed during the round")
                if phase == "loaded":
                    fetch_mbs.append(int(total) / float(secs) / 1e6)
    finally:
        if imapd is not None and imapd.poll() is None:
            imapd.send_signal(signal.SIGTERM)
            try:
                imapd.wait(60)
            except subprocess.TimeoutExpired:
                imapd.kill()
        if serve is not None and serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()
        shutil.rmtree(work, ignore_errors=True)

    client = "smtp-source -s 1 -l 1024" if have_source else "Python client, one at a time"
    print(f"SMTP latency per message ({client}, {per_round} messages per round, "
          f"{rounds} rounds)")
    print(f"  idle:                       {fmt(idle, 1000, 'ms')}")
    print(f"  while a 10 MB FETCH repeats: {fmt(loaded, 1000, 'ms')}")
    print(f"  the repeated FETCH meanwhile: {fmt(fetch_mbs, 1, 'MB/s')}")
    print(f"  control, the FETCH served by another process: {fmt(control, 1000, 'ms')} "
          f"({statistics.median(control) / statistics.median(idle):.2f}x idle)")
    ratio = statistics.median(loaded) / statistics.median(idle)
    print()
    print(f"{'target':<46} {'measured':>9} {'limit':>8} {'ratio':>6} verdict")
    print(f"{'SMTP -s 1 latency, 10 MB FETCH repeating / idle':<46} {ratio:>9.2f} "
          f"{'<=2':>8} {ratio / TARGET:>6.2f} {'ok' if ratio <= TARGET else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
