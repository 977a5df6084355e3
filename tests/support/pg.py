"""PostgreSQL test databases: a migrated template built once per test process, cloned per test."""

from __future__ import annotations

import os
import uuid

import psycopg

ADMIN_DSN = os.environ.get("MAILTRIO_TEST_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def dsn_for(dbname: str) -> str:
    base = psycopg.conninfo.conninfo_to_dict(ADMIN_DSN)
    base["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**base)


def admin_execute(sql: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.encode())


def create_empty(name: str, *, with_schema: bool = True) -> str:
    admin_execute(f'CREATE DATABASE "{name}"')
    dsn = dsn_for(name)
    if with_schema:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA mail")
    return dsn


def drop(name: str) -> None:
    admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def build_template(name: str) -> str:
    """A database with schema `mail` and every migration applied, used as CREATE DATABASE template."""
    import trio

    from mailtrio import bridge
    from mailtrio.store import Database

    drop(name)
    dsn = create_empty(name)

    async def _migrate() -> None:
        async with bridge.open_loop():
            db = Database(dsn, 2)
            await db.open()
            try:
                await db.migrate()
            finally:
                await db.close()

    trio.run(_migrate)
    return dsn


def clone(template: str) -> tuple[str, str]:
    name = f"mt_{uuid.uuid4().hex[:16]}"
    admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name, dsn_for(name)
