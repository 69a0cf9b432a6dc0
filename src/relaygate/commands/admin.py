"""Window administration: allow, check, revoke, list, age, rules check."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from relaygate.addresses import parse_ip
from relaygate.cli import EXIT_TEMPFAIL, settings_from
from relaygate.decision import Verdict
from relaygate.errors import InvalidAddress
from relaygate.runtime import build_control, require_store


def _ip(value: str) -> str:
    try:
        return parse_ip(value)
    except InvalidAddress as exc:
        raise click.BadParameter(str(exc)) from None


def _control(ctx: click.Context, *, create: bool = False) -> Any:
    """The relay control; read-only commands (``create`` False) never create a store."""
    settings = settings_from(ctx)
    if not create:
        require_store(settings)
    return build_control(settings)


@click.command()
@click.argument("ip")
@click.option("--user", help="Whose login this window belongs to.")
@click.option("--domain", help="The user's domain.")
@click.option("--ttl", type=click.FloatRange(min=1), help="Seconds (default: the expiry).")
@click.option("--source", default="cli", show_default=True, help="Where the grant came from.")
@click.pass_context
def allow(ctx: click.Context, ip: str, user: str | None, domain: str | None, ttl: float | None,
          source: str) -> None:
    """Open a relay window for IP."""
    canonical = _ip(ip)
    control = _control(ctx, create=True)
    grant = control.open_window(canonical, user=user, domain=domain, source=source, ttl=ttl)
    click.echo(f"allowed {grant.ip} until {_fmt_time(grant.expires_at)}"
               f" ({int(grant.expires_at - grant.opened_at)}s)")


@click.command()
@click.argument("ip")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@click.pass_context
def check(ctx: click.Context, ip: str, as_json: bool) -> None:
    """Print the relay decision for IP and its reason.

    Exit status: 0 allow, 1 deny, 111 temporary failure (store unreachable).
    """
    canonical = _ip(ip)
    control = _control(ctx)
    decision = control.decide_canonical(canonical)
    if as_json:
        click.echo(json.dumps({"ip": canonical, **decision.as_dict()}))
    else:
        extra = ""
        if decision.allowed:
            extra = f" RELAYCLIENT={json.dumps(decision.relayclient)}"
        click.echo(f"{decision.verdict.value} {canonical}: {decision.reason}{extra}")
    code = {Verdict.ALLOW: 0, Verdict.DENY: 1, Verdict.TEMPFAIL: EXIT_TEMPFAIL}[decision.verdict]
    ctx.exit(code)


@click.command()
@click.argument("ip", required=False)
@click.option("--user", help="Close every window opened by this user instead.")
@click.pass_context
def revoke(ctx: click.Context, ip: str | None, user: str | None) -> None:
    """Close the window of IP, or with --user all windows of a user.

    Exit status 1 when there was nothing to close.
    """
    if (ip is None) == (user is None):
        raise click.UsageError("give either IP or --user USER")
    canonical = _ip(ip) if ip is not None else None
    control = _control(ctx)
    if canonical is not None:
        found = control.revoke(canonical)
        click.echo(f"revoked {canonical}" if found else f"no window for {canonical}")
        ctx.exit(0 if found else 1)
    assert user is not None
    n = control.revoke_user(user)
    click.echo(f"revoked {n} window{'s' if n != 1 else ''} of {user}")
    ctx.exit(0 if n else 1)


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of grants.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List open relay windows: ip, user, source, opened, expires in."""
    control = _control(ctx)
    now = time.time()
    grants = control.list(now)
    if as_json:
        click.echo(json.dumps([g.as_dict() for g in grants]))
        return
    rows = [("IP", "USER", "SOURCE", "OPENED", "EXPIRES IN")]
    for g in grants:
        rows.append((g.ip, g.user or "-", g.source, _fmt_time(g.opened_at),
                     f"{max(0, int(g.expires_at - now))}s"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not grants:
        click.echo("(no open windows)", err=True)


@click.command()
@click.pass_context
def age(ctx: click.Context) -> None:
    """Remove expired windows and print how many were removed."""
    control = _control(ctx)
    n = control.age()
    click.echo(f"removed {n} expired window{'s' if n != 1 else ''}")


@click.group()
def rules() -> None:
    """Static rules (tcprules syntax and CIDR)."""


@rules.command("check")
@click.argument("ip")
@click.pass_context
def rules_check(ctx: click.Context, ip: str) -> None:
    """Show which rule matches IP (exit 1 when none does)."""
    settings = settings_from(ctx)
    from relaygate.rules import RuleSet

    if settings.rules_file is None:
        click.echo("no rules file configured (--rules FILE)", err=True)
        ctx.exit(1)
    rs = RuleSet.load(settings.rules_file)
    canonical = _ip(ip)
    rule = rs.match(canonical)
    if rule is None:
        click.echo(f"{canonical}: no rule matches")
        ctx.exit(1)
    assert rule is not None
    action = "allow" if rule.allow else "deny"
    env = ",".join(f'{k}="{v}"' for k, v in rule.env.items())
    relays = "relays" if rule.relays else "does not relay"
    click.echo(f"{canonical}: {rule.describe()} {action}{',' + env if env else ''} ({relays})")


@rules.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="Print only the bad lines.")
def rules_validate(file: str, quiet: bool) -> None:
    """Check a rules FILE before serve or policyd reloads it (SIGHUP).

    Prints FILE:LINE and the reason for every bad line. Exit status: 0 the file
    is good, 1 it has bad lines, 111 it cannot be read.
    """
    from relaygate.errors import ConfigError
    from relaygate.rules import RuleSet

    try:
        with open(file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        click.echo(f"{file}: cannot read: {reason}", err=True)
        raise SystemExit(EXIT_TEMPFAIL) from None
    errors: list[ConfigError] = []
    rs = RuleSet.parse(text, file, errors=errors)
    for err in errors:
        click.echo(str(err), err=True)
    if errors:
        click.echo(f"{file}: {len(errors)} bad line{'s' if len(errors) != 1 else ''}", err=True)
        raise SystemExit(1)
    if not quiet:
        relaying = sum(1 for r in _all_rules(rs) if r.relays)
        default = rs.default
        shown = "none" if default is None else ("allow" if default.allow else "deny")
        if default is not None and default.relays:
            shown += " (relays)"
        click.echo(f"{file}: OK, {len(rs)} rule{'s' if len(rs) != 1 else ''}, "
                   f"{relaying} relaying, default {shown}")


def _all_rules(rs: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    for rule in [*rs.exact.values(), *(r for _, r in rs.networks), rs.default]:
        if rule is not None:
            seen.setdefault(id(rule), rule)
    return list(seen.values())


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


