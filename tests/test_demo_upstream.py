"""The demo upstream: JSON-RPC and GET answers, every failure mode, the call log and the CLI."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from app.demo_upstream import METHODS, DemoUpstream, create_demo_app
from app.sources import PROBE_HEADER
from tests.conftest import demo_upstream_process


@pytest.fixture
async def upstream(aiohttp_client):
    """A test client of the demo upstream seeded with 7."""
    return await aiohttp_client(create_demo_app(seed=7))


async def rpc(client, method: str, **headers: str) -> aiohttp.ClientResponse:
    """POST one JSON-RPC call for *method*."""
    return await client.post(
        "/rpc", json={"jsonrpc": "2.0", "id": 1, "method": method}, headers=headers
    )


async def control(client, **body) -> dict:
    """Switch the demo's mode."""
    response = await client.post("/control", json=body)
    assert response.status == 200, await response.text()
    return await response.json()


async def test_every_method_answers_json_rpc_and_get(upstream):
    """Each method answers a JSON-RPC result for POST /rpc and plain JSON for GET /status."""
    for method in METHODS:
        reply = await (await rpc(upstream, method)).json()
        assert reply["jsonrpc"] == "2.0" and reply["id"] == 1 and isinstance(reply["result"], dict)
        response = await upstream.get(f"/status/{method}")
        assert response.status == 200 and isinstance(await response.json(), dict)
    unknown = await (await rpc(upstream, "nope")).json()
    assert unknown["error"]["code"] == -32601


def test_values_are_deterministic_per_seed_and_change_per_call():
    """The same seed gives the same sequence of values, and consecutive values differ."""
    first, second, other = DemoUpstream(seed=3), DemoUpstream(seed=3), DemoUpstream(seed=4)
    sequence = [first.value("agent_status") for _ in range(5)]
    assert sequence == [second.value("agent_status") for _ in range(5)]
    assert sequence != [other.value("agent_status") for _ in range(5)]
    assert len({repr(value) for value in sequence}) == 5


async def test_failure_modes_answer_as_documented(upstream):
    """fail is HTTP 500, garbage a 200 non-JSON body, rpc_error a JSON-RPC error object."""
    await control(upstream, mode="fail")
    assert (await rpc(upstream, "system_status")).status == 500
    await control(upstream, mode="garbage")
    response = await rpc(upstream, "system_status")
    assert response.status == 200
    with pytest.raises(ValueError):
        await response.json(content_type=None)
    await control(upstream, mode="rpc_error")
    reply = await (await rpc(upstream, "system_status")).json()
    assert "result" not in reply and reply["error"]["code"] == -32000
    assert (await upstream.get("/status/agent_status")).status == 502


async def test_hang_holds_the_reply_until_the_mode_changes(upstream):
    """In hang mode a call gets no answer until the mode changes, then gets the new mode's."""
    await control(upstream, mode="hang")
    pending = asyncio.create_task(rpc(upstream, "agent_status"))
    done, _ = await asyncio.wait({pending}, timeout=0.5)
    assert not done
    await control(upstream, mode="ok")
    response = await asyncio.wait_for(pending, 5)
    assert "result" in await response.json()


async def test_flap_alternates_deterministically_with_the_seed(upstream):
    """Flap mode answers ok in some periods and 500 in others, the same way for the same seed."""
    await control(upstream, mode="flap", seed=11, period=0.05)
    statuses = []
    for _ in range(40):
        statuses.append((await rpc(upstream, "system_status")).status)
        await asyncio.sleep(0.01)
    assert {200, 500} <= set(statuses)
    plan = [DemoUpstream(seed=11).flap_mode(slot) for slot in range(50)]
    assert plan == [DemoUpstream(seed=11).flap_mode(slot) for slot in range(50)]
    assert plan != [DemoUpstream(seed=12).flap_mode(slot) for slot in range(50)]


async def test_stats_log_every_call_with_time_mode_and_probe_flag(upstream):
    """GET /stats counts calls per method and mode and logs each with its time and probe flag."""
    before = time.time()
    await rpc(upstream, "agent_status")
    await rpc(upstream, "agent_status", **{PROBE_HEADER: "1"})
    await control(upstream, mode="fail")
    await upstream.get("/status/compression_jobs")
    stats = await (await upstream.get("/stats")).json()
    assert stats["by_method"] == {"agent_status": 2, "compression_jobs": 1}
    assert stats["by_mode"] == {"ok": 2, "fail": 1}
    assert [call["probe"] for call in stats["calls"]] == [False, True, False]
    assert all(before <= call["t"] <= time.time() for call in stats["calls"])


async def test_control_refuses_unknown_modes(upstream):
    """An unknown mode is refused with 400 and the mode stays as it was."""
    response = await upstream.post("/control", json={"mode": "explode"})
    assert response.status == 400
    assert (await (await upstream.get("/stats")).json())["mode"] == "ok"


async def test_command_line_serves_on_the_given_port():
    """``python -m app.demo_upstream --port N`` serves JSON-RPC on loopback until terminated."""
    async with demo_upstream_process(seed=5) as url, aiohttp.ClientSession() as session:
        payload = {"jsonrpc": "2.0", "id": 9, "method": "compression_jobs"}
        async with session.post(f"{url}/rpc", json=payload) as response:
            assert (await response.json())["id"] == 9
