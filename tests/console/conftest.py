"""Fixtures of the console tests: one real `mailtrio serve` (smtp mode, against the SMTP test server,
with an operator token) per module, real deliveries in every status, a loopback listener that records
every request it receives, and one headless Chromium per module (Debian's build, driven by
Playwright; no browser is ever downloaded).

Screenshots of the pages go to `$MAILTRIO_CONSOLE_SCREENSHOTS`, or `build/console-screenshots/`
(ignored by git).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.api.conftest import API, insert_attempt, insert_delivery, insert_payload
from tests.conftest import REDIS_ADDR
from tests.engine.helpers import entry, xadd
from tests.support import pg
from tests.support.serve import ROOT, TEMPLATES, ServeProcess, base_env, free_port
from tests.support.smtpserver import SmtpTestServer

TOKEN = "console-operator-token"
CHROMIUM = os.environ.get("MAILTRIO_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(os.environ.get("MAILTRIO_CONSOLE_SCREENSHOTS") or ROOT / "build" / "console-screenshots")
SETTLED = ("sent", "suppressed", "failed", "dead_letter", "cancelled")
XSS_SUBJECT = '<script>document.title="pwned"</script> Spring <b>news</b> & more'
RULES = [
    {"match": "^flaky", "action": "defer", "times": 2},  # dead-lettered, then accepted on a retry
    {"match": "^never", "action": "defer"},
    {"match": "^reject", "action": "reject"},
    {"match": "^suppress", "action": "suppress"},
]


class RequestSink:
    """A loopback HTTP listener that records the path of every request it receives; it answers
    with the HTML set in `pages` for that path, else with an empty image."""

    def __init__(self) -> None:
        paths: list[str] = []
        pages: dict[str, str] = {}
        self.paths = paths
        self.pages = pages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                paths.append(self.path)
                body = pages.get(self.path, "").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8" if body else "image/gif")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Seeded:
    """The ids of the module's deliveries, by what the tests do with them."""

    xss: str
    sent: list[str]
    failed: str
    suppressed: str
    never: str
    flaky: list[str]
    queued: list[str]
    bulk_cancel: list[str]
    rendered: str
    sending: str
    cancelled: str


@dataclass
class Console:
    proc: ServeProcess
    dsn: str
    sink: RequestSink
    seeded: Seeded

    @property
    def base(self) -> str:
        return f"http://{self.proc.http_addr}"

    def api(self, method: str, path: str) -> tuple[int, Any]:
        return self.proc.http(method, f"{API}{path}", headers={"Authorization": f"Bearer {TOKEN}"})

    def delivery(self, delivery_id: str) -> dict[str, Any]:
        status, body = self.api("GET", f"/deliveries/{delivery_id}")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def wait_status(self, delivery_id: str, statuses: tuple[str, ...], timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, found = self.api("GET", f"/deliveries/{delivery_id}")
            if status == 200 and found["status"] in statuses:
                return found  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                malformed = self.api("GET", "/malformed-commands")[1]
                raise AssertionError(f"{delivery_id}: {found}, not {statuses}; malformed: {malformed}")
            time.sleep(0.1)


def _command(did: str, *, to: str, source: str = "notification", send_at: datetime | None = None,
             subject: str | None = None, html: str | None = None) -> dict[str, str]:
    if subject is None:
        return entry(did, source=source, template_id="newsletter", to=[to],
                     variables={"title": "Spring news", "intro": "Hello Ada"}, send_at=send_at)
    payload = {"to": [to], "subject": subject, "text": "Plain text part.\n<script>not a script</script>",
               "html": html}
    return {"delivery_id": did, "source": source, "idempotency_key": f"key-{did}", "payload_mode": "rendered",
            "locale": "en", "payload": json.dumps(payload)}


def _seed(proc: ServeProcess, dsn: str, stream: str, sink: RequestSink) -> Seeded:
    run = uuid.uuid4().hex[:6]
    later = datetime.now(UTC) + timedelta(hours=2)
    html = ("<html><head><style>p { color: #1f5fbf; }</style></head><body>"
            f"<p id=\"hello\">Hello from the HTML part</p><img id=\"remote\" src=\"{sink.url('/remote.gif')}\">"
            "<script>document.body.insertAdjacentHTML('beforeend', '<b id=ran>script ran</b>');"
            f"new Image().src = '{sink.url('/script.gif')}';</script></body></html>")
    seeded = Seeded(
        xss=f"xss-{run}",
        sent=[f"sent-{run}-{i:02d}" for i in range(12)],
        failed=f"failed-{run}",
        suppressed=f"suppressed-{run}",
        never=f"never-{run}",
        flaky=[f"flaky-{run}-{i}" for i in range(3)],
        queued=[f"queued-{run}-{i}" for i in range(3)],
        bulk_cancel=[f"bulkcancel-{run}-{i}" for i in range(3)],
        rendered=f"rendered-{run}",
        sending=f"sending-{run}",
        cancelled=f"cancelled-{run}",
    )
    commands = [_command(seeded.xss, to="ada@example.com", subject=XSS_SUBJECT, html=html)]
    commands += [_command(d, to=f"page-{i}@example.com", source="authsession" if i % 4 == 0 else "notification")
                 for i, d in enumerate(seeded.sent)]
    commands += [_command(seeded.failed, to="reject@example.com"),
                 _command(seeded.suppressed, to="suppress@example.com"),
                 _command(seeded.never, to="never@example.com")]
    commands += [_command(d, to=f"flaky{i}@example.com") for i, d in enumerate(seeded.flaky)]
    commands += [_command(d, to=f"later{i}@example.com", send_at=later) for i, d in enumerate(seeded.queued)]
    commands += [_command(d, to="bulk-cancel@example.com", send_at=later) for d in seeded.bulk_cancel]
    commands += [_command(seeded.cancelled, to="cancel-me@example.com", send_at=later)]
    malformed = [
        {"delivery_id": f"bad-{run}-1", "source": "notification", "idempotency_key": "k1", "payload_mode": "template",
         "locale": "EN_us", "payload": '{"template_id": "newsletter", "to": ["a@example.com"]}'},
        {"delivery_id": f"bad-{run}-2", "source": "notification", "payload_mode": "template", "locale": "en",
         "payload": '{"to": ["<script>alert(1)</script>@example.com"]}'},
    ]
    host, port = REDIS_ADDR.rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port))
    try:
        xadd(client, stream, commands + malformed)
    finally:
        client.close()

    console = Console(proc, dsn, sink, seeded)
    for did in [seeded.xss, *seeded.sent]:
        console.wait_status(did, ("sent", "suppressed"))
    console.wait_status(seeded.failed, ("failed",))
    console.wait_status(seeded.suppressed, ("suppressed",))
    for did in [seeded.never, *seeded.flaky]:
        console.wait_status(did, ("dead_letter",))
    for did in [*seeded.queued, *seeded.bulk_cancel, seeded.cancelled]:
        console.wait_status(did, ("queued",))
    assert console.api("POST", f"/deliveries/{seeded.cancelled}/cancel")[0] == 200

    # `rendered` (due tomorrow) and `sending` (an in-flight lease of another instance) cannot be
    # caught on their way: they are written as the engine leaves them.
    with psycopg.connect(dsn, autocommit=True) as conn:
        insert_delivery(conn, delivery_id=seeded.rendered, status="rendered", to=["waiting@example.com"])
        insert_payload(conn, seeded.rendered, rendered=True, subject="Waiting", text="Due tomorrow")
        insert_delivery(conn, delivery_id=seeded.sending, status="sending", to=["inflight@example.com"])
        conn.execute("UPDATE mail.deliveries SET lease_owner = 'other-instance', lease_expires_at = now() + "
                     "interval '2 hours' WHERE delivery_id = %s", (seeded.sending,))
        insert_attempt(conn, seeded.rendered, 1, "transport_failed", "connection refused")
    deadline = time.monotonic() + 30
    while True:
        status, body = console.api("GET", "/malformed-commands")
        if status == 200 and len(body["items"]) >= len(malformed):
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    return seeded


