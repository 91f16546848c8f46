"""Tests for app.spool: durable appends, ordered idempotent drains and crash recovery."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loguru import logger

from app.errors import SpoolFull
from app.spool import Spool, _encode

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


class Collector:
    """A commit callback that stores records and can fail on chosen ids, once each."""

    def __init__(self, fail_on: set[int] | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.fail_on = set(fail_on or ())

    @property
    def ids(self) -> list[Any]:
        return [record["id"] for record in self.records]

    async def __call__(self, record: dict[str, Any]) -> None:
        if record["id"] in self.fail_on:
            self.fail_on.discard(record["id"])
            raise ConnectionError("database went away")
        self.records.append(record)
        # Yield like a real database call, so other tasks run mid-drain.
        await asyncio.sleep(0)


async def fill(spool: Spool, count: int, start: int = 0) -> None:
    for number in range(start, start + count):
        await spool.append({"id": number, "content": f"message {number}"})


async def test_append_then_drain_in_order(tmp_path: Path) -> None:
    """Drain hands back every appended record, unchanged and in append order."""
    spool = Spool(tmp_path / "spool.log")
    records = [{"id": n, "room": "r", "content": "héllo ✓", "trace_id": None} for n in range(7)]
    for record in records:
        await spool.append(record)
    collector = Collector()

    assert await spool.drain(collector, batch=3) == 7
    assert collector.records == records


async def test_constructor_does_no_io(tmp_path: Path) -> None:
    """Building a Spool touches nothing; the first append creates its folder and file."""
    path = tmp_path / "var" / "spool" / "spool.log"
    spool = Spool(path)

    assert not path.parent.exists()
    await spool.append({"id": 0})
    assert spool.depth == 1
    assert path.exists()


async def test_depth_size_and_status(tmp_path: Path) -> None:
    """depth and size_bytes track appends and go back to zero after a full drain."""
    path = tmp_path / "spool.log"
    spool = Spool(path, max_bytes=10_000)
    await fill(spool, 3)

    assert spool.depth == 3
    assert spool.size_bytes == path.stat().st_size > 0
    status = spool.status()
    assert {k: status[k] for k in ("depth", "size_bytes", "max_bytes", "draining")} == {
        "depth": 3,
        "size_bytes": path.stat().st_size,
        "max_bytes": 10_000,
        "draining": False,
    }
    assert 0.0 <= status["oldest_age_seconds"] < 5

    await spool.drain(Collector())

    assert (spool.depth, spool.size_bytes, path.stat().st_size) == (0, 0, 0)
    assert spool.oldest_age_seconds == 0.0
    assert (tmp_path / "spool.log.offset").read_text() == "0\n"


async def test_oldest_age_follows_the_oldest_pending_record(tmp_path: Path) -> None:
    """oldest_age_seconds comes from the wall-clock spooled_at of the oldest pending record."""
    path = tmp_path / "spool.log"
    now = time.time()
    path.write_bytes(_encode({"id": 0}, now - 100) + _encode({"id": 1}, now - 40))
    spool = Spool(path)

    assert 99 < spool.oldest_age_seconds < 110

    with pytest.raises(ConnectionError):
        await spool.drain(Collector(fail_on={1}))

    assert 39 < spool.oldest_age_seconds < 50


async def test_spool_full_refuses_and_keeps_nothing(tmp_path: Path) -> None:
    """An append past max_bytes raises SpoolFull and the refused record is not in the file."""
    path = tmp_path / "spool.log"
    spool = Spool(path, max_bytes=300)
    accepted = 0
    with pytest.raises(SpoolFull) as caught:
        while True:
            await spool.append({"id": accepted, "content": "refused-marker" if accepted else "x"})
            accepted += 1

    assert 1 <= accepted < 10
    assert (caught.value.status, caught.value.code, caught.value.recoverable) == (
        503,
        "SPOOL_FULL",
        True,
    )
    assert caught.value.retry_after == 5
    assert spool.depth == accepted
    assert spool.size_bytes == path.stat().st_size <= 300
    assert path.read_bytes().count(b"\n") == accepted

    await spool.drain(Collector())
    await spool.append({"id": "after", "content": "room again"})

    assert spool.depth == 1


async def test_failed_commit_leaves_the_rest(tmp_path: Path) -> None:
    """A failing commit re-raises and keeps the rest; the next drain repeats no commit."""
    spool = Spool(tmp_path / "spool.log")
    await fill(spool, 10)
    collector = Collector(fail_on={6})

    with pytest.raises(ConnectionError):
        await spool.drain(collector, batch=4)

    assert collector.ids == [0, 1, 2, 3, 4, 5]
    assert spool.depth == 4

    assert await spool.drain(collector, batch=4) == 4
    assert collector.ids == list(range(10))
    assert spool.depth == 0


async def test_failed_drain_resumes_after_restart(tmp_path: Path) -> None:
    """The committed offset is saved when a drain fails, so a restart resumes right there."""
    path = tmp_path / "spool.log"
    spool = Spool(path)
    await fill(spool, 10)
    with pytest.raises(ConnectionError):
        await spool.drain(Collector(fail_on={5}), batch=3)

    restarted = Spool(path)
    collector = Collector()

    assert restarted.depth == 5
    assert await restarted.drain(collector) == 5
    assert collector.ids == [5, 6, 7, 8, 9]


async def test_restart_sees_pending_records(tmp_path: Path) -> None:
    """A new Spool over an existing file counts and drains the records left by the old one."""
    path = tmp_path / "spool.log"
    await fill(Spool(path), 4)

    restarted = Spool(path)
    collector = Collector()

    assert restarted.depth == 4
    assert restarted.size_bytes == path.stat().st_size
    await restarted.drain(collector)
    assert collector.ids == [0, 1, 2, 3]


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
    collector = Collector()

    assert spool.depth == 3
    assert path.stat().st_size == good_size
    assert [r["level"].name for r in logs] == ["WARNING"]
    assert "torn" in logs[0]["message"]
    await spool.drain(collector)
    assert collector.ids == [0, 1, 2]


async def test_torn_tail_from_failed_write_is_truncated_on_next_append(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """Bytes left by a failed write in a live spool are cut before the next append."""
    path = tmp_path / "spool.log"
    spool = Spool(path)
    await fill(spool, 2)
    append_raw(path, b'57 0badf00d {"spool')

    await spool.append({"id": 2, "content": "after the failure"})
    collector = Collector()
    await spool.drain(collector)

    assert collector.ids == [0, 1, 2]
    assert [r["level"].name for r in logs] == ["WARNING"]


def append_raw(path: Path, data: bytes) -> None:
    with open(path, "ab") as file:
        file.write(data)


def corrupt_record(path: Path, index: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    damaged = bytearray(lines[index])
    damaged[-5] ^= 0x20
    lines[index] = bytes(damaged)
    path.write_bytes(b"".join(lines))


async def test_corrupt_middle_record_is_skipped_after_restart(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """Bit rot in one middle record skips it with an ERROR and delivers all the others."""
    path = tmp_path / "spool.log"
    await fill(Spool(path), 5)
    corrupt_record(path, 2)

    spool = Spool(path)
    collector = Collector()

    assert spool.depth == 4
    assert await spool.drain(collector) == 4
    assert collector.ids == [0, 1, 3, 4]
    assert [r["level"].name for r in logs] == ["ERROR"]


async def test_corrupt_record_in_live_spool_is_skipped_without_content_in_logs(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """A record damaged under a running spool is skipped, logged without its content."""
    path = tmp_path / "spool.log"
    spool = Spool(path)
    await fill(spool, 4)
    corrupt_record(path, 1)
    collector = Collector()

    await spool.drain(collector)

    assert collector.ids == [0, 2, 3]
    assert spool.depth == 0
    assert [r["level"].name for r in logs] == ["ERROR"]
    assert "message 1" not in logs[0]["message"] + repr(logs[0]["extra"])


async def test_offset_beyond_file_is_treated_as_zero(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """An offset past the end of the data file (a crash mid-truncate) means drain from the start."""
    path = tmp_path / "spool.log"
    await fill(Spool(path), 2)
    (tmp_path / "spool.log.offset").write_text("1000000\n")

    spool = Spool(path)
    collector = Collector()

    assert spool.depth == 2
    await spool.drain(collector)
    assert collector.ids == [0, 1]
    assert [r["level"].name for r in logs] == ["WARNING"]


async def test_offset_inside_a_record_is_treated_as_zero(tmp_path: Path) -> None:
    """An offset that does not fall on a record boundary is distrusted and the drain restarts."""
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
    restarted = Spool(path)
    collector = Collector()
    await restarted.drain(collector)

    assert sorted(collector.ids) == list(range(50))
    assert all(record["content"] == payload for record in collector.records)


async def test_appends_racing_a_drain_are_never_lost(tmp_path: Path) -> None:
    """Records appended while a drain runs are drained then or next time, once, in order."""
    spool = Spool(tmp_path / "spool.log")
    await fill(spool, 20)
    collector = Collector()

    async def producer() -> None:
        for number in range(20, 60):
            await spool.append({"id": number})
            await asyncio.sleep(0)

    await asyncio.gather(spool.drain(collector, batch=7), producer())
    await spool.drain(collector)

    assert collector.ids == list(range(60))
    assert spool.depth == 0


async def test_concurrent_drains_commit_each_record_once(tmp_path: Path) -> None:
    """Two drains started together never hand the same record to commit twice."""
    spool = Spool(tmp_path / "spool.log")
    await fill(spool, 30)
    collector = Collector()

    await asyncio.gather(spool.drain(collector, batch=4), spool.drain(collector, batch=4))

    assert collector.ids == list(range(30))


async def test_cancelled_appends_leave_the_spool_consistent(
    tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    """Cancelling appends mid-flight never leaves a half record or a wrong depth."""
    path = tmp_path / "spool.log"
    spool = Spool(path)
    tasks = [asyncio.create_task(spool.append({"id": n})) for n in range(20)]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Appends take the lock in order, so this one lands after every cancelled one settled.
    await spool.append({"id": 20})
    depth = spool.depth
    collector = Collector()

    assert Spool(path).depth == depth
    assert await spool.drain(collector) == depth
    assert set(range(1, 21, 2)) <= set(collector.ids)
    assert logs == []


async def test_sigkill_loses_no_acknowledged_record(tmp_path: Path) -> None:
    """After SIGKILL mid-append, a fresh spool drains every record the child acknowledged."""
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
    collector = Collector()
    await Spool(path).drain(collector)
    assert collector.ids == list(range(len(collector.ids)))
    # Every ack is there; at most the one append cut off before its ack may be extra.
    assert acked == collector.ids[: len(acked)]
    assert len(collector.ids) - len(acked) <= 1


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
    """Any list of JSON-able records comes back from append then drain exactly, in order."""

    async def round_trip(directory: str) -> list[dict[str, Any]]:
        spool = Spool(Path(directory) / "spool.log")
        for record in records:
            await spool.append(record)
        drained: list[dict[str, Any]] = []

        async def commit(record: dict[str, Any]) -> None:
            drained.append(record)

        await spool.drain(commit, batch=3)
        return drained

    with tempfile.TemporaryDirectory() as directory:
        assert asyncio.run(round_trip(directory)) == records


def test_encoded_line_is_length_crc_json() -> None:
    """A record is framed as one line: payload length, CRC-32 in hex, then ASCII JSON."""
    line = _encode({"id": 1, "content": "é"}, 1700000000.5)
    length, crc, payload = line.rstrip(b"\n").split(b" ", 2)

    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert int(length) == len(payload)
    assert len(crc) == 8
    assert json.loads(payload) == {"spooled_at": 1700000000.5, "record": {"id": 1, "content": "é"}}
