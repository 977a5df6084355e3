"""`mailtrio enqueue`: the entry it writes, generated ids, and its exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import redis

from mailtrio.commands import Command, validate
from tests.support.serve import ROOT, base_env, free_port


def enqueue(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailtrio", "enqueue", *args], env=env, capture_output=True,
                          text=True, timeout=30, cwd=str(ROOT))


BASE = ("--source", "authsession", "--template", "login-code", "--locale", "pt-BR", "--to", "a@example.com")


def test_enqueue_writes_one_well_formed_entry(redis_client: redis.Redis, stream_key: str) -> None:
    env = base_env(MAIL_REDIS_MASTER_ADDR="127.0.0.1:6379", MAIL_REDIS_COMMAND_STREAM=stream_key)
    send_at = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0).isoformat()
    done = enqueue(env, *BASE, "--to", "b@example.com", "--var", "code=1 2=3", "--var", "name=Zoé",
                   "--send-at", send_at, "--idempotency-key", "login:42", "--delivery-id", "d-42")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "d-42\n"
    [(entry_id, fields)] = redis_client.xrange(stream_key)
    assert fields[b"delivery_id"] == b"d-42"
    assert fields[b"idempotency_key"] == b"login:42"
    assert fields[b"send_at"] == send_at.encode()
    body = json.loads(fields[b"payload"])
    assert body == {"template_id": "login-code", "to": ["a@example.com", "b@example.com"],
                    "variables": {"code": "1 2=3", "name": "Zoé"}}
    out = validate(entry_id.decode(), fields, now=datetime.now(UTC), has_template=lambda t: True)
    assert isinstance(out, Command)
    assert out.traceparent is not None


def test_enqueue_generates_ids(redis_client: redis.Redis, stream_key: str) -> None:
    env = base_env(MAIL_REDIS_MASTER_ADDR="127.0.0.1:6379", MAIL_REDIS_COMMAND_STREAM=stream_key)
    first, second = enqueue(env, *BASE), enqueue(env, *BASE)
    assert first.returncode == second.returncode == 0
    ids = [first.stdout.strip(), second.stdout.strip()]
    assert ids[0] != ids[1]
    entries = redis_client.xrange(stream_key)
    assert [e[1][b"delivery_id"].decode() for e in entries] == ids
    assert entries[0][1][b"idempotency_key"] != entries[1][1][b"idempotency_key"]


def test_enqueue_exit_codes(stream_key: str, redis_client: redis.Redis) -> None:
    ok_env = base_env(MAIL_REDIS_MASTER_ADDR="127.0.0.1:6379", MAIL_REDIS_COMMAND_STREAM=stream_key)
    bad_locale = enqueue(ok_env, "--source", "authsession", "--template", "t", "--locale", "EN", "--to", "a@x.com")
    assert bad_locale.returncode == 2 and "invalid_locale" in bad_locale.stderr
    bad_to = enqueue(ok_env, "--source", "authsession", "--template", "t", "--locale", "en", "--to", "nope")
    assert bad_to.returncode == 2 and "invalid_recipient" in bad_to.stderr
    bad_var = enqueue(ok_env, *BASE, "--var", "novalue")
    assert bad_var.returncode == 2 and "--var" in bad_var.stderr
    no_addr = enqueue(base_env(), *BASE)
    assert no_addr.returncode == 2 and "MAIL_REDIS_MASTER_ADDR" in no_addr.stderr
    down = enqueue(base_env(MAIL_REDIS_MASTER_ADDR=f"127.0.0.1:{free_port()}"), *BASE)
    assert down.returncode == 1 and down.stderr.count("\n") == 1
    assert redis_client.xlen(stream_key) == 0
