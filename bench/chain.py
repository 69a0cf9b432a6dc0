"""qmail chain benchmark: relay-ctrl-check start-up, and connections per second.

Usage: ``python bench/chain.py [--quick]``. Prints tables, never asserts.

1. **Start-up**: wall time per invocation of ``relay-ctrl-check /bin/true``
   (a client with an open window, so the lookup, the ``USER``/``DOMAIN``
   export and the exec all happen) against ``python -I -S -c pass`` on the
   same interpreter, with ``/bin/true`` alone for scale. hyperfine when it is
   installed (``-N``), else an interleaved loop of ``posix_spawn``/``waitpid``;
   several short rounds, so load bursts on a shared machine hit both commands;
   the verdict uses the median of the per-round ratios. Target: at most 1.5x.
2. **Connections per second** on loopback, each connection served by a tiny
   program (``/bin/echo ok``) and read to the end by the client, with
   :data:`CONCURRENCY` clients at once from 127.0.0.2 (a client with an open
   relay window):

   (a) Debian ``tcpserver`` + relaygate ``relay-ctrl-check`` + the program;
   (b) ``relaygate tcpserver`` (relay decision in-process) + the program;
   (c) Debian ``tcpserver`` + the program, no check at all (the floor).

   Rounds alternate the three servers; each figure is the median over rounds.
   Targets: (b) at least 3x (a) and at least 0.8x (c).

Everything runs on 127.0.0.1 with a temporary spool, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PROGRAM = ["/bin/echo", "ok"]
EXPECTED_REPLY = b"ok\n"
CLIENT_IP = "127.0.0.2"
#: clients connecting at once (two cores here; more only measures queueing)
CONCURRENCY = 4

TARGET_STARTUP_RATIO = 1.5
TARGET_VS_CHECK = 3.0
TARGET_VS_FLOOR = 0.8


def result(name: str, value: float, target: float, ok: bool) -> None:
    """A line bench/run collects into its summary."""
    print("RESULT " + json.dumps({"name": name, "value": round(value, 3), "target": target,
                                  "ok": ok}))


# -- 1. start-up -------------------------------------------------------------------------


def startup_hyperfine(commands: list[list[str]], runs: int, env: dict[str, str]
                      ) -> list[list[float]]:
    """Every run's wall time (seconds) of each command, from one hyperfine call."""
    exe = shutil.which("hyperfine")
    assert exe is not None
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [exe, "-N", "--warmup", "3", "--runs", str(runs), "--export-json", out.name,
             *[" ".join(c) for c in commands]],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        data = json.loads(Path(out.name).read_text())
    return [list(r["times"]) for r in data["results"]]


def startup_loop(commands: list[list[str]], runs: int, env: dict[str, str]) -> list[list[float]]:
    """The same without hyperfine: posix_spawn + waitpid, commands interleaved."""
    times: list[list[float]] = [[] for _ in commands]
    null = os.open(os.devnull, os.O_RDWR)
    actions = [(os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, null, 2)]
    for i in range(runs + 3):
        for j, cmd in enumerate(commands):
            t = time.perf_counter()
            pid = os.posix_spawn(cmd[0], cmd, env, file_actions=actions)
            os.waitpid(pid, 0)
            if i >= 3:
                times[j].append(time.perf_counter() - t)
    os.close(null)
    return times


def startup_cpu(commands: list[list[str]], runs: int, env: dict[str, str]) -> list[float]:
    """Median CPU time (user + system, from wait4) per command, interleaved runs.

    CPU time hardly depends on what else the machine is doing, unlike wall time."""
    cpu: list[list[float]] = [[] for _ in commands]
    null = os.open(os.devnull, os.O_RDWR)
    actions = [(os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, null, 2)]
    for i in range(runs + 3):
        for j, cmd in enumerate(commands):
            pid = os.posix_spawn(cmd[0], cmd, env, file_actions=actions)
            _, _, usage = os.wait4(pid, 0)
            if i >= 3:
                cpu[j].append(usage.ru_utime + usage.ru_stime)
    os.close(null)
    return [statistics.median(c) for c in cpu]


def bench_startup(spool: Path, rounds: int, runs: int) -> None:
    """Rounds alternate the commands (a shared machine has load bursts): medians over all
    runs, and the median of the per-round ratios."""
    check = str(BIN / "relay-ctrl-check")
    true = shutil.which("true") or "/bin/true"
    commands = [[sys.executable, "-I", "-S", "-c", "pass"], [check, true], [true]]
    env = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": CLIENT_IP, "RELAY_CTRL_DIR": str(spool)}
    use_hyperfine = shutil.which("hyperfine") is not None
    measure = startup_hyperfine if use_hyperfine else startup_loop
    samples: list[list[float]] = [[] for _ in commands]
    ratios = []
    for _ in range(rounds):
        got = measure(commands, runs, env)
        for j, t in enumerate(got):
            samples[j] += t
        ratios.append(statistics.median(got[1]) / statistics.median(got[0]))
    medians = [statistics.median(t) for t in samples]
    base = medians[0]
    how = "hyperfine -N" if use_hyperfine else "interleaved posix_spawn loop"
    print(f"\n1. start-up per invocation ({how}; {rounds} rounds x {runs} runs; medians)")
    print(f"{'command':<44}{'ms':>8}{'vs python -I -S':>18}")
    labels = ["python -I -S -c pass", "relay-ctrl-check /bin/true (window open)", "/bin/true"]
    for label, m in zip(labels, medians, strict=True):
        print(f"{label:<44}{m * 1000:>8.2f}{m / base:>17.2f}x")
    ratio = statistics.median(ratios)
    print(f"per-round wall-time ratios check/python: {' '.join(f'{r:.2f}' for r in ratios)}")
    cpu = startup_cpu(commands, rounds * runs, env)
    print(f"CPU time (user+sys, wait4, medians): python {cpu[0] * 1000:.2f} ms, check "
          f"{cpu[1] * 1000:.2f} ms, /bin/true {cpu[2] * 1000:.2f} ms")
    cpu_ratio = cpu[1] / cpu[0]
    print("\ntarget                      measured  limit  ratio  verdict")
    for name, value in (("check start-up (wall)", ratio), ("check start-up (CPU)", cpu_ratio)):
        print(f"{name:<27} {value:8.2f}  {TARGET_STARTUP_RATIO:5.2f}  "
              f"{value / TARGET_STARTUP_RATIO:5.2f}  "
              f"{'meets' if value <= TARGET_STARTUP_RATIO else 'MISSES'}")


