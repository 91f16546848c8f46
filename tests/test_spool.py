"""Tests for app.spool: durable appends, acknowledgements in any order and crash recovery."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)
from loguru import logger

from app import metrics
from app.errors import SpoolFull
from app.spool import Spool, SpoolEntry, _encode

#: Repository root, put on the SIGKILL child's sys.path.
ROOT = Path(__file__).resolve().parents[1]

#: A child process that appends forever and says "acked <i>" once each append returned.
KILL_CHILD = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from app.spool import Spool

async def main():
    spool = Spool(Path(sys.argv[1]))
    for i in range(1_000_000):
        await spool.append({"id": i, "room": "lobby", "content": "payload " * 20})
        print(f"acked {i}", flush=True)

asyncio.run(main())
"""


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Loguru records at WARNING and above, captured for the test."""
    records: list[dict[str, Any]] = []
    handler_id = logger.add(lambda message: records.append(message.record), level="WARNING")
    yield records
    logger.remove(handler_id)


async def fill(spool: Spool, count: int, start: int = 0, rooms: int = 1) -> list[SpoolEntry]:
    return [
        await spool.append(
            {"id": number, "room": f"room-{number % rooms}", "content": f"message {number}"}
        )
        for number in range(start, start + count)
    ]


def ids(entries: list[SpoolEntry]) -> list[Any]:
    return [entry.record["id"] for entry in entries]


def write_records(path: Path, count: int) -> None:
    now = time.time()
    path.write_bytes(b"".join(_encode({"id": n, "room": "r"}, now) for n in range(count)))


def append_raw(path: Path, data: bytes) -> None:
    with open(path, "ab") as file:
        file.write(data)


def corrupt_record(path: Path, index: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = bytearray(lines[index])
    damaged[-5] ^= 0x20
    lines[index] = bytes(damaged)
    path.write_bytes(b"".join(lines))


def read_dead_letters(path: Path) -> list[dict[str, Any]]:
    letters = []
    for line in path.read_bytes().splitlines():
        length, _, payload = line.split(b" ", 2)
        assert int(length) == len(payload)
        letters.append(json.loads(payload))
    return letters


async def test_append_then_pending_in_order(tmp_path: Path) -> None:
    """pending hands back every appended record unchanged, in append order, with its entry."""
    spool = Spool(tmp_path / "spool.log")
    records = [{"id": n, "room": "r", "content": "héllo ✓", "trace_id": None} for n in range(7)]
    appended = [await spool.append(record) for record in records]

    pending = await spool.pending()

    assert pending == appended
    assert [entry.record for entry in pending] == records
    assert [entry.number for entry in appended] == sorted({e.number for e in appended})


async def test_constructor_does_no_io(tmp_path: Path) -> None:
    """Building a Spool touches nothing; the first append creates its folder and file."""
    path = tmp_path / "var" / "spool" / "spool.log"
    spool = Spool(path)

    assert not path.parent.exists()
    await spool.append({"id": 0})
    assert spool.depth == 1
    assert path.exists()


async def test_depth_size_and_status(tmp_path: Path) -> None:
    """depth and size_bytes track appends and acks; the last ack empties the file."""
    path = tmp_path / "spool.log"
    spool = Spool(path, max_bytes=10_000)
    entries = await fill(spool, 3)

    assert spool.depth == 3
    assert spool.size_bytes == path.stat().st_size > 0
    status = spool.status()
    assert {k: status[k] for k in ("depth", "size_bytes", "max_bytes", "dead_letters")} == {
        "depth": 3,
        "size_bytes": path.stat().st_size,
        "max_bytes": 10_000,
        "dead_letters": 0,
    }
    assert 0.0 <= status["oldest_age_seconds"] < 5

    for entry in entries:
        await spool.ack(entry)

    assert (spool.depth, spool.size_bytes, path.stat().st_size) == (0, 0, 0)
    assert spool.oldest_age_seconds == 0.0
    assert (tmp_path / "spool.log.offset").read_text() == "0\n"


async def test_oldest_age_follows_the_oldest_unacknowledged_entry(tmp_path: Path) -> None:
    """oldest_age_seconds comes from the oldest entry not acked, whatever the ack order."""
    path = tmp_path / "spool.log"
    now = time.time()
    path.write_bytes(
        _encode({"id": 0}, now - 100) + _encode({"id": 1}, now - 40) + _encode({"id": 2}, now - 10)
    )
    spool = Spool(path)
    first, middle, _ = await spool.pending()

    assert 99 < spool.oldest_age_seconds < 110
    await spool.ack(middle)
    assert 99 < spool.oldest_age_seconds < 110
    await spool.ack(first)
    assert 9 < spool.oldest_age_seconds < 20


async def test_spool_full_refuses_and_keeps_nothing(tmp_path: Path) -> None:
    """An append past max_bytes raises SpoolFull and the refused record is not in the file."""
    path = tmp_path / "spool.log"
    spool = Spool(path, max_bytes=300)
    accepted: list[SpoolEntry] = []
    with pytest.raises(SpoolFull) as caught:
        while True:
            content = "refused-marker" if accepted else "x"
            accepted.append(await spool.append({"id": len(accepted), "content": content}))

    assert 1 <= len(accepted) < 10
    assert (caught.value.status, caught.value.code, caught.value.recoverable) == (
        503,
        "SPOOL_FULL",
        True,
    )
    assert caught.value.retry_after == 5
    assert spool.depth == len(accepted)
    assert spool.size_bytes == path.stat().st_size <= 300
    assert path.read_bytes().count(b"\n") == len(accepted)

    for entry in accepted:
        await spool.ack(entry)
    await spool.append({"id": "after", "content": "room again"})

    assert spool.depth == 1


async def test_restart_sees_pending_records(tmp_path: Path) -> None:
    """A new Spool over an existing file counts and offers the records left by the old one."""
    path = tmp_path / "spool.log"
    await fill(Spool(path), 4)

    restarted = Spool(path)

    assert restarted.depth == 4
    assert restarted.size_bytes == path.stat().st_size
    assert ids(await restarted.pending()) == [0, 1, 2, 3]


async def test_out_of_order_acks_across_rooms(tmp_path: Path) -> None:
    """Entries acked before an earlier one leave depth right; no restart offers a saved prefix."""
    path = tmp_path / "spool.log"
    spool = Spool(path, save_every=2)
    first, second, third, fourth, fifth, sixth = await fill(spool, 6, rooms=3)

    await spool.ack(second)
    await spool.ack(third)

    assert spool.depth == 4
    assert ids(await spool.pending()) == [0, 3, 4, 5]
    # Entry 0 holds the offset back, so a crash now offers the acked 1 and 2 again.
    assert ids(await Spool(path).pending()) == [0, 1, 2, 3, 4, 5]

    await spool.ack(first)
    await spool.ack(fifth)

    assert spool.depth == 2
    assert await spool.pending() == [fourth, sixth]
    restarted = await Spool(path).pending()
    # The acked prefix 0-2 is gone for good; 4 comes back, acked beyond the offset.
    assert ids(restarted) == [3, 4, 5]


async def test_restart_replays_fewer_than_save_every_acked_records(tmp_path: Path) -> None:
    """In-order acks are saved every save_every records, so a crash replays fewer than that."""
    path = tmp_path / "spool.log"
    spool = Spool(path, save_every=10)
    entries = await fill(spool, 25)
    for entry in entries[:15]:
        await spool.ack(entry)

    assert (tmp_path / "spool.log.offset").read_text() != "0\n"
    assert ids(await Spool(path).pending()) == list(range(10, 25))


async def test_ack_of_unknown_or_settled_entry_is_a_no_op(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """A second ack, or an ack of another spool's entry, changes nothing and logs nothing."""
    spool = Spool(tmp_path / "spool.log")
    other = Spool(tmp_path / "other.log")
    first, second = await fill(spool, 2)
    stranger = await other.append({"id": "elsewhere"})

    await spool.ack(first)
    await spool.ack(first)
    await spool.ack(stranger)

    assert spool.depth == 1 and other.depth == 1
    assert await spool.pending() == [second]
    assert logs == []


