"""Faults with a real PostgreSQL that the tests stop and start, and real `keyplane serve`
processes that they SIGTERM and kill -9 (CONTRACT §4-5, issue part 4).

- Database down: keys already cached keep verifying for KEYPLANE_MAX_STALENESS_SECONDS, then
  fail closed with 503 UNAVAILABLE; unknown keys get 503 at once; health says 503; usage counts
  and denials wait in memory and are all written, exactly once, when the database is back.
- Database restarted under load: verification recovers within 5 s, same process.
- Database up but refusing connections (what clients see while it starts up or shuts down):
  503, never 500, and no usage count lost.
- Database frozen (SIGSTOP: a blackhole): answers within a bound, stale VALID or 503; health 503.
- SIGTERM under load: the in-flight request finishes, the buffers are flushed; the exit
  status is 0 (app/cli.py turns uvicorn's re-raised SIGTERM into a clean exit), and a flush held up
  by the database when SIGTERM arrives finishes before the shutdown flush (app/usage.py).
- kill -9: counts flushed before the kill are neither lost nor doubled, at most about one flush
  interval of counts is lost, and every key (with its audit entry) created before it survives.

These tests run their own PostgreSQL server (never the session one other tests use) and print
the figures they measure (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.tokens import KeyType, mint_token
from models import KeyKind
from tests.pgserver import PostgresServer, free_port

pytestmark = [pytest.mark.postgres_only, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
RECOVERY_BOUND_SECONDS = 5.0

CREATE_KEY = """mutation($input: CreateKeyInput!) { createKey(input: $input) {
  __typename ... on CreateKeySuccess { secret key { id } } ... on Error { code message } } }"""
KEY_USAGE = """query($id: ID!) { key(id: $id) {
  usage { totalRequests successfulRequests failedRequests } } }"""


# -- the database these tests may stop ---------------------------------------------------------
@dataclass
class FaultDatabase:
    """A private PostgreSQL server with a migrated database and one bootstrapped workspace."""

    server: PostgresServer
    url: str
    token: str
    workspace_id: str
    running: bool = True
    refusing: bool = False
    frozen: list[int] = field(default_factory=list)

    def stop(self, mode: str = "fast") -> None:
        self.server.stop(mode)
        self.running = False

    def start(self) -> None:
        self.server.start()
        self.running = True

    def refuse_connections(self) -> None:
        """Restart as a standby without hot standby: up, but every new connection is refused with
        "the database system is not accepting connections" (asyncpg CannotConnectNowError, what
        clients also see while PostgreSQL starts up or shuts down), for as long as we like."""
        self.stop("fast")
        signal_file = self.server.data / "standby.signal"
        signal_file.touch()
        shutil.chown(signal_file, "postgres", "postgres")
        with (self.server.data / "postgresql.auto.conf").open("a") as conf:
            conf.write(STANDBY_SETTING)
        self.refusing = True
        self.start()

    def accept_connections(self) -> None:
        if self.running:
            self.stop("fast")
        (self.server.data / "standby.signal").unlink()
        conf = self.server.data / "postgresql.auto.conf"
        conf.write_text(conf.read_text().replace(STANDBY_SETTING, ""))
        self.refusing = False
        self.start()

    def freeze(self) -> None:
        """SIGSTOP every PostgreSQL process: connections and queries hang, nothing is refused
        (what a network blackhole or a stalled server looks like to clients)."""
        postmaster = int((self.server.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(postmaster)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        self.frozen = [postmaster, *map(int, children)]
        for pid in self.frozen:
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.frozen:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = []

    def restore(self) -> None:
        self.thaw()
        if self.refusing:
            self.accept_connections()
        elif not self.running:
            self.start()


STANDBY_SETTING = "hot_standby = off\n"


def _cli(args: list[str], url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env={**os.environ, "KEYPLANE_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def _execute(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def faultdb() -> Iterator[FaultDatabase]:
    server = PostgresServer()
    db: FaultDatabase | None = None
    try:
        server.init()
        server.start()
        server.create_database("faults")
        url = server.url("faults")
        # The suite's server trades durability for speed (synchronous_commit=off): a crash
        # (stop -m immediate) may then drop transactions PostgreSQL already acknowledged, which
        # would look like lost usage counts. These tests measure Keyplane, so commits here wait.
        server_url = server.url("postgres")
        asyncio.run(_execute(server_url, "ALTER DATABASE faults SET synchronous_commit = on"))
        migrated = _cli(["migrate"], url)
        assert migrated.returncode == 0, migrated.stderr
        booted = _cli(["bootstrap", "--workspace", "faults", "--plan", "SCALE_ENTERPRISE"], url)
        assert booted.returncode == 0, booted.stderr
        out = json.loads(booted.stdout)
        db = FaultDatabase(server, url, out["token"], out["workspaceId"])
        yield db
    finally:
        if db is not None:
            db.thaw()  # a frozen server could not be stopped
        server.destroy()


@pytest.fixture
def db(faultdb: FaultDatabase) -> Iterator[FaultDatabase]:
    """The fault database, running when the test starts and restored if a test left it down."""
    faultdb.restore()
    yield faultdb
    faultdb.restore()


# -- live server processes whose handle the tests keep -----------------------------------------
@dataclass
class Keyplane:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextmanager
def keyplane(database_url: str, extra_env: Mapping[str, str]) -> Iterator[Keyplane]:
    """`keyplane serve` on a free port, healthy before this yields; SIGTERM (then SIGKILL) after,
    unless the test already ended it."""
    port = free_port()
    env = {**os.environ, "KEYPLANE_DATABASE_URL": database_url, **extra_env}
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 -- closed in finally
        prefix="keyplane-faults-", suffix=".log", delete=False
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    live = Keyplane(process, f"http://127.0.0.1:{port}", Path(log.name))
    keep = False
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"keyplane serve exited: {live.log()}")
            with suppress(httpx.HTTPError):
                health = httpx.get(f"{live.base_url}/governance/health", timeout=1)
                if health.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"keyplane serve did not become healthy: {live.log()}")
            time.sleep(0.05)
        yield live
        # No traceback through Keyplane's own code (a 500, a dead background task, a failed
        # shutdown). asyncpg's pool logs its own reconnect attempts; those are not ours.
        assert f'File "{ROOT / "app"}' not in live.log_path.read_text(), live.log()
    except BaseException:
        keep = True  # shown (and kept) when the test fails
        print(f"--- keyplane serve log {live.log_path} (tail) ---\n{live.log()}")
        raise
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        if not keep:
            live.log_path.unlink(missing_ok=True)


# -- small HTTP helpers -------------------------------------------------------------------------
async def graphql(
    http: httpx.AsyncClient, token: str, query: str, variables: dict[str, Any] | None = None
) -> dict[str, Any]:
    response = await http.post(
        "/graphql",
        json={"query": query, "variables": variables or {}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert "errors" not in body, body
    data: dict[str, Any] = body["data"]
    return data


async def production_env(http: httpx.AsyncClient, token: str) -> str:
    data = await graphql(http, token, "{ environments { id name } }")
    return next(e["id"] for e in data["environments"] if e["name"] == "production")


async def create_key(http: httpx.AsyncClient, token: str, env_id: str) -> tuple[str, str]:
    """Create a SERVER key holding permission `read`; returns (key ID, secret)."""
    data = await graphql(
        http,
        token,
        CREATE_KEY,
        {"input": {"environmentId": env_id, "name": "fault", "permissions": ["read"]}},
    )
    result = data["createKey"]
    assert result["__typename"] == "CreateKeySuccess", result
    return result["key"]["id"], result["secret"]


async def usage_of(http: httpx.AsyncClient, token: str, key_id: str) -> tuple[int, int, int]:
    usage = (await graphql(http, token, KEY_USAGE, {"id": key_id}))["key"]["usage"]
    return (
        int(usage["totalRequests"]),
        int(usage["successfulRequests"]),
        int(usage["failedRequests"]),
    )


@dataclass
class Answer:
    sent: float
    received: float
    status: int
    code: str
    key: str


async def verify(
    http: httpx.AsyncClient,
    secret: str,
    ip: str,
    permissions: list[str] | None = None,
    key: str = "",
) -> Answer:
    sent = time.monotonic()
    response = await http.post(
        "/v1/verify",
        headers={"X-API-Key": secret, "X-Forwarded-For": ip},
        json={"permissions": permissions or []},
    )
    body = response.json()
    assert body["valid"] is (response.status_code == 200), body
    return Answer(sent, time.monotonic(), response.status_code, body["code"], key)


def pending_requests(metrics_text: str) -> int:
    for line in metrics_text.splitlines():
        if line.startswith("keyplane_usage_pending_requests "):
            return int(float(line.split()[1]))
    raise AssertionError("keyplane_usage_pending_requests missing from /metrics")


@dataclass
class Load:
    """A few concurrent clients verifying keys in a loop until told to stop."""

    http: httpx.AsyncClient
    keys: dict[str, str]  # key ID -> secret
    ip: str
    answers: list[Answer] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _worker(self, index: int) -> None:
        items = list(self.keys.items())
        n = index
        while not self.stopping.is_set():
            key_id, secret = items[n % len(items)]
            n += 1
            try:
                self.answers.append(await verify(self.http, secret, self.ip, key=key_id))
            except httpx.TransportError as exc:
                self.errors.append((time.monotonic(), type(exc).__name__))
                await asyncio.sleep(0.01)

    def start(self, workers: int = 4) -> None:
        self.tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.gather(*self.tasks)

    def valid_by_key(self) -> dict[str, int]:
        counts = dict.fromkeys(self.keys, 0)
        for answer in self.answers:
            if answer.code == "VALID":
                counts[answer.key] += 1
        return counts


async def key_counters(url: str, key_ids: list[str]) -> dict[str, tuple[int, int, int]]:
    """(total, successful, failed) per key, read straight from the tables: the key's lifetime
    counters plus its usage buckets not yet rolled into them (app.usage)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            """SELECT k.public_id,
                      (k.total_requests + COALESCE(sum(b.total_requests), 0))::bigint
                          AS total_requests,
                      (k.successful_requests + COALESCE(sum(b.successful_requests), 0))::bigint
                          AS successful_requests,
                      (k.failed_requests + COALESCE(sum(b.failed_requests), 0))::bigint
                          AS failed_requests
               FROM api_keys k
               LEFT JOIN usage_buckets b ON b.key_id = k.public_id AND NOT b.rolled
               WHERE k.public_id = ANY($1::varchar[])
               GROUP BY k.id""",
            key_ids,
        )
    finally:
        await conn.close()
    return {
        r["public_id"]: (r["total_requests"], r["successful_requests"], r["failed_requests"])
        for r in rows
    }


