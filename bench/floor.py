"""The floor: a bare aiohttp WebSocket broadcast server, ``python -m bench.floor --port P``.

A text frame from any client goes to every other connected socket; nothing else.
"""

from __future__ import annotations

from aiohttp import WSMsgType, web

from bench.serving import serve

#: Every open WebSocket of this server.
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets", set)


async def broadcast(request: web.Request) -> web.WebSocketResponse:
    """Accept a WebSocket and send each of its text frames to every other socket."""
    ws = web.WebSocketResponse(autoping=True)
    await ws.prepare(request)
    sockets = request.app[SOCKETS]
    sockets.add(ws)
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            # Built once (send_frame skips the per-call encode), written to each socket.
            payload = msg.data.encode()
            for other in list(sockets):
                if other is not ws and not other.closed:
                    await other.send_frame(payload, WSMsgType.TEXT)
    finally:
        sockets.discard(ws)
    return ws


def create_app() -> web.Application:
    """The floor application: one route, ``/ws``."""
    app = web.Application()
    app[SOCKETS] = set()
    app.router.add_get("/ws", broadcast)
    return app


def main() -> None:
    """Serve on 127.0.0.1:*--port* until killed."""
    serve(create_app, __doc__)


if __name__ == "__main__":
    main()
