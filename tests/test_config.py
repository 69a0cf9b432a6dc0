"""Configuration: precedence (CLI > env > TOML > envdir > defaults) and errors that name
their source (file:line, variable, option) and the bad value."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relaygate.config import Settings, load_settings, read_envdir
from relaygate.errors import ConfigError

SRC = Path(__file__).parent.parent / "src"


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "relaygate.toml"
    p.write_text(text)
    return p


def _envdir(tmp_path: Path, **values: str) -> Path:
    d = tmp_path / "env"
    d.mkdir(exist_ok=True)
    for k, v in values.items():
        (d / k).write_text(v)
    return d


def test_embedded_defaults() -> None:
    s = load_settings(environ={})
    assert s.data_dir == Path("relaygate-data")
    assert s.store is None
    assert s.store_url == f"sqlite://{Path('relaygate-data/grants.db').absolute()}"
    assert s.smtp.listen == ("127.0.0.1:2525",)
    assert s.smtp.submission == ("127.0.0.1:2587",)
    assert s.pop3.listen == ("127.0.0.1:1110",)
    assert s.imap.listen == ("127.0.0.1:1143",)
    assert s.policy.listen == ()
    assert s.tls.cert is None
    assert s.expiry == 900.0
    assert s.hostname == (socket.gethostname() or "localhost")
    assert s.local_domains == (s.hostname,)


def test_precedence_cli_over_env_over_toml_over_envdir(tmp_path: Path) -> None:
    envdir = _envdir(tmp_path, RELAY_CTRL_EXPIRY="100", RELAY_CTRL_RELAYCLIENT="@envdir")
    toml = _toml(tmp_path, 'expiry = 200\nhostname = "toml.example"\n')
    # envdir alone
    s = load_settings(environ={}, envdir=envdir)
    assert (s.expiry, s.relayclient) == (100.0, "@envdir")
    # TOML beats envdir; what TOML does not set still comes from envdir
    s = load_settings(environ={}, envdir=envdir, config_file=toml)
    assert (s.expiry, s.relayclient, s.hostname) == (200.0, "@envdir", "toml.example")
    # environment beats TOML
    env = {"RELAYGATE_EXPIRY": "300", "RELAYGATE_HOSTNAME": "env.example"}
    s = load_settings(environ=env, envdir=envdir, config_file=toml)
    assert (s.expiry, s.hostname) == (300.0, "env.example")
    # command line beats everything
    s = load_settings(cli={"expiry": "400"}, environ=env, envdir=envdir, config_file=toml)
    assert (s.expiry, s.hostname, s.relayclient) == (400.0, "env.example", "@envdir")
    # an option given as None means "not given"
    s = load_settings(cli={"expiry": None}, environ=env, config_file=toml)
    assert s.expiry == 300.0


def test_config_file_from_environment(tmp_path: Path) -> None:
    toml = _toml(tmp_path, 'data_dir = "/srv/relaygate"\n')
    s = load_settings(environ={"RELAYGATE_CONFIG": str(toml)})
    assert s.data_dir == Path("/srv/relaygate")
    assert s.store_url == "sqlite:///srv/relaygate/grants.db"


def test_toml_sections_and_lists(tmp_path: Path) -> None:
    toml = _toml(tmp_path, """
