"""Real headless Chromium for the browser tests: installing it, launching it, watching its console."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

#: Debian's chromium package; playwright drives it, and never downloads a browser of its own.
CHROMIUM = Path("/usr/bin/chromium")
#: Flags of every launch: headless, no sandbox (root in a container), nothing phoning home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Screenshots of the browser tests (``var/`` is gitignored).
ARTIFACTS = Path(__file__).resolve().parent.parent / "var" / "test-artifacts"


class ChromiumMissing(RuntimeError):
    """Chromium is not installed and could not be installed here."""


def ensure_chromium() -> Path:
    """Return the Chromium binary, installing Debian's ``chromium`` with apt-get when missing.

    Raises `ChromiumMissing` when it is missing and apt-get cannot run (not root, no apt).
    """
    if CHROMIUM.exists():
        return CHROMIUM
    apt_get = shutil.which("apt-get")
    if apt_get is None or os.geteuid() != 0:
        raise ChromiumMissing(
            f"{CHROMIUM} is missing; install it with: apt-get update && apt-get install -y chromium"
        )
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ([apt_get, "update", "-q"], [apt_get, "install", "-y", "-q", "chromium"]):
        done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise ChromiumMissing(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")
    if not CHROMIUM.exists():
        raise ChromiumMissing(f"apt-get installed chromium but {CHROMIUM} is not there")
    return CHROMIUM


#: Console errors Chromium itself logs when a connection is refused or cut: expected while a
#: test takes the server away on purpose, and never written by hearth's code.
NETWORK_FAILURE = re.compile(
    r"WebSocket connection to '[^']+/ws' failed|net::ERR_(CONNECTION_REFUSED|INTERNET_DISCONNECTED)"
)


@dataclass
class ConsoleWatch:
    """Every console error and uncaught exception of the pages it watches."""

    #: ``(page name, text)`` of each console error.
    errors: list[tuple[str, str]] = field(default_factory=list)
    #: Every console line, ``"<page> <type>: <text>"``, to read when a test fails.
    lines: list[str] = field(default_factory=list)

    def watch(self, page, name: str) -> None:
        """Record the console errors and uncaught exceptions of *page*, labelled *name*."""
        page.on("console", lambda message: self._console(name, message))
        page.on("pageerror", lambda error: self.errors.append((name, f"uncaught: {error}")))

    def _console(self, name: str, message) -> None:
        self.lines.append(f"{name} {message.type}: {message.text}")
        if message.type == "error":
            self.errors.append((name, message.text))

    def unexpected(self, *, outage: bool = False) -> list[tuple[str, str]]:
        """The errors recorded; with *outage*, less Chromium's own refused-connection lines."""
        return [
            (name, text)
            for name, text in self.errors
            if not (outage and NETWORK_FAILURE.search(text))
        ]
