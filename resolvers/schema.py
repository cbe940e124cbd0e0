"""The schema: root Query and Mutation composed from per-feature classes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import strawberry
from graphql import BREAK, DocumentNode, SelectionSetNode, Visitor, visit
from graphql.error import GraphQLError
from graphql.validation import NoSchemaIntrospectionCustomRule
from strawberry.extensions import (
    AddValidationRules,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    SchemaExtension,
    ValidationCache,
)
from strawberry.schema.config import StrawberryConfig
from strawberry.types import ExecutionResult

from app import errors
from app.db import UNAVAILABLE_MESSAGE, UNREACHABLE_ERRORS
from app.log_policy import unforeseen
from resolvers.anomalies import AnomalyMutations, AnomalyQueries
from resolvers.audit import AuditQueries
from resolvers.context import Unauthenticated
from resolvers.cost import QueryCostRule
from resolvers.keys import KeyMutations, KeyQueries
from resolvers.management_tokens import ManagementTokenMutations
from resolvers.members import MemberMutations, MemberQueries
from resolvers.monitoring import MonitoringQueries
from resolvers.roles import RoleMutations, RoleQueries
from resolvers.scalars import SCALAR_MAP
from resolvers.workspace import WorkspaceMutations, WorkspaceQueries

logger = logging.getLogger("keyplane.graphql")

MAX_DEPTH = 10
MAX_ALIASES = 30
MAX_TOKENS = 2000


@strawberry.type
class Query(
    KeyQueries,
    WorkspaceQueries,
    RoleQueries,
    AuditQueries,
    MemberQueries,
    AnomalyQueries,
    MonitoringQueries,
):
    pass


@strawberry.type
class Mutation(
    KeyMutations,
    WorkspaceMutations,
    RoleMutations,
    ManagementTokenMutations,
    MemberMutations,
    AnomalyMutations,
):
    pass


MASKED_MESSAGE = "Internal server error"


def _shown(error: GraphQLError, message: str, code: str) -> GraphQLError:
    """The error as the client sees it: this message and code, where it happened, and no
    original error (nothing of it reaches the response)."""
    return GraphQLError(
        message=message,
        nodes=error.nodes,
        source=error.source,
        positions=error.positions,
        path=error.path,
        extensions={"code": code},
    )


def _as_shown(error: GraphQLError) -> GraphQLError:
    """The error as the client gets it: typed errors with their `extensions.code`; anything
    else logged (its type and stack, not its message, which may quote a value such as a token
    hash) and masked."""
    original = error.original_error
    if original is None:
        return error  # a GraphQL syntax/validation error: about the query, safe to show
    if isinstance(original, errors.Forbidden):
        return _shown(error, str(original), "FORBIDDEN")
    if isinstance(original, Unauthenticated):
        return _shown(error, str(original), "UNAUTHENTICATED")
    if isinstance(original, errors.DomainError):
        return _shown(error, str(original), original.code)
    if isinstance(original, UNREACHABLE_ERRORS):
        # Not a bug: the database cannot be reached now. Its own message may quote a host or
        # a statement, so the client gets a fixed one (the log has the error's type).
        logger.warning("database unreachable in %s: %s", error.path, type(original).__name__)
        return _shown(error, UNAVAILABLE_MESSAGE, "UNAVAILABLE")
    unforeseen(logger, f"unexpected error in {error.path}", original)
    return _shown(error, MASKED_MESSAGE, "INTERNAL_SERVER_ERROR")


def _empty_selection(document: DocumentNode) -> SelectionSetNode | None:
    """The first selection set that selects nothing, if any."""
    found: list[SelectionSetNode] = []

    class Finder(Visitor):
        def enter_selection_set(self, node: SelectionSetNode, *_: Any) -> Any:
            if not node.selections:
                found.append(node)
                return BREAK
            return None

    visit(document, Finder())
    return found[0] if found else None


class NonEmptySelections(SchemaExtension):
    """`{ }` selects nothing, which GraphQL's grammar does not allow, yet graphql-core 3.3 parses
    it, and Strawberry's depth limiter then fails on it (a ValueError, not a GraphQL error). So
    it is refused right after parsing, as the syntax error it is."""

    def on_parse(self) -> Iterator[None]:
        yield
        document = self.execution_context.graphql_document
        if document is not None and (empty := _empty_selection(document)) is not None:
            raise GraphQLError(
                "Syntax Error: a selection set must select at least one field.", nodes=[empty]
            )


class KeyplaneSchema(strawberry.Schema):
    """The error policy, applied to every result in `execute`: typed errors reach the client
    with `extensions.code`; anything else (a bug) is logged and masked, so no stack trace or SQL
    ever leaves the server. Applied there, not in an extension's `on_operation` (Strawberry's
    MaskErrors), because an error raised before the operation runs (in parsing or validation: a
    bug in a limiter, say) never reaches that hook. Only masked errors are logged: typed
    refusals and invalid queries are the client's business, and a traceback per bad request
    would let any caller flood the logs."""

    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        return None

    async def execute(self, *args: Any, **kwargs: Any) -> ExecutionResult:
        result = await super().execute(*args, **kwargs)
        if result.errors:
            result.errors = [_as_shown(error) for error in result.errors]
        return result


def build_schema(*, introspection: bool = True) -> strawberry.Schema:
    """The GraphQL schema with its caches, abuse limits and error policy."""
    # Factories, not instances: Strawberry builds fresh extensions per request (the parser and
    # validation caches themselves are module-level and shared).
    extensions: list[Callable[[], SchemaExtension]] = [
        NonEmptySelections,
        lambda: ParserCache(maxsize=256),
        lambda: ValidationCache(maxsize=256),
        lambda: QueryDepthLimiter(max_depth=MAX_DEPTH),
        lambda: MaxAliasesLimiter(max_alias_count=MAX_ALIASES),
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
        lambda: AddValidationRules([QueryCostRule]),
    ]
    if not introspection:
        extensions.append(lambda: AddValidationRules([NoSchemaIntrospectionCustomRule]))
    return KeyplaneSchema(
        query=Query,
        mutation=Mutation,
        extensions=extensions,
        config=StrawberryConfig(scalar_map=SCALAR_MAP),
    )
