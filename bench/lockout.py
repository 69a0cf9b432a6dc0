"""Lockout benchmark: how many concurrent password guesses get a full password check.

Usage: ``python bench/lockout.py [--quick] [--production]``. Prints a table, never asserts.

Two attacks on the login path POP3, IMAP and SMTP AUTH share
(``UserDB.authenticate``), each launched at once with ``asyncio.gather``
against a real user database in a temporary directory, with the default
throttle (5 failures in 300 s lock the address and the account for 900 s) and
the default failure delay:

1. **one address**: 20 guesses for one account from one address, the right
   password last;
2. **many addresses**: 60 guesses for one account from 60 addresses, the right
   password last.

For each, the table gives how many attempts got a full password check
(counted by the hasher), whether the right password got in, and the wall time
of the whole burst. With the throttle counting attempts in flight at most 5
are checked and the right password is refused; a throttle that counts only
finished failures checks all of them and lets the last one in. The hash is a
small argon2id by default (the count does not depend on its cost; each check
is padded to 20 ms so attempts overlap as production ones do);
``--production`` uses the RFC 9106 low-memory parameters instead. Medians and
ranges over several rounds, each with a fresh database.

The script uses only ``UserDB``'s public API, so it also runs against older
trees (``PYTHONPATH=/old/checkout/src``) for before/after figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from argon2 import PasswordHasher

from relaygate.config import AuthSettings
from relaygate.mail.accounts.db import UserDB
from relaygate.mail.accounts.hashes import production_hasher

#: the default throttle: the most checks a key may get in one window
BUDGET = AuthSettings().throttle_failures
#: a check padded to at least this long, so a burst overlaps as production hashes do
CHECK_SECONDS = 0.02


class CountingHasher(PasswordHasher):
    """Counts full password checks (thread-safe: checks run on a pool)."""

    def __init__(self, *args: object, pad: float = 0.0, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.checks = 0
        self.pad = pad
        self._lock = threading.Lock()

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        with self._lock:
            self.checks += 1
        started = time.monotonic()
        try:
            return bool(super().verify(hash, password))
        finally:
            rest = self.pad - (time.monotonic() - started)
            if rest > 0:
                time.sleep(rest)


def make_hasher(production: bool) -> CountingHasher:
    if production:
        p = production_hasher()
        return CountingHasher(time_cost=p.time_cost, memory_cost=p.memory_cost,
                              parallelism=p.parallelism)
    return CountingHasher(time_cost=1, memory_cost=8, parallelism=1, pad=CHECK_SECONDS)


async def burst(tmp: Path, production: bool, attempts: int,
                many_addresses: bool) -> tuple[int, bool, float]:
    hasher = make_hasher(production)
    data = tmp / f"data-{time.monotonic_ns()}"
    db = UserDB(data / "users.db", AuthSettings(), data, hasher=hasher,
                default_domain="example.test")
    try:
        db.add("alice", "right-password")
        db.add("bob", "bob-password")
        hasher.checks = 0

        def ip(i: int) -> str:
            return f"127.1.{i // 250}.{i % 250 + 1}" if many_addresses else "127.1.0.1"

        tries = [db.authenticate("alice", f"guess-{i}", ip(i)) for i in range(attempts - 1)]
        tries.append(db.authenticate("alice", "right-password", ip(attempts - 1)))
        started = time.perf_counter()
        results = await asyncio.gather(*tries)
        took = time.perf_counter() - started
        return hasher.checks, bool(results[-1].ok), took
    finally:
        db.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--production", action="store_true",
                    help="production argon2id parameters (64 MiB, t=3, p=4)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # one login.failed line per guess is not the result
    rounds = 3 if args.quick else 7
    print(f"relaygate lockout benchmark ({rounds} rounds, "
          f"{'production' if args.production else 'small'} argon2id, budget {BUDGET}, "
          f"python {sys.version.split()[0]})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="relaygate-bench-lockout-") as tmp:
        for name, attempts, many in (("one address", 20, False),
                                     ("many addresses", 60, True)):
            runs = [asyncio.run(burst(Path(tmp), args.production, attempts, many))
                    for _ in range(rounds)]
            checks = [r[0] for r in runs]
            got_in = sum(r[1] for r in runs)
            took = [r[2] for r in runs]
            med = statistics.median(checks)
            rows.append((f"{name}: {attempts} guesses", med, min(checks), max(checks),
                         got_in, rounds, statistics.median(took)))
            print("RESULT " + json.dumps({
                "name": f"lockout {name}: checked of {attempts} concurrent guesses",
                "value": med, "target": BUDGET, "ok": max(checks) <= BUDGET and got_in == 0}))
    print()
    print(f"{'attack':<28} {'checked (median)':>16} {'range':>9} {'right pw got in':>16} "
          f"{'burst s':>8}")
    for name, med, lo, hi, got_in, n, took in rows:
        print(f"{name:<28} {med:>16g} {f'{lo}-{hi}':>9} {f'{got_in}/{n}':>16} {took:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
