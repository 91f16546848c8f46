"""Tests for app.resilience: backoff timing, retry limits and circuit breaker states."""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loguru import logger

from app.errors import AuthFailed, CircuitOpen, DatabaseError
from app.log import setup_logging
from app.resilience import Backoff, BreakerState, CircuitBreaker, retry

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FakeClock:
    """A clock that only moves when a test says so."""

    def __init__(self) -> None:
        #: Current reading in seconds.
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Upstream:
    """A fake upstream that counts calls and fails or succeeds on command."""

    def __init__(self) -> None:
        #: Calls that reached the upstream.
        self.calls = 0
        #: When set, each call raises it.
        self.error: BaseException | None = None
        #: When set, each call waits for it before answering.
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> str:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return "ok"


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """Keep breaker and retry log lines out of the test output."""
    logger.remove()
    yield
    logger.remove()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def upstream() -> Upstream:
    return Upstream()


def make_breaker(
    clock: FakeClock, changes: list[Any] | None = None, **options: Any
) -> CircuitBreaker:
    """Build a breaker on the fake clock that records its transitions into *changes*."""
    options.setdefault("open_seconds", 30.0)
    return CircuitBreaker(
        "upstream",
        clock=clock,
        on_state_change=None if changes is None else lambda *change: changes.append(change),
        **options,
    )


async def fail_times(breaker: CircuitBreaker, upstream: Upstream, times: int) -> None:
    upstream.error = ConnectionError("refused")
    for _ in range(times):
        with pytest.raises(ConnectionError):
            await breaker.call(upstream)
    upstream.error = None


async def tripped_and_waited(
    clock: FakeClock, upstream: Upstream, **options: Any
) -> CircuitBreaker:
    """Return a breaker that opened and whose open period has just elapsed."""
    breaker = make_breaker(clock, failure_threshold=1, **options)
    await fail_times(breaker, upstream, 1)
    clock.advance(breaker.open_seconds)
    return breaker


async def test_consecutive_failures_trip(clock: FakeClock, upstream: Upstream) -> None:
    """Three consecutive failures open the breaker, but a success in between resets the count."""
    breaker = make_breaker(clock)
    await fail_times(breaker, upstream, 2)
    await breaker.call(upstream)
    await fail_times(breaker, upstream, 2)
    assert breaker.state is CLOSED

    await fail_times(breaker, upstream, 1)

    assert breaker.state is OPEN
    assert breaker.snapshot()["consecutive_failures"] == 3


async def test_failure_rate_trips(clock: FakeClock, upstream: Upstream) -> None:
    """Half the calls in the window failing opens the breaker once min_calls calls happened."""
    breaker = make_breaker(clock, failure_threshold=100, min_calls=10, failure_rate=0.5)
    for _ in range(4):
        await fail_times(breaker, upstream, 1)
        await breaker.call(upstream)
    await breaker.call(upstream)
    assert breaker.state is CLOSED  # 4 of 9: too few calls and too low a rate

    await fail_times(breaker, upstream, 1)

    assert breaker.state is OPEN  # 5 of 10


async def test_failure_rate_forgets_old_calls(clock: FakeClock, upstream: Upstream) -> None:
    """Failures older than the window do not count towards the rate."""
    breaker = make_breaker(clock, failure_threshold=100, min_calls=4, window_seconds=60.0)
    await fail_times(breaker, upstream, 3)
    clock.advance(61)
    for _ in range(3):
        await breaker.call(upstream)

    await fail_times(breaker, upstream, 1)

    assert breaker.state is CLOSED


async def test_open_refuses_without_calling(clock: FakeClock, upstream: Upstream) -> None:
    """An open breaker raises CircuitOpen at once and never calls the function."""
    breaker = make_breaker(clock, failure_threshold=1)
    await fail_times(breaker, upstream, 1)
    clock.advance(29)

    for _ in range(5):
        with pytest.raises(CircuitOpen) as refused:
            await breaker.call(upstream)

    assert upstream.calls == 1
    assert refused.value.retry_after == 1
    snapshot = breaker.snapshot()
    assert (snapshot["rejections"], snapshot["open_remaining"]) == (5, 1.0)


