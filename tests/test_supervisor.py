"""Tests for the one-for-one supervisor: restarts, backoff, intensity, watchdog, start and stop."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from loguru import logger

from actors.base import Actor, ActorState
from actors.supervisor import ChildSpec, Restart, RestartIntensity, Supervisor
from app.resilience import Backoff

#: Exact delays: no jitter.
STEADY = Backoff(initial=1.0, base=2.0, max_delay=30.0, jitter=0.0)


@dataclass(frozen=True, slots=True)
class Note:
    text: str


@dataclass(frozen=True, slots=True)
class Boom:
    pass


@dataclass(frozen=True, slots=True)
class Hang:
    pass


@dataclass(frozen=True, slots=True)
class Done:
    pass


@dataclass(frozen=True, slots=True)
class PendingCancels:
    pass


class FakeClock:
    """A monotonic clock that only moves when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSleep:
    """Records the delays asked for and only yields to the loop, unless a gate holds it."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)


class Worker(Actor):
    """Journals its lifecycle; crashes in on_start while *broken*, or on a Boom message."""

    def __init__(self, name: str, journal: list[str] | None = None, **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.journal = [] if journal is None else journal
        self.broken = False
        self.hang_on_start = False
        self.hang_on_stop = False
        self.stop_error: Exception | None = None
        self.notes: list[str] = []

    async def on_start(self) -> None:
        self.journal.append(f"start {self.name}")
        if self.broken:
            raise ConnectionRefusedError("refused")
        if self.hang_on_start:
            await asyncio.Event().wait()

    async def on_stop(self) -> None:
        self.journal.append(f"stop {self.name}")
        if self.hang_on_stop:
            await asyncio.Event().wait()
        if self.stop_error is not None:
            raise self.stop_error

    async def _handle_note(self, message: Note) -> None:
        self.notes.append(message.text)

    async def _handle_boom(self, message: Boom) -> None:
        raise RuntimeError("boom")

    async def _handle_hang(self, message: Hang) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.journal.append(f"hang of {self.name} cancelled")
            raise

    async def _handle_done(self, message: Done) -> None:
        self.finish()

    async def _handle_pending_cancels(self, message: PendingCancels) -> int:
        return asyncio.current_task().cancelling()


async def eventually(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until *predicate* holds, failing after about a second."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleep() -> FakeSleep:
    return FakeSleep()


@pytest.fixture
async def supervise(clock: FakeClock, sleep: FakeSleep):
    """Build supervisors with fake time and no jitter, and stop them all afterwards."""
    supervisors: list[Supervisor] = []

    def build(children: list[ChildSpec | Actor], **kwargs) -> Supervisor:
        options = {
            "backoff": STEADY,
            "clock": clock,
            "sleep": sleep,
            "watchdog_interval": 3600.0,
            "stable_after": 60.0,
        }
        supervisor = Supervisor(children, **(options | kwargs))
        supervisors.append(supervisor)
        return supervisor

    yield build
    if sleep.gate is not None:
        sleep.gate.set()
    for supervisor in supervisors:
        await supervisor.stop()


@pytest.fixture
def records():
    """Loguru records emitted during the test."""
    captured: list[dict] = []
    handler = logger.add(lambda message: captured.append(message.record), level="DEBUG")
    yield captured
    logger.remove(handler)


def logged(records: list[dict], message: str) -> list[dict]:
    return [record for record in records if record["message"] == message]


async def test_restarts_a_crashing_actor_with_doubling_delays(supervise, sleep, records) -> None:
    """A crash-looping actor is restarted after 1, 2, 4, ... seconds, capped at max_delay."""
    worker = Worker("db")
    worker.broken = True
    supervisor = supervise([worker], intensity=100)

    await supervisor.start()
    await eventually(lambda: len(sleep.delays) >= 7)

    assert sleep.delays[:7] == [1, 2, 4, 8, 16, 30, 30]
    assert worker.state is ActorState.RESTARTING
    assert worker.restarts >= 7
    assert worker.last_error == {"type": "ConnectionRefusedError", "message": "INTERNAL_ERROR"}
    crash = logged(records, "Actor crashed; restarting")[1]
    assert crash["level"].name == "WARNING"
    expected = {
        "component": "supervisor",
        "actor": "db",
        "retry_count": 2,
        "error": "ConnectionRefusedError",
        "delay": 2.0,
    }
    assert crash["extra"].items() >= expected.items()


async def test_restart_delays_stay_within_jitter(supervise, sleep) -> None:
    """With jitter, each delay lies between the exact one and that plus the jitter share."""
    worker = Worker("db")
    worker.broken = True
    backoff = Backoff(initial=1.0, base=2.0, max_delay=30.0, jitter=0.1)
    supervisor = supervise([worker], intensity=100, backoff=backoff, rng=random.Random(7))

    await supervisor.start()
    await eventually(lambda: len(sleep.delays) >= 7)

    for exact, delay in zip([1, 2, 4, 8, 16, 30, 30], sleep.delays, strict=False):
        assert exact <= delay <= min(30, exact * 1.1)
    assert len(set(sleep.delays[:5])) == 5


async def test_backoff_resets_after_a_stable_period(supervise, sleep, clock) -> None:
    """After stable_after seconds without a crash, the next crash waits the initial delay."""
    worker = Worker("hub")
    supervisor = supervise([worker], stable_after=60.0)
    await supervisor.start()

    for crashes in (1, 2):
        worker.cast(Boom())
        await eventually(lambda n=crashes: len(sleep.delays) == n and worker.ready.is_set())
    assert sleep.delays == [1, 2]

    clock.now += 60.0
    worker.cast(Boom())
    await eventually(lambda: len(sleep.delays) == 3)

    assert sleep.delays == [1, 2, 1]


async def test_intensity_exceeded_fails_the_actor_but_retries_go_on(
    supervise, sleep, clock, records
) -> None:
    """More than intensity restarts in a period mark the actor failed; retries go on at max."""
    worker = Worker("redis")
    worker.broken = True
    supervisor = supervise([worker], intensity=2, period=60.0)

    await supervisor.start()
    await eventually(lambda: len(sleep.delays) >= 6)

    assert sleep.delays[:6] == [1, 2, 30, 30, 30, 30]
    assert worker.state is ActorState.FAILED
    assert not supervisor.ready
    assert supervisor.statuses()[0]["state"] == "failed"
    [failure] = logged(records, "Restart intensity exceeded; actor failed")
    assert failure["level"].name == "ERROR"
    assert failure["extra"]["actor"] == "redis"
    assert logged(records, "Actor crashed; restarting")[-1]["level"].name == "ERROR"
    seen = len(sleep.delays)
    await eventually(lambda: len(sleep.delays) > seen + 10)


async def test_failed_actor_recovers_after_running_stably(supervise, sleep, clock) -> None:
    """A failed actor that then runs stable_after seconds is running again, and so is readiness."""
    worker = Worker("redis")
    worker.broken = True
    supervisor = supervise([worker], intensity=1, stable_after=60.0)
    await supervisor.start()
    await eventually(lambda: worker.state is ActorState.FAILED)

    worker.broken = False
    await eventually(worker.ready.is_set)
    assert worker.state is ActorState.FAILED, "failed sticks until the actor proves stable"
    supervisor.watchdog_pass()
    assert not supervisor.ready

    clock.now += 60.0
    supervisor.watchdog_pass()

    assert worker.state is ActorState.RUNNING
    assert supervisor.ready
    worker.cast(Boom())
    await eventually(lambda: worker.ready.is_set() and sleep.delays[-1] == 1)
    assert worker.state is ActorState.RUNNING, "the intensity window starts afresh"


async def test_an_operators_restart_runs_a_new_incarnation_at_once(
    supervise, sleep, records
) -> None:
    """restart() stops a running actor (on_stop runs) and starts it again with no backoff delay; it counts as a restart, records no error and is logged as an operator's."""
    journal: list[str] = []
    worker = Worker("hub", journal)
    supervisor = supervise([worker])
    await supervisor.start()
    assert supervisor.restart("hub") is True
    await eventually(lambda: worker.restarts == 1 and worker.ready.is_set())
    assert journal == ["start hub", "stop hub", "start hub"]
    assert sleep.delays == [] and worker.last_error is None
    assert worker.state is ActorState.RUNNING and supervisor.ready
    [line] = logged(records, "Actor restarted by an operator")
    assert line["extra"]["actor"] == "hub"
    with pytest.raises(KeyError):
        supervisor.restart("nobody")


