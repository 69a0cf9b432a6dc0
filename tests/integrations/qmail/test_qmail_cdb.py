"""tcpserver rules: our cdb reader against cdb files built by the real tcprules,
and our lookups against the real tcpserver's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from relaygate.integrations.qmail.tcpserver import (
    NO_RULE,
    ConnectionRules,
    RulesUnavailable,
    cdb_get,
    cdb_keys,
    decode_instructions,
)

from .helpers import Server, need_program, parse_env, start_debian_tcpserver, talk

RULES = """\
127.0.0.2:allow,RELAYCLIENT="",X="exact"
127.0.0.3-4:allow,X="range"
127.0.0.:allow,X="prefix24"
127.0.1.:deny
127.1.:allow,X="prefix16",RELAYCLIENT="@fixup"
:allow,X="default"
"""

#: source address -> (denied, X, RELAYCLIENT) as tcpserver applies RULES
EXPECTED = {
    "127.0.0.2": (False, "exact", ""),
    "127.0.0.3": (False, "range", None),
    "127.0.0.4": (False, "range", None),
    "127.0.0.5": (False, "prefix24", None),
    "127.0.1.9": (True, None, None),
    "127.1.2.3": (False, "prefix16", "@fixup"),
    "127.2.0.1": (False, "default", None),
}


def build_cdb(tmp_path: Path, text: str, name: str = "rules.cdb") -> Path:
    exe = need_program("tcprules")
    cdb = tmp_path / name
    subprocess.run([exe, str(cdb), str(tmp_path / "rules.tmp")], input=text.encode(),
                   check=True, capture_output=True)
    return cdb


def test_cdb_reader_reads_tcprules_output(tmp_path: Path) -> None:
    data = build_cdb(tmp_path, RULES).read_bytes()
    assert cdb_get(data, b"127.0.0.2") == b"+RELAYCLIENT=\0+X=exact\0"
    assert cdb_get(data, b"127.0.0.4") == b"+X=range\0"
    assert cdb_get(data, b"127.0.1.") == b"D\0"
    assert cdb_get(data, b"") == b"+X=default\0"
    assert cdb_get(data, b"127.0.0.9") is None
    assert decode_instructions(b"D\0") == (True, {})
    assert decode_instructions(b"+RELAYCLIENT=\0+X=a=b\0junk") == (
        False, {"RELAYCLIENT": "", "X": "a=b"})


def test_many_keys_and_collisions(tmp_path: Path) -> None:
    lines = [f"10.{i // 256}.{i % 256}.1:allow,N=\"{i}\"" for i in range(3000)]
    data = build_cdb(tmp_path, "\n".join(lines) + "\n").read_bytes()
    for i in (0, 1, 255, 256, 1234, 2999):
        assert cdb_get(data, f"10.{i // 256}.{i % 256}.1".encode()) == f"+N={i}\0".encode()
    assert cdb_get(data, b"10.99.99.1") is None


def test_corrupt_cdb_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cdb"
    bad.write_bytes(b"\xff" * 2048)
    rules = ConnectionRules(str(bad))
    with pytest.raises(RulesUnavailable):
        rules.lookup("127.0.0.1")


def test_lookup_order() -> None:
    assert cdb_keys("127.0.0.2") == [b"127.0.0.2", b"127.0.0.", b"127.0.", b"127.", b""]
    assert cdb_keys("2001:db8::1")[:3] == [b"2001:db8::1", b"2001:db8::", b"2001:db8:"]


@pytest.mark.parametrize("fmt", ["cdb", "text"])
def test_connection_rules_match_tcpserver_semantics(tmp_path: Path, fmt: str) -> None:
    if fmt == "cdb":
        path = build_cdb(tmp_path, RULES)
    else:
        path = tmp_path / "rules.txt"
        path.write_text(RULES)
    rules = ConnectionRules(str(path))
    for ip, (deny, x, relayclient) in EXPECTED.items():
        hit = rules.lookup(ip)
        assert hit.deny == deny, ip
        if not deny:
            assert hit.env.get("X") == x, ip
            assert hit.env.get("RELAYCLIENT") == relayclient, ip


def test_rules_reload_and_missing_file(tmp_path: Path) -> None:
    path = build_cdb(tmp_path, "127.0.0.2:deny\n")
    rules = ConnectionRules(str(path))
    assert rules.lookup("127.0.0.2").deny
    # tcprules replaces the file atomically; the next connection sees the new rules
    build_cdb(tmp_path, "127.0.0.2:allow,X=\"new\"\n")
    assert rules.lookup("127.0.0.2").env == {"X": "new"}
    os.unlink(path)
    with pytest.raises(RulesUnavailable):
        rules.lookup("127.0.0.2")
    assert ConnectionRules(str(path), allow_missing=True).lookup("127.0.0.2") is NO_RULE


def test_same_answers_as_debian_tcpserver(tmp_path: Path, servers: list[Server]) -> None:
    """The real tcpserver with -x rules.cdb, each source address: same deny/variables."""
    cdb = build_cdb(tmp_path, RULES)
    server = start_debian_tcpserver(["-x", str(cdb)], ["/usr/bin/env"], {},
                                    tmp_path / "log")
    servers.append(server)
    ours = ConnectionRules(str(cdb))
    for ip in EXPECTED:
        output = talk(server.port, source=ip)
        theirs = parse_env(output)
        hit = ours.lookup(ip)
        assert (output == b"") == hit.deny, ip
        if not hit.deny:
            for name in ("X", "RELAYCLIENT"):
                assert theirs.get(name) == hit.env.get(name), (ip, name)
