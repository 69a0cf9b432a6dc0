"""Dovecot post-login hook: open the relay window, then exec the rest.

Theory of operation
-------------------
Dovecot runs a post-login script through ``script-login`` after every
successful login (``service pop3 { executable = pop3 pop3-postlogin }``;
https://doc.dovecot.org/configuration_manual/post_login_scripting/). The
script gets ``$USER``, ``$IP``, ``$LOCAL_IP``, ``$HOME``, ``$UID``, ``$GID``,
``$AUTH_MECH`` and ``$USERDB_KEYS`` in a *cleaned* environment, the words
written after its path in ``executable =`` come first in its argument list,
and it must exec the rest (``script-login`` itself), or the login fails.

So this program: reads its options (``--store``, ``--expiry``, ``--config``,
``--data-dir``, ``--timeout``, ``--verbose``; also ``$RELAYGATE_STORE``,
``$RELAYGATE_EXPIRY``, ``$RELAYGATE_CONFIG`` and ``$RELAYGATE_DATA_DIR`` when
a caller provides them, which Dovecot itself does not), records a grant for ``$IP`` (user ``$USER``,
domain after its ``@``, source ``dovecot``), and ``execvp``\\ s the remaining
arguments. Recording is best effort, in qmail's relay-ctrl-allow spirit: any
failure (no store, store unreachable or slower than ``--timeout``, bad
``$IP``) is written to stderr, which Dovecot logs as an error, and the login
goes on. Only a failing exec ends the login (exit 111).

It runs once per login, so it starts cheaply: no click, no logging module,
the store module is imported only for its URL, and the TOML configuration is
only read when one is named. stdout is never written: in post-login scripts it
may be the client's connection.

Exit codes: none on success (the process becomes PROGRAM); 111 when PROGRAM
cannot be executed; 2 when no PROGRAM is given.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

USAGE = (
    "usage: relaygate dovecot-postlogin [--store URL] [--expiry SECONDS] [--config FILE]\n"
    "                                   [--data-dir DIR] [--timeout SECONDS] [--verbose]\n"
    "                                   [--] PROGRAM [ARGS...]\n"
)

#: Seconds the recording may take before the login goes on without it: a login
#: that waits on a dead Redis for a minute is worse than a missing window.
DEFAULT_TIMEOUT = 5.0

#: Longest $USER recorded (Dovecot's own limit for user names is 255 bytes).
MAX_USER = 255

EXIT_TEMPFAIL = 111
EXIT_USAGE = 2

_VALUE_OPTIONS = {"--store": "store", "--expiry": "expiry", "--config": "config",
                  "--data-dir": "data_dir", "--timeout": "timeout"}


class _Timeout(Exception):
    pass


def _say(message: str) -> None:
    # One line on stderr: Dovecot logs it as "pop3-postlogin: Error: relaygate: ...".
    try:
        os.write(2, f"relaygate: {message}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def parse_args(argv: Sequence[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Options, the program to exec, and complaints about bad options (never fatal)."""
    opts: dict[str, Any] = {"verbose": False}
    problems: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, value = arg.partition("=")
        if name in ("-v", "--verbose"):
            opts["verbose"] = True
            i += 1
            continue
        if name in _VALUE_OPTIONS:
            if not eq:
                if i + 1 >= len(argv):
                    problems.append(f"option {name} needs a value")
                    i += 1
                    continue
                value = argv[i + 1]
                i += 1
            opts[_VALUE_OPTIONS[name]] = value
            i += 1
            continue
        problems.append(f"unknown option {arg!r} ignored")
        i += 1
    return opts, list(argv[i:]), problems


