"""What the floor and the socketio peer share: their command line and the send buffer cap."""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable

from aiohttp import web


def cap_send_buffer(app: web.Application, size: int) -> None:
    """Give every connection of *app* a kernel send buffer of *size* bytes (0: autotuned).

    The same cap hearth's HEARTH_WS_SEND_BUFFER sets, so that a client that stops reading
    pushes back on each server after as many bytes.
    """
    if not size:
        return

    async def cap(request: web.Request, response: web.StreamResponse) -> None:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    app.on_response_prepare.append(cap)


def serve(create_app: Callable[[], web.Application], description: str | None) -> None:
    """Serve the app of *create_app* on 127.0.0.1:``--port`` until killed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--send-buffer", type=int, default=0, help="kernel send buffer per connection (0: auto)"
    )
    args = parser.parse_args()
    app = create_app()
    cap_send_buffer(app, args.send_buffer)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)
