"""``relaygate users``: mailbox accounts in ``<data_dir>/users.db``.

Passwords are read from the terminal (twice, hidden) or, when standard input
is not a terminal, from its first line; never from the command line, where
``ps`` and shell histories would show them. A running server sees changes
within a second (it watches the database), or at once on SIGHUP.

Exit codes: 0 done; 1 no such user / user exists / refused; 2 usage (bad
name, bad hash file); 111 the user database cannot be opened or written.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from relaygate.cli import EXIT_TEMPFAIL, settings_from

if TYPE_CHECKING:
    from relaygate.interfaces import Account
    from relaygate.mail.accounts.db import UserDB


@contextmanager
def _db(ctx: click.Context) -> Iterator[UserDB]:
    from relaygate.mail.accounts.db import NoSuchUser, UserDBError, UserError, open_directory

    try:
        db = open_directory(settings_from(ctx))
    except UserDBError as exc:
        click.echo(f"relaygate: {exc}", err=True)
        ctx.exit(EXIT_TEMPFAIL)
    try:
        yield db
    except NoSuchUser as exc:
        click.echo(f"relaygate: {exc}", err=True)
        ctx.exit(1)
    except UserDBError as exc:
        click.echo(f"relaygate: {exc}", err=True)
        ctx.exit(EXIT_TEMPFAIL)
    except UserError as exc:
        text = str(exc)
        click.echo(f"relaygate: {text}", err=True)
        ctx.exit(1 if "exists" in text or "belongs to" in text else 2)
    finally:
        db.close()


def _interactive() -> bool:
    return sys.stdin.isatty()


def read_password(prompt: str = "Password") -> str:
    """From the terminal (hidden, confirmed) or the first line of a non-terminal stdin."""
    if _interactive():
        value = click.prompt(prompt, hide_input=True, confirmation_prompt=True)
        return str(value)
    line = sys.stdin.readline()
    password = line[:-1] if line.endswith("\n") else line
    if password.endswith("\r"):
        password = password[:-1]
    if not password:
        raise click.UsageError("no password on standard input")
    return password


def _account_dict(db: UserDB, a: Account) -> dict[str, Any]:
    return {
        "login": a.login,
        "domain": a.domain,
        "maildir": str(a.maildir),
        "addresses": list(a.addresses),
        "enabled": a.enabled,
        "apop": db.apop_secret(a.login) is not None if a.enabled else None,
        "hash": db.hash_scheme_of(a.login),
    }


@click.group()
def users() -> None:
    """Manage mailbox users (users.db in the data directory).

    A user logs in to POP3/IMAP (opening a relay window) and SMTP AUTH with
    LOGIN, which is either a bare name (alice; its domain is --domain or the
    first local domain) or an address (alice@example.test).
    """


@users.command("add")
@click.argument("login")
@click.option("--domain", help="Domain of a bare LOGIN (default: the first local domain).")
@click.option("--address", "addresses", multiple=True, metavar="ADDR",
              help="Another address the user receives mail for and may send as (repeatable).")
@click.option("--maildir", type=click.Path(file_okay=False, path_type=Path),
              help="Maildir path (default DATA_DIR/mail/DOMAIN/LOCALPART).")
@click.option("--apop", is_flag=True,
              help="Also allow POP3 APOP with a new random secret (printed once).")
@click.option("--disabled", is_flag=True, help="Create the user unable to log in.")
@click.pass_context
def add(ctx: click.Context, login: str, domain: str | None, addresses: tuple[str, ...],
        maildir: Path | None, apop: bool, disabled: bool) -> None:
    """Create a user and its Maildir (mode 0700).

    The password is prompted for, or read from standard input when that is
    not a terminal (echo 'secret' | relaygate users add alice).
    """
    with _db(ctx) as db:
        # Validate the name before asking for a password.
        db.split_login(login, domain)
        password = read_password()
        account = db.add(login, password, domain=domain, addresses=addresses, maildir=maildir,
                         apop=apop, enabled=not disabled)
        click.echo(f"added {account.login} ({', '.join(account.addresses)}), "
                   f"Maildir {account.maildir}")
        if apop:
            click.echo(f"APOP secret: {db.apop_secret(account.login)}")


@users.command("passwd")
@click.argument("login")
@click.pass_context
def passwd(ctx: click.Context, login: str) -> None:
    """Set a new password for LOGIN (prompted, or the first line of stdin)."""
    with _db(ctx) as db:
        account = db.find_account(login)
        if account is None:
            click.echo(f"relaygate: no user {login}", err=True)
            ctx.exit(1)
        db.set_password(account.login, read_password("New password"))
        click.echo(f"password of {account.login} changed")


@users.command("del")
@click.argument("login")
@click.option("--remove-mail", is_flag=True, help="Also delete the user's Maildir.")
@click.pass_context
def delete(ctx: click.Context, login: str, remove_mail: bool) -> None:
    """Remove LOGIN (its Maildir stays unless --remove-mail)."""
    with _db(ctx) as db:
        account = db.delete(login)
        click.echo(f"removed {account.login}")
        if remove_mail and account.maildir.exists():
            shutil.rmtree(account.maildir)
            click.echo(f"removed {account.maildir}")


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of users.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List users: login, state, addresses, Maildir."""
    with _db(ctx) as db:
        accounts = db.list()
        if as_json:
            click.echo(json.dumps([_account_dict(db, a) for a in accounts], indent=2))
            return
        for a in accounts:
            d = _account_dict(db, a)
            flags = [] if a.enabled else ["disabled"]
            if d["apop"]:
                flags.append("apop")
            if d["hash"] != "argon2id":
                flags.append(f"hash={d['hash']}")
            extra = f" [{','.join(flags)}]" if flags else ""
            click.echo(f"{a.login}{extra}\t{' '.join(a.addresses)}\t{a.maildir}")


