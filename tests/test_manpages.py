"""Manual pages: made from the --help texts, current in the tree, installed, found by man."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import need_program
from relaygate.integrations.qmail.manpages import PAGES
from relaygate.manpages import all_pages, render, split_sections

TREE = Path(__file__).resolve().parent.parent / "man" / "man8"


def test_pages_in_the_tree_are_current(tmp_path: Path) -> None:
    # Made in a fresh interpreter, as a developer makes them (click caches each command's
    # help option on first use, so other tests in this process could change the text).
    fix = "regenerate: .venv/bin/python -m relaygate.manpages man/man8"
    subprocess.run([sys.executable, "-m", "relaygate.manpages", str(tmp_path)], check=True,
                   capture_output=True, timeout=120)
    fresh = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.8")}
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in TREE.glob("*.8")}
    assert sorted(on_disk) == sorted(fresh), fix
    for name, text in fresh.items():
        assert on_disk[name] == text, f"man/man8/{name} is stale; {fix}"


def test_one_page_per_program_and_subcommand() -> None:
    from relaygate.cli import COMMANDS

    names = set(all_pages())
    assert {f"{p}.8" for p in PAGES} <= names  # relay-ctrl-check.8 ...
    assert {f"relaygate-{c}.8" for c in COMMANDS} <= names
    assert "relaygate.8" in names


def test_a_page_says_what_help_says() -> None:
    from click.testing import CliRunner

    from relaygate.cli import main

    page = (TREE / "relaygate-queue.8").read_text(encoding="utf-8")
    shown = CliRunner().invoke(main, ["queue", "hold", "--help"], terminal_width=78).output
    for line in shown.splitlines()[2:]:
        if line.strip():
            assert line.replace("\\", "\\e") in page, line
    chain = (TREE / "relay-ctrl-check.8").read_text(encoding="utf-8")
    for line in PAGES["relay-ctrl-check"].splitlines():
        if line.startswith("  ") and line.strip():
            assert line[2:].replace("\\", "\\e") in chain, line


def test_roff_control_characters_are_escaped() -> None:
    text = render("x", split_sections("NAME\n  x - y\n\nDESCRIPTION\n  .dot first\n"
                                      "  'quote\n  back\\slash\n"))
    assert "\n\\&.dot first\n" in text and "\n\\&'quote\n" in text
    assert "back\\eslash" in text and text.startswith('.TH "X" "8"')


def test_installed_with_the_package_and_found_by_man() -> None:
    installed = Path(sys.prefix) / "share" / "man" / "man8"
    for name in ("relaygate.8", "relaygate-queue.8", "relay-ctrl-check.8"):
        assert (installed / name).read_text(encoding="utf-8") == (TREE / name).read_text(
            encoding="utf-8"), f"{installed / name}: run pip install -e . again"
    man = need_program("man")  # man-db, installed by scripts/test
    env = {**os.environ, "MANPATH": f"{Path(sys.prefix) / 'share' / 'man'}:"}
    found = subprocess.run([man, "-w", "relaygate-queue"], capture_output=True, text=True,
                           env=env, timeout=60)
    assert found.stdout.strip() == str(installed / "relaygate-queue.8"), found
    # man-db (Debian) also finds them with the venv's bin on $PATH and no MANPATH (README)
    plain = {k: v for k, v in os.environ.items() if k != "MANPATH"}
    plain["PATH"] = f"{Path(sys.prefix) / 'bin'}:/usr/bin:/bin"
    found = subprocess.run([man, "-w", "relaygate"], capture_output=True, text=True,
                           env=plain, timeout=60)
    assert found.stdout.strip() == str(installed / "relaygate.8"), found
    text = subprocess.run([man, "relaygate-report"], capture_output=True, text=True,
                          env={**env, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80"},
                          timeout=60)
    assert "relaygate report [OPTIONS]" in text.stdout, text
