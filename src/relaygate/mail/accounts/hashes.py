"""Password hash formats: argon2id for new passwords, crypt(3) hashes imported from
passwd-style files (verified with libpass until the next login replaces them).
"""

from __future__ import annotations

import functools
from typing import Any

import argon2
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError

from relaygate.mail.accounts.errors import UserError

#: crypt(3) prefixes libpass verifies for us
CRYPT_SCHEMES = {
    "$6$": "sha512_crypt",
    "$5$": "sha256_crypt",
    "$2a$": "bcrypt",
    "$2b$": "bcrypt",
    "$2y$": "bcrypt",
    "$1$": "md5_crypt",
}


def production_hasher() -> PasswordHasher:
    """argon2id with RFC 9106's second recommended ("low memory") parameters: 64 MiB."""
    return PasswordHasher.from_parameters(argon2.profiles.RFC_9106_LOW_MEMORY)


def hasher_description(hasher: PasswordHasher) -> str:
    """``argon2id m=65536KiB t=3 p=4`` for logs and the benchmark."""
    return (f"argon2id m={hasher.memory_cost}KiB t={hasher.time_cost} "
            f"p={hasher.parallelism}")


def hash_scheme(stored: str) -> str:
    """Name of the scheme of a stored hash (``argon2id``, ``sha512_crypt``, ...)."""
    if stored.startswith("$argon2"):
        return stored.split("$", 2)[1]
    for prefix, scheme in CRYPT_SCHEMES.items():
        if stored.startswith(prefix):
            return scheme
    return "unknown"


def normalize_imported_hash(raw: str) -> str:
    """Validate an imported hash and return it as stored; raise UserError if unusable.

    A Dovecot-style ``{SCHEME}`` prefix (``{SHA512-CRYPT}$6$...``) is dropped.
    """
    h = raw.strip()
    if h.startswith("{") and "}" in h:
        h = h.split("}", 1)[1]
    if not h or h[0] in "!*":
        raise UserError("no usable password hash (locked account?)")
    if h.startswith("$argon2"):
        try:
            argon2.extract_parameters(h)
        except (InvalidHashError, ValueError):
            raise UserError("malformed argon2 hash") from None
        return h
    for prefix, scheme in CRYPT_SCHEMES.items():
        if h.startswith(prefix):
            handler = crypt_handler(scheme)
            try:
                handler.from_string(h)
            except (ValueError, TypeError):
                raise UserError(f"malformed {scheme} hash") from None
            return h
    raise UserError("unsupported hash scheme (expected $argon2id$, $6$, $5$, $2b$, $2y$ or $1$)")


@functools.cache
def crypt_handler(scheme: str) -> Any:
    # libpass is imported only when a legacy hash is met: it is slow to import.
    import passlib.hash

    return getattr(passlib.hash, scheme)
