"""RoomWriter: stores the publishes of its share of the rooms, in order, and sends them out."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from actors.base import Actor, answer
from app import metrics
from app.crypto import DecryptError, MessageCipher
from app.errors import (
    AppError,
    DatabaseError,
    DatabaseRejected,
    DatabaseTimeout,
    MailboxFull,
    NotFound,
    ServerShutdown,
    SpoolFull,
    ValidationError,
)
from app.log import get_logger, trace_context
from app.models import Message
from app.resilience import Backoff
from app.spool import Spool, SpoolEntry, open_record, seal_record
from app.store import Store

log = get_logger("room_writer")

#: Least time worth trying PostgreSQL with; with less left a publish goes to the spool.
MIN_ATTEMPT_SECONDS = 0.2
#: Time kept back from a publish's deadline to spool it if the insert fails.
SPOOL_RESERVE_SECONDS = 0.1
#: Most publishes of one room stored by one statement.
MAX_BATCH = 200


def shard_of(room: str, shards: int) -> int:
    """Which of *shards* writers owns *room*: stable across processes and restarts."""
    return zlib.crc32(room.encode()) % shards


class Outlet:
    """The one place stored (or spooled) messages leave the writers.

    Fan-out (the hub) and any later consumer (the Redis bridge) subscribe here, never in
    the writer's code. Each emit is one room's messages in seq order (a batch stored by one
    statement, or a single message). Consumers must not block: they cast to their own
    mailbox.
    """

    def __init__(self) -> None:
        self._consumers: list[Callable[[tuple[Message, ...]], None]] = []

    def subscribe(self, consumer: Callable[[tuple[Message, ...]], None]) -> None:
        """Have *consumer* see every batch emitted from now on."""
        self._consumers.append(consumer)

    def emit(self, messages: tuple[Message, ...]) -> None:
        """Hand *messages* to every consumer; one consumer's failure never stops the others."""
        if not messages:
            return
        metrics.MESSAGES_OUT.inc(len(messages))
        first = messages[0]
        for consumer in self._consumers:
            try:
                consumer(messages)
            except MailboxFull:
                # Its receivers repair the gap from the store on the room's next message.
                log.bind(
                    id=first.id, topic=f"room:{first.room}", seq=first.seq, count=len(messages)
                ).error("outlet consumer full; messages not routed")
            except Exception as exc:
                log.bind(id=first.id, error=type(exc).__name__).opt(exception=exc).error(
                    "outlet consumer failed"
                )


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What the client is told: stored with a seq (200) or spooled (202)."""

    message: Message
    queued: bool
    #: True when the same message was accepted before.
    repeat: bool = False

    @property
    def reply(self) -> dict[str, Any]:
        """The ``params`` of the acknowledgement."""
        if self.queued:
            return {"id": self.message.id, "queued": True}
        return {"id": self.message.id, "seq": self.message.seq}


# -- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """Store *message* (access already checked); answer by monotonic time *deadline*."""

    message: Message
    deadline: float


@dataclass(slots=True)
class _Waiting:
    """A publish waiting for its room's batch, with every caller to answer: a retry of the
    same message while the first is on its way gets the same answer, as a repeat."""

    message: Message
    deadline: float
    replies: list[asyncio.Future[Any]]


@dataclass(frozen=True, slots=True)
class Committed:
    """How storing *room*'s *batch* went: an outcome per message, or the error of the whole."""

    room: str
    batch: tuple[_Waiting, ...]
    outcome: list[tuple[Message, bool] | AppError] | AppError


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A drain outcome: the spooled message can never be stored, for *reason*."""

    reason: str


@dataclass(frozen=True, slots=True)
class Drained:
    """How storing *room*'s spooled *entry* went: the stored message (new or found again),
    a `DeadLetter`, or the `DatabaseError` to retry after."""

    room: str
    entry: SpoolEntry
    outcome: Message | DeadLetter | DatabaseError


@dataclass(frozen=True, slots=True)
class DrainTick:
    """Time to look for rooms whose spooled messages can be stored now."""


@dataclass(frozen=True, slots=True)
class StopAccepting:
    """Shutdown: publishes from now on are refused; those before it are answered first."""


# -- the actor --------------------------------------------------------------------------------


class RoomWriter(Actor):
    """Stores publishes for the rooms with ``shard_of(room) == index``.

    One writer per shard keeps each room's order without locks. Each room has at most one
    insert on its way; the publishes that arrive meanwhile wait and then go together in one
    statement (group commit), each acknowledged only after the commit. A room with spooled
    messages queues new ones behind them in the spool; other rooms are not affected.
    While PostgreSQL answers, a publish is stored (200); when it does not within the
    publish's deadline, or is known to be away, the publish is spooled (202). Spooled
    messages are stored in order once the database answers again. Every stored message,
    new or found again on a retry, goes to *outlet*, whose consumers drop what they have.

    *store* runs the SQL, *spool* is the shared durable spool, *database_usable* tells
    whether the DbMonitor last found PostgreSQL answering after the given monotonic time
    (the writer's suspicion), *ask_for_ping* asks it to check now. *drain_backoff* spaces
    retries of a room whose drain failed.
    """

    def __init__(
        self,
        index: int,
        shards: int,
        store: Store,
        spool: Spool,
        outlet: Outlet,
        *,
        database_usable: Callable[[float | None], bool],
        ask_for_ping: Callable[[], None] = lambda: None,
        drain_interval: float = 1.0,
        drain_backoff: Backoff = Backoff(initial=1.0, max_delay=30.0, jitter=0.1),
        **actor_options: Any,
    ) -> None:
        super().__init__(f"room_writer.{index}", **actor_options)
        self.index = index
        self.shards = shards
        self.store = store
        self.spool = spool
        self.outlet = outlet
        self.database_usable = database_usable
        self.ask_for_ping = ask_for_ping
        self.drain_interval = drain_interval
        self.drain_backoff = drain_backoff
        self.accepting = True
        #: room -> its spooled entries, oldest first: the room's order while they wait.
        self.pending: dict[str, deque[SpoolEntry]] = {}
        #: (sender, client_msg_id) -> id of the spooled message, so a retried publish gets
        #: the first answer again.
        self.spooled_ids: dict[tuple[str, str], str] = {}
        #: Monotonic time PostgreSQL last failed us; cleared once a ping succeeds after it.
        self.suspect_since: float | None = None
        #: room -> (failed drain attempts, monotonic time of the next try).
        self.drain_retry: dict[str, tuple[int, float]] = {}
        #: room -> number of the spool entry whose drain task is running.
        self.draining: dict[str, int] = {}
        #: room -> publishes waiting for the room's next batch, oldest first.
        self.waiting: dict[str, list[_Waiting]] = {}
        #: room -> the batch being stored now.
        self.committing: dict[str, tuple[_Waiting, ...]] = {}
        #: (sender, client_msg_id) -> its waiting or committing publish.
        self.in_progress: dict[tuple[str, str], _Waiting] = {}
        self.stored = self.spooled = self.dead_letters = 0
        #: Insert statements sent: fewer than `stored` when publishes went together.
        self.batches = 0

    @property
    def cipher(self) -> MessageCipher | None:
        """The store's cipher, which also seals spooled content."""
        return self.store.cipher

    async def on_start(self) -> None:
        # The spool is the truth after a crash or a restart: rebuild this shard's queues.
        self.pending, self.spooled_ids, self.drain_retry, self.draining = {}, {}, {}, {}
        self.waiting, self.committing, self.in_progress = {}, {}, {}
        for entry in await self.spool.pending():
            room = str(entry.record.get("room", ""))
            if shard_of(room, self.shards) != self.index:
                continue
            self.pending.setdefault(room, deque()).append(entry)
            key = (str(entry.record.get("sender")), str(entry.record.get("client_msg_id")))
            self.spooled_ids[key] = str(entry.record.get("id"))
        self.send_every(self.drain_interval, DrainTick())
        if self.pending:
            self.cast(DrainTick())

    def extra_status(self) -> dict[str, Any]:
        return {
            "shard": self.index,
            "rooms_waiting": len(self.pending),
            "spooled_waiting": sum(len(queue) for queue in self.pending.values()),
            "publishes_in_progress": len(self.in_progress),
            "stored": self.stored,
            "batches": self.batches,
            "spooled": self.spooled,
            "dead_letters": self.dead_letters,
            "suspect": self.suspect_since is not None,
        }

    # -- publishing ----------------------------------------------------------------------------

    async def _handle_publish(self, request: Publish) -> PublishResult | None:
        if not self.accepting:
            raise ServerShutdown(retry_after=5)
        message = request.message
        room = message.room
        if room in self.pending:
            return await self._spool(message, "room has spooled messages")
        key = (message.sender, message.client_msg_id)
        same = self.in_progress.get(key)
        if same is not None:
            same.replies.append(self.defer_reply())
            return None
        publish = _Waiting(message, request.deadline, [self.defer_reply()])
        self.in_progress[key] = publish
        self.waiting.setdefault(room, []).append(publish)
        if room not in self.committing:
            await self._commit_next(room)
        return None

    async def _commit_next(self, room: str) -> None:
        """Start storing *room*'s waiting publishes as one batch, or spool them in order."""
        waiting = self.waiting.pop(room, None)
        if not waiting:
            return
        if len(waiting) > MAX_BATCH:
            self.waiting[room] = waiting[MAX_BATCH:]
            waiting = waiting[:MAX_BATCH]
        batch = tuple(waiting)
        remaining = min(publish.deadline for publish in batch) - time.monotonic()
        if room in self.pending:
            reason = "room has spooled messages"
        elif not self._usable():
            reason = "database unavailable"
        elif remaining < MIN_ATTEMPT_SECONDS:
            reason = "no time left for the database"
        else:
            self.committing[room] = batch
            self.batches += 1
            timeout = min(self.store.timeout, remaining - SPOOL_RESERVE_SECONDS)
            self.spawn(self._store_batch(room, batch, timeout), name=f"commit-{room}")
            return
        await self._spool_batch(batch, reason)
        await self._commit_next(room)  # what waited behind it follows into the spool

    async def _store_batch(self, room: str, batch: tuple[_Waiting, ...], timeout: float) -> None:
        # Touches no state: the handler of Committed applies the outcome.
        outcome: list[tuple[Message, bool] | AppError] | AppError
        try:
            outcome = list(
                await self.store.insert_messages(
                    room, [publish.message for publish in batch], timeout=timeout
                )
            )
        except AppError as exc:
            outcome = exc
        await self._report(Committed(room, batch, outcome))

    async def _report(self, outcome: object) -> None:
        """Cast the outcome of a background store to the mailbox; it must arrive, or the
        room stays stuck."""
        while True:
            try:
                self.cast(outcome)
                return
            except MailboxFull:
                await asyncio.sleep(0.05)

    async def _handle_committed(self, message: Committed) -> None:
        room, batch, outcome = message.room, message.batch, message.outcome
        if self.committing.get(room) is not batch:
            return  # from an earlier incarnation
        del self.committing[room]
        if isinstance(outcome, DatabaseError):
            # A timeout may still commit: the spooled copy then finds the row on drain
            # (a repeat) and sends it out then, so nobody misses it.
            self._failed(outcome)
            await self._spool_batch(batch, type(outcome).__name__)
        elif isinstance(outcome, AppError):
            for publish in batch:
                self._settle(publish, outcome)
        else:
            answers: list[PublishResult | AppError] = []
            for publish, result in zip(batch, outcome, strict=True):
                if isinstance(result, AppError):
                    answers.append(self._refused(publish.message, result))
                    continue
                stored, created = result
                self.stored += created
                metrics.PUBLISHES.labels("stored" if created else "repeated").inc()
                answers.append(PublishResult(stored, queued=False, repeat=not created))
            # Out before the acks, in seq order (repeats too: a commit that was never
            # sent out is sent now; receivers drop what they have).
            self.outlet.emit(tuple(a.message for a in answers if isinstance(a, PublishResult)))
            for publish, reply in zip(batch, answers, strict=True):
                self._settle(publish, reply)
        await self._commit_next(room)

    def _refused(self, message: Message, error: AppError) -> AppError:
        if isinstance(error, DatabaseRejected):
            # Validation should have refused it at the door; this is logged as the bug it is.
            log.bind(id=message.id, error=error.detail).error(
                "PostgreSQL refused a validated message"
            )
            metrics.PUBLISHES.labels("refused").inc()
            return ValidationError(text="content cannot be stored")
        return error

    def _settle(self, publish: _Waiting, outcome: PublishResult | AppError) -> None:
        """Answer every caller of *publish*; the retries among them hear a repeat."""
        key = (publish.message.sender, publish.message.client_msg_id)
        if self.in_progress.get(key) is publish:
            del self.in_progress[key]
        first, *retries = publish.replies
        answer(first, outcome)
        for reply in retries:
            if isinstance(outcome, PublishResult):
                answer(reply, replace(outcome, repeat=True))
            else:
                answer(reply, outcome)

    async def _spool_batch(self, batch: tuple[_Waiting, ...], reason: str) -> None:
        for publish in batch:
            try:
                result: PublishResult | AppError = await self._spool(publish.message, reason)
            except AppError as exc:
                result = exc
            self._settle(publish, result)

    async def _spool(self, message: Message, reason: str) -> PublishResult:
        key = (message.sender, message.client_msg_id)
        first = self.spooled_ids.get(key)
        if first is not None:
            metrics.PUBLISHES.labels("repeated").inc()
            return PublishResult(replace(message, id=first), queued=True, repeat=True)
        try:
            entry = await self.spool.append(self._seal(message))
        except OSError as exc:
            # A full or failing disk: refuse the publish rather than acknowledge a loss.
            log.bind(error=type(exc).__name__, errno=exc.errno).error("spool write failed")
            metrics.PUBLISHES.labels("refused").inc()
            raise SpoolFull("spool write failed") from exc
        except SpoolFull:
            metrics.PUBLISHES.labels("refused").inc()
            raise
        self.pending.setdefault(message.room, deque()).append(entry)
        self.spooled_ids[key] = message.id
        self.spooled += 1
        metrics.PUBLISHES.labels("spooled").inc()
        metrics.SPOOL_DEPTH.set(self.spool.depth)
        log.bind(id=message.id, topic=f"room:{message.room}", reason=reason).info("publish spooled")
        self.outlet.emit((message,))  # seq None: shown live now, sent again once stored
        return PublishResult(message, queued=True)

    async def _handle_stop_accepting(self, message: StopAccepting) -> int:
        """Returns how many messages of this shard still wait in the spool."""
        self.accepting = False
        return sum(len(queue) for queue in self.pending.values())

    # -- draining ------------------------------------------------------------------------------

    async def _handle_drain_tick(self, message: DrainTick) -> None:
        if not self.pending or not self._usable():
            return
        now = time.monotonic()
        for room in list(self.pending):
            if room not in self.draining and self.drain_retry.get(room, (0, 0.0))[1] <= now:
                self._drain(room)

    def _drain(self, room: str) -> None:
        """Store *room*'s oldest spooled message in a task beside the mailbox.

        Live publishes of other rooms go on meanwhile; those of *room* queue in the spool
        behind it. The outcome comes back as `Drained`.
        """
        queue = self.pending.get(room)
        if not queue:
            return
        entry = queue[0]
        self.draining[room] = entry.number
        self.spawn(self._store_spooled(room, entry), name=f"drain-{room}")

    async def _store_spooled(self, room: str, entry: SpoolEntry) -> None:
        # Touches no state: the handler of Drained applies the outcome.
        outcome: Message | DeadLetter | DatabaseError
        try:
            spooled = self._open(entry.record)
        except (DecryptError, KeyError, TypeError, ValueError) as exc:
            outcome = DeadLetter(f"unreadable record: {type(exc).__name__}")
        else:
            try:
                with trace_context(spooled.trace_id):
                    outcome, _ = await self.store.insert_message(spooled)
            except (DatabaseRejected, NotFound) as exc:
                outcome = DeadLetter(type(exc).__name__)  # no retry can store it
            except DatabaseError as exc:
                outcome = exc
        await self._report(Drained(room, entry, outcome))

    async def _handle_drained(self, message: Drained) -> None:
        room, entry, outcome = message.room, message.entry, message.outcome
        if self.draining.get(room) != entry.number:
            return
        del self.draining[room]
        queue = self.pending.get(room)
        if not queue or queue[0].number != entry.number:
            return
        if isinstance(outcome, DatabaseError):
            self._failed(outcome)
            attempts = self.drain_retry.get(room, (0, 0.0))[0] + 1
            delay = self.drain_backoff.delay(attempts)
            self.drain_retry[room] = (attempts, time.monotonic() + delay)
            log.bind(topic=f"room:{room}", error=outcome.code, retry_count=attempts).warning(
                "spool drain of a room failed; retrying later"
            )
            return
        self.drain_retry.pop(room, None)
        if isinstance(outcome, DeadLetter):
            await self._dead_letter(room, entry, outcome.reason)
        else:
            queue.popleft()
            self.spooled_ids.pop((outcome.sender, outcome.client_msg_id), None)
            await self.spool.ack(entry)
            metrics.SPOOL_DEPTH.set(self.spool.depth)
            self.stored += 1
            self.outlet.emit((outcome,))  # a repeat too: an ambiguous commit was never sent out
        if queue:
            self._drain(room)
        else:
            del self.pending[room]
            log.bind(topic=f"room:{room}").info("room's spooled messages all stored")

    async def _dead_letter(self, room: str, entry: SpoolEntry, reason: str) -> None:
        self.pending[room].popleft()
        self.spooled_ids.pop(
            (str(entry.record.get("sender")), str(entry.record.get("client_msg_id"))), None
        )
        await self.spool.dead_letter(entry, reason)
        self.dead_letters += 1
        metrics.SPOOL_DEPTH.set(self.spool.depth)

    # -- database health -----------------------------------------------------------------------

    def _usable(self) -> bool:
        if not self.database_usable(self.suspect_since):
            return False
        self.suspect_since = None
        return True

    def _failed(self, exc: DatabaseError) -> None:
        """PostgreSQL failed a write: have it checked now.

        A lost connection makes every write spool until a ping succeeds. A timeout alone
        does not: it may be one room's lock while the rest of the database answers.
        """
        self.ask_for_ping()
        if isinstance(exc, DatabaseTimeout):
            return
        if self.suspect_since is None:
            log.bind(error=exc.code).warning(
                "database failed a write; spooling until it answers a ping"
            )
        self.suspect_since = time.monotonic()

    # -- spool records -------------------------------------------------------------------------

    def _seal(self, message: Message) -> dict[str, Any]:
        _, sealed = self.store.seal(message)  # encrypted like rows, bound to the id
        return seal_record(message, sealed)

    def _open(self, record: dict[str, Any]) -> Message:
        return open_record(record, self.cipher)


__all__ = [
    "DeadLetter", "DrainTick", "Drained", "Outlet", "Publish", "PublishResult", "RoomWriter",
    "StopAccepting", "shard_of",
]  # fmt: skip
