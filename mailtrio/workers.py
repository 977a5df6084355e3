"""The attempt worker pool over a bounded memory channel (CONTRACT §5)."""

from __future__ import annotations

from typing import Any

import trio

from mailtrio import log
from mailtrio.catalog import Catalog
from mailtrio.config import Settings
from mailtrio.store import Database

_log = log.get("mailtrio.workers")


class WorkerPool:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        catalog: Catalog,
        provider: Any,
        receive_channel: trio.MemoryReceiveChannel[Any],
    ) -> None:
        self.settings = settings
        self.db = db
        self.catalog = catalog
        self.provider = provider
        self.receive_channel = receive_channel

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the channel is closed and every in-flight attempt has finished."""
        async with self.receive_channel:
            _log.info("attempt worker pool started", workers=self.settings.worker_concurrency)
            task_status.started()
            async for _item in self.receive_channel:
                pass
