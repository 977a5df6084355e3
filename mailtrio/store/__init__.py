"""The only package that imports psycopg.

`Database` owns a pool of psycopg connections driven from Trio directly (`store.native`: psycopg's
asyncio path through trio-asyncio costs several times the CPU per statement). Store code is
written as coroutines taking a connection; Trio callers run them with `Database.run`, which
checks a connection out of the pool, runs the unit of work and returns its result. Connections
made outside the pool (`connect_direct`: the identity lock, LISTEN, the event outbox) work from
Trio and, through the asyncio bridge, from asyncio alike.

Hard bounds: a unit of work cancelled from Trio (its deadline passed, or the shutdown's) is
abandoned at once: the connection is closed rather than asking the server to cancel the query and
waiting for the answer (psycopg's default, up to 5 s + 5 s against a stalled server); the next
unit opens a new one. Every connection has a connect timeout, TCP keepalives and
`tcp_user_timeout`, so a silent network failure surfaces as an error (the LISTEN connection
included). Connections are made on demand, so after an outage of any length the pool is back as
soon as PostgreSQL is (the callers retry with their own capped backoff).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import trio
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from mailtrio import bridge
from mailtrio.store import migrations
from mailtrio.store.migrations import Migration
from mailtrio.store.native import PoolTimeout, TrioConnection, TrioPool
from mailtrio.store.queries import q

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

# Errors worth retrying after a pause: the server restarted, a connection broke, a failover.
TransientError: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.errors.AdminShutdown,
    PoolTimeout,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
)
IntegrityError = psycopg.IntegrityError


class StartupError(Exception):
    """A startup step failed; the message is one clear line for the operator."""


# libpq connection options applied unless the DSN sets them: a bounded connect, and a dead peer
# noticed within ~25 s on an idle connection (keepalives) and ~20 s with data unacknowledged
# (tcp_user_timeout, ms).
CONNECTION_OPTIONS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 20000,
}
# Kept for the connection class's old name (tests and callers that name it).
AbandoningConnection = TrioConnection


# Server settings of the engine's connections (`Database(..., index_plans=True)`). Every engine
# statement is an index probe by design: a batch joined to its rows by primary key, the partial
# indexes of the schedule, the leases and the outbox. PostgreSQL keeps one generic plan per
# prepared statement, made with the statistics of its moment; one made while a table was small (a
# new database, a table emptied by retention, the first minute before autovacuum's ANALYZE)
# joins a batch of two outcomes by scanning the whole table, and keeps doing so as the table grows
# until the next ANALYZE (measured: finish_attempts for 2 deliveries took ~2.5 ms, ~9 ms once
# 20,000 rows had been added after its plan was made). With enable_seqscan off the planner takes
# the index wherever there is one, whatever the statistics say (a table without a usable index is
# still scanned); the delivery event triggers do the same for their own statements.
INDEX_PLAN_SETTINGS = "-c enable_seqscan=off"


def connection_options(dsn: str, *, index_plans: bool = False) -> dict[str, Any]:
    """CONNECTION_OPTIONS without those the DSN sets itself; with `index_plans`, the DSN's server
    `options` followed by INDEX_PLAN_SETTINGS."""
    given = conninfo_to_dict(dsn)
    options = {key: value for key, value in CONNECTION_OPTIONS.items() if key not in given}
    if index_plans:
        options["options"] = " ".join(filter(None, [str(given.get("options") or ""), INDEX_PLAN_SETTINGS]))
    return options


class Database:
    def __init__(self, dsn: str, pool_size: int, *, application_name: str = "mailtrio",
                 min_size: int | None = None, name: str = "mailtrio", index_plans: bool = False) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.options = connection_options(dsn, index_plans=index_plans)
        self.pool = TrioPool(
            self._connect_pooled,
            max_size=pool_size,
            min_size=min(2, pool_size) if min_size is None else min_size,
            timeout=10.0,
        )
        self.name = name

    async def _connect_pooled(self) -> TrioConnection:
        try:
            conn = await self.connect_direct(within=float(self.options.get("connect_timeout", 5)))
        except trio.TooSlowError as exc:
            raise psycopg.OperationalError("connecting to PostgreSQL timed out") from exc
        assert isinstance(conn, TrioConnection)
        return conn

    # -- lifecycle ---------------------------------------------------------------------------
    async def connect_direct(self, *, within: float = 5.0) -> Conn:
        """One connection outside the pool (advisory locks, LISTEN). Caller closes it."""

        options = {**self.options, "connect_timeout": max(2, int(within))}

        async def _connect() -> Conn:
            return await TrioConnection.connect(
                self.dsn,
                autocommit=True,
                row_factory=dict_row,
                application_name=self.application_name,
                **options,
            )

        with trio.fail_after(within + 1):
            return await bridge.call(_connect)

    async def open(self, *, within: float = 10.0, check: bool = True) -> None:
        """Check connectivity and the `mail` schema (unless not `check`), then open the pool."""
        if check:
            await self._check_schema(within=min(within, 5.0))
        try:
            with trio.fail_after(within):
                await self.pool.open()
        except (psycopg.Error, OSError, trio.TooSlowError) as exc:
            raise StartupError(f"cannot open the PostgreSQL pool: {_one_line(exc)}") from exc

    async def _check_schema(self, *, within: float) -> None:
        try:
            conn = await self.connect_direct(within=within)
        except (psycopg.Error, OSError, trio.TooSlowError) as exc:
            raise StartupError(f"cannot connect to PostgreSQL: {_one_line(exc)}") from exc
        try:

            async def _schema() -> bool:
                cur = await conn.execute(q("schema_exists"))
                row = await cur.fetchone()
                return bool(row and row["present"])

            with trio.fail_after(within):
                present = await bridge.call(_schema)
        except (psycopg.Error, trio.TooSlowError) as exc:
            raise StartupError(f"cannot check the PostgreSQL schema: {_one_line(exc)}") from exc
        finally:
            # Closing is local (no round trip): never skipped, even when cancelled.
            await close_quietly(conn)
        if not present:
            raise StartupError(
                "PostgreSQL schema 'mail' does not exist: it is provisioned externally for the "
                "service role (CREATE SCHEMA mail AUTHORIZATION mailservice)"
            )

    async def close(self, *, within: float = 5.0) -> None:
        """Close the pool: idle connections now (local work, no round trip); connections still
        busy are closed when their units of work end (`within` is kept for callers)."""
        self.pool.close()
        await trio.lowlevel.checkpoint()

    # -- units of work -------------------------------------------------------------------------
    async def run(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run the coroutine function `fn(conn)` on a pooled connection, in Trio."""
        async with self.pool.connection() as conn:
            return await fn(conn)

    async def transaction(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Like `run`, inside one transaction (committed on success, rolled back on error).

        No libpq pipeline mode: for units this small psycopg's pipeline bookkeeping costs more
        CPU than the round trips it saves on loopback (measured: BEGIN, a statement read back, a
        second statement and COMMIT took 0.6-0.7 ms of CPU plain, 0.9-1.0 ms pipelined, against
        0.25-0.3 ms for one statement alone; hot paths are single statements where they can be)."""

        async def _tx(conn: Conn) -> T:
            async with conn.transaction():
                return await fn(conn)

        return await self.run(_tx)

    # -- migrations ----------------------------------------------------------------------------
    async def migrate(self, *, within: float = 60.0, directory: Path | None = None) -> list[int]:
        """Apply pending migrations (the embedded ones unless `directory` is given) under the
        advisory lock; return the applied versions."""
        pending = migrations.load(directory)
        conn = await self.connect_direct()
        try:

            async def _migrate() -> list[int]:
                await conn.execute(q("advisory_lock"), {"lock_id": migrations.GOOSE_LOCK_ID})
                try:
                    await conn.execute(q("goose_table_create"))
                    await conn.execute(q("goose_seed"))
                    cur = await conn.execute(q("goose_applied"))
                    applied = {row["version_id"] for row in await cur.fetchall()}
                    done = []
                    for mig in pending:
                        if mig.version in applied:
                            continue
                        # One statement at a time, as goose runs them (see migrations.split).
                        if mig.use_transaction:
                            async with conn.transaction():
                                for statement in mig.up_statements:
                                    await conn.execute(statement.encode())
                                await conn.execute(q("goose_record"), {"version": mig.version})
                        else:
                            for statement in mig.up_statements:
                                await conn.execute(statement.encode())
                            await conn.execute(q("goose_record"), {"version": mig.version})
                        done.append(mig.version)
                    return done
                finally:
                    await conn.execute(q("advisory_unlock"), {"lock_id": migrations.GOOSE_LOCK_ID})

            with trio.fail_after(within):
                return await bridge.call(_migrate)
        except psycopg.Error as exc:
            raise StartupError(f"applying migrations failed: {_one_line(exc)}") from exc
        except trio.TooSlowError as exc:
            raise StartupError(f"applying migrations did not finish within {within:.0f}s") from exc
        finally:
            await close_quietly(conn)


async def close_quietly(conn: Conn) -> None:
    """Close a direct connection: local work only (libpq's finish), so it is done synchronously and
    cannot be skipped by a cancellation."""
    conn.pgconn.finish()
    with trio.CancelScope(shield=True):
        try:
            await conn.close()
        except Exception:
            pass


@dataclass(frozen=True)
class MigrationStatus:
    """goose's view of the database: embedded migrations with when each was applied (None: pending),
    and versions recorded as applied that this build does not embed (a newer release's)."""

    entries: list[tuple[Migration, datetime | None]]
    unknown_applied: list[int]

    @property
    def pending(self) -> list[Migration]:
        return [mig for mig, applied_at in self.entries if applied_at is None]


async def migration_status(dsn: str, *, within: float = 10.0) -> MigrationStatus:
    """Read which embedded migrations are applied, without changing anything (no lock taken,
    `mail.goose_db_version` not created). Raises StartupError with one line on failure."""
    embedded = migrations.load()
    db = Database(dsn, 2)
    try:
        conn = await db.connect_direct(within=min(within, 5.0))
    except (psycopg.Error, OSError, trio.TooSlowError) as exc:
        raise StartupError(f"cannot connect to PostgreSQL: {_one_line(exc)}") from exc
    try:

        async def _read() -> tuple[bool, bool, dict[int, datetime]]:
            cur = await conn.execute(q("schema_exists"))
            row = await cur.fetchone()
            if not (row and row["present"]):
                return False, False, {}
            cur = await conn.execute(q("goose_table_exists"))
            row = await cur.fetchone()
            if not (row and row["present"]):
                return True, False, {}
            cur = await conn.execute(q("goose_status"))
            return True, True, {int(r["version_id"]): r["tstamp"] for r in await cur.fetchall()}

        with trio.fail_after(within):
            schema, _, applied = await bridge.call(_read)
    except psycopg.Error as exc:
        raise StartupError(f"reading mail.goose_db_version failed: {_one_line(exc)}") from exc
    except trio.TooSlowError as exc:
        raise StartupError(f"PostgreSQL did not answer within {within:.0f}s") from exc
    finally:
        with trio.CancelScope(shield=True):
            await conn.close()
    if not schema:
        raise StartupError(
            "PostgreSQL schema 'mail' does not exist: it is provisioned externally for the "
            "service role (CREATE SCHEMA mail AUTHORIZATION mailservice)"
        )
    known = {mig.version for mig in embedded}
    return MigrationStatus(
        [(mig, applied.get(mig.version)) for mig in embedded],
        sorted(v for v in applied if v not in known),
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
