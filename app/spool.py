"""The outage spool: publishes fsync'd to a file while PostgreSQL is down, acked in any order."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app import metrics
from app.crypto import DecryptError, MessageCipher
from app.errors import SpoolFull
from app.log import get_logger
from app.models import Message

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_SAVE_EVERY", "DeadLetterRecord", "Spool", "SpoolEntry",
    "pending_count", "read_dead_letters", "requeue_dead_letters",
]  # fmt: skip

#: Default cap on the spool file's size.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: The spool's file name inside HEARTH_SPOOL_DIR (the dead letters sit beside it).
SPOOL_FILE = "publish.spool"
#: Default number of records the offset may advance before it is saved.
DEFAULT_SAVE_EVERY = 100

_T = TypeVar("_T")

log = get_logger("spool")

#: Entry numbers, shared by every Spool so that an entry of one spool is unknown to another.
_numbers = itertools.count(1)


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One spooled record, as `Spool.append` and `Spool.pending` hand it out."""

    #: Identity within this process: increasing in file order, never reused.
    number: int
    #: The record as appended.
    record: dict[str, Any]
    #: Wall-clock time of the append.
    spooled_at: float


@dataclass(slots=True)
class _Span:
    """Where one line of the data file lies, and whether it is done with."""

    #: Byte offset where the line starts.
    start: int
    #: Byte offset just past its newline.
    end: int
    #: Wall-clock time of the append; 0.0 for a corrupt line.
    spooled_at: float
    #: Acknowledged, dead-lettered or corrupt: the offset may pass it.
    done: bool


def seal_record(message: Message, sealed: bytes | None) -> dict[str, Any]:
    """*message* as a spool record; with *sealed* (its content encrypted by the store's
    cipher, bound to its id), the content is kept only in that form."""
    record = message.to_record()
    if sealed is not None:
        record["content"] = None
        record["content_enc"] = base64.b64encode(sealed).decode("ascii")
    return record


def open_record(record: dict[str, Any], cipher: MessageCipher | None) -> Message:
    """The message of a spooled *record*, its content decrypted with *cipher* when sealed.

    Raises `DecryptError`, or KeyError/TypeError/ValueError for a record no version wrote.
    """
    sealed = record.get("content_enc")
    if sealed is not None:
        if cipher is None:
            raise DecryptError("spooled content is encrypted and no key is configured")
        content = cipher.decrypt(base64.b64decode(sealed), aad=str(record["id"]).encode())
        record = {**record, "content": content}
    return Message.from_record(record)


def _frame(envelope: dict[str, Any]) -> bytes:
    # ASCII-only JSON never holds a raw newline, so b"\n" always ends a line, and any str
    # (lone surrogates included) survives.
    payload = json.dumps(
        envelope, ensure_ascii=True, separators=(",", ":"), allow_nan=False
    ).encode("ascii")
    return b"%d %08x %s\n" % (len(payload), zlib.crc32(payload), payload)


def _encode(record: dict[str, Any], spooled_at: float) -> bytes:
    # The envelope keeps spooled_at out of the record.
    return _frame({"spooled_at": spooled_at, "record": record})


def _decode(line: bytes) -> tuple[float, dict[str, Any]] | None:
    if not line.endswith(b"\n"):
        return None
    parts = line[:-1].split(b" ", 2)
    if len(parts) != 3:
        return None
    length, crc, payload = parts
    if not length.isdigit() or int(length) != len(payload):
        return None
    if crc != b"%08x" % zlib.crc32(payload):
        return None
    try:
        envelope = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(envelope, dict):
        return None
    spooled_at, record = envelope.get("spooled_at"), envelope.get("record")
    if not isinstance(spooled_at, int | float) or not isinstance(record, dict):
        return None
    return float(spooled_at), record


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, line: bytes, expected_size: int) -> None:
    created = not path.exists()
    if created:
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as file:
        if file.tell() > expected_size:
            # A failed earlier write left part of a line that was never acknowledged.
            log.bind(file=path.name, torn_bytes=file.tell() - expected_size).warning(
                "spool tail torn by a failed write; truncated"
            )
            file.truncate(expected_size)
        file.write(line)
        file.flush()
        os.fsync(file.fileno())
    if created:
        _fsync_dir(path.parent)


