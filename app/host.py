"""What the host reports about itself: process memory, host memory and free disk."""

from __future__ import annotations

import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.config import Settings

#: Open files kept for everything but client sockets: the pool, logs, the spool, Redis.
RESERVED_FILES = 100


@dataclass(frozen=True, slots=True)
class HostMemory:
    """Host memory in bytes, from ``/proc/meminfo``."""

    total: int
    available: int

    @property
    def used_share(self) -> float:
        """The share of memory in use, 0..1."""
        return 1 - self.available / self.total if self.total else 0.0


@dataclass(frozen=True, slots=True)
class DiskSpace:
    """The file system holding a folder, in bytes."""

    total: int
    free: int

    @property
    def free_share(self) -> float:
        """The free share, 0..1."""
        return self.free / self.total if self.total else 0.0


def existing(path: str) -> Path:
    """*path*, or its nearest existing parent: the spool folder may not exist yet."""
    candidate = Path(path).absolute()
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    return candidate


def rss_bytes() -> int:
    """This process's resident memory."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        # Peak rather than current RSS, in KiB on Linux: the best the stdlib has elsewhere.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return pages * os.sysconf("SC_PAGE_SIZE")


def host_memory() -> HostMemory | None:
    """Total and available host memory; None where ``/proc/meminfo`` is missing."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    fields[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if len(fields) < 2:
        return None
    return HostMemory(fields["MemTotal"], fields["MemAvailable"])


def disk_space(folder: str) -> DiskSpace | None:
    """The file system holding *folder* (or its nearest existing parent); None on error."""
    try:
        usage = shutil.disk_usage(existing(folder))
    except OSError:
        return None
    return DiskSpace(usage.total, usage.free)


def connection_limit(settings: Settings) -> int:
    """Clients this process may hold: HEARTH_MAX_CONNECTIONS, or fewer when the open-file
    limit would run out first (each client is a socket)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    return max(1, min(settings.max_connections, soft - RESERVED_FILES))
