"""``python -m bench``: fan-out and slow consumers of hearth (on asyncio and uvloop), the floor
and socketio; hearth's fan-out to Server-Sent Events subscribers beside its WebSocket one;
durable publishes, presence, and fan-out across two instances of hearth.

Each server runs pinned to core 0 (hearth's PostgreSQL and Redis too), the load generator on
core 1; for the durable scenario PostgreSQL moves to core 1, beside the load generator.
Prints a table and writes bench/results/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import resource
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from bench.loadgen import (
    SLOW_CONTENT_LENGTH,
    SLOW_SEND_BUFFER,
    durable_rooms,
    run_bridged_fanout,
    run_durable,
    run_fanout,
    run_presence,
)
from bench.servers import (
    CLIENT_CORE,
    KINDS,
    PRESENCE_ROOM,
    SERVER_CORE,
    Hearth,
    HearthDatabase,
    Server,
    make_server,
    pin,
    pinning_available,
)

T = TypeVar("T")

#: Every scenario, in the order they run; fan-out and idle are measured in one pass, and
#: sse right after them, for each N and hearth kind.
SCENARIOS = ("fanout", "idle", "sse", "durable", "presence", "slow", "cross")
#: The sse row's figures that are also given as a ratio to the WebSocket fan-out's.
SSE_RATIO_KEYS = ("deliveries_per_s", "p99_ms", "cpu_us_per_delivery")
#: The share of the slow-consumer scenario's subscribers that stop reading.
STALLED_SHARE = 0.01

#: Where each run's JSON lands.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` swaps in a tiny smoke-test run."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="20 subscribers, users, slow- and cross-scenario subscribers, 2 s; durable 4"
        " publishers on 2 rooms; sse on the first hearth kind only: a smoke test",
    )
    parser.add_argument(
        "--subscribers", default="1000,5000", help="comma-separated N values (default 1000,5000)"
    )
    parser.add_argument("--rate", type=float, default=None, help="publishes per second, every N")
    parser.add_argument(
        "--rates",
        default="5,1",
        help="per-N publish rates, comma-separated (default 5,1: 5000 deliveries/s at both N,"
        " below every server's capacity on one core)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of publishing")
    parser.add_argument("--drain", type=float, default=10.0, help="seconds to wait for stragglers")
    parser.add_argument(
        "--servers", default=",".join(KINDS), help=f"comma-separated, of {','.join(KINDS)}"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {','.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--publishers", type=int, default=50, help="durable: closed-loop publishers (default 50)"
    )
    parser.add_argument(
        "--rooms", type=int, default=5, help="durable: rooms the publishers share (default 5)"
    )
    parser.add_argument(
        "--presence-users",
        type=int,
        default=1000,
        help="presence: users joining one room (default 1000)",
    )
    parser.add_argument(
        "--slow-subscribers",
        type=int,
        default=1000,
        help=f"slow: subscribers, {STALLED_SHARE * 100:g}%% of whom stop reading (default 1000)",
    )
    parser.add_argument(
        "--slow-rate", type=float, default=5.0, help="slow: publishes per second (default 5)"
    )
    parser.add_argument(
        "--slow-duration",
        type=float,
        default=20.0,
        help="slow: seconds of publishing (default 20: a stalled reader's backlog reaches"
        " 400 KB, past what each server buffers before it pushes back)",
    )
    parser.add_argument(
        "--cross-subscribers",
        type=int,
        default=1000,
        help="cross: subscribers on the second instance (default 1000)",
    )
    parser.add_argument(
        "--cross-rate",
        type=float,
        default=5.0,
        help="cross: publishes per second (default 5, the fan-out's at N=1000)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="folder of the JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.subscribers, args.rate, args.duration, args.drain = "20", 50.0, 2.0, 5.0
        args.publishers, args.rooms = 4, 2
        args.presence_users, args.slow_subscribers = 20, 20
        args.slow_rate, args.slow_duration = 50.0, 2.0
        args.cross_subscribers, args.cross_rate = 20, 50.0
    if args.publishers < 1 or args.rooms < 1:
        parser.error("--publishers and --rooms must be at least 1")
    if args.presence_users < 1 or args.slow_subscribers < 2:
        parser.error("--presence-users must be at least 1 and --slow-subscribers at least 2")
    if args.cross_subscribers < 1:
        parser.error("--cross-subscribers must be at least 1")
    args.subscribers = [int(n) for n in args.subscribers.split(",")]
    if args.rate is not None:
        args.rates = [args.rate] * len(args.subscribers)
    else:
        args.rates = [float(r) for r in args.rates.split(",")]
    if len(args.rates) != len(args.subscribers):
        parser.error("--rates needs one rate per --subscribers value (or give --rate)")
    args.servers = args.servers.split(",")
    unknown = set(args.servers) - set(KINDS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    args.scenarios = args.scenarios.split(",")
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if "durable" in args.scenarios and "hearth" not in args.servers:
        parser.error("the durable scenario runs on hearth only: add hearth to --servers")
    if "presence" in args.scenarios and not _hearth_kinds(args.servers):
        parser.error("the presence scenario runs on hearth only: add hearth to --servers")
    if "sse" in args.scenarios and not _hearth_kinds(args.servers):
        parser.error("the sse scenario runs on hearth only: add hearth to --servers")
    # A smoke test needs the SSE path once: each hearth kind more costs a run (about 5 s).
    args.sse_servers = _hearth_kinds(args.servers)[: 1 if args.quick else None]
    if "cross" in args.scenarios and "hearth" not in args.servers:
        parser.error("the cross scenario runs on hearth only: add hearth to --servers")
    return args


def _hearth_kinds(servers: list[str]) -> list[str]:
    return [name for name in servers if issubclass(KINDS[name], Hearth)]


def _raise_file_limit() -> None:
    # Each connection costs a descriptor in the generator and one in the server.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _ratio(value: float, floor: float | None) -> float | None:
    if not floor or math.isnan(floor) or math.isnan(value):
        return None
    return round(value / floor, 2)


def add_ratios(rows: list[dict]) -> None:
    """Give each row its ratios to the floor row of the same scenario and N."""
    floors = {(r["scenario"], r["n"]): r for r in rows if r["server"] == "floor"}
    for row in rows:
        if row["scenario"] not in ("fanout", "idle"):
            continue  # hearth only: there is no floor to compare with.
        floor = floors.get((row["scenario"], row["n"]))
        keys = (
            ["cpu_us_per_delivery", "p50_ms", "p99_ms"]
            if row["scenario"] == "fanout"
            else ["kb_per_connection", "connect_s"]
        )
        row["ratio_to_floor"] = {k: _ratio(row[k], floor[k] if floor else None) for k in keys}


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render_table(rows: list[dict]) -> str:
    """The stdout tables, one per scenario, separated by blank lines."""
    sections: list[list[str]] = []
    head: tuple[str, ...]
    body: list[tuple[object, ...]]
    fanout = [r for r in rows if r["scenario"] == "fanout"]
    if fanout:
        head = ("scenario", "N", "server", "deliv/s", "p50 ms", "p99 ms", "max ms", "lost",
                "CPU us/deliv", "x floor", "+db us/deliv", "GC max ms", "client CPU")  # fmt: skip
        body = [
            (r["scenario"], r["n"], r["server"], r["deliveries_per_s"], r["p50_ms"], r["p99_ms"],
             r["max_ms"], r["lost"], r["cpu_us_per_delivery"],
             r["ratio_to_floor"]["cpu_us_per_delivery"], r["helper_cpu_us_per_delivery"],
             _gc_cell(r), f"{r['client_cpu_share']:.0%}")
            for r in fanout
        ]  # fmt: skip
        sections.append(_columns(head, body))
    sse = [r for r in rows if r["scenario"] == "sse"]
    if sse:
        # One line per transport: hearth's WebSocket fan-out of the same N, then SSE with
        # its ratios to it (x: SSE over WebSocket).
        head = ("scenario", "N", "server", "transport", "deliv/s", "p50 ms", "p99 ms",
                "max ms", "lost", "CPU us/deliv", "client CPU", "client us/deliv",
                "x deliv/s", "x p99", "x CPU")  # fmt: skip
        body = [
            (r["scenario"], r["n"], r["server"], run["transport"], run["deliveries_per_s"],
             run["p50_ms"], run["p99_ms"], run["max_ms"], run["lost"],
             run["cpu_us_per_delivery"], f"{run['client_cpu_share']:.0%}",
             run["client_cpu_us_per_delivery"], *ratios)
            for r in sse
            for run, ratios in (
                (r["websocket"], (None,) * len(SSE_RATIO_KEYS)),
                (r, tuple(r["ratio_to_websocket"][k] for k in SSE_RATIO_KEYS)),
            )
        ]  # fmt: skip
        sections.append(_columns(head, body))
    idle = [r for r in rows if r["scenario"] == "idle"]
    if idle:
        head = ("scenario", "N", "server", "KB/conn", "x floor", "connect s", "conn/s")
        body = [
            (r["scenario"], r["n"], r["server"], r["kb_per_connection"],
             r["ratio_to_floor"]["kb_per_connection"], r["connect_s"], r["connects_per_s"])
            for r in idle
        ]  # fmt: skip
        sections.append(_columns(head, body))
    durable = [r for r in rows if r["scenario"] == "durable"]
    if durable:
        head = ("scenario", "P", "rooms", "server", "acks/s", "200/s", "202/s", "p50 ms",
                "p99 ms", "max ms", "errors", "CPU us/pub", "+db us/pub", "client CPU")  # fmt: skip
        body = [
            (r["scenario"], r["publishers"], r["rooms"], r["server"], r["acks_per_s"],
             r["stored_per_s"], r["queued_per_s"], r["p50_ms"], r["p99_ms"], r["max_ms"],
             r["errors"], r["cpu_us_per_publish"], r["postgres_cpu_us_per_publish"],
             f"{r['client_cpu_share']:.0%}")
            for r in durable
        ]  # fmt: skip
        sections.append(_columns(head, body) + [f"durable cores: {r['cores']}" for r in durable])
    presence = [r for r in rows if r["scenario"] == "presence"]
    if presence:
        head = ("scenario", "N", "server", "join s", "joins/s", "CPU us/join", "+db us/join",
                "settled s", "listed", "query ms", "client CPU")  # fmt: skip
        body = [
            (r["scenario"], r["n"], r["server"], r["join_s"], r["joins_per_s"],
             r["cpu_us_per_join"], r["postgres_cpu_us_per_join"],
             r["settled_s"] if r["settled"] else f">{r['settled_s']}", r["presence_users"],
             r["presence_query_ms"], f"{r['client_cpu_share']:.0%}")
            for r in presence
        ]  # fmt: skip
        sections.append(_columns(head, body))
    slow = [r for r in rows if r["scenario"] == "slow"]
    if slow:
        head = ("scenario", "N", "stalled", "server", "p99 ms alone", "p99 ms", "x p99", "lost",
                "RSS +KB alone", "RSS +KB", "dropped", "GC max ms")  # fmt: skip
        body = [
            (r["scenario"], r["n"], r["stalled"], r["server"], r["baseline_p99_ms"], r["p99_ms"],
             r["p99_ratio"], r["lost"], r["baseline_rss_growth_kb"], r["rss_growth_kb"],
             r["stalled_dropped"], _gc_cell(r))
            for r in slow
        ]  # fmt: skip
        sections.append(_columns(head, body))
    cross = [r for r in rows if r["scenario"] == "cross"]
    if cross:
        # One line per run: 1 instance (the baseline), then 2 (publisher on A, readers on B).
        head = ("scenario", "N", "server", "instances", "deliv/s", "p50 ms", "p99 ms", "max ms",
                "lost", "x p99")  # fmt: skip
        body = [
            (r["scenario"], r["n"], r["server"], instances, run["deliveries_per_s"],
             run["p50_ms"], run["p99_ms"], run["max_ms"], run["lost"], ratio)
            for r in cross
            for instances, run, ratio in ((1, r["single"], None), (2, r["cross"], r["p99_ratio"]))
        ]  # fmt: skip
        sections.append(_columns(head, body))
    return "\n\n".join("\n".join(lines) for lines in sections)


def _gc_cell(row: dict) -> str:
    # An upper bound (the gauge could not tell the exact longest pause) is marked <=.
    if row["gc_max_ms"] is None:
        return "-"
    return f"{'' if row['gc_max_exact'] else '<='}{row['gc_max_ms']:.2f}"


def _columns(head: tuple[str, ...], body: list[tuple[object, ...]]) -> list[str]:
    cells = [[_fmt(v) for v in row] for row in [head, *body]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]


def run(args: argparse.Namespace) -> dict:
    """Run every scenario of *args* on its servers and return the results document."""
    _raise_file_limit()
    database = HearthDatabase() if _hearth_kinds(args.servers) else None
    if database is not None:
        database.prepare()  # PostgreSQL starts on the server core, before we leave it.
    pin(0, CLIENT_CORE)
    rows: list[dict] = []
    try:
        if {"fanout", "idle", "sse"} & set(args.scenarios):
            for n, rate in zip(args.subscribers, args.rates, strict=True):
                for name in args.servers:
                    websocket = None
                    if {"fanout", "idle"} & set(args.scenarios):
                        fanned, websocket = _fanout_and_idle(name, database, n, rate, args)
                        rows += fanned
                    if "sse" in args.scenarios and name in args.sse_servers:
                        rows.append(_sse(name, database, n, rate, args, websocket))
        if "durable" in args.scenarios and database is not None:
            rows.append(_durable(database, args))
        if "presence" in args.scenarios and database is not None:
            tokens = database.create_users(args.presence_users)
            database.create_rooms([PRESENCE_ROOM])
            for name in _hearth_kinds(args.servers):
                rows.append(_presence(name, database, tokens, args))
        if "slow" in args.scenarios:
            for name in args.servers:
                rows.append(_slow(name, database, args))
        if "cross" in args.scenarios and database is not None:
            rows.append(_cross(database, args))
    finally:
        if database is not None:
            database.cleanup()
    add_ratios(rows)
    return {
        "started_at": args.started_at,
        "argv": sys.argv[1:],
        "quick": args.quick,
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "pinned": pinning_available(),
        },
        "settings": {
            "subscribers": args.subscribers,
            "rates": args.rates,
            "duration_s": args.duration,
            "drain_s": args.drain,
            "servers": args.servers,
            "scenarios": args.scenarios,
            "publishers": args.publishers,
            "rooms": args.rooms,
            "presence_users": args.presence_users,
            "slow_subscribers": args.slow_subscribers,
            "slow_rate": args.slow_rate,
            "slow_duration_s": args.slow_duration,
            "slow_content_length": SLOW_CONTENT_LENGTH,
            "slow_send_buffer": SLOW_SEND_BUFFER,
            "cross_subscribers": args.cross_subscribers,
            "cross_rate": args.cross_rate,
            "sse_servers": args.sse_servers,
        },
        "rows": rows,
    }


def _say(what: str) -> None:
    print(f"# {what} ...", file=sys.stderr, flush=True)


def _run_on(work: Coroutine[Any, Any, T], *servers: Server) -> T:
    """Start *servers* in order, run the load generator's *work* against them, stop them."""
    with contextlib.ExitStack() as started:
        try:
            for server in servers:
                started.callback(server.stop)  # also stops one whose start failed halfway
                server.start()
        except BaseException:
            work.close()  # never started: no "never awaited" warning on top of the error
            raise
        return asyncio.run(work)


