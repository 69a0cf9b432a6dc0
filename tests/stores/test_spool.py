"""The spool store: byte compatibility with relay-ctrl 3.x and distrust of planted files."""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaygate.control import RelayControl
from relaygate.decision import Verdict
from relaygate.errors import InvalidAddress, StoreError
from relaygate.grants import Grant
from relaygate.stores import open_store
from relaygate.stores.spool import MAX_FILE_BYTES, SpoolStore, format_content, parse_content

EXPIRY = 900.0
NOW = float(int(time.time())) + 0.5


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    d = tmp_path / "allow"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def store(spool: Path) -> SpoolStore:
    return SpoolStore(spool, expiry=EXPIRY)


def plant(spool: Path, name: str, content: bytes, mtime: float = NOW) -> Path:
    """Write a file the way relay-ctrl-allow (or an attacker) would."""
    p = spool / name
    p.write_bytes(content)
    os.utime(p, (mtime, mtime))
    return p


def g(ip: str, user: str | None = "alice", domain: str | None = "example.org",
      opened: float = NOW, ttl: float = EXPIRY) -> Grant:
    return Grant(ip, user, domain, "pop3", opened, opened + ttl)


# -- the bytes on disk -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "domain", "content"),
    [
        ("alice", "example.org", b"USER=alice\0DOMAIN=example.org\0"),
        ("alice", None, b"USER=alice\0"),
        (None, "example.org", b"DOMAIN=example.org\0"),
        (None, None, b""),
        ("jos\u00e9", None, "USER=jos\u00e9\0".encode()),
    ],
)
def test_golden_bytes(store: SpoolStore, spool: Path, user: str | None, domain: str | None,
                      content: bytes) -> None:
    store.put(g("192.0.2.1", user, domain))
    assert (spool / "192.0.2.1").read_bytes() == content
    assert os.listdir(spool) == ["192.0.2.1"]  # no temp file left behind


