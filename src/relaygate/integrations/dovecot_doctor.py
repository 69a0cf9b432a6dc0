"""``relaygate doctor dovecot``: will Dovecot's logins open relay windows?

Theory of operation
-------------------
Dovecot runs a post-login script when service ``pop3``/``imap`` names a
post-login service after its binary (``executable = imap imap-postlogin``)
and that service runs ``script-login PROGRAM ARGS`` as its ``user`` (with
``extra_groups``). Three things go wrong in practice, each found here:

1. the post-login service is missing, or does not run relaygate, for a
   protocol Dovecot serves (``protocols``): its logins open no window;
2. the service's user cannot execute the program: a virtualenv whose
   interpreter lives under ``/root`` is the classic; Dovecot then refuses
   *every* login ("Post-login script denied access");
3. the store named on the hook's command line (``--store``, ``--data-dir``,
   ``--config``) is not writable by that user (SQLite also needs the
   directory, for its ``-wal``/``-shm`` files): logins work, relaying fails
   closed.

Values come from ``doveconf [-c FILE] service`` (every service block, defaults
included) and ``doveconf -h protocols default_internal_user
default_internal_group``. Checks 2 and 3 run a child process as the
service's user, primary group and extra groups (``subprocess``'s
``user``/``group``/``extra_groups``): the program is executed with
``--version``, and ``test -r/-w/-x`` looks at the store. That needs root;
otherwise they run as the current user only when it is the service's user,
and are skipped with a warning when it is not.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from relaygate.integrations.postfix_doctor import DoctorError, Finding

__all__ = ["DoctorError", "DovecotReport", "Finding", "diagnose"]

#: seconds doveconf, the program test and each access test may take
DOVECONF_TIMEOUT = 30.0
#: the protocols whose logins can open a window
LOGIN_PROTOCOLS = ("pop3", "imap")
#: how a post-login program is recognised as relaygate's hook
_HOOK_WORDS = ("dovecot-postlogin", "relaygate.integrations.dovecot")


@dataclass
class DovecotReport:
    version: str
    protocols: list[str]
    #: post-login service name -> its settings, for the ones checked
    hooks: dict[str, dict[str, str]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "problem"]

    def add(self, level: str, message: str) -> None:
        self.findings.append(Finding(level, message))


def run_doveconf(args: Sequence[str], *, config_file: str | None,
                 doveconf: str = "doveconf") -> str:
    cmd = [doveconf]
    if config_file:
        cmd += ["-c", config_file]
    cmd += list(args)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOVECONF_TIMEOUT,
                              check=False)
    except FileNotFoundError:
        raise DoctorError(f"{doveconf} not found (is Dovecot installed?)") from None
    except subprocess.TimeoutExpired:
        raise DoctorError(f"{' '.join(cmd)} did not finish") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise DoctorError(f"{' '.join(cmd)} failed: {msg[-1] if msg else proc.returncode}")
    return proc.stdout


def parse_services(text: str) -> dict[str, dict[str, str]]:
    """``doveconf service`` output -> {service name: {setting: value}} (top level only)."""
    services: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    depth = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("{"):
            m = re.fullmatch(r"service\s+(\S+)\s*\{", line)
            if depth == 0 and m:
                current = services.setdefault(m.group(1), {})
            depth += 1
            continue
        if line == "}":
            depth = max(0, depth - 1)
            if depth == 0:
                current = None
            continue
        if depth == 1 and current is not None:
            name, eq, value = line.partition("=")
            if eq:
                current[name.strip()] = value.strip()
    return services


def hook_store_args(words: Sequence[str]) -> dict[str, str]:
    """``--store``, ``--data-dir``, ``--config`` given to the hook (before ``--``/PROGRAM)."""
    out: dict[str, str] = {}
    i = 0
    takes = {"--store": "store", "--data-dir": "data_dir", "--config": "config",
             "--expiry": None, "--timeout": None, "--envdir": None}
    while i < len(words):
        w = words[i]
        if w == "--":
            break
        name, eq, value = w.partition("=")
        if name in takes:
            if not eq:
                i += 1
                value = words[i] if i < len(words) else ""
            key = takes[name]
            if key is not None:
                out[key] = value
        elif w.startswith("-"):
            pass  # a flag such as --verbose
        elif w != "dovecot-postlogin":
            break  # the program Dovecot appends
        i += 1
    return out


@dataclass(frozen=True)
class RunAs:
    """Whom Dovecot runs a post-login service as."""

    user: str
    uid: int
    gid: int
    extra_gids: tuple[int, ...]

    def describe(self) -> str:
        groups = [_group_name(self.gid), *(_group_name(g) for g in self.extra_gids)]
        return f"{self.user} (groups {', '.join(groups)})"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), value)


def resolve_run_as(service: dict[str, str], variables: dict[str, str]) -> RunAs:
    user = _expand(service.get("user", ""), variables) or "root"
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise DoctorError(f"no such user {user!r} (the post-login service's user)") from None
    gid = pw.pw_gid
    group = _expand(service.get("group", ""), variables)
    extra: list[int] = []
    try:
        if group:
            gid = grp.getgrnam(group).gr_gid
        for name in _expand(service.get("extra_groups", ""), variables).replace(",", " ").split():
            extra.append(grp.getgrnam(name).gr_gid)
    except KeyError as exc:
        raise DoctorError(f"no such group {exc.args[0]!r} (the post-login service's group)") \
            from None
    return RunAs(user, pw.pw_uid, gid, tuple(extra))


def run_as(who: RunAs, argv: Sequence[str], env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str] | None:
    """Run argv as ``who``; None when this process cannot switch to that user."""
    kwargs: dict[str, object] = {}
    if os.geteuid() == 0:
        kwargs = {"user": who.uid, "group": who.gid, "extra_groups": list(who.extra_gids)}
    elif os.geteuid() != who.uid:
        return None
    try:
        done: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
            list(argv), capture_output=True, text=True, check=False, timeout=DOVECONF_TIMEOUT,
            cwd="/", env=env if env is not None else {"PATH": "/usr/bin:/bin"}, **kwargs)
        return done
    except (OSError, subprocess.SubprocessError) as exc:
        return subprocess.CompletedProcess(list(argv), 126, "", str(exc))


def store_paths(args: dict[str, str]) -> tuple[str, list[tuple[str, str]]] | None:
    """(store URL, [(path, "file"|"dir")]) the hook writes; None when it names no store."""
    from relaygate.config import load_settings
    from relaygate.stores import check_url

    cli: dict[str, object] = {}
    if "store" in args:
        cli["store"] = args["store"]
    if "data_dir" in args:
        cli["data_dir"] = args["data_dir"]
    if not cli and "config" not in args:
        return None
    settings = load_settings(cli=cli, environ={}, config_file=args.get("config"))
    url = settings.store_url
    scheme, rest = check_url(url)
    if scheme == "sqlite":
        path = rest[2:] if rest.startswith("//") else rest
        return url, [(path, "file"), (os.path.dirname(path) or ".", "dir")]
    if scheme == "spool":
        path = rest[2:] if rest.startswith("//") else rest
        return url, [(path, "dir")]
    return url, []


def diagnose(*, config_file: str | None = None, doveconf: str = "doveconf") -> DovecotReport:
    """Read Dovecot's configuration and check the post-login hook (module docstring)."""
    head = run_doveconf(["-h", "protocols", "default_internal_user", "default_internal_group"],
                        config_file=config_file, doveconf=doveconf).splitlines()
    head += [""] * (3 - len(head))
    variables = {"default_internal_user": head[1].strip(),
                 "default_internal_group": head[2].strip()}
    version = "?"
    with contextlib.suppress(DoctorError):
        first = run_doveconf(["-n"], config_file=config_file, doveconf=doveconf).split("\n", 1)
        m = re.match(r"# (\S+)", first[0])
        version = m.group(1) if m else version
    protocols = head[0].split()
    report = DovecotReport(version, protocols)
    services = parse_services(run_doveconf(["service"], config_file=config_file,
                                           doveconf=doveconf))
    served = [p for p in LOGIN_PROTOCOLS if p in protocols]
    if not served:
        report.add("problem", f"protocols = {' '.join(protocols) or '(none)'}: neither pop3 "
                              "nor imap, so no login can open a window")
        return report
    hooked = 0
    for proto in served:
        words = service_words(services.get(proto, {}))
        names = words[1:]
        hooks = [n for n in names if _is_hook(services.get(n, {}))]
        if not names:
            report.add("problem", f"service {proto}: executable = {' '.join(words) or proto} "
                                  f"has no post-login service: {proto} logins open no window "
                                  f"(executable = {proto} {proto}-postlogin)")
            continue
        missing = [n for n in names if n not in services]
        if missing:
            report.add("problem", f"service {proto} names post-login service "
                                  f"{', '.join(missing)}, which is not defined: every "
                                  f"{proto} login fails")
            continue
        if not hooks:
            report.add("problem", f"service {proto}: post-login {', '.join(names)} does not "
                                  f"run relaygate dovecot-postlogin: {proto} logins open no "
                                  f"window")
            continue
        hooked += 1
        for name in hooks:
            report.add("ok", f"service {proto}: post-login service {name} runs relaygate")
            report.hooks[name] = services[name]
    for name, svc in report.hooks.items():
        _check_hook(report, name, svc, variables)
    if hooked and hooked < len(served):
        report.add("warning", "some protocols open windows and some do not (see above)")
    return report