def _fanout_and_idle(
    name: str, database: HearthDatabase | None, n: int, rate: float, args: argparse.Namespace
) -> tuple[list[dict], dict]:
    """The rows of the fanout and idle scenarios asked for, and the run's figures in full."""
    _say(f"fanout N={n} server={name} rate={rate}/s")
    websocket = _websocket_fanout(name, database, n, rate, args)
    rows = []
    if "fanout" in args.scenarios:
        rows.append({"scenario": "fanout", "n": n, "server": name, **websocket["fanout"]})
    if "idle" in args.scenarios:
        rows.append({"scenario": "idle", "n": n, "server": name, **websocket["idle"]})
    return rows, websocket


def _websocket_fanout(
    name: str, database: HearthDatabase | None, n: int, rate: float, args: argparse.Namespace
) -> dict[str, dict]:
    server = make_server(name, database)
    fanout, idle = _run_on(run_fanout(server, n, rate, args.duration, args.drain), server)
    return {"fanout": fanout, "idle": idle}


def _sse(
    name: str,
    database: HearthDatabase | None,
    n: int,
    rate: float,
    args: argparse.Namespace,
    websocket: dict[str, dict] | None,
) -> dict:
    """hearth's fan-out to N SSE subscribers, beside its WebSocket fan-out of the same N.

    *websocket* is that WebSocket run when the fanout or idle scenario made it; else it
    runs here first. Each run has a fresh server, and the same publisher, rate and load.
    """
    if websocket is None:
        _say(f"sse N={n} server={name} transport=websocket rate={rate}/s")
        websocket = _websocket_fanout(name, database, n, rate, args)
    _say(f"sse N={n} server={name} transport=sse rate={rate}/s")
    server = make_server(name, database)
    sse, idle = _run_on(
        run_fanout(server, n, rate, args.duration, args.drain, transport="sse"), server
    )
    ws_fanout = websocket["fanout"]
    return {
        "scenario": "sse",
        "n": n,
        "server": name,
        **sse,
        "kb_per_connection": idle["kb_per_connection"],
        "connect_s": idle["connect_s"],
        "ratio_to_websocket": {k: _ratio(sse[k], ws_fanout[k]) for k in SSE_RATIO_KEYS},
        "websocket": {
            **ws_fanout,
            "kb_per_connection": websocket["idle"]["kb_per_connection"],
            "connect_s": websocket["idle"]["connect_s"],
        },
    }


