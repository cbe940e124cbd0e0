"""Typed error values: every mutation returns a union of one success type and these."""

from __future__ import annotations

import strawberry

from app import errors


@strawberry.interface(name="Error", description="A refusal the client can act on.")
class Error:
    code: str
    message: str


@strawberry.type(name="NotFoundError")
class NotFoundError(Error):
    pass


@strawberry.type(name="ValidationFailedError")
class ValidationFailedError(Error):
    field: str | None = None


@strawberry.type(name="KeyLimitReachedError")
class KeyLimitReachedError(Error):
    limit: int


@strawberry.type(name="InvalidStateError")
class InvalidStateError(Error):
    pass


@strawberry.type(name="InvalidCredentialsError")
class InvalidCredentialsError(Error):
    pass


ErrorValue = (
    NotFoundError
    | ValidationFailedError
    | KeyLimitReachedError
    | InvalidStateError
    | InvalidCredentialsError
)


def error_value(exc: errors.DomainError) -> ErrorValue:
    """The GraphQL value for a domain refusal."""
    if isinstance(exc, errors.ValidationFailed):
        return ValidationFailedError(code=exc.code, message=exc.message, field=exc.field)
    if isinstance(exc, errors.KeyLimitReached):
        return KeyLimitReachedError(code=exc.code, message=exc.message, limit=exc.limit)
    if isinstance(exc, errors.NotFound):
        return NotFoundError(code=exc.code, message=exc.message)
    if isinstance(exc, errors.InvalidState):
        return InvalidStateError(code=exc.code, message=exc.message)
    if isinstance(exc, errors.InvalidCredentials):
        return InvalidCredentialsError(code=exc.code, message=exc.message)
    raise exc
