"""Custom scalars, registered on the schema through StrawberryConfig.scalar_map."""

from __future__ import annotations

from typing import NewType

import strawberry
from strawberry.types.scalar import ScalarDefinition

BigInt = NewType("BigInt", int)


def _parse_bigint(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"BigInt cannot represent {value!r}")
    return int(value)


BIGINT_SCALAR: ScalarDefinition = strawberry.scalar(
    name="BigInt",
    description="A counter, serialized as a JSON integer (may exceed 32 bits).",
    serialize=int,
    parse_value=_parse_bigint,
)

SCALAR_MAP: dict[object, ScalarDefinition] = {BigInt: BIGINT_SCALAR}