async def test_poison_record_is_dead_lettered_and_the_rest_moves_on(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """A poison record goes to the .dead file with its reason, and the others still drain."""
    path = tmp_path / "spool.log"
    spool = Spool(path)
    entries = await fill(spool, 5, rooms=2)
    poison = entries[1]
    before = metrics.SPOOL_DEAD_LETTERS._value.get()

    await spool.dead_letter(poison, "value too long for type character varying(4000)")
    await spool.dead_letter(poison, "twice")

    assert spool.depth == 4
    assert poison not in await spool.pending()
    for entry in reversed(entries):
        await spool.ack(entry)

    assert (spool.depth, spool.size_bytes, path.stat().st_size) == (0, 0, 0)
    letters = read_dead_letters(tmp_path / "spool.log.dead")
    assert [(letter["reason"], letter["record"]) for letter in letters] == [
        ("value too long for type character varying(4000)", poison.record)
    ]
    assert abs(letters[0]["dead_at"] - time.time()) < 60
    assert metrics.SPOOL_DEAD_LETTERS._value.get() == before + 1
    assert spool.dead_letters == 1 and spool.status()["dead_letters"] == 1
    assert Spool(path).dead_letters == 1
    [error] = [record for record in logs if record["level"].name == "ERROR"]
    assert (error["extra"]["id"], error["extra"]["room"]) == (1, "room-1")
    assert "character varying" in error["extra"]["reason"]
    assert "message 1" not in error["message"] + repr(error["extra"])


async def test_torn_dead_letter_line_is_cut_before_the_next(tmp_path: Path) -> None:
    """Half a dead-letter line left by a crash is not counted and is cut by the next one."""
    path = tmp_path / "spool.log"
    spool = Spool(path, save_every=1)
    first, second = await fill(spool, 2)
    await spool.dead_letter(first, "bad")
    append_raw(tmp_path / "spool.log.dead", b'99 0badf00d {"dead_at"')

    restarted = Spool(path)
    [entry] = await restarted.pending()
    assert restarted.dead_letters == 1
    await restarted.dead_letter(entry, "also bad")

    assert restarted.dead_letters == 2
    assert [letter["reason"] for letter in read_dead_letters(tmp_path / "spool.log.dead")] == [
        "bad",
        "also bad",
    ]
    assert entry.record == second.record


async def test_lone_surrogate_survives_restart_exactly(tmp_path: Path) -> None:
    """A string holding a lone surrogate comes back after a restart code point for code point."""
    path = tmp_path / "spool.log"
    record: dict[str, Any] = {"id": 1, "content": "a\ud800b\udfff", "\udc80key": ["x\ud83d", "✓"]}
    await Spool(path).append(record)

    [entry] = await Spool(path).pending()

    assert entry.record == record
    assert json.dumps(entry.record, ensure_ascii=True) == json.dumps(record, ensure_ascii=True)
    assert entry.record["content"].encode("utf-16", "surrogatepass") == record["content"].encode(
        "utf-16", "surrogatepass"
    )


async def test_torn_tail_is_ignored_and_truncated_on_open(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """Half a record at the end (a crash mid-write) is cut with a warning on first use."""
    path = tmp_path / "spool.log"
    await fill(Spool(path), 3)
    good_size = path.stat().st_size
    half = _encode({"id": 3, "content": "never acknowledged"}, time.time())[:30]
    append_raw(path, half)

    spool = Spool(path)

    assert spool.depth == 3
    assert path.stat().st_size == good_size
    assert [r["level"].name for r in logs] == ["WARNING"]
    assert "torn" in logs[0]["message"]
    assert ids(await spool.pending()) == [0, 1, 2]


async def test_torn_tail_from_failed_write_is_truncated_on_next_append(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """Bytes left by a failed write in a live spool are cut before the next append."""
    path = tmp_path / "spool.log"
    spool = Spool(path)
    await fill(spool, 2)
    append_raw(path, b'57 0badf00d {"spool')

    await spool.append({"id": 2, "content": "after the failure"})

    assert ids(await Spool(path).pending()) == [0, 1, 2]
    assert [r["level"].name for r in logs] == ["WARNING"]


async def test_corrupt_middle_record_is_skipped_after_restart(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """Bit rot in a middle record skips it with an ERROR; acking the others empties the file."""
    path = tmp_path / "spool.log"
    await fill(Spool(path), 5)
    corrupt_record(path, 2)

    spool = Spool(path)
    pending = await spool.pending()

    assert spool.depth == 4
    assert ids(pending) == [0, 1, 3, 4]
    assert [r["level"].name for r in logs] == ["ERROR"]
    for entry in pending:
        await spool.ack(entry)
    assert path.stat().st_size == 0


async def test_corrupt_record_in_live_spool_is_skipped_without_content_in_logs(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """A record damaged under a running spool is skipped by pending, logged without its content."""
    path = tmp_path / "spool.log"
    spool = Spool(path)
    entries = await fill(spool, 4)
    corrupt_record(path, 1)

    pending = await spool.pending()

    assert ids(pending) == [0, 2, 3]
    assert spool.depth == 3
    assert [r["level"].name for r in logs] == ["ERROR"]
    assert "message 1" not in logs[0]["message"] + repr(logs[0]["extra"])
    for entry in [entries[3], entries[0], entries[2]]:
        await spool.ack(entry)
    assert (spool.depth, path.stat().st_size) == (0, 0)


async def test_offset_beyond_file_is_treated_as_zero(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """An offset past the end of the data file (a crash mid-truncate) replays from the start."""
    path = tmp_path / "spool.log"
    await fill(Spool(path), 2)
    (tmp_path / "spool.log.offset").write_text("1000000\n")

    spool = Spool(path)

    assert spool.depth == 2
    assert ids(await spool.pending()) == [0, 1]
    assert [r["level"].name for r in logs] == ["WARNING"]


async def test_offset_inside_a_record_is_treated_as_zero(tmp_path: Path) -> None:
    """An offset that does not fall on a record boundary is distrusted and everything replays."""
    path = tmp_path / "spool.log"
    await fill(Spool(path), 3)
    (tmp_path / "spool.log.offset").write_text("7\n")

    assert Spool(path).depth == 3


async def test_concurrent_appends_do_not_interleave(tmp_path: Path) -> None:
    """Fifty simultaneous appends all land whole, each readable after a restart."""
    path = tmp_path / "spool.log"
    spool = Spool(path)
    payload = "ünïcode " * 50

    await asyncio.gather(*(spool.append({"id": n, "content": payload}) for n in range(50)))
    pending = await Spool(path).pending()

    assert sorted(ids(pending)) == list(range(50))
    assert all(entry.record["content"] == payload for entry in pending)


@pytest.mark.parametrize("seed", range(4))
async def test_appends_racing_acks_and_truncation_are_never_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Appends racing out-of-order acks and truncates are never lost, before or after a restart."""
    rng = random.Random(seed)
    path = tmp_path / "spool.log"
    spool = Spool(path, save_every=1)
    truncations = 0
    truncate = spool._truncate

    def counting_truncate() -> None:
        nonlocal truncations
        truncations += 1
        truncate()

    monkeypatch.setattr(spool, "_truncate", counting_truncate)
    handed: asyncio.Queue[SpoolEntry | None] = asyncio.Queue()
    appended: list[SpoolEntry] = []
    kept: set[int] = set()
    producers, ackers, rounds = 4, 3, 30
    barrier = asyncio.Barrier(producers)
    # Most rounds follow back to back; after some the producers pause together, so the
    # ackers can empty the spool while appends of the next round queue up.
    pauses = [rng.choice([0.0, 0.0, 0.003]) for _ in range(rounds)]

    async def produce(producer: int) -> None:
        for pause in pauses:
            for _ in range(rng.randrange(4)):
                record = {"id": f"{producer}-{len(appended)}", "room": f"room-{producer}"}
                entry = await spool.append(record)
                appended.append(entry)
                await handed.put(entry)
            await barrier.wait()
            await asyncio.sleep(pause)

    async def acknowledge() -> None:
        held: list[SpoolEntry] = []
        while True:
            entry = await handed.get()
            if entry is None:
                break
            # Late in the run a few entries stay unacked, so the restart has something to offer.
            if len(appended) > 130 and rng.random() < 0.3:
                kept.add(entry.number)
                continue
            held.append(entry)
            if handed.empty() or len(held) >= rng.randrange(1, 4):
                rng.shuffle(held)
                for waiting in held:
                    await spool.ack(waiting)
                held.clear()
        for waiting in held:
            await spool.ack(waiting)

    acking = [asyncio.create_task(acknowledge()) for _ in range(ackers)]
    await asyncio.gather(*(produce(p) for p in range(producers)))
    for _ in acking:
        await handed.put(None)
    await asyncio.gather(*acking)

    unacked = [entry for entry in appended if entry.number in kept]
    unacked.sort(key=lambda entry: entry.number)
    assert truncations >= 5
    assert spool.depth == len(unacked) > 0
    assert await spool.pending() == unacked
    # With save_every=1 the saved offset sits right before the first unacked entry, so a
    # restart offers exactly the entries from there on: the unacked ones and, among them,
    # those acked out of order.
    since_first = sorted(
        (entry for entry in appended if entry.number >= unacked[0].number),
        key=lambda entry: entry.number,
    )
    restarted = await Spool(path).pending()
    assert [entry.record for entry in restarted] == [entry.record for entry in since_first]
    assert {entry.record["id"] for entry in unacked} <= {entry.record["id"] for entry in restarted}


async def test_cancelled_appends_leave_the_spool_consistent(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """Cancelled appends leave no half record, and those that landed anyway are in pending."""
    path = tmp_path / "spool.log"
    spool = Spool(path)
    tasks = [asyncio.create_task(spool.append({"id": n})) for n in range(20)]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Appends take the lock in order, so this one lands after every cancelled one settled.
    await spool.append({"id": 20})
    pending = await spool.pending()

    assert spool.depth == len(pending) == Spool(path).depth
    assert set(range(1, 21, 2)) <= set(ids(pending))
    assert logs == []
    # An orphan (landed, but its caller never got the entry) is reachable through pending.
    for entry in pending:
        await spool.ack(entry)
    assert (spool.depth, path.stat().st_size) == (0, 0)


async def test_cancelled_acks_leave_files_and_counters_consistent(tmp_path: Path) -> None:
    """An ack cancelled before it starts never counts; one cancelled during its offset save does."""
    path = tmp_path / "spool.log"
    spool = Spool(path, save_every=1)
    entries = await fill(spool, 20)
    # Newest first, so the last task, acking entry 0, advances the offset and saves it.
    tasks = [asyncio.create_task(spool.ack(entry)) for entry in reversed(entries)]
    tasks[0].cancel()
    await asyncio.sleep(0)
    tasks[-1].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Appends take the lock after the save the cancelled ack left running.
    late = await spool.append({"id": 20})

    assert tasks[0].cancelled() and tasks[-1].cancelled()
    assert await spool.pending() == [entries[-1], late]
    assert spool.depth == 2
    assert ids(await Spool(path).pending()) == [19, 20]
    await spool.ack(late)
    await spool.ack(entries[-1])
    assert (spool.depth, spool.size_bytes, path.stat().st_size) == (0, 0, 0)
    assert Spool(path).depth == 0


async def test_append_during_the_truncate_lands_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that arrives while the emptied spool truncates its file waits, then lands."""
    path = tmp_path / "spool.log"
    spool = Spool(path)
    [entry] = await fill(spool, 1)
    started, release = threading.Event(), threading.Event()
    truncate = spool._truncate

    def slow_truncate() -> None:
        started.set()
        release.wait(10)
        truncate()

    monkeypatch.setattr(spool, "_truncate", slow_truncate)
    acking = asyncio.create_task(spool.ack(entry))
    await asyncio.to_thread(started.wait, 10)
    appending = asyncio.create_task(spool.append({"id": "late"}))
    await asyncio.sleep(0.01)

    assert not appending.done()
    release.set()
    late = await appending
    await acking
    assert await spool.pending() == [late]
    assert spool.size_bytes == path.stat().st_size > 0
    assert ids(await Spool(path).pending()) == ["late"]


async def test_acks_during_an_offset_save_are_saved_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records the offset passes while a save is on its way to disk are counted toward the next."""
    path = tmp_path / "spool.log"
    spool = Spool(path, save_every=2)
    entries = await fill(spool, 6)
    started, release = threading.Event(), threading.Event()
    save_offset = spool._save_offset

    def slow_save_offset(offset: int) -> None:
        started.set()
        release.wait(10)
        save_offset(offset)

    monkeypatch.setattr(spool, "_save_offset", slow_save_offset)
    await spool.ack(entries[0])
    saving = asyncio.create_task(spool.ack(entries[1]))
    await asyncio.to_thread(started.wait, 10)
    # Both are due a save, so both wait for the lock the blocked save holds.
    later = [asyncio.create_task(spool.ack(entry)) for entry in entries[2:4]]
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in later)
    release.set()
    await asyncio.gather(saving, *later)

    assert ids(await Spool(path).pending()) == [4, 5]


async def test_pending_skips_entries_settled_while_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[dict[str, Any]]
) -> None:
    """Entries acked, truncated away and overwritten while pending reads are not handed out."""
    path = tmp_path / "spool.log"
    spool = Spool(path)
    entries = await fill(spool, 3)
    started, release = threading.Event(), threading.Event()
    read = spool._read

    def slow_read(spans: Any) -> Any:
        started.set()
        release.wait(10)
        return read(spans)

    monkeypatch.setattr(spool, "_read", slow_read)
    reading = asyncio.create_task(spool.pending())
    await asyncio.to_thread(started.wait, 10)
    for entry in entries:
        await spool.ack(entry)
    await fill(spool, 3, start=10)
    release.set()

    assert await reading == []
    assert logs == []


async def test_thousand_in_order_acks_cost_twenty_one_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 in-order acks fsync 21 times: nine offset saves of two, then the truncate's three."""
    path = tmp_path / "spool.log"
    write_records(path, 1000)
    spool = Spool(path)
    entries = await spool.pending()
    fsyncs = 0
    fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    for entry in entries:
        await spool.ack(entry)

    assert fsyncs == 21
    assert path.stat().st_size == 0


async def test_sigkill_loses_no_acknowledged_record(tmp_path: Path) -> None:
    """After SIGKILL mid-append, a fresh spool offers every record the child acknowledged."""
    path = tmp_path / "spool.log"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILL_CHILD,
        str(path),
        str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    acked: list[int] = []
    while len(acked) < 40:
        line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
        if not line:
            break
        acked.append(int(line.split()[1]))
    child.send_signal(signal.SIGKILL)
    rest, errors = await child.communicate()
    acked += [int(line.split()[1]) for line in rest.decode().splitlines()]

    assert child.returncode == -signal.SIGKILL, errors.decode()
    assert len(acked) >= 40
    offered = ids(await Spool(path).pending())
    assert offered == list(range(len(offered)))
    # Every ack is there; at most the one append cut off before its ack may be extra.
    assert acked == offered[: len(acked)]
    assert len(offered) - len(acked) <= 1


#: JSON-able values as messages carry them: NUL-free unicode text, numbers, None, lists.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_characters="\x00")),
    lambda children: st.lists(children, max_size=4),
    max_leaves=8,
)
records_strategy = st.lists(
    st.dictionaries(st.text(st.characters(exclude_characters="\x00")), json_values, max_size=5),
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(records=records_strategy)
def test_round_trip_any_records(records: list[dict[str, Any]]) -> None:
    """Any list of JSON-able records comes back from append then a restart's pending, in order."""

    async def round_trip(directory: str) -> list[dict[str, Any]]:
        path = Path(directory) / "spool.log"
        spool = Spool(path)
        for record in records:
            await spool.append(record)
        return [entry.record for entry in await Spool(path).pending()]

    with tempfile.TemporaryDirectory() as directory:
        assert asyncio.run(round_trip(directory)) == records


class SpoolProtocol(RuleBasedStateMachine):
    """Appends, acks in any order, dead letters and restarts, checked against a plain list."""

    #: Offset saves happen every this many advanced records.
    SAVE_EVERY = 3

    entries = Bundle("entries")

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.TemporaryDirectory()
        self.path = Path(self.directory.name) / "spool.log"
        self.loop = asyncio.new_event_loop()
        self.spool = Spool(self.path, save_every=self.SAVE_EVERY)
        #: Every entry since the spool last emptied, in append order, with whether it is done.
        self.model: list[tuple[SpoolEntry, bool]] = []
        self.dead = 0
        self.next_id = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def settle(self, entry: SpoolEntry) -> None:
        self.model = [(e, done or e == entry) for e, done in self.model]
        if all(done for _, done in self.model):
            self.model = []

    @rule(target=entries, room=st.sampled_from(["a", "b", "c"]))
    def append(self, room: str) -> SpoolEntry:
        entry = self.run(self.spool.append({"id": self.next_id, "room": room}))
        self.next_id += 1
        self.model.append((entry, False))
        return entry

    @rule(entry=consumes(entries))
    def ack(self, entry: SpoolEntry) -> None:
        self.run(self.spool.ack(entry))
        self.settle(entry)

    @rule(entry=consumes(entries))
    def dead_letter(self, entry: SpoolEntry) -> None:
        if any(e == entry and not done for e, done in self.model):
            self.dead += 1
        self.run(self.spool.dead_letter(entry, "poison"))
        self.settle(entry)

    @precondition(lambda self: self.model)
    @rule()
    def restart(self) -> None:
        records = [entry.record for entry, _ in self.model]
        first_open = next(i for i, (_, done) in enumerate(self.model) if not done)
        self.spool = Spool(self.path, save_every=self.SAVE_EVERY)
        offered = self.run(self.spool.pending())
        replayed = len(records) - len(offered)
        # The saved offset trails the first unacked entry by fewer than SAVE_EVERY records.
        assert first_open - self.SAVE_EVERY < replayed <= first_open
        assert [entry.record for entry in offered] == records[replayed:]
        self.model = [(entry, False) for entry in offered]

    @invariant()
    def counters_match_the_model(self) -> None:
        open_entries = [entry for entry, done in self.model if not done]
        assert self.spool.depth == len(open_entries)
        assert self.run(self.spool.pending()) == open_entries
        assert self.spool.dead_letters == self.dead
        assert (self.spool.size_bytes == 0) == (not self.model)

    def teardown(self) -> None:
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()
        self.directory.cleanup()


TestSpoolProtocol = SpoolProtocol.TestCase
TestSpoolProtocol.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_encoded_line_is_length_crc_json() -> None:
    """A record is framed as one line: payload length, CRC-32 in hex, then ASCII JSON."""
    line = _encode({"id": 1, "content": "é"}, 1700000000.5)
    length, crc, payload = line.rstrip(b"\n").split(b" ", 2)

    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert int(length) == len(payload)
    assert len(crc) == 8
    assert json.loads(payload) == {"spooled_at": 1700000000.5, "record": {"id": 1, "content": "é"}}
