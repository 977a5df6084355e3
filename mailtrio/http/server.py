"""Serve the Quart-Trio app with Hypercorn under the service's nursery."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from mailtrio import shutdown
from mailtrio.config import Settings


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    host = settings.http_host
    config.bind = [f"[{host}]:{settings.http_port}" if ":" in host else f"{host}:{settings.http_port}"]
    # In-flight requests drain beside the attempts until the shutdown deadline minus the reserve
    # (the service's cancel scope enforces the same bound).
    config.graceful_timeout = max(0.1, settings.shutdown_timeout - shutdown.drain_reserve(settings.shutdown_timeout))
    config.accesslog = None
    # hypercorn's own errors go through the standard library's logging: JSON lines on stdout
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.include_server_header = False
    return config


async def serve(
    app: QuartTrio,
    settings: Settings,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen until `shutdown_trigger` returns; `task_status.started(binds)` once bound."""
    await hypercorn_serve(app, hypercorn_config(settings), shutdown_trigger=shutdown_trigger,
                          task_status=task_status)
