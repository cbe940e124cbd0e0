"""Human passwords only (team members): argon2 by default, bcrypt accepted and upgraded.

API-key secrets never come here: they are high-entropy and hashed with SHA-256 (app.tokens).
"""

from __future__ import annotations

from passlib.context import CryptContext

_context = CryptContext(schemes=["argon2", "bcrypt"], deprecated="auto")
# Verified against when the email is unknown, so a wrong email costs the same as a wrong password.
_DUMMY_HASH = _context.hash("keyplane-timing-equaliser")

MIN_PASSWORD = 10
MAX_PASSWORD = 1024


def hash_password(password: str) -> str:
    """The stored form of a member's password."""
    result: str = _context.hash(password)
    return result


def check_password(password: str, stored: str | None) -> tuple[bool, str | None]:
    """(matches, replacement hash when the stored one uses an outdated scheme or cost)."""
    if stored is None:
        _context.verify(password, _DUMMY_HASH)
        return False, None
    ok, new_hash = _context.verify_and_update(password, stored)
    return bool(ok), new_hash


def equalise_timing(password: str) -> None:
    """Spend the time a real check would, for an unknown account."""
    _context.verify(password, _DUMMY_HASH)
