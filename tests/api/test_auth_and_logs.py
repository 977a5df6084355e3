"""Bearer token auth, the request log line and span of every request, and JSON 500s."""

from __future__ import annotations

import re

import structlog

from mailtrio import bridge
from mailtrio.http.app import create_app
from mailtrio.store import Database
from tests.api.conftest import API, settings_for
from tests.support.serve import ServeProcess

TOKEN = "s3cret-operator-token"


def test_token_is_required_on_every_route(service_env: dict[str, str]) -> None:
    with ServeProcess(dict(service_env, MAIL_INTERNAL_HTTP_TOKEN=TOKEN)) as proc:
        proc.wait_ready()
        refused = [
            ("GET", "/deliveries/does-not-exist", {}),
            ("GET", "/schedule", {"Authorization": "Bearer wrong-token"}),
            ("GET", "/openapi.json", {"Authorization": TOKEN}),
            ("GET", "/deliveries", {"Authorization": f"Basic {TOKEN}"}),
            ("POST", "/deliveries/x/cancel", {"Authorization": f"Bearer {TOKEN}x"}),
            ("GET", "/no-such-route", {}),
        ]
        for method, path, headers in refused:
            status, body = proc.http(method, f"{API}{path}", headers=headers)
            assert status == 401, (path, body)
            assert body == {"error": {"code": "unauthorized", "message": "missing or invalid bearer token"}}

        auth = {"Authorization": f"Bearer {TOKEN}"}
        status, body = proc.http("GET", f"{API}/deliveries/does-not-exist", headers=auth)
        assert status == 404 and body["error"]["code"] == "not_found"
        status, body = proc.http("GET", f"{API}/schedule", headers=auth)
        assert status == 200 and body["depth"] == 0
        status, doc = proc.http("GET", f"{API}/openapi.json", headers=auth)
        assert status == 200
        assert doc["security"] == [{"bearerAuth": []}]
        assert all("401" in op["responses"] for item in doc["paths"].values() for op in item.values())

        # every request, refused ones included, is logged once inside its own span
        lines = proc.wait_for("internal http request", count=len(refused) + 3)
        requests = proc.find("internal http request")
        assert lines in requests
        assert [r["status"] for r in requests] == [401] * len(refused) + [404, 200, 200]
        for line in requests:
            assert re.fullmatch(r"[0-9a-f]{32}", line["otel_trace_id"])
            assert re.fullmatch(r"[0-9a-f]{16}", line["otel_span_id"])
            assert line["method"] in ("GET", "POST")
            assert line["path"].startswith(API)
            assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
            assert line["level"] == "info" and line["timestamp"]
        assert len({line["otel_trace_id"] for line in requests}) == len(requests)
        assert proc.stop() == 0
        assert TOKEN not in "\n".join(proc.raw) + proc.stderr


def test_bad_requests_are_logged_with_their_status(served: ServeProcess) -> None:
    for path, status in ((f"{API}/deliveries?limit=0", 400), (f"{API}/nope", 404), ("/", 404)):
        assert served.http("GET", path)[0] == status
    assert served.http("PUT", f"{API}/schedule")[0] == 405
    served.wait_for("internal http request", count=4)
    logged = [(r["method"], r["path"], r["status"]) for r in served.find("internal http request")]
    assert logged == [("GET", f"{API}/deliveries", 400), ("GET", f"{API}/nope", 404), ("GET", "/", 404),
                      ("PUT", f"{API}/schedule", 405)]


async def test_a_failing_database_answers_500_json_and_is_logged(database: str) -> None:
    settings = settings_for(database)
    async with bridge.open_loop():
        db = Database("postgresql://postgres@127.0.0.1:1/unreachable", 1)  # never opened
        client = create_app(settings, db).test_client()
        with structlog.testing.capture_logs() as logs:
            response = await client.get(f"{API}/schedule")
        assert response.status_code == 500
        assert await response.get_json() == {"error": {"code": "internal", "message": "internal error"}}
        # a bad argument is still refused before any database work
        response = await client.get(f"{API}/deliveries?limit=x")
        assert response.status_code == 400
    events = [(e["event"], e.get("status")) for e in logs]
    assert ("internal http error", None) in events
    assert ("internal http request", 500) in events
