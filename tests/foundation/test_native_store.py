"""The store's psycopg connections driven from Trio, and its Trio pool, against a real PostgreSQL:
connections are reused, a unit of work cancelled mid-query closes its connection at once (no
wait for the server), a broken connection is replaced by the next unit, the pool's bound holds,
and the same connection still works from asyncio through the bridge."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import trio

from mailtrio import bridge
from mailtrio.store import Database, TransientError
from mailtrio.store.native import PoolTimeout, TrioConnection


async def _pid(conn: Any) -> int:
    cur = await conn.execute("SELECT pg_backend_pid() AS pid")
    row = await cur.fetchone()
    return int(row["pid"])


async def test_units_reuse_connections_and_results_match_asyncio(database: str) -> None:
    async with bridge.open_loop():
        db = Database(database, 2, min_size=1)
        await db.open()
        try:
            first = await db.run(_pid)
            assert await db.run(_pid) == first  # the same connection serves the next unit

            async def rows(conn: Any) -> list[dict[str, Any]]:
                async with conn.pipeline():
                    cur = await conn.execute("SELECT g, repeat('x', 70000) AS big FROM generate_series(1, 40) g")
                    await conn.execute("SELECT 1")
                return list(await cur.fetchall())

            native = await db.run(rows)
            # a large result in pipeline mode: libpq waits for reading and writing alike
            assert [r["g"] for r in native] == list(range(1, 41)) and all(len(r["big"]) == 70000 for r in native)
            direct = await db.connect_direct()
            try:
                assert isinstance(direct, TrioConnection)
                # the same connection class works from asyncio (through the bridge) and from Trio
                assert await bridge.call(rows, direct) == native
                assert await rows(direct) == native
            finally:
                direct.pgconn.finish()
        finally:
            await db.close()


async def test_a_cancelled_unit_closes_its_connection_at_once(database: str) -> None:
    async with bridge.open_loop():
        db = Database(database, 1, min_size=1)
        await db.open()
        try:
            before = await db.run(_pid)

            async def slow(conn: Any) -> None:
                await conn.execute("SELECT pg_sleep(3)")

            start = trio.current_time()
            with trio.move_on_after(0.3) as scope:
                await db.run(slow)
            assert scope.cancelled_caught
            assert trio.current_time() - start < 2.0  # nothing waited for the server
            after = await db.run(_pid)
            assert after != before  # the interrupted connection was not reused

            async def gone(conn: Any) -> bool:
                cur = await conn.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE pid = %s", (before,))
                row = await cur.fetchone()
                return int(row["n"]) == 0

            # the abandoned backend goes once its query ends and it finds the client gone
            for _ in range(100):
                if await db.run(gone):
                    break
                await trio.sleep(0.1)
            else:
                pytest.fail("the abandoned query's backend is still there after 10 s")
        finally:
            await db.close()


async def test_a_broken_connection_fails_one_unit_and_is_replaced(database: str) -> None:
    async with bridge.open_loop():
        db = Database(database, 1, min_size=1)
        await db.open()
        try:
            victim = await db.run(_pid)
            admin = await db.connect_direct()
            try:
                await admin.execute("SELECT pg_terminate_backend(%s)", (victim,))
            finally:
                admin.pgconn.finish()
            with pytest.raises(TransientError):
                await db.run(_pid)
            assert await db.run(_pid) != victim
        finally:
            await db.close()


async def test_the_pool_bound_holds_and_times_out(database: str) -> None:
    async with bridge.open_loop():
        db = Database(database, 2, min_size=0)
        db.pool.timeout = 0.5
        await db.open(check=False)
        try:
            busy = 0
            most = 0
            release = trio.Event()

            async def hold(conn: Any) -> None:
                nonlocal busy, most
                busy += 1
                most = max(most, busy)
                await conn.execute("SELECT 1")
                await release.wait()
                busy -= 1

            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(db.run, hold)
                await trio.sleep(0.3)
                with pytest.raises(PoolTimeout):
                    await db.run(_pid)  # a third unit finds no free connection within the timeout
                assert isinstance(PoolTimeout("x"), psycopg.OperationalError)
                release.set()
            assert most == 2
            assert await db.run(_pid) > 0
        finally:
            await db.close()


async def test_a_unit_takes_a_free_connection_without_a_scheduler_turn_and_never_when_cancelled(
    database: str,
) -> None:
    """A free connection is handed over at once: the unit starts before any other task gets to run
    (a scheduler turn per statement costs every task on the loop a pass). A caller already
    cancelled gets no connection and sends nothing."""
    async with bridge.open_loop():
        db = Database(database, 2, min_size=2)
        await db.open()
        try:
            order: list[str] = []

            async def unit(conn: Any) -> int:
                order.append("unit")
                return await _pid(conn)

            async def other() -> None:
                order.append("other")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(other)  # runnable, waiting for the next scheduler turn
                await db.run(unit)
            assert order == ["unit", "other"]

            ran: list[int] = []

            async def must_not_run(conn: Any) -> None:
                ran.append(await _pid(conn))

            with trio.CancelScope() as scope:
                scope.cancel()
                await db.run(must_not_run)
            assert scope.cancelled_caught and ran == []
            # both connections are still in the pool, idle and usable
            assert len(db.pool._idle) == 2
            assert await db.run(_pid) > 0
        finally:
            await db.close()


async def test_notifies_wait_with_a_timeout_from_trio(database: str) -> None:
    async with bridge.open_loop():
        db = Database(database, 1)
        listener = await db.connect_direct()
        try:
            await listener.execute("LISTEN native_test")
            start = trio.current_time()
            got = [n async for n in listener.notifies(timeout=0.3, stop_after=1)]
            assert got == [] and 0.25 <= trio.current_time() - start < 2.0

            async def notify(conn: Any) -> None:
                await conn.execute("SELECT pg_notify('native_test', 'hello')")

            await db.open(check=False)
            await db.run(notify)
            got = [n async for n in listener.notifies(timeout=5, stop_after=1)]
            assert [n.payload for n in got] == ["hello"]
        finally:
            listener.pgconn.finish()
            await db.close()


async def test_transactions_commit_whole_or_not_at_all(database: str) -> None:
    """`Database.transaction`: one transaction, committed only when its body returns; a body that
    raises or a statement that fails leaves nothing behind."""
    async with bridge.open_loop():
        db = Database(database, 1, min_size=1)
        await db.open()
        try:
            await db.run(lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS pipelined_tx (n int PRIMARY KEY)"))

            async def insert(conn: Any, values: tuple[int, ...], fail: str | None = None) -> int:
                for n in values:
                    await conn.execute("INSERT INTO pipelined_tx VALUES (%s)", (n,))
                cur = await conn.execute("SELECT count(*) AS c FROM pipelined_tx")
                row = await cur.fetchone()  # read inside the transaction: sees its own rows
                if fail == "raise":
                    raise RuntimeError("the body gave up")
                if fail == "statement":
                    await conn.execute("INSERT INTO pipelined_tx VALUES (1)")  # duplicate key
                return int(row["c"])

            async def count(conn: Any) -> list[int]:
                cur = await conn.execute("SELECT n FROM pipelined_tx ORDER BY n")
                return [r["n"] for r in await cur.fetchall()]

            assert await db.transaction(lambda c: insert(c, (1, 2)), ) == 2
            assert await db.run(count) == [1, 2]
            with pytest.raises(RuntimeError):
                await db.transaction(lambda c: insert(c, (3, 4), "raise"))
            assert await db.run(count) == [1, 2]

            with pytest.raises(psycopg.errors.UniqueViolation):
                await db.transaction(lambda c: insert(c, (5,), "statement"))
            assert await db.run(count) == [1, 2]

            async def status(conn: Any) -> str:
                cur = await conn.execute("SELECT 1 AS one")
                await cur.fetchone()
                return psycopg.pq.TransactionStatus(conn.pgconn.transaction_status).name

            assert await db.run(status) == "IDLE"  # autocommit again after a transaction
            await db.run(lambda conn: conn.execute("DROP TABLE pipelined_tx"))
        finally:
            await db.close()


async def test_a_cancelled_pipeline_is_cancelled_not_an_error(database: str) -> None:
    """Cancelled while its results are outstanding, a unit in pipeline mode ends in the
    cancellation itself (psycopg would otherwise fail to leave pipeline mode and raise that
    instead); its implicit transaction is rolled back with its connection."""
    async with bridge.open_loop():
        db = Database(database, 1, min_size=1)
        await db.open()
        try:
            await db.run(lambda conn: conn.execute("CREATE TABLE IF NOT EXISTS pipelined_cancel (n int)"))

            async def slow(conn: Any) -> None:
                async with conn.pipeline():
                    await conn.execute("INSERT INTO pipelined_cancel VALUES (1)")
                    await conn.execute("SELECT pg_sleep(2)")

            for _ in range(3):
                with trio.move_on_after(0.2) as scope:
                    await db.run(slow)
                assert scope.cancelled_caught

            async def count(conn: Any) -> int:
                cur = await conn.execute("SELECT count(*) AS n FROM pipelined_cancel")
                row = await cur.fetchone()
                return int(row["n"])

            assert await db.run(count) == 0
            await db.run(lambda conn: conn.execute("DROP TABLE pipelined_cancel"))
        finally:
            await db.close()


def test_the_engines_planner_setting_keeps_the_dsns_own_server_options() -> None:
    from mailtrio.store import INDEX_PLAN_SETTINGS, connection_options

    dsn = "postgresql://mailservice@127.0.0.1/mailtrio?options=-c%20statement_timeout%3D5s"
    assert connection_options(dsn, index_plans=True)["options"] == f"-c statement_timeout=5s {INDEX_PLAN_SETTINGS}"
    assert connection_options("postgresql://mailservice@127.0.0.1/mailtrio", index_plans=True)["options"] == (
        INDEX_PLAN_SETTINGS)
    # the HTTP API's pool (and every other) keeps the server's settings as the DSN gives them
    assert "options" not in connection_options(dsn)