async def eventually(
    probe: Any, expected: Any, timeout: float = 5.0, interval: float = 0.1
) -> tuple[Any, float]:
    """Poll the async `probe()` until it returns `expected`; returns (last value, seconds)."""
    started = time.monotonic()
    while True:
        value = await probe()
        if value == expected or time.monotonic() - started > timeout:
            return value, time.monotonic() - started
        await asyncio.sleep(interval)


LOGIN = """mutation { login(email: "nobody@example.com", password: "not it") {
    __typename ... on Error { code } } }"""


# -- the tests ---------------------------------------------------------------------------------
STALENESS = 3.0


async def test_database_down_serves_cached_keys_until_staleness_then_fails_closed(
    db: FaultDatabase,
) -> None:
    env = {
        "KEYPLANE_MAX_STALENESS_SECONDS": str(STALENESS),
        "KEYPLANE_FLUSH_INTERVAL_SECONDS": "0.5",
    }
    ip = "198.51.100.1"
    with keyplane(db.url, env) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            env_id = await production_env(http, db.token)
            cached_id, cached = await create_key(http, db.token, env_id)
            uncached_id, uncached = await create_key(http, db.token, env_id)
            unknown = mint_token("kp", KeyType.SERVER)

            fill_started = time.monotonic()  # the cache entry is filled by the first verify
            before = [await verify(http, cached, ip) for _ in range(5)]
            fill_done = before[0].received
            assert {(a.status, a.code) for a in before} == {(200, "VALID")}

            await asyncio.to_thread(db.stop, "fast")
            # Unknown to this process: refused with 503 at once, never VALID, never 401.
            for secret in (uncached, unknown):
                answer = await verify(http, secret, ip)
                assert (answer.status, answer.code) == (503, "UNAVAILABLE")
            health = await http.get("/governance/health")
            assert health.status_code == 503, health.text

            down: list[Answer] = []
            refused_for_permission = 0
            while time.monotonic() < fill_done + STALENESS + 1.5:
                down.append(await verify(http, cached, ip))
                if refused_for_permission < 3 and down[-1].code == "VALID":
                    # A refusal decided from the stale record still counts as a failed request.
                    answer = await verify(http, cached, ip, ["admin"])
                    assert (answer.status, answer.code) == (403, "INSUFFICIENT_PERMISSIONS")
                    refused_for_permission += 1
                await asyncio.sleep(0.05)
            unavailable_answers = 2 + sum(a.code == "UNAVAILABLE" for a in down)
            for secret in (uncached, unknown):
                answer = await verify(http, secret, ip)
                assert (answer.status, answer.code) == (503, "UNAVAILABLE")
                unavailable_answers += 1

            outcomes = {(a.status, a.code) for a in down}
            assert outcomes <= {(200, "VALID"), (503, "UNAVAILABLE")}, outcomes
            valid_down = [a for a in down if a.code == "VALID"]
            first_503 = next(a for a in down if a.code == "UNAVAILABLE")
            # Served while the entry was younger than the staleness bound ...
            assert all(
                a.code == "VALID" for a in down if a.received < fill_started + STALENESS - 0.2
            )
            # ... never beyond it, and once refused, refused for good (fail closed).
            assert all(a.sent <= fill_done + STALENESS + 0.2 for a in valid_down)
            assert all(a.code == "UNAVAILABLE" for a in down if a.sent >= first_503.sent)
            stale_window = first_503.received - fill_started
            assert refused_for_permission == 3

            metrics = (await http.get("/metrics")).text
            assert pending_requests(metrics) >= len(valid_down) + refused_for_permission
            assert (await http.get("/governance/health")).status_code == 503

            await asyncio.to_thread(db.start)
            back = time.monotonic()

            probes: list[str] = []  # each probe's verification is counted too

            async def recovered() -> bool:
                answer = await verify(http, cached, ip)
                probes.append(answer.code)
                health = await http.get("/governance/health")
                return answer.code == "VALID" and health.status_code == 200

            ok, recovery = await eventually(recovered, True, timeout=RECOVERY_BOUND_SECONDS)
            assert ok, f"not recovered {time.monotonic() - back:.1f}s after the database returned"
            assert set(probes) <= {"VALID", "UNAVAILABLE"}, probes
            unavailable_answers += probes.count("UNAVAILABLE")  # refused: no count on the key

            expected_ok = len(before) + len(valid_down) + probes.count("VALID")
            expected = (expected_ok + refused_for_permission, expected_ok, refused_for_permission)
            counted, _ = await eventually(
                lambda: usage_of(http, db.token, cached_id), expected, timeout=5
            )
            assert counted == expected
            assert await usage_of(http, db.token, uncached_id) == (0, 0, 0)
            await asyncio.sleep(1.2)  # two more flush intervals: nothing is written twice
            assert await usage_of(http, db.token, cached_id) == expected
            assert pending_requests((await http.get("/metrics")).text) == 0

    # Every refusal reached the denial log once: the 503s and the permission refusals.
    conn = await asyncpg.connect(db.url)
    try:
        denied = {
            r["code"]: r["n"]
            for r in await conn.fetch(
                "SELECT code, sum(count) AS n FROM denials WHERE ip = $1 GROUP BY code", ip
            )
        }
    finally:
        await conn.close()
    assert denied == {
        "UNAVAILABLE": unavailable_answers,
        "INSUFFICIENT_PERMISSIONS": refused_for_permission,
    }
    print(
        f"\n[faults] stale window {stale_window:.2f}s (bound {STALENESS}s); "
        f"recovery after restart {recovery:.2f}s; {len(valid_down)} stale VALID, "
        f"{unavailable_answers} UNAVAILABLE, all counted once"
    )


