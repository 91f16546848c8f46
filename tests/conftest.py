"""Session fixtures: a real PostgreSQL and a real Redis on free loopback ports."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.services import LocalPostgres, LocalRedis, free_port

_database_names = itertools.count(1)


def _throwaway_postgres() -> Iterator[LocalPostgres]:
    # Outside pytest's 0700 tmp folders, which the postgres user could not enter.
    data = Path(tempfile.mkdtemp(prefix="hearth-pg-"))
    data.chmod(0o755)
    server = LocalPostgres(data / "data", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    """A throwaway PostgreSQL cluster for the whole session."""
    yield from _throwaway_postgres()


@pytest.fixture
def own_postgres() -> Iterator[LocalPostgres]:
    """A PostgreSQL cluster of one test alone, free to be stopped, hung and restarted."""
    yield from _throwaway_postgres()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    """A throwaway Redis server for the whole session."""
    data = Path(tempfile.mkdtemp(prefix="hearth-redis-"))
    server = LocalRedis(data, free_port(), persistent=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def database(postgres: LocalPostgres) -> str:
    """The DSN of a fresh, empty database for one test."""
    return postgres.create_database(f"test_{next(_database_names)}")