async def test_half_open_after_open_seconds(clock: FakeClock, upstream: Upstream) -> None:
    """After open_seconds the next call is a trial, and its success closes the breaker."""
    changes: list[Any] = []
    breaker = make_breaker(clock, changes, failure_threshold=1)
    await fail_times(breaker, upstream, 1)
    clock.advance(30)

    assert await breaker.call(upstream) == "ok"

    assert breaker.state is CLOSED
    assert changes == [
        ("upstream", CLOSED, OPEN),
        ("upstream", OPEN, HALF_OPEN),
        ("upstream", HALF_OPEN, CLOSED),
    ]
    assert breaker.snapshot()["transitions"] == 3


async def test_failed_trial_reopens(clock: FakeClock, upstream: Upstream) -> None:
    """A failing trial reopens the breaker with a fresh open period."""
    breaker = await tripped_and_waited(clock, upstream)

    await fail_times(breaker, upstream, 1)

    assert breaker.state is OPEN
    assert breaker.open_remaining == 30.0


@pytest.mark.parametrize("trial_slots", [1, 3])
async def test_half_open_admits_exactly_k_trials(
    clock: FakeClock, upstream: Upstream, trial_slots: int
) -> None:
    """Of 20 concurrent callers in half-open, exactly K reach the function; the rest are refused."""
    breaker = await tripped_and_waited(clock, upstream, half_open_max_calls=trial_slots)
    upstream.calls = 0
    upstream.gate = asyncio.Event()

    callers = [asyncio.create_task(breaker.call(upstream)) for _ in range(20)]
    await asyncio.sleep(0)
    # Read the figures while the trials are held, then release them so no task outlives the test.
    refused_at_once = sum(task.done() for task in callers)
    reached_upstream = upstream.calls
    held_trials = breaker.trials_in_flight
    upstream.gate.set()
    results = await asyncio.gather(*callers, return_exceptions=True)

    assert refused_at_once == 20 - trial_slots
    assert reached_upstream == held_trials == trial_slots
    assert sum(isinstance(result, CircuitOpen) for result in results) == 20 - trial_slots
    assert results.count("ok") == trial_slots
    assert breaker.state is CLOSED
    assert breaker.trials_in_flight == 0


async def test_trial_timeout_counts_as_failure(clock: FakeClock, upstream: Upstream) -> None:
    """A trial that outlives trial_timeout fails with TimeoutError and reopens the breaker."""
    breaker = await tripped_and_waited(clock, upstream, trial_timeout=0.01)
    upstream.gate = asyncio.Event()

    with pytest.raises(TimeoutError):
        await breaker.call(upstream)

    assert breaker.state is OPEN
    assert breaker.snapshot()["last_failure"] == "TimeoutError"


async def test_call_timeout_counts_as_failure(clock: FakeClock, upstream: Upstream) -> None:
    """A closed call that outlives call_timeout counts as a failure."""
    breaker = make_breaker(clock, call_timeout=0.01)
    upstream.gate = asyncio.Event()

    with pytest.raises(TimeoutError):
        await breaker.call(upstream)

    assert breaker.snapshot()["consecutive_failures"] == 1


async def test_cancelled_trial_is_no_failure(clock: FakeClock, upstream: Upstream) -> None:
    """Cancelling a trial counts no failure, frees its slot and leaves the breaker half-open."""
    breaker = await tripped_and_waited(clock, upstream)
    upstream.gate = asyncio.Event()
    trial = asyncio.create_task(breaker.call(upstream))
    await asyncio.sleep(0)

    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial

    assert breaker.state is HALF_OPEN
    assert (breaker.failures, breaker.trials_in_flight) == (1, 0)
    upstream.gate.set()
    assert await breaker.call(upstream) == "ok"
    assert breaker.state is CLOSED


async def test_excluded_errors_do_not_count(clock: FakeClock, upstream: Upstream) -> None:
    """Errors that counts_as_failure rejects pass through without tripping the breaker."""
    breaker = make_breaker(
        clock, failure_threshold=1, counts_as_failure=lambda e: isinstance(e, OSError)
    )
    upstream.error = AuthFailed()

    for _ in range(3):
        with pytest.raises(AuthFailed):
            await breaker.call(upstream)

    assert breaker.state is CLOSED
    assert breaker.failures == 0