async def test_database_restart_under_load_recovers_within_bound_without_process_restart(
    db: FaultDatabase,
) -> None:
    env = {"KEYPLANE_MAX_STALENESS_SECONDS": "1", "KEYPLANE_FLUSH_INTERVAL_SECONDS": "0.5"}
    with keyplane(db.url, env) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            env_id = await production_env(http, db.token)
            keys = dict([await create_key(http, db.token, env_id) for _ in range(3)])
            _, fresh = await create_key(http, db.token, env_id)
            load = Load(http, keys, "198.51.100.2")
            load.start()
            await asyncio.sleep(1.0)
            down_at = time.monotonic()
            await asyncio.to_thread(db.stop, "immediate")  # a crash: no goodbye to clients
            await asyncio.sleep(2.5)  # past the staleness bound: verification must fail closed
            restarting = time.monotonic()
            await asyncio.to_thread(db.start)
            back = time.monotonic()  # pg_ctl -w returned: PostgreSQL accepts connections
            # Load on until a second of nothing but VALID, or past the bound.
            while time.monotonic() < back + RECOVERY_BOUND_SECONDS + 1:
                await asyncio.sleep(0.2)
                tail = [a for a in load.answers if a.sent > time.monotonic() - 1.0]
                if len(tail) > 20 and all(a.code == "VALID" for a in tail):
                    break
            await load.stop()

            assert server.process.poll() is None, "the server process died"
            assert not load.errors, load.errors[:5]
            outcomes = {(a.status, a.code) for a in load.answers}
            assert outcomes == {(200, "VALID"), (503, "UNAVAILABLE")}, outcomes
            refused = [a for a in load.answers if a.code == "UNAVAILABLE"]
            assert all(down_at <= a.received for a in refused)
            last_refusal = max(a.received for a in refused)
            recovery = max(0.0, last_refusal - back)
            assert recovery < RECOVERY_BOUND_SECONDS
            after = [a for a in load.answers if a.sent > last_refusal]
            assert len(after) > 20 and all(a.code == "VALID" for a in after)
            first_valid = min(a.received for a in after)
            # A key this process never saw is read from the database again.
            assert (await verify(http, fresh, "198.51.100.2")).code == "VALID"
            assert (await http.get("/governance/health")).status_code == 200

            # Every VALID answer is counted exactly once (a 503 names no key the server could
            # read), whether its flush met a dead, a starting or a healthy database.
            expected = {k: (n, n, 0) for k, n in load.valid_by_key().items()}
            counted, _ = await eventually(lambda: key_counters(db.url, list(keys)), expected)
            assert counted == expected
    print(
        f"\n[faults] restart under load: last 503 {recovery:.2f}s after the database accepted "
        f"connections (bound {RECOVERY_BOUND_SECONDS}s); first VALID {first_valid - back:.2f}s "
        f"after, {first_valid - restarting:.2f}s after pg_ctl start was called (its startup "
        f"{back - restarting:.2f}s); {len(load.answers)} answers, {len(refused)} 503, "
        "no 500, all counted once"
    )


