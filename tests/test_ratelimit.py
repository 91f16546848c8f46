"""Token buckets, local and shared through a real Redis, and their fallback when Redis fails."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from app.ratelimit import (
    REDIS_KEY_PREFIX,
    USER_PUBLISH_SCOPE,
    KeyedBuckets,
    SharedLimiter,
    TokenBucket,
)
from app.services import LocalRedis, free_port
from tests.conftest import hung, log_records

# Database 0 is left to the other tests; each test here empties one of the others.
_redis_databases = itertools.count()


async def redis_db_url(server: LocalRedis) -> str:
    """A URL of *server* on an emptied database of its own, so tests' buckets never meet."""
    url = f"{server.url.rsplit('/', 1)[0]}/{next(_redis_databases) % 15 + 1}"
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    return url


class FakeClock:
    """Monotonic seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fallbacks(reason: str) -> float:
    """How many shared takes the local buckets answered so far for *reason*."""
    value = REGISTRY.get_sample_value("hearth_ratelimit_local_fallbacks_total", {"reason": reason})
    return value or 0.0


@pytest.fixture
async def redis_url(redis_server) -> str:
    """The URL of an emptied Redis database of this test alone."""
    return await redis_db_url(redis_server)


@pytest.fixture
async def client(redis_url) -> AsyncIterator[aioredis.Redis]:
    """A client of that database."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def test_refused_take_removes_nothing_and_says_how_long_to_wait():
    """A refused take leaves the tokens and returns the seconds until the cost is there."""
    clock = FakeClock()
    bucket = TokenBucket(2.0, 3.0, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(2) == pytest.approx(1.0)
    clock.now += 0.5
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)