def _durable(database: HearthDatabase, args: argparse.Namespace) -> dict:
    _say(f"durable P={args.publishers} rooms={args.rooms} server=hearth")
    database.create_rooms(durable_rooms(args.rooms))
    hearth = Hearth(database)
    hearth.start()
    # PostgreSQL leaves the server's core, so the server's CPU is not shared with it;
    # its fresh backends inherit the postmaster's new affinity.
    moved = database.pin_postgres(CLIENT_CORE)
    try:
        durable = asyncio.run(run_durable(hearth, args.publishers, args.rooms, args.duration))
    finally:
        hearth.stop()
        database.pin_postgres(SERVER_CORE)
    if not pinning_available():
        cores = "unpinned: server, PostgreSQL and load generator share every core"
    elif moved:
        cores = (
            f"server on core {SERVER_CORE}; PostgreSQL and load generator share core {CLIENT_CORE}"
        )
    else:
        cores = f"server and PostgreSQL share core {SERVER_CORE}; load generator on {CLIENT_CORE}"
    return {
        "scenario": "durable",
        "n": args.publishers,
        "server": "hearth",
        "postgres_core": CLIENT_CORE if moved else SERVER_CORE,
        "cores": cores,
        **durable,
    }


def _presence(
    name: str, database: HearthDatabase, tokens: list[str], args: argparse.Namespace
) -> dict:
    _say(f"presence N={len(tokens)} server={name}")
    server = make_server(name, database)
    assert isinstance(server, Hearth)
    presence = _run_on(run_presence(server, tokens, args.drain), server)
    return {"scenario": "presence", "n": len(tokens), "server": name, **presence}


