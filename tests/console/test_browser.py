"""The operator console in a real headless Chromium against a running `mailtrio serve` with real
deliveries in every status (see conftest.py). Screenshots of every page are written as artifacts."""

from __future__ import annotations

import http.client
import re
import time
from typing import Any
from urllib.parse import parse_qs, urlparse

from mailtrio.store.api import DELIVERY_STATUSES
from tests.console.conftest import SCREENSHOTS, TOKEN, XSS_SUBJECT, Console, shot, sign_in


def _go(page: Any, selector: str) -> None:
    """Click what navigates, and wait for the new page."""
    with page.expect_navigation():
        page.click(selector)


def _rows(page: Any, table: str) -> list[str]:
    return [str(x) for x in page.locator(f"{table} tbody tr").evaluate_all(
        "rows => rows.map(r => r.dataset.deliveryId)")]


def test_token_prompt_wrong_token_and_the_json_routes_still_need_the_bearer(page: Any, console: Console) -> None:
    response = page.goto(console.base + "/console/deliveries?status=sent")
    assert response is not None
    assert urlparse(page.url).path == "/console/login"
    assert parse_qs(urlparse(page.url).query)["next"] == ["/console/deliveries?status=sent"]
    assert page.locator("#token").is_visible()
    shot(page, "login")

    page.fill("#token", "not-the-token")
    _go(page, "button[type=submit]")
    assert page.locator("#login-error").inner_text() == "Wrong token."
    shot(page, "login-wrong-token")
    # still no page behind it
    page.goto(console.base + "/console")
    assert urlparse(page.url).path == "/console/login"

    page.fill("#token", TOKEN)
    _go(page, "button[type=submit]")
    page.wait_for_url(re.compile(r".*/console$"))
    assert page.locator("h1").inner_text() == "Overview"
    page.goto(console.base + "/console/deliveries?status=sent")
    assert page.locator("#f-status").input_value() == "sent"

    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["mailtrio_console"]
    assert session["httpOnly"] is True and session["sameSite"] == "Strict" and session["path"] == "/console"
    assert TOKEN not in session["value"]
    # the page's script cannot read it
    assert "mailtrio_console" not in page.evaluate("document.cookie")

    # the console's cookie opens no JSON route: they still require the bearer header
    api = page.request.get(console.base + "/api/v1/internal/schedule")
    assert api.status == 401 and api.json()["error"]["code"] == "unauthorized"
    api = page.request.get(console.base + "/api/v1/internal/schedule", headers={"Authorization": f"Bearer {TOKEN}"})
    assert api.status == 200

    # nor does a path that starts like the console's and walks out of it
    host, port = console.proc.http_addr.rsplit(":", 1)
    for raw in ("/console/../api/v1/internal/schedule", "/console/%2e%2e/api/v1/internal/schedule"):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", raw, headers={"Cookie": f"mailtrio_console={session['value']}"})
            answer = conn.getresponse()
            body = answer.read()
        finally:
            conn.close()
        assert answer.status in (401, 404) and b"by_status" not in body, (raw, answer.status)

    # a tampered cookie is no session
    page.context.add_cookies([{**session, "value": session["value"][:-2] + "xx"}])
    page.goto(console.base + "/console/dead-letters")
    assert urlparse(page.url).path == "/console/login"
    assert page.locator("#expired").count() == 0