class Spool:
    """An append-only file of publish records that survives crashes, acknowledged in any order.

    *path* is the data file. Beside it, ``<name>.offset`` holds the durable offset: every
    line before it is done with. ``<name>.dead`` holds the records given to `dead_letter`.
    *max_bytes* caps the data file: an append that would pass it raises `SpoolFull`. The
    offset is saved at most every *save_every* records it advances, and whenever the spool
    empties, which also truncates the data file.

    `append` hands out a `SpoolEntry`; the caller commits its record elsewhere and then calls
    `ack` (or `dead_letter` for a record that can never be stored), in any order. The offset
    only passes a contiguous run of acknowledged entries, so after a crash `pending` offers
    again every entry at or past the saved offset: fewer than *save_every* acknowledged ones
    before the first unacknowledged entry, and every one acknowledged after it. Commits must
    therefore be idempotent. Acks change no file until a save is due, so they never wait
    behind appends; the lock serialises every write to the files.

    The constructor does no I/O; the first use of any method or property scans an existing
    file (a restart), cutting away a torn tail left by a crash and skipping corrupt lines
    with an ERROR. The async methods scan off the event loop; touch `depth` to pay for the
    scan on the loop instead.

    Each line is ``<length> <crc32 hex> <json>\\n``. The data file's JSON wraps the record
    with its ``spooled_at`` wall-clock time; the dead-letter file's with ``dead_at`` and
    ``reason``. `pending` hands back each record exactly as appended.
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        save_every: int = DEFAULT_SAVE_EVERY,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if save_every < 1:
            raise ValueError("save_every must be at least 1")
        #: The data file.
        self.path = Path(path)
        #: Cap on the data file's size in bytes.
        self.max_bytes = max_bytes
        #: How many records the offset may advance before it is saved.
        self.save_every = save_every
        #: Side file holding the durable offset.
        self.offset_path = self.path.with_name(self.path.name + ".offset")
        #: Side file of records that can never be stored.
        self.dead_path = self.path.with_name(self.path.name + ".dead")
        #: Serialises every change to the files: appends, dead letters, offset saves, truncates.
        self._lock = asyncio.Lock()
        #: Keeps the loop and a worker thread from scanning the files twice.
        self._recovery_lock = threading.Lock()
        #: Background tasks started by `_to_completion`, kept alive until they finish.
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Every line at or past the offset, by entry number, in file order.
        self._spans: OrderedDict[int, _Span] = OrderedDict()
        #: Bytes in the data file that hold whole, fsync'd records.
        self._size = 0
        #: End of the contiguous run of done lines at the start of the data file.
        self._offset = 0
        #: Records the offset advanced over since it was last saved.
        self._unsaved = 0
        #: Entries not yet done with.
        self._depth = 0
        #: Lines in the dead-letter file.
        self._dead_letters = 0
        #: Bytes in the dead-letter file that hold whole lines.
        self._dead_size = 0
        #: Whether the files left by an earlier process have been scanned.
        self._recovered = False

    @property
    def depth(self) -> int:
        """Entries neither acknowledged nor dead-lettered."""
        self._ensure_recovered()
        return self._depth

    @property
    def size_bytes(self) -> int:
        """Size of the data file, done records included until the spool next empties."""
        self._ensure_recovered()
        return self._size

    @property
    def oldest_age_seconds(self) -> float:
        """Seconds since the oldest unacknowledged entry was spooled; 0.0 when there is none."""
        if not self.depth:
            return 0.0
        # The offset passes every done line at the head, so the head is never done.
        head = next(iter(self._spans.values()))
        return max(0.0, time.time() - head.spooled_at)

    @property
    def dead_letters(self) -> int:
        """Lines in the dead-letter file, those of earlier processes included."""
        self._ensure_recovered()
        return self._dead_letters

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for the dashboard and health checks."""
        return {
            "path": str(self.path),
            "depth": self.depth,
            "size_bytes": self.size_bytes,
            "max_bytes": self.max_bytes,
            "oldest_age_seconds": round(self.oldest_age_seconds, 3),
            "dead_letters": self.dead_letters,
        }

    async def append(self, record: dict[str, Any]) -> SpoolEntry:
        """Store *record* durably and return its entry: when this returns, it is fsync'd.

        *record* is a JSON-able dict with str keys. Raises `SpoolFull` when the file would
        pass ``max_bytes`` (the record is not written), ``TypeError`` or ``ValueError`` when
        *record* cannot be serialised, and ``OSError`` when the disk fails. A cancelled append
        is never left half written and may still land; its caller then never sees the entry,
        which `pending` offers like any other, so the spool cannot empty until someone acks it.
        """
        await self._recover_in_thread()
        spooled_at = time.time()
        line = _encode(record, spooled_at)
        return await self._to_completion(self._append_locked(record, line, spooled_at))

    async def pending(self) -> list[SpoolEntry]:
        """Every entry neither acknowledged nor dead-lettered, oldest first.

        After a restart these are the entries an earlier process left. The records are read
        back from the file off the event loop. A line found corrupt is logged at ERROR
        (without its content) and counted as done.
        """
        await self._recover_in_thread()
        wanted = [(number, span) for number, span in self._spans.items() if not span.done]
        lines = await asyncio.to_thread(self._read, [span for _, span in wanted])
        entries: list[SpoolEntry] = []
        corrupt: list[int] = []
        for (number, span), decoded in zip(wanted, lines, strict=True):
            # An entry done with meanwhile may have been truncated away under the read.
            if span.done or number not in self._spans:
                continue
            if decoded is None:
                log.bind(offset=span.start, length=span.end - span.start).error(
                    "corrupt spool record skipped"
                )
                corrupt.append(number)
            else:
                entries.append(SpoolEntry(number, decoded[1], decoded[0]))
        if corrupt:
            await self._settle(corrupt)
        return entries

    async def ack(self, entry: SpoolEntry) -> None:
        """Let go of *entry*, whose record is now committed elsewhere.

        Acknowledgements may come in any order; one of an unknown or already settled entry
        does nothing. Most acks touch no file; every *save_every* advanced records one saves
        the offset, and the one that empties the spool truncates it. An ack cancelled while
        that is under way counts, and the save or truncate still completes. Raises ``OSError``
        when either fails; the entry counts as acknowledged all the same, and a crash before
        the next save replays it.
        """
        await self._recover_in_thread()
        await self._settle([entry.number])

    async def dead_letter(self, entry: SpoolEntry, reason: str) -> None:
        """Move *entry*, whose record can never be stored, to the dead-letter file, then ack it.

        *reason* says why, for whoever reads the file; it is logged at ERROR with the record's
        ``id`` and ``room``, never its content. An unknown or already settled entry is left
        alone. Raises ``OSError`` when the disk fails: the entry stays pending if the dead
        letter was not written, and counts as settled if only the offset save failed. Like an
        acknowledged entry, it is offered again after a crash until the saved offset passes
        it, and may then land in the dead-letter file twice.
        """
        await self._recover_in_thread()
        line = _frame({"dead_at": time.time(), "reason": reason, "record": entry.record})
        await self._to_completion(self._dead_letter_locked(entry, reason, line))

    def _ensure_recovered(self) -> None:
        with self._recovery_lock:
            if not self._recovered:
                self._recover()
                self._recovered = True

    async def _recover_in_thread(self) -> None:
        if not self._recovered:
            await asyncio.to_thread(self._ensure_recovered)

    async def _to_completion(self, coro: Coroutine[Any, Any, _T]) -> _T:
        # A thread cannot be stopped halfway, so work that changes the files runs as its own
        # task: a cancelled caller stops waiting, but the files and counters still agree.
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _append_locked(
        self, record: dict[str, Any], line: bytes, spooled_at: float
    ) -> SpoolEntry:
        async with self._lock:
            if self._size + len(line) > self.max_bytes:
                raise SpoolFull(
                    f"spool holds {self._size} of {self.max_bytes} bytes; "
                    f"a {len(line)}-byte record does not fit"
                )
            await asyncio.to_thread(_write, self.path, line, self._size)
            number = next(_numbers)
            self._spans[number] = _Span(self._size, self._size + len(line), spooled_at, done=False)
            self._size += len(line)
            self._depth += 1
            return SpoolEntry(number, record, spooled_at)

    async def _settle(self, numbers: Iterable[int]) -> None:
        self._mark_done(numbers)
        # Most acks change no file, so they skip the lock rather than wait behind appends.
        if self._progress_due():
            await self._to_completion(self._save_progress_locked())

    async def _save_progress_locked(self) -> None:
        async with self._lock:
            await self._save_progress()

    async def _dead_letter_locked(self, entry: SpoolEntry, reason: str, line: bytes) -> None:
        async with self._lock:
            span = self._spans.get(entry.number)
            if span is None or span.done:
                return
            await asyncio.to_thread(_write, self.dead_path, line, self._dead_size)
            self._dead_size += len(line)
            self._dead_letters += 1
            metrics.SPOOL_DEAD_LETTERS.inc()
            log.bind(id=entry.record.get("id"), room=entry.record.get("room"), reason=reason).error(
                "spooled record moved to the dead-letter file"
            )
            self._mark_done([entry.number])
            await self._save_progress()

    def _mark_done(self, numbers: Iterable[int]) -> None:
        for number in numbers:
            span = self._spans.get(number)
            if span is not None and not span.done:
                span.done = True
                self._depth -= 1
        self._advance()

    def _progress_due(self) -> bool:
        return (not self._spans and self._size > 0) or self._unsaved >= self.save_every

    async def _save_progress(self) -> None:
        # The caller holds the lock, so no append lands between the check and the truncate;
        # acks may still advance the offset while a save is on its way to the disk.
        if not self._spans:
            if self._size:
                await asyncio.to_thread(self._truncate)
                self._size = self._offset = self._unsaved = 0
        elif self._unsaved >= self.save_every:
            saved = self._unsaved
            await asyncio.to_thread(self._save_offset, self._offset)
            self._unsaved -= saved

    def _advance(self) -> None:
        while self._spans:
            number, span = next(iter(self._spans.items()))
            if not span.done:
                return
            del self._spans[number]
            self._offset = span.end
            self._unsaved += 1

    def _read(self, spans: list[_Span]) -> list[tuple[float, dict[str, Any]] | None]:
        decoded: list[tuple[float, dict[str, Any]] | None] = []
        if not spans:
            return decoded
        with open(self.path, "rb") as file:
            for span in spans:
                file.seek(span.start)
                # A short read (the file was damaged outside our control) decodes as corrupt.
                decoded.append(_decode(file.read(span.end - span.start)))
        return decoded

    def _truncate(self) -> None:
        # Offset first: dying between the steps then replays records (commits are
        # idempotent) instead of leaving an offset that new appends could grow past.
        self._save_offset(0)
        with open(self.path, "r+b") as file:
            file.truncate(0)
            file.flush()
            os.fsync(file.fileno())

    def _save_offset(self, offset: int) -> None:
        temporary = self.offset_path.with_name(self.offset_path.name + ".tmp")
        with open(temporary, "w", encoding="ascii") as file:
            file.write(f"{offset}\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.offset_path)
        _fsync_dir(self.path.parent)

    def _load_offset(self) -> int:
        try:
            text = self.offset_path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError):
            text = ""
        if not text.isdigit():
            # Starting over is safe: commits are idempotent.
            log.warning("spool offset file unreadable; replaying from the start")
            return 0
        return int(text)

    def _recover(self) -> None:
        offset = self._load_offset()
        # (start, end, spooled_at) of each line; spooled_at is None for a corrupt one.
        lines: list[tuple[int, int, float | None]] = []
        position = good_end = 0
        if self.path.exists():
            with open(self.path, "rb") as file:
                for line in file:
                    decoded = _decode(line)
                    lines.append((position, position + len(line), decoded[0] if decoded else None))
                    position += len(line)
                    if decoded is not None:
                        good_end = position
        if position > good_end:
            # Only a write that was never acknowledged can end in a broken line.
            log.bind(torn_bytes=position - good_end).warning(
                "spool tail torn by a crash; truncated"
            )
            with open(self.path, "r+b") as file:
                file.truncate(good_end)
                file.flush()
                os.fsync(file.fileno())
            lines = [line for line in lines if line[1] <= good_end]
        if offset and offset not in {end for _, end, _ in lines}:
            log.bind(offset=offset, size=good_end).warning(
                "spool offset does not match the data file; replaying from the start"
            )
            offset = 0
            self._save_offset(0)
        self._offset = offset
        for start, end, spooled_at in lines:
            if start < offset:
                continue
            if spooled_at is None:
                log.bind(offset=start, length=end - start).error("corrupt spool record skipped")
            else:
                self._depth += 1
            self._spans[next(_numbers)] = _Span(
                start, end, spooled_at or 0.0, done=spooled_at is None
            )
        self._size = good_end
        self._advance()
        if not self._spans and self._size:
            self._truncate()
            self._size = self._offset = self._unsaved = 0
        self._dead_letters, self._dead_size = self._count_dead_letters()

    def _count_dead_letters(self) -> tuple[int, int]:
        count = size = 0
        if self.dead_path.exists():
            with open(self.dead_path, "rb") as file:
                for line in file:
                    # A torn last line is cut by the next dead letter's write.
                    if line.endswith(b"\n"):
                        count += 1
                        size += len(line)
        return count, size


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """One line of a spool's dead-letter file, as `read_dead_letters` hands it out."""

    #: Position in the file, from 1.
    line: int
    #: Wall-clock time it was dead-lettered; 0.0 for a corrupt line.
    dead_at: float
    #: Why it could not be stored; empty for a corrupt line.
    reason: str
    #: The record as spooled; None for a corrupt line, which is kept but can never be retried.
    record: dict[str, Any] | None