def _slow(name: str, database: HearthDatabase | None, args: argparse.Namespace) -> dict:
    """The fan-out with and without stalled readers, on a fresh server each time."""
    n, rate = args.slow_subscribers, args.slow_rate
    stalled = max(1, round(n * STALLED_SHARE))
    runs = []
    for stalling in (0, stalled):
        _say(f"slow N={n} stalled={stalling} server={name} rate={rate}/s")
        server = make_server(name, database, SLOW_SEND_BUFFER)
        fanout, _ = _run_on(
            run_fanout(
                server, n, rate, args.slow_duration, args.drain,
                stalled=stalling, content_length=SLOW_CONTENT_LENGTH,
            ),
            server,
        )  # fmt: skip
        runs.append(fanout)
    alone, slow = runs
    return {
        "scenario": "slow",
        "n": n,
        "server": name,
        "stalled": slow["stalled"],
        "baseline_p99_ms": alone["p99_ms"],
        "p99_ms": slow["p99_ms"],
        "p99_ratio": _ratio(slow["p99_ms"], alone["p99_ms"]),
        "expected": slow["expected"],
        "received": slow["received"],
        "lost": slow["lost"],
        "baseline_lost": alone["lost"],
        "baseline_rss_growth_kb": alone["rss_growth_kb"],
        "rss_growth_kb": slow["rss_growth_kb"],
        "stalled_dropped": slow["stalled_dropped"],
        "slow_client_drops": slow["slow_client_drops"],
        "gc_max_ms": slow["gc_max_ms"],
        "gc_max_exact": slow["gc_max_exact"],
        "baseline": alone,
        "run": slow,
    }