@pytest.fixture(scope="module")
def console(pg_template: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    name, dsn = pg.clone(pg_template)
    stream = f"mt:test:{uuid.uuid4().hex}"
    sink = RequestSink()
    smtp = SmtpTestServer(tmp_path_factory.mktemp("console-smtp"), rules=RULES, tls="none").start()
    env = base_env(
        MAIL_REDIS_MASTER_ADDR=REDIS_ADDR,
        MAIL_REDIS_COMMAND_STREAM=stream,
        MAIL_POSTGRES_PRIMARY_DSN=dsn,
        MAIL_POSTGRES_POOL_SIZE="4",
        MAIL_TEMPLATE_DIR=str(TEMPLATES),
        MAIL_SMTP_MODE="smtp",
        MAIL_SMTP_ADDR=smtp.addr,
        MAIL_SMTP_FROM="Mail Service <no-reply@mailtrio.test>",
        MAIL_SMTP_TLS="none",
        MAIL_SMTP_TIMEOUT="5s",
        MAIL_RETRY_LADDER="100ms",
        MAIL_ATTEMPT_WORKER_CONCURRENCY="4",
        MAIL_INTERNAL_HTTP_ADDR=f"127.0.0.1:{free_port()}",
        MAIL_INTERNAL_HTTP_TOKEN=TOKEN,
        MAIL_SHUTDOWN_TIMEOUT="10s",
        MAIL_INSTANCE_ID=f"console-{uuid.uuid4().hex[:6]}",
    )
    try:
        with ServeProcess(env) as proc:
            proc.wait_ready(30)
            seeded = _seed(proc, dsn, stream, sink)
            yield Console(proc, dsn, sink, seeded)
            proc.stop()
    finally:
        smtp.stop()
        sink.close()
        host, port = REDIS_ADDR.rsplit(":", 1)
        client = redis.Redis(host=host, port=int(port))
        client.delete(stream)
        client.close()
        pg.drop(name)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    # trio-asyncio installs its own event loop policy in this process; Playwright's synchronous
    # API runs a plain asyncio loop of its own (with its driver as a subprocess).
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        yield from _launch(sync_playwright)
    finally:
        asyncio.set_event_loop_policy(previous)


def _launch(sync_playwright: Any) -> Iterator[Any]:
    with sync_playwright() as playwright:
        # launch() starts from a fresh temporary profile (user-data-dir) and removes it at close
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page in a context of its own: no cookie from another test."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(20_000)
    page = context.new_page()
    yield page
    context.close()


def shot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    if page.locator("#content-frame").count():
        # the content frame (a process of its own) paints once it has been on screen: show it
        page.frame_locator("#content-frame").locator("body").wait_for()
        page.locator("#content-frame").scroll_into_view_if_needed()
        page.wait_for_timeout(200)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page: Any, console: Console, path: str = "/console") -> None:
    page.goto(console.base + path)
    page.fill("#token", TOKEN)
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert "/console/login" not in page.url, page.url
