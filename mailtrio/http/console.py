"""The operator console: server-rendered pages under /console on the internal listener.

Every page reads through the JSON API's own store functions (`mailtrio.store.api`) under the same
per-request bound (`routes._bounded`) and the same database handle (`routes._db`), and validates its
parameters with the API's validators (`mailtrio.http.params`): the console is another view of the
same reads and verbs, not a second copy of them.

Security:
- a session cookie (`mailtrio_console`, `Path=/console`, `HttpOnly`, `SameSite=Strict`) signed with
  a key drawn at process start, carrying an issue time (checked against
  `MAIL_CONSOLE_SESSION_TTL`), whether the holder gave `MAIL_INTERNAL_HTTP_TOKEN`, and a per-session
  CSRF token; without a token configured every session is signed in. The cookie opens console pages
  only: the JSON routes still require the bearer header (app.py sends /console paths here and every
  other path through the bearer check);
- every state-changing request is a POST carrying the session's CSRF token in a hidden field,
  reached through a confirmation page;
- Jinja2 autoescaping for every value; a strict Content-Security-Policy on every response (scripts
  and styles from /console/static only); a delivery's HTML is served on its own URL for a sandboxed
  frame, under a policy that allows no script and no remote load.
"""

from __future__ import annotations

import hmac
import importlib.resources
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jinja2
import trio
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from quart import Response, current_app, g, request
from quart_trio import QuartTrio
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException

from mailtrio import log
from mailtrio.enums import WAITING_STATUSES, DeliveryStatus
from mailtrio.http import params
from mailtrio.http.errors import ApiError
from mailtrio.http.routes import _bounded, _db
from mailtrio.store import api as store_api

PREFIX = "/console"
COOKIE = "mailtrio_console"
OUTCOME_MINUTES = 15
PAGE_SIZES = (25, 50, 100, 200)
MAX_BULK = 500
WRONG_TOKEN_DELAY = 0.5
REFRESH_CHOICES = ("10", "30", "60")  # seconds between reloads of the overview, when asked
ACTIONS = {
    "retry": ("Retry", "back on the schedule, due now, with a fresh retry ladder",
              (DeliveryStatus.FAILED.value, DeliveryStatus.DEAD_LETTER.value)),
    "cancel": ("Cancel", "marked cancelled; it will never be sent", WAITING_STATUSES),
}
NOTICES = {"retry": "Retried: the delivery is back on the schedule.", "cancel": "Cancelled."}

# Pages load scripts and styles from /console/static only, frames from /console only.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; frame-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# A delivery's HTML: its own inline styles and data: images, nothing else; no script, no remote
# load, no form, an opaque origin (the `sandbox` directive backs the frame's `sandbox` attribute).
CONTENT_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:; "
               "form-action 'none'; base-uri 'none'; frame-ancestors 'self'; sandbox")
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".svg": "image/svg+xml"}
_NEXT_RE = re.compile(r"/console(/[A-Za-z0-9._:/-]*)?(\?[^\s#]*)?")
_STATUS_COLORS: dict[str, str] = {DeliveryStatus.SENT: "#2e7d32", DeliveryStatus.SUPPRESSED: "#8d6e63",
                  DeliveryStatus.FAILED: "#c62828", DeliveryStatus.DEAD_LETTER: "#6a1b9a",
                  DeliveryStatus.CANCELLED: "#757575"}

_log = log.get("mailtrio.http.console")


