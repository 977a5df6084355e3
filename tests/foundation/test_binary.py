"""The single-file executable (scripts/build-binary): built once per source tree, run with only
the system Python 3.11, from a directory outside the checkout. Its smoke path: migrate a fresh
database, templates check, serve in stub mode, enqueue a command, see it `sent`, SIGTERM, exit 0.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import psycopg
import pytest

from mailtrio import __version__
from mailtrio.store import migrations
from tests.conftest import REDIS_ADDR
from tests.foundation.conftest import run_cli
from tests.support.serve import ROOT, TEMPLATES, ServeProcess, free_port

BUILD_DIR = ROOT / "build" / "binary"
SYSTEM_PATH = "/usr/bin:/bin"
BUILD_TIMEOUT = 900


def _tree_key() -> str:
    """Hash of everything that goes into the binary: sources, SQL, metadata, the build script and
    the dependency versions it pins from the project's virtualenv."""
    h = hashlib.sha256()
    paths = [ROOT / "pyproject.toml", ROOT / "scripts" / "build-binary"]
    for top in ("mailtrio", "sql"):
        paths += [p for p in (ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for path in sorted(paths):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    versions = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    h.update("\n".join(versions).encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def binary() -> Path:
    """Build the executable once per source tree (shared by xdist workers through a file lock)."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    out = BUILD_DIR / f"mailtrio-{_tree_key()}"
    with open(BUILD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            for old in BUILD_DIR.glob("mailtrio-*"):
                old.unlink(missing_ok=True)
            done = subprocess.run([str(ROOT / "scripts" / "build-binary"), str(out)], capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT, cwd=str(ROOT))
            assert done.returncode == 0, f"build-binary failed:\n{done.stdout}\n{done.stderr[-4000:]}"
            assert out.exists()
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory outside the checkout."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    return d


def system_env(**values: str) -> dict[str, str]:
    """Only the system's PATH (no virtualenv, no pyenv) and the given variables."""
    env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8",
           "PEX_ROOT": str(BUILD_DIR / "pex-root")}
    env.update(values)
    return env


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    root = tmp_path / "catalog"
    shutil.copytree(TEMPLATES, root)
    return root


def test_binary_contents(binary: Path) -> None:
    names = zipfile.ZipFile(binary).namelist()
    for needed in ("mailtrio/sql/00001_init.sql", "mailtrio/sql/queries/core.sql",
                   "mailtrio/api/delivery-commands-asyncapi.yaml", "mailtrio/http/openapi.py", "mailtrio/cli.py",
                   "mailtrio/http/console_templates/base.html", "mailtrio/http/console_static/console.css"):
        assert any(n.endswith(needed) for n in names), needed
    assert any("psycopg_binary" in n and n.endswith(".so") for n in names)
    with open(binary, "rb") as f:
        assert f.readline().strip() == b"#!/usr/bin/env python3.11"
    assert os.access(binary, os.X_OK)


def test_version_with_only_system_python(binary: Path, outside: Path) -> None:
    done = run_cli(["--version"], system_env(), command=(str(binary),), cwd=outside, timeout=120)
    assert done.code == 0, done
    assert done.stdout.strip() == f"mailtrio {__version__}"


def test_templates_check_from_anywhere(binary: Path, outside: Path, catalog: Path) -> None:
    ok = run_cli(["templates", "check", str(catalog)], system_env(), command=(str(binary),), cwd=outside,
                 timeout=120)
    assert ok.code == 0, ok
    assert "ok login-code: en, fr, pt-BR" in ok.stdout
    (catalog / "login-code" / "en" / "subject.txt.j2").write_text("{{ code ", encoding="utf-8")
    bad = run_cli(["templates", "check"], system_env(MAIL_TEMPLATE_DIR=str(catalog)), command=(str(binary),),
                  cwd=outside, timeout=120)
    assert bad.code == 1, bad
    assert f"{catalog / 'login-code' / 'en' / 'subject.txt.j2'}:1:" in bad.stdout


def test_smoke_path(binary: Path, outside: Path, catalog: Path, empty_database: str, stream_key: str) -> None:
    migrated = run_cli(["migrate"], system_env(MAIL_POSTGRES_PRIMARY_DSN=empty_database), command=(str(binary),),
                       cwd=outside, timeout=120)
    assert migrated.code == 0, migrated
    versions = [m.version for m in migrations.load()]
    assert migrated.stdout.strip() == f"applied {len(versions)} migration(s): {', '.join(map(str, versions))}"
    with psycopg.connect(empty_database) as conn:
        rows = conn.execute("SELECT version_id FROM mail.goose_db_version ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [0, *versions]

    env = system_env(
        MAIL_REDIS_MASTER_ADDR=REDIS_ADDR,
        MAIL_REDIS_COMMAND_STREAM=stream_key,
        MAIL_POSTGRES_PRIMARY_DSN=empty_database,
        MAIL_POSTGRES_POOL_SIZE="4",
        MAIL_TEMPLATE_DIR=str(catalog),
        MAIL_SMTP_MODE="stub",
        MAIL_INTERNAL_HTTP_ADDR=f"127.0.0.1:{free_port()}",
        MAIL_SHUTDOWN_TIMEOUT="10s",
    )
    with ServeProcess(env, command=(str(binary),), cwd=outside) as proc:
        proc.wait_ready(60)
        # the service runs in the launched process itself, so SIGTERM reaches it directly
        assert proc.wait_for("starting")["instance_id"].endswith(f"-{proc.proc.pid}")
        assert proc.wait_for("migrations applied")["applied"] == []
        status, body = proc.http("GET", "/api/v1/internal/deliveries/does-not-exist")
        assert status == 404 and body["error"]["code"] == "not_found"
        status, body = proc.http("GET", "/api/v1/internal/openapi.json")
        assert status == 200 and body["openapi"].startswith("3.1")
        # the console's templates and static files travel in the file
        status, page = proc.http("GET", "/console")
        assert status == 200 and "Schedule depth" in page
        status, css = proc.http("GET", "/console/static/console.css")
        assert status == 200 and "font" in css

        enqueued = run_cli(
            ["enqueue", "--source", "notification", "--template", "newsletter", "--locale", "fr-CA",
             "--to", "ada@example.com", "--var", "title=Bonjour", "--var", "intro=Nouvelles"],
            env, command=(str(binary),), cwd=outside, timeout=60,
        )
        assert enqueued.code == 0, enqueued
        delivery_id = enqueued.stdout.strip()
        assert delivery_id

        deadline = time.monotonic() + 30
        delivery: dict[str, object] = {}
        while time.monotonic() < deadline:
            status, delivery = proc.http("GET", f"/api/v1/internal/deliveries/{delivery_id}")
            if status == 200 and delivery["status"] not in ("queued", "rendered", "sending"):
                break
            time.sleep(0.2)
        assert delivery.get("status") == "sent", delivery
        assert delivery["resolved_locale"] == "fr"
        started = time.monotonic()
        assert proc.stop(30) == 0
        assert time.monotonic() - started < 10
    assert proc.events()[-1] == "shutdown complete"
