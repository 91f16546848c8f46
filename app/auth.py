"""Authentication: scrypt passwords, opaque login tokens, login throttling and room access."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from app.errors import (
    AppError,
    AuthFailed,
    DatabaseError,
    NotFound,
    RateLimited,
    RoomAccessDenied,
    ValidationError,
    is_retryable,
)
from app.log import get_logger, iso_utc
from app.ratelimit import KeyedBuckets

if TYPE_CHECKING:
    from app.config import Settings
    from app.store import Store

log = get_logger("auth")

T = TypeVar("T")

#: scrypt cost parameters: n=2**14, r=8 take about 16 MiB and 50 ms per hash.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
#: Bytes of random salt per password.
SALT_BYTES = 16
#: Bytes of derived key stored per password.
HASH_BYTES = 32
#: Headroom over the 128 * n * r bytes scrypt needs, which OpenSSL's default limit lacks.
SCRYPT_MAXMEM = 64 * 1024 * 1024
#: Shortest password the CLI accepts for a new user.
MIN_PASSWORD_LENGTH = 8
#: Usernames: short, URL-safe, and the same rule as the users table CHECK (use fullmatch).
USERNAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Seconds a room access answer is trusted before PostgreSQL is asked again.
ROOM_ACCESS_TTL = 5.0
#: Most (room, user) answers kept; stale ones stay as a fallback for outages.
ROOM_ACCESS_CACHE_SIZE = 10_000


def _password_bytes(password: str) -> bytes:
    # surrogatepass: a lone surrogate (possible in JSON and argv) must not crash hashing.
    return password.encode("utf-8", "surrogatepass")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encode(salt: bytes, derived: bytes) -> str:
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(derived)}"


def hash_password(password: str) -> str:
    """Hash *password* with scrypt and a fresh salt, as ``scrypt$n$r$p$<salt>$<hash>``.

    CPU-heavy (about 50 ms): call it through `asyncio.to_thread` from async code.
    """
    salt = os.urandom(SALT_BYTES)
    derived = hashlib.scrypt(
        _password_bytes(password), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
        maxmem=SCRYPT_MAXMEM, dklen=HASH_BYTES,
    )  # fmt: skip
    return _encode(salt, derived)


def verify_password(password: str, stored: str) -> bool:
    """Tell whether *password* matches the *stored* string of `hash_password`.

    A malformed *stored* string never matches. As CPU-heavy as hashing.
    """
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        derived = hashlib.scrypt(
            _password_bytes(password), salt=base64.b64decode(salt, validate=True), n=int(n), r=int(r),
            p=int(p), maxmem=SCRYPT_MAXMEM, dklen=len(base64.b64decode(expected, validate=True)),
        )  # fmt: skip
        return hmac.compare_digest(derived, base64.b64decode(expected))
    except ValueError:
        return False


#: Verified when the user does not exist, so an unknown name costs the same scrypt run as a
#: wrong password. Random bytes: no password can match it.
DUMMY_HASH = _encode(os.urandom(SALT_BYTES), os.urandom(HASH_BYTES))


async def database_call(query: Awaitable[T], what: str) -> T:
    """Await the store *query*, turning an unreachable PostgreSQL into `DatabaseError`.

    *what* names the query in the error's log detail. Clients then get a 503 with
    ``DATABASE_ERROR`` rather than a 500; other errors pass through unchanged.
    """
    try:
        return await query
    except AppError:
        raise
    except Exception as exc:
        if not is_retryable(exc):
            raise
        raise DatabaseError(f"{what} failed: {type(exc).__name__}") from exc


def token_hash(token: str) -> bytes:
    """The SHA-256 of *token*: what ``auth_tokens`` stores instead of the token."""
    return hashlib.sha256(token.encode()).digest()


def check_username(name: Any) -> str:
    """Return *name* when it is a valid username, else raise `ValidationError`."""
    if not isinstance(name, str) or not USERNAME.fullmatch(name):
        raise ValidationError(text="invalid username")
    return name


def check_password(password: Any) -> str:
    """Return *password* when it is acceptable for a new user, else raise `ValidationError`."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_LENGTH:
        raise ValidationError(text=f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    return password


@dataclass(frozen=True, slots=True)
class User:
    """An authenticated user."""

    #: UUID of the ``users`` row.
    id: str
    username: str
    #: Admins manage rooms and may enter every room.
    is_admin: bool


@dataclass(frozen=True, slots=True)
class _RoomAccess:
    checked_at: float
    is_private: bool
    is_member: bool


class Authenticator:
    """Logs users in and out, resolves tokens to users, and guards rooms.

    *store* is the `Store`, or a callable returning it for apps whose store is built at
    startup. *token_ttl* is a token's lifetime in seconds. *ip_throttle* and *user_throttle*
    limit login attempts per client IP and per username. *clock* returns epoch seconds; tests
    pass a fake one.
    """

    def __init__(
        self,
        store: Store | Callable[[], Store],
        *,
        token_ttl: float,
        ip_throttle: KeyedBuckets,
        user_throttle: KeyedBuckets,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.token_ttl = token_ttl
        self.ip_throttle = ip_throttle
        self.user_throttle = user_throttle
        self.clock = clock
        self._room_access: OrderedDict[tuple[str, str], _RoomAccess] = OrderedDict()
        #: Last known privacy of each room, so a public room stays usable during an outage.
        self._room_is_private: dict[str, bool] = {}

    @classmethod
    def from_settings(cls, store: Store | Callable[[], Store], settings: Settings) -> Authenticator:
        """An authenticator for *store* with the TTL and login rates of *settings*.

        Each throttle allows a burst of a minute's attempts, refilled evenly over the minute.
        """
        return cls(
            store,
            token_ttl=settings.token_ttl_hours * 3600,
            ip_throttle=KeyedBuckets(settings.login_rate_per_min / 60, settings.login_rate_per_min),
            user_throttle=KeyedBuckets(
                settings.login_user_rate_per_min / 60, settings.login_user_rate_per_min
            ),
        )

    @property
    def store(self) -> Store:
        """The store, resolved on each use."""
        return self._store() if callable(self._store) else self._store

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _throttle(self, username: str, client_ip: str) -> None:
        for scope, buckets, key in (
            ("client_ip", self.ip_throttle, client_ip),
            ("username", self.user_throttle, username),
        ):
            wait = buckets.take(key)
            if wait:
                log.bind(username=username, client_ip=client_ip, scope=scope).warning(
                    "login throttled"
                )
                raise RateLimited(
                    f"login throttled by {scope}", retry_after=max(1, math.ceil(wait))
                )

    async def login(self, username: str, password: str, *, client_ip: str) -> tuple[str, str]:
        """Check *username* and *password* and return a new ``(token, expires_at)``.

        *client_ip* keys the per-IP throttle. Raises `RateLimited` (with ``retry_after``)
        when either throttle refuses, and the same `AuthFailed` for an unknown user and a
        wrong password, after the same scrypt work. *expires_at* is ISO-8601 UTC.
        """
        self._throttle(username, client_ip)
        row = None
        if USERNAME.fullmatch(username):
            row = await database_call(self.store.user_by_name(username), "user lookup")
        stored = row[2] if row is not None else DUMMY_HASH
        matches = await asyncio.to_thread(verify_password, password, stored)
        if row is None or not matches:
            reason = "unknown user" if row is None else "wrong password"
            log.bind(
                username=username, user_id=row[0] if row else None, client_ip=client_ip,
                reason=reason,
            ).warning("login failed")  # fmt: skip
            raise AuthFailed(reason)
        user_id = row[0]
        token = secrets.token_urlsafe(32)
        expires_at = datetime.fromtimestamp(self.clock() + self.token_ttl, UTC)
        await database_call(
            self.store.insert_token(token_hash(token), user_id, expires_at), "token insert"
        )
        log.bind(username=username, user_id=user_id, client_ip=client_ip).info("login succeeded")
        return token, iso_utc(expires_at)

    async def authenticate(self, token: str) -> User:
        """The user *token* belongs to; raises `AuthFailed` if it is unknown, expired or revoked."""
        # Tokens are URL-safe ASCII; anything else cannot be one of ours.
        if not isinstance(token, str) or not token or not token.isascii():
            raise AuthFailed("malformed token")
        row = await database_call(
            self.store.user_for_token(token_hash(token), now=self._now()), "token lookup"
        )
        if row is None:
            raise AuthFailed("unknown, expired or revoked token")
        user_id, username, is_admin = row
        return User(id=user_id, username=username, is_admin=is_admin)

    async def logout(self, token: str) -> None:
        """Revoke *token*; revoking it again changes nothing."""
        revoked = await database_call(self.store.revoke_token(token_hash(token)), "token revoke")
        log.bind(revoked=revoked).info("logout")

    async def check_room_access(self, user: User, room: str) -> None:
        """Raise unless *user* may read and post in *room*.

        `NotFound` for a missing room, `RoomAccessDenied` for a private room *user* is not a
        member of (admins enter every room). Answers are cached for `ROOM_ACCESS_TTL`
        seconds; while PostgreSQL is unreachable a stale answer is served if there is one,
        else `DatabaseError` is raised.
        """
        key = (room, user.id)
        now = self.clock()
        access = self._room_access.get(key)
        if access is None or now - access.checked_at >= ROOM_ACCESS_TTL:
            try:
                if not self.store.available:
                    # The DbMonitor already knows: don't spend a query timeout finding out.
                    raise DatabaseError("database marked unavailable")
                row = await database_call(self.store.room_access(room, user.id), "room access")
            except DatabaseError:
                access = access or self._public_room_fallback(room, now)
                if access is None:
                    raise
                log.bind(user_id=user.id, topic=f"room:{room}").warning(
                    "database unreachable; serving a cached room access answer"
                )
            else:
                if row is None:
                    self._room_access.pop(key, None)
                    raise NotFound(text="room not found")
                access = _RoomAccess(now, *row)
                self._remember(key, access)
                self._room_is_private[room] = access.is_private
        if access.is_private and not (access.is_member or user.is_admin):
            raise RoomAccessDenied(f"user {user.id} is not a member of private room {room}")

    def _public_room_fallback(self, room: str, now: float) -> _RoomAccess | None:
        # Anyone may use a room last seen public, so an outage need not lock them out.
        if self._room_is_private.get(room) is False:
            return _RoomAccess(now, is_private=False, is_member=False)
        return None

    def _remember(self, key: tuple[str, str], access: _RoomAccess) -> None:
        self._room_access[key] = access
        self._room_access.move_to_end(key)
        if len(self._room_access) > ROOM_ACCESS_CACHE_SIZE:
            self._room_access.popitem(last=False)

    def forget_room(self, room: str) -> None:
        """Drop the cached access answers of *room*, after its members changed here."""
        for key in [key for key in self._room_access if key[0] == room]:
            del self._room_access[key]
        self._room_is_private.pop(room, None)