def owns(path: str) -> bool:
    """Whether `path` belongs to the console (and so to its session, not the bearer header)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


# -- sessions ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Session:
    authenticated: bool
    csrf: str


class Sessions:
    """Signed, timed session cookies; the key lives and dies with the process."""

    MAX_REVOKED = 10_000

    def __init__(self, ttl: float, *, key: bytes | None = None) -> None:
        self.ttl = ttl
        self._serializer = URLSafeTimedSerializer(key or secrets.token_bytes(32), salt="mailtrio.console.session")
        # Sessions signed out before they expired (by their CSRF token, unique per session).
        self._revoked: dict[str, None] = {}

    def revoke(self, session: Session) -> None:
        self._revoked[session.csrf] = None
        while len(self._revoked) > self.MAX_REVOKED:
            del self._revoked[next(iter(self._revoked))]

    def new(self, *, authenticated: bool) -> Session:
        return Session(authenticated=authenticated, csrf=secrets.token_urlsafe(32))

    def dump(self, session: Session) -> str:
        return str(self._serializer.dumps({"a": session.authenticated, "c": session.csrf}))

    def load(self, raw: str | None) -> tuple[Session | None, bool]:
        """The session in `raw`, or None; and whether it was refused only because it expired."""
        if not raw:
            return None, False
        try:
            data = self._serializer.loads(raw, max_age=max(1, int(self.ttl)))
        except SignatureExpired:
            return None, True
        except BadSignature:
            return None, False
        if not isinstance(data, dict) or not isinstance(data.get("a"), bool) or not isinstance(data.get("c"), str):
            return None, False
        if data["c"] in self._revoked:
            return None, False
        return Session(authenticated=data["a"], csrf=data["c"]), False


@dataclass
class _State:
    token: bytes | None
    sessions: Sessions
    env: jinja2.Environment
    static: dict[str, tuple[bytes, str]]


def _state() -> _State:
    return current_app.extensions["mailtrio.console"]  # type: ignore[no-any-return]


def _session() -> Session:
    return g.console_session  # type: ignore[no-any-return]


def _issue(session: Session) -> Session:
    g.console_session = session
    g.console_cookie = _state().sessions.dump(session)
    return session


async def guard() -> Response | None:
    """Before every /console request: find or start the session; refuse what needs sign-in."""
    state = _state()
    session, expired = state.sessions.load(request.cookies.get(COOKIE))
    g.console_expired = expired
    g.console_cookie = None
    if session is None:
        session = state.sessions.new(authenticated=state.token is None)
        # A page or the sign-in form starts a session; a POST without one (a form posted from
        # another site, say) is refused below and leaves the browser's cookie alone.
        if request.method == "GET" or request.path == f"{PREFIX}/login":
            _issue(session)
    g.console_session = session
    if session.authenticated or request.path in (f"{PREFIX}/login",) or request.path.startswith(f"{PREFIX}/static/"):
        return None
    if request.method == "GET":
        target = request.full_path.rstrip("?") if request.query_string else request.path
        query = {"next": target, **({"expired": "1"} if expired else {})}
        return _redirect(f"{PREFIX}/login?{urlencode(query)}")
    return _page("error.html", status=401, title="Sign-in required",
                 message="Sign in with the operator token first; nothing was changed.")


def _finish(response: Response) -> Response:
    """After every /console response: the session cookie when it changed, and the headers."""
    cookie = g.get("console_cookie")
    if cookie:
        response.set_cookie(COOKIE, cookie, path=PREFIX, httponly=True, samesite="Strict")
    headers = response.headers
    headers.setdefault("Content-Security-Policy", PAGE_CSP)
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Cache-Control", "no-store")
    return response


async def _csrf_ok() -> MultiDict[str, str]:
    form = await request.form
    supplied = form.get("csrf", "")
    if not hmac.compare_digest(supplied.encode(), _session().csrf.encode()):
        raise _Refused(403, "Form expired", "The form was not issued by this console session (or the session "
                       "changed since). Nothing was changed; reload the page and try again.")
    return form


class _Refused(Exception):
    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


# -- rendering -----------------------------------------------------------------------------------
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mailtrio.http", "console_templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pretty"] = lambda value: json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)
    env.filters["age"] = format_age
    env.filters["emails"] = lambda recipients: ", ".join(
        str(r.get("email", r)) if isinstance(r, dict) else str(r) for r in recipients or [])
    env.globals["prefix"] = PREFIX
    env.globals["statuses"] = store_api.DELIVERY_STATUSES
    env.globals["sources"] = store_api.SOURCES
    env.globals["failure_codes"] = store_api.FAILURE_CODES
    env.globals["page_sizes"] = PAGE_SIZES
    return env


def _static_files() -> dict[str, tuple[bytes, str]]:
    root = importlib.resources.files("mailtrio.http") / "console_static"
    files: dict[str, tuple[bytes, str]] = {}
    for item in root.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in _STATIC_TYPES:
            files[item.name] = (item.read_bytes(), _STATIC_TYPES[suffix])
    return files


def render(name: str, **context: Any) -> str:
    session: Session | None = g.get("console_session")
    state = _state()
    return state.env.get_template(name).render(
        csrf=session.csrf if session else "",
        signed_in=bool(session and session.authenticated and state.token is not None),
        section=context.pop("section", ""),
        **context,
    )


def _page(name: str, *, status: int = 200, **context: Any) -> Response:
    return Response(render(name, **context), status=status, content_type="text/html; charset=utf-8")


def _redirect(location: str) -> Response:
    return Response("", status=303, headers={"Location": location})


def format_age(ms: int | float | None) -> str:
    if ms is None:
        return "-"
    seconds = int(ms // 1000)
    if seconds < 1:
        return f"{int(ms)} ms"
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return " ".join(parts[:2])


def outcome_chart(outcomes: list[dict[str, Any]], *, width: int = 640, height: int = 160) -> dict[str, Any]:
    """Stacked bars (one per minute) as numbers for the SVG of the overview."""
    top = max([sum(o["counts"].values()) for o in outcomes] + [1])
    left, bottom, plot_h = 36, 20, height - 30
    slot = (width - left) / max(len(outcomes), 1)
    bars = []
    for i, outcome in enumerate(outcomes):
        y = height - bottom
        for status in store_api.FINAL_STATUSES:
            n = outcome["counts"][status]
            if not n:
                continue
            h = max(1.0, n / top * plot_h)
            y -= h
            bars.append({"x": round(left + i * slot + 2, 1), "y": round(y, 1), "w": round(max(slot - 4, 1), 1),
                         "h": round(h, 1), "color": _STATUS_COLORS[status], "status": status, "n": n,
                         "minute": outcome["minute"]})
    labels = [{"x": round(left + i * slot + slot / 2, 1), "text": o["minute"][11:16]}
              for i, o in enumerate(outcomes) if i % 3 == (len(outcomes) - 1) % 3]
    return {"width": width, "height": height, "bars": bars, "labels": labels, "top": top, "left": left,
            "base": height - bottom, "legend": [(s, _STATUS_COLORS[s]) for s in store_api.FINAL_STATUSES]}


def recipient_outcomes(delivery: dict[str, Any]) -> dict[str, Any] | None:
    """The delivery's `recipient_outcomes` (when the JSON has them) as a table: the union of the
    entries' keys as columns, in first-seen order; nested values as JSON text."""
    entries = delivery.get("recipient_outcomes")
    if not isinstance(entries, list) or not entries:
        return None
    entries = [e if isinstance(e, dict) else {"value": e} for e in entries]
    columns = list(dict.fromkeys(k for e in entries for k in e))

    def cell(value: Any) -> str:
        if value is None:
            return ""
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return {"columns": columns, "rows": [[cell(e.get(k)) for k in columns] for e in entries]}


