"""Intake through the real `mailtrio serve` process: the enqueue helper and the API, log lines,
trace context and the malformed counter, SIGKILL mid-backlog, killed Redis connections, a lost
consumer group and a real Redis restart (a private redis-server on a free port)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.intake.conftest import Tables, entry, payload
from tests.support.serve import ROOT, ServeProcess, free_port

TP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TP = f"00-{TP_TRACE}-00f067aa0ba902b7-01"


def wait_until(predicate: Any, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.05)


def group_drained(client: redis.Redis, key: str, group: str = "mailservice") -> bool:
    """Every entry of the stream delivered to the group and acknowledged."""
    try:
        groups = client.xinfo_groups(key)
    except redis.ResponseError:
        return False
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            return int(g["pending"]) == 0 and g.get("lag") == 0
    return False


def preload(client: redis.Redis, key: str, entries: list[dict[str, Any]]) -> list[str]:
    ids: list[str] = []
    for start in range(0, len(entries), 1000):
        pipe = client.pipeline(transaction=False)
        for fields in entries[start : start + 1000]:
            pipe.xadd(key, fields)  # type: ignore[arg-type]
        ids.extend(i.decode() for i in pipe.execute())
    return ids


def backlog(n: int, prefix: str) -> tuple[list[dict[str, Any]], set[str], int]:
    """n commands: well-formed ones (due in an hour, so the delivery engine stays idle), an exact
    repeat every 20th, a malformed one every 50th."""
    later = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat(timespec="seconds")
    out: list[dict[str, Any]] = []
    unique: set[str] = set()
    malformed = 0
    for i in range(n):
        if i % 50 == 49:
            out.append(entry(delivery_id=f"{prefix}-m{i}", locale="EN_us"))
            malformed += 1
            continue
        if i % 20 == 19 and out[i - 10]["delivery_id"] in unique:
            out.append(dict(out[i - 10]))
            continue
        source = "authsession" if i % 3 else "notification"
        if source == "authsession":
            body = payload(to=[f"user{i}@example.com"])
        else:
            body = {"template_id": "newsletter", "to": [f"reader{i}@example.com"],
                    "variables": {"title": f"T{i}", "intro": "x"}}
        e = entry(delivery_id=f"{prefix}-{i}", source=source, payload_obj=body, send_at=later)
        out.append(e)
        unique.add(e["delivery_id"])
    return out, unique, malformed


def assert_exactly_one_outcome(tables: Tables, ids: list[str], unique: set[str], malformed: int) -> None:
    deliveries = tables.deliveries()
    assert set(deliveries) == unique
    rows = tables.malformed()
    assert len(rows) == malformed
    assert all(r["failure_code"] == "invalid_locale" for r in rows.values())
    # every accepted delivery came from one of the entries, no entry has two outcomes
    from_entries = {d["stream_entry_id"] for d in deliveries.values()}
    assert from_entries <= set(ids)
    assert not from_entries & set(rows)
    assert tables.count("payloads") == len(unique)


def metric_points(text: str, name: str) -> list[dict[str, Any]]:
    """Data points of metric `name` in the console exporter's JSON documents (on stderr)."""
    decoder = json.JSONDecoder()
    points: list[dict[str, Any]] = []
    pos = 0
    while True:
        pos = text.find('{\n    "resource_metrics"', pos)
        if pos < 0:
            return points
        doc, end = decoder.raw_decode(text, pos)
        pos = end
        for rm in doc["resource_metrics"]:
            for sm in rm["scope_metrics"]:
                for metric in sm["metrics"]:
                    if metric["name"] == name:
                        points.extend(metric["data"]["data_points"])


def run_enqueue(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailtrio", "enqueue", *args],
        env=env, capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )


