"""Password hash formats: argon2id for new passwords, crypt(3) hashes imported from
passwd-style files (verified with libpass until the next login replaces them).

argon2id strings are verified with libsodium (PyNaCl) when it is installed and
the string is of the form libsodium reads (``$argon2id$v=19$m=..,t=..,p=..$``,
salt and hash within its limits): it takes about 0.7x the CPU of argon2-cffi
for the same string (``bench/login.py`` prints both). Anything else, or no
PyNaCl, goes to argon2-cffi, which reads every argon2 string the user database
can hold. libsodium answers "no" for a mismatch and for a string it cannot
read alike, so only strings it surely reads go to it.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import argon2
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError

from relaygate.mail.accounts.errors import UserError

_sodium_argon2id: Any
try:
    import nacl.exceptions
    import nacl.pwhash.argon2id as _sodium_argon2id
except ImportError:  # pragma: no cover - PyNaCl is a dependency; run without it all the same
    _sodium_argon2id = None

#: argon2id strings libsodium verifies: version 19, salt of 8-64 and hash of 16-64
#: bytes (unpadded base64), at most 127 characters (crypto_pwhash_STRBYTES - 1)
_SODIUM_FORM = re.compile(
    r"\$argon2id\$v=19\$m=([1-9][0-9]{0,9}),t=([1-9][0-9]{0,9}),p=([1-9][0-9]{0,7})"
    r"\$[A-Za-z0-9+/]{11,86}\$[A-Za-z0-9+/]{22,86}")
#: argon2's limits: lanes below 2**24, memory at least 8 KiB per lane and below 2**32 KiB
_MAX_LANES = (1 << 24) - 1
_MAX_MEMORY = (1 << 32) - 1


def sodium_reads(stored: str) -> bool:
    """Whether libsodium is available and surely reads ``stored`` (see module docstring)."""
    if _sodium_argon2id is None or len(stored) > 127:
        return False
    m = _SODIUM_FORM.fullmatch(stored)
    if m is None:
        return False
    memory, time_cost, lanes = (int(g) for g in m.groups())
    return lanes <= _MAX_LANES and 8 * lanes <= memory <= _MAX_MEMORY and time_cost < 1 << 32


def verify_argon2(hasher: PasswordHasher, stored: str, password: str) -> bool:
    """Check ``password`` against an ``$argon2...`` string: True, or an argon2 exception
    (``VerifyMismatchError``, ``InvalidHashError``, ...) as ``PasswordHasher.verify``.

    A subclass of PasswordHasher keeps its own ``verify`` (tests count checks with one).
    """
    if type(hasher) is PasswordHasher and sodium_reads(stored):
        assert _sodium_argon2id is not None
        try:
            return bool(_sodium_argon2id.verify(stored.encode("ascii"),
                                                password.encode("utf-8")))
        except nacl.exceptions.InvalidkeyError:
            raise argon2.exceptions.VerifyMismatchError() from None
    return bool(hasher.verify(stored, password))

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
