"""bench/run's collection of targets from the bench scripts' output (no benchmark runs)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).parent.parent


def _load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("bench_run", str(ROOT / "bench" / "run"))
    spec = importlib.util.spec_from_loader("bench_run", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod  # dataclasses look their module up
    loader.exec_module(mod)
    return mod


def test_parses_result_lines() -> None:
    run = _load()
    out = ('noise\nRESULT {"name": "serve idle RSS (MB)", "value": 37.1, "unit": "", '
           '"target": 60.0, "ok": true}\nRESULT {"name": "errors", "value": 2, '
           '"target": 0, "ok": false}\nRESULT not json\n')
    got = run.parse("serve", out)
    assert [(t.name, t.measured, t.limit, t.ratio, t.verdict) for t in got] == [
        ("serve idle RSS (MB)", "37.1", "60", "0.62", "meets"),
        ("errors", "2", "0", "-", "MISSES"),
    ]


def test_parses_target_tables_loosely() -> None:
    run = _load()
    out = """relaygate store benchmark
store   n  p50
sqlite 10  1.0

target                                measured   limit  ratio  verdict
------------------------------------------------------------------------
sqlite get p99 at 1,000,000 (us)        12.345   100.0   0.12  meets
spool age / find, 1% expired             0.900     1.0   0.90  meets
redis age 10,000 of 1,000,000 (s)        2.000     1.0   2.00  MISSES

(--quick: ...)
"""
    got = run.parse("stores", out)
    assert [t.name for t in got] == ["sqlite get p99 at 1,000,000 (us)",
                                     "spool age / find, 1% expired",
                                     "redis age 10,000 of 1,000,000 (s)"]
    assert got[2].verdict == "MISSES" and got[2].ratio == "2.00" and got[0].limit == "100.0"


def test_a_limit_written_with_a_space_is_one_cell() -> None:
    run = _load()
    out = """target                                   measured    limit  ratio verdict
FETCH 1000 x 10 KB MB/s vs Dovecot           1.36     >= 0.5   2.72 ok
SELECT after pruning 1000 stale (s)         0.004    <= 0.1   0.04 ok
"""
    got = run.parse("imap", out)
    assert [(t.name, t.measured, t.limit, t.ratio, t.verdict) for t in got] == [
        ("FETCH 1000 x 10 KB MB/s vs Dovecot", "1.36", ">=0.5", "2.72", "ok"),
        ("SELECT after pruning 1000 stale (s)", "0.004", "<=0.1", "0.04", "ok")]


def test_help_and_unknown_benchmark() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run"), "--help"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--quick" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run"), "--only", "nope"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no such benchmark: nope" in r.stderr
