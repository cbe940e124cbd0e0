"""Domain errors raised by the service layer; the GraphQL layer maps each to a typed error value.

Raising inside a service rolls its transaction back, so nothing is half-written.
"""

from __future__ import annotations

from app.tokens import redact


class DomainError(Exception):
    """A refusal the caller can act on. `code` is one of CONTRACT §3's error codes."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        # Messages quote the caller's input; a pasted token must not be echoed back.
        message = redact(message)
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    code = "NOT_FOUND"


class ValidationFailed(DomainError):
    code = "VALIDATION_FAILED"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class KeyLimitReached(DomainError):
    code = "KEY_LIMIT_REACHED"

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class InvalidState(DomainError):
    code = "INVALID_STATE"


class InvalidCredentials(DomainError):
    code = "INVALID_CREDENTIALS"


class Forbidden(Exception):
    """The operator lacks a permission: a top-level GraphQL error, not a result value."""

    def __init__(self, permission: str) -> None:
        super().__init__(f"Missing operator permission {permission!r}")
        self.permission = permission
