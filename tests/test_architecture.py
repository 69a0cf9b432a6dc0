"""The rooms of the package and what each may import (docs/architecture.md), enforced.

Read from the source with ``ast`` (every import that runs, at the top of a module or
inside a function; ``if TYPE_CHECKING:`` blocks are for mypy only and do not count):

- no import cycle;
- the model (top-level modules), ``stores/``, ``protocols/`` and ``mail/`` never import
  ``servers/`` or ``commands/``;
- ``protocols/`` never imports asyncio, socket, sqlite3 or redis (bytes in, events out);
- no server takes a private name (``_x``) from a store;
- no module is over 900 lines;
- the qmail chain programs, imported in a fresh interpreter, load no server, command or
  runtime module and not asyncio (their start-up budget, bench/chain.py).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import relaygate

PKG = Path(relaygate.__file__).resolve().parent
MAX_LINES = 900
#: modules that are not model code although they sit at the top of the package:
#: the CLI and the wiring of running pieces may reach into every room
EDGE = {"relaygate.cli", "relaygate.entry", "relaygate.__main__", "relaygate.runtime",
        "relaygate.status"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str) -> list[tuple[str, str]]:
    """(module imported, name taken) for every import that runs; name '' for a module."""
    path = MODULES[name]
    out: list[tuple[str, str]] = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt)
                continue
            visit_one(child)

    def visit_one(child: ast.AST) -> None:
        if isinstance(child, ast.Import):
            out.extend((a.name, "") for a in child.names)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                base = ".".join([*up, base] if base else up)
            for a in child.names:
                full = f"{base}.{a.name}"
                out.append((full, "") if full in MODULES else (base, a.name))
        visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return out


GRAPH = {name: {m for m, _ in _imports(name) if m in MODULES and m != name}
         for name in MODULES}


def test_no_import_cycle() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            strong(v)
    assert cycles == []


def _room(name: str) -> str:
    parts = name.split(".")
    if len(parts) <= 2:
        return "edge" if name in EDGE else "model"
    return parts[1]


@pytest.mark.parametrize("room", ["model", "stores", "protocols", "mail"])
def test_lower_rooms_never_import_servers_or_commands(room: str) -> None:
    bad = {name: sorted(m for m in deps if m.startswith(("relaygate.servers",
                                                          "relaygate.commands")))
           for name, deps in GRAPH.items() if _room(name) == room}
    assert {k: v for k, v in bad.items() if v} == {}
    assert any(_room(name) == room for name in GRAPH)  # the room exists


def test_protocols_do_no_io() -> None:
    forbidden = ("asyncio", "socket", "sqlite3", "redis")
    found = {name: sorted({m for m, _ in _imports(name) if m.split(".")[0] in forbidden})
             for name in MODULES if _room(name) == "protocols"}
    assert {k: v for k, v in found.items() if v} == {}


def test_servers_take_no_private_name_from_a_store() -> None:
    found = [(name, f"{m}.{n}") for name in MODULES if _room(name) == "servers"
             for m, n in _imports(name) if m.startswith("relaygate.stores") and
             n.startswith("_")]
    assert found == []


def test_no_module_over_900_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {k: v for k, v in sizes.items() if v > MAX_LINES} == {}


@pytest.mark.parametrize("program", ["check", "allow", "age", "chdir", "send", "udp"])
def test_chain_programs_do_not_load_the_server_runtime(program: str) -> None:
    code = (f"import sys, relaygate.integrations.qmail.{program}\n"
            "bad = sorted(m for m in sys.modules if m == 'asyncio' or m.startswith(\n"
            "    ('relaygate.servers', 'relaygate.commands', 'relaygate.runtime')))\n"
            "print(','.join(bad))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == ""


def test_the_checks_see_what_they_check() -> None:
    """The graph is not empty-handed: a known edge and a known lazy import are seen."""
    assert "relaygate.control" in GRAPH["relaygate.servers.smtp.handler"] or \
        "relaygate.decision" in GRAPH["relaygate.servers.smtp.handler"]
    # a function-level import counts (commands import their services lazily)
    assert "relaygate.servers.pop3" in GRAPH["relaygate.commands.pop3d"]
    # TYPE_CHECKING imports do not
    assert "relaygate.mail.queue" not in GRAPH["relaygate.context"]
