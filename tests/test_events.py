"""Status feeds against a real demo upstream on loopback: breakers, stale cache, recovery, flapping."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from loguru import logger

from app import keys, metrics
from app.config import Settings
from app.demo_upstream import create_demo_app
from app.errors import ConfigError
from app.services import free_port
from app.sources import SYSTEM_SOURCE, parse_sources
from tests.conftest import demo_upstream_process, wait_until

#: Short timings so a whole outage fits in seconds: polls every 0.2 s, probes every 0.5 s,
#: and an open period long enough that only probes ever close a breaker here.
FAST = {
    "HEARTH_EVENT_INTERVAL": "0.2",
    "HEARTH_EVENT_TIMEOUT": "0.5",
    "HEARTH_BREAKER_OPEN_SECONDS": "5",
    "HEARTH_BREAKER_PROBE_SECONDS": "0.5",
    "HEARTH_HEARTBEAT_INTERVAL": "0.3",
}


class Upstream:
    """A demo upstream served on a real loopback socket, with its control and stats endpoints."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        #: Base URL, without a trailing slash.
        self.url = url
        self.session = session

    @property
    def port(self) -> int:
        """The TCP port it listens on."""
        return int(self.url.rsplit(":", 1)[1])

    async def control(self, mode: str, **options) -> None:
        """Switch to *mode* (ok, fail, hang, garbage, rpc_error, flap)."""
        async with self.session.post(f"{self.url}/control", json={"mode": mode, **options}) as r:
            assert r.status == 200, await r.text()

    async def calls(self, method: str | None = None) -> list[dict]:
        """Every call received so far (of *method*), each with its time, mode and probe flag."""
        async with self.session.get(f"{self.url}/stats") as response:
            calls = (await response.json())["calls"]
        return [call for call in calls if method is None or call["method"] == method]

    def sources(self, *specs: dict) -> str:
        """HEARTH_EVENT_SOURCES for *specs*, whose ``path`` is made a URL on this upstream."""
        return json.dumps([
            {**{k: v for k, v in spec.items() if k != "path"}, "url": self.url + spec["path"]}
            for spec in specs
        ])  # fmt: skip


@pytest.fixture
async def upstream(aiohttp_server):
    """The demo upstream (seed 7) in this process, on a real socket; released from hang at the end."""
    server = await aiohttp_server(create_demo_app(seed=7))
    async with aiohttp.ClientSession() as session:
        upstream = Upstream(str(server.make_url("")).rstrip("/"), session)
        yield upstream
        await upstream.control("ok")


#: One JSON-RPC feed on the demo upstream.
AGENT = {"name": "agent_status", "kind": "jsonrpc", "method": "agent_status", "path": "/rpc"}


def events_actor(hearth):
    """The running EventSubscriber."""
    return hearth.app[keys.SUPERVISOR].get("events")


def feed_status(hearth, name: str) -> dict:
    """The dashboard's view of feed *name*."""
    return events_actor(hearth).status()["feeds"][name]


def is_event(frame: dict, event_type: str, code: str | None = None) -> bool:
    """Whether *frame* is an event of *event_type* (and, for errors, of *code*)."""
    event = frame.get("event")
    if event is None or event["type"] != event_type:
        return False
    return code is None or event["data"].get("code") == code


async def frames_until(client, predicate, timeout: float = 10.0) -> list[dict]:
    """Every frame received up to and including the first matching *predicate*."""
    frames = list(client.inbox)
    client.inbox.clear()
    for index, frame in enumerate(frames):
        if predicate(frame):
            client.inbox.extend(frames[index + 1 :])
            return frames[: index + 1]
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no matching frame among {len(frames)}")
        frames.append(await client.receive(remaining))
        if predicate(frames[-1]):
            return frames


def leaks(frames: list[dict], upstream: Upstream) -> list[str]:
    """Texts in *frames* that give away the upstream's address or an exception."""
    text = json.dumps(frames)
    suspects = ["127.0.0.1", str(upstream.port), "localhost", "HTTP", "Error:", "Traceback"]
    return [suspect for suspect in suspects if suspect in text]


def transitions_metric(source: str, state: str) -> float:
    """hearth_breaker_transitions_total for *source* entering *state*."""
    return metrics.BREAKER_TRANSITIONS.labels(source, state)._value.get()