async def test_an_operators_restart_cuts_a_failed_actors_delay_short(
    supervise, sleep, clock
) -> None:
    """A failed actor waiting out the maximum delay starts at once when restarted, with its intensity forgiven, and runs once its cause is fixed."""
    worker = Worker("redis")
    worker.broken = True
    supervisor = supervise([worker], intensity=1)
    await supervisor.start()
    await eventually(lambda: worker.state is ActorState.FAILED)
    sleep.gate = asyncio.Event()  # from now on a restart delay lasts until the test opens it
    waits = len(sleep.delays)
    await eventually(lambda: len(sleep.delays) > waits)
    assert sleep.delays[-1] == 30 and worker.state is ActorState.FAILED
    worker.broken = False
    assert supervisor.restart("redis") is True
    await eventually(lambda: worker.ready.is_set())
    assert worker.state is ActorState.RUNNING and supervisor.ready


async def test_starts_in_order_and_stops_in_reverse(supervise) -> None:
    """Children start in list order, each after the previous is ready, and stop in reverse."""
    journal: list[str] = []

    class Gated(Worker):
        ready_after_start = False

    first = Gated("a", journal)
    supervisor = supervise([first, Worker("b", journal), Worker("c", journal)])

    starting = asyncio.create_task(supervisor.start())
    await eventually(lambda: journal == ["start a"])
    await asyncio.sleep(0.01)
    assert journal == ["start a"], "b waits until a is ready"
    first.mark_ready()
    await starting

    assert journal == ["start a", "start b", "start c"]
    assert supervisor.ready
    assert [status["name"] for status in supervisor.statuses()] == ["a", "b", "c"]
    assert supervisor.get("b").name == "b"

    await supervisor.stop()

    assert journal[3:] == ["stop c", "stop b", "stop a"]
    assert {status["state"] for status in supervisor.statuses()} == {"stopped"}
    assert not supervisor.ready


