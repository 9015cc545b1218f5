"""The tenants' open watches and connected workers on every replica of a PostgreSQL store,
shared through the database, so that a tenant's max_watches and max_workers count them all.

Once every PUBLISH_SECONDS, each replica says it is alive (`conveyor_replicas`), writes
those of its counts by tenant that changed since its last round (`conveyor_usage`), and
reads the sums of the other replicas' (`Tenants.elsewhere`), all in one transaction. A
check is then this replica's own count, exact, plus the others' as last read: those are up
to two rounds old (one for the other replica to write, one for this one to read), so what
a tenant opened on the other replicas in the last two seconds or so may not be counted yet
(it may overshoot its limit by that much), and what it closed there may still be (it may be
refused that much longer).

A replica not heard from for STALE_SECONDS is taken for dead: the first other replica to
see it deletes its rows, and none counts them any more. A replica that cannot reach the
database logs it, keeps the counts it last read, and tries again at its next round; if it
was taken for dead meanwhile, it writes all its counts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import asyncpg

from conveyord.store.base import StoreFailed
from conveyord.tenants import Tenants, Usage

if TYPE_CHECKING:
    from conveyord.store.postgres import PostgresStore
    from conveyord.store.postgres_schema import Connection

log = logging.getLogger(__name__)

PUBLISH_SECONDS = 1.0  # between two rounds of a replica
STALE_SECONDS = 5.0  # a replica not heard from for this long is taken for dead
ROUND_SECONDS = 5.0  # a round that takes longer (the database unreachable) is given up

# A round's time is its transaction's, by the database's clock: replicas' clocks differ.
_NOW = "extract(epoch FROM now())::float8"
_HEARTBEAT = f"UPDATE conveyor_replicas SET seen_at = {_NOW} WHERE replica = $1 RETURNING true"
_JOIN = f"""
INSERT INTO conveyor_replicas (replica, seen_at) VALUES ($1, {_NOW})
ON CONFLICT (replica) DO UPDATE SET seen_at = excluded.seen_at
"""
_WRITE = """
INSERT INTO conveyor_usage (replica, tenant, watches, workers)
SELECT $1, tenant, watches, workers
FROM unnest($2::text[], $3::int[], $4::int[]) AS u(tenant, watches, workers)
ON CONFLICT (replica, tenant) DO UPDATE SET watches = excluded.watches, workers = excluded.workers
"""
_DROP = "DELETE FROM conveyor_usage WHERE replica = $1 AND tenant = ANY($2::text[])"
# The dead replicas' rows deleted (those another transaction holds are skipped: the
# replica is in a round, or another deletes them), and the live others' counts summed.
_OTHERS = f"""
WITH dead AS (
    DELETE FROM conveyor_replicas WHERE replica IN (
        SELECT replica FROM conveyor_replicas WHERE seen_at < {_NOW} - $2
        ORDER BY replica FOR UPDATE SKIP LOCKED)
)
SELECT u.tenant, sum(u.watches) AS watches, sum(u.workers) AS workers
FROM conveyor_usage u JOIN conveyor_replicas r USING (replica)
WHERE r.replica <> $1 AND r.seen_at >= {_NOW} - $2
GROUP BY u.tenant
"""
_LEAVE = "DELETE FROM conveyor_replicas WHERE replica = $1"
# What a round may meet when the database cannot be reached or the store has failed.
_UNREACHABLE = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
    StoreFailed,
)


class SharedUsage:
    """Publishes this replica's usage of the tenants' limits of watches and workers, and
    gives `tenants` the other replicas' (`start`, then `stop` before the store closes)."""

    def __init__(
        self,
        store: PostgresStore,
        tenants: Tenants,
        replica: str,
        *,
        interval: float = PUBLISH_SECONDS,
        stale: float = STALE_SECONDS,
    ) -> None:
        self.store = store
        self.tenants = tenants
        self.replica = replica
        self.interval = interval
        self.stale = stale
        self._published: dict[str, Usage] = {}  # this replica's counts, as the database has them
        self._unreachable = False  # the last round failed (and said so)
        self._stopping = asyncio.Event()
        self._rounds: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """A first round, so that the others' counts are known before any call comes, then
        one every `interval`."""
        await self.publish()
        self._rounds = asyncio.create_task(self._publish_forever(), name="conveyor-usage")

    async def stop(self) -> None:
        """Stop the rounds and delete this replica's rows: the others stop counting them at
        once rather than once they are stale. Safe to call twice."""
        rounds, self._rounds = self._rounds, None
        if rounds is None:
            return
        self._stopping.set()  # not a cancel: asyncpg may swallow one
        _, running = await asyncio.wait({rounds}, timeout=ROUND_SECONDS)
        for task in running:
            task.cancel()
        try:
            async with asyncio.timeout(ROUND_SECONDS):
                await self.store.pool.execute(_LEAVE, self.replica)
        except _UNREACHABLE as error:
            log.warning("store %s: cannot remove this replica's usage: %s", self.store.where, error)

    async def publish(self) -> bool:
        """One round: write this replica's counts, read the others'. False if the database
        could not be reached (said once, until a round succeeds again): the others' counts
        last read are kept."""
        usage = self.tenants.usage()
        try:
            async with (
                asyncio.timeout(ROUND_SECONDS),
                self.store.pool.acquire() as connection,
                connection.transaction(),
            ):
                others = await self._round(connection, usage)
        except _UNREACHABLE as error:
            if not self._unreachable:
                log.warning(
                    "store %s: cannot share the tenants' watches and workers; counting the "
                    "other replicas' as last read: %s: %s",
                    self.store.where, type(error).__name__, error,
                )  # fmt: skip
            self._unreachable = True
            return False
        if self._unreachable:
            log.info(
                "store %s: the tenants' watches and workers are shared again", self.store.where
            )
            self._unreachable = False
        self._published = usage
        self.tenants.elsewhere = others
        return True

    async def _round(self, connection: Connection, usage: dict[str, Usage]) -> dict[str, Usage]:
        """Say this replica is alive, write what changed, and read the other replicas'."""
        published = self._published
        if await connection.fetchval(_HEARTBEAT, self.replica) is None:
            # New, or taken for dead (and its rows deleted) while it could not say otherwise.
            await connection.execute(_JOIN, self.replica)
            published = {}
        changed = [(tenant, now) for tenant, now in usage.items() if published.get(tenant) != now]
        if changed:
            await connection.execute(
                _WRITE,
                self.replica,
                [tenant for tenant, _ in changed],
                [now.watches for _, now in changed],
                [now.workers for _, now in changed],
            )
        gone = [tenant for tenant in published if tenant not in usage]
        if gone:
            await connection.execute(_DROP, self.replica, gone)
        rows = await connection.fetch(_OTHERS, self.replica, self.stale)
        return {row["tenant"]: Usage(row["watches"], row["workers"]) for row in rows}

    async def _publish_forever(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            if self._stopping.is_set():
                return
            try:
                await self.publish()
            except Exception:  # never the server's end: the next round may do better
                log.exception("store %s: a round of the tenants' usage failed", self.store.where)