async def test_late_success_does_not_close_reopened_breaker(
    clock: FakeClock, upstream: Upstream
) -> None:
    """A slow call that started before the breaker opened cannot close it when it succeeds."""
    breaker = make_breaker(clock, failure_threshold=1)
    slow = Upstream()
    slow.gate = asyncio.Event()
    in_flight = asyncio.create_task(breaker.call(slow))
    await asyncio.sleep(0)
    await fail_times(breaker, upstream, 1)

    slow.gate.set()
    assert await in_flight == "ok"

    assert breaker.state is OPEN


async def test_reset_closes_an_open_breaker_and_ignores_calls_from_before(
    clock: FakeClock, upstream: Upstream
) -> None:
    """reset() closes an open breaker at once, so the next call reaches the upstream; a slow call from before the reset cannot count against the fresh breaker."""
    changes: list[Any] = []
    breaker = make_breaker(clock, changes, failure_threshold=1)
    slow = Upstream()
    slow.gate = asyncio.Event()
    slow.error = ConnectionError("late")
    in_flight = asyncio.create_task(breaker.call(slow))
    await asyncio.sleep(0)
    await fail_times(breaker, upstream, 1)
    assert breaker.state is OPEN

    breaker.reset()

    assert breaker.state is CLOSED and breaker.open_remaining == 0
    assert await breaker.call(upstream) == "ok"
    slow.gate.set()
    with pytest.raises(ConnectionError):
        await in_flight
    assert breaker.state is CLOSED and breaker.consecutive_failures == 0
    assert [change[1:] for change in changes] == [(CLOSED, OPEN), (OPEN, CLOSED)]


async def test_probe_success_closes_before_open_period_ends(
    clock: FakeClock, upstream: Upstream
) -> None:
    """A successful probe closes an open breaker without waiting out open_seconds."""
    breaker = make_breaker(clock, failure_threshold=1)
    await fail_times(breaker, upstream, 1)
    clock.advance(10)

    assert await breaker.probe(upstream) == "ok"

    assert breaker.state is CLOSED


async def test_probe_failure_restarts_open_timer(clock: FakeClock, upstream: Upstream) -> None:
    """A failing probe keeps the breaker open and restarts its open period."""
    changes: list[Any] = []
    breaker = make_breaker(clock, changes, failure_threshold=1)
    await fail_times(breaker, upstream, 1)
    clock.advance(20)
    upstream.error = ConnectionError("still down")

    with pytest.raises(ConnectionError):
        await breaker.probe(upstream)

    assert breaker.state is OPEN
    assert breaker.open_remaining == 30.0
    assert changes == [("upstream", CLOSED, OPEN)]


async def test_one_probe_at_a_time(clock: FakeClock, upstream: Upstream) -> None:
    """A probe started while another is in flight is refused at once."""
    breaker = make_breaker(clock, failure_threshold=1)
    await fail_times(breaker, upstream, 1)
    upstream.gate = asyncio.Event()
    first = asyncio.create_task(breaker.probe(upstream))
    await asyncio.sleep(0)

    with pytest.raises(CircuitOpen):
        await breaker.probe(upstream)

    upstream.gate.set()
    assert await first == "ok"
    assert upstream.calls == 2


async def test_snapshot_counts(clock: FakeClock, upstream: Upstream) -> None:
    """The snapshot reports state and counters as they happened."""
    breaker = make_breaker(clock, failure_threshold=2)
    await breaker.call(upstream)
    await fail_times(breaker, upstream, 2)
    with pytest.raises(CircuitOpen):
        await breaker.call(upstream)
    clock.advance(5)

    assert breaker.snapshot() == {
        "name": "upstream",
        "state": "open",
        "consecutive_failures": 2,
        "calls": 3,
        "failures": 2,
        "successes": 1,
        "rejections": 1,
        "transitions": 1,
        "opened_age": 5.0,
        "open_remaining": 25.0,
        "trials_in_flight": 0,
        "last_failure": "ConnectionError",
    }


async def test_broken_callback_does_not_break_calls(clock: FakeClock, upstream: Upstream) -> None:
    """An exception in on_state_change is logged, and the breaker still opens."""

    def explode(*change: Any) -> None:
        raise RuntimeError("dashboard down")

    breaker = CircuitBreaker("upstream", failure_threshold=1, clock=clock, on_state_change=explode)

    await fail_times(breaker, upstream, 1)

    assert breaker.state is OPEN


