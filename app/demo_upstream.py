"""A demo upstream for status feeds: JSON-RPC and GET JSON that can be told to fail, hang or lie.

Run it with ``python -m app.demo_upstream --host 127.0.0.1 --port 8181 [--seed 7]`` and
switch its behaviour with ``POST /control {"mode": ...}``; ``GET /stats`` lists every call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from app.sources import PROBE_HEADER

__all__ = ["METHODS", "MODES", "DemoUpstream", "create_demo_app", "main"]

#: How the upstream answers: ok; fail (HTTP 500); hang (no answer until the mode changes);
#: garbage (200 with a non-JSON body); rpc_error (a JSON-RPC error object, or 502 for GET);
#: flap (ok or fail, switching every *period* seconds as the seed decides).
MODES = ("ok", "fail", "hang", "garbage", "rpc_error", "flap")


def _system_status(rng: random.Random, calls: int) -> dict[str, Any]:
    return {
        "cpu_percent": round(rng.uniform(2, 95), 1),
        "memory_percent": round(rng.uniform(20, 80), 1),
        "uptime_seconds": 3600 + 5 * calls,
    }


def _agent_status(rng: random.Random, calls: int) -> dict[str, Any]:
    agents = 4
    busy = rng.randint(0, agents)
    return {"agents": agents, "busy": busy, "idle": agents - busy, "tasks_done": 10 * calls}


def _compression_jobs(rng: random.Random, calls: int) -> dict[str, Any]:
    jobs = [
        {"id": f"job-{index}", "progress": min(100, (calls * 7 + index * 31) % 101)}
        for index in range(rng.randint(1, 3))
    ]
    return {"jobs": jobs, "queued": rng.randint(0, 5)}


#: The methods served, each building a plausible value from a seeded rng and its call count.
METHODS: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    "system_status": _system_status,
    "agent_status": _agent_status,
    "compression_jobs": _compression_jobs,
}


@dataclass
class DemoUpstream:
    """The demo's mutable state: its mode, its data and the log of every call it received."""

    #: Seeds the data and the flapping, so a run can be repeated.
    seed: int = 0
    #: One of :data:`MODES`.
    mode: str = "ok"
    #: Seconds between flap decisions.
    period: float = 1.0
    #: While true, every method repeats its last value.
    frozen: bool = False
    #: Every call: ``{"t": unix time, "method", "mode" (as answered), "probe": bool}``.
    calls: list[dict[str, Any]] = field(default_factory=list)
    _served: Counter[str] = field(default_factory=Counter)
    _last: dict[str, dict[str, Any]] = field(default_factory=dict)
    _flap_started: float = field(default_factory=time.monotonic)
    _mode_changed: asyncio.Event = field(default_factory=asyncio.Event)

    def set_mode(
        self,
        mode: str,
        *,
        seed: int | None = None,
        period: float | None = None,
        frozen: bool | None = None,
    ) -> None:
        """Switch to *mode*, optionally reseeding, changing the flap *period* or *frozen*."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if seed is not None:
            self.seed = seed
        if period is not None:
            if not period > 0:
                raise ValueError("period must be positive")
            self.period = period
        if frozen is not None:
            self.frozen = frozen
        self.mode = mode
        self._flap_started = time.monotonic()
        # Wake the hanging handlers; they look at the new mode.
        self._mode_changed.set()
        self._mode_changed = asyncio.Event()

    def effective_mode(self) -> str:
        """The mode a call arriving now gets: flap resolves to ok or fail."""
        if self.mode != "flap":
            return self.mode
        return self.flap_mode(int((time.monotonic() - self._flap_started) / self.period))

    def flap_mode(self, slot: int) -> str:
        """Whether flap answers ok or fail in period number *slot*, as the seed decides."""
        return "fail" if random.Random(f"{self.seed}:{slot}").random() < 0.5 else "ok"

    def value(self, method: str) -> dict[str, Any]:
        """The next value of *method*, deterministic given the seed and the call count."""
        if self.frozen and method in self._last:
            return self._last[method]
        served = self._served[method]
        self._served[method] += 1
        value = METHODS[method](random.Random(f"{self.seed}:{method}:{served}"), served)
        self._last[method] = value
        return value

    async def answer(self, request: web.Request, method: str) -> str:
        """Record the call and wait out ``hang``; return the mode to answer with."""
        mode = self.effective_mode()
        self.calls.append(
            {
                "t": time.time(),
                "method": method,
                "mode": mode,
                "probe": request.headers.get(PROBE_HEADER) == "1",
            }
        )
        while mode == "hang":
            await self._mode_changed.wait()
            mode = self.effective_mode()
        return mode

    def stats(self) -> dict[str, Any]:
        """Calls per method and per mode, and the whole calls log."""
        return {
            "mode": self.mode,
            "by_method": Counter(call["method"] for call in self.calls),
            "by_mode": Counter(call["mode"] for call in self.calls),
            "calls": self.calls,
        }


#: Where the app keeps its state.
UPSTREAM: web.AppKey[DemoUpstream] = web.AppKey("demo_upstream")


def _rpc_reply(request_id: Any, **body: Any) -> web.Response:
    return web.json_response({"jsonrpc": "2.0", "id": request_id, **body})


async def _rpc(request: web.Request) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    try:
        call = json.loads(await request.text())
    except ValueError:
        return _rpc_reply(None, error={"code": -32700, "message": "parse error"})
    if not isinstance(call, dict) or call.get("jsonrpc") != "2.0":
        return _rpc_reply(None, error={"code": -32600, "message": "invalid request"})
    method, request_id = call.get("method"), call.get("id")
    if method not in METHODS:
        return _rpc_reply(request_id, error={"code": -32601, "message": "method not found"})
    mode = await upstream.answer(request, method)
    if mode == "fail":
        return web.Response(status=500, text="internal server error")
    if mode == "garbage":
        return web.Response(text="<html>definitely not json", content_type="text/html")
    if mode == "rpc_error":
        return _rpc_reply(request_id, error={"code": -32000, "message": "backend exploded"})
    return _rpc_reply(request_id, result=upstream.value(method))


async def _get_status(request: web.Request) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    method = request.match_info["method"]
    if method not in METHODS:
        raise web.HTTPNotFound()
    mode = await upstream.answer(request, method)
    if mode == "fail":
        return web.Response(status=500, text="internal server error")
    if mode == "garbage":
        return web.Response(text="<html>definitely not json", content_type="text/html")
    if mode == "rpc_error":
        return web.json_response({"error": "backend exploded"}, status=502)
    return web.json_response(upstream.value(method))


async def _control(request: web.Request) -> web.Response:
    upstream = request.app[UPSTREAM]
    try:
        body = await request.json()
        upstream.set_mode(
            body["mode"],
            seed=body.get("seed"),
            period=body.get("period"),
            frozen=body.get("frozen"),
        )
    except (ValueError, KeyError, TypeError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(
        {
            "mode": upstream.mode,
            "seed": upstream.seed,
            "period": upstream.period,
            "frozen": upstream.frozen,
        }
    )


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[UPSTREAM].stats())


def create_demo_app(seed: int = 0) -> web.Application:
    """The demo upstream as an aiohttp app whose data and flapping follow *seed*."""
    app = web.Application()
    app[UPSTREAM] = DemoUpstream(seed=seed)
    app.router.add_post("/rpc", _rpc)
    app.router.add_get("/status/{method}", _get_status)
    app.router.add_post("/control", _control)
    app.router.add_get("/stats", _stats)
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the demo upstream; *argv* defaults to the command line."""
    parser = argparse.ArgumentParser(prog="python -m app.demo_upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8181)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    web.run_app(
        create_demo_app(args.seed),
        host=args.host,
        port=args.port,
        access_log=None,
        print=lambda text: print(text, flush=True),
    )


if __name__ == "__main__":
    main()
