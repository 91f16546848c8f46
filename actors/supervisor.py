"""The one-for-one supervisor: starts actors in order, restarts them with backoff, stops them."""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from actors.base import Actor, ActorState
from app.errors import ActorError, ActorRestarted, ActorStalled, ActorTimeout
from app.log import get_logger
from app.resilience import Backoff

__all__ = [
    "DEFAULT_BACKOFF",
    "ChildSpec",
    "Restart",
    "RestartIntensity",
    "Supervisor",
]

log = get_logger("supervisor")

#: Restart delays unless told otherwise: 1 s doubling to 30 s, with 10 % jitter.
DEFAULT_BACKOFF = Backoff(initial=1.0, base=2.0, max_delay=30.0, jitter=0.1)
#: Seconds a child cancelled hard after the shutdown deadline gets to finish.
_HARD_CANCEL_GRACE = 1.0


class Restart(enum.StrEnum):
    """When a child is restarted, in OTP terms."""

    #: Always, whether it crashed or returned.
    PERMANENT = "permanent"
    #: Only after a crash, not after a normal return.
    TRANSIENT = "transient"
    #: Never.
    TEMPORARY = "temporary"


@dataclass
class ChildSpec:
    """How the supervisor runs one actor."""

    #: The supervised actor.
    actor: Actor
    #: When it is restarted.
    restart: Restart = Restart.PERMANENT
    #: Seconds each incarnation may take to become ready before it counts as crashed.
    start_timeout: float = 10.0


class RestartIntensity:
    """OTP's restart intensity: at most *intensity* restarts within any *period* seconds."""

    def __init__(self, intensity: int, period: float) -> None:
        #: Restarts allowed within a period.
        self.intensity = intensity
        #: Length of the sliding window in seconds.
        self.period = period
        # Only the latest intensity + 1 restarts can tell whether the limit is exceeded.
        self._times: deque[float] = deque(maxlen=intensity + 1)

    def record(self, now: float) -> bool:
        """Note a restart at clock reading *now*; return whether the limit is now exceeded."""
        self._times.append(now)
        while self._times[0] <= now - self.period:
            self._times.popleft()
        return len(self._times) > self.intensity

    def reset(self) -> None:
        """Forget past restarts, after the child proved stable."""
        self._times.clear()


@dataclass(eq=False)
class _Child:
    spec: ChildSpec
    intensity: RestartIntensity
    #: The restart loop.
    task: asyncio.Task[None] | None = None
    #: Consecutive restarts since the child was last stable; the backoff attempt.
    attempt: int = 0
    #: Supervisor clock reading when the latest incarnation started.
    started_at: float = 0.0
    #: Counts incarnations, so a late start-timeout check can tell it is stale.
    incarnation: int = 0
    #: Why the supervisor is cancelling the running incarnation, if it is.
    interrupt: ActorError | None = None
    #: Set whenever an incarnation ends, so start() stops waiting for a broken child.
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    #: Whether the child ended for good by design (transient returned, temporary exited).
    done: bool = False
    #: Set by an operator's restart to cut a restart delay short.
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def actor(self) -> Actor:
        return self.spec.actor