def read_dead_letters(dead_path: Path) -> list[DeadLetterRecord]:
    """Every line of the dead-letter file *dead_path*, in file order, without changing it.

    Reads only, so it is safe while a server uses the spool. A missing file has none.
    """
    letters: list[DeadLetterRecord] = []
    if not dead_path.exists():
        return letters
    with open(dead_path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.endswith(b"\n"):
                break  # a torn last line: the next dead letter's write cuts it
            envelope = _decode_envelope(line)
            record = envelope.get("record") if envelope else None
            if envelope is None or not isinstance(record, dict):
                letters.append(DeadLetterRecord(number, 0.0, "", None))
                continue
            dead_at = envelope.get("dead_at")
            letters.append(
                DeadLetterRecord(
                    number,
                    float(dead_at) if isinstance(dead_at, int | float) else 0.0,
                    str(envelope.get("reason", "")),
                    record,
                )
            )
    return letters


def _decode_envelope(line: bytes) -> dict[str, Any] | None:
    parts = line[:-1].split(b" ", 2)
    if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) != len(parts[2]):
        return None
    if parts[1] != b"%08x" % zlib.crc32(parts[2]):
        return None
    try:
        envelope = json.loads(parts[2])
    except ValueError:
        return None
    return envelope if isinstance(envelope, dict) else None


