"""The length of a relay window: the one reader of ``RELAY_CTRL_EXPIRY`` and ``expiry``.

Theory of operation
-------------------
relay-ctrl reads ``$RELAY_CTRL_EXPIRY`` with ``atol`` and falls back to 900
seconds for anything it cannot use, so ``1e3`` meant one second, ``30s``
thirty, ``abc``, ``-5`` and ``0`` quietly meant 900, and
``99999999999999999999`` an absurd window. Every reader of a window length
(the chain programs, ``relaygate tcpserver``, ``--envdir``, the configuration
file, ``$RELAYGATE_EXPIRY``, ``--expiry``, the Dovecot hook) now goes through
:func:`parse_expiry`: a plain positive integer of seconds keeps relay-ctrl's
meaning, up to :data:`MAX_EXPIRY`; anything else is refused with a reason, and
the caller says what that means (serve and the CLI refuse to start; a chain
program logs one line and fails closed). Never a silent 1-second or 900-second
window.

This module imports nothing: ``relay-ctrl-check`` runs once per SMTP
connection and pays for every import.
"""

from __future__ import annotations

#: relay-ctrl's window when ``$RELAY_CTRL_EXPIRY`` is not set at all (seconds)
DEFAULT_EXPIRY = 900
#: longest window accepted: one year. Longer is a mistake, not a policy (a
#: window that never closes is a rules-file line), and it keeps ``now + expiry``
#: and the spool's ``mtime = expires_at - expiry`` exact to the microsecond.
MAX_EXPIRY = 365 * 24 * 3600
#: digits looked at; anything longer is over MAX_EXPIRY anyway (and ``int()``
#: of thousands of digits is slow)
_MAX_DIGITS = 12

#: why a value was refused, for the caller's one-line message
REASON = f"must be a whole number of seconds from 1 to {MAX_EXPIRY}"


def parse_expiry(value: object) -> int:
    """A window length in seconds from text (an envdir file, a variable, an option)
    or a TOML integer; raise ValueError(:data:`REASON`) for anything else.

    Text may have surrounding white space (an envdir line); otherwise it must
    be ASCII digits only: no sign, exponent, fraction or unit.
    """
    if isinstance(value, bool):
        raise ValueError(REASON)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip(" \t\n\r\f\v")
        if not text or len(text) > _MAX_DIGITS or not text.isascii() or not text.isdigit():
            raise ValueError(REASON)
        number = int(text)
    else:
        raise ValueError(REASON)
    if not 1 <= number <= MAX_EXPIRY:
        raise ValueError(REASON)
    return number
