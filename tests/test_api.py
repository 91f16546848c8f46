"""The HTTP API's JSON endpoints against a real app: bad bodies are 400s, never 500s."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from app.api import MAX_BODY_BYTES
from tests.conftest import Hearth, log_records

#: A body every JSON endpoint accepts; each reads its own fields and ignores the others.
ACCEPTED = {"username": "alice", "password": Hearth.PASSWORD, "name": "ops"}
#: Bodies no JSON endpoint may choke on, by what is wrong with them.
BAD_BODIES: dict[str, bytes] = {
    "empty": b"",
    "not UTF-8": b'{"name": "\xff\xfe"}',
    "UTF-16": json.dumps(ACCEPTED).encode("utf-16"),
    "malformed": b'{"name": ',
    "not an object": b'["name"]',
    "NaN": b'{"name": NaN}',
    "deeply nested list": b"[" * 50_000,
    "deeply nested value": b'{"name": ' + b'{"a": ' * 10_000,
    "5,000-digit number": b'{"name": ' + b"9" * 5_000 + b"}",
    "over the size limit": json.dumps({**ACCEPTED, "padding": "x" * MAX_BODY_BYTES}).encode(),
}
#: Each JSON endpoint's path, and the user whose bearer token it gets.
ENDPOINTS = {
    "login": ("/api/v1/auth/login", None),
    "create room": ("/api/v1/rooms", "root"),
    "add member": ("/api/v1/rooms/secret/members", "root"),
}


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 4096):
        yield body[start : start + 4096]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_bad_bodies_are_400_in_the_error_model(make_hearth, log_stream, endpoint):
    """Each bad body, chunked or not, gets 400 INVALID_MESSAGE and no ERROR log line."""
    path, user = ENDPOINTS[endpoint]
    hearth = await make_hearth()
    headers = {"Authorization": f"Bearer {hearth.tokens[user]}"} if user else {}
    url = hearth.server.make_url(path)
    answers = {}
    for what, body in BAD_BODIES.items():
        for chunked in (False, True):
            data = _chunks(body) if chunked else body
            async with hearth.session.post(url, data=data, headers=headers) as response:
                reply = await response.json(content_type=None)
                error = reply.get("ctrl", {}).get("params", {}).get("error")
                answers[what, chunked] = (response.status, error)
    async with hearth.session.post(url, json=ACCEPTED, headers=headers) as response:
        good_status = response.status

    assert answers == {key: (400, "INVALID_MESSAGE") for key in answers}
    assert good_status in (200, 201)
    records = log_records(log_stream)
    rejections = [r for r in records if r.get("error_code") == "INVALID_MESSAGE"]
    assert len(rejections) == 2 * len(BAD_BODIES)
    assert {r["level"] for r in rejections} == {"info"}
    assert [r for r in records if r["level"] in ("error", "fatal") or "stack" in r] == []


async def test_room_list_shows_each_user_the_rooms_they_may_enter_even_while_postgres_is_down(
    make_hearth, own_postgres
):
    """GET /api/v1/rooms: public rooms for everyone, a private room for its members and admins, 401 without a token; it reads the room directory, so it still answers with PostgreSQL stopped."""
    import asyncio

    hearth = await make_hearth(own_postgres.create_database("room_list"))

    async def names(user: str | None) -> tuple[int, list[str]]:
        headers = {"Authorization": f"Bearer {hearth.tokens[user]}"} if user else {}
        async with hearth.session.get(f"{hearth.url}api/v1/rooms", headers=headers) as response:
            body = await response.json()
            return response.status, [room["name"] for room in body.get("rooms", [])]

    assert await names("alice") == (200, ["lobby"])
    assert await names("bob") == (200, ["lobby", "secret"])  # bob is a member of secret
    assert await names("root") == (200, ["lobby", "secret"])
    assert (await names(None))[0] == 401
    await names("alice")  # alice's token is now known, for the outage
    await asyncio.to_thread(own_postgres.stop, "fast")
    try:
        assert await names("alice") == (200, ["lobby"])
    finally:
        await asyncio.to_thread(own_postgres.start)