def pending_count(path: Path) -> int:
    """Readable records of the spool data file *path* past its saved offset, without changing
    anything (safe while a server uses the spool).

    A running server saves its offset only every ``save_every`` acks, so this may count a
    few records it already stored; it never misses one still waiting.
    """
    if not path.exists():
        return 0
    try:
        text = path.with_name(path.name + ".offset").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    offset = int(text) if text.isdigit() else 0
    count = position = 0
    with open(path, "rb") as file:
        for line in file:
            if position >= offset and _decode(line) is not None:
                count += 1
            position += len(line)
    return count


async def requeue_dead_letters(spool: Spool) -> list[tuple[DeadLetterRecord, str]]:
    """Move every readable dead letter of *spool* back to its data file, for another try.

    Returns each dead letter with what happened to it: ``"requeued"``, or why it stayed
    in the dead-letter file (a corrupt line, or a spool too full to take it). The records
    are appended (fsync'd) before the dead-letter file is rewritten without them, so a
    crash in between leaves a record in both places, which idempotent commits absorb.
    Only one process may use *spool* meanwhile: a server appending dead letters to the
    same file would lose them.
    """
    letters = await asyncio.to_thread(read_dead_letters, spool.dead_path)
    outcomes: list[tuple[DeadLetterRecord, str]] = []
    kept: list[int] = []
    for letter in letters:
        if letter.record is None:
            outcomes.append((letter, "kept: corrupt line, cannot be retried"))
            kept.append(letter.line)
            continue
        try:
            await spool.append(letter.record)
        except SpoolFull:
            outcomes.append((letter, "kept: the spool is full"))
            kept.append(letter.line)
            continue
        outcomes.append((letter, "requeued"))
    if letters:
        await asyncio.to_thread(_keep_dead_lines, spool.dead_path, set(kept))
        # Counted again from the file on the next use.
        spool._dead_letters, spool._dead_size = spool._count_dead_letters()
    return outcomes


def _keep_dead_lines(dead_path: Path, keep: set[int]) -> None:
    with open(dead_path, "rb") as file:
        lines = [line for number, line in enumerate(file, start=1) if number in keep]
    temporary = dead_path.with_name(dead_path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.writelines(lines)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, dead_path)
    _fsync_dir(dead_path.parent)
