"""The PostgreSQL store's schema, versioned and migrated on open by whichever server comes
first (under an advisory lock: two servers starting together never both migrate). A
database whose schema is newer than this server knows is refused, untouched.

Every table is named `conveyor_...`, in the connection's schema (its search_path), so that
one database may hold other things beside the store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from conveyord.model import TaskStatus
from conveyord.store.base import StoreOpenError, StoreTooNew

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A connection of its own, or one lent by a pool.
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger(__name__)

# Taken (pg_advisory_lock) while the schema is read and upgraded: "conv" in hex.
MIGRATION_LOCK = 0x636F6E76
CREATED = int(TaskStatus.CREATED)
RUNNING = int(TaskStatus.RUNNING)

# The queue's tables change at every step of every task: a fifth of each page is left free
# so that an update that touches no indexed column (a lease renewed, progress) stays on its
# page (a HOT update, no index entry), and autovacuum comes after 2% of the rows changed
# rather than 20%, without pausing, so that dead rows do not pile up under the claims.
_CHURN = (
    "fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02, "
    "autovacuum_analyze_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 0"
)

# Each entry upgrades the schema by one version; a database at version N gets N and on.
MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE conveyor_state (
        id integer PRIMARY KEY CHECK (id = 1),
        revision bigint NOT NULL,          -- the latest committed change's
        aging_rate double precision        -- fixed at the first open: dispatch_key uses it
    );
    INSERT INTO conveyor_state (id, revision) VALUES (1, 0);
    CREATE TABLE conveyor_tasks (
        task_id text PRIMARY KEY,
        seq bigint NOT NULL,               -- the revision of the change that created it
        tenant text NOT NULL,
        request_id text NOT NULL,
        request_hash bytea NOT NULL,
        task_type text NOT NULL,
        status smallint NOT NULL,
        dispatch_key double precision NOT NULL,  -- aging_rate * queued_since - priority
        runnable_at double precision,      -- next_attempt_at
        revision bigint NOT NULL,
        data text NOT NULL                 -- the task (store/codec.py)
    ) WITH ({_CHURN});
    CREATE UNIQUE INDEX conveyor_tasks_request ON conveyor_tasks (tenant, request_id)
        WHERE request_id <> '';
    CREATE INDEX conveyor_tasks_queue ON conveyor_tasks (dispatch_key, seq)
        WHERE status = {CREATED};
    CREATE INDEX conveyor_tasks_queue_by_type ON conveyor_tasks (task_type, dispatch_key, seq)
        WHERE status = {CREATED};
    CREATE INDEX conveyor_tasks_running ON conveyor_tasks (task_type)  -- the per-type caps
        WHERE status = {RUNNING};
    CREATE TABLE conveyor_changes (        -- the tasks' changes, and the schedules'
        revision bigint PRIMARY KEY,
        kind smallint NOT NULL,
        at double precision NOT NULL,
        task_id text NOT NULL,             -- or the schedule's id, for a schedule's change
        seq bigint NOT NULL,               -- the task's, and its revision (that of a
        task_revision bigint NOT NULL,     -- removal is its last change's); a schedule's too
        data text NOT NULL,
        ended text                         -- the attempt the change ended, if any
    ) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0);
    CREATE TABLE conveyor_attempts (
        task_id text NOT NULL,
        revision bigint NOT NULL,
        data text NOT NULL,
        PRIMARY KEY (task_id, revision)
    );
    CREATE TABLE conveyor_task_types (task_type text PRIMARY KEY);
    CREATE TABLE conveyor_schedules (
        schedule_id text PRIMARY KEY,
        tenant text NOT NULL,
        request_id text NOT NULL,
        seq bigint NOT NULL,               -- the revision of the change that created it
        revision bigint NOT NULL,          -- its latest change's
        data text NOT NULL                 -- the schedule (store/schedules.py)
    );
    CREATE UNIQUE INDEX conveyor_schedules_request ON conveyor_schedules (tenant, request_id)
        WHERE request_id <> '';
    """,
    # 2: each rated tenant's token bucket, one for every replica (tenants.Bucket's state),
    # in seconds of the database's clock; a new row is a full bucket.
    """
    CREATE TABLE conveyor_tenant_buckets (
        tenant text PRIMARY KEY,
        full_at double precision NOT NULL DEFAULT '-infinity',  -- when it is full again
        told double precision NOT NULL DEFAULT '-infinity'  -- when its last refused comes back
    );
    """,
    # 3: what each replica has open of the tenants' limits of watches and workers, so that
    # every replica counts them all (store/postgres_usage.py).
    """
    CREATE TABLE conveyor_replicas (
        replica text PRIMARY KEY,          -- the holder of its local worker's leases
        seen_at double precision NOT NULL  -- its latest round, by the database's clock
    );
    CREATE TABLE conveyor_usage (          -- a row for each tenant with anything open
        replica text NOT NULL REFERENCES conveyor_replicas ON DELETE CASCADE,
        tenant text NOT NULL,
        watches integer NOT NULL,
        workers integer NOT NULL,
        PRIMARY KEY (replica, tenant)
    );
    """,
    # 4: a schedule's data may hold the runs decided for it and not yet made (`pending`),
    # which a server of an earlier schema cannot read: this version keeps such servers out.
    """
    COMMENT ON TABLE conveyor_schedules IS
        'data may hold pending runs (decided, not yet made): read by schema 4 and later';
    """,
)

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS conveyor_schema (
    id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL
)
"""


async def upgrade(
    connection: Connection, where: str, migrations: Sequence[str] = MIGRATIONS
) -> None:
    """Bring the schema up to date, one server at a time; StoreTooNew for a newer one."""
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await connection.execute(_VERSION_TABLE)
        version = await connection.fetchval("SELECT version FROM conveyor_schema") or 0
        latest = len(migrations)
        if version > latest:
            raise StoreTooNew(
                f"database {where} has conveyor schema version {version}, newer than the "
                f"{latest} this conveyord knows; run a newer conveyord"
            )
        for number in range(version, latest):
            async with connection.transaction():
                await connection.execute(migrations[number])
                await connection.execute(
                    "INSERT INTO conveyor_schema (id, version) VALUES (1, $1) "
                    "ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                    number + 1,
                )
            log.info("store %s: schema version %d", where, number + 1)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


async def fix_aging_rate(connection: Connection, where: str, aging_rate: float) -> None:
    """Keep the aging rate of the first server to open the database; refuse another one:
    it is part of every queued task's dispatch key, which all servers must order alike."""
    kept = await connection.fetchval(
        "UPDATE conveyor_state SET aging_rate = coalesce(aging_rate, $1) WHERE id = 1 "
        "RETURNING aging_rate",
        aging_rate,
    )
    if kept != aging_rate:
        raise StoreOpenError(
            f"database {where} orders its queue with an aging rate of {kept * 60:g} priority "
            f"levels a minute, and this conveyord was given {aging_rate * 60:g}: every "
            "conveyord on one database must use the same (--aging)"
        )