async def test_stop_cancels_a_child_whose_on_stop_hangs(supervise, records) -> None:
    """A child still stopping at the shutdown deadline is cancelled hard; the rest stop."""
    journal: list[str] = []
    stuck = Worker("b", journal)
    supervisor = supervise(
        [Worker("a", journal), stuck, Worker("c", journal)], shutdown_timeout=0.05
    )
    await supervisor.start()
    stuck.hang_on_stop = True
    loop = asyncio.get_running_loop()
    began = loop.time()

    await supervisor.stop()

    assert loop.time() - began < 0.5
    assert journal[3:] == ["stop c", "stop b", "stop a"]
    assert stuck.state is ActorState.STOPPED
    late = logged(records, "Actor did not stop in time; cancelling it hard")
    assert [record["extra"]["actor"] for record in late][0] == "b"


async def test_stop_logs_cleanup_failures_together(supervise, records) -> None:
    """on_stop failures of several children are logged as one exception group."""
    first, second = Worker("a"), Worker("b")
    supervisor = supervise([first, second])
    await supervisor.start()
    first.stop_error = OSError("socket")
    second.stop_error = ValueError("state")

    await supervisor.stop()

    [record] = logged(records, "Actors failed to clean up")
    group = record["exception"].value
    assert isinstance(group, ExceptionGroup)
    assert [type(error) for error in group.exceptions] == [ValueError, OSError]


async def test_stop_is_safe_before_and_after_start(supervise) -> None:
    """stop() works on a supervisor never started, and twice in a row."""
    supervisor = supervise([Worker("a")])
    await supervisor.stop()

    started = supervise([Worker("b")])
    await started.start()
    await started.stop()
    await started.stop()

    assert started.statuses()[0]["state"] == "stopped"


async def test_stop_during_start_starts_no_more_children(supervise) -> None:
    """stop() while start() waits on a child stops it and keeps the later ones from starting."""
    journal: list[str] = []
    hanging = Worker("b", journal)
    hanging.hang_on_start = True
    supervisor = supervise([Worker("a", journal), hanging, Worker("c", journal)])
    starting = asyncio.create_task(supervisor.start())
    await eventually(lambda: journal == ["start a", "start b"])

    await supervisor.stop()
    await asyncio.wait({starting}, timeout=1.0)

    assert starting.done()
    assert journal == ["start a", "start b", "stop b", "stop a"]


async def test_stop_after_an_interrupted_start(supervise) -> None:
    """When start() is cancelled midway, stop() still stops the children already started."""
    journal: list[str] = []
    hanging = Worker("b", journal)
    hanging.hang_on_start = True
    supervisor = supervise([Worker("a", journal), hanging, Worker("c", journal)])
    starting = asyncio.create_task(supervisor.start())
    await eventually(lambda: journal == ["start a", "start b"])

    starting.cancel()
    await asyncio.wait({starting})
    await supervisor.stop()

    assert journal == ["start a", "start b", "stop b", "stop a"]


async def test_watchdog_restarts_a_stalled_actor(supervise, sleep, clock, records) -> None:
    """A handler stuck in await is cancelled, the actor restarted and its backlog handled."""
    journal: list[str] = []
    worker = Worker("events", journal, stall_timeout=5.0, clock=clock)
    supervisor = supervise([worker], watchdog_interval=0.001)
    await supervisor.start()
    worker.cast(Hang())
    worker.cast(Note("behind"))
    await eventually(lambda: worker.mailbox.qsize() == 1)
    await asyncio.sleep(0.01)
    assert worker.stalls == 0

    clock.now += 6.0
    await eventually(lambda: worker.notes == ["behind"])

    assert "hang of events cancelled" in journal
    assert worker.stalls == 1
    assert worker.restarts == 1
    assert worker.last_error == {"type": "ActorStalled", "message": "ACTOR_STALLED"}
    assert sleep.delays == [1]
    [stall] = logged(records, "Actor stalled; restarting it")
    assert stall["level"].name == "ERROR"
    expected = {"actor": "events", "mailbox_depth": 1, "stalled_seconds": 6.0}
    assert stall["extra"].items() >= expected.items()
    assert worker.state is ActorState.RUNNING
    assert await worker.call(PendingCancels()) == 0, (
        "no stale cancel request for timeouts to trip on"
    )


