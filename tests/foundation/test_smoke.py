"""The runbook's smoke path through the real process: startup lines, 404 JSON, SIGTERM exit 0."""

from __future__ import annotations

from tests.support.serve import ServeProcess

STARTUP_LINES = [
    "attempt worker pool started",
    "scheduler started",
    "command consumer started",
    "sql retention worker started",
    "internal http listener started",
]


def test_smoke_request_answers_404_json_and_sigterm_exits_0(service_env: dict[str, str]) -> None:
    with ServeProcess(service_env) as proc:
        proc.wait_ready()
        events = proc.events()
        for line in STARTUP_LINES:
            assert line in events, line
        # migrations and the catalog are done before the listener opens
        assert events.index("migrations applied") < events.index("internal http listener started")
        assert events.index("template catalog parsed") < events.index("internal http listener started")
        status, body = proc.http("GET", "/api/v1/internal/deliveries/does-not-exist")
        assert status == 404
        assert body["error"]["code"] == "not_found"
        request_line = proc.wait_for("internal http request")
        assert len(request_line["otel_trace_id"]) == 32
        assert len(request_line["otel_span_id"]) == 16
        assert proc.stop() == 0
        assert proc.events()[-1] == "shutdown complete"
