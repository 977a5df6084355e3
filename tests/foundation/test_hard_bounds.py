"""Hard bounds with sick servers (README "Shutdown", "Outages"): the one shutdown deadline holds
with PostgreSQL or Redis blackholed and with a collector that never answers; a second signal stops
at once; a PostgreSQL outage of any length heals within seconds; slow operator requests cannot
starve delivery; the listener is bound before anything claims; stdout carries JSON alone.

PostgreSQL and Redis sit behind `FaultProxy` (forward / blackhole / refuse, switched by the test).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.conftest import REDIS_ADDR
from tests.engine import helpers as h
from tests.engine.conftest import smtp_env, smtp_factory  # noqa: F401 (fixture)
from tests.foundation.conftest import TcpSink, run_cli
from tests.support.faultproxy import BLACKHOLE, REFUSE, FaultProxy
from tests.support.serve import ROOT, ServeProcess
from tests.support.smtpserver import SmtpTestServer

TIMEOUT = 6.0  # MAIL_SHUTDOWN_TIMEOUT of the shutdown tests: exit within TIMEOUT + 1 s
STALL = [{"match": r"^stall", "action": "stall", "stall_s": 30, "times": 1}]


@pytest.fixture
def pg_proxy(service_env: dict[str, str]) -> Iterator[FaultProxy]:
    params = conninfo_to_dict(service_env["MAIL_POSTGRES_PRIMARY_DSN"])
    with FaultProxy((str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))) as proxy:
        yield proxy


@pytest.fixture
def redis_proxy() -> Iterator[FaultProxy]:
    host, port = REDIS_ADDR.rsplit(":", 1)
    with FaultProxy((host, int(port))) as proxy:
        yield proxy


def behind(env: dict[str, str], *, pg: FaultProxy | None = None, rds: FaultProxy | None = None) -> dict[str, str]:
    """`env` with PostgreSQL and/or Redis reached through the proxies."""
    out = dict(env)
    if pg is not None:
        params = conninfo_to_dict(out["MAIL_POSTGRES_PRIMARY_DSN"])
        params.update(host="127.0.0.1", port=str(pg.port))
        out["MAIL_POSTGRES_PRIMARY_DSN"] = make_conninfo(**params)
    if rds is not None:
        out["MAIL_REDIS_MASTER_ADDR"] = rds.addr
    return out


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def sending(dsn: str) -> int:
    return h.status_counts(dsn).get("sending", 0)


def assert_json_only(proc: ServeProcess) -> None:
    for line in proc.raw:
        parsed = json.loads(line)
        assert {"event", "level", "timestamp"} <= set(parsed), line


# -- the one deadline ---------------------------------------------------------------------------


@pytest.mark.parametrize("sick", ["postgres", "redis", "collector"])
def test_sigterm_with_a_sick_server_exits_within_the_bound_and_sends_each_once(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer],  # noqa: F811
    pg_proxy: FaultProxy, redis_proxy: FaultProxy, tcp_sink: TcpSink, sick: str,
) -> None:
    """Attempts in flight (SMTP stalls after DATA) when the server goes silent, then SIGTERM with
    MAIL_SHUTDOWN_TIMEOUT=6s: exit 0 within 7 s; after a restart every delivery reaches the SMTP
    server exactly once (the interrupted attempts never got a reply)."""
    server = smtp_factory(tls="none", auth=None, rules=STALL)
    env = smtp_env(behind(service_env, pg=pg_proxy, rds=redis_proxy), server, MAIL_SMTP_TIMEOUT="20s",
                   MAIL_SHUTDOWN_TIMEOUT=f"{TIMEOUT:g}s", MAIL_ATTEMPT_WORKER_CONCURRENCY="4")
    if sick == "collector":
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://{tcp_sink.addr}", OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    dsn = service_env["MAIL_POSTGRES_PRIMARY_DSN"]
    ids = h.insert(dsn, [h.delivery(f"d-{i}", to=[f"stall{i}@example.com"]) for i in range(4)]
                   + [h.delivery(f"w-{i}", to=[f"user{i}@example.com"]) for i in range(4)])
    with ServeProcess(env) as proc:
        proc.wait_ready()
        # The four stalling deliveries claimed (others may wait in the claim-ahead buffer behind
        # them, given back at SIGTERM) and every worker connected.
        wait_until(lambda: all(h.deliveries(dsn, [f"d-{i}"])[f"d-{i}"]["status"] == "sending" for i in range(4))
                   and server.connections() >= 4, 20, "four attempts in flight")
        time.sleep(1.0)  # the four are inside the SMTP server's stall
        if sick == "postgres":
            pg_proxy.blackhole()
        elif sick == "redis":
            redis_proxy.blackhole()
        time.sleep(0.5)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = proc.wait(30)
        took = time.monotonic() - started
        events = proc.events()
    print(f"SIGTERM with the {sick} sick, MAIL_SHUTDOWN_TIMEOUT={TIMEOUT:g}s: exit {code} after {took:.2f}s")
    assert code == 0, (proc.stderr, proc.raw[-15:])
    assert took < TIMEOUT + 1.0, (took, proc.raw[-15:])
    assert events[-1] == "shutdown complete"
    assert "shutdown bound exceeded; exiting now" not in events
    assert proc.stderr == ""
    pg_proxy.forward()
    redis_proxy.forward()
    with ServeProcess(env) as again:
        again.wait_ready()
        rows = h.wait_status(dsn, ids, timeout=60)
        assert again.stop() == 0
    assert {r["status"] for r in rows.values()} == {"sent"}
    accepted = Counter(e["message_id"] for e in server.accepted())
    assert {r["message_id"] for r in rows.values()} == set(accepted)
    assert set(accepted.values()) == {1}, accepted  # each delivery reached the server exactly once


def test_a_second_signal_stops_at_once(
    service_env: dict[str, str], smtp_factory: Callable[..., SmtpTestServer],  # noqa: F811
) -> None:
    server = smtp_factory(tls="none", auth=None, rules=STALL)
    env = smtp_env(service_env, server, MAIL_SMTP_TIMEOUT="20s", MAIL_SHUTDOWN_TIMEOUT="30s",
                   MAIL_ATTEMPT_WORKER_CONCURRENCY="2")
    dsn = service_env["MAIL_POSTGRES_PRIMARY_DSN"]
    h.insert(dsn, [h.delivery(f"d-{i}", to=[f"stall{i}@example.com"]) for i in range(2)])
    with ServeProcess(env) as proc:
        proc.wait_ready()
        wait_until(lambda: sending(dsn) == 2 and server.connections() >= 2, 20, "two attempts in flight")
        time.sleep(1.0)  # both are inside the SMTP server's stall
        proc.signal(signal.SIGTERM)
        proc.wait_for("shutdown started")
        time.sleep(0.5)
        assert proc.proc.poll() is None, proc.raw[-10:]  # draining: the attempts may run for 30 s
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = proc.wait(30)
        took = time.monotonic() - started
        events = proc.events()
    print(f"second SIGTERM: exit {code} after {took:.2f}s")
    assert took < 1.0, took
    assert code == 0, proc.stderr
    assert "second signal received; stopping at once" in events
    assert events[-1] == "shutdown complete"
    assert proc.find("shutdown complete")[0]["hurried"] is True


def test_the_watchdog_ends_a_process_stuck_past_the_bound() -> None:
    """The last resort, independent of the event loop: exit 1 and one line at the bound + 2 s."""
    code = (
        "import time\n"
        "from mailtrio import log, shutdown\n"
        "log.configure('json', 'info')\n"
        "dog = shutdown.Watchdog(0.5)\n"
        "dog.arm(time.monotonic())\n"
        "time.sleep(30)\n"  # a process stuck in its shutdown
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    took = time.monotonic() - started
    assert done.returncode == 1, done
    assert 2.5 <= took < 10, took
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["event"] for line in lines] == ["shutdown bound exceeded; exiting now"]
    assert done.stderr == ""


# -- start-up order -----------------------------------------------------------------------------


def test_a_taken_http_port_is_a_startup_failure_with_nothing_claimed(service_env: dict[str, str]) -> None:
    dsn = service_env["MAIL_POSTGRES_PRIMARY_DSN"]
    ids = h.insert(dsn, [h.delivery(f"d-{i}") for i in range(5)])
    host, port = service_env["MAIL_INTERNAL_HTTP_ADDR"].rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((host, int(port)))
        taken.listen(1)
        done = run_cli(["serve"], service_env)
    assert done.code == 1, done
    assert len(done.stderr_lines) == 1 and "internal http listener" in done.stderr, done.stderr
    events = [json.loads(line)["event"] for line in done.stdout.splitlines()]
    assert "startup failed" in events
    assert "scheduler started" not in events and "command consumer started" not in events
    rows = h.deliveries(dsn, ids)
    assert {r["status"] for r in rows.values()} == {"queued"}  # nothing claimed
    assert h.attempts(dsn) == []


# -- outages heal in seconds --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "mode"),
    [(30, REFUSE), pytest.param(120, BLACKHOLE, marks=pytest.mark.slow)],
    ids=["30s-refused", "120s-blackholed"],
)
def test_a_postgres_outage_heals_within_5s_whatever_its_length(
    service_env: dict[str, str], pg_proxy: FaultProxy, redis_client: redis.Redis, stream_key: str,
    seconds: int, mode: str,
) -> None:
    """Commands sent during the outage are accepted, claimed and their outcomes written within
    5 s of PostgreSQL's return; during the outage each component says so about once per retry."""
    env = behind(service_env, pg=pg_proxy)
    dsn = service_env["MAIL_POSTGRES_PRIMARY_DSN"]
    with ServeProcess(env) as proc:
        proc.wait_ready()
        h.xadd(redis_client, stream_key, [h.entry("warm")])
        h.wait_status(dsn, ["warm"], timeout=20)
        first = len(proc.raw)
        with pg_proxy.fault(mode):
            time.sleep(2.0)
            ids = [f"during-{i}" for i in range(5)]
            h.xadd(redis_client, stream_key, [h.entry(did) for did in ids])
            time.sleep(seconds - 2.0)
            during = proc.raw[first:]
        returned = time.monotonic()
        h.wait_status(dsn, ids, timeout=60)
        healed = time.monotonic() - returned
        assert proc.stop() == 0
        assert_json_only(proc)
    print(f"outage {seconds}s ({mode}): intake, claims and outcomes back after {healed:.2f}s")
    assert healed < 5.0, healed
    counts = Counter(json.loads(line)["event"] for line in during)
    assert max(counts.values()) <= seconds / 2 + 8, counts  # about one line per retry, no flood