def _seconds(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number of seconds, not {text!r}") from None
    if not value > 0 or value != value:
        raise ValueError(f"{what} must be greater than zero, not {text!r}")
    return value


def _expiry(text: str) -> float:
    from relaygate.expiry import parse_expiry

    try:
        return float(parse_expiry(text))
    except ValueError as exc:
        raise ValueError(f"--expiry {exc}, not {text!r}") from None


def record(opts: Mapping[str, Any], environ: Mapping[str, str]) -> str:
    """Store the grant for $IP; returns a one-line description. Raises on any failure."""
    raw_ip = environ.get("IP", "")
    if not raw_ip:
        raise ValueError("no $IP in the environment (not a network login?)")
    from relaygate.addresses import parse_ip

    ip = parse_ip(raw_ip)
    user = environ.get("USER") or None
    if user is not None:
        user = user[:MAX_USER]
    domain = None
    if user and "@" in user:
        domain = user.rpartition("@")[2].lower() or None

    config = opts.get("config") or environ.get("RELAYGATE_CONFIG") or None
    store_url: str | None = opts.get("store") or environ.get("RELAYGATE_STORE") or None
    expiry_text = opts.get("expiry") or environ.get("RELAYGATE_EXPIRY") or None
    data_dir = opts.get("data_dir") or environ.get("RELAYGATE_DATA_DIR") or None
    if config is not None or (store_url is None and data_dir is not None):
        # The full configuration: the file's store/data_dir/expiry, or the store in
        # the named data directory (DATA_DIR/grants.db, as every other command).
        from relaygate.config import load_settings

        cli = {"store": store_url, "expiry": expiry_text, "data_dir": data_dir}
        settings = load_settings(cli=cli, environ=environ, config_file=config)
        store_url, expiry = settings.store_url, settings.expiry
        if settings.trusted_proxies:
            from relaygate.networks import Networks

            if ip in Networks(settings.trusted_proxies):
                # Dovecot behind a load balancer without ``haproxy = yes``: the window
                # would let everyone behind the proxy relay.
                raise ValueError(f"{ip} is a trusted proxy (trusted_proxies): no window "
                                 "for it; does Dovecot's listener have haproxy = yes?")
    else:
        if store_url is None:
            # No default: the hook's working directory is Dovecot's, not a data directory.
            raise ValueError("no grant store configured (--store URL, --config FILE or "
                             "--data-dir DIR)")
        expiry = _expiry(expiry_text) if expiry_text else 900.0

    import time

    from relaygate.grants import Grant
    from relaygate.stores import open_store

    # No world-writable warning here: it would fill Dovecot's log once per login (policyd,
    # serve and `relaygate doctor dovecot` report it).
    store = open_store(store_url, expiry=expiry, warn=False)
    try:
        store.put(Grant.opening(ip, user, domain, "dovecot", time.time(), expiry))
    finally:
        store.close()
    return f"window.opened ip={ip} user={user or '-'} source=dovecot expiry={int(expiry)}"


def _on_alarm(signum: int, frame: object) -> None:
    raise _Timeout


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         defaults: Mapping[str, Any] | None = None) -> NoReturn:
    """Record the login (best effort), then exec the program. Never returns."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    opts, program, problems = parse_args(args)
    for key, value in (defaults or {}).items():
        if value is not None and opts.get(key) is None:
            opts[key] = value
    if not program:
        _say("dovecot-postlogin: no program to exec")
        os.write(2, USAGE.encode())
        sys.exit(EXIT_USAGE)
    for problem in problems:
        _say(f"dovecot-postlogin: {problem}")

    try:
        timeout = _seconds(opts["timeout"], "--timeout") if opts.get("timeout") else \
            DEFAULT_TIMEOUT
    except ValueError as exc:
        _say(f"dovecot-postlogin: {exc}")
        timeout = DEFAULT_TIMEOUT
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        done = record(opts, env)
        if opts["verbose"]:
            _say(done)
    except _Timeout:
        _say(f"dovecot-postlogin: recording took longer than {timeout}s; login goes on "
             "without a relay window")
    except Exception as exc:  # the login must go on whatever went wrong
        _say(f"dovecot-postlogin: no relay window for {env.get('IP', '?')!r}: {exc}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)

    try:
        os.execvp(program[0], program)  # noqa: S606 -- exec-ing the rest is the protocol
    except OSError as exc:
        _say(f"dovecot-postlogin: cannot execute {program[0]!r}: {exc.strerror}")
    os._exit(EXIT_TEMPFAIL)


if __name__ == "__main__":  # python -m relaygate.integrations.dovecot (no click: faster)
    main()
