"""Auth against a real PostgreSQL: passwords, tokens, throttling and the HTTP API."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import statistics
import time
from datetime import UTC, datetime, timedelta

import aiopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.db_monitor import DbMonitor
from app import keys
from app.api import client_address
from app.auth import (
    DUMMY_HASH,
    Authenticator,
    User,
    check_username,
    hash_password,
    token_hash,
    verify_password,
)
from app.config import Settings
from app.errors import (
    AuthFailed,
    ConfigError,
    Conflict,
    DatabaseError,
    DatabaseRejected,
    ValidationError,
)
from app.log import setup_logging
from app.ratelimit import KeyedBuckets
from app.store import Store
from app.web import create_app
from tests.conftest import Hearth
from tests.test_ratelimit import redis_db_url

#: The password of every user the fixtures create.
PASSWORD = "correct horse battery staple"


class FakeClock:
    """Epoch seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock *seconds* forward."""
        self.now += seconds


@pytest.fixture(scope="session")
def password_hash() -> str:
    """One scrypt hash of PASSWORD, shared so the suite runs scrypt only where it matters."""
    return hash_password(PASSWORD)


@pytest.fixture
async def store(database):
    """A migrated store on a fresh database."""
    store = Store(database, timeout=5)
    await store.open()
    await store.migrate()
    yield store
    await store.close()


@pytest.fixture
async def users(store, password_hash) -> dict[str, str]:
    """Ids of alice and bob (users) and root (an admin), all with PASSWORD."""
    return {
        "alice": await store.create_user("alice", password_hash),
        "bob": await store.create_user("bob", password_hash),
        "root": await store.create_user("root", password_hash, is_admin=True),
    }


def authenticator(
    store, *, clock=time.time, ttl: float = 3600, burst: float = 100, recheck: float = 0.0
):
    """An authenticator on *store* whose throttles allow *burst* attempts per key."""
    return Authenticator(
        store,
        token_ttl=ttl,
        ip_throttle=KeyedBuckets(burst / 60, burst, clock=clock),
        user_throttle=KeyedBuckets(burst / 60, burst, clock=clock),
        token_recheck=recheck,
        clock=clock,
    )


@pytest.fixture
def make_client(aiohttp_client, database, tmp_path, users):
    """Start the whole app on the migrated database with *env* overrides; returns its client."""

    async def make(**env: str):
        settings = Settings.from_env(
            {
                "HEARTH_DATABASE_URL": database,
                "HEARTH_SPOOL_DIR": str(tmp_path / "spool"),
                "HEARTH_LOG_DIR": "",
                **env,
            }
        )
        # The DbMonitor owns the pool; the hub and its friends are not needed here.
        app = create_app(settings, actors=lambda app: [DbMonitor(app[keys.STORE])])
        return await aiohttp_client(app)

    return make


async def login(client, username: str, password: str = PASSWORD):
    """POST a login and return the response, its body read so the connection is released."""
    response = await client.post(
        "/api/v1/auth/login", json={"username": username, "password": password}
    )
    await response.read()
    return response


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for *token*."""
    return {"Authorization": f"Bearer {token}"}


async def token_of(client, username: str) -> str:
    """Log *username* in and return the token."""
    response = await login(client, username)
    assert response.status == 200
    return (await response.json())["token"]


def test_password_hash_is_self_describing_salted_scrypt(password_hash):
    """A hash names scrypt and its costs, is salted afresh, and verifies only its password."""
    pattern = r"scrypt\$16384\$8\$1\$[A-Za-z0-9+/]{22}==\$[A-Za-z0-9+/]{43}="
    assert re.fullmatch(pattern, password_hash)
    assert re.fullmatch(pattern, DUMMY_HASH)
    assert hash_password(PASSWORD) != password_hash
    assert verify_password(PASSWORD, password_hash)
    assert not verify_password(PASSWORD + "!", password_hash)
    malformed = ("", "plain", "md5$1$2$3$AAAA$AAAA", "scrypt$3$8$1$AAAA$AAAA", "scrypt$x$8$1$$")
    for stored in malformed:
        assert not verify_password(PASSWORD, stored)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=st.text(alphabet=st.sampled_from("ab_.-Z9 \n\u00e9/"), max_size=70))