def test_a_redis_outage_heals_within_5s(
    service_env: dict[str, str], redis_proxy: FaultProxy, redis_client: redis.Redis, stream_key: str,
) -> None:
    """Commands written to the stream while the service cannot reach Redis (refused, then
    blackholed) are accepted and sent within 5 s of Redis's return."""
    env = behind(service_env, rds=redis_proxy)
    dsn = service_env["MAIL_POSTGRES_PRIMARY_DSN"]
    healed: list[float] = []
    with ServeProcess(env) as proc:
        proc.wait_ready()
        h.xadd(redis_client, stream_key, [h.entry("warm")])
        h.wait_status(dsn, ["warm"], timeout=20)
        for round_, mode in enumerate((REFUSE, BLACKHOLE)):
            with redis_proxy.fault(mode):
                ids = [f"during-{round_}-{i}" for i in range(3)]
                h.xadd(redis_client, stream_key, [h.entry(did) for did in ids])  # the test's own client
                time.sleep(6.0)
            returned = time.monotonic()
            h.wait_status(dsn, ids, timeout=60)
            healed.append(time.monotonic() - returned)
        assert proc.stop() == 0
        assert_json_only(proc)
    print(f"redis outages of 6 s (refused, blackholed): intake back after {healed[0]:.2f}s, {healed[1]:.2f}s")
    assert max(healed) < 5.0, healed


