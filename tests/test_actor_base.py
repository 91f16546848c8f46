"""Tests for the actor runtime: mailbox, cast and call, dispatch, status, stalls and timers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.base import Actor, ActorState, describe_error
from app.errors import ActorCrashed, ActorTimeout, AppError, MailboxFull

DSN = "postgresql://hearth:s3cret-pw@db.internal:5432/hearth"


@dataclass(frozen=True, slots=True)
class Note:
    text: str


@dataclass(frozen=True, slots=True)
class Echo:
    text: str


@dataclass(frozen=True, slots=True)
class Explode:
    error: Exception


@dataclass(frozen=True, slots=True)
class HTTPPing:
    pass


@dataclass(frozen=True, slots=True)
class Hang:
    pass


@dataclass(frozen=True, slots=True)
class Stranger:
    pass


class Denied(AppError):
    code = "DENIED"


class FakeClock:
    """A monotonic clock that only moves when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder(Actor):
    """Records what it handles and how its incarnations start and stop."""

    def __init__(self, name: str = "recorder", **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.notes: list[str] = []
        self.events: list[str] = []

    async def on_start(self) -> None:
        self.events.append("start")

    async def on_stop(self) -> None:
        self.events.append("stop")

    async def _handle_note(self, message: Note) -> None:
        self.notes.append(message.text)

    async def _handle_echo(self, message: Echo) -> str:
        return message.text.upper()

    async def _handle_explode(self, message: Explode) -> None:
        raise message.error

    async def _handle_http_ping(self, message: HTTPPing) -> str:
        return "pong"

    async def _handle_hang(self, message: Hang) -> None:
        await asyncio.Event().wait()


async def eventually(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until *predicate* holds, failing after about a second."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


@pytest.fixture
async def running():
    """Start actors' run() as tasks and cancel whatever is still running afterwards."""
    tasks: list[asyncio.Task[None]] = []

    async def start(actor: Actor) -> asyncio.Task[None]:
        task = asyncio.create_task(actor.run())
        tasks.append(task)
        await eventually(actor.ready.is_set)
        return task

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_cast_and_call_round_trip(running) -> None:
    """A cast message is handled in order and a call returns the handler's reply."""
    actor = Recorder()
    await running(actor)

    actor.cast(Note("a"))
    actor.cast(Note("b"))

    assert await actor.call(Echo("hi")) == "HI"
    assert actor.notes == ["a", "b"]
    assert actor.processed == 3


async def test_full_mailbox_raises_and_counts() -> None:
    """A full mailbox refuses cast and call with MailboxFull, counting rejections and peak."""
    actor = Recorder(mailbox_capacity=2)
    actor.cast(Note("a"))
    actor.cast(Note("b"))

    with pytest.raises(MailboxFull):
        actor.cast(Note("c"))
    with pytest.raises(MailboxFull):
        await actor.call(Echo("d"))

    actor.mailbox.get_nowait()
    assert actor.status()["mailbox"] == {"depth": 1, "peak": 2, "capacity": 2, "rejections": 2}


async def test_call_times_out_with_actor_timeout() -> None:
    """A call nobody answers raises ActorTimeout, which is also a TimeoutError."""
    actor = Recorder()

    with pytest.raises(ActorTimeout) as caught:
        await actor.call(Echo("anyone?"), timeout=0.01)

    assert isinstance(caught.value, TimeoutError)


async def test_handler_error_reaches_caller_and_crashes_actor(running) -> None:
    """A handler error crashes the actor and reaches the caller as ActorCrashed chained from it."""
    actor = Recorder()
    task = await running(actor)
    boom = ValueError("bad")

    with pytest.raises(ActorCrashed) as caught:
        await actor.call(Explode(boom))

    assert caught.value.__cause__ is boom
    await asyncio.wait({task})
    assert task.exception() is boom
    assert actor.events == ["start", "stop"]
    assert not actor.ready.is_set()


async def test_app_error_reaches_caller_as_is(running) -> None:
    """An AppError from a handler, even an ActorTimeout, reaches the caller unwrapped."""
    actor = Recorder()
    await running(actor)
    nested = ActorTimeout("inner call timed out")

    with pytest.raises(ActorTimeout) as caught:
        await actor.call(Explode(nested))

    assert caught.value is nested


async def test_dispatch_by_class_name(running) -> None:
    """A message goes to the handler named after its class, acronyms included."""
    actor = Recorder()
    await running(actor)

    assert await actor.call(HTTPPing()) == "pong"


async def test_unknown_message_crashes_actor(running) -> None:
    """A message without a handler is a programming error: the actor crashes."""
    actor = Recorder()
    task = await running(actor)

    with pytest.raises(ActorCrashed):
        await actor.call(Stranger())

    await asyncio.wait({task})
    assert isinstance(task.exception(), TypeError)


async def test_mailbox_survives_a_crash(running) -> None:
    """Messages cast while an actor is down are handled by its next incarnation."""
    actor = Recorder()
    task = await running(actor)
    actor.cast(Explode(RuntimeError("crash")))
    await asyncio.wait({task})

    actor.cast(Note("after"))
    await running(actor)
    await eventually(lambda: actor.notes == ["after"])

    assert actor.events == ["start", "stop", "start"]


async def test_cancel_runs_on_stop_and_propagates(running) -> None:
    """Cancelling run() interrupts the handler, runs on_stop and ends the task cancelled."""
    actor = Recorder()
    task = await running(actor)
    actor.cast(Hang())
    await eventually(actor.mailbox.empty)

    task.cancel()
    await asyncio.wait({task})

    assert task.cancelled()
    assert actor.events == ["start", "stop"]
    assert actor.state is ActorState.STOPPED


async def test_interrupted_call_answers_with_actor_crashed(running) -> None:
    """A caller whose handler is cancelled gets ActorCrashed instead of waiting out its timeout."""
    actor = Recorder()
    task = await running(actor)
    reply = asyncio.create_task(actor.call(Hang(), timeout=10))
    await eventually(lambda: actor.mailbox_peak == 1 and actor.mailbox.empty())

    task.cancel()

    with pytest.raises(ActorCrashed):
        await reply


async def test_finish_returns_normally(running) -> None:
    """finish() makes run() return normally after the current message, with on_stop run."""

    class OneShot(Recorder):
        async def _handle_note(self, message: Note) -> None:
            await super()._handle_note(message)
            self.finish()

    actor = OneShot()
    task = await running(actor)
    actor.cast(Note("last"))
    actor.cast(Note("never"))

    await asyncio.wait({task})

    assert task.result() is None
    assert actor.notes == ["last"]
    assert actor.events == ["start", "stop"]


async def test_ready_can_wait_for_the_actor() -> None:
    """With ready_after_start off, the actor is starting until it calls mark_ready()."""

    class Slow(Recorder):
        ready_after_start = False

    actor = Slow()
    task = asyncio.create_task(actor.run())
    await eventually(lambda: actor.events == ["start"])
    await asyncio.sleep(0)

    assert not actor.ready.is_set()
    assert actor.state is ActorState.STARTING

    actor.mark_ready()
    assert actor.state is ActorState.RUNNING
    task.cancel()
    await asyncio.wait({task})


async def test_status_snapshot(running) -> None:
    """status() reports name, state, restarts, error, mailbox, counts, uptime and extras."""
    clock = FakeClock()

    class Detailed(Recorder):
        def extra_status(self) -> dict[str, object]:
            return {"breaker": "closed"}

    actor = Detailed(clock=clock)
    assert actor.status()["uptime_seconds"] == 0.0
    await running(actor)
    await actor.call(Echo("x"))
    clock.now += 12.5
    actor.restarts = 2
    actor.record_error(Denied("no"))

    assert actor.status() == {
        "name": "recorder",
        "state": "running",
        "restarts": 2,
        "operator_restarts": 0,
        "last_error": {"type": "Denied", "message": "DENIED"},
        "mailbox": {"depth": 0, "peak": 1, "capacity": 1000, "rejections": 0},
        "processed": 1,
        "uptime_seconds": 12.5,
        "stalls": 0,
        "breaker": "closed",
    }


async def test_last_error_never_leaks_exception_text(running) -> None:
    """A crash carrying a DSN with a password shows only its type in status()."""
    actor = Recorder()
    task = await running(actor)
    actor.cast(Explode(ConnectionError(f"could not connect to {DSN}")))
    await asyncio.wait({task})

    actor.record_error(task.exception())

    assert actor.status()["last_error"] == {"type": "ConnectionError", "message": "INTERNAL_ERROR"}
    assert "s3cret-pw" not in repr(actor.status())


@given(text=st.text())
def test_describe_error_ignores_the_message(text: str) -> None:
    """describe_error() depends on the exception's type and code, never on its text."""
    assert describe_error(RuntimeError(text)) == describe_error(RuntimeError())
    assert describe_error(Denied(text)) == {"type": "Denied", "message": "DENIED"}


async def test_is_stalled_only_with_backlog_and_no_progress(running) -> None:
    """An actor is stalled only while a backlog waits longer than stall_timeout for progress."""
    clock = FakeClock()
    actor = Recorder(stall_timeout=5.0, clock=clock)
    actor.cast(Note("before start"))
    clock.now += 60
    assert not actor.is_stalled(clock())

    await running(actor)
    await eventually(lambda: actor.processed == 1)
    clock.now += 60
    assert not actor.is_stalled(clock()), "idle on an empty mailbox"

    actor.cast(Note("wakes it"))
    assert not actor.is_stalled(clock()), "a message not yet taken from idle is no backlog"
    await eventually(lambda: actor.processed == 2)
    assert actor.last_progress == clock.now, "taking work after idling counts as progress"

    actor.cast(Hang())
    actor.cast(Note("stuck behind"))
    await eventually(lambda: actor.mailbox.qsize() == 1)
    clock.now += 5.0
    assert not actor.is_stalled(clock())
    clock.now += 0.1
    assert actor.is_stalled(clock())


async def test_each_handled_message_counts_as_progress(running) -> None:
    """A backlog that is being worked through is not stalled, however long it takes in total."""
    clock = FakeClock()

    class Slow(Recorder):
        async def _handle_note(self, message: Note) -> None:
            clock.now += 4.0

    actor = Slow(stall_timeout=5.0, clock=clock)
    await running(actor)
    began = clock.now
    for message in (Note("a"), Note("b"), Hang(), Note("stuck behind")):
        actor.cast(message)
    await eventually(lambda: actor.mailbox.qsize() == 1)

    assert clock.now - began == 8.0
    assert not actor.is_stalled(clock())
    clock.now += 5.1
    assert actor.is_stalled(clock())


async def test_send_after_delivers_once(running) -> None:
    """send_after() casts its message to the actor once, after the delay."""

    class Delayed(Recorder):
        async def on_start(self) -> None:
            await super().on_start()
            self.send_after(0.01, Note("later"))

    actor = Delayed()
    await running(actor)
    assert actor.notes == []

    await eventually(lambda: actor.notes == ["later"])
    await asyncio.sleep(0.03)
    assert actor.notes == ["later"]


async def test_send_every_repeats_with_a_factory(running) -> None:
    """send_every() builds a fresh message per tick until the timer is cancelled."""
    ticks = iter(range(100))

    class Ticking(Recorder):
        async def on_start(self) -> None:
            await super().on_start()
            self.timer = self.send_every(0.005, lambda: Note(str(next(ticks))))

    actor = Ticking()
    await running(actor)
    await eventually(lambda: len(actor.notes) >= 3)

    actor.timer.cancel()
    await asyncio.sleep(0)
    seen = list(actor.notes)
    await asyncio.sleep(0.03)
    assert actor.notes == seen
    assert seen[:3] == ["0", "1", "2"]


async def test_timers_die_with_their_incarnation(running) -> None:
    """A crash cancels the incarnation's timers, so none fire into the next one."""

    class Ticking(Recorder):
        async def on_start(self) -> None:
            await super().on_start()
            self.send_every(0.005, Note("tick"))

    actor = Ticking()
    task = await running(actor)
    actor.cast(Explode(RuntimeError("crash")))
    await asyncio.wait({task})
    actor.notes.clear()

    await asyncio.sleep(0.03)

    assert actor.mailbox.empty()
    assert actor.notes == []


async def test_timer_tick_into_full_mailbox_is_counted_not_a_crash(running) -> None:
    """A timer tick refused by a full mailbox counts a rejection and the actor lives on."""

    class Ticking(Recorder):
        async def on_start(self) -> None:
            await super().on_start()
            self.send_every(0.002, Note("tick"))

    actor = Ticking(mailbox_capacity=1)
    task = await running(actor)
    while True:  # a tick may hold the one slot for a moment: Hang takes it once it frees
        try:
            actor.cast(Hang())
            break
        except MailboxFull:
            await asyncio.sleep(0)
    await eventually(lambda: actor.mailbox_rejections >= 2)

    assert not task.done()
    assert actor.mailbox.qsize() == 1


def test_timers_need_a_running_incarnation() -> None:
    """Setting a timer between incarnations is refused, since no restart would cancel it."""
    actor = Recorder()

    with pytest.raises(RuntimeError):
        actor.send_after(1.0, Note("orphan"))


@given(ops=st.lists(st.booleans(), max_size=60), capacity=st.integers(1, 8))
def test_mailbox_accounting(ops: list[bool], capacity: int) -> None:
    """For any mix of casts and takes, depth, peak and rejections add up."""
    actor = Recorder(mailbox_capacity=capacity)
    depth = peak = rejections = 0
    for is_cast in ops:
        if is_cast:
            try:
                actor.cast(Note("x"))
            except MailboxFull:
                rejections += 1
            else:
                depth += 1
                peak = max(peak, depth)
        elif depth:
            actor.mailbox.get_nowait()
            depth -= 1

    assert actor.status()["mailbox"] == {
        "depth": depth,
        "peak": peak,
        "capacity": capacity,
        "rejections": rejections,
    }


async def test_handlers_run_under_the_senders_trace_id():
    """A cast or call made inside a trace context is handled under the same trace id."""
    from dataclasses import dataclass

    from app.log import trace_context, trace_id_var

    @dataclass(frozen=True)
    class Where:
        """Asks the actor which trace id it handles under."""

    class Tracer(Actor):
        seen: list[str | None] = []

        async def _handle_where(self, message: Where) -> str | None:
            self.seen.append(trace_id_var.get())
            return trace_id_var.get()

    tracer = Tracer("tracer")
    task = asyncio.create_task(tracer.run())
    with trace_context("t-call"):
        assert await tracer.call(Where()) == "t-call"
    with trace_context("t-cast"):
        tracer.cast(Where())
    tracer.cast(Where())
    await tracer.call(Where())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert tracer.seen == ["t-call", "t-cast", None, None]


class Swallower(Actor):
    """A handler that eats the cancel aimed at it, as Python 3.11's wait_for can when the
    awaited result lands in the same loop step (aiopg's poll does exactly that)."""

    def __init__(self) -> None:
        super().__init__("swallower")
        self.entered = asyncio.Event()

    async def _handle_hang(self, message: Hang) -> None:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass


async def test_a_stop_swallowed_inside_a_handler_still_stops_the_actor(running) -> None:
    """A cancel that a handler swallowed still ends the incarnation once that message is done."""
    actor = Swallower()
    task = await running(actor)
    actor.cast(Hang())
    await actor.entered.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2)
    assert done and task.cancelled()
    assert actor.state is ActorState.STOPPED
