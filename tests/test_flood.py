"""Verify under attack: a flood of random tokens never reaches the database per request, shows
in /metrics and the denial log, and the log grows by a bounded number of rows."""

from __future__ import annotations

import logging
import random
import string
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from app.tokens import checksum
from models import Denial
from tests.support import OffsetClock, WorkspaceHandle, refreshes_stopped

ALPHABET = string.digits + string.ascii_letters


class KeyLookups(logging.Filter):
    """Counts SQL statements that look a key up by its hash (Tortoise logs each at DEBUG)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "api_keys" in text and "secret_hash" in text and "SELECT" in text.upper():
            self.count += 1
        return True


@pytest.fixture
async def key_lookups(app: Starlette) -> AsyncIterator[KeyLookups]:
    """Counts the key lookups of the test; the app's own refresh, whose statements would match,
    does not run meanwhile."""
    logger = logging.getLogger("tortoise.db_client")
    probe = KeyLookups()
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.filters.insert(0, probe)  # before the log policy's filter drops the record
    try:
        async with refreshes_stopped(app):
            yield probe
    finally:
        logger.removeFilter(probe)
        logger.setLevel(previous)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def test_a_flood_of_random_tokens_costs_no_key_lookup(
    app: Starlette, ws: WorkspaceHandle, clock: OffsetClock, key_lookups: KeyLookups
) -> None:
    rng = random.Random(20261126)
    _, secret = await ws.create_key()
    ip = "198.18.200.1"
    transport = httpx.ASGITransport(app=app, client=(ip, 1))
    invalid = 'keyplane_verifications_total{code="INVALID_KEY"}'
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as attacker:
        assert (await attacker.get("/v1/verify", headers={"X-API-Key": secret})).status_code == 200
        before = (await attacker.get("/metrics")).text
        lookups = key_lookups.count
        since = clock.now()
        flood = 600
        for i in range(flood):
            shape = i % 3
            if shape == 0:  # the right shape, a random body: the checksum fails
                token = "kp_sdk_" + "".join(rng.choice(ALPHABET) for _ in range(28))
            elif shape == 1:  # arbitrary junk
                token = "".join(
                    rng.choice(string.printable[:94]) for _ in range(rng.randint(1, 80))
                )
            else:  # a known key with one character changed
                at = rng.randrange(7, len(secret))
                token = (
                    secret[:at] + rng.choice(ALPHABET.replace(secret[at], "")) + secret[at + 1 :]
                )
            response = await attacker.get("/v1/verify", headers={"X-API-Key": token})
            assert response.status_code == 401 and response.json()["code"] == "INVALID_KEY"
            # The valid key keeps answering from memory in the middle of the flood.
            if i % 100 == 0:
                ok = await attacker.get("/v1/verify", headers={"X-API-Key": secret})
                assert ok.json()["code"] == "VALID"
        assert key_lookups.count == lookups  # not one database read for the whole flood
        after = (await attacker.get("/metrics")).text
    assert metric(after, invalid) - metric(before, invalid) == flood

    assert await app.state.usage.flush()
    rows = await Denial.filter(ip=ip, at__gte=since)
    assert sum(r.count for r in rows) == flood  # every refusal counted...
    rate = app.state.settings.denial_rate_per_ip
    assert len(rows) <= 2 * (rate + 1)  # ...in a bounded number of rows (≤ 2 minutes' worth)


async def test_unknown_well_formed_tokens_are_looked_up_once_each(
    app: Starlette, ws: WorkspaceHandle, key_lookups: KeyLookups
) -> None:
    """A token with a valid checksum must be looked up (it could be a new key), but a repeat
    is answered from the negative cache."""
    rng = random.Random(7)
    tokens = []
    for _ in range(20):
        head = "kp_sdk_" + "".join(rng.choice(ALPHABET) for _ in range(22))
        tokens.append(head + checksum(head))
    transport = httpx.ASGITransport(app=app, client=("198.18.200.2", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://kp.test") as attacker:
        lookups = key_lookups.count
        for _ in range(5):
            for token in tokens:
                response = await attacker.get("/v1/verify", headers={"X-API-Key": token})
                assert response.json()["code"] == "INVALID_KEY"
    assert key_lookups.count - lookups == len(tokens)
