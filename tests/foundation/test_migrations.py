"""Embedded goose-format migrations: the `migrate` command, goose's bookkeeping and lock, and three
instances migrating one fresh database at the same moment (CONTRACT §3, §9)."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import psycopg
import pytest

from mailtrio.store import migrations
from tests.conftest import REDIS_ADDR
from tests.foundation.conftest import closed_addr, offline_env, run_cli
from tests.support.serve import ServeProcess, base_env, free_port

TABLES = {"deliveries", "payloads", "attempts", "dead_letters", "idempotency_reservations", "malformed_commands",
          "goose_db_version"}


def goose_rows(dsn: str) -> list[tuple[int, bool]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT version_id, is_applied FROM mail.goose_db_version ORDER BY id").fetchall()
    return [(int(v), bool(a)) for v, a in rows]


def mail_tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'mail'").fetchall()
    return {r[0] for r in rows}


def expected_goose_rows() -> list[tuple[int, bool]]:
    return [(0, True)] + [(m.version, True) for m in migrations.load()]


def _crc64_ecma(data: bytes) -> int:
    """Go's hash/crc64 with the ECMA table, as goose derives its lock id from "goose"."""
    poly = 0xC96C5795D7870F42
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    crc = 0xFFFFFFFFFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF


def test_lock_id_is_goose_default() -> None:
    assert migrations.GOOSE_LOCK_ID == _crc64_ecma(b"goose") == 5887940537704921958


def test_embedded_migrations_are_goose_files() -> None:
    found = migrations.load()
    assert found, "no migrations found"
    assert [m.version for m in found] == sorted({m.version for m in found})
    files = sorted(p.name for p in migrations.sql_dir().glob("*.sql"))
    assert len(files) == len(found)
    for mig in found:
        assert mig.up.strip()
        assert "+goose" not in mig.up


def test_goose_annotations_are_parsed() -> None:
    up, down, tx = migrations.parse(
        "-- header comment\n-- +goose Up\n-- +goose StatementBegin\nCREATE TABLE t (a int);\n"
        "-- +goose StatementEnd\n-- +goose Down\nDROP TABLE t;\n"
    )
    assert up == "CREATE TABLE t (a int);"
    assert down == "DROP TABLE t;"
    assert tx is True
    _, _, tx = migrations.parse("-- +goose NO TRANSACTION\n-- +goose Up\nCREATE INDEX CONCURRENTLY i ON t (a);\n")
    assert tx is False
    with pytest.raises(ValueError):
        migrations.parse("CREATE TABLE t (a int);\n")


def test_statements_are_split_as_goose_splits_them() -> None:
    parsed = migrations.split(
        "-- +goose NO TRANSACTION\n"
        "-- +goose Up\n"
        "-- a comment between statements\n"
        "CREATE INDEX CONCURRENTLY a_idx ON t (a);\n"
        "\n"
        "CREATE INDEX CONCURRENTLY b_idx\n"
        "    ON t (b); -- trailing comment\n"
        "-- +goose StatementBegin\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$\n"
        "BEGIN\n"
        "    RETURN 1;\n"
        "END;\n"
        "$$;\n"
        "-- +goose StatementEnd\n"
        "-- +goose Down\n"
        "DROP FUNCTION f(); DROP INDEX b_idx;\n"
        "DROP INDEX a_idx;\n"
    )
    assert parsed.use_transaction is False
    assert parsed.up == (
        "CREATE INDEX CONCURRENTLY a_idx ON t (a);",
        "CREATE INDEX CONCURRENTLY b_idx\n    ON t (b); -- trailing comment",
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$\nBEGIN\n    RETURN 1;\nEND;\n$$;",
    )
    # one line holding two statements stays one (goose splits at line ends only)
    assert parsed.down == ("DROP FUNCTION f(); DROP INDEX b_idx;", "DROP INDEX a_idx;")


@pytest.mark.parametrize("text", [
    "-- +goose Up\nCREATE TABLE t (a int)\n",  # unterminated
    "-- +goose Up\n-- +goose StatementBegin\nSELECT 1;\n",  # StatementBegin never ended
    "-- +goose Up\n-- +goose StatementEnd\n",  # StatementEnd without StatementBegin
    "-- +goose Up\n-- +goose Sideways\nSELECT 1;\n",  # unknown annotation
])
def test_files_goose_would_refuse_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        migrations.split(text)


def test_embedded_migrations_split_into_statements() -> None:
    for mig in migrations.load():
        assert mig.up_statements and all(s.rstrip().endswith(";") for s in mig.up_statements), mig.filename
        assert mig.filename.startswith(f"{mig.version:05d}_")


