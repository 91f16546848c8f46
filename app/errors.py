"""The error model: one AppError base, its subclasses, and how they render for clients."""

from __future__ import annotations


class AppError(Exception):
    """Base of every error hearth raises on purpose."""

    #: String code clients switch on, e.g. ``DATABASE_ERROR``.
    code: str = "INTERNAL_ERROR"
    #: One of auth, validation, service, rate_limit, not_found, conflict, internal.
    category: str = "internal"
    #: HTTP-style status number.
    status: int = 500
    #: Whether retrying later may succeed.
    recoverable: bool = False
    #: Seconds a client should wait before retrying, when known.
    retry_after: float | None = None


class ActorError(AppError):
    """An actor could not take or answer a message."""

    code = "SERVICE_ERROR"
    category = "service"
    status = 503
    recoverable = True


class MailboxFull(ActorError):
    """An actor's bounded mailbox refused a message."""


class ActorTimeout(ActorError, TimeoutError):
    """An actor did not answer a call in time."""

    status = 504


class ActorCrashed(ActorError):
    """An actor crashed while handling a call."""
