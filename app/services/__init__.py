"""The rules of Keyplane: one module per concept, one transaction per change.

Resolvers call these functions; nothing here imports Strawberry or Starlette.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.changes import ChangeFeed
from app.clock import Clock
from app.settings import Settings


@dataclass(frozen=True)
class Services:
    """What every service call needs from the running process."""

    settings: Settings
    clock: Clock
    changes: ChangeFeed
