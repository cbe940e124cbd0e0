"""The one place a token becomes a decision. Pure logic over a KeyRecord; no I/O, no Starlette
or Strawberry imports (the cache hands it the record, the HTTP adapter writes the response).

Check order (CONTRACT §4), the same whichever way the key arrives:

1. missing key                       → MISSING_KEY
2. malformed shape or bad checksum   → INVALID_KEY   (before any lookup: no database read)
3. unknown (or deleted) token        → INVALID_KEY
4. disabled                          → DISABLED
5. revoked, grace over (or none)     → REVOKED       (a future grace_ends_at keeps it verifying)
6. expired                           → EXPIRED
7. client IP not on the allowlist    → IP_NOT_ALLOWED
8. Origin not authorized             → ORIGIN_NOT_ALLOWED (CLIENT_SIDE keys only)
9. a required permission not held,   → INSUFFICIENT_PERMISSIONS
   or the requirements unreadable (fail closed: a body that may have named some)
10. otherwise                        → VALID
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum

from app.net import Address, Network, ip_allowed
from app.permissions import is_permission, missing_permissions
from app.tokens import parse_token

_NEVER = datetime.min.replace(tzinfo=UTC)


class UsageTally:
    """One process's counts of a key's verifications that are not written yet, and what the
    activity recorder last learned of where it is used from.

    app.usage counts into it and its flush takes the counts; the verifier never reads it. It
    lives on the otherwise immutable record, so counting a verification of a cached key needs no
    lookup and no new object (the recorder keeps a list of the tallies it has to write).
    app.activity keeps here the client IP it last found already written for this key and until
    when that needs no new write, so a key called from one address costs it no lookup."""

    __slots__ = (
        "bucket_hour",
        "bucket_id",
        "failed",
        "hour",
        "last_used",
        "owner",
        "seen_ip",
        "seen_until",
        "total",
    )

    def __init__(self) -> None:
        self.owner: object | None = None  # the recorder counting into it (the first to count)
        self.hour: datetime | None = None  # the hour the pending counts belong to
        self.total = 0  # 0: nothing pending
        self.failed = 0  # the rest of the total was successful
        self.last_used: datetime | None = None  # of the pending successful verifications
        self.bucket_id: int | None = None  # PostgreSQL: the owner's bucket row of bucket_hour
        self.bucket_hour: datetime | None = None
        self.seen_ip: str | None = None  # app.activity: an IP written for this key
        self.seen_until: datetime = _NEVER  # ... whose last-seen time needs no update until then


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """Everything a verification needs to know about one key, as the cache holds it."""

    key_id: str  # public key ID (key_…)
    key_pk: int  # api_keys.id (the usage flush updates counters by it)
    key_type: str  # "SERVER" | "MOBILE" | "CLIENT_SIDE"
    workspace_pk: int
    workspace_id: str  # public ws_…
    environment_pk: int
    environment_id: str  # public env_…
    status: str  # "ENABLED" | "DISABLED" | "REVOKED"
    permissions: frozenset[str]  # effective: direct plus role
    permission_list: tuple[str, ...]  # the same, sorted, for responses
    allowed_networks: tuple[Network, ...]  # parsed once when the entry is filled
    authorized_origins: frozenset[str]  # CLIENT_SIDE only: the environment's origins
    expires_at: datetime | None
    grace_ends_at: datetime | None
    # Mutable usage counts (app.usage); not part of what the record says about the key.
    tally: UsageTally = field(default_factory=UsageTally, init=False, compare=False, repr=False)


class Code(str, Enum):
    """Verification outcomes: a status, not an exception (system errors become UNAVAILABLE)."""

    VALID = "VALID"
    MISSING_KEY = "MISSING_KEY"
    INVALID_KEY = "INVALID_KEY"
    DISABLED = "DISABLED"
    REVOKED = "REVOKED"
    EXPIRED = "EXPIRED"
    IP_NOT_ALLOWED = "IP_NOT_ALLOWED"
    ORIGIN_NOT_ALLOWED = "ORIGIN_NOT_ALLOWED"
    INSUFFICIENT_PERMISSIONS = "INSUFFICIENT_PERMISSIONS"
    UNAVAILABLE = "UNAVAILABLE"


def http_status(code: Code) -> int:
    """The HTTP status of a verification outcome: the one place this mapping lives."""
    if code is Code.VALID:
        return 200
    if code in (Code.IP_NOT_ALLOWED, Code.ORIGIN_NOT_ALLOWED, Code.INSUFFICIENT_PERMISSIONS):
        return 403
    if code is Code.UNAVAILABLE:
        return 503
    return 401


# Messages never contain the token; a permission list is not secret (the caller sent it).
_MESSAGES = {
    Code.VALID: "API key is valid",
    Code.MISSING_KEY: "No API key in the request",
    Code.INVALID_KEY: "Invalid API key",
    Code.DISABLED: "API key is disabled",
    Code.REVOKED: "API key has been revoked",
    Code.EXPIRED: "API key has expired",
    Code.IP_NOT_ALLOWED: "IP address not allowed",
    Code.ORIGIN_NOT_ALLOWED: "Origin not allowed",
    Code.INSUFFICIENT_PERMISSIONS: "Missing required permissions",
    Code.UNAVAILABLE: "Verification is temporarily unavailable; try again",
}


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the request said: token, resolved client IP, normalised Origin, required perms."""

    token: str | None
    client_ip: Address | None
    origin: str | None  # normalised (app.net.normalise_origin), None when absent or invalid
    required: tuple[str, ...] = ()
    # Set when the request may have named requirements that could not be read (a POST body
    # that is not a JSON object, or whose `permissions` is not a list of strings): what was
    # wrong, never the content. Refused at step 9, as a requirement that is not held.
    unreadable: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one verification; `record` is set whenever the key is known."""

    code: Code
    http_status: int
    message: str
    record: KeyRecord | None = None

    @property
    def valid(self) -> bool:
        return self.code is Code.VALID


def _decide(code: Code, record: KeyRecord | None = None, message: str | None = None) -> Decision:
    return Decision(code, http_status(code), message or _MESSAGES[code], record)


_MISSING = _decide(Code.MISSING_KEY)
_MALFORMED = _decide(Code.INVALID_KEY)
_UNKNOWN = _decide(Code.INVALID_KEY)
_UNAVAILABLE = _decide(Code.UNAVAILABLE)


def decide_missing() -> Decision:
    """No key anywhere in the request."""
    return _MISSING


def decide_malformed() -> Decision:
    """A token whose shape or checksum is wrong: refused without a lookup."""
    return _MALFORMED


def decide_unknown() -> Decision:
    """A well-formed token that names no key (the same answer for a deleted one)."""
    return _UNKNOWN


def decide_unavailable() -> Decision:
    """The key's state cannot be known (database down, nothing fresh enough cached)."""
    return _UNAVAILABLE