async def test_new_subscriber_gets_the_system_feed_at_once(make_hearth):
    """The built-in system feed is live on a fresh install and a new subscriber gets it at once."""
    hearth = await make_hearth(HEARTH_EVENT_INTERVAL="30")
    deadline = time.monotonic() + 5
    while feed_status(hearth, SYSTEM_SOURCE)["last_success"] is None:
        assert time.monotonic() < deadline, "the system feed was never polled"
        await asyncio.sleep(0.02)
    client = await hearth.connect("alice")
    started = time.monotonic()
    assert (await client.request("sub", topic="status:system_status"))["code"] == 200
    frame = await client.wait_for(lambda f: is_event(f, "system_status"), timeout=2)
    # The next poll is 30 s away, so this value came from the cache.
    assert time.monotonic() - started < 2
    data = frame["event"]["data"]
    assert (data["source"], data["is_stale"]) == ("system_status", False)
    assert data["cached_at"] == feed_status(hearth, SYSTEM_SOURCE)["last_success"]
    value = data["value"]
    assert len(value["cpu"]["load"]) == 3 and value["cpu"]["process_percent"] >= 0
    assert value["memory"]["rss_bytes"] > 10 * 1024 * 1024
    assert value["memory"]["available_bytes"] > 0
    assert value["disk"]["free_bytes"] > 0
    assert value["connections"] == 0  # polled before anyone connected


async def test_system_feed_reports_connections_and_loop_lag(make_hearth):
    """Later polls of the system feed count connected clients and measure event-loop lag."""
    hearth = await make_hearth(**FAST)
    clients = [await hearth.connect("bob") for _ in range(3)]
    await clients[0].request("sub", topic="status:system_status")
    frame = await clients[0].wait_for(
        lambda f: (
            is_event(f, "system_status")
            and f["event"]["data"]["value"]["connections"] == 3
            and f["event"]["data"]["value"]["loop_lag_ms"] is not None
        ),
        timeout=5,
    )
    assert 0 <= frame["event"]["data"]["value"]["loop_lag_ms"] < 1000


async def test_outage_opens_the_breaker_serves_stale_data_and_recovers(make_hearth, upstream):
    """3 failures open the breaker and stale data is served; a probe closes it, then fresh data."""
    opened_before = transitions_metric("agent_status", "open")
    closed_before = transitions_metric("agent_status", "closed")
    hearth = await make_hearth(HEARTH_EVENT_SOURCES=upstream.sources(AGENT), **FAST)
    client = await hearth.connect("alice")
    await client.request("sub", topic="status:agent_status")
    fresh = (await client.wait_for(lambda f: is_event(f, "agent_status")))["event"]["data"]
    assert fresh["is_stale"] is False and fresh["value"]["agents"] == 4
    await upstream.control("fail")
    outage = await frames_until(client, lambda f: is_event(f, "error", "CIRCUIT_OPEN"))
    opened_at = time.time()

    failures = [f["event"]["data"] for f in outage if is_event(f, "error", "RPC_FAILURE")]
    assert len(failures) == 3
    assert all(
        (d["severity"], d["source"], d["message"])
        == ("error", "agent_status", "status poll failed")
        for d in failures
    )
    [stale] = [f["event"]["data"] for f in outage if is_event(f, "agent_status")][-1:]
    last_good = feed_status(hearth, "agent_status")
    assert stale["is_stale"] is True
    assert stale["cached_at"] == last_good["last_success"]
    assert stale["value"] is not None and stale["value"]["agents"] == 4
    assert stale["error"] == {
        "code": "RPC_UNAVAILABLE",
        "message": "upstream unavailable; showing cached data",
        "severity": "warning",
    }
    failed_calls = [c for c in await upstream.calls() if c["mode"] == "fail"]
    assert [c["probe"] for c in failed_calls] == [False, False, False]

    # Open: only probes reach the upstream, one per 0.5 s.
    await asyncio.sleep(1.6)
    status = feed_status(hearth, "agent_status")
    assert status["breaker"]["state"] == "open"
    assert status["breaker"]["consecutive_failures"] == 3
    assert status["is_stale"] is True and status["cache_age_seconds"] >= 1.6
    while_open = [c for c in await upstream.calls() if c["t"] > opened_at]
    assert all(c["probe"] for c in while_open)
    assert 2 <= len(while_open) <= 4
    assert status["calls"]["rejected"] >= 5  # polls refused without a call

    await upstream.control("ok")
    recovery = await frames_until(client, lambda f: is_event(f, "error", "RPC_RECOVERED"))
    recovered = recovery[-1]["event"]["data"]
    assert (recovered["severity"], recovered["message"]) == ("warning", "upstream recovered")
    after = await client.wait_for(lambda f: is_event(f, "agent_status"))
    assert after["event"]["data"]["is_stale"] is False
    assert "error" not in after["event"]["data"]
    assert not [f for f in recovery if is_event(f, "agent_status")]  # recovered came first
    assert feed_status(hearth, "agent_status")["breaker"]["state"] == "closed"
    assert transitions_metric("agent_status", "open") == opened_before + 1
    assert transitions_metric("agent_status", "closed") == closed_before + 1
    assert leaks([*outage, *recovery, after], upstream) == []
    await wait_until(
        lambda: not hearth.app[keys.SUPERVISOR].get("db_monitor")._pending_events, 5, "the flush"
    )
    store = hearth.app[keys.STORE]

    async def upstream_events(cursor) -> list[tuple[str, str]]:
        await cursor.execute(
            "select", "connection_events",
            "SELECT previous, state FROM connection_events"
            " WHERE component = 'upstream:agent_status' ORDER BY id",
        )  # fmt: skip
        return [tuple(row) for row in await cursor.fetchall()]

    assert await store.run(upstream_events, name="test") == [("closed", "open"), ("open", "closed")]