async def test_username_rule_matches_the_users_table_check(store, name):
    """check_username accepts exactly the names the users table CHECK lets in."""
    try:
        check_username(name)
        accepted = True
    except ValidationError:
        accepted = False
    try:
        await store.create_user(name, "not-a-real-hash")
        stored = True
    except Conflict:
        stored = True
    except DatabaseRejected as exc:
        assert exc.pgcode == "23514"  # the CHECK, not some other refusal
        stored = False
    assert accepted == stored


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(token=st.text(max_size=60))
async def test_any_string_but_an_issued_token_fails_authentication(store, token):
    """Arbitrary strings, lone surrogates included, fail with AuthFailed and nothing else."""
    with pytest.raises(AuthFailed):
        await authenticator(store).authenticate(token)


async def test_login_returns_a_token_for_the_user(make_client, users):
    """A good login answers a token, its expiry a TTL from now, and the user it authenticates."""
    client = await make_client()
    response = await login(client, "alice")
    assert response.status == 200
    body = await response.json()
    assert body["user"] == {"id": users["alice"], "username": "alice", "is_admin": False}
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert abs(expires_at - (datetime.now(UTC) + timedelta(hours=24))) < timedelta(minutes=1)
    user = await client.server.app[keys.AUTH].authenticate(body["token"])
    assert user == User(id=users["alice"], username="alice", is_admin=False)


async def test_unknown_user_and_wrong_password_look_alike(make_client):
    """An unknown user and a wrong password get the same 401 body after similar scrypt work."""
    client = await make_client()
    bodies: dict[str, dict] = {}
    durations: dict[str, list[float]] = {"unknown": [], "wrong": []}
    for _ in range(3):
        for case, username in (("unknown", "nobody"), ("wrong", "alice")):
            started = time.perf_counter()
            response = await login(client, username, "not the password")
            durations[case].append(time.perf_counter() - started)
            assert response.status == 401
            ctrl = (await response.json())["ctrl"]
            del ctrl["ts"], ctrl["params"]["trace_id"]
            bodies[case] = ctrl
    assert bodies["unknown"] == bodies["wrong"]
    assert bodies["wrong"] == {
        "id": None, "code": 401, "text": "authentication failed", "params": {"error": "AUTH_FAILED"}
    }  # fmt: skip
    ratio = statistics.mean(durations["unknown"]) / statistics.mean(durations["wrong"])
    assert 0.3 < ratio < 3.0


async def test_login_is_throttled_per_client_ip(make_client):
    """Past the per-IP rate, even a correct login gets 429 with Retry-After and retry_after."""
    client = await make_client(HEARTH_LOGIN_RATE_PER_MIN="3", HEARTH_LOGIN_USER_RATE_PER_MIN="100")
    for username in ("nobody1", "nobody2", "nobody3"):
        assert (await login(client, username)).status == 401
    response = await login(client, "alice")
    assert response.status == 429
    ctrl = (await response.json())["ctrl"]
    assert ctrl["params"]["error"] == "RATE_LIMIT_EXCEEDED"
    retry_after = ctrl["params"]["retry_after"]
    # Three a minute refill one attempt every 20 seconds.
    assert isinstance(retry_after, int) and 1 <= retry_after <= 20
    assert response.headers["Retry-After"] == str(retry_after)


async def test_login_is_throttled_per_username(make_client):
    """Past the per-username rate that username gets 429 while another still gets checked."""
    client = await make_client(HEARTH_LOGIN_RATE_PER_MIN="100", HEARTH_LOGIN_USER_RATE_PER_MIN="2")
    assert (await login(client, "alice", "guess 1")).status == 401
    assert (await login(client, "alice", "guess 2")).status == 401
    response = await login(client, "alice")
    assert response.status == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert (await login(client, "bob")).status == 200


async def test_malformed_login_requests_are_400(make_client):
    """A login body that is not JSON, not an object, or lacks string fields is a 400."""
    client = await make_client()
    for data in ("{not json", "[1, 2]", '{"username": "alice"}', '{"username": 7, "password": "x"}',
                 '{"username": "alice", "password": ""}'):  # fmt: skip
        response = await client.post("/api/v1/auth/login", data=data)
        assert response.status == 400, data
        assert (await response.json())["ctrl"]["params"]["error"] == "INVALID_MESSAGE"


async def test_logout_revokes_the_token(make_client):
    """After logout the token no longer authenticates, so a second logout is a 401."""
    client = await make_client()
    token = await token_of(client, "alice")
    response = await client.post("/api/v1/auth/logout", headers=bearer(token))
    assert response.status == 200
    assert await response.json() == {"ok": True}
    again = await client.post("/api/v1/auth/logout", headers=bearer(token))
    assert again.status == 401
    assert (await again.json())["ctrl"]["params"]["error"] == "AUTH_FAILED"
    with pytest.raises(AuthFailed):
        await client.server.app[keys.AUTH].authenticate(token)