def service_words(service: dict[str, str]) -> list[str]:
    try:
        return shlex.split(service.get("executable", ""))
    except ValueError:
        return service.get("executable", "").split()


def _is_hook(service: dict[str, str]) -> bool:
    words = service_words(service)
    return (bool(words) and os.path.basename(words[0]) == "script-login"
            and any(h in w for w in words[1:] for h in _HOOK_WORDS))


def _check_hook(report: DovecotReport, name: str, svc: dict[str, str],
                variables: dict[str, str]) -> None:
    words = service_words(svc)
    program = words[1] if len(words) > 1 else ""
    try:
        who = resolve_run_as(svc, variables)
    except DoctorError as exc:
        report.add("problem", f"service {name}: {exc}")
        return
    # 2. runnable by that user (interpreter included: a venv under /root is not)
    version = run_as(who, [program, "--version"])
    if version is None:
        report.add("warning", f"service {name}: runs as {who.describe()}; run doctor as root "
                              "to check that user can execute the hook and write the store")
        return
    if version.returncode != 0:
        why = (version.stderr or version.stdout).strip().splitlines()
        interpreter = _shebang(program)
        hint = f" (interpreter {interpreter})" if interpreter else ""
        report.add("problem", f"service {name}: {who.user} cannot run {program}{hint}: "
                              f"{why[-1] if why else 'exit ' + str(version.returncode)}; "
                              "Dovecot then refuses every login; install relaygate where "
                              f"{who.user} can run it (e.g. a venv in /opt/relaygate made "
                              "with the system's python3)")
    else:
        report.add("ok", f"service {name}: {who.describe()} can run {program}")
    # 3. the store writable by that user
    try:
        found = store_paths(hook_store_args(words[2:]))
    except Exception as exc:  # a bad --config or URL: name it, do not crash the doctor
        report.add("problem", f"service {name}: cannot tell the hook's store: {exc}")
        return
    if found is None:
        report.add("problem", f"service {name}: the hook names no store (--store, --data-dir "
                              "or --config): Dovecot gives it a cleaned environment, so it "
                              "records no window")
        return
    url, paths = found
    from relaygate.stores import redact_url

    shown = redact_url(url)
    if not paths:
        report.add("ok", f"service {name}: store {shown} (not a file; check it with a login)")
        return
    bad: list[str] = []
    for path, kind in paths:
        if kind == "file":
            test = run_as(who, ["/bin/sh", "-c", 'test ! -e "$1" || { test -r "$1" && '
                                'test -w "$1"; }', "sh", path])
        else:
            test = run_as(who, ["/bin/sh", "-c", 'test -d "$1" && test -w "$1" && '
                                'test -x "$1"', "sh", path])
        if test is None or test.returncode != 0:
            bad.append(f"{path} ({'file' if kind == 'file' else 'directory'})")
    if bad:
        report.add("problem", f"service {name}: {who.user} cannot write the store {shown}: "
                              f"{', '.join(bad)}; logins work but relaying stays closed (see "
                              "docs/postfix-dovecot.md, One store for all of them)")
    else:
        report.add("ok", f"service {name}: {who.user} can write the store {shown}")


def _shebang(program: str) -> str | None:
    try:
        with open(program, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if first.startswith(b"#!"):
        return first[2:].decode("utf-8", "replace").strip().split()[0]
    return None