def test_file_mode_0600_whatever_the_umask(store: SpoolStore, spool: Path) -> None:
    old = os.umask(0)
    try:
        store.put(g("192.0.2.1"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((spool / "192.0.2.1").stat().st_mode) == 0o600


def test_mtime_is_opened_time(store: SpoolStore, spool: Path) -> None:
    store.put(g("192.0.2.1", opened=NOW - 100))
    assert (spool / "192.0.2.1").stat().st_mtime == pytest.approx(NOW - 100, abs=1e-6)


def test_ipv6_file_name_is_rfc5952(store: SpoolStore, spool: Path) -> None:
    control = RelayControl(store, expiry=EXPIRY)
    control.open_window("2001:0DB8:0000:0000:0000:0000:0000:0001", user="bob", source="imap",
                        now=NOW)
    control.open_window("::FFFF:198.51.100.7", user="carol", source="pop3", now=NOW)
    assert sorted(os.listdir(spool)) == ["198.51.100.7", "2001:db8::1"]


def test_written_to_a_temp_file_then_renamed(
    store: SpoolStore, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, str, bytes, int]] = []
    real_rename = os.rename

    def spy(src: str, dst: str, **kw: object) -> None:
        path = src if kw.get("src_dir_fd") is None else os.path.join(spool, src)
        st = os.stat(path)
        seen.append((os.path.basename(src), os.path.basename(dst), Path(path).read_bytes(),
                     stat.S_IMODE(st.st_mode)))
        real_rename(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", spy)  # the os module spool.py calls
    store.put(g("192.0.2.1", "alice", None))
    assert len(seen) == 1
    tmp, dst, content, mode = seen[0]
    m = re.fullmatch(r"\.(\d+)\.(\d+):(\d+)", tmp)
    assert m, tmp
    assert int(m.group(3)) == os.getpid()
    assert abs(int(m.group(1)) - time.time()) < 60
    assert 0 <= int(m.group(2)) < 1_000_000
    assert dst == "192.0.2.1"
    assert content == b"USER=alice\0"  # complete before it gets its name
    assert mode == 0o600


# -- expiry is mtime + expiry, as relay-ctrl-check computes it -------------------------------


def test_relay_ctrl_written_file_is_read_by_mtime(store: SpoolStore, spool: Path) -> None:
    plant(spool, "192.0.2.1", b"USER=alice\0DOMAIN=example.org\0", mtime=NOW - 899)
    got = store.get("192.0.2.1", NOW)
    assert got == Grant("192.0.2.1", "alice", "example.org", "qmail", NOW - 899, NOW + 1)


def test_expired_file_is_ignored_and_deleted(store: SpoolStore, spool: Path) -> None:
    plant(spool, "192.0.2.1", b"USER=alice\0", mtime=NOW - 901)
    assert store.get("192.0.2.1", NOW) is None
    assert not (spool / "192.0.2.1").exists()


def test_boundary_is_inclusive(store: SpoolStore, spool: Path) -> None:
    plant(spool, "192.0.2.1", b"", mtime=NOW - EXPIRY)  # mtime + expiry == now: still open
    assert store.get("192.0.2.1", NOW) is not None
    assert store.age(NOW) == 0


def test_other_ttl_is_stored_through_the_mtime(store: SpoolStore, spool: Path) -> None:
    store.put(g("192.0.2.1", opened=NOW, ttl=60))
    # mtime + expiry == expires_at, so relay-ctrl-check (C) agrees on the expiry
    assert (spool / "192.0.2.1").stat().st_mtime == pytest.approx(NOW + 60 - EXPIRY, abs=1e-6)
    got = store.get("192.0.2.1", NOW + 59)
    assert got is not None
    assert got.expires_at == pytest.approx(NOW + 60)
    assert got.opened_at == pytest.approx(NOW + 60 - EXPIRY)  # documented: opened = mtime
    assert store.get("192.0.2.1", NOW + 61) is None


def test_expired_file_replaced_meanwhile_is_not_deleted(store: SpoolStore, spool: Path) -> None:
    old = plant(spool, "192.0.2.1", b"USER=old\0", mtime=NOW - 2000)
    st = old.stat()
    fresh = plant(spool, ".tmp", b"USER=new\0", mtime=NOW)
    os.rename(fresh, old)  # a writer replaced it after our open
    store._unlink_if_same("192.0.2.1", st, None, str(spool) + "/")
    assert (spool / "192.0.2.1").read_bytes() == b"USER=new\0"


# -- only USER and DOMAIN ever come out of a file -----------------------------------------------


def test_planted_variables_are_ignored(store: SpoolStore, spool: Path) -> None:
    plant(spool, "192.0.2.1",
          b"LD_PRELOAD=/tmp/evil.so\0RELAYCLIENT=@evil.example\0QMAILQUEUE=/bin/sh\0"
          b"USER=mallory\0PATH=/tmp\0")
    got = store.get("192.0.2.1", NOW)
    assert got is not None
    assert (got.user, got.domain) == ("mallory", None)
    d = RelayControl(store, expiry=EXPIRY, relayclient="").decide("192.0.2.1", NOW)
    assert d.verdict is Verdict.ALLOW and d.relayclient == ""  # not "@evil.example"


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00garbage\x00\x00",
        b"no nul terminator at all USER=alice",
        b"USER=alice",  # unterminated: relay-ctrl-check drops it too
        b"USER=\xff\xfe\0",
        b"USER=ali\nce\0",
        b"USER=\0",
        b"=\0==\0USER\0",
        b"",
    ],
)
def test_garbage_is_a_grant_with_no_user(store: SpoolStore, spool: Path, content: bytes) -> None:
    plant(spool, "192.0.2.1", content)
    got = store.get("192.0.2.1", NOW)
    assert got is not None
    assert got.user is None


def test_later_entry_overrides_earlier_like_putenv() -> None:
    assert parse_content(b"USER=a\0USER=b\0DOMAIN=x\0") == ("b", "x")


def test_read_is_bounded(store: SpoolStore, spool: Path) -> None:
    plant(spool, "192.0.2.1", b"X=" + b"x" * (MAX_FILE_BYTES + 100) + b"\0USER=late\0")
    got = store.get("192.0.2.1", NOW)
    assert got is not None and got.user is None
    plant(spool, "192.0.2.2", b"USER=early\0" + b"Y" * 1_000_000)
    got = store.get("192.0.2.2", NOW)
    assert got is not None and got.user == "early"


def test_nul_in_user_is_refused(store: SpoolStore) -> None:
    with pytest.raises(ValueError):
        store.put(g("192.0.2.1", "al\0ice"))
    with pytest.raises(ValueError):
        format_content(None, "x\0y")


def test_symlink_and_fifo_are_not_grants(store: SpoolStore, spool: Path, tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"USER=root\0")
    os.symlink(target, spool / "192.0.2.1")
    os.mkfifo(spool / "192.0.2.2")
    assert store.get("192.0.2.1", NOW) is None
    assert store.get("192.0.2.2", NOW) is None  # and did not block on the fifo
    assert store.list(NOW) == []