async def test_admins_manage_rooms_and_members(make_client):
    """Admins create rooms (409 twice) and add members; others get 403, no token 401."""
    client = await make_client()
    admin, alice = await token_of(client, "root"), await token_of(client, "alice")
    ops = {"name": "ops", "private": True}

    async def post(path: str, body: dict, token: str | None):
        response = await client.post(path, json=body, headers=bearer(token) if token else {})
        return response.status, (await response.json())

    assert await post("/api/v1/rooms", ops, admin) == (201, ops)
    status, body = await post("/api/v1/rooms", ops, admin)
    assert (status, body["ctrl"]["params"]["error"]) == (409, "CONFLICT")
    status, body = await post("/api/v1/rooms", {"name": "mine"}, alice)
    assert (status, body["ctrl"]["params"]["error"]) == (403, "FORBIDDEN")
    status, body = await post("/api/v1/rooms", {"name": "mine"}, None)
    assert (status, body["ctrl"]["params"]["error"]) == (401, "AUTH_REQUIRED")
    assert (await post("/api/v1/rooms", {"name": "no spaces"}, admin))[0] == 400

    members = "/api/v1/rooms/ops/members"
    added = await post(members, {"username": "alice"}, admin)
    assert added == (200, {"room": "ops", "username": "alice"})
    assert (await post(members, {"username": "alice"}, admin))[0] == 200
    assert (await post(members, {"username": "alice"}, alice))[0] == 403
    assert (await post(members, {"username": "nobody"}, admin))[0] == 404
    assert (await post("/api/v1/rooms/nowhere/members", {"username": "alice"}, admin))[0] == 404


async def test_expired_token_fails(store, users):
    """A token works until its TTL has passed and fails after."""
    clock = FakeClock()
    auth = authenticator(store, clock=clock, ttl=60)
    token, expires_at = await auth.login("alice", PASSWORD, client_ip="192.0.2.1")
    assert datetime.fromisoformat(expires_at).timestamp() == pytest.approx(clock.now + 60, abs=0.01)
    clock.advance(59)
    assert (await auth.authenticate(token)).id == users["alice"]
    clock.advance(2)
    with pytest.raises(AuthFailed):
        await auth.authenticate(token)


async def test_tokens_are_stored_only_as_sha256(store, users, postgres, database):
    """auth_tokens holds the SHA-256 of a token and never the token itself."""
    auth = authenticator(store)
    token, _ = await auth.login("alice", PASSWORD, client_ip="192.0.2.1")
    sql = "SELECT t::text, encode(token_hash, 'hex') FROM auth_tokens t"
    rows = postgres.psql(sql, database=database.rsplit("/", 1)[1])
    assert token not in rows
    assert hashlib.sha256(token.encode()).hexdigest() in rows
    assert token_hash(token) == hashlib.sha256(token.encode()).digest()


async def test_logs_never_hold_password_token_or_hashes(database, password_hash):
    """With every query logged, login logs name the user but never a password, token or hash."""
    stream = io.StringIO()
    setup_logging(level="DEBUG", stream=stream)
    store = Store(database, slow_query_ms=0)
    await store.open()
    try:
        await store.migrate()
        alice_id = await store.create_user("alice", password_hash)
        auth = authenticator(store)
        with pytest.raises(AuthFailed):
            await auth.login("alice", "wrong-" + PASSWORD, client_ip="192.0.2.1")
        token, _ = await auth.login("alice", PASSWORD, client_ip="192.0.2.1")
        await auth.authenticate(token)
        await auth.logout(token)
    finally:
        await store.close()
        setup_logging(level="DEBUG", stream=io.StringIO())
    captured = stream.getvalue()
    lines = [json.loads(line) for line in captured.splitlines()]
    failed = next(line for line in lines if line["msg"] == "login failed")
    assert (failed["level"], failed["username"], failed["user_id"]) == ("warn", "alice", alice_id)
    succeeded = next(line for line in lines if line["msg"] == "login succeeded")
    assert (succeeded["level"], succeeded["user_id"]) == ("info", alice_id)
    assert any(line["msg"] == "slow query" and line["table"] == "auth_tokens" for line in lines)
    for secret in (PASSWORD, token, password_hash.split("$")[-1], token_hash(token).hex()):
        assert secret not in captured