async def test_without_a_cache_the_stale_event_says_there_is_no_data(make_hearth, upstream):
    """An upstream down from the start yields a stale event with no value saying so."""
    await upstream.control("fail")
    hearth = await make_hearth(HEARTH_EVENT_SOURCES=upstream.sources(AGENT), **FAST)
    client = await hearth.connect("alice")
    await client.request("sub", topic="status:agent_status")
    data = (await client.wait_for(lambda f: is_event(f, "agent_status")))["event"]["data"]
    assert (data["value"], data["cached_at"], data["is_stale"]) == (None, None, True)
    assert data["error"]["message"] == "upstream unavailable; no data yet"
    assert data["error"]["code"] == "RPC_UNAVAILABLE"


async def test_hanging_upstream_times_out_and_the_poll_cadence_holds(make_hearth, upstream):
    """A hanging upstream costs one timed-out call at a time while every other feed keeps its pace."""
    hearth = await make_hearth(
        HEARTH_EVENT_SOURCES=upstream.sources({**AGENT, "timeout": 0.4}), **FAST
    )
    client = await hearth.connect("alice")
    await client.request("sub", topic="status:agent_status")
    await client.wait_for(lambda f: is_event(f, "agent_status"))
    await client.request("sub", topic="status:system_status")
    await upstream.control("hang")
    hang_started = time.time()
    outage = await frames_until(client, lambda f: is_event(f, "error", "CIRCUIT_OPEN"), timeout=5)
    await asyncio.sleep(1.0)
    elapsed = time.time() - hang_started
    outage += await frames_until(client, lambda f: is_event(f, "heartbeat"))

    hung = [c for c in await upstream.calls("agent_status") if c["mode"] == "hang"]
    polls = [c["t"] for c in hung if not c["probe"]]
    assert len(polls) == 3
    gaps = [later - earlier for earlier, later in zip(polls, polls[1:], strict=False)]
    # Each call waits out its 0.4 s timeout; the next follows on the next 0.2 s tick.
    assert all(0.35 <= gap <= 0.4 + 0.2 + 0.15 for gap in gaps), gaps
    status = feed_status(hearth, "agent_status")
    # A probe may be under way (received upstream, not yet timed out) as the status is read.
    assert len(hung) - status["calls"]["timeout"] in (0, 1)
    assert status["breaker"]["last_failure"] == "TimeoutError"
    # The mailbox never waited on the hung calls: the system feed kept its 0.2 s interval.
    system = [f for f in outage if is_event(f, "system_status")]
    assert len(system) >= 0.6 * elapsed / 0.2
    assert any(is_event(f, "error", "RPC_FAILURE") for f in outage)
    assert leaks(outage, upstream) == []