domains = ["Example.ORG.", "example.net"]
[smtp]
listen = ["0.0.0.0:25", "[::]:25"]
submission = "off"
max_message_size = 1000
[pop3]
listen = "127.0.0.1:110, 127.0.0.2:110"
[queue]
retry_schedule = [1, 2.5]
[metrics]
listen = "127.0.0.1:9187"
""")
    s = load_settings(environ={}, config_file=toml)
    assert s.domains == ("example.org", "example.net")
    assert s.smtp.listen == ("0.0.0.0:25", "[::]:25")
    assert s.smtp.submission == ()
    assert s.smtp.max_message_size == 1000
    # untouched fields of a section keep their defaults
    assert s.smtp.max_recipients == Settings().smtp.max_recipients
    assert s.pop3.listen == ("127.0.0.1:110", "127.0.0.2:110")
    assert s.queue.retry_schedule == (1.0, 2.5)
    assert s.metrics.listen == "127.0.0.1:9187"


def test_envdir_like_daemontools(tmp_path: Path) -> None:
    d = _envdir(tmp_path, RELAY_CTRL_DIR="/var/spool/relay-ctrl/allow\nsecond line ignored\n",
                RELAY_CTRL_EXPIRY="600  \t\n", RELAY_CTRL_LOG_IPS="1", UNRELATED="x")
    (d / ".hidden").write_text("ignored")
    (d / "RELAY_CTRL_RELAYCLIENT").write_bytes(b"")  # empty file: variable removed
    raw = read_envdir(d)
    assert raw["RELAY_CTRL_EXPIRY"] == "600"
    assert raw["RELAY_CTRL_RELAYCLIENT"] is None
    assert ".hidden" not in raw
    s = load_settings(environ={}, envdir=d)
    assert s.store == "spool:///var/spool/relay-ctrl/allow"
    assert s.expiry == 600.0
    assert s.log_ips is True
    assert s.relayclient == ""
    (d / "X").write_bytes(b"a\0b\n")
    assert read_envdir(d)["X"] == "a\nb"


def test_envdir_relative_dir_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    monkeypatch.chdir(tmp_path)
    d = _envdir(tmp_path, RELAY_CTRL_DIR="spool")
    assert load_settings(environ={}, envdir=d).store == f"spool://{tmp_path / 'spool'}"


@pytest.mark.parametrize("text, line, fragment", [
    ("expiry = 10\nexpiry = 20\n", 2, "TOML syntax error"),
    ("[smtp]\nlisten = [\n", None, "TOML syntax error"),
    ("hostname = 'a'\nexpiry = -5\n", 2, "expiry: must be a whole number of seconds"),
    ("\n\nexpiry = 'soon'\n", 3, "expiry: must be a whole number of seconds"),
    ("log_format = 'xml'\n", 1, "must be one of text, json"),
    ("[smtp]\nnot_a_setting = 1\n", 2, "unknown setting 'smtp.not_a_setting'"),
    ("# comment\nfrobnicate = true\n", 2, "unknown setting 'frobnicate'"),
    ("[auth]\nallow_plaintext = 'maybe'\n", 2, "expected true or false"),
    ("domains = ['bad domain!']\n", 1, "bad domain name"),
    ("[smtp]\nlisten = [1, {a = 1}]\n", 2, "bad list item"),
    ("[tls]\ncert = '/x.pem'\n", 2, "tls.cert and tls.key must be given together"),
    # dotted keys, inline tables and a header with a comment still get their line
    ("expiry = 5\nsmtp.max_recipients = 0\n", 2, "smtp.max_recipients: must be greater"),
    ("expiry = 5\n\nsmtp = { max_recipients = 0 }\n", 3, "smtp.max_recipients"),
    ("[smtp]  # the SMTP server\nlisten = 5\n", 2, "smtp.listen: expected a list"),
    # a store URL is checked when the settings are built, not when the store opens
    ("\nstore = '/var/spool/relay-ctrl/allow'\n", 2, "store URL must start with"),
    ("store = 'redis://127.0.0.1:port/0'\n", 1, "bad Redis store URL"),
    ("store = 'sqlite://'\n", 1, "store URL has no path"),
])
def test_toml_errors_name_file_and_line(tmp_path: Path, text: str, line: int | None,
                                        fragment: str) -> None:
    toml = _toml(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={}, config_file=toml)
    err = exc.value
    assert fragment in str(err)
    assert err.source == str(toml)
    if line is not None:
        assert err.line == line
        assert f"{toml}:{line}: " in str(err)


def test_bad_value_is_shown(tmp_path: Path) -> None:
    toml = _toml(tmp_path, "expiry = 'soon'\n")
    with pytest.raises(ConfigError, match="'soon'") as exc:
        load_settings(environ={}, config_file=toml)
    assert exc.value.value == "soon"


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(environ={}, config_file=tmp_path / "nope.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"hostname = '\xe9'\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(environ={}, config_file=bad)
    with pytest.raises(ConfigError, match="envdir is not a directory"):
        load_settings(environ={}, envdir=tmp_path / "nope")


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={"RELAYGATE_EXPIRY": "0"})
    assert exc.value.source == "$RELAYGATE_EXPIRY"
    assert str(exc.value).startswith("$RELAYGATE_EXPIRY: expiry: must be a whole number")
    with pytest.raises(ConfigError, match=r"\$RELAYGATE_LOG_FORMAT"):
        load_settings(environ={"RELAYGATE_LOG_FORMAT": "xml"})


def test_store_url_errors_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={"RELAYGATE_STORE": "postgres://db/grants"})
    assert str(exc.value).startswith("$RELAYGATE_STORE: store URL must start with")
    assert exc.value.value == "postgres://db/grants"
    with pytest.raises(ConfigError, match="option --store"):
        load_settings(cli={"store": "spool:"}, environ={})
    for good in ("memory:", "spool:///var/spool/relay-ctrl/allow", "sqlite:///x/grants.db",
                 "redis://127.0.0.1:6379/0?prefix=a:", "rediss://h/1"):
        assert load_settings(cli={"store": good}, environ={}).store == good


def test_store_url_errors_do_not_show_the_password() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={"RELAYGATE_STORE": "redis://:hunter2@127.0.0.1:notaport/0"})
    assert "hunter2" not in str(exc.value)
    assert "redis://:***@127.0.0.1:notaport/0" in str(exc.value)


def test_cli_errors_name_the_option() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(cli={"expiry": "abc"}, environ={})
    assert exc.value.source == "option --expiry"
    with pytest.raises(ConfigError, match="option --listen"):
        load_settings(cli={"smtp.listen": [["nested"]]}, environ={})


def test_envdir_errors_name_the_file(tmp_path: Path) -> None:
    d = _envdir(tmp_path, RELAY_CTRL_EXPIRY="never")
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={}, envdir=d)
    assert exc.value.source == str(d / "RELAY_CTRL_EXPIRY")
    assert exc.value.line == 1
    (d / "RELAY_CTRL_EXPIRY").write_bytes(b"\xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(environ={}, envdir=d)


def test_env_list_values(tmp_path: Path) -> None:
    s = load_settings(environ={"RELAYGATE_DOMAINS": "a.example, B.example c.example"})
    assert s.domains == ("a.example", "b.example", "c.example")


def _relaygate(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None
               ) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(SRC)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "relaygate", *args], capture_output=True,
                          text=True, env=e, cwd=cwd, timeout=60)


def test_command_line_config_error_exits_111_with_source(tmp_path: Path) -> None:
    toml = _toml(tmp_path, "[smtp]\nmax_recipients = 0\n")
    r = _relaygate("--config", str(toml), "--data-dir", str(tmp_path / "d"), "list",
                   cwd=tmp_path)
    assert r.returncode == 111
    assert f"configuration error: {toml}:2: smtp.max_recipients: must be greater than zero" \
        in r.stderr
    r = _relaygate("--data-dir", str(tmp_path / "d"), "list", cwd=tmp_path,
                   env={"RELAYGATE_EXPIRY": "-1"})
    assert r.returncode == 111 and "$RELAYGATE_EXPIRY" in r.stderr


def test_serve_options_after_the_subcommand(tmp_path: Path) -> None:
    # group options work after `serve` too; here a bad listener stops start-up at once
    r = _relaygate("serve", "--data-dir", str(tmp_path / "d"), "--expiry", "0",
                   "--user", _me(), cwd=tmp_path)
    assert r.returncode == 111
    assert "option --expiry: expiry: must be a whole number of seconds from 1 to 31536000: '0'" \
        in r.stderr
    r = _relaygate("serve", "--data-dir", str(tmp_path / "d"), "--smtp", "nowhere",
                   "--user", _me(), cwd=tmp_path)
    assert r.returncode == 111
    assert "smtp.listen: expected HOST:PORT: 'nowhere'" in r.stderr
    assert not (tmp_path / "d").exists()


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def test_ipv6_prefix_setting(tmp_path: Path) -> None:
    assert Settings().ipv6_prefix == 64
    assert load_settings(environ={}).ipv6_prefix == 64
    assert load_settings(environ={}, config_file=_toml(tmp_path, "ipv6_prefix = 56\n")
                         ).ipv6_prefix == 56
    assert load_settings(cli={"ipv6_prefix": "48"}, environ={}).ipv6_prefix == 48


@pytest.mark.parametrize("value", ["0", "16", "129", "-64", "64.5", "abc"])
def test_bad_ipv6_prefix_names_its_source(tmp_path: Path, value: str) -> None:
    toml = _toml(tmp_path, f"hostname = 'h'\nipv6_prefix = {value!r}\n")
    with pytest.raises(ConfigError, match="ipv6_prefix") as exc:
        load_settings(environ={}, config_file=toml)
    assert exc.value.source == str(toml) and exc.value.line == 2
    assert repr(value) in str(exc.value) or value in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_settings(cli={"ipv6_prefix": value}, environ={})
    assert exc.value.source == "option --ipv6-prefix"


BAD_EXPIRY = ["1e3", "30s", "abc", "-5", "0", "99999999999999999999", "", "2.5", "+600"]


@pytest.mark.parametrize("value", BAD_EXPIRY)
def test_bad_expiry_is_refused_from_every_source(tmp_path: Path, value: str) -> None:
    # One reader of window lengths: the envdir file, the TOML file, the variable and
    # the option all refuse what relay-ctrl read as 1, 30 or 900 seconds.
    reason = "expiry: must be a whole number of seconds from 1 to 31536000"
    d = _envdir(tmp_path, RELAY_CTRL_EXPIRY=value or " ")
    with pytest.raises(ConfigError, match=reason) as exc:
        load_settings(environ={}, envdir=d)
    assert exc.value.source == str(d / "RELAY_CTRL_EXPIRY") and exc.value.line == 1
    toml = _toml(tmp_path, f"hostname = 'h'\nexpiry = {value!r}\n")
    with pytest.raises(ConfigError, match=reason) as exc:
        load_settings(environ={}, config_file=toml)
    assert exc.value.source == str(toml) and exc.value.line == 2
    with pytest.raises(ConfigError, match=reason) as exc:
        load_settings(environ={"RELAYGATE_EXPIRY": value})
    assert exc.value.source == "$RELAYGATE_EXPIRY"
    with pytest.raises(ConfigError, match=reason) as exc:
        load_settings(cli={"expiry": value}, environ={})
    assert exc.value.source == "option --expiry"


@pytest.mark.parametrize("text", ["expiry = 1e3", "expiry = 900.0", "expiry = -5",
                                  "expiry = true", "expiry = 99999999999999999"])
def test_bad_toml_expiry_numbers(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="whole number of seconds"):
        load_settings(environ={}, config_file=_toml(tmp_path, text + "\n"))


def test_good_expiry_everywhere(tmp_path: Path) -> None:
    d = _envdir(tmp_path, RELAY_CTRL_EXPIRY="600")
    assert load_settings(environ={}, envdir=d).expiry == 600
    assert load_settings(environ={}, config_file=_toml(tmp_path, "expiry = 31536000\n")
                         ).expiry == 31536000
    assert load_settings(environ={"RELAYGATE_EXPIRY": " 0600 "}).expiry == 600
    assert load_settings(cli={"expiry": "1"}, environ={}).expiry == 1