async def test_a_checked_token_reconnects_during_an_outage_and_others_do_not(
    make_hearth, own_postgres
):
    """During a PostgreSQL outage a token checked before it still authenticates (and publishes, 202); an unchecked token gets 503, and a logged-out one is not served from memory."""
    dsn = own_postgres.create_database("auth_outage")
    hearth = await make_hearth(dsn)
    alice = await hearth.connect("alice")  # checks alice's token with PostgreSQL
    await alice.ws.close()
    root_token = hearth.tokens["root"]
    await hearth.connect("root")
    async with hearth.session.post(
        f"{hearth.url}api/v1/auth/logout", headers={"Authorization": f"Bearer {root_token}"}
    ) as response:
        assert response.status == 200
    await asyncio.to_thread(own_postgres.stop, "fast")
    again = await hearth.connect("alice")  # a reconnect after a network blink
    ctrl = await again.request("pub", topic="room:lobby", content="still here", client_msg_id="o1")
    assert ctrl["code"] == 202, ctrl
    for user in ("bob", "root"):  # bob's token was never checked here; root's was revoked
        client = await hearth.connect(None)
        ctrl = await client.request("auth", token=hearth.tokens[user])
        assert (ctrl["code"], ctrl["params"]["error"]) == (503, "DATABASE_ERROR"), (user, ctrl)
    await asyncio.to_thread(own_postgres.start)


async def test_a_remembered_token_is_refused_once_expired(store, users):
    """A token remembered from its last check is not accepted during an outage after it expired."""
    clock = FakeClock()
    auth = authenticator(store, clock=clock, ttl=60)
    token, _ = await auth.login("alice", PASSWORD, client_ip="192.0.2.1")
    await auth.authenticate(token)
    await store.close()  # every query now fails as an unreachable database does
    assert (await auth.authenticate(token)).id == users["alice"]
    clock.advance(61)
    with pytest.raises(DatabaseError):
        await auth.authenticate(token)


async def test_a_token_checked_moments_ago_costs_no_query_and_is_asked_again_later(
    store, users, database
):
    """Within the recheck time a confirmed token is taken without a query; a revocation made elsewhere is seen after it, and a logout here at once."""
    clock = FakeClock()
    auth = authenticator(store, clock=clock, recheck=10)
    token, _ = await auth.login("alice", PASSWORD, client_ip="192.0.2.1")
    await auth.authenticate(token)
    async with aiopg.connect(database) as conn, conn.cursor() as cursor:
        # Another instance's logout: this one learns of it at the next check.
        await cursor.execute("UPDATE auth_tokens SET revoked_at = now()")
    assert (await auth.authenticate(token)).id == users["alice"]
    clock.advance(11)
    with pytest.raises(AuthFailed):
        await auth.authenticate(token)
    other, _ = await auth.login("bob", PASSWORD, client_ip="192.0.2.1")
    await auth.authenticate(other)
    await auth.logout(other)
    with pytest.raises(AuthFailed):
        await auth.authenticate(other)


PROXIES = Settings.from_env({"HEARTH_TRUSTED_PROXIES": "10.0.0.0/8, 2001:db8::/32"})


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        # Not from a trusted proxy: the header is the client's say, ignored.
        ("192.0.2.9", ["198.51.100.7"], "192.0.2.9"),
        ("10.0.0.2", [], "10.0.0.2"),
        ("10.0.0.2", ["198.51.100.7"], "198.51.100.7"),
        # The right-most address that is not a trusted proxy; what is left of it is forged.
        ("10.0.0.2", ["1.2.3.4, 198.51.100.7, 10.0.0.3"], "198.51.100.7"),
        ("10.0.0.2", ["1.2.3.4", "198.51.100.7", "10.9.9.9"], "198.51.100.7"),
        ("10.0.0.2", ["10.0.0.5, 10.0.0.4"], "10.0.0.5"),
        ("2001:db8::1", ["2001:DB8:0::2, 2001:0db8::1:0:0:5, 203.0.113.4"], "203.0.113.4"),
        ("2001:db8::1", ["2001:DB8::5"], "2001:db8::5"),
        ("::ffff:10.0.0.2", ["::ffff:198.51.100.7"], "198.51.100.7"),
        # Malformed on the way: the peer address, never an error.
        ("10.0.0.2", ["not-an-ip"], "10.0.0.2"),
        ("10.0.0.2", ["198.51.100.7, 198.51.100.8:443"], "10.0.0.2"),
        ("10.0.0.2", ["198.51.100.7,,10.0.0.3"], "10.0.0.2"),
        ("10.0.0.2", [""], "10.0.0.2"),
        # Malformed left of the client is the client's business.
        ("10.0.0.2", ["<script>, 198.51.100.7"], "198.51.100.7"),
        (None, ["198.51.100.7"], "unknown"),
    ],
)
def test_client_address_trusts_forwarded_for_only_from_trusted_proxies(peer, forwarded_for, client):
    """X-Forwarded-For names the client only behind a trusted proxy: its right-most untrusted address."""
    assert client_address(peer, forwarded_for, PROXIES.trusted_networks()) == client