def test_overview_numbers_equal_the_schedule(page: Any, console: Console) -> None:
    sign_in(page, console)
    before = console.api("GET", "/schedule")[1]
    page.goto(console.base + "/console")
    after = console.api("GET", "/schedule")[1]
    assert before["by_status"] == after["by_status"], "the service moved during the test"
    shown = {status: int(page.locator(f'#by-status td[data-status="{status}"]').inner_text())
             for status in DELIVERY_STATUSES}
    assert shown == after["by_status"]
    assert int(page.locator("#depth").get_attribute("data-value")) == after["depth"]
    oldest = int(page.locator("#oldest-age").get_attribute("data-value"))
    assert before["oldest_age_ms"] <= oldest <= after["oldest_age_ms"]
    assert after["by_status"]["dead_letter"] >= 1 and after["depth"] >= 1
    assert all(n > 0 for s, n in after["by_status"].items()), after["by_status"]

    # last hour's dead letters and malformed commands equal the listings' (all are recent)
    dead = console.api("GET", "/dead-letters?limit=500")[1]["items"]
    malformed = console.api("GET", "/malformed-commands?limit=500")[1]["items"]
    assert int(page.locator("#dead-letters-hour").inner_text()) == len(dead)
    assert int(page.locator("#malformed-hour").inner_text()) == len(malformed) == 2
    # the chart has bars of this minute's outcomes, and the instance holding leases is listed
    assert page.locator("#outcome-chart rect").count() >= 2
    holders = page.locator("#lease-holders tr").all_inner_texts()
    assert any(row.startswith("other-instance\t1") for row in holders), holders
    shot(page, "overview")


