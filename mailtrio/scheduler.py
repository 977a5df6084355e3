"""The scheduler: claims due deliveries and hands them to the attempt workers (CONTRACT §5)."""

from __future__ import annotations

from typing import Any

import trio

from mailtrio import log
from mailtrio.config import Settings
from mailtrio.store import Database

_log = log.get("mailtrio.scheduler")


class Scheduler:
    def __init__(
        self, settings: Settings, db: Database, send_channel: trio.MemorySendChannel[Any], pool: Any
    ) -> None:
        self.settings = settings
        self.db = db
        self.send_channel = send_channel
        self.pool = pool

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.send_channel:
            _log.info("scheduler started")
            task_status.started()
            await trio.sleep_forever()