def test_backoff_default_sequence() -> None:
    """Without jitter the default backoff waits 1, 2, 4, 8, 16, then 30 s at most."""
    backoff = Backoff(jitter=0)

    assert [backoff.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_backoff_survives_huge_attempts() -> None:
    """Attempt numbers far past the cap give max_delay instead of overflowing."""
    assert Backoff().delay(5000) == 30.0


def test_backoff_rejects_attempt_zero() -> None:
    """Attempts are 1-based."""
    with pytest.raises(ValueError):
        Backoff().delay(0)


@settings(max_examples=50, deadline=None)
@given(
    initial=st.floats(0.001, 10.0),
    max_delay=st.floats(0.01, 120.0),
    jitter=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**32),
)
def test_property_12_delays_double_within_jitter(
    initial: float, max_delay: float, jitter: float, seed: int
) -> None:
    """Property 12: each delay is about double the last within the jitter band, capped at max."""
    backoff = Backoff(initial=initial, base=2.0, max_delay=max_delay, jitter=jitter)
    rng = random.Random(seed)
    delays = [backoff.delay(n, rng) for n in range(1, 16)]

    for n, delay in enumerate(delays, start=1):
        uncapped = initial * 2 ** (n - 1)
        assert delay <= max_delay
        assert min(uncapped, max_delay) <= delay * (1 + 1e-9)
        assert delay <= uncapped * (1 + jitter) * (1 + 1e-9)
    for earlier, later in zip(delays, delays[1:], strict=False):
        if later < max_delay:
            ratio = later / earlier
            assert 2 / (1 + jitter) - 1e-9 <= ratio <= 2 * (1 + jitter) + 1e-9


@settings(max_examples=50, deadline=None)
@given(attempts=st.integers(1, 12), error_type=st.sampled_from([ConnectionError, DatabaseError]))
async def test_property_7_retry_never_exceeds_attempts(
    attempts: int, error_type: type[Exception]
) -> None:
    """Property 7: an always-failing retryable call is made exactly N times, then raises."""
    calls = 0
    waits: list[float] = []
    retries: list[tuple[int, float]] = []

    async def always_fails() -> None:
        nonlocal calls
        calls += 1
        raise error_type("down")

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    backoff = Backoff(jitter=0)
    with pytest.raises(error_type):
        await retry(
            always_fails,
            attempts=attempts,
            backoff=backoff,
            sleep=fake_sleep,
            on_retry=lambda attempt, _, delay: retries.append((attempt, delay)),
        )

    assert calls == attempts
    assert waits == [backoff.delay(n) for n in range(1, attempts)]
    assert retries == list(zip(range(1, attempts), waits, strict=True))


@pytest.mark.parametrize("error", [ValueError("bad"), AuthFailed(), KeyError("k")])
async def test_non_retryable_error_is_raised_at_once(error: Exception) -> None:
    """A non-retryable error is raised after one call, without sleeping."""
    calls = 0
    waits: list[float] = []

    async def fails() -> None:
        nonlocal calls
        calls += 1
        raise error

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    with pytest.raises(type(error)):
        await retry(fails, attempts=5, sleep=fake_sleep)

    assert (calls, waits) == (1, [])


async def test_retry_returns_first_success() -> None:
    """retry returns the result as soon as a call succeeds."""
    outcomes: list[Any] = [ConnectionError(), TimeoutError(), "done"]

    async def flaky() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def fake_sleep(seconds: float) -> None:
        pass

    assert await retry(flaky, attempts=5, sleep=fake_sleep) == "done"
    assert outcomes == []


async def test_retry_does_not_catch_cancellation() -> None:
    """Cancellation propagates out of retry instead of being retried."""
    calls = 0

    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await retry(cancelled, attempts=5, retryable=lambda _: True)

    assert calls == 1


async def test_retry_logs_warn_with_retry_count() -> None:
    """Each retry is logged at warn with its retry_count."""
    stream = io.StringIO()
    setup_logging(stream=stream)
    outcomes: list[Any] = [ConnectionError("refused"), "done"]

    async def flaky() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def fake_sleep(seconds: float) -> None:
        pass

    await retry(flaky, sleep=fake_sleep)

    (record,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert (record["level"], record["retry_count"], record["component"]) == ("warn", 1, "retry")
    assert record["error"] == "ConnectionError: refused"
