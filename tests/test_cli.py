"""The CLI as a subprocess against a real PostgreSQL: users, rooms, tokens, backups, checks,
the spool and the demo seed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.auth import token_hash, verify_password
from app.models import Message
from app.services import free_port
from app.spool import Spool
from app.store import Cursor, Store

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
        """The error-level JSON log lines, on stdout or (admin commands) stderr."""
        output = (self.stdout + "\n" + self.stderr).splitlines()
        lines = [json.loads(line) for line in output if line.startswith("{")]
        return [line for line in lines if line["level"] in ("error", "fatal")]


async def hearth(dsn: str, *args: str, env: dict[str, str] | None = None, stdin: str = "") -> Run:
    """Run ``python -m app *args`` against the database *dsn*, with *env* added and *stdin*
    as its standard input (never a terminal)."""
    env = {
        **os.environ, "HEARTH_DATABASE_URL": dsn, "HEARTH_LOG_DIR": "", "HEARTH_DB_TIMEOUT": "2",
        **(env or {}),
    }  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", *args, cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin.encode()), timeout=60)
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
    assert DEMO_LINE.search(run.stdout) is None  # only the hint naming reset-password
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


@pytest.fixture
def spool_env(tmp_path) -> dict[str, str]:
    """A spool folder of this test alone, and a port no server listens on."""
    return {"HEARTH_SPOOL_DIR": str(tmp_path / "spool"), "HEARTH_PORT": str(free_port())}


def spooled(room: str, text: str) -> dict:
    """A spool record of a message *text* to *room*, as the server writes one."""
    message = Message.accept(room=room, sender="alice", content=text, client_msg_id=text)
    return message.to_record()


async def test_user_add_list_and_reset_password_read_stdin(dsn, store):
    """Passwords come from stdin, ``user list`` shows roles, a reset revokes the old tokens."""
    added = await hearth(dsn, "user", "add", "carol", "--admin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added
    assert (await hearth(dsn, "user", "add", "dave", stdin=PASSWORD + "\n")).returncode == 0
    listed = await hearth(dsn, "user", "list")
    assert listed.returncode == 0, listed
    rows = [line.split()[:2] for line in listed.stdout.splitlines()]
    assert rows == [["carol", "admin"], ["dave", "user"]]
    issued = await hearth(dsn, "token", "issue", "dave")
    token = issued.stdout.strip()
    assert await store.user_for_token(token_hash(token)) is not None
    new_password = "another long password"
    reset = await hearth(dsn, "user", "reset-password", "dave", stdin=new_password + "\n")
    assert reset.returncode == 0, reset
    assert new_password not in reset.stdout + reset.stderr
    _, _, dave_hash, _ = await store.user_by_name("dave")
    assert verify_password(new_password, dave_hash)
    assert not verify_password(PASSWORD, dave_hash)
    assert await store.user_for_token(token_hash(token)) is None
    unknown = await hearth(dsn, "user", "reset-password", "nobody", stdin=PASSWORD + "\n")
    assert_failed_with(unknown, "user not found")
    assert "Traceback" not in unknown.stderr


async def test_room_list_shows_privacy_seq_and_members(dsn):
    """``room list`` prints each room with its privacy, last seq and member count."""
    assert (await hearth(dsn, "user", "add", "alice", "--password", PASSWORD)).returncode == 0
    assert (await hearth(dsn, "room", "create", "ops", "--private")).returncode == 0
    assert (await hearth(dsn, "room", "create", "lobby")).returncode == 0
    assert (await hearth(dsn, "room", "add-member", "ops", "alice")).returncode == 0
    listed = await hearth(dsn, "room", "list")
    assert listed.returncode == 0, listed
    assert [line.split() for line in listed.stdout.splitlines()] == [
        ["lobby", "public", "last_seq", "0", "members", "0"],
        ["ops", "private", "last_seq", "0", "members", "1"],
    ]


async def test_token_issue_and_revoke(dsn, store):
    """An issued token logs its user in until revoked; unknown users and tokens are refused."""
    assert (await hearth(dsn, "user", "add", "alice", "--password", PASSWORD)).returncode == 0
    issued = await hearth(dsn, "token", "issue", "alice", "--hours", "2")
    assert issued.returncode == 0, issued
    token = issued.stdout.strip()
    owner = await store.user_for_token(token_hash(token))
    assert owner is not None and owner[1] == "alice"
    assert token not in issued.stderr
    revoked = await hearth(dsn, "token", "revoke", stdin=token + "\n")
    assert revoked.returncode == 0, revoked
    assert await store.user_for_token(token_hash(token)) is None
    again = await hearth(dsn, "token", "revoke", stdin=token + "\n")
    assert_failed_with(again, "token unknown or already revoked")
    assert_failed_with(await hearth(dsn, "token", "issue", "nobody"), "user not found")


async def test_backup_writes_a_dump_that_verifies(dsn, tmp_path):
    """``backup`` prints the path of a custom-format dump that ``backup verify`` accepts."""
    assert (await hearth(dsn, "room", "create", "lobby")).returncode == 0
    target = tmp_path / "hearth.dump"
    made = await hearth(dsn, "backup", "--output", str(target))
    assert made.returncode == 0, made
    assert made.stdout.strip() == str(target)
    assert target.read_bytes().startswith(b"PGDMP")
    verified = await hearth(dsn, "backup", "verify", str(target))
    assert verified.returncode == 0, verified
    assert "readable" in verified.stdout


async def test_backup_verify_refuses_a_bad_file(dsn, tmp_path):
    """A file pg_restore cannot read, or no file at all, fails ``backup verify`` in one line."""
    bad = tmp_path / "bad.dump"
    bad.write_bytes(b"not a dump at all\n")
    run = await hearth(dsn, "backup", "verify", str(bad))
    assert run.returncode == 1, run
    (error,) = run.errors
    assert error["msg"].startswith(f"backup {bad} unreadable:")
    assert "Traceback" not in run.stderr
    missing = await hearth(dsn, "backup", "verify", str(tmp_path / "none.dump"))
    assert_failed_with(missing, f"backup {tmp_path / 'none.dump'} not found")


async def test_check_passes_then_finds_a_seq_gap(dsn, store, spool_env):
    """``check`` holds on a sound database and fails ``seqs`` once a message row is deleted."""
    assert (await hearth(dsn, "room", "create", "lobby")).returncode == 0
    for text in ("one", "two", "three"):
        await store.insert_message(Message.from_record(spooled("lobby", text)))
    sound = await hearth(dsn, "check", env=spool_env)
    assert sound.returncode == 0, sound
    assert [line.split(":")[0] for line in sound.stdout.splitlines()] == [
        "ok   migrations", "ok   seqs", "ok   spool", "ok   dead letters",
    ]  # fmt: skip

    async def delete_second(cursor: Cursor) -> None:
        await cursor.execute("delete", "messages", "DELETE FROM messages WHERE seq = 2")

    await store.run(delete_second, name="test_delete")
    gap = await hearth(dsn, "check", env=spool_env)
    assert_failed_with(gap, "checks failed: seqs")
    assert "FAIL seqs: lobby: 1 seq(s) missing in 1..3" in gap.stdout


async def test_drain_spool_stores_in_order_and_dead_letters_retry(dsn, store, spool_env):
    """Spooled messages are stored in order; one for a missing room becomes a dead letter,
    is listed, and once retried after the room exists is stored too."""
    assert (await hearth(dsn, "room", "create", "lobby")).returncode == 0
    spool = Spool(Path(spool_env["HEARTH_SPOOL_DIR"]) / "publish.spool")
    records = [spooled("lobby", "first"), spooled("later", "lost"), spooled("lobby", "second")]
    for record in records:
        await spool.append(record)
    drained = await hearth(dsn, "drain-spool", env=spool_env)
    assert drained.returncode == 0, drained
    assert "[2/3]" in drained.stdout and "dead letter (NotFound)" in drained.stdout
    assert "done: 2 stored, 1 dead-lettered" in drained.stdout
    assert [m.content for m in await store.history("lobby", since=0)] == ["first", "second"]
    checked = await hearth(dsn, "check", env=spool_env)
    assert_failed_with(checked, "checks failed: dead letters")
    listed = await hearth(dsn, "dead-letters", "list", env=spool_env)
    assert listed.returncode == 0, listed
    assert f"id={records[1]['id']} room=later" in listed.stdout
    assert "reason=NotFound" in listed.stdout and "lost" not in listed.stdout
    assert (await hearth(dsn, "room", "create", "later")).returncode == 0
    retried = await hearth(dsn, "dead-letters", "retry", env=spool_env)
    assert retried.returncode == 0, retried
    assert f"id={records[1]['id']} room=later sender=alice: requeued" in retried.stdout
    assert (await hearth(dsn, "drain-spool", env=spool_env)).returncode == 0
    assert [m.content for m in await store.history("later", since=0)] == ["lost"]
    assert (await hearth(dsn, "check", env=spool_env)).returncode == 0


async def test_drain_spool_refuses_while_a_server_listens(dsn, spool_env):
    """With something answering on HEARTH_PORT, ``drain-spool`` and ``retry`` refuse to run."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", int(spool_env["HEARTH_PORT"])))
        listener.listen()
        for args in (("drain-spool",), ("dead-letters", "retry")):
            run = await hearth(dsn, *args, env=spool_env)
            assert run.returncode == 1, run
            (error,) = run.errors
            assert error["msg"].startswith("a server is listening on 127.0.0.1:")


async def test_demo_tells_how_to_reset_the_admin_password(dsn):
    """Without a saved demo login ``demo`` names the command that sets a new admin password."""
    assert (await hearth(dsn, "user", "add", "admin", "--password", PASSWORD)).returncode == 0
    run = await hearth(dsn, "demo")
    assert run.returncode == 0, run
    assert "python -m app user reset-password admin" in run.stdout
