"""Status feed sources: the built-in system feed and the upstreams of ``HEARTH_EVENT_SOURCES``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app.protocol import SOURCE_NAME

__all__ = [
    "KINDS",
    "PROBE_HEADER",
    "SYSTEM_KIND",
    "SYSTEM_SOURCE",
    "Source",
    "parse_sources",
    "system_source",
]

#: Name (and event type) of the built-in feed about this process and host.
SYSTEM_SOURCE = "system_status"
#: How an upstream is asked: a JSON-RPC 2.0 POST, or a plain GET answering JSON.
KINDS = ("jsonrpc", "get")
#: Kind of the built-in feed, which makes no HTTP call.
SYSTEM_KIND = "system"
#: Header on hearth's health probes, so an upstream (and the demo's call log) can tell them apart.
PROBE_HEADER = "X-Hearth-Probe"
#: Keys a source object may have; any other is a typo worth refusing.
_KEYS = frozenset({"name", "url", "kind", "method", "interval", "timeout", "params"})


@dataclass(frozen=True, slots=True)
class Source:
    """One status feed: published on topic ``status:<name>`` as events of type *name*."""

    #: Feed name, also the event type; ``^[a-z0-9_]{1,64}$``.
    name: str
    #: ``jsonrpc``, ``get``, or ``system`` for the built-in feed.
    kind: str
    #: Seconds between polls.
    interval: float
    #: Seconds each upstream call may take before it counts as a failure.
    timeout: float
    #: Upstream URL; empty for the built-in feed. May hold credentials: log it redacted.
    url: str = ""
    #: JSON-RPC method; for ``jsonrpc`` it defaults to *name*.
    method: str | None = None
    #: JSON-RPC params (an object or an array).
    params: Any = field(default=None, hash=False)

    @property
    def topic(self) -> str:
        """The topic clients subscribe to."""
        return f"status:{self.name}"


def system_source(*, interval: float, timeout: float) -> Source:
    """The built-in feed about this process and host, polled every *interval* seconds.

    *timeout* is its deadline per poll, like an upstream's.
    """
    return Source(SYSTEM_SOURCE, SYSTEM_KIND, interval=interval, timeout=timeout)


def parse_sources(spec: str, *, default_interval: float, default_timeout: float) -> list[Source]:
    """Parse *spec*, a JSON list of source objects or ``@/path/to/file.json``, into upstreams.

    *default_interval* and *default_timeout* fill in what a source leaves out. The built-in
    feed is not among the result (see `system_source`). Raises ValueError with a reason fit
    for an operator.
    """
    raw = spec.strip()
    if not raw:
        return []
    if raw.startswith("@"):
        try:
            raw = Path(raw[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read {raw[1:]}: {exc.strerror}") from None
    try:
        entries = json.loads(raw)
    except (ValueError, RecursionError):
        # RecursionError: nesting deeper than the interpreter's recursion limit.
        raise ValueError("must be a JSON list of source objects") from None
    if not isinstance(entries, list):
        raise ValueError("must be a JSON list of source objects")
    sources = [
        _source(entry, index, default_interval, default_timeout)
        for index, entry in enumerate(entries)
    ]
    names = [source.name for source in sources]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"source name {name!r} is used twice")
    return sources


def _source(entry: Any, index: int, default_interval: float, default_timeout: float) -> Source:
    where = f"source {index}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}")
    name = entry.get("name")
    if not isinstance(name, str) or not SOURCE_NAME.fullmatch(name):
        raise ValueError(f"{where} needs a name matching {SOURCE_NAME.pattern}")
    where = f"source {name!r}"
    if name == SYSTEM_SOURCE:
        raise ValueError(f"{where} is the built-in feed's name")
    url = entry.get("url")
    if (
        not isinstance(url, str)
        or urlsplit(url).scheme not in ("http", "https")
        or not (urlsplit(url).hostname)
    ):
        raise ValueError(f"{where} needs an http:// or https:// url")
    kind = entry.get("kind", "jsonrpc")
    if kind not in KINDS:
        raise ValueError(f"{where} kind must be one of {KINDS}")
    method = entry.get("method", name if kind == "jsonrpc" else None)
    if kind == "jsonrpc" and (not isinstance(method, str) or not method):
        raise ValueError(f"{where} method must be a non-empty string")
    params = entry.get("params")
    if params is not None and not isinstance(params, dict | list):
        raise ValueError(f"{where} params must be an object or an array")
    interval = _seconds(entry, "interval", default_interval, where)
    timeout = _seconds(entry, "timeout", default_timeout, where)
    return Source(name, kind, interval, timeout, url=url, method=method, params=params)


def _seconds(entry: dict[str, Any], key: str, default: float, where: str) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{where} {key} must be a positive number of seconds")
    return float(value)