def _cross(database: HearthDatabase, args: argparse.Namespace) -> dict:
    """The fan-out on one hearth, then with the publisher on another one, both on Redis.

    Fresh instances each time, all with the bridge on, so the second run differs from the
    first only in that every message crosses from one instance to the other through Redis.
    """
    n, rate = args.cross_subscribers, args.cross_rate
    redis_url = database.start_redis()
    _say(f"cross N={n} instances=1 server=hearth rate={rate}/s")
    alone = Hearth(database, redis_url=redis_url)
    single = _run_on(run_bridged_fanout(alone, alone, n, rate, args.duration, args.drain), alone)
    _say(f"cross N={n} instances=2 server=hearth rate={rate}/s")
    publisher_at = Hearth(database, redis_url=redis_url)
    subscribers_at = Hearth(database, redis_url=redis_url)
    crossed = _run_on(
        run_bridged_fanout(subscribers_at, publisher_at, n, rate, args.duration, args.drain),
        publisher_at,
        subscribers_at,
    )
    return {
        "scenario": "cross",
        "n": n,
        "server": "hearth",
        "p99_ratio": _ratio(crossed["p99_ms"], single["p99_ms"]),
        "single": single,
        "cross": crossed,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; exit 0."""
    args = parse_args(argv)
    args.started_at = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    document = run(args)
    print(render_table(document["rows"]))
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"{args.started_at}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
