"""The command consumer: stream entries -> durable deliveries (CONTRACT §4)."""

from __future__ import annotations

import trio

from mailtrio import log
from mailtrio.catalog import Catalog
from mailtrio.config import Settings
from mailtrio.store import Database
from mailtrio.stream import Stream

_log = log.get("mailtrio.intake")


class Consumer:
    def __init__(self, settings: Settings, stream: Stream, db: Database, catalog: Catalog) -> None:
        self.settings = settings
        self.stream = stream
        self.db = db
        self.catalog = catalog

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        _log.info("command consumer started", stream=self.stream.name, group=self.stream.group)
        task_status.started()
        await trio.sleep_forever()
