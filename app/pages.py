"""The browser side: the demo chat page at ``/`` and ``/static/``."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
from aiohttp import web

from app import keys
from app.sources import SYSTEM_SOURCE

__all__ = ["STATIC_DIR", "routes"]

#: The SDK (``hearth.js``), the demo page's script and its stylesheet.
STATIC_DIR = Path(__file__).resolve().parent / "static"

routes = web.RouteTableDef()


@routes.get("/")
@aiohttp_jinja2.template("index.html")
async def index(request: web.Request) -> dict[str, object]:
    """The demo chat page; it lists the status feeds this instance serves."""
    others = sorted(request.app[keys.STATUS_TOPICS] - {SYSTEM_SOURCE})
    return {"feeds": [SYSTEM_SOURCE, *others]}


routes.static("/static", STATIC_DIR)