def _query(args: MultiDict[str, str], **changes: str | None) -> str:
    merged = {k: v for k, v in args.items() if v}
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return "?" + urlencode(merged) if merged else ""


def _args() -> MultiDict[str, str]:
    """The query without empty values: a filter form submits its blank fields as `name=`."""
    return MultiDict([(k, v) for k, v in request.args.items(multi=True) if v != ""])


def _limit(args: MultiDict[str, str]) -> int:
    return params.limit(args) if args.get("limit") else PAGE_SIZES[1]


def _checked_ids(values: Iterable[str]) -> list[str]:
    ids = list(dict.fromkeys(values))
    if not ids:
        raise _Refused(400, "Nothing selected", "Select at least one delivery.")
    if len(ids) > MAX_BULK:
        raise _Refused(400, "Too many", f"At most {MAX_BULK} deliveries at once.")
    return [params.delivery_id(i) for i in ids]


# -- registration ----------------------------------------------------------------------------------
def register(app: QuartTrio, settings_token: str | None, session_ttl: float) -> None:
    app.extensions["mailtrio.console"] = _State(
        token=settings_token.encode() if settings_token else None,
        sessions=Sessions(session_ttl),
        env=_environment(),
        static=_static_files(),
    )

    @app.after_request
    async def _console_headers(response: Response) -> Response:
        return _finish(response) if owns(request.path) else response

    @app.get(f"{PREFIX}/static/<name>")
    async def console_static(name: str) -> Response:
        found = _state().static.get(name)
        if found is None:
            return http_error(404, f"no file {name}")
        body, content_type = found
        return Response(body, content_type=content_type, headers={"Cache-Control": "max-age=300"})

    @app.get(f"{PREFIX}/login")
    async def console_login_form() -> Response:
        if _state().token is None or _session().authenticated:
            return _redirect(PREFIX)
        return _login_page(expired=request.args.get("expired") == "1" or bool(g.get("console_expired")))

    @app.post(f"{PREFIX}/login")
    async def console_login() -> Response:
        state = _state()
        form = await request.form
        supplied_csrf = form.get("csrf", "")
        if not hmac.compare_digest(supplied_csrf.encode(), _session().csrf.encode()):
            _issue(state.sessions.new(authenticated=False))
            return _login_page(status=400, expired=bool(g.get("console_expired")), target=form.get("next", ""),
                               error="The sign-in form expired; enter the token again.")
        supplied = form.get("token", "").encode()
        if state.token is None or hmac.compare_digest(supplied, state.token):
            _issue(state.sessions.new(authenticated=True))
            _log.info("console sign-in")
            target = form.get("next", "")
            return _redirect(target if _NEXT_RE.fullmatch(target) else PREFIX)
        _log.warning("console sign-in refused", reason="wrong token")
        await trio.sleep(WRONG_TOKEN_DELAY)  # guessing costs time
        return _login_page(status=401, error="Wrong token.", target=form.get("next", ""))

    @app.post(f"{PREFIX}/logout")
    async def console_logout() -> Response:
        await _csrf_ok()
        _state().sessions.revoke(_session())
        _issue(_state().sessions.new(authenticated=_state().token is None))
        return _redirect(f"{PREFIX}/login" if _state().token is not None else PREFIX)

    @app.get(PREFIX)
    async def console_overview() -> Response:
        schedule = await _bounded(lambda: store_api.schedule_summary(_db()))
        activity = await _bounded(lambda: store_api.activity(_db(), minutes=OUTCOME_MINUTES))
        refresh = request.args.get("refresh", "")
        return _page("overview.html", section="overview", schedule=schedule, activity=activity,
                     chart=outcome_chart(activity["outcomes"]), minutes=OUTCOME_MINUTES,
                     refresh=int(refresh) if refresh in REFRESH_CHOICES else None)

    @app.get(f"{PREFIX}/deliveries")
    async def console_deliveries() -> Response:
        args = _args()
        flt = store_api.DeliveryFilter(
            status=params.one_of(args, "status", store_api.DELIVERY_STATUSES),
            source=params.one_of(args, "source", store_api.SOURCES),
            recipient=params.recipient(args),
        )
        limit = _limit(args)
        after = params.decode_delivery_key(args, "d")
        items, last = await _bounded(lambda: store_api.list_deliveries(_db(), flt, after=after, limit=limit))
        cursor = params.encode_delivery_key("d", last)
        return _page("deliveries.html", section="deliveries", items=items, flt=flt, limit=limit,
                     here=request.full_path.rstrip("?"),
                     next_url=f"{PREFIX}/deliveries{_query(args, cursor=cursor)}" if cursor else None,
                     first_url=f"{PREFIX}/deliveries{_query(args, cursor=None)}" if after else None)

    @app.get(f"{PREFIX}/deliveries/<delivery_id>")
    async def console_delivery(delivery_id: str) -> Response:
        did = params.delivery_id(delivery_id)
        delivery = await _bounded(lambda: store_api.get_delivery(_db(), did))
        if delivery is None:
            return http_error(404, f"delivery {did!r} not found")
        content = await _bounded(lambda: store_api.get_content(_db(), did))
        notice = NOTICES.get(request.args.get("done", ""))
        actions = [name for name, (_, _, allowed) in ACTIONS.items() if delivery["status"] in allowed]
        return _page("delivery.html", section="deliveries", d=delivery, content=content, notice=notice,
                     actions=actions, action_labels=ACTIONS, outcomes=recipient_outcomes(delivery))

    @app.get(f"{PREFIX}/deliveries/<delivery_id>/frame")
    async def console_delivery_frame(delivery_id: str) -> Response:
        did = params.delivery_id(delivery_id)
        content = await _bounded(lambda: store_api.get_content(_db(), did))
        html = content.body["html"] if content is not None and content.rendered else None
        if html is None:
            return http_error(404, f"delivery {did!r} has no HTML content")
        return Response(html, content_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CONTENT_CSP, "X-Frame-Options": "SAMEORIGIN"})

    @app.route(f"{PREFIX}/deliveries/<delivery_id>/<action>", methods=["GET", "POST"])
    async def console_action(delivery_id: str, action: str) -> Response:
        if action not in ACTIONS:
            return http_error(404, f"no action {action}")
        did = params.delivery_id(delivery_id)
        if request.method == "GET":
            delivery = await _bounded(lambda: store_api.get_delivery(_db(), did))
            if delivery is None:
                return http_error(404, f"delivery {did!r} not found")
            return _page("confirm.html", section="deliveries", action=action, label=ACTIONS[action],
                         ids=[did], deliveries={did: delivery}, single=True)
        await _csrf_ok()
        result = await _act(action, did)
        if result.outcome == "done":
            return _redirect(f"{PREFIX}/deliveries/{did}?done={action}")
        if result.outcome == "not_found":
            return http_error(404, f"delivery {did!r} not found")
        allowed = " or ".join(ACTIONS[action][2])
        return _page("error.html", status=409, title="Not possible now",
                     message=f"Delivery {did} is {result.status}; only {allowed} deliveries can be "
                             f"{'retried' if action == 'retry' else 'cancelled'}. Nothing was changed.",
                     back=f"{PREFIX}/deliveries/{did}")

    @app.post(f"{PREFIX}/bulk")
    async def console_bulk() -> Response:
        form = await _csrf_ok()
        action = form.get("action", "")
        if action not in ACTIONS:
            raise _Refused(400, "Unknown action", "Choose retry or cancel.")
        ids = _checked_ids(form.getlist("delivery_id"))
        if form.get("step") != "confirm":
            return _page("confirm.html", section=form.get("section", "deliveries"), action=action,
                         label=ACTIONS[action], ids=ids, deliveries={}, single=False,
                         back=back if _NEXT_RE.fullmatch(back := form.get("back", "")) else "")
        results = []
        for did in ids:
            result = await _act(action, did)
            results.append({"delivery_id": did, "outcome": result.outcome, "status": result.status
                            or (result.delivery or {}).get("status")})
        done = sum(1 for r in results if r["outcome"] == "done")
        return _page("bulk_done.html", section=form.get("section", "deliveries"), action=action,
                     label=ACTIONS[action], results=results, done=done)

    @app.get(f"{PREFIX}/dead-letters")
    async def console_dead_letters() -> Response:
        args = _args()
        limit = _limit(args)
        after = params.decode_delivery_key(args, "dl")
        items, last = await _bounded(lambda: store_api.list_dead_letters(_db(), after=after, limit=limit))
        cursor = params.encode_delivery_key("dl", last)
        return _page("dead_letters.html", section="dead-letters", items=items, limit=limit,
                     next_url=f"{PREFIX}/dead-letters{_query(args, cursor=cursor)}" if cursor else None,
                     first_url=f"{PREFIX}/dead-letters{_query(args, cursor=None)}" if after else None,
                     here=request.full_path.rstrip("?"))

    @app.get(f"{PREFIX}/malformed")
    async def console_malformed() -> Response:
        args = _args()
        code = params.one_of(args, "failure_code", store_api.FAILURE_CODES)
        limit = _limit(args)
        after = params.decode_id_key(args, "m")
        items, last = await _bounded(
            lambda: store_api.list_malformed(_db(), failure_code=code, after=after, limit=limit))
        cursor = params.encode_id_key("m", last)
        return _page("malformed.html", section="malformed", items=items, code=code, limit=limit,
                     next_url=f"{PREFIX}/malformed{_query(args, cursor=cursor)}" if cursor else None,
                     first_url=f"{PREFIX}/malformed{_query(args, cursor=None)}" if after else None)

    # Errors raised by console routes are pages, not the API's JSON.
    @app.errorhandler(_Refused)
    async def _refused(exc: _Refused) -> Response:
        return _page("error.html", status=exc.status, title=exc.title, message=exc.message)