class Supervisor:
    """Run *children* one-for-one: each crash restarts only the actor that crashed.

    *children* are actors or :class:`ChildSpec` (a bare actor is permanent); names must be
    unique. More than *intensity* restarts within *period* seconds mark a child failed: the
    supervisor turns not-ready and keeps retrying at the backoff's maximum delay until the
    child runs *stable_after* seconds without crashing. *backoff* spaces restarts, and the
    attempt counter resets once a child is stable. :meth:`stop` takes at most about
    *shutdown_timeout* seconds. Every *watchdog_interval* seconds the watchdog restarts stalled
    children. *clock*, *sleep* (used for restart delays) and *rng* (for jitter) are
    injectable for tests.
    """

    def __init__(
        self,
        children: Sequence[ChildSpec | Actor],
        *,
        intensity: int = 5,
        period: float = 60.0,
        backoff: Backoff = DEFAULT_BACKOFF,
        stable_after: float = 60.0,
        shutdown_timeout: float = 10.0,
        watchdog_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        specs = [c if isinstance(c, ChildSpec) else ChildSpec(c) for c in children]
        names = [spec.actor.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"actor names must be unique: {names}")
        #: Seconds after which a child that has not crashed counts as stable.
        self.stable_after = stable_after
        #: Total seconds :meth:`stop` grants the children before cancelling them hard.
        self.shutdown_timeout = shutdown_timeout
        #: Seconds between watchdog passes.
        self.watchdog_interval = watchdog_interval
        #: The restart delays.
        self.backoff = backoff
        self._children = [_Child(spec, RestartIntensity(intensity, period)) for spec in specs]
        self._by_name = {child.actor.name: child for child in self._children}
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def supervising(self) -> bool:
        """Whether the watchdog runs: the supervisor started and is not stopping."""
        return self._watchdog is not None and not self._watchdog.done() and not self._stopping

    @property
    def ready(self) -> bool:
        """Whether every non-temporary child runs and is ready, so none has failed.

        A transient child that returned normally counts as fine.
        """
        return all(
            child.done or (child.actor.state is ActorState.RUNNING and child.actor.ready.is_set())
            for child in self._children
            if child.spec.restart is not Restart.TEMPORARY
        )

    def statuses(self) -> list[dict[str, object]]:
        """Status snapshots of the children, in start order."""
        return [child.actor.status() for child in self._children]

    def get(self, name: str) -> Actor:
        """The child actor called *name*; raises KeyError for an unknown name."""
        return self._by_name[name].actor

    def find(self, name: str) -> Actor | None:
        """The child actor called *name*, or None when this instance runs none."""
        child = self._by_name.get(name)
        return None if child is None else child.actor

    def restart(self, name: str) -> bool:
        """Restart the child called *name* now, because an operator asked to.

        A running child's incarnation is cancelled (its ``on_stop`` runs, waiting callers get
        a 503) and a new one starts at once; a child waiting out a restart delay, even a
        failed one, starts at once with its intensity forgiven. It counts as a restart but
        not as a crash. Returns False while stopping or for a child that ended by design;
        raises KeyError for an unknown name.
        """
        child = self._by_name[name]
        if self._stopping or child.task is None or child.done:
            return False
        child.wake.set()
        if child.actor.started_at is not None and child.interrupt is None:
            self._interrupt(child, ActorRestarted(f"{name} restarted by an operator"))
        return True

    async def start(self) -> None:
        """Start the children in order, each once the previous is ready.

        A child that crashes or does not get ready in its ``start_timeout`` is logged and
        left to its restart loop; start() then moves on to the next child.
        """
        if self._watchdog is not None:
            raise RuntimeError("supervisor already started")
        self._watchdog = asyncio.create_task(self._watch(), name="supervisor-watchdog")
        for child in self._children:
            if self._stopping:
                return
            child.task = asyncio.create_task(
                self._supervise(child), name=f"supervise-{child.actor.name}"
            )
            if await self._wait_started(child):
                log.bind(actor=child.actor.name).info("Actor started")
            else:
                log.bind(actor=child.actor.name).warning(
                    "Actor did not start; continuing with the next one"
                )

    async def stop(self) -> None:
        """Stop the children in reverse start order within ``shutdown_timeout`` seconds.

        Each child's ``on_stop`` runs; a child still running at the deadline is cancelled
        hard. Cleanup failures are logged together. Safe to call after a partial start.
        """
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        if self._watchdog is not None:
            self._watchdog.cancel()
        pending = [
            (child.actor, child.task)
            for child in reversed(self._children)
            if child.task is not None
        ]
        failures: list[Exception] = []
        try:
            while pending:
                failure = await self._stop_child(*pending[0], deadline)
                pending.pop(0)
                if failure is not None:
                    failures.append(failure)
        except asyncio.CancelledError:
            # Our caller gave up on a graceful stop; leave nothing running behind it.
            for _, task in pending:
                task.cancel()
            raise
        if self._watchdog is not None:
            await asyncio.wait({self._watchdog})
        if failures:
            log.opt(exception=ExceptionGroup("actor cleanup failed", failures)).bind(
                failures=len(failures)
            ).error("Actors failed to clean up")

    def watchdog_pass(self) -> None:
        """Check every child once: restart stalled ones, forgive stable ones.

        The watchdog task calls this every ``watchdog_interval`` seconds.
        """
        now = self._clock()
        for child in self._children:
            actor = child.actor
            if actor.started_at is None or child.interrupt is not None or self._stopping:
                continue
            if actor.is_stalled(now):
                actor.stalls += 1
                log.bind(
                    actor=actor.name,
                    mailbox_depth=actor.mailbox.qsize(),
                    stalled_seconds=round(now - actor.last_progress, 3),
                ).error("Actor stalled; restarting it")
                self._interrupt(child, ActorStalled(f"{actor.name} stalled"))
            elif (
                (child.attempt or actor.state is ActorState.FAILED)
                and actor.ready.is_set()
                and now - child.started_at >= self.stable_after
            ):
                self._forgive(child)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watchdog_interval)
            try:
                self.watchdog_pass()
            except Exception:
                # A broken is_stalled() override must not blind the watchdog for everyone.
                log.exception("Watchdog pass failed")

    async def _wait_started(self, child: _Child) -> bool:
        ready = asyncio.create_task(child.actor.ready.wait())
        exited = asyncio.create_task(child.exited.wait())
        try:
            await asyncio.wait(
                {ready, exited},
                timeout=child.spec.start_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            ready.cancel()
            exited.cancel()
        return child.actor.ready.is_set()

    async def _supervise(self, child: _Child) -> None:
        while True:
            error = await self._run_incarnation(child)
            if self._stopping:
                return
            actor = child.actor
            if isinstance(error, ActorRestarted):
                self._restart_now(child)
                continue
            if error is not None:
                actor.record_error(error)
            if not self._should_restart(child.spec.restart, error):
                child.done = True
                actor.state = ActorState.STOPPED
                log.bind(
                    actor=actor.name,
                    restart=child.spec.restart.value,
                    error=None if error is None else type(error).__name__,
                ).info("Actor exited; not restarting it")
                return
            await self._wait_or_wake(child, self._plan_restart(child, error))

    def _restart_now(self, child: _Child) -> None:
        """Count an operator's restart of a running child: logged, no backoff, forgiven."""
        child.wake.clear()
        self._forgive(child)
        child.actor.restarts += 1
        child.actor.operator_restarts += 1
        child.actor.state = ActorState.RESTARTING
        log.bind(actor=child.actor.name).warning("Actor restarted by an operator")

    async def _wait_or_wake(self, child: _Child, delay: float) -> None:
        """Sleep *delay* seconds, or less if an operator restarts the child meanwhile."""
        if not child.wake.is_set():
            sleep = asyncio.ensure_future(self._sleep(delay))
            woken = asyncio.ensure_future(child.wake.wait())
            try:
                await asyncio.wait({sleep, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleep.cancel()
                woken.cancel()
        if child.wake.is_set():
            child.wake.clear()
            self._forgive(child)
            log.bind(actor=child.actor.name).warning("Actor restart delay cut short by an operator")

    async def _run_incarnation(self, child: _Child) -> BaseException | None:
        """Run the actor once; return the crash error, or None when it returned normally."""
        child.incarnation += 1
        child.started_at = self._clock()
        check = asyncio.get_running_loop().call_later(
            child.spec.start_timeout, self._check_started, child, child.incarnation
        )
        error: BaseException | None = None
        try:
            await child.actor.run()
        except asyncio.CancelledError:
            if child.interrupt is None or self._stopping:
                raise
        except Exception as exc:
            if self._stopping:
                raise
            error = exc
        finally:
            check.cancel()
            child.exited.set()
        if child.interrupt is not None:
            # We cancelled the incarnation ourselves; the restart loop itself goes on.
            current = asyncio.current_task()
            assert current is not None  # we run inside the restart loop's task
            current.uncancel()
            error, child.interrupt = child.interrupt, None
        return error

    def _check_started(self, child: _Child, incarnation: int) -> None:
        actor = child.actor
        if (
            child.incarnation == incarnation
            and actor.started_at is not None
            and not actor.ready.is_set()
            and child.interrupt is None
            and not self._stopping
        ):
            timeout = child.spec.start_timeout
            log.bind(actor=actor.name, start_timeout=timeout).error("Actor did not get ready")
            self._interrupt(child, ActorTimeout(f"{actor.name} not ready within {timeout}s"))

    def _interrupt(self, child: _Child, reason: ActorError) -> None:
        if child.task is not None:
            child.interrupt = reason
            child.task.cancel()

    @staticmethod
    def _should_restart(restart: Restart, error: BaseException | None) -> bool:
        if restart is Restart.PERMANENT:
            return True
        return restart is Restart.TRANSIENT and error is not None

    def _plan_restart(self, child: _Child, error: BaseException | None) -> float:
        """Count a restart of *child* and return how long to wait before it."""
        actor = child.actor
        now = self._clock()
        if now - child.started_at >= self.stable_after:
            self._forgive(child)
        child.attempt += 1
        actor.restarts += 1
        exceeded = child.intensity.record(now)
        if exceeded or actor.state is ActorState.FAILED:
            if actor.state is not ActorState.FAILED:
                log.bind(
                    actor=actor.name,
                    intensity=child.intensity.intensity,
                    period=child.intensity.period,
                ).error("Restart intensity exceeded; actor failed")
            actor.state = ActorState.FAILED
            delay = self.backoff.max_delay
            level = "ERROR"
        else:
            actor.state = ActorState.RESTARTING
            delay = self.backoff.delay(child.attempt, self._rng)
            level = "WARNING" if error is not None else "INFO"
        log.opt(exception=error).bind(
            actor=actor.name,
            retry_count=child.attempt,
            error=None if error is None else type(error).__name__,
            delay=round(delay, 3),
        ).log(
            level,
            "Actor crashed; restarting" if error is not None else "Actor returned; restarting",
        )
        return delay

    def _forgive(self, child: _Child) -> None:
        """Reset the backoff and intensity of a child that ran stably."""
        child.attempt = 0
        child.intensity.reset()
        actor = child.actor
        if actor.state is ActorState.FAILED:
            actor.state = ActorState.RUNNING if actor.ready.is_set() else ActorState.STARTING
            log.bind(actor=actor.name).info("Actor recovered")

    async def _stop_child(
        self, actor: Actor, task: asyncio.Task[None], deadline: float
    ) -> Exception | None:
        """Stop one child's restart loop *task*; return its cleanup failure, if any."""
        loop = asyncio.get_running_loop()
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
        if not task.done():
            log.bind(actor=actor.name).error("Actor did not stop in time; cancelling it hard")
            task.cancel()
            await asyncio.wait({task}, timeout=_HARD_CANCEL_GRACE)
        actor.state = ActorState.STOPPED
        if not task.done():
            log.bind(actor=actor.name).error("Actor ignored cancellation; abandoning it")
            return None
        if task.cancelled():
            return None
        error = task.exception()
        return error if isinstance(error, Exception) else None