# -- 2. connections per second ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {proc.args}") from None
            time.sleep(0.05)


def one_connection(port: int) -> None:
    with socket.socket() as s:
        s.settimeout(30)
        s.bind((CLIENT_IP, 0))
        s.connect(("127.0.0.1", port))
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    if data != EXPECTED_REPLY:
        raise SystemExit(f"unexpected reply {data!r} from port {port}")


def rate(port: int, connections: int) -> float:
    """Connections per second with CONCURRENCY clients, ``connections`` in all."""
    left = [connections]
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            one_connection(port)

    threads = [threading.Thread(target=client) for _ in range(CONCURRENCY)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return connections / (time.perf_counter() - t)


class Servers:
    """The three servers of part 2, started once, stopped at the end."""

    def __init__(self, spool: Path) -> None:
        tcpserver = shutil.which("tcpserver")
        if tcpserver is None:
            raise SystemExit("Debian's tcpserver (ucspi-tcp) is not installed")
        env = {"PATH": f"{BIN}:/usr/bin:/bin", "RELAY_CTRL_DIR": str(spool)}
        self.procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        common = ["-R", "-H", "-l", "0", "-c", "100"]
        for key, argv in (
            ("a", [tcpserver, *common, "127.0.0.1", "{port}",
                   str(BIN / "relay-ctrl-check"), *PROGRAM]),
            ("b", [str(BIN / "relaygate"), "tcpserver", *common, "127.0.0.1", "{port}",
                   *PROGRAM]),
            ("c", [tcpserver, *common, "127.0.0.1", "{port}", *PROGRAM]),
        ):
            port = free_port()
            proc = subprocess.Popen([a.replace("{port}", str(port)) for a in argv], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs[key] = (proc, port)
        for proc, port in self.procs.values():
            wait_port(port, proc)

    def port(self, key: str) -> int:
        return self.procs[key][1]

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def bench_connections(spool: Path, rounds: int, fast_n: int, slow_n: int) -> None:
    servers = Servers(spool)
    rates: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    try:
        for key in rates:  # warm-up: page cache, pyc files
            rate(servers.port(key), 10)
        for _ in range(rounds):
            for key in ("a", "b", "c"):
                n = slow_n if key == "a" else fast_n
                rates[key].append(rate(servers.port(key), n))
    finally:
        servers.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n2. connections per second ({CONCURRENCY} concurrent clients, "
          f"{rounds} rounds, medians; {fast_n} connections a round, {slow_n} for (a))")
    print(f"{'server':<52}{'conn/s':>9}  rounds")
    rows = [("(a) Debian tcpserver + relay-ctrl-check + echo", "a"),
            ("(b) relaygate tcpserver + echo (decision in-process)", "b"),
            ("(c) Debian tcpserver + echo (no check, the floor)", "c")]
    for label, key in rows:
        spread = " ".join(f"{r:.0f}" for r in rates[key])
        print(f"{label:<52}{med[key]:>9.0f}  {spread}")
    vs_check = med["b"] / med["a"]
    vs_floor = med["b"] / med["c"]
    print(f"\n{'target':<22} measured  limit  ratio  verdict")
    for name, value, limit in (("(b)/(a) >= 3x", vs_check, TARGET_VS_CHECK),
                               ("(b)/(c) >= 0.8x", vs_floor, TARGET_VS_FLOOR)):
        print(f"{name:<22} {value:8.2f}  {limit:5.2f}  {value / limit:5.2f}  "
              f"{'meets' if value >= limit else 'MISSES'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run")
    args = ap.parse_args()
    for name in ("relay-ctrl-check", "relaygate"):
        if not (BIN / name).exists():
            raise SystemExit(f"{BIN / name} is missing: pip install -e . first")
    tmp = Path(tempfile.mkdtemp(prefix="relaygate-bench-chain-"))
    try:
        spool = tmp / "allow"
        spool.mkdir(mode=0o700)
        (spool / CLIENT_IP).write_bytes(b"USER=alice\0DOMAIN=example.org\0")
        print(f"interpreter: {sys.executable} (python {sys.version.split()[0]}), "
              f"{os.cpu_count()} cpus")
        if args.quick:
            bench_startup(spool, rounds=4, runs=10)
            bench_connections(spool, rounds=3, fast_n=100, slow_n=20)
        else:
            bench_startup(spool, rounds=12, runs=20)
            bench_connections(spool, rounds=5, fast_n=600, slow_n=100)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
