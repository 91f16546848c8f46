"""Token buckets: per-connection and per-user publish limits, and login throttling.

The per-user and login buckets are shared by every instance through Redis while it
answers (`SharedLimiter`), with this instance's `KeyedBuckets` as the fallback.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import metrics
from app.log import get_logger

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = get_logger("ratelimit")


def seconds_until(missing: float, rate: float) -> float:
    """Seconds until a bucket refilled at *rate* per second gains *missing* tokens.

    0 when nothing is missing; infinite when the bucket never refills.
    """
    if missing <= 0:
        return 0.0
    if rate <= 0:
        return math.inf
    return missing / rate


class TokenBucket:
    """Holds up to *burst* tokens, refilled at *rate* tokens per second.

    *clock* returns monotonic seconds; tests pass a fake one.
    """

    __slots__ = ("rate", "burst", "tokens", "updated", "clock")

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.clock = clock
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, cost: float = 1.0) -> float:
        """Take *cost* tokens; return 0 on success, else the seconds until they would be there.

        A refused take removes nothing.
        """
        self._refill()
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return seconds_until(cost - self.tokens, self.rate)


class KeyedBuckets:
    """One `TokenBucket` per key (a user, an IP), forgetting the least recently used keys.

    *rate* and *burst* configure each bucket; at most *max_keys* buckets are kept.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, cost: float = 1.0) -> float:
        """Take *cost* tokens from *key*'s bucket; 0 on success, else seconds to wait."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, clock=self.clock)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(cost)


#: Scopes of the shared buckets: each names one limit in Redis keys.
USER_PUBLISH_SCOPE = "user_pub"
LOGIN_IP_SCOPE = "login_ip"
LOGIN_USER_SCOPE = "login_user"
#: Prefix of every Redis key holding a shared bucket.
REDIS_KEY_PREFIX = "hearth:ratelimit:"
#: Seconds Redis is left alone after a failed call; meanwhile the local buckets answer.
REDIS_COOLDOWN = 1.0

# One token bucket per hash, on Redis's clock so that instances' clocks need not agree.
# KEYS[1]: the bucket; ARGV: rate, burst, cost. Returns the tokens missing, as a string
# ("0" when the take succeeded): Lua numbers would come back as truncated integers.
# A refused take stores only its refill, which changes nothing but the time of it.
# The key expires once the bucket would be full again: an absent key is a full bucket.
_TAKE_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1]) or burst
local updated = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
local missing = 0
if tokens >= cost then
  tokens = tokens - cost
else
  missing = cost - tokens
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'updated', string.format('%.6f', now))
if rate > 0 then
  redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
end
return string.format('%.17g', missing)
"""


class SharedLimiter:
    """Takes from token buckets kept in Redis, shared by every instance that uses it.

    *redis* is the client (None: the local buckets answer every take). Each take is one
    EVALSHA bounded by *timeout* seconds. On any error or timeout the caller's local
    buckets answer instead, a WARN is logged once per outage, and Redis is left alone for
    *cooldown* seconds before one take tries it again. *clock* returns monotonic seconds.
    """

    def __init__(
        self,
        redis: Redis | None,
        *,
        timeout: float,
        cooldown: float = REDIS_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.timeout = timeout
        self.cooldown = cooldown
        self.clock = clock
        self._script = redis.register_script(_TAKE_SCRIPT) if redis is not None else None
        #: When the current outage began (monotonic), or None while Redis answers.
        self.outage_since: float | None = None
        self._retry_at = 0.0
        self._probing = False
        # Takes of one key run one after the other, so that one client's publishes reach
        # their room writer in the order they were sent (docs/protocol.rst, Pipelining).
        self._key_locks: dict[str, _KeyLock] = {}

    async def take(self, local: KeyedBuckets, scope: str, key: str, cost: float = 1.0) -> float:
        """Take *cost* tokens from *key*'s shared bucket of *scope*; 0, or seconds to wait.

        The bucket has the rate and burst of *local*, whose bucket for *key* answers
        instead while Redis cannot.
        """
        if self._script is None:
            return local.take(key, cost)
        redis_key = f"{REDIS_KEY_PREFIX}{scope}:{key}"
        entry = self._key_locks.get(redis_key)
        if entry is None:
            entry = self._key_locks[redis_key] = _KeyLock()
        entry.users += 1
        try:
            async with entry.lock:
                return await self._take(local, scope, redis_key, key, cost)
        finally:
            entry.users -= 1
            if not entry.users:
                del self._key_locks[redis_key]

    async def _take(
        self, local: KeyedBuckets, scope: str, redis_key: str, key: str, cost: float
    ) -> float:
        probe = self.outage_since is not None
        if probe:
            # During an outage one take at a time finds out whether Redis is back.
            if self._probing or self.clock() < self._retry_at:
                metrics.RATE_LIMIT_LOCAL_FALLBACKS.labels(reason="cooldown").inc()
                return local.take(key, cost)
            self._probing = True
        try:
            async with asyncio.timeout(self.timeout):
                missing = float(await self._evaluate(redis_key, local.rate, local.burst, cost))
        except Exception as exc:  # any failure of Redis: the local bucket answers
            self._note_failure(exc, scope)
            return local.take(key, cost)
        finally:
            if probe:
                self._probing = False
        if self.outage_since is not None:
            log.bind(outage_s=round(self.clock() - self.outage_since, 3)).info(
                "Redis answers again; rate limits are shared again"
            )
            self.outage_since = None
        return seconds_until(missing, local.rate)

    async def _evaluate(self, redis_key: str, *args: float) -> bytes:
        assert self.redis is not None and self._script is not None
        try:
            return await self.redis.evalsha(self._script.sha, 1, redis_key, *args)
        except NoScriptError:
            # Redis restarted or was flushed since the script was cached: EVAL caches it again.
            return await self.redis.eval(_TAKE_SCRIPT, 1, redis_key, *args)

    def _note_failure(self, exc: Exception, scope: str) -> None:
        timed_out = isinstance(exc, TimeoutError | RedisTimeoutError)
        metrics.RATE_LIMIT_LOCAL_FALLBACKS.labels(reason="timeout" if timed_out else "error").inc()
        now = self.clock()
        self._retry_at = now + self.cooldown
        if self.outage_since is None:
            self.outage_since = now
            log.bind(
                scope=scope, error=type(exc).__name__, detail=str(exc), timeout_s=self.timeout,
                cooldown_s=self.cooldown,
            ).warning("Redis unusable; rate limits are per instance until it answers")  # fmt: skip


class _KeyLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


#: The limiter of an instance without Redis: every take is local.
LOCAL_ONLY = SharedLimiter(None, timeout=0.0)