# -- the happy path, logs, traces, metrics -------------------------------------------------------
def test_enqueue_then_read_back_over_the_api(service_env: dict[str, str], tables: Tables) -> None:
    with ServeProcess(service_env) as proc:
        proc.wait_ready()
        done = run_enqueue(service_env, "--source", "authsession", "--template", "login-code", "--locale", "fr",
                           "--to", "alice@example.com", "--var", "code=424242", "--delivery-id", "cli-1")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "cli-1"
        again = run_enqueue(service_env, "--source", "authsession", "--template", "login-code", "--locale", "fr",
                            "--to", "alice@example.com", "--var", "code=424242", "--delivery-id", "cli-1")
        assert again.returncode == 0
        generated = run_enqueue(service_env, "--source", "notification", "--template", "newsletter", "--locale",
                                "en", "--to", "bob@example.com", "--var", "title=Hi", "--var", "intro=News")
        assert generated.returncode == 0, generated.stderr
        new_id = generated.stdout.strip()
        assert new_id

        def found(delivery_id: str) -> bool:
            return proc.http("GET", f"/api/v1/internal/deliveries/{delivery_id}")[0] == 200

        wait_until(lambda: found("cli-1") and found(new_id), what="deliveries visible over the API")
        _, body = proc.http("GET", "/api/v1/internal/deliveries/cli-1")
        assert body["delivery_id"] == "cli-1" and body["source"] == "authsession"
        assert body["template_id"] == "login-code" and body["locale"] == "fr"
        assert body["recipients"]["to"] == [{"email": "alice@example.com", "name": None}]
        dup = proc.wait_for("stream command duplicate")
        assert dup["delivery_id"] == "cli-1" and dup["source"] == "authsession" and dup["stream_entry_id"]
        assert proc.stop() == 0
    assert tables.count("deliveries") == 2
    tp = tables.deliveries()["cli-1"]["traceparent"]
    assert tp and tp.startswith("00-")
    assert "command consumer stopped" in proc.events()


def test_rejections_are_logged_in_the_entry_trace_and_counted(
    service_env: dict[str, str], redis_client: redis.Redis, stream_key: str, tables: Tables
) -> None:
    env = {**service_env, "OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": "600000"}
    bad = [
        entry(delivery_id="bad-1", locale="EN_us", traceparent=TP),
        entry(delivery_id="bad-2", locale="xx"),
        entry(delivery_id="bad-3", payload="nope"),
        entry(delivery_id="bad-4", payload_obj=payload(to=[{"email": "a@example.com", "name": "x\r\nBcc: y"}])),
    ]
    ids = preload(redis_client, stream_key, [*bad, entry(delivery_id="ok-1", traceparent=TP), bad[0]])
    with ServeProcess(env) as proc:
        proc.wait_ready()
        proc.wait_for("stream command rejected", count=5)
        line = next(x for x in proc.find("stream command rejected") if x.get("delivery_id") == "bad-1")
        assert line["failure_code"] == "invalid_locale"
        assert line["source"] == "authsession"
        assert line["stream_entry_id"] == ids[0]
        assert line["failure_detail"]
        assert line["level"] == "warning"
        # the intake span is a child of the entry's traceparent
        assert line["otel_trace_id"] == TP_TRACE and len(line["otel_span_id"]) == 16
        codes = sorted(x["failure_code"] for x in proc.find("stream command rejected"))
        assert codes == ["invalid_json", "invalid_locale", "invalid_locale", "invalid_locale", "unsafe_header"]
        wait_until(lambda: group_drained(redis_client, stream_key), what="stream drained")
        assert proc.stop() == 0
    # the repeated bad-1 entry is a second, separate malformed record (its own stream entry)
    assert len(tables.malformed()) == 5
    assert tables.deliveries()["ok-1"]["traceparent"] == TP
    points = metric_points(proc.stderr, "mail.stream_commands.malformed")
    by_code: dict[str, int] = {}
    for p in points:
        by_code[p["attributes"]["failure_code"]] = max(by_code.get(p["attributes"]["failure_code"], 0), p["value"])
    assert by_code == {"invalid_locale": 3, "invalid_json": 1, "unsafe_header": 1}


