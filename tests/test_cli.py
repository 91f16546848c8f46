"""The CLI as a subprocess against a real PostgreSQL: users, rooms and the demo seed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.auth import verify_password
from app.services import free_port
from app.store import Store

#: The repository root, so ``python -m app`` finds the package and its migrations.
ROOT = Path(__file__).resolve().parent.parent
#: A password long enough for ``user add``.
PASSWORD = "correct horse battery staple"
#: The line ``demo`` prints its admin password on.
DEMO_LINE = re.compile(r"^demo admin user: admin / password: (\S+)$", re.MULTILINE)


@dataclass
class Run:
    """What one CLI run left behind."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[dict]:
        """The error-level JSON log lines on stdout."""
        lines = [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]
        return [line for line in lines if line["level"] in ("error", "fatal")]


async def hearth(dsn: str, *args: str) -> Run:
    """Run ``python -m app *args`` against the database *dsn*."""
    env = {**os.environ, "HEARTH_DATABASE_URL": dsn, "HEARTH_LOG_DIR": "", "HEARTH_DB_TIMEOUT": "2"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return Run(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
async def dsn(database) -> str:
    """A database the ``migrate`` command brought up to date."""
    migrated = await hearth(database, "migrate")
    assert migrated.returncode == 0, migrated
    return database


@pytest.fixture
async def store(dsn):
    """A store on the same database, to check what the commands did."""
    store = Store(dsn)
    await store.open()
    yield store
    await store.close()


def assert_failed_with(run: Run, text: str) -> None:
    """*run* exited 1 after exactly one error line saying *text*."""
    assert run.returncode == 1, run
    assert [line["msg"] for line in run.errors] == [text]


async def test_user_add_creates_users_who_can_log_in(dsn, store):
    """``user add`` stores a scrypt hash of the password and the admin flag, never echoing it."""
    alice = await hearth(dsn, "user", "add", "alice", "--password", PASSWORD)
    root = await hearth(dsn, "user", "add", "root", "--password", PASSWORD, "--admin")
    assert (alice.returncode, root.returncode) == (0, 0)
    assert PASSWORD not in alice.stdout + alice.stderr
    _, _, alice_hash, alice_admin = await store.user_by_name("alice")
    _, _, _, root_admin = await store.user_by_name("root")
    assert (alice_admin, root_admin) == (False, True)
    assert verify_password(PASSWORD, alice_hash)


async def test_user_add_refuses_duplicates_and_bad_input(dsn):
    """A taken name, a malformed name and a short password each fail with one clear line."""
    assert (await hearth(dsn, "user", "add", "alice", "--password", PASSWORD)).returncode == 0
    taken = await hearth(dsn, "user", "add", "alice", "--password", PASSWORD)
    assert_failed_with(taken, "user already exists")
    malformed = await hearth(dsn, "user", "add", "no spaces", "--password", PASSWORD)
    assert_failed_with(malformed, "invalid username")
    short = await hearth(dsn, "user", "add", "bob", "--password", "short")
    assert_failed_with(short, "password must have at least 8 characters")


async def test_room_create_and_add_member(dsn, store):
    """Rooms are created public or private, members added idempotently, mistakes refused."""
    assert (await hearth(dsn, "user", "add", "alice", "--password", PASSWORD)).returncode == 0
    alice_id = (await store.user_by_name("alice"))[0]
    assert (await hearth(dsn, "room", "create", "ops", "--private")).returncode == 0
    assert (await hearth(dsn, "room", "create", "lobby")).returncode == 0
    assert await store.room_access("ops", alice_id) == (True, False)
    assert await store.room_access("lobby", alice_id) == (False, False)
    for _ in range(2):
        assert (await hearth(dsn, "room", "add-member", "ops", "alice")).returncode == 0
    assert await store.room_access("ops", alice_id) == (True, True)
    assert_failed_with(await hearth(dsn, "room", "create", "ops"), "room already exists")
    no_user = await hearth(dsn, "room", "add-member", "ops", "nobody")
    assert_failed_with(no_user, "user not found")
    no_room = await hearth(dsn, "room", "add-member", "nowhere", "alice")
    assert_failed_with(no_room, "room not found")


async def test_demo_prints_the_admin_password_once(dsn, store):
    """On an empty database ``demo`` prints a new admin's password once and opens a lobby."""
    first = await hearth(dsn, "demo")
    assert first.returncode == 0, first
    passwords = DEMO_LINE.findall(first.stdout)
    assert len(passwords) == 1
    admin_id, _, admin_hash, is_admin = await store.user_by_name("admin")
    assert is_admin and verify_password(passwords[0], admin_hash)
    assert await store.room_access("lobby", admin_id) == (False, False)
    second = await hearth(dsn, "demo")
    assert second.returncode == 0, second
    assert "password" not in second.stdout
    assert passwords[0] not in second.stdout


async def test_demo_leaves_existing_users_alone(dsn, store):
    """With any user present ``demo`` creates no admin and prints no password, only the lobby."""
    assert (await hearth(dsn, "user", "add", "alice", "--password", PASSWORD)).returncode == 0
    run = await hearth(dsn, "demo")
    assert run.returncode == 0, run
    assert "password" not in run.stdout
    assert await store.user_by_name("admin") is None
    alice_id = (await store.user_by_name("alice"))[0]
    assert await store.room_access("lobby", alice_id) == (False, False)


async def test_unreachable_database_fails_with_one_line():
    """Without PostgreSQL a command exits 1 after one ``database unreachable`` error line."""
    run = await hearth(f"postgresql://hearth@127.0.0.1:{free_port()}/hearth", "room", "create", "x")
    assert_failed_with(run, "database unreachable")


async def test_migrate_without_database_is_one_fatal_line():
    """``migrate`` without PostgreSQL exits 1 after one FATAL line, no traceback, no password."""
    dsn = f"postgresql://hearth:Zqhunter2@127.0.0.1:{free_port()}/hearth"
    run = await hearth(dsn, "migrate")
    assert run.returncode == 1, run
    assert "Traceback" not in run.stdout + run.stderr
    assert "Zqhunter2" not in run.stdout + run.stderr
    assert run.stderr == ""
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    (fatal,) = [line for line in lines if line["level"] in ("error", "fatal")]
    assert fatal["level"] == "fatal"
    assert fatal["database"] == dsn.replace("Zqhunter2", "***")
    assert fatal["error"] in ("DatabaseError", "OperationalError")