def test_foreign_names_are_ignored(store: SpoolStore, spool: Path) -> None:
    for name in ("README", "01.2.3.4", "2001:DB8::1", "::ffff:1.2.3.4", "192.0.2.1"):
        plant(spool, name, b"USER=x\0")
    (spool / "10.0.0.1").mkdir()
    assert [x.ip for x in store.list(NOW)] == ["192.0.2.1"]


def test_invalid_address_never_touches_the_filesystem(store: SpoolStore, spool: Path) -> None:
    plant(spool.parent, "x", b"USER=outside\0")
    for bad in ("../x", "..", "x", "/tmp/x", ".hidden"):
        with pytest.raises(InvalidAddress):
            store.get(bad, NOW)
        with pytest.raises(InvalidAddress):
            store.put(g(bad))
        with pytest.raises(InvalidAddress):
            store.delete(bad)
    assert (spool.parent / "x").exists()
    assert os.listdir(spool) == []


# -- aging ------------------------------------------------------------------------------------


def test_age_deletes_stale_files_and_temp_files(store: SpoolStore, spool: Path) -> None:
    plant(spool, "192.0.2.1", b"", mtime=NOW - 1000)
    plant(spool, "192.0.2.2", b"", mtime=NOW - 10)
    plant(spool, ".1700000000.123:42", b"USER=x", mtime=NOW - 1000)  # crashed writer
    plant(spool, ".1700000001.5:43", b"", mtime=NOW - 1)  # a write in progress
    plant(spool, "junk-name", b"", mtime=NOW - 5000)  # relay-ctrl-age removes anything old
    (spool / "subdir").mkdir()
    os.utime(spool / "subdir", (NOW - 5000, NOW - 5000))
    assert store.age(NOW) == 2  # dotfiles are removed but not counted as grants
    assert sorted(os.listdir(spool)) == [".1700000001.5:43", "192.0.2.2", "subdir"]


# -- the world-writable warning ---------------------------------------------------------------


def test_warns_when_world_writable(spool: Path, caplog: pytest.LogCaptureFixture) -> None:
    os.chmod(spool, 0o1777)
    with caplog.at_level(logging.WARNING, logger="relaygate.stores.spool"):
        SpoolStore(spool)
    assert any("world-writable" in r.getMessage() and r.name == "relaygate.stores.spool"
               for r in caplog.records)


def test_no_warning_for_a_private_spool(spool: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="relaygate.stores.spool"):
        SpoolStore(spool)
        SpoolStore(spool.parent / "missing")
    assert not caplog.records


# -- RELAY_CTRL_DIR_FD --------------------------------------------------------------------------


