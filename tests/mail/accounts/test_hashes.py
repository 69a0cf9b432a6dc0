"""argon2id verification: libsodium for the strings it reads, argon2-cffi for the rest,
the same answer either way."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerifyMismatchError
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.mail.accounts import hashes
from relaygate.mail.accounts.hashes import sodium_reads, verify_argon2

CFFI = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@settings(max_examples=40, deadline=None)
@given(time_cost=st.integers(1, 3), lanes=st.integers(1, 4), extra_kib=st.integers(0, 64),
       salt_len=st.integers(8, 64), hash_len=st.integers(16, 64),
       password=st.text(max_size=40), other=st.text(max_size=40))
def test_libsodium_and_argon2_cffi_agree(time_cost: int, lanes: int, extra_kib: int,
                                         salt_len: int, hash_len: int, password: str,
                                         other: str) -> None:
    hasher = PasswordHasher(time_cost=time_cost, memory_cost=8 * lanes + extra_kib,
                            parallelism=lanes, salt_len=salt_len, hash_len=hash_len)
    try:
        stored = hasher.hash(password)
    except UnicodeError:
        return  # lone surrogates: no hash at all
    assert sodium_reads(stored) == (len(stored) <= 127)
    assert verify_argon2(CFFI, stored, password) is True
    if other != password:
        with pytest.raises(VerifyMismatchError):
            verify_argon2(CFFI, stored, other)


def test_sodium_takes_the_strings_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[bytes] = []
    real = hashes._sodium_argon2id
    assert real is not None

    class Spy:
        @staticmethod
        def verify(stored: bytes, password: bytes) -> bool:
            used.append(stored)
            return bool(real.verify(stored, password))

    monkeypatch.setattr(hashes, "_sodium_argon2id", Spy)
    stored = PasswordHasher(time_cost=1, memory_cost=16, parallelism=2).hash("pw")
    assert verify_argon2(CFFI, stored, "pw")
    assert used == [stored.encode()]


@pytest.mark.parametrize("kind", [Type.I, Type.D])
def test_other_argon2_types_go_to_argon2_cffi(kind: Type) -> None:
    stored = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=kind).hash("pw")
    assert not sodium_reads(stored)
    assert verify_argon2(CFFI, stored, "pw")
    with pytest.raises(VerifyMismatchError):
        verify_argon2(CFFI, stored, "wrong")


def test_strings_libsodium_would_misread_go_to_argon2_cffi() -> None:
    good = CFFI.hash("pw")
    # version 16 (argon2 1.0), padded base64, an over-long string: not for libsodium
    v16 = good.replace("v=19", "v=16")
    assert not sodium_reads(v16)
    with pytest.raises((VerifyMismatchError, InvalidHashError)):
        verify_argon2(CFFI, v16, "pw")
    assert not sodium_reads(good + "==")
    long = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, salt_len=64,
                          hash_len=64).hash("pw")
    assert len(long) > 127 and not sodium_reads(long)
    assert verify_argon2(CFFI, long, "pw")
    assert not sodium_reads("$argon2id$v=19$m=8,t=1,p=2$c2FsdHNhbHQ$" + "A" * 22)  # m < 8p


def test_without_pynacl_everything_goes_to_argon2_cffi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashes, "_sodium_argon2id", None)
    stored = CFFI.hash("pw")
    assert not sodium_reads(stored)
    assert verify_argon2(CFFI, stored, "pw")
    with pytest.raises(VerifyMismatchError):
        verify_argon2(CFFI, stored, "wrong")
