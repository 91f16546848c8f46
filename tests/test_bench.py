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
FANOUT_KEYS |= {"gc_collections", "gc_max_ms", "gc_max_exact"}
PRESENCE_KEYS = {
    "join_s", "joins_per_s", "cpu_us_per_join", "settled", "settled_s", "presence_users",
    "presence_query_ms",
}  # fmt: skip
SLOW_KEYS = {
    "stalled", "baseline_p99_ms", "p99_ms", "p99_ratio", "lost", "rss_growth_kb",
    "baseline_rss_growth_kb", "stalled_dropped",
}  # fmt: skip
HEARTH_KINDS = ["hearth", "hearth-uvloop"]
ALL_KINDS = ["floor", "hearth", "hearth-uvloop", "socketio"]
CROSS_RUN_KEYS = {
    "deliveries_per_s", "p50_ms", "p99_ms", "max_ms", "lost", "expected", "received",
    "bridged_in",
}  # fmt: skip
SSE_KEYS = FANOUT_KEYS - {"ratio_to_floor"} | {
    "transport", "publish_errors", "client_cpu_share", "client_cpu_us_per_delivery",
    "kb_per_connection", "ratio_to_websocket", "websocket",
}  # fmt: skip
SSE_RATIO_KEYS = {"deliveries_per_s", "p99_ms", "cpu_us_per_delivery"}
DURABLE_KEYS = {
    "acknowledged", "stored_200", "queued_202", "acks_per_s", "p50_ms", "p99_ms", "max_ms",
    "errors", "cpu_us_per_publish", "postgres_cpu_us_per_publish", "cores",
}  # fmt: skip


def test_quick_bench_delivers_everything_and_writes_json(tmp_path: Path) -> None:
    """A quick run delivers every publish on every server kind, to hearth's SSE subscribers
    too, has hearth acknowledge durable publishes, list every joined user, drop a stalled
    reader and deliver through Redis from one instance to another, and records the figures."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    written = list(tmp_path.glob("*.json"))
    assert len(written) == 1
    assert written[0].name in done.stdout
    document = json.loads(written[0].read_text())
    assert {"started_at", "host", "settings", "rows"} <= document.keys()
    fanout = [r for r in document["rows"] if r["scenario"] == "fanout"]
    idle = [r for r in document["rows"] if r["scenario"] == "idle"]
    assert sorted(r["server"] for r in fanout) == ALL_KINDS
    assert sorted(r["server"] for r in idle) == ALL_KINDS
    for row in fanout:
        assert FANOUT_KEYS <= row.keys(), row["server"]
        assert row["deliveries_per_s"] > 0, row
        assert row["received"] == row["expected"] > 0, row
        assert row["lost"] == 0, row
        assert row["publish_errors"] == 0, row
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row
        if row["server"] in HEARTH_KINDS:
            # The collector is timed: a 2 s run at 50 msg/s makes garbage.
            assert row["gc_collections"] > 0 and row["gc_max_ms"] > 0, row
        else:
            assert row["gc_max_ms"] is None, row
    for row in idle:
        assert IDLE_KEYS <= row.keys(), row["server"]
        assert row["connections"] == 20
    assert (
        next(r for r in fanout if r["server"] == "floor")["ratio_to_floor"]["cpu_us_per_delivery"]
        == 1.0
    )
    for server in ALL_KINDS:
        assert f" {server} " in done.stdout
    sse = [r for r in document["rows"] if r["scenario"] == "sse"]
    # The smoke run takes the SSE path on one hearth kind, the first (see --quick).
    assert [r["server"] for r in sse] == document["settings"]["sse_servers"] == ["hearth"]
    for row in sse:
        assert SSE_KEYS <= row.keys(), row["server"]
        assert (row["transport"], row["n"], row["subscribers"]) == ("sse", 20, 20), row
        assert row["received"] == row["expected"] == row["published"] * 20 > 0, row
        assert row["lost"] == 0 and row["publish_errors"] == 0, row
        assert row["deliveries_per_s"] > 0 and row["cpu_us_per_delivery"] > 0, row
        assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row
        # Beside it: the WebSocket fan-out row of the same server and N, and SSE's ratios to it.
        (websocket,) = (r for r in fanout if r["server"] == row["server"] and r["n"] == row["n"])
        assert row["websocket"]["transport"] == websocket["transport"] == "websocket"
        for key in FANOUT_KEYS - {"ratio_to_floor"}:
            assert row["websocket"][key] == websocket[key], key
        assert row["ratio_to_websocket"] == {
            key: round(row[key] / websocket[key], 2) for key in SSE_RATIO_KEYS
        }, row
    sse_lines = [line.split() for line in done.stdout.splitlines() if line.split()[:1] == ["sse"]]
    assert [line[2:4] for line in sse_lines] == [
        ["hearth", "websocket"],
        ["hearth", "sse"],
    ], done.stdout
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
    presence = [r for r in document["rows"] if r["scenario"] == "presence"]
    assert sorted(r["server"] for r in presence) == HEARTH_KINDS
    for row in presence:
        assert PRESENCE_KEYS <= row.keys()
        assert row["n"] == row["presence_users"] == 20, row
        assert row["settled"] and 0 < row["join_s"] <= row["settled_s"], row
        assert row["cpu_us_per_join"] > 0, row
    slow = [r for r in document["rows"] if r["scenario"] == "slow"]
    assert sorted(r["server"] for r in slow) == ALL_KINDS
    for row in slow:
        assert SLOW_KEYS <= row.keys()
        assert (row["n"], row["stalled"]) == (20, 1), row
        assert row["received"] > 0 and row["p99_ratio"] > 0, row
        assert row["run"]["expected"] == row["run"]["published"] * 19, row
    for row in slow:
        if row["server"] in HEARTH_KINDS:
            # hearth drops the reader that stopped, and the others lose nothing.
            assert row["stalled_dropped"] == row["slow_client_drops"] == 1, row
            assert row["lost"] == 0, row
    cross = [r for r in document["rows"] if r["scenario"] == "cross"]
    assert [(r["server"], r["n"]) for r in cross] == [("hearth", 20)]
    (row,) = cross
    for run in (row["single"], row["cross"]):
        assert CROSS_RUN_KEYS <= run.keys()
        assert run["received"] == run["expected"] == run["published"] * 20 > 0, run
        assert run["lost"] == 0 and run["publish_errors"] == 0, run
        assert run["p50_ms"] <= run["p99_ms"] <= run["max_ms"], run
    # Alone, the instance stores what it delivers; across, every message came through Redis.
    assert row["single"]["bridged_in"] == 0, row["single"]
    assert row["cross"]["bridged_in"] == row["cross"]["published"], row["cross"]
    assert row["p99_ratio"] == round(row["cross"]["p99_ms"] / row["single"]["p99_ms"], 2) > 0
    assert document["settings"]["cross_subscribers"] == 20
    shown = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    assert {"fanout", "idle", "sse", "durable", "presence", "slow", "cross"} <= shown