# -- operators cannot starve delivery -------------------------------------------------------------


def test_slow_operator_requests_do_not_delay_a_login_code(
    service_env: dict[str, str], redis_client: redis.Redis, stream_key: str,
) -> None:
    """Ten cancel requests blocked on a row lock (held by the test) beside a login code: the API
    has its own connections, so the login code is accepted and sent within a second."""
    dsn = service_env["MAIL_POSTGRES_PRIMARY_DSN"]
    h.insert(dsn, [h.delivery("held", send_at=datetime.now(UTC) + timedelta(hours=1))])
    with ServeProcess(service_env) as proc:  # MAIL_POSTGRES_POOL_SIZE=4
        proc.wait_ready()
        h.xadd(redis_client, stream_key, [h.entry("warm", source="authsession")])
        h.wait_status(dsn, ["warm"], timeout=20)
        results: list[Any] = []
        with psycopg.connect(dsn) as locker:
            locker.execute("SELECT 1 FROM mail.deliveries WHERE delivery_id = 'held' FOR UPDATE")

            def cancel() -> None:
                try:
                    results.append(proc.http("POST", "/api/v1/internal/deliveries/held/cancel", timeout=60)[0])
                except OSError as exc:
                    results.append(exc)

            clients = [threading.Thread(target=cancel, daemon=True) for _ in range(10)]
            for client in clients:
                client.start()
            time.sleep(1.5)
            assert not results  # all ten are waiting on the lock or for an API connection
            started = time.monotonic()
            h.xadd(redis_client, stream_key, [h.entry("login", source="authsession")])
            h.wait_status(dsn, ["login"], timeout=20)
            took = time.monotonic() - started
            locker.rollback()
        for client in clients:
            client.join(30)
        assert proc.stop() == 0
    print(f"login code beside ten blocked operator requests: {took:.3f}s")
    assert took < 1.0, took
    assert len(results) == 10


