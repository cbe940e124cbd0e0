"""The schema: root Query and Mutation composed from per-feature classes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import strawberry
from graphql.error import GraphQLError
from graphql.validation import NoSchemaIntrospectionCustomRule
from strawberry.extensions import (
    AddValidationRules,
    MaskErrors,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    ParserCache,
    QueryDepthLimiter,
    SchemaExtension,
    ValidationCache,
)
from strawberry.schema.config import StrawberryConfig

from app import errors
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


def _typed(error: GraphQLError) -> GraphQLError | None:
    """A client-facing error with its `extensions.code`, or None when it must be masked."""
    original = error.original_error
    if original is None:
        return error  # a GraphQL syntax/validation error: about the query, safe to show
    if isinstance(original, errors.Forbidden):
        code = "FORBIDDEN"
    elif isinstance(original, Unauthenticated):
        code = "UNAUTHENTICATED"
    elif isinstance(original, errors.DomainError):
        code = original.code
    else:
        return None
    return GraphQLError(
        message=str(original),
        nodes=error.nodes,
        source=error.source,
        positions=error.positions,
        path=error.path,
        extensions={"code": code},
    )


class ErrorPolicy(MaskErrors):
    """Typed errors reach the client with `extensions.code`; anything else (a bug, a database
    failure) is logged here and masked, so no stack trace or SQL ever leaves the server."""

    def __init__(self) -> None:
        super().__init__(error_message="Internal server error")

    def _process_errors(self, errors: list[GraphQLError]) -> list[GraphQLError]:
        processed = []
        for error in errors:
            typed = _typed(error)
            if typed is None:
                logger.error("unexpected error in %s", error.path, exc_info=error.original_error)
                masked = self.anonymise_error(error)
                masked.extensions = {"code": "INTERNAL_SERVER_ERROR"}
                processed.append(masked)
            else:
                processed.append(typed)
        return processed


class KeyplaneSchema(strawberry.Schema):
    """Logs only what ErrorPolicy masked (unexpected errors); typed refusals and invalid
    queries are the client's business, and a traceback per bad request would let any caller
    flood the logs."""

    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        return None


def build_schema(*, introspection: bool = True) -> strawberry.Schema:
    """The GraphQL schema with its caches, abuse limits and error policy."""
    # Factories, not instances: Strawberry builds fresh extensions per request (the parser and
    # validation caches themselves are module-level and shared).
    extensions: list[Callable[[], SchemaExtension]] = [
        lambda: ParserCache(maxsize=256),
        lambda: ValidationCache(maxsize=256),
        lambda: QueryDepthLimiter(max_depth=MAX_DEPTH),
        lambda: MaxAliasesLimiter(max_alias_count=MAX_ALIASES),
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
        lambda: AddValidationRules([QueryCostRule]),
        ErrorPolicy,
    ]
    if not introspection:
        extensions.append(lambda: AddValidationRules([NoSchemaIntrospectionCustomRule]))
    return KeyplaneSchema(
        query=Query,
        mutation=Mutation,
        extensions=extensions,
        config=StrawberryConfig(scalar_map=SCALAR_MAP),
    )