@pytest.mark.parametrize(
    ("mode", "kind", "outcome"),
    [
        ("garbage", "jsonrpc", "invalid_reply"),
        ("garbage", "get", "invalid_reply"),
        ("rpc_error", "jsonrpc", "rpc_error"),
        ("fail", "get", "http_status"),
    ],
)
async def test_bad_replies_count_as_failures(make_hearth, upstream, mode, kind, outcome):
    """Garbage, JSON-RPC errors and non-2xx replies each count as failures and open the breaker."""
    spec = AGENT if kind == "jsonrpc" else {**AGENT, "kind": "get", "path": "/status/agent_status"}
    hearth = await make_hearth(HEARTH_EVENT_SOURCES=upstream.sources(spec), **FAST)
    client = await hearth.connect("alice")
    await client.request("sub", topic="status:agent_status")
    await client.wait_for(lambda f: is_event(f, "agent_status"))
    await upstream.control(mode)
    frames = await frames_until(client, lambda f: is_event(f, "error", "CIRCUIT_OPEN"))
    status = feed_status(hearth, "agent_status")
    assert status["calls"][outcome] == 3
    assert status["breaker"]["state"] == "open"
    stale = [f["event"]["data"] for f in frames if is_event(f, "agent_status")]
    assert stale[-1]["is_stale"] is True and stale[-1]["value"]["agents"] == 4
    assert leaks(frames, upstream) == []


async def test_unreachable_upstream_is_a_connection_error(make_hearth):
    """A refused connection counts as a failure and opens the breaker."""
    url = f"http://127.0.0.1:{free_port()}/rpc"
    sources = json.dumps([{"name": "agent_status", "url": url, "method": "agent_status"}])
    # Polls 1 s apart: the breaker opens on the third failure, after the client subscribed
    # even on a loaded machine (an event sent before the subscription reaches nobody).
    hearth = await make_hearth(
        HEARTH_EVENT_SOURCES=sources, **{**FAST, "HEARTH_EVENT_INTERVAL": "1.0"}
    )
    client = await hearth.connect("alice")
    await client.request("sub", topic="status:agent_status")
    frames = await frames_until(client, lambda f: is_event(f, "error", "CIRCUIT_OPEN"), timeout=15)
    assert feed_status(hearth, "agent_status")["calls"]["connection_error"] == 3
    assert url.rsplit(":", 1)[1].split("/")[0] not in json.dumps(frames)


async def test_equal_values_are_not_rebroadcast_but_heartbeats_show_the_poll(make_hearth, upstream):
    """A poll returning the cached value sends nothing, while the heartbeat's feed time advances."""
    await upstream.control("ok", frozen=True)
    hearth = await make_hearth(HEARTH_EVENT_SOURCES=upstream.sources(AGENT), **FAST)
    client = await hearth.connect("alice")
    await client.request("sub", topic="status:agent_status")
    await client.wait_for(lambda f: is_event(f, "agent_status"))
    first = await client.wait_for(lambda f: is_event(f, "heartbeat"))
    polls_before = feed_status(hearth, "agent_status")["calls"]["ok"]
    await asyncio.sleep(1.2)
    later = await client.wait_for(lambda f: is_event(f, "heartbeat"))
    assert feed_status(hearth, "agent_status")["calls"]["ok"] >= polls_before + 4
    assert client.take("event", lambda e: e["type"] == "agent_status") == []
    seen = [first["event"]["data"]["feeds"]["agent_status"]]
    seen.append(later["event"]["data"]["feeds"]["agent_status"])
    assert seen[0] is not None and seen[1] > seen[0]
    assert "system_status" in later["event"]["data"]["feeds"]


async def test_breaker_and_cache_survive_an_actor_restart(make_hearth, upstream):
    """A crashed EventSubscriber restarts with its breaker still open and its cache intact."""
    hearth = await make_hearth(
        HEARTH_EVENT_SOURCES=upstream.sources(AGENT), HEARTH_RESTART_INITIAL="0.1", **FAST
    )
    client = await hearth.connect("alice")
    await client.request("sub", topic="status:agent_status")
    await client.wait_for(lambda f: is_event(f, "agent_status"))
    await upstream.control("fail")
    await client.wait_for(lambda f: is_event(f, "error", "CIRCUIT_OPEN"))
    cached_at = feed_status(hearth, "agent_status")["last_success"]
    actor = events_actor(hearth)
    actor.cast(object())  # no handler: the actor crashes
    deadline = time.monotonic() + 5
    while actor.restarts == 0 or not actor.ready.is_set():
        assert time.monotonic() < deadline, "the actor did not restart"
        await asyncio.sleep(0.02)
    restarted_at = time.time()
    await asyncio.sleep(1.2)
    status = feed_status(hearth, "agent_status")
    assert status["breaker"]["state"] == "open" and status["last_success"] == cached_at
    after_restart = [c for c in await upstream.calls() if c["t"] > restarted_at]
    assert after_restart and all(c["probe"] for c in after_restart)
    await upstream.control("ok")
    await client.wait_for(lambda f: is_event(f, "error", "RPC_RECOVERED"))


