"""The peer: python-socketio's AsyncServer on aiohttp, ``python -m bench.socketio_server --port P``.

Every client joins the room ``lobby`` on connect; ``emit("pub", payload)`` is emitted to
the room as ``msg``, skipping the sender, as the floor skips it.
"""

from __future__ import annotations

import socketio
from aiohttp import web

from bench.serving import serve

#: The one room of the benchmark.
ROOM = "lobby"


def create_app() -> web.Application:
    """An aiohttp application serving Socket.IO at ``/socket.io/``."""
    sio = socketio.AsyncServer(async_mode="aiohttp", logger=False, engineio_logger=False)

    @sio.event
    async def connect(sid: str, environ: dict, auth: object = None) -> None:
        await sio.enter_room(sid, ROOM)

    @sio.event
    async def pub(sid: str, payload: object) -> None:
        await sio.emit("msg", payload, room=ROOM, skip_sid=sid)

    app = web.Application()
    sio.attach(app)
    return app


def main() -> None:
    """Serve on 127.0.0.1:*--port* until killed."""
    serve(create_app, __doc__)


if __name__ == "__main__":
    main()
