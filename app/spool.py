"""The outage spool: publishes fsync'd to a local file while PostgreSQL is down, drained later."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.errors import SpoolFull
from app.log import get_logger

__all__ = ["DEFAULT_MAX_BYTES", "Spool"]

#: Default cap on the spool file's size.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_T = TypeVar("_T")

log = get_logger("spool")


@dataclass(frozen=True, slots=True)
class _Entry:
    """One line of the spool file as read back; ``record`` is None when the line is corrupt."""

    #: Byte offset where the line starts.
    start: int
    #: Byte offset just past its newline.
    end: int
    #: Wall-clock time of the append.
    spooled_at: float | None
    record: dict[str, Any] | None


def _encode(record: dict[str, Any], spooled_at: float) -> bytes:
    # ASCII-only JSON never holds a raw newline, so b"\n" always ends a record, and any str
    # (lone surrogates included) survives. The envelope keeps spooled_at out of the record.
    payload = json.dumps(
        {"spooled_at": spooled_at, "record": record},
        ensure_ascii=True,
        separators=(",", ":"),
        allow_nan=False,
    ).encode("ascii")
    return b"%d %08x %s\n" % (len(payload), zlib.crc32(payload), payload)


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


class Spool:
    """An append-only file of publish records that survives crashes, drained in order.

    *path* is the data file; the committed drain position lives beside it in
    ``<name>.offset``. *max_bytes* caps the data file: an append that would pass it raises
    `SpoolFull`. The constructor does no I/O; the first use of any method or property scans
    an existing file (a restart), counting pending records and cutting away a torn tail left
    by a crash. Touch `depth` at startup to pay for that scan before serving.

    Each record is a line ``<length> <crc32 hex> <json>\\n``. The JSON wraps the record with
    its ``spooled_at`` wall-clock time; `drain` hands back the record exactly as appended.
    """

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        #: The data file.
        self.path = Path(path)
        #: Cap on the data file's size in bytes.
        self.max_bytes = max_bytes
        #: Side file holding the committed drain offset.
        self.offset_path = self.path.with_name(self.path.name + ".offset")
        #: Serialises appends with each other and with the final truncate of a drain.
        self._lock = asyncio.Lock()
        #: Keeps two drains from committing the same records side by side.
        self._drain_lock = asyncio.Lock()
        #: Background tasks started by `_to_completion`, kept alive until they finish.
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Bytes in the data file that hold whole, fsync'd records.
        self._size = 0
        #: Offset of the first record not yet committed by a drain.
        self._offset = 0
        #: Records at or past the offset.
        self._depth = 0
        #: ``spooled_at`` of the oldest pending record.
        self._oldest: float | None = None
        #: Whether the file left by an earlier process has been scanned.
        self._recovered = False

    @property
    def depth(self) -> int:
        """Records waiting to be drained."""
        self._ensure_recovered()
        return self._depth

    @property
    def size_bytes(self) -> int:
        """Size of the data file, drained records included until the next full drain."""
        self._ensure_recovered()
        return self._size

    @property
    def oldest_age_seconds(self) -> float:
        """Seconds since the oldest pending record was spooled; 0.0 when none is pending."""
        if not self.depth or self._oldest is None:
            return 0.0
        return max(0.0, time.time() - self._oldest)

    @property
    def draining(self) -> bool:
        """Whether a drain is running."""
        return self._drain_lock.locked()

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for the dashboard and health checks."""
        return {
            "path": str(self.path),
            "depth": self.depth,
            "size_bytes": self.size_bytes,
            "max_bytes": self.max_bytes,
            "oldest_age_seconds": round(self.oldest_age_seconds, 3),
            "draining": self.draining,
        }

    async def append(self, record: dict[str, Any]) -> None:
        """Store *record* durably: when this returns, it is fsync'd and will be drained.

        *record* is a JSON-able dict with str keys. Raises `SpoolFull` when the file would
        pass ``max_bytes`` (the record is not written), ``TypeError`` or ``ValueError`` when
        *record* cannot be serialised, and ``OSError`` when the disk fails. A cancelled append
        may or may not have landed; it is never left half written.
        """
        self._ensure_recovered()
        spooled_at = time.time()
        line = _encode(record, spooled_at)
        await self._to_completion(self._append_locked(line, spooled_at))

    async def drain(
        self, commit: Callable[[dict[str, Any]], Awaitable[Any]], *, batch: int = 100
    ) -> int:
        """Hand every pending record, oldest first, to *commit*; return how many it took.

        *commit* must be idempotent: after a crash, up to *batch* records it already took are
        offered again. The offset is saved every *batch* records and when the drain stops. If
        *commit* raises, the drain stops, keeps that record and the rest, and re-raises. A
        corrupt record is logged and skipped. Once everything is committed the file is
        emptied; records appended meanwhile are drained too or stay for the next drain.
        """
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self._ensure_recovered()
        async with self._drain_lock:
            committed = 0
            while True:
                entries = await asyncio.to_thread(self._read, self._offset, self._size, batch)
                if not entries:
                    if await self._to_completion(self._truncate_if_drained()):
                        return committed
                    continue
                try:
                    for entry in entries:
                        if entry.record is None:
                            log.bind(offset=entry.start, length=entry.end - entry.start).error(
                                "corrupt spool record skipped"
                            )
                        else:
                            self._oldest = entry.spooled_at
                            await commit(entry.record)
                            committed += 1
                            self._depth -= 1
                        self._offset = entry.end
                finally:
                    await self._to_completion(asyncio.to_thread(self._save_offset, self._offset))

    def pending_records(self) -> list[dict[str, Any]]:
        """Every pending record, oldest first, skipping corrupt ones.

        It reads the file, so call it off the event loop (``asyncio.to_thread``).
        """
        self._ensure_recovered()
        entries = self._read(self._offset, self._size, sys.maxsize)
        return [entry.record for entry in entries if entry.record is not None]

    def _ensure_recovered(self) -> None:
        if not self._recovered:
            self._recover()
            self._recovered = True

    async def _to_completion(self, coro: Coroutine[Any, Any, _T]) -> _T:
        # A thread cannot be stopped halfway, so work that changes the files runs as its own
        # task: a cancelled caller stops waiting, but the files and counters still agree.
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _append_locked(self, line: bytes, spooled_at: float) -> None:
        async with self._lock:
            if self._size + len(line) > self.max_bytes:
                raise SpoolFull(
                    f"spool holds {self._size} of {self.max_bytes} bytes; "
                    f"a {len(line)}-byte record does not fit"
                )
            await asyncio.to_thread(self._write, line, self._size)
            self._size += len(line)
            if not self._depth:
                self._oldest = spooled_at
            self._depth += 1

    async def _truncate_if_drained(self) -> bool:
        async with self._lock:
            if self._offset < self._size:
                return False
            if self._size:
                await asyncio.to_thread(self._truncate)
            self._size = self._offset = self._depth = 0
            self._oldest = None
            return True

    def _write(self, line: bytes, expected_size: int) -> None:
        created = not self.path.exists()
        if created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as file:
            if file.tell() > expected_size:
                # A failed earlier write left part of a record that was never acknowledged.
                log.bind(torn_bytes=file.tell() - expected_size).warning(
                    "spool tail torn by a failed write; truncated"
                )
                file.truncate(expected_size)
            file.write(line)
            file.flush()
            os.fsync(file.fileno())
        if created:
            _fsync_dir(self.path.parent)

    def _read(self, start: int, limit: int, count: int) -> list[_Entry]:
        entries: list[_Entry] = []
        if start >= limit:
            return entries
        with open(self.path, "rb") as file:
            file.seek(start)
            position = start
            while position < limit and len(entries) < count:
                line = file.readline(limit - position)
                # A file shorter than we wrote was damaged outside our control: skip the gap
                # as corrupt rather than wait forever for bytes that will not come.
                end = position + len(line) if line else limit
                decoded = _decode(line)
                spooled_at, record = decoded if decoded else (None, None)
                entries.append(_Entry(position, end, spooled_at, record))
                position = end
        return entries

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
            log.warning("spool offset file unreadable; draining from the start")
            return 0
        return int(text)

    def _recover(self) -> None:
        offset = self._load_offset()
        offset_on_boundary = offset == 0
        position = good_end = 0
        pending = total = 0
        first_pending: float | None = None
        first_any: float | None = None
        if self.path.exists():
            with open(self.path, "rb") as file:
                for line in file:
                    offset_on_boundary = offset_on_boundary or position == offset
                    decoded = _decode(line)
                    position += len(line)
                    if decoded is None:
                        continue
                    good_end = position
                    total += 1
                    first_any = first_any if first_any is not None else decoded[0]
                    if position > offset:
                        pending += 1
                        first_pending = first_pending if first_pending is not None else decoded[0]
            offset_on_boundary = offset_on_boundary or position == offset
        if position > good_end:
            # Only a write that was never acknowledged can end in a broken line.
            log.bind(torn_bytes=position - good_end).warning(
                "spool tail torn by a crash; truncated"
            )
            with open(self.path, "r+b") as file:
                file.truncate(good_end)
                file.flush()
                os.fsync(file.fileno())
        if offset > good_end or not offset_on_boundary:
            log.bind(offset=offset, size=good_end).warning(
                "spool offset does not match the data file; draining from the start"
            )
            offset, pending, first_pending = 0, total, first_any
            self._save_offset(0)
        self._size = good_end
        self._offset = offset
        self._depth = pending
        self._oldest = first_pending
