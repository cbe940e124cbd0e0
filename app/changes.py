"""The seam between management writes and verification caches.

Every service that changes what a verification would answer (status, revocation, deletion,
allowed IPs, permissions, role, expiry, origins) reports the affected keys' secret hashes here
after its transaction commits. Local caches drop them before the mutation returns; on
PostgreSQL the feed also tells every other process (LISTEN/NOTIFY).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class KeyChangeListener(Protocol):
    async def keys_changed(self, secret_hashes: Sequence[str]) -> None: ...


class ChangeFeed:
    """Fans key changes out to every registered listener (the local cache, the notifier)."""

    def __init__(self) -> None:
        self._listeners: list[KeyChangeListener] = []

    def subscribe(self, listener: KeyChangeListener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: KeyChangeListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def keys_changed(self, secret_hashes: Sequence[str]) -> None:
        """Tell every listener that these keys' verification answers may have changed."""
        if not secret_hashes:
            return
        for listener in list(self._listeners):
            await listener.keys_changed(secret_hashes)