def test_trusted_proxies_must_be_addresses_or_networks():
    """A HEARTH_TRUSTED_PROXIES entry that is no IP or CIDR stops the configuration."""
    for value in ("10.0.0.0/33", "proxy.example", "10.0.0.1/8"):
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({"HEARTH_TRUSTED_PROXIES": value})
        assert caught.value.variable == "HEARTH_TRUSTED_PROXIES"


async def forwarded_login(client, username: str, forwarded_for: str):
    """POST a failing login for *username* as forwarded for *forwarded_for*; the response."""
    response = await client.post(
        "/api/v1/auth/login",
        json={"username": username, "password": "wrong guess"},
        headers={"X-Forwarded-For": forwarded_for},
    )
    await response.read()
    return response


async def test_login_throttle_keys_on_forwarded_for_only_behind_trusted_proxies(make_client):
    """Behind a trusted proxy each forwarded client has its own login throttle (and log field); from an untrusted peer the header changes nothing."""
    limits = {"HEARTH_LOGIN_RATE_PER_MIN": "2", "HEARTH_LOGIN_USER_RATE_PER_MIN": "100"}
    stream = io.StringIO()
    setup_logging(level="INFO", stream=stream)
    try:
        behind = await make_client(HEARTH_TRUSTED_PROXIES="127.0.0.1, ::1", **limits)
        statuses = [
            (await forwarded_login(behind, "nobody", forwarded)).status
            for forwarded in ("198.51.100.7", "1.1.1.1, 198.51.100.7", "198.51.100.7",
                              "198.51.100.8", "bogus", "bogus", "bogus")
        ]  # fmt: skip
        # The malformed ones fall back on the proxy's own address: a bucket of their own.
        assert statuses == [401, 401, 429, 401, 401, 401, 429]
        direct = await make_client(**limits)
        statuses = [
            (await forwarded_login(direct, "nobody", forwarded)).status
            for forwarded in ("198.51.100.7", "198.51.100.8", "198.51.100.9")
        ]
        assert statuses == [401, 401, 429]
    finally:
        setup_logging(level="INFO")
    failed = [json.loads(line) for line in stream.getvalue().splitlines()]
    addresses = [line["client_ip"] for line in failed if line["msg"] == "login failed"]
    assert addresses[:4] == ["198.51.100.7", "198.51.100.7", "198.51.100.8", "127.0.0.1"]


@pytest.mark.parametrize("scope", ["client_ip", "username"])
async def test_login_throttle_is_shared_by_instances_through_redis(
    make_hearth, redis_server, scope
):
    """Login attempts on two instances sharing Redis count against one throttle, per IP and per username."""
    redis_url = await redis_db_url(redis_server)
    # Five a minute: each instance's start-up logs four users in from 127.0.0.1 (locally).
    limits = {"HEARTH_LOGIN_RATE_PER_MIN": "5", "HEARTH_LOGIN_USER_RATE_PER_MIN": "100"}
    if scope == "username":
        limits = {"HEARTH_LOGIN_RATE_PER_MIN": "100", "HEARTH_LOGIN_USER_RATE_PER_MIN": "5"}
    first = await make_hearth(HEARTH_REDIS_URL=redis_url, **limits)
    second = await make_hearth(HEARTH_REDIS_URL=redis_url, **limits)

    async def attempt(hearth, username: str, password: str = "wrong guess"):
        async with hearth.session.post(
            f"{hearth.url}api/v1/auth/login", json={"username": username, "password": password}
        ) as response:
            return response.status, response.headers.get("Retry-After"), await response.json()

    username = (lambda index: "alice") if scope == "username" else (lambda index: f"n{index}")
    statuses = [
        (await attempt(hearth, username(index)))[0]
        for index, hearth in enumerate([first, first, second, second, first])
    ]
    assert statuses == [401] * 5
    status, retry_after, body = await attempt(second, "alice", Hearth.PASSWORD)
    assert status == 429 and body["ctrl"]["params"]["error"] == "RATE_LIMIT_EXCEEDED"
    # Five a minute refill one attempt every 12 seconds.
    assert 1 <= body["ctrl"]["params"]["retry_after"] <= 12
    assert retry_after == str(body["ctrl"]["params"]["retry_after"])
    assert (await attempt(first, "alice", Hearth.PASSWORD))[0] == 429