async def test_sigterm_under_load_finishes_in_flight_requests_and_flushes(
    db: FaultDatabase,
) -> None:
    # A long flush interval: whatever is counted was written by the shutdown flush.
    env = {"KEYPLANE_FLUSH_INTERVAL_SECONDS": "60"}
    with keyplane(db.url, env) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            env_id = await production_env(http, db.token)
            keys = dict([await create_key(http, db.token, env_id) for _ in range(2)])
            slow_id, slow_secret = await create_key(http, db.token, env_id)
            load = Load(http, keys, "198.51.100.3")
            load.start()
            await asyncio.sleep(1.0)

            # An in-flight request: headers and half the body sent when SIGTERM arrives.
            port = int(server.base_url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = json.dumps({"key": slow_secret, "permissions": ["read"]}).encode()
            writer.write(
                b"POST /v1/verify HTTP/1.1\r\nHost: keyplane\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:10]
            )
            await writer.drain()
            await asyncio.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            writer.write(body[10:])
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), timeout=10)
            writer.close()
            await load.stop()

            returncode = await asyncio.to_thread(server.process.wait, 15)
            # Graceful: the lifespan's shutdown (listener stop, usage flush) ran to the end.
            # The exit status itself is test_sigterm_exits_with_status_zero's business.
            assert returncode in (0, -signal.SIGTERM), server.log()
            assert "Application shutdown complete" in server.log()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    assert json.loads(payload)["code"] == "VALID"
    answered = load.valid_by_key()
    assert all(n > 0 for n in answered.values())
    assert {(a.status, a.code) for a in load.answers} == {(200, "VALID")}
    expected = {k: (n, n, 0) for k, n in answered.items()} | {slow_id: (1, 1, 0)}
    assert await key_counters(db.url, [*keys, slow_id]) == expected
    print(
        f"\n[faults] SIGTERM: graceful, {len(load.answers) + 1} answered = counted, "
        f"{len(load.errors)} requests refused at the closed socket"
    )