def precheck(facts: RequestFacts) -> Decision | None:
    """Steps 1-2 of the order, which need no lookup: a refusal, or None to go look the key up."""
    if not facts.token:
        return _MISSING
    if parse_token(facts.token) is None:
        return _MALFORMED
    return None


def verify(facts: RequestFacts, record: KeyRecord | None, now: datetime) -> Decision:
    """Decide one verification; `record` is the looked-up key, None when the token is unknown."""
    early = precheck(facts)
    if early is not None:
        return early
    return judge(facts, record, now)


def _shown(permission: str) -> str:
    """A missing permission as the message shows it. One no key could hold (control
    characters, NUL, half a surrogate pair, text beyond ASCII) is shown escaped, as `ascii()`
    writes it: the message is stored in the denial log, and PostgreSQL text holds no NUL."""
    if is_permission(permission):
        return permission
    return ascii(permission[:64])[1:-1]


def judge(facts: RequestFacts, record: KeyRecord | None, now: datetime) -> Decision:
    """Steps 3-10 for a token already known to pass steps 1-2 (prechecked, or found in the key
    cache, which only ever holds hashes of well-formed tokens)."""
    if record is None:
        return _UNKNOWN
    if record.status == "DISABLED":
        return _decide(Code.DISABLED, record)
    if record.status == "REVOKED" and (record.grace_ends_at is None or record.grace_ends_at <= now):
        return _decide(Code.REVOKED, record)
    if record.expires_at is not None and record.expires_at <= now:
        return _decide(Code.EXPIRED, record)
    if not ip_allowed(facts.client_ip, record.allowed_networks):
        return _decide(Code.IP_NOT_ALLOWED, record)
    if record.key_type == "CLIENT_SIDE" and (
        facts.origin is None or facts.origin not in record.authorized_origins
    ):
        return _decide(Code.ORIGIN_NOT_ALLOWED, record)
    if facts.unreadable is not None:
        return _decide(
            Code.INSUFFICIENT_PERMISSIONS,
            record,
            f"Required permissions could not be read: {facts.unreadable}",
        )
    if facts.required:
        missing = missing_permissions(record.permissions, facts.required)
        if missing:
            shown = ", ".join(_shown(m) for m in missing[:10])
            return _decide(
                Code.INSUFFICIENT_PERMISSIONS,
                record,
                f"{_MESSAGES[Code.INSUFFICIENT_PERMISSIONS]}: {shown}",
            )
    return _decide(Code.VALID, record)