# -- crashes ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_backlog_then_restart_leaves_each_command_one_outcome(
    service_env: dict[str, str], redis_client: redis.Redis, stream_key: str, tables: Tables
) -> None:
    entries, unique, malformed = backlog(6000, "k")
    ids = preload(redis_client, stream_key, entries)
    pending_at_kill = []
    # kill a few times while the backlog is being processed, at growing depths
    for round_, threshold in enumerate((300, 1500, 3000)):
        with ServeProcess(service_env) as proc:
            proc.wait_for("command consumer started", timeout=30)
            wait_until(lambda t=threshold: tables.count("deliveries") + tables.count("malformed_commands") >= t
                       or group_drained(redis_client, stream_key), timeout=60, what=f"round {round_} progress")
            proc.proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        pending_at_kill.append(int(redis_client.xpending(stream_key, "mailservice")["pending"]))
    # killed while holding read but unacknowledged entries at least once
    assert any(p > 0 for p in pending_at_kill), pending_at_kill
    with ServeProcess(service_env) as proc:  # same MAIL_INSTANCE_ID: its own pending entries come first
        proc.wait_ready()
        wait_until(lambda: group_drained(redis_client, stream_key), timeout=120, what="backlog drained")
        assert proc.stop() == 0
    assert_exactly_one_outcome(tables, ids, unique, malformed)


def test_a_dead_instances_pending_entries_are_claimed_by_another(
    service_env: dict[str, str], redis_client: redis.Redis, stream_key: str, tables: Tables
) -> None:
    entries, unique, malformed = backlog(2500, "c")
    ids = preload(redis_client, stream_key, entries)
    with ServeProcess(service_env) as proc:
        proc.wait_for("command consumer started", timeout=30)
        wait_until(lambda: tables.count("deliveries") > 100 or group_drained(redis_client, stream_key), timeout=60)
        proc.proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    # whatever the kill interrupted, the dead consumer certainly holds these unacknowledged entries
    dead = service_env["MAIL_INSTANCE_ID"]
    extra = [entry(delivery_id=f"c-extra-{i}") for i in range(50)]
    ids += preload(redis_client, stream_key, extra)
    unique |= {e["delivery_id"] for e in extra}
    redis_client.xreadgroup("mailservice", dead, {stream_key: ">"})
    assert int(redis_client.xpending(stream_key, "mailservice")["pending"]) >= len(extra)
    other = {**service_env, "MAIL_INSTANCE_ID": f"other-{uuid.uuid4().hex[:6]}", "MAIL_REDIS_CLAIM_IDLE": "1s"}
    with ServeProcess(other) as proc:
        proc.wait_ready()
        wait_until(lambda: group_drained(redis_client, stream_key), timeout=120, what="backlog drained")
        claimed = proc.wait_for("claimed idle stream entries")
        assert claimed["count"] > 0
        assert proc.stop() == 0
    assert_exactly_one_outcome(tables, ids, unique, malformed)


# -- Redis trouble ----------------------------------------------------------------------------
def _kill_clients(client: redis.Redis, name: str) -> int:
    """Kill every connection named `name`, once one of them is blocked in XREADGROUP (so the
    consumer sees the reset; an idle pooled connection is silently replaced by redis-py)."""
    listed = [c for c in client.client_list() if c.get("name") == name]
    if not any("b" in c.get("flags", "") for c in listed):
        return 0
    killed = 0
    for c in listed:
        try:
            client.client_kill_filter(_id=c["id"])
            killed += 1
        except redis.ResponseError:
            pass
    return killed