@users.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--domain", help="Domain of bare user names in FILE (default: first local domain).")
@click.option("--update", is_flag=True, help="Replace the password hash of existing users.")
@click.pass_context
def import_(ctx: click.Context, file: Any, domain: str | None, update: bool) -> None:
    """Import users from a passwd-style FILE ('-' for stdin): user:hash[:...] lines.

    Accepted hashes: crypt(3) $6$ (SHA-512), $5$ (SHA-256), $2a$/$2b$/$2y$
    (bcrypt), $1$ (MD5), and $argon2id$/$argon2i$; a Dovecot {SCHEME} prefix
    is ignored. Each is replaced by an argon2id hash at the user's next
    successful login. All lines are checked first: one bad line imports
    nothing.
    """
    from relaygate.mail.accounts.db import UserError

    with _db(ctx) as db:
        try:
            result = db.import_passwd(file, domain=domain, update=update)
        except UserError as exc:
            for part in str(exc).split("; "):
                click.echo(f"relaygate: {part}", err=True)
            ctx.exit(2)
        click.echo(f"imported {result.added} new users, updated {result.updated}")


def _set_enabled(ctx: click.Context, login: str, enabled: bool) -> None:
    with _db(ctx) as db:
        db.set_enabled(login, enabled)
        click.echo(f"{'enabled' if enabled else 'disabled'} {login.lower()}")


@users.command("enable")
@click.argument("login")
@click.pass_context
def enable(ctx: click.Context, login: str) -> None:
    """Allow LOGIN to log in again."""
    _set_enabled(ctx, login, True)


@users.command("disable")
@click.argument("login")
@click.pass_context
def disable(ctx: click.Context, login: str) -> None:
    """Stop LOGIN from logging in (mail is still accepted; open windows stay:
    close them with `relaygate revoke --user LOGIN`)."""
    _set_enabled(ctx, login, False)


@users.command("apop")
@click.argument("login")
@click.option("--off", is_flag=True, help="Remove the APOP secret (APOP logins stop).")
@click.pass_context
def apop(ctx: click.Context, login: str, off: bool) -> None:
    """Give LOGIN a new random APOP secret and print it (or remove it with --off).

    APOP needs the secret stored in clear, so it is never the password: the
    user types this secret as the password in a mail client set to APOP.
    """
    with _db(ctx) as db:
        secret = db.set_apop(login, not off)
        click.echo(f"APOP secret: {secret}" if secret else f"APOP disabled for {login.lower()}")


@users.command("addresses")
@click.argument("login")
@click.argument("address", nargs=-1)
@click.pass_context
def addresses(ctx: click.Context, login: str, address: tuple[str, ...]) -> None:
    """Set the extra addresses of LOGIN (none given: only the primary one remains)."""
    with _db(ctx) as db:
        account = db.set_addresses(login, address)
        click.echo(f"{account.login}: {' '.join(account.addresses)}")