async def test_shared_buckets_refuse_like_local_ones(client):
    """Through Redis a bucket grants its burst, then refuses with the wait a local one gives."""
    shared = SharedLimiter(client, timeout=1.0)
    buckets = KeyedBuckets(1.0, 3.0)
    waits = [await shared.take(buckets, "test", "alice") for _ in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    # One token missing at one per second; Redis's clock moved a little since the last take.
    assert 0.9 < waits[3] <= 1.0
    assert await shared.take(buckets, "test", "bob") == 0.0
    # While Redis answers the local buckets are left alone.
    assert [buckets.take("alice") for _ in range(3)] == [0.0, 0.0, 0.0]


async def test_a_bucket_key_expires_once_the_bucket_would_be_full(client):
    """The bucket's key lives no longer than its refill (plus a second): idle buckets vanish."""
    shared = SharedLimiter(client, timeout=1.0)
    for _ in range(2):
        await shared.take(KeyedBuckets(0.5, 4.0), "test", "carol")
    ttl_ms = await client.pttl(f"{REDIS_KEY_PREFIX}test:carol")
    # Two tokens missing at 0.5 per second: full in 4 s.
    assert 4000 < ttl_ms <= 5000


async def test_a_script_redis_forgot_is_sent_again(client):
    """After SCRIPT FLUSH (a Redis restart) the take still counts, and the script is cached again."""
    shared = SharedLimiter(client, timeout=1.0)
    buckets = KeyedBuckets(0.01, 2.0)
    assert await shared.take(buckets, "test", "dave") == 0.0
    await client.script_flush()
    assert await shared.take(buckets, "test", "dave") == 0.0
    assert await shared.take(buckets, "test", "dave") > 0
    assert await client.script_exists(shared._script.sha) == [True]


async def test_unreachable_redis_falls_back_warns_once_and_cools_down(log_stream):
    """With Redis unreachable the local buckets answer; one WARN per outage, and Redis is retried only after the cool-down."""
    clock = FakeClock()
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    shared = SharedLimiter(client, timeout=0.2, cooldown=1.0, clock=clock)
    buckets = KeyedBuckets(0.01, 3.0)

    def failures() -> float:
        # Refused at once, or still retrying (redis-py's own retries) at the deadline.
        return fallbacks("error") + fallbacks("timeout")

    failed, cooldowns = failures(), fallbacks("cooldown")
    try:
        waits = [await shared.take(buckets, "test", "erin") for _ in range(4)]
        assert waits[:3] == [0.0, 0.0, 0.0] and waits[3] > 0  # the local bucket's answers
        assert (failures() - failed, fallbacks("cooldown") - cooldowns) == (1, 3)
        clock.now += 1.1
        await shared.take(buckets, "test", "erin")
        assert failures() - failed == 2
    finally:
        await client.aclose()
    warnings = [line for line in log_records(log_stream) if line["component"] == "ratelimit"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warn" and warnings[0]["scope"] == "test"
    assert warnings[0]["error"] in ("ConnectionError", "TimeoutError")


async def test_one_users_takes_keep_their_order(client):
    """Concurrent takes of one key finish in the order they began, so pipelined publishes keep theirs."""
    shared = SharedLimiter(client, timeout=1.0)
    buckets = KeyedBuckets(0.01, 100.0)
    finished: list[int] = []

    async def take(index: int) -> None:
        await shared.take(buckets, USER_PUBLISH_SCOPE, "frank")
        finished.append(index)

    await asyncio.gather(*(take(index) for index in range(20)))
    assert finished == list(range(20))


async def publish_codes(client, count: int, prefix: str) -> list[int]:
    """Publish *count* messages to the lobby and return the ctrl codes."""
    codes = []
    for index in range(count):
        ctrl = await client.request(
            "pub", topic="room:lobby", content="x", client_msg_id=f"{prefix}{index}"
        )
        codes.append(ctrl["code"])
    return codes


async def test_a_user_on_two_instances_hits_one_limit(make_hearth, redis_url):
    """A user publishing through two instances shares one bucket: burst 5 gives 3 + 2, then 429."""
    env = {"HEARTH_REDIS_URL": redis_url, "HEARTH_USER_PUB_RATE": "0.05",
           "HEARTH_USER_PUB_BURST": "5"}  # fmt: skip
    first, second = await make_hearth(**env), await make_hearth(**env)
    on_first, on_second = await first.connect("alice"), await second.connect("alice")
    assert await publish_codes(on_first, 3, "a") == [200, 200, 200]
    assert await publish_codes(on_second, 2, "b") == [200, 200]
    ctrl = await on_second.request("pub", topic="room:lobby", content="x", client_msg_id="b9")
    assert (ctrl["code"], ctrl["params"]["error"]) == (429, "RATE_LIMIT_EXCEEDED")
    # One token every 20 s.
    assert 1 <= ctrl["params"]["retry_after"] <= 20
    assert (await on_first.request("pub", topic="room:lobby", content="x", client_msg_id="a9"))[
        "code"
    ] == 429
    bob = await second.connect("bob")
    assert await publish_codes(bob, 1, "c") == [200]


async def test_a_hung_redis_costs_one_timeout_then_the_shared_limit_returns(
    make_hearth, redis_server, redis_url
):
    """With Redis hung a publish is answered within HEARTH_REDIS_TIMEOUT plus a margin from the local bucket, later ones without waiting; once Redis answers, the shared limit applies again."""
    timeout = 0.3
    env = {"HEARTH_REDIS_URL": redis_url, "HEARTH_REDIS_TIMEOUT": str(timeout),
           "HEARTH_USER_PUB_RATE": "0.01", "HEARTH_USER_PUB_BURST": "5"}  # fmt: skip
    first, second = await make_hearth(**env), await make_hearth(**env)
    on_first, on_second = await first.connect("alice"), await second.connect("alice")
    assert await publish_codes(on_first, 3, "a") == [200, 200, 200]
    timeouts = fallbacks("timeout")
    with hung(redis_server):
        started = time.monotonic()
        assert await publish_codes(on_first, 1, "hung") == [200]
        probe = time.monotonic() - started
        started = time.monotonic()
        assert await publish_codes(on_first, 1, "cooling") == [200]
        cooling = time.monotonic() - started
    assert probe < timeout + 0.5
    assert cooling < timeout  # the cool-down spares the others the timeout
    assert fallbacks("timeout") - timeouts == 1
    await asyncio.sleep(1.2)  # past the cool-down: Redis is asked again
    # The shared bucket has 2 tokens left (1 if the hung take reached Redis after all), while
    # the first instance's local bucket has 3 and the second's, never touched, 5.
    codes = await publish_codes(on_first, 3, "back")
    assert codes[-1] == 429 and codes.count(200) <= 2, codes
    assert await publish_codes(on_second, 1, "b") == [429]
