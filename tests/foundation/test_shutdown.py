"""Coordinated shutdown (CONTRACT §3; runbook "Shutdown"): SIGTERM/SIGINT stop the listener and the
feeders (consumer, scheduler) in the same moment, in-flight requests and attempts drain side by
side, the whole bounded by MAIL_SHUTDOWN_TIMEOUT, then `shutdown complete`, exit 0."""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any

import psycopg
import pytest

from mailtrio.cli import TELEMETRY_FLUSH_BOUND
from mailtrio.store.migrations import GOOSE_LOCK_ID
from tests.foundation.conftest import TcpSink
from tests.support.serve import ServeProcess

SERVICE_STOP_LINES = ["command consumer stopped", "attempt worker pool stopped"]


def _timed_stop(proc: ServeProcess, signum: int = signal.SIGTERM) -> tuple[int, float]:
    started = time.monotonic()
    proc.signal(signum)
    code = proc.wait(60)
    return code, time.monotonic() - started


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_gracefully_in_order(service_env: dict[str, str], signum: int) -> None:
    with ServeProcess(service_env) as proc:
        proc.wait_ready()
        code, elapsed = _timed_stop(proc, signum)
        assert code == 0, proc.stderr
        assert elapsed < 10  # MAIL_SHUTDOWN_TIMEOUT of service_env
        events = proc.events()
    assert events[-1] == "shutdown complete"
    assert proc.stderr == ""
    started = events.index("shutdown started")
    assert events.index("signal received") < started < events.index("internal http listener stopped"), events
    for line in SERVICE_STOP_LINES:
        assert started < events.index(line) < events.index("shutdown complete"), events


def test_listener_refuses_connections_after_shutdown_started(service_env: dict[str, str]) -> None:
    with ServeProcess(service_env) as proc:
        proc.wait_ready()
        host, port = proc.http_addr.rsplit(":", 1)
        proc.signal()
        proc.wait_for("internal http listener stopped")
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=2).close()
        assert proc.wait(30) == 0


def test_stalled_request_is_bounded_by_shutdown_timeout(service_env: dict[str, str]) -> None:
    """An HTTP request stuck in PostgreSQL (a table it reads is locked by the test) refuses to
    finish: the process still exits 0 inside MAIL_SHUTDOWN_TIMEOUT."""
    timeout = 3.0
    env = {**service_env, "MAIL_SHUTDOWN_TIMEOUT": f"{timeout:g}s"}
    with ServeProcess(env) as proc:
        proc.wait_ready()
        locker = psycopg.connect(env["MAIL_POSTGRES_PRIMARY_DSN"])
        try:
            # the delivery read joins dead_letters; the background services do not wait on it
            locker.execute("LOCK TABLE mail.dead_letters IN ACCESS EXCLUSIVE MODE")
            result: dict[str, Any] = {}

            def request() -> None:
                try:
                    result["response"] = proc.http("GET", "/api/v1/internal/deliveries/stuck", timeout=60)
                except OSError as exc:
                    result["error"] = exc

            client = threading.Thread(target=request, daemon=True)
            client.start()
            time.sleep(1.0)
            assert client.is_alive(), result  # the request is in flight, blocked on the lock
            code, elapsed = _timed_stop(proc)
            client.join(5)
        finally:
            locker.close()
        assert code == 0, proc.stderr
        assert elapsed < timeout + 2.0, (elapsed, proc.raw[-12:])
        assert "response" not in result, result
        events = proc.events()
    assert events[-1] == "shutdown complete"
    # the consumer does not wait for the HTTP drain: it stops claiming at once
    assert events.index("command consumer stopped") < events.index("internal http listener stopped")


def test_slow_loris_client_does_not_hold_shutdown(service_env: dict[str, str]) -> None:
    timeout = 3.0
    env = {**service_env, "MAIL_SHUTDOWN_TIMEOUT": f"{timeout:g}s"}
    with ServeProcess(env) as proc:
        proc.wait_ready()
        host, port = proc.http_addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as loris:
            loris.sendall(b"GET /api/v1/internal/deliveries/x HTTP/1.1\r\nHost: mailtrio\r\nX-Slow: ")
            idle = socket.create_connection((host, int(port)), timeout=5)
            idle.sendall(b"GET /api/v1/internal/deliveries/y HTTP/1.1\r\nHost: mailtrio\r\n\r\n")
            assert b" 404 " in idle.recv(4096).split(b"\r\n", 1)[0] + b" "  # keep-alive left open
            code, elapsed = _timed_stop(proc)
            idle.close()
        assert code == 0
        assert elapsed < timeout + 2.0
        assert proc.events()[-1] == "shutdown complete"


def test_signal_during_startup_stops_without_serving(service_env: dict[str, str]) -> None:
    """SIGTERM while a startup step waits (here: on goose's lock) stops promptly, exit 0."""
    dsn = service_env["MAIL_POSTGRES_PRIMARY_DSN"]
    with psycopg.connect(dsn, autocommit=True) as lock:
        lock.execute("SELECT pg_advisory_lock(%s)", (GOOSE_LOCK_ID,))
        with ServeProcess(service_env) as proc:
            proc.wait_for("postgres pool opened")
            code, elapsed = _timed_stop(proc)
            events = proc.events()
    assert code == 0, proc.stderr
    assert elapsed < 5
    assert "internal http listener started" not in events
    assert events[-1] == "shutdown complete"


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_stalled_telemetry_collector_does_not_hold_the_exit(
    service_env: dict[str, str], tcp_sink: TcpSink, protocol: str
) -> None:
    """Spans and metrics are flushed at exit, but a collector that accepts and never answers only
    gets until the shutdown deadline plus half a second (at most TELEMETRY_FLUSH_BOUND); the
    exporters' own retries (10 s each) are not waited for."""
    timeout = 3.0
    env = {**service_env, "MAIL_SHUTDOWN_TIMEOUT": f"{timeout:g}s",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{tcp_sink.addr}", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
    with ServeProcess(env) as proc:
        proc.wait_ready()
        assert proc.http("GET", "/api/v1/internal/deliveries/x")[0] == 404  # a span to export
        code, elapsed = _timed_stop(proc)
    assert code == 0, proc.stderr
    assert tcp_sink.count >= 1  # the exporters did try the collector
    assert elapsed < min(timeout + 1.0, TELEMETRY_FLUSH_BOUND + 1.0), elapsed
    assert proc.events()[-1] == "shutdown complete"
