"""The PostgreSQL server the tests start (tests/postgres.py): it takes connections, each test's
database is its own, it runs unprivileged, and stopping it leaves nothing behind."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import asyncpg
import pytest

from tests import postgres
from tests.postgres import PostgresNotFound, PostgresServer


async def test_a_test_database_takes_connections(postgres_url: str) -> None:
    connection = await asyncpg.connect(postgres_url)
    try:
        database = await connection.fetchval("SELECT current_database()")
        assert postgres_url.endswith(f"/{database}")
        assert await connection.fetchval("SHOW server_encoding") == "UTF8"
        tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        assert await connection.fetchval(tables) == 0
    finally:
        await connection.close()


async def test_the_unix_socket_takes_connections(postgres_server: PostgresServer) -> None:
    connection = await asyncpg.connect(
        host=str(postgres_server.socket_directory),
        port=postgres_server.port,
        user=postgres.SUPERUSER,
        database="postgres",
    )
    try:
        # No client address: the connection came over the socket, not TCP.
        assert await connection.fetchval("SELECT inet_client_addr()") is None
    finally:
        await connection.close()


async def test_each_database_is_its_own(postgres_server: PostgresServer, postgres_url: str) -> None:
    other = postgres_server.create_database()
    assert other != postgres_url
    first, second = await asyncpg.connect(postgres_url), await asyncpg.connect(other)
    try:
        await first.execute("CREATE TABLE tasks (id bigint PRIMARY KEY)")
        await first.execute("INSERT INTO tasks VALUES (1)")
        assert await first.fetchval("SELECT count(*) FROM tasks") == 1
        assert await second.fetchval("SELECT to_regclass('tasks')") is None
    finally:
        await first.close()
        await second.close()
        postgres_server.drop_database(other.rsplit("/", 1)[1])


def test_a_database_is_dropped_after_its_test(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    name = url.rsplit("/", 1)[1]
    postgres_server.drop_database(name)
    assert postgres_server.sql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "0"


def test_the_fixture_marks_its_tests(
    postgres_server: PostgresServer, request: pytest.FixtureRequest
) -> None:
    """The conftest marks every test that uses the server (as this one, not marked by hand),
    so that -m 'not postgresql' leaves them out."""
    assert request.node.get_closest_marker("postgresql") is not None


def test_the_server_runs_unprivileged(postgres_server: PostgresServer) -> None:
    """PostgreSQL refuses root: as root, the server is the postgres (or nobody) account's."""
    status = Path(f"/proc/{postgres_server.pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert uid == os.stat(postgres_server.data).st_uid
    assert uid == (os.geteuid() if os.geteuid() != 0 else postgres.Account.unprivileged().uid)
    assert uid != 0


@pytest.mark.postgresql  # a server of its own, not the fixture's
def test_stopping_leaves_nothing() -> None:
    server = PostgresServer()
    server.start()
    directory, pid, port = server.directory, server.pid, server.port
    assert directory is not None and directory.is_dir()
    server.stop()
    assert not directory.exists()
    assert not _running(pid)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
    server.stop()  # again: nothing to do


def test_the_fixture_server_does_not_wait_for_the_disk(postgres_server: PostgresServer) -> None:
    for setting in ("fsync", "synchronous_commit", "full_page_writes"):
        assert postgres_server.sql(f"SHOW {setting}") == "off"


@pytest.mark.postgresql  # a server of its own, not the fixture's
def test_a_durable_server_flushes_its_commits_to_disk() -> None:
    """What a benchmark measures as a production database: PostgreSQL's own durability."""
    with PostgresServer(durable=True) as server:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            assert server.sql(f"SHOW {setting}") == "on"


def test_without_postgresql_it_says_how_to_install_it_or_leave_the_tests_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_config
    monkeypatch.setattr(postgres, "DEBIAN_BINDIRS", str(tmp_path / "*" / "bin"))
    with pytest.raises(PostgresNotFound) as raised:
        PostgresServer()
    assert "apt-get install postgresql" in str(raised.value)
    assert "pytest -m 'not postgresql'" in str(raised.value)


def _running(pid: int) -> bool:
    """Whether a process runs: its exit is done once it is gone or a zombie (whose parent,
    pg_ctl having exited, is init, which reaps it in its own time)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status