def test_sigterm_exits_with_status_zero(db: FaultDatabase) -> None:
    with keyplane(db.url, {}) as server:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0


async def test_kill_9_loses_at_most_one_flush_interval_and_no_management_data(
    db: FaultDatabase,
) -> None:
    env = {"KEYPLANE_FLUSH_INTERVAL_SECONDS": "1"}
    with keyplane(db.url, env) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            env_id = await production_env(http, db.token)
            keys = dict([await create_key(http, db.token, env_id) for _ in range(2)])
            base = await key_counters(db.url, list(keys))
            assert set(base.values()) == {(0, 0, 0)}

            # Phase 1: a known flush. Load, stop, wait until all of it is written.
            first = Load(http, keys, "198.51.100.4")
            first.start()
            await asyncio.sleep(1.0)
            await first.stop()
            flushed = {k: (n, n, 0) for k, n in first.valid_by_key().items()}
            counted, _ = await eventually(lambda: key_counters(db.url, list(keys)), flushed)
            assert counted == flushed

            # Phase 2: load and management writes, then kill -9 in the middle of both.
            second = Load(http, keys, "198.51.100.4")
            second.start()
            created: list[str] = []
            for _ in range(10):  # ~3 s of load, with management writes committed meanwhile
                created.append((await create_key(http, db.token, env_id))[0])
                await asyncio.sleep(0.25)
            creating = asyncio.create_task(create_key(http, db.token, env_id))
            await asyncio.sleep(0.01)
            server.process.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await second.stop()
            with suppress(httpx.TransportError):
                created.append((await creating)[0])
            assert server.process.wait(5) == -signal.SIGKILL

    after = await key_counters(db.url, list(keys))
    answered = second.valid_by_key()
    late = {k: 0 for k in keys}
    for answer in second.answers:
        if answer.code == "VALID" and answer.received > killed_at - 2.0:
            late[answer.key] += 1
    lost = 0
    for key_id in keys:
        total, ok, failed = after[key_id]
        before = flushed[key_id][0]
        # Never lost, never doubled: what was flushed stays, at most every answer is added.
        assert before <= total <= before + answered[key_id]
        assert ok == total and failed == 0
        # At most the last ~2 s (one flush interval plus its own duration) are missing.
        assert total >= before + answered[key_id] - late[key_id]
        lost += before + answered[key_id] - total

    conn = await asyncpg.connect(db.url)
    try:
        rows = await conn.fetch(
            "SELECT k.public_id, count(a.id) AS audits FROM api_keys k "
            "LEFT JOIN audit_events a ON a.key_id = k.public_id AND a.action = 'key.create' "
            "WHERE k.type <> $1 GROUP BY k.public_id",  # client-side IDs come with environments
            KeyKind.CLIENT_SIDE.value,
        )
        orphan_audits = await conn.fetchval(
            "SELECT count(*) FROM audit_events a WHERE a.action = 'key.create' "
            "AND NOT EXISTS (SELECT 1 FROM api_keys k WHERE k.public_id = a.key_id)"
        )
    finally:
        await conn.close()
    # The counts lost match the answers of the last `lost_window` seconds before the kill.
    latest = sorted((a.received for a in second.answers if a.code == "VALID"), reverse=True)
    lost_window = killed_at - latest[lost - 1] if lost else 0.0
    assert lost_window <= 2.0
    audits = {r["public_id"]: r["audits"] for r in rows}
    # Every key whose creation was answered exists; every key has exactly its one audit entry.
    assert set(created) <= set(audits)
    assert set(audits.values()) == {1}
    assert orphan_audits == 0

    # A new process on the same database carries on counting from what was written.
    with keyplane(db.url, env) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            key_id, secret = next(iter(keys.items()))
            assert (await verify(http, secret, "198.51.100.4")).code == "VALID"
            total, ok, failed = after[key_id]
            counted, _ = await eventually(
                lambda: usage_of(http, db.token, key_id), (total + 1, ok + 1, failed)
            )
            assert counted == (total + 1, ok + 1, failed)
    print(
        f"\n[faults] kill -9: {sum(answered.values())} answered after the known flush, "
        f"{lost} lost = those answered in the last {lost_window:.2f}s before the kill "
        f"({sum(late.values())} answered in the last 2 s); "
        f"{len(created)} keys created, all kept with their audit entries"
    )