@pytest.fixture
def spool_fd(spool: Path) -> Iterator[int]:
    fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_dir_fd_store(spool: Path, spool_fd: int, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative names must resolve against the fd, not the cwd
    store = SpoolStore("(descriptor)", expiry=EXPIRY, dir_fd=spool_fd)
    store.put(g("192.0.2.1", "alice", None))
    store.put(g("2001:db8::1", "bob", None, opened=NOW - 2000))
    assert stat.S_IMODE((spool / "192.0.2.1").stat().st_mode) == 0o666
    assert (spool / "192.0.2.1").read_bytes() == b"USER=alice\0"
    got = store.get("192.0.2.1", NOW)
    assert got is not None and got.user == "alice"
    assert [x.ip for x in store.list(NOW)] == ["192.0.2.1"]
    assert store.age(NOW) == 1
    assert store.delete_user("alice") == 1
    store.put(g("192.0.2.3"))
    assert store.delete("192.0.2.3") is True
    assert os.listdir(spool) == []
    assert not any(p.name[0].isdigit() for p in tmp_path.iterdir())


def test_dir_fd_file_mode_override(spool: Path, spool_fd: int) -> None:
    store = SpoolStore("(descriptor)", dir_fd=spool_fd, file_mode=0o640)
    store.put(g("192.0.2.1"))
    assert stat.S_IMODE((spool / "192.0.2.1").stat().st_mode) == 0o640


def test_dir_fd_directory_removed(spool: Path, spool_fd: int) -> None:
    store = SpoolStore("(descriptor)", dir_fd=spool_fd)
    os.rmdir(spool)
    with pytest.raises(StoreError):
        store.get("192.0.2.1", NOW)
    with pytest.raises(StoreError):
        store.put(g("192.0.2.1"))


# -- failures -----------------------------------------------------------------------------------


def test_missing_directory_is_a_store_error_not_created(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "nope")
    with pytest.raises(StoreError):
        store.put(g("192.0.2.1"))
    with pytest.raises(StoreError):
        store.get("192.0.2.1", NOW)
    assert not (tmp_path / "nope").exists()


def check_unprivileged(spool: Path, ip: str) -> list[str]:
    """get() and decide() in a forked child that runs as "nobody" when we are root.

    Root reads anything, so mode bits alone cannot make a file unreadable to it;
    the fork keeps the already imported modules (nobody cannot read the venv).
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(rfd)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            store = SpoolStore(spool, warn=False)
            words = []
            try:
                store.get(ip, NOW)
            except StoreError:
                words.append("StoreError")
            words.append(RelayControl(store).decide(ip, NOW).verdict.value)
            os.write(wfd, " ".join(words).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return out.split()


@pytest.fixture
def open_spool() -> Iterator[Path]:
    # under /tmp with traversable parents, so an unprivileged child can reach it
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="relaygate-spool-"))
    os.chmod(top, 0o755)
    spool = top / "allow"
    spool.mkdir(mode=0o755)
    os.chmod(spool, 0o755)
    yield spool
    os.chmod(spool, 0o755)
    for p in spool.iterdir():
        p.unlink()
    spool.rmdir()
    top.rmdir()


def test_unreadable_file_is_tempfail(open_spool: Path) -> None:
    plant(open_spool, "192.0.2.1", b"USER=alice\0", mtime=time.time())
    os.chmod(open_spool / "192.0.2.1", 0)
    assert check_unprivileged(open_spool, "192.0.2.1") == ["StoreError", "tempfail"]
    assert check_unprivileged(open_spool, "192.0.2.2") == ["deny"]  # a plain miss still denies


def test_unreadable_directory_is_tempfail(open_spool: Path) -> None:
    os.chmod(open_spool, 0o700)
    assert check_unprivileged(open_spool, "192.0.2.1") == ["StoreError", "tempfail"]


def test_directory_named_like_an_address_is_not_a_grant(spool: Path, store: SpoolStore) -> None:
    (spool / "192.0.2.1").mkdir()
    assert store.get("192.0.2.1", NOW) is None


def test_concurrent_writers_never_show_a_partial_file(store: SpoolStore, spool: Path) -> None:
    stop = threading.Event()
    bad: list[object] = []

    def reader() -> None:
        while not stop.is_set():
            got = store.get("192.0.2.1", NOW)
            if got is not None and got.user not in ("alice" * 50, "bob" * 50):
                bad.append(got.user)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(300):
            store.put(g("192.0.2.1", ("alice" if i % 2 else "bob") * 50))
    finally:
        stop.set()
        t.join()
    assert bad == []
    assert os.listdir(spool) == ["192.0.2.1"]


# -- URL and start-up cost ------------------------------------------------------------------------


def test_open_store_url(spool: Path) -> None:
    store = open_store(f"spool://{spool}", expiry=600)
    assert isinstance(store, SpoolStore)
    assert store.path == str(spool) and store.expiry == 600


def test_import_stays_small() -> None:
    # relay-ctrl-check imports this module once per SMTP connection.
    code = ("import sys; before = set(sys.modules); import relaygate.stores.spool; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    extra = {m for m in out if not m.startswith("relaygate")}
    assert extra <= {"_socket", "errno", "stat", "time", "__future__"}, extra
    assert "relaygate.stores.base" not in out


def test_world_writable_warning_once_and_tagged(spool: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    os.chmod(spool, 0o777)
    SpoolStore._warned.discard(str(spool))
    with caplog.at_level(logging.WARNING, logger="relaygate.stores.spool"):
        SpoolStore(spool)
        SpoolStore(spool)  # serve and policyd open their store again, e.g. on reload
    assert sum("world-writable" in r.getMessage() for r in caplog.records) == 1
    # a command without logging set up still says who speaks
    import subprocess
    import sys

    e = {k: v for k, v in os.environ.items() if not k.startswith("RELAYGATE_")}
    r = subprocess.run([sys.executable, "-m", "relaygate", "--store", f"spool://{spool}",
                        "list"], capture_output=True, text=True, env=e, timeout=60)
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "world-writable" in line]
    assert len(warned) == 1 and warned[0].startswith(
        f"relaygate: warning: spool directory {spool} is world-writable (mode 0777)")