def test_filter_and_page_deliveries(page: Any, console: Console) -> None:
    sign_in(page, console, "/console/deliveries")
    shot(page, "deliveries")
    # filtering by status through the form
    page.select_option("#f-status", "dead_letter")
    _go(page, "#filters button[type=submit]")
    shown = _rows(page, "#deliveries")
    expected = [d["delivery_id"] for d in console.api("GET", "/deliveries?status=dead_letter")[1]["items"]]
    assert shown == expected and len(shown) >= 2
    assert set(page.locator("#deliveries .badge").all_inner_texts()) == {"dead_letter"}

    page.select_option("#f-status", "")
    page.select_option("#f-source", "authsession")
    _go(page, "#filters button[type=submit]")
    expected = [d["delivery_id"] for d in console.api("GET", "/deliveries?source=authsession")[1]["items"]]
    assert _rows(page, "#deliveries") == expected and len(expected) == 3

    page.select_option("#f-source", "")
    page.fill("#f-recipient", "PAGE-5@example.com")
    _go(page, "#filters button[type=submit]")
    assert _rows(page, "#deliveries") == [console.seeded.sent[5]]

    # paging: 5 a page, newest first, following "Older" to the end, equals the API's walk
    page.goto(console.base + "/console/deliveries?limit=5")
    walked: list[str] = []
    pages = 0
    while True:
        walked += _rows(page, "#deliveries")
        pages += 1
        older = page.locator("#next-page")
        if older.count() == 0:
            break
        older.click()
        page.wait_for_load_state()
        assert page.locator("#f-limit").input_value() == "5"
    everything = [d["delivery_id"] for d in console.api("GET", "/deliveries?limit=500")[1]["items"]]
    assert walked == everything
    assert len(walked) == len(set(walked)) and pages == -(-len(everything) // 5)
    assert page.locator("#first-page").count() == 1

    # a bad parameter is a page saying so, not a JSON body
    page.goto(console.base + "/console/deliveries?status=nope")
    assert "status must be one of" in page.locator("#error-message").inner_text()


def test_script_in_a_subject_is_text_and_the_content_frame_runs_nothing_and_loads_nothing(
        page: Any, console: Console) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    console.sink.paths.clear()
    sign_in(page, console, f"/console/deliveries/{console.seeded.xss}")
    assert page.locator("#subject").inner_text() == XSS_SUBJECT
    assert page.locator("#subject b").count() == 0 and page.locator("#subject script").count() == 0
    assert "pwned" not in page.title()
    assert "<script>not a script</script>" in page.locator("#text-part").inner_text()

    frame_el = page.locator("#content-frame")
    assert frame_el.get_attribute("sandbox") == ""
    frame = page.frame_locator("#content-frame")
    assert frame.locator("#hello").inner_text() == "Hello from the HTML part"
    time.sleep(1.0)  # give a script or an image every chance to reach the sink
    assert frame.locator("#ran").count() == 0
    assert console.sink.paths == []
    shot(page, "delivery-content")

    frame_response = page.request.get(console.base + f"/console/deliveries/{console.seeded.xss}/frame")
    csp = frame_response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "sandbox" in csp and "script-src" not in csp
    page_csp = page.request.get(page.url).headers["content-security-policy"]
    assert "default-src 'none'" in page_csp and "'unsafe-inline'" not in page_csp

    # the control: this browser does reach the sink when a page of its own asks
    page.goto(console.sink.url("/control.gif"))
    assert "/control.gif" in console.sink.paths
    console.sink.paths.clear()
    assert dialogs == []

    # producer-supplied values on the malformed list are text too
    page.goto(console.base + "/console/malformed")
    assert page.locator("#malformed tbody tr").count() == 2
    page.locator("#malformed details summary").first.click()
    assert page.locator("#malformed script").count() == 0
    assert "EN_us" in page.locator("#malformed").inner_text()
    shot(page, "malformed")
    page.select_option("#f-code", "invalid_locale")
    _go(page, "form.filters button[type=submit]")
    assert page.locator("#malformed tbody tr").count() == 1


def test_retry_a_dead_letter_from_its_page_until_sent(page: Any, console: Console) -> None:
    did = console.seeded.flaky[0]
    sign_in(page, console, f"/console/deliveries/{did}")
    assert page.locator("#status").inner_text() == "dead_letter"
    assert page.locator("#attempts tr").count() == 3  # header + two deferred attempts
    assert "451" in page.locator("#attempts").inner_text()
    assert page.locator("#dead-letter").count() == 1
    assert page.locator("#action-cancel").count() == 0
    shot(page, "delivery-dead-letter")
    _go(page, "#action-retry")
    assert urlparse(page.url).path == f"/console/deliveries/{did}/retry"
    shot(page, "confirm-retry")
    _go(page, "#confirm")
    page.wait_for_url(re.compile(r".*done=retry$"))
    assert page.locator("#notice").count() == 1
    final = console.wait_status(did, ("sent",), timeout=30)
    assert final["dead_letter"] is None and final["attempts"][-1]["status"] == "provider_accepted"
    page.reload()
    assert page.locator("#status").inner_text() == "sent"
    assert page.locator("#dead-letter").count() == 0
    assert page.locator("#attempts tr").count() == 4
    shot(page, "delivery-sent-after-retry")


def test_cancel_needs_its_confirmation_and_the_form_token(page: Any, console: Console) -> None:
    did = console.seeded.queued[0]
    sign_in(page, console, f"/console/deliveries/{did}")
    _go(page, "#action-cancel")
    assert "cancelled" in page.locator("#confirm-text").inner_text()
    shot(page, "confirm-cancel")
    # without confirming: back, and nothing changed
    _go(page, "#back")
    assert urlparse(page.url).path == f"/console/deliveries/{did}"
    assert console.delivery(did)["status"] == "queued"

    # a POST without the session's form token (what a forged request sends) changes nothing
    forged = page.request.post(console.base + f"/console/deliveries/{did}/cancel", form={"csrf": "guess"})
    assert forged.status == 403
    forged = page.request.post(console.base + f"/console/deliveries/{did}/cancel")
    assert forged.status == 403
    assert console.delivery(did)["status"] == "queued"
    # a page of another site that posts to the console while the operator is signed in: the
    # SameSite=Strict cookie stays home (and the form token is missing anyway)
    action = f"{console.base}/console/deliveries/{did}/cancel"
    console.sink.pages["/attack.html"] = (f'<form id="f" method="post" action="{action}">'
                                          '<input name="csrf" value="guess"></form>'
                                          '<script>document.getElementById("f").submit()</script>')
    with page.expect_navigation(url=re.compile(r".*/cancel$")):
        page.goto(f"http://localhost:{console.sink.port}/attack.html")
    assert "Sign-in required" in page.locator("h1").inner_text()
    assert console.delivery(did)["status"] == "queued"
    page.goto(console.base + f"/console/deliveries/{did}")

    _go(page, "#action-cancel")
    _go(page, "#confirm")
    page.wait_for_url(re.compile(r".*done=cancel$"))
    assert page.locator("#status").inner_text() == "cancelled"
    assert console.delivery(did)["status"] == "cancelled"
    # cancelling it again is refused with the reason, no change
    page.goto(console.base + f"/console/deliveries/{console.seeded.queued[1]}/cancel")
    console.api("POST", f"/deliveries/{console.seeded.queued[1]}/cancel")
    _go(page, "#confirm")
    assert "is cancelled" in page.locator("#error-message").inner_text()


def test_bulk_retry_of_the_dead_letters_shown_and_bulk_cancel(page: Any, console: Console) -> None:
    mine = console.seeded.flaky[1:]
    sign_in(page, console, "/console/dead-letters")
    shown = _rows(page, "#dead-letters")
    assert set(mine) <= set(shown) and console.seeded.never in shown
    assert page.locator('#dead-letters input[name="delivery_id"]:checked').count() == len(shown)
    shot(page, "dead-letters")
    # the select-all box (the console's script) clears them; pick this test's two
    page.uncheck("#dead-letters input.select-all")
    assert page.locator('#dead-letters input[name="delivery_id"]:checked').count() == 0
    for did in mine:
        page.check(f'#dead-letters input[value="{did}"]')
    _go(page, "#retry-shown")
    assert sorted(page.locator("#confirm-ids li").all_inner_texts()) == sorted(mine)
    shot(page, "confirm-bulk-retry")
    _go(page, "#confirm")
    assert page.locator('#bulk-results tr[data-outcome="done"]').count() == len(mine)
    shot(page, "bulk-done")
    for did in mine:
        console.wait_status(did, ("sent",), timeout=30)

    page.goto(console.base + "/console/deliveries?recipient=bulk-cancel%40example.com")
    assert sorted(_rows(page, "#deliveries")) == sorted(console.seeded.bulk_cancel)
    page.check("#deliveries input.select-all")
    _go(page, '#bulk button[value="cancel"]')
    assert sorted(page.locator("#confirm-ids li").all_inner_texts()) == sorted(console.seeded.bulk_cancel)
    _go(page, "#back")
    assert all(console.delivery(d)["status"] == "queued" for d in console.seeded.bulk_cancel)
    page.check("#deliveries input.select-all")
    _go(page, '#bulk button[value="cancel"]')
    _go(page, "#confirm")
    assert page.locator('#bulk-results tr[data-outcome="done"]').count() == 3
    assert all(console.delivery(d)["status"] == "cancelled" for d in console.seeded.bulk_cancel)


def test_sign_out_and_an_expired_session(browser: Any, service_env: dict[str, str]) -> None:
    from tests.support.serve import ServeProcess

    env = dict(service_env, MAIL_INTERNAL_HTTP_TOKEN=TOKEN, MAIL_CONSOLE_SESSION_TTL="4s")
    with ServeProcess(env) as proc:
        proc.wait_ready(30)
        base = f"http://{proc.http_addr}"
        context = browser.new_context()
        try:
            page = context.new_page()
            page.goto(base + "/console")
            page.fill("#token", TOKEN)
            _go(page, "button[type=submit]")
            page.wait_for_url(re.compile(r".*/console$"))
            signed_in = [c for c in context.cookies() if c["name"] == "mailtrio_console"]
            _go(page, "header form.logout button")
            assert urlparse(page.url).path == "/console/login"
            context.add_cookies(signed_in)  # the cookie from before signing out opens nothing
            page.goto(base + "/console/malformed")
            assert urlparse(page.url).path == "/console/login"

            page.fill("#token", TOKEN)
            _go(page, "button[type=submit]")
            page.wait_for_url(re.compile(r".*/console/malformed$"))
            time.sleep(5.2)
            page.goto(base + "/console/malformed")
            assert urlparse(page.url).path == "/console/login"
            assert page.locator("#expired").is_visible()
            shot(page, "login-expired")
            # an action with the expired session is refused
            gone = page.request.post(base + "/console/deliveries/x/cancel", form={"csrf": "x"})
            assert gone.status == 401
        finally:
            context.close()
        assert proc.stop() == 0
        assert TOKEN not in "\n".join(proc.raw) + proc.stderr
    assert SCREENSHOTS.is_dir()