# -- stdout carries JSON alone --------------------------------------------------------------------


def test_every_stdout_line_is_json_under_debug_stdlib_records_included(
    service_env: dict[str, str], pg_proxy: FaultProxy,
) -> None:
    env = {**behind(service_env, pg=pg_proxy), "MAIL_LOG_LEVEL": "debug"}
    with ServeProcess(env) as proc:
        proc.wait_ready()
        assert proc.http("GET", "/api/v1/internal/deliveries/nope")[0] == 404
        with pg_proxy.fault(REFUSE):  # failing reconnects log their errors meanwhile
            time.sleep(4.0)
        time.sleep(3.0)
        assert proc.stop() == 0
    assert_json_only(proc)
    assert proc.stderr == ""
    # Hypercorn logs through the stdlib ("Running on ..."); its records arrive as JSON like ours.
    stdlib = [line for line in proc.lines if line.get("logger") == "hypercorn.error"]
    assert stdlib, proc.raw[-20:]
    assert all(isinstance(line.get("event"), str) and line.get("level") for line in stdlib)
    assert any(line.get("error") for line in proc.lines), "the refused database left no error line"


def test_stdlib_records_and_warnings_are_json_with_trace_ids() -> None:
    code = (
        "import logging, warnings\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from mailtrio import log\n"
        "log.configure('json', 'info')\n"
        "warnings.warn('a library warning', UserWarning)\n"
        "tracer = TracerProvider().get_tracer('t')\n"
        "with tracer.start_as_current_span('s'):\n"
        "    logging.getLogger('hypercorn.error').warning('inside %s', 'a span')\n"
        "for _ in range(5):\n"
        "    logging.getLogger('psycopg.pool').warning('error connecting in %r', 'x')\n"
        "logging.getLogger('redis').info('below the level')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0 and done.stderr == "", done
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["logger"] for line in lines] == ["py.warnings", "hypercorn.error", "psycopg.pool"]
    assert all({"event", "level", "timestamp"} <= set(line) for line in lines)
    assert "a library warning" in lines[0]["event"] and lines[0]["level"] == "warning"
    assert lines[1]["event"] == "inside a span" and len(lines[1]["otel_trace_id"]) == 32
    assert "otel_trace_id" not in lines[2]  # repeats within the window are left out