async def test_database_refusing_connections_fails_closed_with_503_not_500(
    db: FaultDatabase,
) -> None:
    """While PostgreSQL is up but refusing connections (starting up, shutting down, a standby),
    asyncpg raises errors Tortoise does not translate: still 503 UNAVAILABLE, never a 500."""
    env = {"KEYPLANE_MAX_STALENESS_SECONDS": "1", "KEYPLANE_FLUSH_INTERVAL_SECONDS": "0.5"}
    ip = "198.51.100.5"
    with keyplane(db.url, env) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            env_id = await production_env(http, db.token)
            _, cached = await create_key(http, db.token, env_id)
            filled = (await verify(http, cached, ip)).received
            await asyncio.to_thread(db.refuse_connections)
            answer = await verify(http, mint_token("kp", KeyType.SERVER), ip)
            assert (answer.status, answer.code) == (503, "UNAVAILABLE")
            assert (await http.get("/governance/health")).status_code == 503
            # The management API too: a typed 503 where a bearer cannot be checked (it was a
            # plain-text 500), and UNAVAILABLE, not a masked error, for an operation without one.
            management = await http.post(
                "/graphql",
                json={"query": "{ workspace { id } }"},
                headers={"Authorization": f"Bearer {db.token}"},
            )
            assert management.status_code == 503
            assert management.json() == {
                "errors": [
                    {
                        "message": "Database unavailable; try again later",
                        "extensions": {"code": "UNAVAILABLE"},
                    }
                ]
            }
            login = await http.post(
                "/graphql",
                json={"query": LOGIN},
            )
            assert [e["extensions"]["code"] for e in login.json()["errors"]] == ["UNAVAILABLE"]
            answers = []
            while time.monotonic() < filled + 2.5:
                answers.append(await verify(http, cached, ip))
                await asyncio.sleep(0.05)
            assert {(a.status, a.code) for a in answers} <= {(200, "VALID"), (503, "UNAVAILABLE")}
            assert all(a.code == "UNAVAILABLE" for a in answers if a.sent > filled + 1.2)
            assert (await http.get("/governance/health")).status_code == 503

            await asyncio.to_thread(db.accept_connections)

            async def recovered() -> bool:
                answer = await verify(http, cached, ip)
                health = await http.get("/governance/health")
                return answer.code == "VALID" and health.status_code == 200

            ok, _ = await eventually(recovered, True, timeout=RECOVERY_BOUND_SECONDS)
            assert ok