def test_sources_config_is_parsed_with_defaults(tmp_path):
    """Sources come from JSON or an @file, with the default interval and timeout filled in."""
    spec = [
        {"name": "agent_status", "url": "http://h:1/rpc"},
        {"name": "jobs", "url": "https://h/s", "kind": "get", "interval": 2, "timeout": 0.5},
    ]
    path = tmp_path / "sources.json"
    path.write_text(json.dumps(spec))
    for raw in (json.dumps(spec), f"@{path}"):
        agent, jobs = parse_sources(raw, default_interval=5, default_timeout=3)
        assert (agent.kind, agent.method, agent.interval, agent.timeout) == (
            "jsonrpc", "agent_status", 5, 3
        )  # fmt: skip
        assert (jobs.kind, jobs.method, jobs.interval, jobs.timeout) == ("get", None, 2, 0.5)
    settings = Settings.from_env({"HEARTH_EVENT_SOURCES": f"@{path}"})
    assert [s.name for s in settings.sources()] == [SYSTEM_SOURCE, "agent_status", "jobs"]


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        '{"name": "a"}',
        '[{"name": "Bad-Name", "url": "http://h/"}]',
        '[{"name": "a", "url": "ftp://h/"}]',
        '[{"name": "a", "url": "http://h/", "kind": "soap"}]',
        '[{"name": "a", "url": "http://h/", "interval": 0}]',
        '[{"name": "a", "url": "http://h/", "timeout": "fast"}]',
        '[{"name": "a", "url": "http://h/", "colour": "red"}]',
        '[{"name": "a", "url": "http://h/"}, {"name": "a", "url": "http://h/"}]',
        '[{"name": "system_status", "url": "http://h/"}]',
        "@/nonexistent/sources.json",
    ],
)
def test_invalid_sources_name_the_variable(raw):
    """Each invalid sources config raises ConfigError naming HEARTH_EVENT_SOURCES."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"HEARTH_EVENT_SOURCES": raw})
    assert caught.value.variable == "HEARTH_EVENT_SOURCES"


@given(st.text(max_size=60))
def test_any_sources_text_parses_or_is_a_config_error(raw):
    """Whatever the variable holds, Settings either loads or raises ConfigError, never crashes."""
    try:
        Settings.from_env({"HEARTH_EVENT_SOURCES": raw})
    except ConfigError as exc:
        assert exc.variable == "HEARTH_EVENT_SOURCES"


# -- the long flapping scenario ----------------------------------------------------------------

#: How long the upstream flaps, in seconds.
FLAP_SECONDS = 60
#: WebSocket clients connected throughout.
FLAP_CLIENTS = 50
#: The flapping feeds and the upstream method each polls.
FLAP_FEEDS = {"agent_status": "agent_status", "compression_update": "compression_jobs"}


@pytest.fixture
async def upstream_process():
    """The demo upstream as its own process (``python -m app.demo_upstream``) on loopback."""
    async with demo_upstream_process(seed=1234) as url, aiohttp.ClientSession() as session:
        yield Upstream(url, session)


@pytest.fixture
def breaker_logs():
    """Every log record of the circuit breakers while the test runs."""
    records: list[dict] = []
    handler = logger.add(
        lambda message: records.append(message.record),
        level="INFO",
        filter=lambda record: record["extra"].get("component") == "breaker",
    )
    yield records
    logger.remove(handler)


class Watcher:
    """One connected client that reads everything and notes what it saw and when."""

    def __init__(self, client) -> None:
        self.client = client
        #: Event frames seen, by type (errors by code).
        self.seen: dict[str, int] = {}
        #: Monotonic times of the heartbeats.
        self.heartbeats: list[float] = []
        #: How the socket ended, if it did.
        self.ended: str | None = None

    async def watch(self) -> None:
        """Read until cancelled or until the socket ends."""
        try:
            while True:
                event = (await self.client.receive(timeout=30)).get("event")
                if event is None:
                    continue
                kind = event["data"]["code"] if event["type"] == "error" else event["type"]
                if event["type"] in FLAP_FEEDS and event["data"]["is_stale"]:
                    kind += ":stale"
                self.seen[kind] = self.seen.get(kind, 0) + 1
                if event["type"] == "heartbeat":
                    self.heartbeats.append(time.monotonic())
        except (ConnectionError, TimeoutError) as exc:
            self.ended = repr(exc)


@pytest.mark.slow
async def test_flapping_upstream_for_a_minute_with_50_clients(
    make_hearth, upstream_process, breaker_logs
):
    """A seeded flapping upstream for 60 s: no client drops, every transition is logged and
    counted, and while a breaker is open the upstream sees nothing but probes."""
    upstream = upstream_process
    sources = upstream.sources(
        {"name": "agent_status", "method": "agent_status", "path": "/rpc"},
        {"name": "compression_update", "kind": "get", "path": "/status/compression_jobs"},
    )
    hearth = await make_hearth(
        HEARTH_EVENT_SOURCES=sources,
        HEARTH_EVENT_INTERVAL="0.25",
        HEARTH_EVENT_TIMEOUT="0.5",
        HEARTH_BREAKER_OPEN_SECONDS="3",
        HEARTH_BREAKER_PROBE_SECONDS="0.5",
        HEARTH_HEARTBEAT_INTERVAL="0.5",
    )
    watchers = []
    for index in range(FLAP_CLIENTS):
        client = await hearth.connect(("alice", "bob", "carol")[index % 3])
        for topic in ("status:agent_status", "status:compression_update", "status:system_status"):
            assert (await client.request("sub", topic=topic))["code"] == 200
        watchers.append(Watcher(client))
    readers = [asyncio.create_task(watcher.watch()) for watcher in watchers]
    await upstream.control("flap", seed=1234, period=1.5)
    await asyncio.sleep(FLAP_SECONDS)
    await upstream.control("ok")
    await asyncio.sleep(1.5)  # time for the last probe to close any open breaker
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)

    # No client was dropped and the heartbeat never paused for long.
    assert [w.ended for w in watchers if w.ended] == []
    assert all(not w.client.ws.closed for w in watchers)
    longest_silence = max(
        max(b - a for a, b in zip(w.heartbeats, w.heartbeats[1:], strict=False)) for w in watchers
    )
    assert longest_silence < 2.0
    calls = await upstream.calls()
    for name, method in FLAP_FEEDS.items():
        status = feed_status(hearth, name)
        logged = [r for r in breaker_logs if r["extra"]["breaker"] == f"upstream:{name}"]
        # Every transition is logged: WARNING when opening, INFO otherwise.
        assert len(logged) == status["breaker"]["transitions"] >= 6
        assert all(
            r["level"].name == ("WARNING" if r["extra"]["to_state"] == "open" else "INFO")
            for r in logged
        )
        assert status["breaker"]["state"] == "closed"
        # While open, the upstream saw probes only.
        windows = open_windows(logged)
        assert len(windows) >= 3
        feed_calls = [c for c in calls if c["method"] == method]
        while_open = [c for c in feed_calls if any(a < c["t"] < b for a, b in windows)]
        regular_while_open = [c for c in while_open if not c["probe"]]
        assert regular_while_open == []
        assert len(while_open) == status["probes"]
        open_time = sum(b - a for a, b in windows)
        assert len(while_open) <= open_time / 0.5 + len(windows)
        print(
            f"\n{name}: {len(feed_calls)} calls, {len(logged)} transitions, "
            f"{len(windows)} open windows ({open_time:.1f} s), {len(while_open)} calls while "
            f"open, all probes; rejected polls {status['calls'].get('rejected', 0)}"
        )
    # Every client saw both faces of every flapping feed.
    for watcher in watchers:
        for name in FLAP_FEEDS:
            assert watcher.seen.get(name, 0) > 0 and watcher.seen.get(f"{name}:stale", 0) > 0
        assert watcher.seen.get("CIRCUIT_OPEN", 0) > 0 and watcher.seen.get("RPC_RECOVERED", 0) > 0


def open_windows(records: list[dict]) -> list[tuple[float, float]]:
    """(opened, left open) unix-time pairs from one breaker's transition log records."""
    windows, opened = [], None
    for record in records:
        moment = record["time"].timestamp()
        if record["extra"]["to_state"] == "open" and opened is None:
            opened = moment
        elif record["extra"]["to_state"] != "open" and opened is not None:
            windows.append((opened, moment))
            opened = None
    return windows