async def test_no_transaction_migration_with_two_concurrent_indexes(empty_database: str, tmp_path: Path) -> None:
    """PostgreSQL refuses CREATE INDEX CONCURRENTLY in a transaction block and in a multi-statement
    query string: each statement of a NO TRANSACTION migration runs on its own, as goose runs it."""
    from mailtrio import bridge
    from mailtrio.store import Database

    (tmp_path / "00001_table.sql").write_text(
        "-- +goose Up\nCREATE TABLE mail.t (a int, b int);\nINSERT INTO mail.t VALUES (1, 2);\n"
        "-- +goose Down\nDROP TABLE mail.t;\n")
    (tmp_path / "00002_indexes.sql").write_text(
        "-- +goose NO TRANSACTION\n-- +goose Up\n"
        "CREATE INDEX CONCURRENTLY t_a_idx ON mail.t (a);\n"
        "CREATE INDEX CONCURRENTLY t_b_idx ON mail.t (b);\n"
        "-- +goose Down\nDROP INDEX CONCURRENTLY mail.t_b_idx;\nDROP INDEX CONCURRENTLY mail.t_a_idx;\n")
    async with bridge.open_loop():
        db = Database(empty_database, 2)
        await db.open()
        try:
            assert await db.migrate(directory=tmp_path) == [1, 2]
            assert await db.migrate(directory=tmp_path) == []
        finally:
            await db.close()
    with psycopg.connect(empty_database) as conn:
        indexes = conn.execute(
            "SELECT i.relname, x.indisvalid FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
            "JOIN pg_class t ON t.oid = x.indrelid WHERE t.relname = 't' ORDER BY 1").fetchall()
    assert indexes == [("t_a_idx", True), ("t_b_idx", True)]
    assert goose_rows(empty_database) == [(0, True), (1, True), (2, True)]


def test_migrate_status_before_and_after_migrate(empty_database: str) -> None:
    env = base_env(MAIL_POSTGRES_PRIMARY_DSN=empty_database)
    files = [m.filename for m in migrations.load()]
    before = run_cli(["migrate", "status"], env)
    assert before.code == 0, before
    lines = before.stdout.splitlines()
    assert lines[:2] == ["    Applied At                  Migration", "    " + "=" * 39]
    assert lines[2:] == [f"    {'Pending':<24} -- {name}" for name in files]
    assert "goose_db_version" not in mail_tables(empty_database)  # status changes nothing

    assert run_cli(["migrate"], env).code == 0
    after = run_cli(["migrate", "status"], env)
    assert after.code == 0, after
    for line, name in zip(after.stdout.splitlines()[2:], files, strict=True):
        assert re.fullmatch(rf"    \w{{3}} \w{{3}} [ \d]\d \d\d:\d\d:\d\d \d{{4}} -- {re.escape(name)}", line), line
    status = json.loads(run_cli(["migrate", "status", "--json"], env).stdout)
    assert status["pending"] == [] and [m["file"] for m in status["migrations"]] == files
    assert all(m["applied_at"] for m in status["migrations"])

    # a version goose rolled back is pending again; a version this build does not know is shown
    last = migrations.load()[-1]
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("INSERT INTO mail.goose_db_version (version_id, is_applied) VALUES (%s, false), (99999, true)",
                     (last.version,))
    status = json.loads(run_cli(["migrate", "status", "--json"], env).stdout)
    assert status["pending"] == [last.version] and status["unknown_applied"] == [99999]


def test_migrate_status_failures(schemaless_database: str) -> None:
    assert run_cli(["migrate", "status"], base_env()).code == 2
    no_schema = run_cli(["migrate", "status"], base_env(MAIL_POSTGRES_PRIMARY_DSN=schemaless_database))
    assert no_schema.code == 1 and "schema 'mail' does not exist" in no_schema.stderr, no_schema
    unreachable = run_cli(["migrate", "status"], base_env(MAIL_POSTGRES_PRIMARY_DSN=f"postgresql://u@{closed_addr()}/x"))
    assert unreachable.code == 1 and len(unreachable.stderr_lines) == 1, unreachable
    assert run_cli(["migrate", "sideways"], base_env()).code == 2


def test_load_orders_by_version_and_rejects_duplicates(tmp_path: Path) -> None:
    (tmp_path / "00010_b.sql").write_text("-- +goose Up\nSELECT 2;\n")
    (tmp_path / "00002_a.sql").write_text("-- +goose Up\nSELECT 1;\n")
    (tmp_path / "README.md").write_text("not a migration")
    assert [(m.version, m.name) for m in migrations.load(tmp_path)] == [(2, "a"), (10, "b")]
    (tmp_path / "2_again.sql").write_text("-- +goose Up\nSELECT 3;\n")
    with pytest.raises(ValueError):
        migrations.load(tmp_path)


