"""``python -m bench``: fan-out of hearth, the floor and socketio; durable publishes of hearth.

Each server runs pinned to core 0 (hearth's PostgreSQL too), the load generator on core 1;
for the durable scenario PostgreSQL moves to core 1, beside the load generator.
Prints a table and writes bench/results/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import resource
import sys
from pathlib import Path

from bench.loadgen import durable_rooms, run_durable, run_fanout
from bench.servers import (
    CLIENT_CORE,
    KINDS,
    SERVER_CORE,
    Hearth,
    Server,
    pin,
    pinning_available,
)

#: Every scenario, in the order they run; fan-out and idle are measured in one pass.
SCENARIOS = ("fanout", "idle", "durable")

#: Where each run's JSON lands.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` swaps in a tiny smoke-test run."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="20 subscribers, 2 s; durable 4 publishers on 2 rooms: a smoke test",
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
    parser.add_argument("--output", type=Path, default=RESULTS_DIR, help="folder of the JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.subscribers, args.rate, args.duration, args.drain = "20", 50.0, 2.0, 5.0
        args.publishers, args.rooms = 4, 2
    if args.publishers < 1 or args.rooms < 1:
        parser.error("--publishers and --rooms must be at least 1")
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
    return args


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
    """The stdout table: fan-out rows, then idle rows."""
    lines = []
    head: tuple[str, ...]
    body: list[tuple[object, ...]]
    fanout = [r for r in rows if r["scenario"] == "fanout"]
    if fanout:
        head = ("scenario", "N", "server", "deliv/s", "p50 ms", "p99 ms", "max ms", "lost",
                "CPU us/deliv", "x floor", "+db us/deliv", "client CPU")  # fmt: skip
        body = [
            (r["scenario"], r["n"], r["server"], r["deliveries_per_s"], r["p50_ms"], r["p99_ms"],
             r["max_ms"], r["lost"], r["cpu_us_per_delivery"],
             r["ratio_to_floor"]["cpu_us_per_delivery"], r["helper_cpu_us_per_delivery"],
             f"{r['client_cpu_share']:.0%}")
            for r in fanout
        ]  # fmt: skip
        lines += _columns(head, body)
    idle = [r for r in rows if r["scenario"] == "idle"]
    if idle:
        lines.append("")
        head = ("scenario", "N", "server", "KB/conn", "x floor", "connect s", "conn/s")
        body = [
            (r["scenario"], r["n"], r["server"], r["kb_per_connection"],
             r["ratio_to_floor"]["kb_per_connection"], r["connect_s"], r["connects_per_s"])
            for r in idle
        ]  # fmt: skip
        lines += _columns(head, body)
    durable = [r for r in rows if r["scenario"] == "durable"]
    if durable:
        lines.append("")
        head = ("scenario", "P", "rooms", "server", "acks/s", "200/s", "202/s", "p50 ms",
                "p99 ms", "max ms", "errors", "CPU us/pub", "+db us/pub", "client CPU")  # fmt: skip
        body = [
            (r["scenario"], r["publishers"], r["rooms"], r["server"], r["acks_per_s"],
             r["stored_per_s"], r["queued_per_s"], r["p50_ms"], r["p99_ms"], r["max_ms"],
             r["errors"], r["cpu_us_per_publish"], r["postgres_cpu_us_per_publish"],
             f"{r['client_cpu_share']:.0%}")
            for r in durable
        ]  # fmt: skip
        lines += _columns(head, body)
        lines += [f"durable cores: {r['cores']}" for r in durable]
    return "\n".join(lines)


def _columns(head: tuple[str, ...], body: list[tuple[object, ...]]) -> list[str]:
    cells = [[_fmt(v) for v in row] for row in [head, *body]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]


def run(args: argparse.Namespace) -> dict:
    """Run every (N, server) pair of *args* and return the results document."""
    _raise_file_limit()
    hearth: Hearth | None = Hearth() if "hearth" in args.servers else None
    if hearth is not None:
        hearth.prepare()  # PostgreSQL starts on the server core, before we leave it.
    pin(0, CLIENT_CORE)
    rows: list[dict] = []
    fanout_or_idle = {"fanout", "idle"} & set(args.scenarios)
    try:
        for n, rate in zip(args.subscribers, args.rates, strict=True):
            if not fanout_or_idle:
                break
            for name in args.servers:
                server: Server = hearth if name == "hearth" and hearth else KINDS[name]()
                print(
                    f"# fanout N={n} server={name} rate={rate}/s ...", file=sys.stderr, flush=True
                )
                server.start()
                try:
                    fanout, idle = asyncio.run(
                        run_fanout(server, n, rate, args.duration, args.drain)
                    )
                finally:
                    server.stop()
                if "fanout" in args.scenarios:
                    rows.append({"scenario": "fanout", "n": n, "server": name, **fanout})
                if "idle" in args.scenarios:
                    rows.append({"scenario": "idle", "n": n, "server": name, **idle})
        if "durable" in args.scenarios and hearth is not None:
            rows.append(_durable(hearth, args))
    finally:
        if hearth is not None:
            hearth.cleanup()
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
        },
        "rows": rows,
    }


def _durable(hearth: Hearth, args: argparse.Namespace) -> dict:
    print(
        f"# durable P={args.publishers} rooms={args.rooms} server=hearth ...",
        file=sys.stderr,
        flush=True,
    )
    hearth.create_rooms(durable_rooms(args.rooms))
    hearth.start()
    # PostgreSQL leaves the server's core, so the server's CPU is not shared with it;
    # its fresh backends inherit the postmaster's new affinity.
    moved = hearth.pin_postgres(CLIENT_CORE)
    try:
        durable = asyncio.run(run_durable(hearth, args.publishers, args.rooms, args.duration))
    finally:
        hearth.stop()
        hearth.pin_postgres(SERVER_CORE)
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