async def test_cast_during_restart_is_handled_afterwards(supervise, sleep) -> None:
    """A message cast while the actor waits to restart is handled by the next incarnation."""
    worker = Worker("hub")
    supervisor = supervise([worker])
    await supervisor.start()
    sleep.gate = asyncio.Event()
    worker.cast(Boom())
    await eventually(lambda: worker.state is ActorState.RESTARTING)

    worker.cast(Note("queued"))
    await asyncio.sleep(0.01)
    assert worker.notes == []
    sleep.gate.set()

    await eventually(lambda: worker.notes == ["queued"])


async def test_permanent_child_restarts_after_normal_return(supervise, sleep) -> None:
    """A permanent child is restarted even when it returns normally."""
    worker = Worker("heartbeat")
    supervisor = supervise([worker])
    await supervisor.start()

    worker.cast(Done())
    await eventually(lambda: worker.restarts == 1 and worker.ready.is_set())

    assert worker.last_error is None
    assert supervisor.ready


async def test_transient_child_restarts_only_after_a_crash(supervise, sleep) -> None:
    """A transient child is restarted after a crash but not after returning normally."""
    worker = Worker("bridge")
    supervisor = supervise([ChildSpec(worker, restart=Restart.TRANSIENT)])
    await supervisor.start()

    worker.cast(Boom())
    await eventually(lambda: worker.restarts == 1 and worker.ready.is_set())
    worker.cast(Done())
    await eventually(lambda: worker.state is ActorState.STOPPED)
    await asyncio.sleep(0.01)

    assert worker.restarts == 1
    assert sleep.delays == [1]
    assert supervisor.ready, "a transient child that finished is not a fault"


async def test_temporary_child_is_never_restarted(supervise, sleep) -> None:
    """A temporary child that crashes stays down, and readiness does not depend on it."""
    worker = Worker("probe")
    supervisor = supervise([Worker("hub"), ChildSpec(worker, restart=Restart.TEMPORARY)])
    await supervisor.start()

    worker.cast(Boom())
    await eventually(lambda: worker.state is ActorState.STOPPED)
    await asyncio.sleep(0.01)

    assert worker.restarts == 0
    assert worker.last_error == {"type": "RuntimeError", "message": "INTERNAL_ERROR"}
    assert sleep.delays == []
    assert supervisor.ready


async def test_child_failing_on_start_does_not_block_the_others(supervise, sleep) -> None:
    """start() moves past a child whose on_start crashes, which keeps being retried."""
    journal: list[str] = []
    broken = Worker("b", journal)
    broken.broken = True
    supervisor = supervise([Worker("a", journal), broken, Worker("c", journal)], intensity=100)

    await supervisor.start()

    assert "start c" in journal
    assert supervisor.get("c").ready.is_set()
    assert not supervisor.ready
    await eventually(lambda: len(sleep.delays) >= 3)


async def test_child_hanging_on_start_times_out_and_is_retried(supervise, sleep) -> None:
    """A child not ready within start_timeout is cancelled and retried, and start() goes on."""
    journal: list[str] = []
    hanging = Worker("b", journal)
    hanging.hang_on_start = True
    supervisor = supervise(
        [Worker("a", journal), ChildSpec(hanging, start_timeout=0.02), Worker("c", journal)]
    )

    await supervisor.start()

    assert "start c" in journal
    await eventually(lambda: hanging.restarts >= 1)
    assert hanging.last_error == {"type": "ActorTimeout", "message": "SERVICE_ERROR"}
    assert sleep.delays[0] == 1


def test_actor_names_must_be_unique() -> None:
    """Two children with one name are refused, since get() and logs go by name."""
    with pytest.raises(ValueError):
        Supervisor([Worker("hub"), Worker("hub")])


@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=30.0), min_size=1, max_size=40),
    intensity=st.integers(min_value=0, max_value=6),
    period=st.floats(min_value=0.5, max_value=60.0),
)
def test_intensity_never_allows_more_than_r_restarts_in_t(
    gaps: list[float], intensity: int, period: float
) -> None:
    """Before the limit trips, no period-long window holds more than intensity restarts."""
    limit = RestartIntensity(intensity, period)
    times: list[float] = []
    now = 0.0
    for gap in gaps:
        now += gap
        if limit.record(now):
            break
        times.append(now)

    for start in times:
        assert sum(start <= t < start + period for t in times) <= intensity
