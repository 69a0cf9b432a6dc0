"""Errors of the user database and its administration."""

from __future__ import annotations

from relaygate.errors import RelaygateError


class UserError(RelaygateError):
    """A bad administrative request (bad name, user exists, no such user)."""


class NoSuchUser(UserError):
    """The named user does not exist."""


class UserDBError(RelaygateError):
    """The user database could not be read or written (servers answer a temporary failure)."""
