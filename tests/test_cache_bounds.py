"""The key cache is bounded (`KEYPLANE_CACHE_SIZE`) and evicts the keys least recently used:
exactly for a small cache, by recency rounds for a large one (app.cache.RECENCY_ROUNDS)."""

from __future__ import annotations

from starlette.applications import Starlette

from app.cache import RECENCY_ROUNDS
from app.tokens import hash_secret
from tests.support import WorkspaceHandle, cache_of


async def test_a_small_cache_holds_at_most_its_size_and_evicts_the_least_recently_used(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    cache = cache_of(app, cache_size=4)
    hashes = [hash_secret((await ws.create_key())[1]) for _ in range(6)]
    for h in hashes[:4]:
        assert await cache.get(h) is not None
    assert await cache.get(hashes[0]) is not None  # the oldest fill is now the latest used
    misses = cache.misses
    assert await cache.get(hashes[4]) is not None  # a fifth key: room is made
    assert len(cache) == 4
    assert cache.fresh(hashes[1]) is None  # the least recently used went...
    assert cache.fresh(hashes[0]) is not None  # ...not the oldest fill, which was used since
    assert await cache.get(hashes[5]) is not None
    assert len(cache) == 4 and cache.fresh(hashes[2]) is None
    assert cache.misses == misses + 2  # hits along the way cost no lookup


async def test_a_key_in_use_stays_cached_while_many_others_pass_through(
    app: Starlette, ws: WorkspaceHandle
) -> None:
    """A large cache moves a hit entry at most once per recency round; a key used in every
    round is still never the one evicted."""
    size = 2 * RECENCY_ROUNDS  # a round ends every 2 fills
    cache = cache_of(app, cache_size=size)
    hot = hash_secret((await ws.create_key())[1])
    others = [hash_secret((await ws.create_key())[1]) for _ in range(3 * size)]
    assert await cache.get(hot) is not None
    for n, h in enumerate(others):
        assert await cache.get(h) is not None
        assert len(cache) <= size
        if n % 2:
            assert cache.fresh(hot) is not None, f"evicted after {n + 1} other keys"
    assert cache.fresh(others[0]) is None  # the cold keys went, oldest first
    assert cache.fresh(others[-1]) is not None
