"""The actor runtime: a bounded mailbox, gen_server-style cast and call, lifecycle hooks, timers."""

from __future__ import annotations

import asyncio
import enum
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar

from app.errors import ActorCrashed, ActorTimeout, AppError, MailboxFull, log_error
from app.log import get_logger, trace_id_var

__all__ = ["Actor", "ActorState", "Timer", "answer", "describe_error", "is_refusal"]

log = get_logger("actor")

#: Boundaries where a CamelCase class name takes an underscore: ``HTTPPing`` -> ``http_ping``.
_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


class ActorState(enum.StrEnum):
    """Where an actor is in its life, as the dashboard and readiness probe show it."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


def describe_error(error: BaseException) -> dict[str, str]:
    """Summarize *error* safely for clients: its type name and, for an AppError, its code.

    ``str(error)`` is never used: an arbitrary exception may carry a DSN or a SQL statement.
    """
    code = error.code if isinstance(error, AppError) else AppError.code
    return {"type": type(error).__name__, "message": code}


def is_refusal(error: BaseException) -> bool:
    """Whether a handler's *error* is an expected answer rather than a crash.

    A client error (status below 500) or a recoverable service error (a database outage,
    a shutdown) is the outcome of one request; the actor's state is fine and it goes on.
    """
    return isinstance(error, AppError) and (error.status < 500 or error.recoverable)


def _handler_name(message_type: type[Any]) -> str:
    return "_handle_" + _WORD_BOUNDARY.sub("_", message_type.__name__).lower()


@dataclass(frozen=True, slots=True)
class _Call:
    """A mailbox envelope for :meth:`Actor.call`: the message and where its reply goes."""

    message: object
    reply: asyncio.Future[Any]
    trace_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Traced:
    """A cast message with the trace id of its sender, so the handler logs under it."""

    message: object
    trace_id: str


class Timer:
    """A message an actor sends itself later, once or every interval; :meth:`cancel` stops it."""

    def __init__(self, actor: Actor, delay: float, message: object, *, repeat: bool) -> None:
        self._actor = actor
        self._delay = delay
        self._message = message
        self._repeat = repeat
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(delay, self._fire)

    def cancel(self) -> None:
        """Stop the timer; a message already in the mailbox stays there."""
        self._handle.cancel()
        self._actor._timers.discard(self)

    def _fire(self) -> None:
        if self._repeat:
            self._handle = self._loop.call_later(self._delay, self._fire)
        else:
            self._actor._timers.discard(self)
        message = self._message() if callable(self._message) else self._message
        try:
            self._actor.cast(message)
        except MailboxFull:
            # Already counted in mailbox_rejections; a missed tick is no reason to crash.
            pass


class Actor:
    """A supervised unit with a bounded mailbox, handling one message at a time.

    Subclasses define one ``_handle_<message>`` coroutine per message class (``FooBar`` goes
    to ``_handle_foo_bar``) and rebuild their state in :meth:`on_start`, which runs on every
    (re)start. The mailbox belongs to the object, so it survives restarts. A handler that
    raises a refusal (see :func:`is_refusal`) answers its caller with it and goes on; any
    other exception crashes the incarnation.

    *name* identifies the actor in logs and status, *mailbox_capacity* bounds the mailbox,
    *stall_timeout* is how long a backlog may sit without progress before :meth:`is_stalled`
    says so, and *clock* (monotonic seconds) is injectable for tests.
    """

    #: Whether the actor is ready as soon as :meth:`on_start` returns; if not, it calls
    #: :meth:`mark_ready` itself when it is.
    ready_after_start: ClassVar[bool] = True

    def __init__(
        self,
        name: str,
        mailbox_capacity: int = 1000,
        stall_timeout: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: Unique name within a supervisor; shown in logs and status.
        self.name = name
        #: Seconds a non-empty mailbox may go without progress before the actor counts as stalled.
        self.stall_timeout = stall_timeout
        #: Monotonic clock in seconds.
        self.clock = clock
        #: The bounded mailbox; it outlives every incarnation.
        self.mailbox: asyncio.Queue[object] = asyncio.Queue(maxsize=mailbox_capacity)
        #: Highest mailbox depth seen.
        self.mailbox_peak = 0
        #: Messages refused because the mailbox was full.
        self.mailbox_rejections = 0
        #: Messages handled, across incarnations.
        self.processed = 0
        #: Clock reading of the last progress: a handled message, or a message after idling.
        self.last_progress = clock()
        #: Clock reading when the current incarnation started; None between incarnations.
        self.started_at: float | None = None
        #: Set once the current incarnation is ready; cleared when it ends.
        self.ready = asyncio.Event()
        #: Lifecycle state. The actor moves itself through starting, running and stopped;
        #: the supervisor sets restarting and failed, and failed sticks until it clears it.
        self.state = ActorState.STOPPED
        #: Restarts so far; written by the supervisor.
        self.restarts = 0
        #: Of those, the ones an operator asked for (not crashes); written by the supervisor.
        self.operator_restarts = 0
        #: Times a watchdog found the actor stalled; written by the supervisor.
        self.stalls = 0
        #: Safe summary of the last crash (see :func:`describe_error`), or None.
        self.last_error: dict[str, str] | None = None
        self._timers: set[Timer] = set()
        #: Background tasks of the current incarnation (see :meth:`spawn`).
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handlers: dict[type, Callable[[Any], Awaitable[Any]]] = {}
        self._waiting = False
        self._finishing = False
        #: The reply of the call being handled, until its handler defers it.
        self._caller: asyncio.Future[Any] | None = None
        self._deferred = False
        #: Deferred replies not answered yet; an ending incarnation fails them at once.
        self._unanswered: set[asyncio.Future[Any]] = set()

    async def on_start(self) -> None:
        """Build the state of a new incarnation; runs on every (re)start."""

    async def on_stop(self) -> None:
        """Release what :meth:`on_start` built; runs whenever an incarnation ends."""

    def extra_status(self) -> dict[str, Any]:
        """Subclass details for :meth:`status`, such as breaker states or pool stats."""
        return {}

    def cast(self, message: object) -> None:
        """Put *message* in the mailbox without waiting.

        Raises :class:`~app.errors.MailboxFull` when the mailbox is at capacity.
        """
        trace_id = trace_id_var.get()
        self._put(_Traced(message, trace_id) if trace_id else message)

    async def call(self, message: object, timeout: float = 5.0) -> Any:  # noqa: ASYNC109 (gen_server call/2)
        """Send *message* and return the handler's reply, waiting at most *timeout* seconds.

        Raises :class:`~app.errors.MailboxFull` when the mailbox is at capacity and
        :class:`~app.errors.ActorTimeout` when no reply comes in time. If the handler raises,
        the actor crashes and the caller gets the error: an AppError as is, anything else as
        :class:`~app.errors.ActorCrashed` chained from it.
        """
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._put(_Call(message, reply, trace_id_var.get()))
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await reply
        except TimeoutError as exc:
            if not scope.expired():
                raise  # The handler's own TimeoutError, not ours.
            raise ActorTimeout(
                f"{self.name} did not answer {type(message).__name__} within {timeout}s"
            ) from exc

    def defer_reply(self) -> asyncio.Future[Any]:
        """In the handler of a :meth:`call`: answer later, like gen_server's ``noreply``.

        Returns the future the caller awaits; the handler's own return value is then
        ignored. Whoever holds it answers with :func:`answer`. When the incarnation ends
        first, the caller gets `ActorCrashed` then, not an `ActorTimeout` at its deadline.
        """
        reply = self._caller
        if reply is None:
            raise RuntimeError(f"{self.name}: only the handler of a call can defer its reply")
        self._deferred = True
        self._unanswered.add(reply)
        reply.add_done_callback(self._unanswered.discard)
        return reply

    def send_after(self, delay: float, message: object) -> Timer:
        """Cast *message* to this actor after *delay* seconds.

        The timer belongs to the current incarnation and is cancelled when it ends; setting
        one between incarnations raises RuntimeError.
        """
        return self._add_timer(delay, message, repeat=False)

    def send_every(self, interval: float, message: object) -> Timer:
        """Cast *message* to this actor every *interval* seconds, first after one interval.

        *message* may be a callable (such as a message class) that builds each tick's message.
        The timer belongs to the current incarnation and is cancelled when it ends.
        """
        return self._add_timer(interval, message, repeat=True)

    def spawn(self, work: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """Run *work* as a background task of this incarnation, named *name*.

        The actor owns it: it is cancelled and awaited when the incarnation ends, and a
        failure is logged through the JSON log rather than left for the event loop to
        print. Results should come back as messages to the mailbox (STYLE 12a).
        """
        if self.started_at is None:
            work.close()
            raise RuntimeError(f"{self.name} spawns tasks only while it runs")
        task = asyncio.create_task(work, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.bind(actor=self.name, task=task.get_name(), error=type(error).__name__).opt(
                exception=error
            ).error("background task failed")

    def mark_ready(self) -> None:
        """Tell the supervisor this incarnation is ready to serve."""
        if self.state is not ActorState.FAILED:
            self.state = ActorState.RUNNING
        self.ready.set()

    def finish(self) -> None:
        """Make :meth:`run` return normally once the current message is handled."""
        self._finishing = True

    def record_error(self, error: BaseException) -> None:
        """Keep a safe summary of *error* as :attr:`last_error`."""
        self.last_error = describe_error(error)

    def is_stalled(self, now: float) -> bool:
        """Whether a backlog has waited more than :attr:`stall_timeout` without progress at *now*.

        An actor idling on an empty mailbox, or between incarnations, is never stalled.
        """
        return (
            self.started_at is not None
            and not self._waiting
            and self.mailbox.qsize() > 0
            and now - self.last_progress > self.stall_timeout
        )

    def status(self) -> dict[str, Any]:
        """A snapshot for the dashboard and health checks; safe to show to operators."""
        uptime = 0.0 if self.started_at is None else round(self.clock() - self.started_at, 3)
        return {
            "name": self.name,
            "state": self.state.value,
            "restarts": self.restarts,
            "operator_restarts": self.operator_restarts,
            "last_error": self.last_error,
            "mailbox": {
                "depth": self.mailbox.qsize(),
                "peak": self.mailbox_peak,
                "capacity": self.mailbox.maxsize,
                "rejections": self.mailbox_rejections,
            },
            "processed": self.processed,
            "uptime_seconds": uptime,
            "stalls": self.stalls,
            **self.extra_status(),
        }

    async def run(self) -> None:
        """Run one incarnation: start, handle messages until finished, then stop.

        A crash is an exception escaping this coroutine; stopping is cancelling it.
        :meth:`on_stop` runs either way.
        """
        self.started_at = self.clock()
        self.last_progress = self.started_at
        self._finishing = False
        if self.state is not ActorState.FAILED:
            self.state = ActorState.STARTING
        try:
            await self.on_start()
            if self.ready_after_start:
                self.mark_ready()
            task = asyncio.current_task()
            while not self._finishing:
                item = await self._next()
                await self._dispatch(item)
                self.processed += 1
                self.last_progress = self.clock()
                if task is not None and task.cancelling():
                    # Python 3.11's wait_for (inside aiopg) can swallow a cancel that lands
                    # with its result; the request to stop still stands.
                    raise asyncio.CancelledError()
        finally:
            for reply in list(self._unanswered):
                answer(reply, ActorCrashed(f"{self.name} stopped before answering"))
            self.ready.clear()
            self.started_at = None
            for timer in list(self._timers):
                timer.cancel()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if self.state is not ActorState.FAILED:
                self.state = ActorState.STOPPED
            await self.on_stop()

    def _put(self, item: object) -> None:
        try:
            self.mailbox.put_nowait(item)
        except asyncio.QueueFull:
            self.mailbox_rejections += 1
            raise MailboxFull(
                f"{self.name} mailbox is full ({self.mailbox.maxsize} messages)"
            ) from None
        self.mailbox_peak = max(self.mailbox_peak, self.mailbox.qsize())

    def _add_timer(self, delay: float, message: object, *, repeat: bool) -> Timer:
        if self.started_at is None:
            # A timer outside an incarnation would outlive the restart meant to reset it.
            raise RuntimeError(f"{self.name} sets timers only while it runs (e.g. in on_start)")
        timer = Timer(self, delay, message, repeat=repeat)
        self._timers.add(timer)
        return timer

    async def _next(self) -> object:
        if not self.mailbox.empty():
            return self.mailbox.get_nowait()
        self._waiting = True
        try:
            item = await self.mailbox.get()
        finally:
            self._waiting = False
        # Time spent idle is not a stall: the clock starts when there is work again.
        self.last_progress = self.clock()
        return item

    async def _dispatch(self, item: object) -> None:
        # The handler, and any task it starts, logs under the sender's trace id.
        trace_id = item.trace_id if isinstance(item, _Call | _Traced) else None
        token = trace_id_var.set(trace_id)
        try:
            await self._dispatch_traced(item.message if isinstance(item, _Traced) else item)
        finally:
            trace_id_var.reset(token)

    async def _dispatch_traced(self, item: object) -> None:
        if not isinstance(item, _Call):
            try:
                await self._handler_for(item)(item)
            except Exception as exc:
                if not is_refusal(exc):
                    raise
                log_error(exc, component=self.name, kind=type(item).__name__)
            return
        self._caller, self._deferred = item.reply, False
        try:
            result = await self._handler_for(item.message)(item.message)
        except asyncio.CancelledError:
            if not item.reply.done():
                item.reply.set_exception(ActorCrashed(f"{self.name} was interrupted"))
            raise
        except Exception as exc:
            if not item.reply.done():
                item.reply.set_exception(exc if isinstance(exc, AppError) else _crashed(self, exc))
            if is_refusal(exc):
                return  # answered; the actor's state is intact
            raise
        finally:
            self._caller = None
        if not self._deferred and not item.reply.done():
            item.reply.set_result(result)

    def _handler_for(self, message: object) -> Callable[[Any], Awaitable[Any]]:
        message_type: type[Any] = type(message)
        handler = self._handlers.get(message_type)
        if handler is None:
            handler = getattr(self, _handler_name(message_type), None)
            if handler is None:
                raise TypeError(f"{type(self).__name__} has no {_handler_name(message_type)}")
            self._handlers[message_type] = handler
        return handler


def answer(reply: asyncio.Future[Any], outcome: Any) -> None:
    """Answer a deferred *reply* (see :meth:`Actor.defer_reply`) with *outcome*: a result,
    or an exception to raise in the caller. A caller that gave up is skipped."""
    if reply.done():
        return
    if isinstance(outcome, BaseException):
        reply.set_exception(outcome)
    else:
        reply.set_result(outcome)


def _crashed(actor: Actor, error: Exception) -> ActorCrashed:
    crashed = ActorCrashed(f"{actor.name} crashed ({type(error).__name__})")
    crashed.__cause__ = error
    return crashed
