"""Authentication: scrypt passwords, opaque login tokens and login throttling."""

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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from app.errors import (
    AuthFailed,
    DatabaseError,
    RateLimited,
    ValidationError,
)
from app.log import get_logger, iso_utc
from app.ratelimit import (
    LOCAL_ONLY,
    LOGIN_IP_SCOPE,
    LOGIN_USER_SCOPE,
    KeyedBuckets,
    SharedLimiter,
)

if TYPE_CHECKING:
    from app.config import Settings
    from app.store import Store

log = get_logger("auth")


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
#: Tokens whose last good check is kept for logins during a database outage.
KNOWN_TOKENS = 100_000
#: Usernames: short, URL-safe, and the same rule as the users table CHECK (use fullmatch).
USERNAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


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


class Authenticator:
    """Logs users in and out and resolves tokens to users (rooms: see app.directory).

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
        token_recheck: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.token_ttl = token_ttl
        self.ip_throttle = ip_throttle
        self.user_throttle = user_throttle
        #: Seconds a token PostgreSQL confirmed is taken without asking again (0: always ask).
        self.token_recheck = token_recheck
        self.clock = clock
        # token hash -> (user, expiry, time of the check) in epoch seconds, as PostgreSQL
        # last confirmed it. Hashes, like the table: never the tokens.
        self._known_tokens: OrderedDict[bytes, tuple[User, float, float]] = OrderedDict()

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
            token_recheck=settings.token_recheck,
        )

    @property
    def store(self) -> Store:
        """The store, resolved on each use."""
        return self._store() if callable(self._store) else self._store

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    async def _throttle(self, username: str, client_ip: str, limiter: SharedLimiter) -> None:
        for scope, shared_scope, buckets, key in (
            ("client_ip", LOGIN_IP_SCOPE, self.ip_throttle, client_ip),
            ("username", LOGIN_USER_SCOPE, self.user_throttle, username),
        ):
            wait = await limiter.take(buckets, shared_scope, key)
            if wait:
                log.bind(username=username, client_ip=client_ip, scope=scope).warning(
                    "login throttled"
                )
                raise RateLimited(
                    f"login throttled by {scope}", retry_after=max(1, math.ceil(wait))
                )

    async def login(
        self, username: str, password: str, *, client_ip: str, limiter: SharedLimiter = LOCAL_ONLY
    ) -> tuple[str, str]:
        """Check *username* and *password* and return a new ``(token, expires_at)``.

        *client_ip* keys the per-IP throttle. *limiter* shares the throttles with the other
        instances through Redis (by default this instance's buckets alone). Raises `RateLimited`
        (with ``retry_after``) when either throttle refuses, and the same `AuthFailed` for an
        unknown user and a wrong password, after the same scrypt work. *expires_at* is
        ISO-8601 UTC.
        """
        await self._throttle(username, client_ip, limiter)
        row = None
        if USERNAME.fullmatch(username):
            row = await self.store.user_by_name(username)
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
        await self.store.insert_token(token_hash(token), user_id, expires_at)
        log.bind(username=username, user_id=user_id, client_ip=client_ip).info("login succeeded")
        return token, iso_utc(expires_at)

    async def authenticate(self, token: str) -> User:
        """The user *token* belongs to; raises `AuthFailed` if it is unknown, expired or revoked.

        A token PostgreSQL confirmed within the last ``token_recheck`` seconds is taken
        without asking again: a logout on this instance is seen at once, one on another
        instance within that time. While PostgreSQL is unreachable, a token it confirmed
        before (on this instance) is accepted until it expires; a revocation made elsewhere
        meanwhile is seen once the database answers again. Any other token then raises
        `DatabaseError`.
        """
        # Tokens are URL-safe ASCII; anything else cannot be one of ours.
        if not isinstance(token, str) or not token or not token.isascii():
            raise AuthFailed("malformed token")
        digest = token_hash(token)
        known = self._known_tokens.get(digest)
        now = self.clock()
        if known is not None and now < known[1] and now - known[2] < self.token_recheck:
            return known[0]  # a burst of (re)connects costs PostgreSQL one query per token
        try:
            row = await self.store.user_for_token(digest, now=self._now())
        except DatabaseError:
            # A client reconnecting during an outage (its network blinked too) is let in
            # on the last answer PostgreSQL gave for its token, until that token expires.
            if known is None or known[1] <= self.clock():
                raise
            log.bind(user_id=known[0].id).warning(
                "database unreachable; token accepted from its last check"
            )
            return known[0]
        if row is None:
            self._known_tokens.pop(digest, None)
            raise AuthFailed("unknown, expired or revoked token")
        user_id, username, is_admin, expires_at = row
        user = User(id=user_id, username=username, is_admin=is_admin)
        self._known_tokens[digest] = (user, expires_at.timestamp(), now)
        self._known_tokens.move_to_end(digest)
        if len(self._known_tokens) > KNOWN_TOKENS:
            self._known_tokens.popitem(last=False)
        return user

    async def logout(self, token: str) -> None:
        """Revoke *token*; revoking it again changes nothing."""
        digest = token_hash(token)
        self._known_tokens.pop(digest, None)
        revoked = await self.store.revoke_token(digest)
        log.bind(revoked=revoked).info("logout")
