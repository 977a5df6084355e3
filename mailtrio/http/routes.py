"""Routes of CONTRACT §7 under /api/v1/internal.

Handlers validate their parameters (`mailtrio.http.params`), run one store call under a deadline
and shape the answer; every error is an `ApiError` rendered in the contract's format by app.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio
from quart import Response, current_app, jsonify, request
from quart_trio import QuartTrio

from mailtrio import enums
from mailtrio.http import openapi, params
from mailtrio.http.app import db_of
from mailtrio.http.errors import ApiError
from mailtrio.store import Database
from mailtrio.store import api as store_api
from mailtrio.store import events as store_events

T = TypeVar("T")

# Bound on the database work of one request (pool checkout included).
DB_TIMEOUT = 10.0


def _db() -> Database:
    return db_of(current_app)


async def _bounded(call: Callable[[], Awaitable[T]]) -> T:
    try:
        with trio.fail_after(DB_TIMEOUT):
            return await call()
    except trio.TooSlowError:
        raise ApiError("internal", f"the database did not answer within {DB_TIMEOUT:.0f}s") from None


def _json(body: Any, status: int = 200) -> Response:
    resp = jsonify(body)
    resp.status_code = status
    return resp


def _not_found(delivery_id: str) -> ApiError:
    return ApiError("not_found", f"delivery {delivery_id!r} not found")


def _verb_answer(result: store_api.VerbResult, did: str, refusal: str, status: int) -> Response:
    if result.outcome == "not_found":
        raise _not_found(did)
    if result.outcome == "conflict":
        raise ApiError("conflict", f"{refusal} (delivery {did!r} is {result.status})")
    return _json(result.delivery, status)


def register(app: QuartTrio, prefix: str) -> None:
    @app.get(f"{prefix}/deliveries/<delivery_id>")
    async def get_delivery(delivery_id: str) -> Response:
        did = params.delivery_id(delivery_id)
        delivery = await _bounded(lambda: store_api.get_delivery(_db(), did))
        if delivery is None:
            raise _not_found(did)
        return _json(delivery)

    @app.get(f"{prefix}/deliveries")
    async def list_deliveries() -> Response:
        args = request.args
        flt = store_api.DeliveryFilter(
            status=params.one_of(args, "status", enums.DELIVERY_STATUSES),
            source=params.one_of(args, "source", enums.SOURCES),
            recipient=params.recipient(args),
        )
        limit = params.limit(args)
        after = params.decode_delivery_key(args, "d")
        items, last = await _bounded(lambda: store_api.list_deliveries(_db(), flt, after=after, limit=limit))
        return _json({"items": items, "next_cursor": params.encode_delivery_key("d", last)})

    @app.get(f"{prefix}/deliveries/<delivery_id>/content")
    async def get_content(delivery_id: str) -> Response:
        did = params.delivery_id(delivery_id)
        content = await _bounded(lambda: store_api.get_content(_db(), did))
        if content is None:
            raise _not_found(did)
        if not content.rendered:
            raise ApiError("conflict", f"delivery {did!r} has no rendered content (status {content.status})")
        return _json(content.body)

    @app.post(f"{prefix}/deliveries/<delivery_id>/retry")
    async def retry(delivery_id: str) -> Response:
        did = params.delivery_id(delivery_id)
        result = await _bounded(lambda: store_api.retry_delivery(_db(), did))
        return _verb_answer(result, did, "only failed or dead_letter deliveries can be retried", 202)

    @app.post(f"{prefix}/deliveries/<delivery_id>/cancel")
    async def cancel(delivery_id: str) -> Response:
        did = params.delivery_id(delivery_id)
        result = await _bounded(lambda: store_api.cancel_delivery(_db(), did))
        return _verb_answer(result, did, "only queued or rendered deliveries can be cancelled", 200)

    @app.get(f"{prefix}/dead-letters")
    async def list_dead_letters() -> Response:
        limit = params.limit(request.args)
        after = params.decode_delivery_key(request.args, "dl")
        items, last = await _bounded(lambda: store_api.list_dead_letters(_db(), after=after, limit=limit))
        return _json({"items": items, "next_cursor": params.encode_delivery_key("dl", last)})

    @app.get(f"{prefix}/malformed-commands")
    async def list_malformed() -> Response:
        args = request.args
        code = params.one_of(args, "failure_code", enums.FAILURE_CODES)
        limit = params.limit(args)
        after = params.decode_id_key(args, "m")
        items, last = await _bounded(
            lambda: store_api.list_malformed(_db(), failure_code=code, after=after, limit=limit)
        )
        return _json({"items": items, "next_cursor": params.encode_id_key("m", last)})

    @app.get(f"{prefix}/schedule")
    async def schedule() -> Response:
        return _json(await _bounded(lambda: store_api.schedule_summary(_db())))

    @app.get(f"{prefix}/events/outbox")
    async def events_outbox() -> Response:
        summary = await _bounded(lambda: store_events.outbox_summary(_db()))
        return _json({"depth": summary.depth, "oldest_age_ms": summary.oldest_age_ms,
                      "publisher": summary.publisher})

    document = openapi.document(prefix, bearer=bool(app.extensions["mailtrio.settings"].http_token))

    @app.get(f"{prefix}/openapi.json")
    async def openapi_json() -> Response:
        return _json(document)