def test_client_kill_and_a_lost_group_while_serving(
    service_env: dict[str, str], redis_client: redis.Redis, stream_key: str, tables: Tables
) -> None:
    name = f"mailtrio:{service_env['MAIL_INSTANCE_ID']}"
    with ServeProcess(service_env) as proc:
        proc.wait_ready()
        expected: set[str] = set()
        for round_ in range(4):
            wait_until(lambda: _kill_clients(redis_client, name) >= 1, what="a blocked consumer connection")
            batch = [entry(delivery_id=f"ck-{round_}-{i}") for i in range(50)]
            preload(redis_client, stream_key, batch)
            expected |= {e["delivery_id"] for e in batch}
            wait_until(lambda n=len(expected): tables.count("deliveries") >= n, what=f"round {round_}")
        proc.wait_for("command consumer error; retrying")
        proc.wait_for("command consumer recovered")
        # the group vanishes (XGROUP DESTROY), then the whole key (DEL), each followed by new entries
        redis_client.xgroup_destroy(stream_key, "mailservice")
        preload(redis_client, stream_key, [entry(delivery_id="lost-1")])
        wait_until(lambda: "lost-1" in tables.deliveries(), what="lost-1")
        redis_client.delete(stream_key)
        preload(redis_client, stream_key, [entry(delivery_id="lost-2")])
        wait_until(lambda: "lost-2" in tables.deliveries(), what="lost-2")
        assert proc.wait_for("consumer group created")
        assert proc.stop() == 0
    assert set(tables.deliveries()) == expected | {"lost-1", "lost-2"}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of our own on a free port, without persistence; restartable; stopped by PID."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()

    class Server:
        proc: subprocess.Popen[bytes] | None = None

        def start(self) -> None:
            self.proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(tmp_path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            client = redis.Redis(port=port, socket_timeout=1)
            wait_until(lambda: _pings(client), timeout=10, what="private redis up")
            client.close()

        def stop(self) -> None:
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

        @property
        def addr(self) -> str:
            return f"127.0.0.1:{port}"

        def client(self) -> redis.Redis:
            return redis.Redis(port=port, socket_timeout=5)

    server = Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_redis_restart_without_persistence(service_env: dict[str, str], private_redis: Any, tables: Tables) -> None:
    env = {**service_env, "MAIL_REDIS_MASTER_ADDR": private_redis.addr}
    key = env["MAIL_REDIS_COMMAND_STREAM"]
    with ServeProcess(env) as proc:
        proc.wait_ready()
        client = private_redis.client()
        preload(client, key, [entry(delivery_id=f"rr-a{i}") for i in range(20)])
        wait_until(lambda: tables.count("deliveries") == 20, what="first entries")
        client.close()
        private_redis.stop()
        time.sleep(0.5)
        private_redis.start()  # empty: no stream, no group
        client = private_redis.client()
        preload(client, key, [entry(delivery_id=f"rr-b{i}") for i in range(20)])
        wait_until(lambda: tables.count("deliveries") == 40, timeout=40, what="entries after the restart")
        wait_until(lambda: group_drained(client, key), what="acknowledged after the restart")
        client.close()
        proc.wait_for("command consumer recovered")
        assert proc.stop() == 0
    assert len({d["stream_entry_id"] for d in tables.deliveries().values()}) <= 40


def test_two_instances_share_the_stream_and_create_each_delivery_once(
    service_env: dict[str, str], redis_client: redis.Redis, stream_key: str, tables: Tables
) -> None:
    entries, unique, malformed = backlog(1500, "two")
    second = {**service_env, "MAIL_INSTANCE_ID": f"second-{uuid.uuid4().hex[:6]}",
              "MAIL_INTERNAL_HTTP_ADDR": f"127.0.0.1:{free_port()}"}
    with ServeProcess(service_env) as a, ServeProcess(second) as b:
        a.wait_ready()
        b.wait_ready()
        # both are reading; every command arrives three times, the copies spread over both
        ids = preload(redis_client, stream_key, entries + [dict(e) for e in entries] + [dict(e) for e in entries])
        wait_until(lambda: group_drained(redis_client, stream_key), timeout=120, what="stream drained")
        assert a.stop() == 0 and b.stop() == 0
    for proc in (a, b):  # both did part of the work
        assert proc.find("stream command duplicate") or proc.find("stream command rejected")
    deliveries = tables.deliveries()
    assert set(deliveries) == unique
    # each malformed entry (all three copies) is its own quarantine record
    assert len(tables.malformed()) == 3 * malformed
    assert {d["stream_entry_id"] for d in deliveries.values()} <= set(ids)
