"""SQL retention worker: deletes old terminal rows in bounded batches (CONTRACT §2).

Every `MAIL_RETENTION_INTERVAL` (and once right after startup, so frequent restarts never starve
it) it deletes, oldest first and at most `BATCH_SIZE` rows per transaction:
- terminal deliveries (`sent`, `suppressed`, `failed`, `dead_letter`, `cancelled`) whose
  `updated_at` is older than `MAIL_RETENTION_PERIOD`, with their payloads, attempts and dead-letter
  rows (ON DELETE CASCADE);
- malformed commands received longer ago than the retention period;
- idempotency reservations past their expiry;
- event outbox rows published longer ago than `MAIL_EVENT_OUTBOX_RETENTION` (never unpublished ones).
Each batch takes a transaction-level advisory lock without waiting; when another instance holds
it, this run is skipped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import get_args

import trio

from mailtrio import log
from mailtrio.config import Settings
from mailtrio.store import Database
from mailtrio.store import retention as store
from mailtrio.telemetry import tracer

_log = log.get("mailtrio.retention")

BATCH_SIZE = 1000
# Bound on one batch's transaction (a network wait).
BATCH_TIMEOUT = 60.0


@dataclass
class RetentionCounts:
    deliveries: int = 0
    malformed_commands: int = 0
    idempotency_reservations: int = 0
    delivery_events: int = 0
    # transactions that deleted rows (each at most `batch_size` rows)
    batches: int = 0
    # another instance held the retention lock
    skipped: bool = False


class Retention:
    def __init__(self, settings: Settings, db: Database, *, batch_size: int = BATCH_SIZE) -> None:
        if not 1 <= batch_size <= BATCH_SIZE:
            raise ValueError(f"batch_size must be within 1..{BATCH_SIZE}")
        self.settings = settings
        self.db = db
        self.batch_size = batch_size

    def _period(self, kind: store.Kind) -> float:
        if kind == "delivery_events":
            return self.settings.event_outbox_retention
        return self.settings.retention_period

    async def run_once(self) -> RetentionCounts:
        """One retention pass; returns what it deleted (logged as `sql retention run`)."""
        counts = RetentionCounts()
        started = time.perf_counter()
        with tracer.start_as_current_span("sql retention run"):
            for kind in get_args(store.Kind):
                while True:
                    with trio.fail_after(BATCH_TIMEOUT):
                        deleted = await store.delete_batch(
                            self.db, kind, period_s=self._period(kind), batch=self.batch_size
                        )
                    if deleted is None:
                        counts.skipped = True
                        break
                    if deleted:
                        counts.batches += 1
                        setattr(counts, kind, getattr(counts, kind) + deleted)
                    if deleted < self.batch_size:
                        break
                if counts.skipped:
                    break
            _log.info("sql retention run", **asdict(counts),
                      duration_ms=round((time.perf_counter() - started) * 1000, 3))
        return counts

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        _log.info(
            "sql retention worker started",
            interval_s=self.settings.retention_interval,
            period_s=self.settings.retention_period,
        )
        task_status.started()
        try:
            while True:
                try:
                    await self.run_once()
                except Exception as exc:
                    # Retention is maintenance: a failed pass is logged and retried next interval,
                    # it never stops delivery.
                    _log.error("sql retention run failed", error=f"{type(exc).__name__}: {exc}")
                await trio.sleep(self.settings.retention_interval)
        finally:
            _log.info("sql retention worker stopped")