def test_migrate_command_applies_once_and_records_like_goose(empty_database: str) -> None:
    env = base_env(MAIL_POSTGRES_PRIMARY_DSN=empty_database)
    first = run_cli(["migrate"], env)
    assert first.code == 0, first
    versions = [m.version for m in migrations.load()]
    assert first.stdout.strip() == f"applied {len(versions)} migration(s): {', '.join(map(str, versions))}"
    assert goose_rows(empty_database) == expected_goose_rows()
    assert mail_tables(empty_database) >= TABLES
    second = run_cli(["migrate"], env)
    assert second.code == 0, second
    assert second.stdout.strip() == "applied 0 migration(s)"
    assert goose_rows(empty_database) == expected_goose_rows()


def test_goose_version_table_has_goose_layout(empty_database: str) -> None:
    assert run_cli(["migrate"], base_env(MAIL_POSTGRES_PRIMARY_DSN=empty_database)).code == 0
    with psycopg.connect(empty_database) as conn:
        cols = conn.execute(
            "SELECT column_name, data_type, is_nullable, is_identity FROM information_schema.columns "
            "WHERE table_schema = 'mail' AND table_name = 'goose_db_version' ORDER BY ordinal_position"
        ).fetchall()
    assert cols == [
        ("id", "integer", "NO", "YES"),
        ("version_id", "bigint", "NO", "NO"),
        ("is_applied", "boolean", "NO", "NO"),
        ("tstamp", "timestamp without time zone", "NO", "NO"),
    ]


def test_a_version_goose_rolled_back_is_applied_again(empty_database: str) -> None:
    """goose's rule: the latest row of a version decides; `goose down` appends is_applied=false."""
    env = base_env(MAIL_POSTGRES_PRIMARY_DSN=empty_database)
    assert run_cli(["migrate"], env).code == 0
    last = migrations.load()[-1]
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(last.down.encode())
        conn.execute("INSERT INTO mail.goose_db_version (version_id, is_applied) VALUES (%s, false)", (last.version,))
    again = run_cli(["migrate"], env)
    assert again.code == 0, again
    assert again.stdout.strip() == f"applied 1 migration(s): {last.version}"
    assert goose_rows(empty_database) == [*expected_goose_rows(), (last.version, False), (last.version, True)]


def test_migrate_command_failures(schemaless_database: str) -> None:
    missing = run_cli(["migrate"], base_env())
    assert missing.code == 2 and "MAIL_POSTGRES_PRIMARY_DSN" in missing.stderr
    bad = run_cli(["migrate"], base_env(MAIL_POSTGRES_PRIMARY_DSN="host=127.0.0.1 port"))
    assert bad.code == 2 and "MAIL_POSTGRES_PRIMARY_DSN" in bad.stderr, bad
    unreachable = run_cli(["migrate"], base_env(MAIL_POSTGRES_PRIMARY_DSN=f"postgresql://u@{closed_addr()}/x"))
    assert unreachable.code == 1 and "cannot connect to PostgreSQL" in unreachable.stderr, unreachable
    no_schema = run_cli(["migrate"], base_env(MAIL_POSTGRES_PRIMARY_DSN=schemaless_database))
    assert no_schema.code == 1 and "schema 'mail' does not exist" in no_schema.stderr, no_schema
    for done in (missing, bad, unreachable, no_schema):
        assert len(done.stderr_lines) == 1, done


def test_three_instances_migrate_one_fresh_database_at_once(empty_database: str, stream_key: str) -> None:
    procs = [
        ServeProcess(
            offline_env(
                MAIL_REDIS_MASTER_ADDR=REDIS_ADDR,
                MAIL_REDIS_COMMAND_STREAM=stream_key,
                MAIL_POSTGRES_PRIMARY_DSN=empty_database,
                MAIL_POSTGRES_POOL_SIZE="3",
                MAIL_INTERNAL_HTTP_ADDR=f"127.0.0.1:{free_port()}",
                MAIL_INSTANCE_ID=f"mig-{i}-{uuid.uuid4().hex[:6]}",
                MAIL_SHUTDOWN_TIMEOUT="10s",
            )
        )
        for i in range(3)
    ]
    try:
        for proc in procs:
            proc.wait_ready(30)
        applied = [proc.wait_for("migrations applied")["applied"] for proc in procs]
        versions = [m.version for m in migrations.load()]
        # exactly one instance applied the migrations; the others found them done
        assert sorted(applied, key=len) == [[], [], versions]
        assert goose_rows(empty_database) == expected_goose_rows()
        assert mail_tables(empty_database) >= TABLES
        for proc in procs:
            status, body = proc.http("GET", "/api/v1/internal/deliveries/nope")
            assert status == 404 and body["error"]["code"] == "not_found"
        for proc in procs:
            proc.signal()
        assert [proc.wait(30) for proc in procs] == [0, 0, 0]
    finally:
        for proc in procs:
            proc.__exit__()
