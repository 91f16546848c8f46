"""The benchmark harness still runs end to end: ``python -m bench --quick``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FANOUT_KEYS = {
    "deliveries_per_s", "p50_ms", "p99_ms", "max_ms", "lost", "expected", "received",
    "cpu_us_per_delivery", "ratio_to_floor",
}  # fmt: skip
IDLE_KEYS = {"kb_per_connection", "connect_s", "connects_per_s", "ratio_to_floor"}
DURABLE_KEYS = {
    "acknowledged", "stored_200", "queued_202", "acks_per_s", "p50_ms", "p99_ms", "max_ms",
    "errors", "cpu_us_per_publish", "postgres_cpu_us_per_publish", "cores",
}  # fmt: skip


def test_quick_bench_delivers_everything_and_writes_json(tmp_path: Path) -> None:
    """A quick run delivers every publish on all three servers, has hearth acknowledge durable
    publishes without an error, and records the figures."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    written = list(tmp_path.glob("*.json"))
    assert len(written) == 1
    assert written[0].name in done.stdout
    document = json.loads(written[0].read_text())
    assert {"started_at", "host", "settings", "rows"} <= document.keys()
    fanout = [r for r in document["rows"] if r["scenario"] == "fanout"]
    idle = [r for r in document["rows"] if r["scenario"] == "idle"]
    assert sorted(r["server"] for r in fanout) == ["floor", "hearth", "socketio"]
    assert sorted(r["server"] for r in idle) == ["floor", "hearth", "socketio"]
    for row in fanout:
        assert FANOUT_KEYS <= row.keys(), row["server"]
        assert row["deliveries_per_s"] > 0, row
        assert row["received"] == row["expected"] > 0, row
        assert row["lost"] == 0, row
        assert row["publish_errors"] == 0, row
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row
    for row in idle:
        assert IDLE_KEYS <= row.keys(), row["server"]
        assert row["connections"] == 20
    assert (
        next(r for r in fanout if r["server"] == "floor")["ratio_to_floor"]["cpu_us_per_delivery"]
        == 1.0
    )
    for server in ("floor", "socketio", "hearth"):
        assert f" {server} " in done.stdout
    durable = [r for r in document["rows"] if r["scenario"] == "durable"]
    assert [r["server"] for r in durable] == ["hearth"]
    for row in durable:
        assert DURABLE_KEYS <= row.keys()
        assert (row["publishers"], row["rooms"]) == (4, 2)
        assert row["acknowledged"] == row["stored_200"] + row["queued_202"] > 0, row
        assert row["acks_per_s"] > 0, row
        assert row["errors"] == 0, row
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row
    assert " durable " in done.stdout
