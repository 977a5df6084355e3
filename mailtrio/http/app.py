"""Quart-Trio application factory: auth, request spans and logs, JSON errors, routes.

`db` is the API's own bounded share of PostgreSQL (a small separate pool, see
`mailtrio.app.api_pool_size`), never the engine's pool: every route reaches the database through
`db_of(app)`, so operator requests queue for their own connections and cannot starve intake,
claims or outcome writes. Anything mounted on this app (further route groups) must do the same.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from quart import Response, g, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from mailtrio import log
from mailtrio.config import Settings
from mailtrio.http.errors import ApiError, error_body
from mailtrio.store import Database
from mailtrio.telemetry import tracer

PREFIX = "/api/v1/internal"
_log = log.get("mailtrio.http")

_HTTP_CODES = {400: "invalid_argument", 401: "unauthorized", 404: "not_found", 405: "not_found",
               409: "conflict"}


def create_app(settings: Settings, db: Database) -> QuartTrio:
    app = QuartTrio("mailtrio")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.extensions["mailtrio.db"] = db
    app.extensions["mailtrio.settings"] = settings
    token = settings.http_token.encode() if settings.http_token else None
    from mailtrio.http import console

    @app.before_request
    async def _start() -> Response | None:
        g.started = time.perf_counter()
        route = request.url_rule.rule if request.url_rule is not None else None
        attributes = {"http.request.method": request.method, "url.path": request.path}
        if route is not None:
            attributes["http.route"] = route
        # Unmatched paths are named by method only: span names stay low-cardinality.
        span = tracer.start_span(
            f"{request.method} {route}" if route else request.method,
            kind=SpanKind.SERVER,
            attributes=attributes,
        )
        g.span = span
        g.span_token = trace.use_span(span, end_on_exit=False)
        g.span_token.__enter__()
        if console.owns(request.path):
            return await console.guard()  # the console's own session; never opens the JSON routes
        if token is not None:
            # RFC 9110 §11.1: the scheme is case-insensitive; RFC 6750 §3: a 401 names it.
            scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
            supplied = credentials.strip().encode() if scheme.lower() == "bearer" else b""
            if not hmac.compare_digest(supplied, token):
                resp = _json_error(ApiError("unauthorized", "missing or invalid bearer token"))
                resp.headers["WWW-Authenticate"] = (
                    'Bearer realm="mailtrio", error="invalid_token"' if supplied else 'Bearer realm="mailtrio"')
                return resp
        return None

    @app.after_request
    async def _finish(response: Response) -> Response:
        span = g.get("span")
        if span is not None:
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
            duration_ms = round((time.perf_counter() - g.started) * 1000, 3)
            _log.info(
                "internal http request",
                method=request.method,
                path=request.path,
                status=response.status_code,
                duration_ms=duration_ms,
            )
            _end_span()
        return response

    @app.teardown_request
    async def _teardown(exc: BaseException | None) -> None:
        # after_request does not run when the request is abandoned (client gone, cancelled):
        # the span still ends, marked as an error.
        span = g.get("span")
        if span is not None:
            span.set_status(Status(StatusCode.ERROR, "request did not complete"))
            _end_span()

    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        if console.owns(request.path):
            return console.error_response(exc)
        return _json_error(exc)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        if console.owns(request.path):
            return console.error_response(exc)
        code = _HTTP_CODES.get(exc.code or 500, "internal" if (exc.code or 500) >= 500 else "invalid_argument")
        if exc.code == 404:
            message = f"no route {request.method} {request.path}"
        elif exc.code == 405:
            message = f"{request.method} is not allowed on {request.path}"
        else:
            message = exc.description or exc.name
        resp = jsonify(error_body(code, message))
        resp.status_code = exc.code or 500
        allow = getattr(exc, "valid_methods", None)  # 405: the methods the route has
        if allow:
            resp.headers["Allow"] = ", ".join(sorted(allow))
        return resp

    @app.errorhandler(Exception)
    async def _internal(exc: Exception) -> Response:
        _log.error("internal http error", exc_info=exc, path=request.path)
        span = g.get("span")
        if span is not None:
            span.record_exception(exc)
        if console.owns(request.path):
            return console.error_response(exc)
        return _json_error(ApiError("internal", "internal error"))

    from mailtrio.http.routes import register

    register(app, PREFIX)
    console.register(app, settings.http_token, settings.console_session_ttl)
    return app


def _end_span() -> None:
    span = g.span
    g.span = None
    g.span_token.__exit__(None, None, None)
    span.end()


def _json_error(exc: ApiError) -> Response:
    resp = jsonify(exc.body())
    resp.status_code = exc.status
    return resp


def db_of(app: Any) -> Database:
    return app.extensions["mailtrio.db"]  # type: ignore[no-any-return]
