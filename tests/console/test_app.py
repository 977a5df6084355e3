"""The console in process (Quart's test client, the real database): sessions and CSRF without a
token, the policy headers on every response, error pages, the sign-in's redirect target, and the
per-recipient outcomes table."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from mailtrio import bridge
from mailtrio.http import console
from mailtrio.http.app import create_app
from mailtrio.store import Database
from tests.api.conftest import API, insert_delivery, insert_payload, settings_for, status_of

TOKEN = "in-process-token"
_CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture
async def db(database: str) -> AsyncIterator[Database]:
    async with bridge.open_loop():
        opened = Database(database, 2)
        await opened.open()
        try:
            yield opened
        finally:
            await opened.close()


@pytest.fixture
def sql(database: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def _csrf(html: str) -> str:
    found = _CSRF_RE.search(html)
    assert found, html[:500]
    return found.group(1)


def _assert_policy(response: Any) -> None:
    csp = response.headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'none'") and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"


async def test_without_a_token_pages_open_and_actions_still_need_the_form_token(
        database: str, db: Database, sql: psycopg.Connection[Any]) -> None:
    did = insert_delivery(sql, status="queued")
    client = create_app(settings_for(database), db).test_client()

    overview = await client.get("/console")
    assert overview.status_code == 200
    _assert_policy(overview)
    cookie = overview.headers["Set-Cookie"]
    assert cookie.startswith("mailtrio_console=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert "Sign out" not in await overview.get_data(as_text=True)  # nothing to sign out of
    assert 'http-equiv="refresh"' not in await overview.get_data(as_text=True)
    reloading = await (await client.get("/console?refresh=30")).get_data(as_text=True)
    assert '<meta http-equiv="refresh" content="30">' in reloading
    assert 'http-equiv="refresh"' not in await (await client.get("/console?refresh=1")).get_data(as_text=True)

    # without the session's form token nothing changes
    assert (await client.post(f"/console/deliveries/{did}/cancel", form={})).status_code == 403
    assert (await client.post(f"/console/deliveries/{did}/cancel", form={"csrf": "x" * 43})).status_code == 403
    assert (await client.post("/console/bulk", form={"action": "cancel", "delivery_id": did})).status_code == 403
    assert status_of(sql, did) == "queued"

    confirm = await client.get(f"/console/deliveries/{did}/cancel")
    assert confirm.status_code == 200 and status_of(sql, did) == "queued"  # a GET never acts
    done = await client.post(f"/console/deliveries/{did}/cancel",
                             form={"csrf": _csrf(await confirm.get_data(as_text=True))})
    assert done.status_code == 303 and done.headers["Location"] == f"/console/deliveries/{did}?done=cancel"
    assert status_of(sql, did) == "cancelled"

    # another client (another session) cannot replay that form token
    other = create_app(settings_for(database), db).test_client()
    assert (await other.post(f"/console/deliveries/{did}/retry",
                             form={"csrf": _csrf(await confirm.get_data(as_text=True))})).status_code == 403


async def test_every_console_response_carries_the_policy_and_errors_are_pages(
        database: str, db: Database, sql: psycopg.Connection[Any]) -> None:
    did = insert_delivery(sql, status="rendered")
    insert_payload(sql, did, rendered=True, html="<p style='color:red'>hi</p>")
    client = create_app(settings_for(database), db).test_client()

    for path, status in (("/console/no-such-page", 404), (f"/console/deliveries/{'x' * 200}", 400),
                         ("/console/deliveries/unknown-id", 404), ("/console/deliveries?limit=0", 400),
                         ("/console/deliveries?cursor=bogus", 400), ("/console/static/nope.css", 404)):
        response = await client.get(path)
        assert response.status_code == status, path
        assert response.content_type.startswith("text/html"), path
        _assert_policy(response)
        assert 'id="error-message"' in await response.get_data(as_text=True)
    wrong_method = await client.put("/console")
    assert wrong_method.status_code == 405 and "GET" in wrong_method.headers["Allow"]
    _assert_policy(wrong_method)

    frame = await client.get(f"/console/deliveries/{did}/frame")
    assert frame.status_code == 200 and await frame.get_data(as_text=True) == "<p style='color:red'>hi</p>"
    assert frame.headers["Content-Security-Policy"] == console.CONTENT_CSP
    assert "script-src" not in console.CONTENT_CSP and "sandbox" in console.CONTENT_CSP

    for name, kind in (("console.css", "text/css"), ("console.js", "text/javascript")):
        static = await client.get(f"/console/static/{name}")
        assert static.status_code == 200 and static.content_type.startswith(kind)

    # the JSON API keeps its own error format
    api = await client.get(f"{API}/deliveries/unknown-id")
    assert api.status_code == 404 and (await api.get_json())["error"]["code"] == "not_found"
    assert "Content-Security-Policy" not in api.headers


async def test_a_failing_database_is_an_error_page(database: str) -> None:
    async with bridge.open_loop():
        db = Database("postgresql://postgres@127.0.0.1:1/unreachable", 1)  # never opened
        client = create_app(settings_for(database), db).test_client()
        response = await client.get("/console")
        assert response.status_code == 500 and response.content_type.startswith("text/html")
        _assert_policy(response)


async def test_sign_in_redirects_only_inside_the_console(database: str, db: Database) -> None:
    client = create_app(settings_for(database, MAIL_INTERNAL_HTTP_TOKEN=TOKEN), db).test_client()
    for path in ("/console", "/console/deliveries", "/console/static/../../api/v1/internal/schedule"):
        refused = await client.get(path)
        assert refused.status_code in (303, 404), path
    prompt = await client.get("/console/login?next=/console/dead-letters")
    csrf = _csrf(await prompt.get_data(as_text=True))
    targets = (("https://elsewhere.example/", "/console"), ("//elsewhere.example", "/console"),
               ("/api/v1/internal/schedule", "/console"), ("/console/dead-letters", "/console/dead-letters"))
    for target, expected in targets:
        signed_out = create_app(settings_for(database, MAIL_INTERNAL_HTTP_TOKEN=TOKEN), db).test_client()
        prompt = await signed_out.get("/console/login")
        answer = await signed_out.post("/console/login", form={"csrf": _csrf(await prompt.get_data(as_text=True)),
                                                                "token": TOKEN, "next": target})
        assert answer.status_code == 303 and answer.headers["Location"] == expected, target
    # a sign-in form without its session's token is refused, even with the right operator token
    refused = await client.post("/console/login", form={"csrf": csrf + "x", "token": TOKEN})
    assert refused.status_code == 400
    assert (await client.get("/console")).status_code == 303


def test_sessions_are_signed_by_the_process() -> None:
    sessions = console.Sessions(3600)
    session = sessions.new(authenticated=True)
    raw = sessions.dump(session)
    assert sessions.load(raw) == (session, False)
    # a character inside the signature (the last one may carry only padding bits of base64)
    tampered = raw[:-5] + ("A" if raw[-5] != "A" else "B") + raw[-4:]
    assert sessions.load(tampered) == (None, False)
    assert console.Sessions(3600).load(raw) == (None, False)  # another process's key
    assert sessions.load(None) == (None, False) and sessions.load("garbage") == (None, False)
    sessions.revoke(session)  # signed out: the cookie is worth nothing, even before it expires
    assert sessions.load(raw) == (None, False)


def test_recipient_outcomes_are_a_table_when_the_delivery_has_them() -> None:
    delivery = {"recipient_outcomes": [
        {"email": "a@example.com", "status": "accepted", "reply": "250 ok"},
        {"email": "<script>x</script>@example.com", "status": "deferred", "reply": "451 later", "attempts": [1, 2]},
    ]}
    table = console.recipient_outcomes(delivery)
    assert table == {"columns": ["email", "status", "reply", "attempts"],
                     "rows": [["a@example.com", "accepted", "250 ok", ""],
                              ["<script>x</script>@example.com", "deferred", "451 later", "[1, 2]"]]}
    assert console.recipient_outcomes({}) is None and console.recipient_outcomes({"recipient_outcomes": []}) is None

    env = console._environment()
    d = {"delivery_id": "d-1", "status": "sent", "status_reason": None, "source": "notification",
         "payload_mode": "template", "template_id": "t", "locale": "en", "resolved_locale": "en",
         "recipients": {"to": [{"email": "a@example.com", "name": None}], "cc": [], "bcc": []},
         "message_id": "<m@x>", "created_at": "c", "updated_at": "u", "send_at": None, "next_attempt_at": None,
         "attempt_count": 1, "attempts": [], "dead_letter": None, **delivery}
    html = env.get_template("delivery.html").render(csrf="", signed_in=False, section="deliveries", d=d,
                                                    content=None, notice=None, actions=[],
                                                    action_labels=console.ACTIONS, outcomes=table)
    assert 'id="recipient-outcomes"' in html
    assert "&lt;script&gt;x&lt;/script&gt;@example.com" in html and "<script>x" not in html
