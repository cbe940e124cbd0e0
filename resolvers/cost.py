"""A query cost limit that accounts for page sizes.

Each field costs 1; a field with a `first` argument (a page) multiplies the cost of what it
selects by that page size (the default page size when not given). Fragments are expanded.
A query whose cost exceeds MAX_QUERY_COST is refused before it runs. A page given by a variable
counts at the largest page allowed, since validation runs (and is cached) before variables.
"""

from __future__ import annotations

from typing import Any

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
    VariableNode,
)

MAX_QUERY_COST = 10_000
MAX_PAGE = 100  # the services refuse larger pages anyway
DEFAULT_PAGE = 50


def _page_size(field: FieldNode) -> int:
    for argument in field.arguments or ():
        if argument.name.value != "first":
            continue
        value = argument.value
        if isinstance(value, IntValueNode):
            return max(1, int(value.value))
        if isinstance(value, VariableNode):
            # Validation is cached per document, before variables are known: assume the cap.
            return MAX_PAGE
    # A connection asked for without `first` gets the default page.
    selections = field.selection_set.selections if field.selection_set else ()
    if any(isinstance(s, FieldNode) and s.name.value == "edges" for s in selections):
        return DEFAULT_PAGE
    return 1


def selection_cost(
    selection_set: SelectionSetNode | None,
    fragments: dict[str, FragmentDefinitionNode],
    seen: frozenset[str] = frozenset(),
) -> int:
    """The cost of a selection set, fragments expanded (a fragment cycle is invalid anyway)."""
    if selection_set is None:
        return 0
    total = 0
    for selection in selection_set.selections:
        if isinstance(selection, FieldNode):
            inner = selection_cost(selection.selection_set, fragments, seen)
            total += 1 + _page_size(selection) * inner
        elif isinstance(selection, InlineFragmentNode):
            total += selection_cost(selection.selection_set, fragments, seen)
        elif isinstance(selection, FragmentSpreadNode):
            name = selection.name.value
            fragment = fragments.get(name)
            if fragment is not None and name not in seen:
                total += selection_cost(fragment.selection_set, fragments, seen | {name})
    return total


class QueryCostRule(ValidationRule):
    """Refuse operations whose page-weighted cost exceeds MAX_QUERY_COST."""

    def __init__(self, context: ValidationContext) -> None:
        super().__init__(context)
        self.fragments = {
            d.name.value: d
            for d in context.document.definitions
            if isinstance(d, FragmentDefinitionNode)
        }

    def enter_operation_definition(self, node: OperationDefinitionNode, *_: Any) -> None:
        cost = selection_cost(node.selection_set, self.fragments)
        if cost > MAX_QUERY_COST:
            self.report_error(
                GraphQLError(
                    f"Query cost {cost} exceeds the limit of {MAX_QUERY_COST}; "
                    "ask for smaller pages (first:) or fewer nested lists",
                    node,
                    extensions={"code": "QUERY_TOO_COMPLEX"},
                )
            )
