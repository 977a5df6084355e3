"""Routes of CONTRACT §7."""

from __future__ import annotations

from typing import Any

from quart import current_app, jsonify
from quart_trio import QuartTrio

from mailtrio.http.app import db_of
from mailtrio.http.errors import ApiError
from mailtrio.store import api as store_api


def register(app: QuartTrio, prefix: str) -> None:
    @app.get(f"{prefix}/deliveries/<delivery_id>")
    async def get_delivery(delivery_id: str) -> Any:
        delivery = await store_api.get_delivery(db_of(current_app), delivery_id)
        if delivery is None:
            raise ApiError("not_found", f"delivery {delivery_id!r} not found")
        return jsonify(delivery)