async def _act(action: str, did: str) -> store_api.VerbResult:
    verb = store_api.retry_delivery if action == "retry" else store_api.cancel_delivery
    result = await _bounded(lambda: verb(_db(), did))
    _log.info("console action", action=action, delivery_id=did, outcome=result.outcome,
              status=result.status or (result.delivery or {}).get("status"))
    return result


def _login_page(*, status: int = 200, expired: bool = False, error: str | None = None,
                target: str | None = None) -> Response:
    target = request.args.get("next", "") if target is None else target
    return _page("login.html", status=status, expired=expired, error=error,
                 next=target if _NEXT_RE.fullmatch(target) else PREFIX)


def http_error(status: int, message: str) -> Response:
    titles = {400: "Bad request", 401: "Sign-in required", 403: "Forbidden", 404: "Not found",
              405: "Method not allowed", 409: "Conflict", 500: "Internal error"}
    return _page("error.html", status=status, title=titles.get(status, "Error"), message=message)


def error_response(exc: BaseException) -> Response:
    """A console page for an error app.py caught on a /console path."""
    if isinstance(exc, ApiError):
        return http_error(exc.status, exc.message)
    if isinstance(exc, _Refused):
        return _page("error.html", status=exc.status, title=exc.title, message=exc.message)
    if isinstance(exc, HTTPException):
        code = exc.code or 500
        if code == 404:
            return http_error(404, f"no page {request.path}")
        if code == 405:
            resp = http_error(405, f"{request.method} is not allowed on {request.path}")
            allow = getattr(exc, "valid_methods", None)
            if allow:
                resp.headers["Allow"] = ", ".join(sorted(allow))
            return resp
        return http_error(code, exc.description or exc.name)
    return http_error(500, "internal error (see the service log)")

