"""Mint, parse, checksum and hash tokens. Pure functions; no model or I/O imports.

An API key token is ``<keyPrefix>_<tag>_<body>``: the body is 22 base62 characters of 128 random
bits followed by 6 base62 characters of the CRC32 (zlib) of everything before them. The checksum
lets a malformed or mistyped token be refused without touching the database, and the fixed prefix
makes a leaked token recognisable by secret scanners.

Secrets are stored only as SHA-256 digests. They are 128-bit random values, so a preimage search
is hopeless and a slow password KDF would only slow every verification down (see README).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass
from enum import Enum

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_BITS = 128
RANDOM_CHARS = 22  # 62**22 > 2**128
CHECKSUM_CHARS = 6  # 62**6 > 2**32
BODY_CHARS = RANDOM_CHARS + CHECKSUM_CHARS
DISPLAY_BODY_CHARS = 4
KEY_PREFIX_RE = re.compile(r"^[a-z]{2,12}$")
MAX_TOKEN_LENGTH = 12 + 1 + 3 + 1 + BODY_CHARS


class KeyType(str, Enum):
    SERVER = "SERVER"
    MOBILE = "MOBILE"
    CLIENT_SIDE = "CLIENT_SIDE"


TAG_BY_TYPE = {KeyType.SERVER: "sdk", KeyType.MOBILE: "mob", KeyType.CLIENT_SIDE: "cs"}
TYPE_BY_TAG = {tag: key_type for key_type, tag in TAG_BY_TYPE.items()}

_TOKEN_RE = re.compile(rf"^([a-z]{{2,12}})_(sdk|mob|cs)_([0-9A-Za-z]{{{BODY_CHARS}}})$")
_ID_RE = re.compile(r"^[0-9A-Za-z]{22}$")


def base62(number: int, width: int) -> str:
    """Encode a non-negative integer in base62, left-padded with '0' to `width` characters."""
    chars = []
    while number:
        number, rem = divmod(number, 62)
        chars.append(BASE62[rem])
    return "".join(reversed(chars)).rjust(width, "0")


def checksum(text: str) -> str:
    """The 6-character base62 CRC32 of `text`."""
    return base62(zlib.crc32(text.encode("ascii")), CHECKSUM_CHARS)


@dataclass(frozen=True)
class ParsedToken:
    """A token whose shape and checksum are valid (it may still be unknown)."""

    prefix: str
    key_type: KeyType
    token: str


def mint_token(key_prefix: str, key_type: KeyType) -> str:
    """A fresh token for a key of `key_type` in a workspace whose prefix is `key_prefix`."""
    if not KEY_PREFIX_RE.match(key_prefix):
        raise ValueError(f"invalid key prefix {key_prefix!r}")
    body = base62(secrets.randbits(RANDOM_BITS), RANDOM_CHARS)
    head = f"{key_prefix}_{TAG_BY_TYPE[key_type]}_{body}"
    return head + checksum(head)


def parse_token(token: str) -> ParsedToken | None:
    """Check a token's shape and checksum without any lookup; None when it is malformed."""
    if len(token) > MAX_TOKEN_LENGTH:
        return None
    match = _TOKEN_RE.match(token)
    if match is None:
        return None
    head, given = token[:-CHECKSUM_CHARS], token[-CHECKSUM_CHARS:]
    if not hmac.compare_digest(checksum(head), given):
        return None
    return ParsedToken(prefix=match.group(1), key_type=TYPE_BY_TAG[match.group(2)], token=token)


def display_prefix(token: str) -> str:
    """The first characters of a token, safe to show: `acme_sdk_a1B2`."""
    prefix, tag, body = token.split("_", 2)
    return f"{prefix}_{tag}_{body[:DISPLAY_BODY_CHARS]}"


def hash_secret(token: str) -> str:
    """The stored form of a high-entropy secret: hex SHA-256."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_public_id(kind: str) -> str:
    """A public identifier such as `key_…`, `env_…`, `ws_…`: random, safe to log, not a secret."""
    return f"{kind}_{base62(secrets.randbits(RANDOM_BITS), RANDOM_CHARS)}"


def is_public_id(value: str, kind: str) -> bool:
    """True when `value` has the shape of a `kind_…` public identifier."""
    head, sep, tail = value.partition("_")
    return sep == "_" and head == kind and bool(_ID_RE.match(tail))


# Management and session tokens are bearer secrets for the management API; their own shape keeps
# them from ever being mistaken for an API key (and vice versa).
MANAGEMENT_TAG = "kpm"
SESSION_TAG = "kps"
INVITE_TAG = "kpi"  # a one-time invitation to set a password; never a bearer
_BEARER_RE = re.compile(rf"^(kpm|kps)_([0-9A-Za-z]{{{BODY_CHARS}}})$")
_INVITE_RE = re.compile(rf"^kpi_[0-9A-Za-z]{{{BODY_CHARS}}}$")


def mint_bearer(tag: str) -> str:
    """A fresh management (`kpm_…`), session (`kps_…`) or invitation (`kpi_…`) token."""
    head = f"{tag}_{base62(secrets.randbits(RANDOM_BITS), RANDOM_CHARS)}"
    return head + checksum(head)


def parse_bearer(token: str) -> str | None:
    """The tag of a well-formed management or session token, else None."""
    if len(token) > 4 + BODY_CHARS:
        return None
    match = _BEARER_RE.match(token)
    if match is None:
        return None
    if not hmac.compare_digest(checksum(token[:-CHECKSUM_CHARS]), token[-CHECKSUM_CHARS:]):
        return None
    return match.group(1)


def is_invite_token(token: str) -> bool:
    """True for a well-formed invitation token (shape and checksum)."""
    if len(token) != 4 + BODY_CHARS or _INVITE_RE.match(token) is None:
        return False
    return hmac.compare_digest(checksum(token[:-CHECKSUM_CHARS]), token[-CHECKSUM_CHARS:])


# Anything shaped like an API key or a management/session token, wherever it appears in a text.
_SECRET_SHAPE = re.compile(
    rf"[a-z]{{2,12}}_(?:sdk|mob|cs)_[0-9A-Za-z]{{{BODY_CHARS}}}|(?:kpm|kps|kpi)_[0-9A-Za-z]{{{BODY_CHARS}}}"
)
REDACTED = "<redacted secret>"


def looks_like_secret(text: str) -> bool:
    """True when `text` contains something shaped like a token (checksum not checked)."""
    return _SECRET_SHAPE.search(text) is not None


def redact(text: str) -> str:
    """`text` with every token-shaped substring replaced, for messages that quote user input."""
    return _SECRET_SHAPE.sub(REDACTED, text)