async def test_usage_counts_survive_a_database_refusing_connections(db: FaultDatabase) -> None:
    """Also with the denial of a well-formed unknown token in the refused flush: the flush
    looks up which workspace uses that prefix, and when that lookup came before the keys'
    counts were taken, its failure lost them (and every later count of those keys)."""
    env = {"KEYPLANE_MAX_STALENESS_SECONDS": "30", "KEYPLANE_FLUSH_INTERVAL_SECONDS": "1.5"}
    ip = "198.51.100.6"
    with keyplane(db.url, env) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            env_id = await production_env(http, db.token)
            key_id, secret = await create_key(http, db.token, env_id)
            answers = [await verify(http, secret, ip)]

            async def flush_lag() -> float:
                text = (await http.get("/metrics")).text
                return float(text.split("\nkeyplane_usage_flush_lag_seconds ")[1].split()[0])

            # Just after a flush, so the next one (1.5 s on) is refused with both in its batch.
            deadline = time.monotonic() + 10
            while await flush_lag() > 0.2:
                assert time.monotonic() < deadline, "no flush seen"
                await asyncio.sleep(0.02)
            answers += [await verify(http, secret, ip) for _ in range(3)]
            unknown = mint_token("kp", KeyType.SERVER)
            assert (await verify(http, unknown, ip)).code == "INVALID_KEY"
            await asyncio.to_thread(db.refuse_connections)
            for _ in range(20):  # spread over two flush intervals, each flush refused
                answers.append(await verify(http, secret, ip))
                await asyncio.sleep(0.15)
            assert {a.code for a in answers} == {"VALID"}  # served from the cache (stale)
            assert "keyplane_usage_flush_failures_total 0" not in (await http.get("/metrics")).text
            await asyncio.to_thread(db.accept_connections)
            expected = (len(answers), len(answers), 0)
            counted, _ = await eventually(
                lambda: usage_of(http, db.token, key_id), expected, timeout=3
            )
            assert counted == expected


