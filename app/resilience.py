"""Retry with exponential backoff and the circuit breaker: the one place each lives."""

from __future__ import annotations

import asyncio
import enum
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from app.errors import CircuitOpen, is_retryable
from app.log import get_logger

__all__ = ["Backoff", "BreakerState", "CircuitBreaker", "DEFAULT_BACKOFF", "retry"]

T = TypeVar("T")

_retry_log = get_logger("retry")
_breaker_log = get_logger("breaker")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with proportional jitter, capped at :attr:`max_delay`.

    The supervisor, the database monitor and :func:`retry` all wait by this rule.
    """

    #: Delay before the first retry, in seconds.
    initial: float = 1.0
    #: Growth factor per attempt.
    base: float = 2.0
    #: Ceiling on any delay, jitter included, in seconds.
    max_delay: float = 30.0
    #: Largest random extra as a fraction of the delay, to spread retries of many clients.
    jitter: float = 0.1

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Return the wait after failed *attempt* (1-based), using *rng* for the jitter."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        try:
            raw = self.initial * self.base ** (attempt - 1)
        except OverflowError:
            return self.max_delay
        spread = 1 + self.jitter * (rng or random).random()
        return min(self.max_delay, raw * spread)


#: The backoff used when a caller does not choose one.
DEFAULT_BACKOFF = Backoff()


async def retry(
    fn: Callable[[], Awaitable[T]],
    *,
    attempts: int = 3,
    backoff: Backoff = DEFAULT_BACKOFF,
    retryable: Callable[[BaseException], bool] = is_retryable,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Await *fn()* until it succeeds, making at most *attempts* calls in all.

    Only errors for which *retryable* is true are retried, after *sleep* for the *backoff*
    delay; any other error, or the last one, is raised. *on_retry(attempt, error, delay)* is
    called before each wait. Cancellation always propagates.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    operation = getattr(fn, "__qualname__", repr(fn))
    attempt = 1
    while True:
        try:
            return await fn()
        except Exception as error:
            if attempt >= attempts or not retryable(error):
                raise
            delay = backoff.delay(attempt)
            _retry_log.bind(
                operation=operation,
                retry_count=attempt,
                max_attempts=attempts,
                delay_s=round(delay, 3),
                error=f"{type(error).__name__}: {error}",
            ).warning("retrying after failure")
            if on_retry is not None:
                on_retry(attempt, error, delay)
            await sleep(delay)
        attempt += 1


class BreakerState(enum.StrEnum):
    """Where a circuit breaker stands."""

    #: Calls go through; failures are counted.
    CLOSED = "closed"
    #: Calls are refused at once until the open period ends.
    OPEN = "open"
    #: A limited number of trial calls decide whether to close or reopen.
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops calling an upstream that keeps failing, and lets a few trials test its recovery.

    It opens after *failure_threshold* consecutive failures, or when at least *min_calls*
    calls in the last *window_seconds* failed at a fraction of *failure_rate* or more. After
    *open_seconds* it turns half-open and admits *half_open_max_calls* concurrent trials,
    each limited by *trial_timeout*; one trial success closes it and one failure reopens it.
    Closed calls are limited by *call_timeout*. *counts_as_failure* picks which exceptions
    count; the others pass through as successes of the upstream. *on_state_change(name, old,
    new)* hears of every transition; *clock* is injectable for tests.
    """

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 3,
        open_seconds: float = 30.0,
        failure_rate: float = 0.5,
        window_seconds: float = 60.0,
        min_calls: int = 10,
        half_open_max_calls: int = 1,
        trial_timeout: float | None = None,
        call_timeout: float | None = None,
        counts_as_failure: Callable[[BaseException], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        #: Names the upstream in logs, snapshots and callbacks.
        self.name = name
        #: Consecutive failures that open a closed breaker.
        self.failure_threshold = failure_threshold
        #: How long the breaker stays open before trials are allowed.
        self.open_seconds = open_seconds
        #: Failure fraction over the window that opens the breaker.
        self.failure_rate = failure_rate
        #: Length of the sliding window for the failure rate, in seconds.
        self.window_seconds = window_seconds
        #: Calls the window needs before the failure rate may open the breaker.
        self.min_calls = min_calls
        #: Trial calls admitted at the same time while half-open.
        self.half_open_max_calls = half_open_max_calls
        #: Time limit of each trial call and probe, in seconds.
        self.trial_timeout = trial_timeout
        #: Time limit of each call while closed, in seconds.
        self.call_timeout = call_timeout
        #: Decides whether an exception says the upstream is unhealthy.
        self.counts_as_failure = counts_as_failure or (lambda error: isinstance(error, Exception))
        #: Time source in seconds; monotonic in production, fake in tests.
        self.clock = clock
        #: Called with (name, old state, new state) on every transition.
        self.on_state_change = on_state_change

        #: Current state; see :meth:`call` for when it changes.
        self.state = BreakerState.CLOSED
        #: Clock reading when the breaker last opened.
        self.opened_at: float | None = None
        #: Failures since the last success while closed.
        self.consecutive_failures = 0
        #: Calls and probes that reached the upstream.
        self.calls = 0
        #: Of those, the ones that failed.
        self.failures = 0
        #: Of those, the ones that succeeded.
        self.successes = 0
        #: Calls refused without reaching the upstream.
        self.rejections = 0
        #: State changes so far.
        self.transitions = 0
        #: Type name of the latest failure.
        self.last_failure: str | None = None
        #: Trial calls currently in flight while half-open.
        self.trials_in_flight = 0
        self._probing = False
        # Bumped on every transition so an outcome that arrives after the state moved on
        # (a slow call from before the breaker opened, say) cannot flip the new state.
        self._generation = 0
        self._window: deque[tuple[float, bool]] = deque()

    @property
    def open_remaining(self) -> float:
        """Seconds until an open breaker admits trials; zero unless open."""
        if self.state is not BreakerState.OPEN or self.opened_at is None:
            return 0.0
        return max(0.0, self.open_seconds - (self.clock() - self.opened_at))

    def reset(self) -> None:
        """Close the breaker now, as an operator asked: the next call reaches the upstream.

        Calls in flight from before keep their outcome to themselves (the generation moves
        on), and a failing upstream opens it again after the usual failures.
        """
        self.opened_at = None
        self._transition(BreakerState.CLOSED)
        self._generation += 1
        self.consecutive_failures = 0
        self._window.clear()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Await *fn(\\*args, \\*\\*kwargs)* through the breaker.

        Raises :class:`~app.errors.CircuitOpen` at once, without calling *fn*, while open or
        when every half-open trial slot is taken.
        """
        if self.state is BreakerState.OPEN and self.open_remaining <= 0:
            self._transition(BreakerState.HALF_OPEN)
        if self.state is BreakerState.OPEN:
            raise self._reject()
        if self.state is BreakerState.CLOSED:
            return await self._attempt(fn, args, kwargs, self.call_timeout)
        if self.trials_in_flight >= self.half_open_max_calls:
            raise self._reject()
        self.trials_in_flight += 1
        try:
            return await self._attempt(fn, args, kwargs, self.trial_timeout or self.call_timeout)
        finally:
            self.trials_in_flight -= 1

    async def probe(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await one health check *fn()* now, even while the open period is still running.

        Success closes the breaker; failure keeps it open and restarts the open period. Only
        one probe runs at a time; a concurrent one raises :class:`~app.errors.CircuitOpen`.
        """
        if self._probing:
            raise self._reject()
        self._probing = True
        try:
            return await self._attempt(
                fn, (), {}, self.trial_timeout or self.call_timeout, probing=True
            )
        finally:
            self._probing = False

    def snapshot(self) -> dict[str, Any]:
        """Return the state and counters for dashboards."""
        open_age = None
        if self.state is not BreakerState.CLOSED and self.opened_at is not None:
            open_age = self.clock() - self.opened_at
        return {
            "name": self.name,
            "state": self.state.value,
            "consecutive_failures": self.consecutive_failures,
            "calls": self.calls,
            "failures": self.failures,
            "successes": self.successes,
            "rejections": self.rejections,
            "transitions": self.transitions,
            "opened_age": open_age,
            "open_remaining": self.open_remaining,
            "trials_in_flight": self.trials_in_flight,
            "last_failure": self.last_failure,
        }

    async def _attempt(
        self,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        time_limit: float | None,
        *,
        probing: bool = False,
    ) -> T:
        generation = self._generation
        self.calls += 1
        try:
            async with asyncio.timeout(time_limit):
                result = await fn(*args, **kwargs)
        except Exception as error:
            # CancelledError is a BaseException, so cancellation skips this and counts nothing.
            if self.counts_as_failure(error):
                self._record_failure(error, generation, probing)
            else:
                self._record_success(generation, probing)
            raise
        self._record_success(generation, probing)
        return result

    def _record_success(self, generation: int, probing: bool) -> None:
        self.successes += 1
        self._remember(failed=False)
        if probing and self.state is not BreakerState.CLOSED:
            self._transition(BreakerState.CLOSED)
        elif generation != self._generation:
            return
        elif self.state is BreakerState.HALF_OPEN:
            self._transition(BreakerState.CLOSED)
        else:
            self.consecutive_failures = 0

    def _record_failure(self, error: Exception, generation: int, probing: bool) -> None:
        self.failures += 1
        self.last_failure = type(error).__name__
        self._remember(failed=True)
        if probing and self.state is not BreakerState.CLOSED:
            self._open()
        elif generation != self._generation:
            return
        elif self.state is BreakerState.HALF_OPEN:
            self._open()
        else:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.failure_threshold or self._rate_exceeded():
                self._open()

    def _remember(self, *, failed: bool) -> None:
        now = self.clock()
        self._window.append((now, failed))
        while self._window and self._window[0][0] <= now - self.window_seconds:
            self._window.popleft()

    def _rate_exceeded(self) -> bool:
        if len(self._window) < self.min_calls:
            return False
        failed = sum(1 for _, was_failure in self._window if was_failure)
        return failed / len(self._window) >= self.failure_rate

    def _open(self) -> None:
        self.opened_at = self.clock()
        self._transition(BreakerState.OPEN)

    def _reject(self) -> CircuitOpen:
        self.rejections += 1
        retry_after = max(1, math.ceil(self.open_remaining))
        return CircuitOpen(f"circuit {self.name} is {self.state.value}", retry_after=retry_after)

    def _transition(self, new: BreakerState) -> None:
        old = self.state
        if old is new:
            return
        self.state = new
        self._generation += 1
        self.transitions += 1
        if new is BreakerState.CLOSED:
            self.consecutive_failures = 0
            # Failures from before the outage must not trip the fresh breaker again.
            self._window.clear()
        log = _breaker_log.bind(
            breaker=self.name,
            from_state=old.value,
            to_state=new.value,
            last_failure=self.last_failure,
        )
        if new is BreakerState.OPEN:
            log.bind(open_seconds=self.open_seconds).warning(f"circuit {self.name} opened")
        else:
            log.info(f"circuit {self.name} {new.value.replace('_', '-')}")
        if self.on_state_change is not None:
            try:
                self.on_state_change(self.name, old, new)
            except Exception as error:
                # A broken dashboard hook must not break the calls the breaker guards.
                _breaker_log.opt(exception=error).bind(breaker=self.name).error(
                    "state change callback failed"
                )
