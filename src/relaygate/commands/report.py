"""``relaygate report``: the migration report (who still relays through windows)."""

from __future__ import annotations

import json
import time

import click

from relaygate.cli import settings_from


@click.command()
@click.option("--since", "since", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, metavar="DAYS", help="Count the last DAYS days.")
@click.option("--all", "all_days", is_flag=True, help="Count the whole history kept (400 days).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_context
def report(ctx: click.Context, since: float, all_days: bool, as_json: bool) -> None:
    """List accounts by how much they still relay through POP/IMAP-before-SMTP windows.

    For each account: messages relayed through a window, SMTP AUTH and a static
    rule in the period, the window share, and when each basis was last used.
    The accounts at the top are the ones to move to SMTP AUTH; an account whose
    window column stays at 0 no longer needs the window. Windows and rules
    without a user are counted under the client address, e.g. [192.0.2.7].

    serve counts accepted relayed messages; policyd counts its OK answers
    (Postfix asks once per recipient). Counts reach the data directory's
    relaystats.db within 10 seconds. Exit status: 0, or 1 when nothing was
    counted yet in this data directory.
    """
    from relaygate.relaystats import BASES, NoStatistics, read_report

    settings = settings_from(ctx)
    now = time.time()
    days = None if all_days else since
    try:
        rows = read_report(settings.data_dir, since_days=days, now=now)
    except NoStatistics as exc:
        click.echo(f"relaygate: no relay statistics: {exc} does not exist (nothing relayed "
                   "yet, or not the data directory serve or policyd use: give --data-dir "
                   "or --config)", err=True)
        ctx.exit(1)
        return
    period = "all days kept" if days is None else f"last {days:g} days"
    if as_json:
        click.echo(json.dumps({"period_days": days, "generated": round(now, 3),
                               "accounts": [r.as_dict() for r in rows]}))
        return
    click.echo(f"relayed messages by basis, {period}; most window use first")
    table: list[tuple[str, ...]] = [("ACCOUNT", "WINDOW", "AUTH", "RULE", "WINDOW%",
                                     "LAST WINDOW", "LAST AUTH", "LAST RULE")]
    for r in rows:
        table.append((r.account, *(str(r.counts[b]) for b in BASES),
                      f"{round(100 * r.window_share)}%",
                      *(_when(r.last[b], now) for b in BASES)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        click.echo("(nothing relayed in this period)", err=True)
    still = sum(1 for r in rows if r.counts["window"])
    click.echo(f"{still} account{'s' if still != 1 else ''} still relaying through windows",
               err=True)


def _when(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    return time.strftime("%Y-%m-%d", time.localtime(t)) + f" ({_ago(now - t)} ago)"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"