async def test_sigterm_during_a_slow_flush_loses_no_count(db: FaultDatabase) -> None:
    """A flush held up by the database (here: another transaction locking the key's row) when
    SIGTERM arrives: the shutdown must still write that batch, not drop it."""
    env = {"KEYPLANE_FLUSH_INTERVAL_SECONDS": "0.5"}
    ip = "198.51.100.7"
    with keyplane(db.url, env) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            env_id = await production_env(http, db.token)
            key_id, secret = await create_key(http, db.token, env_id)
            answers = [await verify(http, secret, ip) for _ in range(5)]
            flushed = (5, 5, 0)
            counted, _ = await eventually(lambda: key_counters(db.url, [key_id]), {key_id: flushed})
            assert counted == {key_id: flushed}
            locker = await asyncpg.connect(db.url)
            try:
                locking = locker.transaction()
                await locking.start()
                await locker.execute(
                    "SELECT 1 FROM api_keys WHERE public_id = $1 FOR UPDATE", key_id
                )
                answers += [await verify(http, secret, ip) for _ in range(7)]
                await asyncio.sleep(1.2)  # the next flush now waits for the row lock
                server.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                await locking.rollback()
            finally:
                await locker.close()
            await asyncio.to_thread(server.process.wait, 15)
            assert "Application shutdown complete" in server.log()
    assert {a.code for a in answers} == {"VALID"}
    assert await key_counters(db.url, [key_id]) == {key_id: (12, 12, 0)}


async def _health_status(http: httpx.AsyncClient) -> int:
    return (await http.get("/governance/health")).status_code


async def test_frozen_database_verifies_within_a_bound_stale_then_503(
    db: FaultDatabase,
) -> None:
    """PostgreSQL frozen (SIGSTOP: nothing refused, nothing answered): a lookup is given up
    after a bound (2 s), then the cached key is served while within its staleness and an unknown
    key is refused with 503; health says 503 within its own bound; nothing hangs."""
    env = {"KEYPLANE_MAX_STALENESS_SECONDS": "4", "KEYPLANE_CACHE_REFRESH_SECONDS": "0.2"}
    ip = "198.51.100.8"
    with keyplane(db.url, env) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            env_id = await production_env(http, db.token)
            _, cached = await create_key(http, db.token, env_id)
            assert (await verify(http, cached, ip)).code == "VALID"
            await asyncio.to_thread(db.freeze)
            try:
                # Past its freshness (0.4 s) the entry needs the database; within staleness.
                await asyncio.sleep(0.5)
                started = time.monotonic()
                answers, healths = await asyncio.gather(
                    asyncio.gather(
                        verify(http, cached, ip),
                        verify(http, mint_token("kp", KeyType.SERVER), ip),
                        verify(http, mint_token("kp", KeyType.SERVER), ip),
                    ),
                    asyncio.gather(*(_health_status(http) for _ in range(2))),  # one probe
                )
                slowest = time.monotonic() - started
            finally:
                db.thaw()
            stale, *unknown = answers
            assert (stale.status, stale.code) == (200, "VALID")
            assert {(a.status, a.code) for a in unknown} == {(503, "UNAVAILABLE")}
            assert healths == [503, 503]
            assert slowest < 3.0
            ok, _ = await eventually(lambda: _health_status(http), 200)
            assert ok == 200
            assert (await verify(http, cached, ip)).code == "VALID"
    print(f"\n[faults] frozen database: every answer within {slowest:.2f}s (bound 3 s)")
