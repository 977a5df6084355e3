"""The service: startup in runbook order, one root nursery, bounded coordinated shutdown.

Startup (CONTRACT §3): ping Redis, open the PostgreSQL pool and check schema `mail`, apply the
embedded migrations under an advisory lock, take the instance identity lock (one
MAIL_INSTANCE_ID, one live process: see mailtrio.identity), parse the whole template catalog, and
only then open the internal HTTP listener and start the command consumer, scheduler, attempt
worker pool and retention worker. The identity lock is kept (and watched) until the very end; if
another live process takes this identity meanwhile, the service stops and exits 1.

Shutdown: the HTTP listener stops first; then the consumer, scheduler and retention worker are
cancelled (the scheduler closing its send channel lets the workers drain); in-flight attempts get
until the shutdown deadline, after which their cancel scope is cancelled and the workers put the
deliveries back on the schedule; finally Redis and PostgreSQL are closed.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any

import trio

import mailtrio
from mailtrio import bridge, log, telemetry
from mailtrio.catalog import Catalog, CatalogError
from mailtrio.config import Settings
from mailtrio.events import Publisher
from mailtrio.identity import InstanceIdentity
from mailtrio.intake import Consumer
from mailtrio.retention import Retention
from mailtrio.scheduler import Scheduler
from mailtrio.store import Database, StartupError
from mailtrio.stream import Stream
from mailtrio.workers import WorkerPool

_log = log.get("mailtrio.app")

# A failed startup exits within 15 s (CONTRACT §1), whatever step hangs: the budget counts from
# the moment the package was first imported (interpreter imports included) and leaves room for
# closing connections and exiting.
STARTUP_BUDGET = 12.0


def _elapsed_since_start() -> float:
    return max(0.0, time.monotonic() - mailtrio.STARTED_AT)


def load_catalog(settings: Settings) -> Catalog:
    try:
        return Catalog.load(settings.template_dir, settings.default_locale)
    except CatalogError as exc:
        raise StartupError("template catalog is invalid: " + "; ".join(exc.problems)) from exc


async def run(
    settings: Settings,
    shutdown_requested: trio.Event,
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with bridge.open_loop():
        stream = Stream(settings)
        db = Database(settings.postgres_dsn, settings.postgres_pool_size,
                      application_name=f"mailtrio:{settings.instance_id}")
        identity = InstanceIdentity(db, settings.instance_id)
        # The startup steps stop at the budget's deadline, or at once on SIGTERM/SIGINT.
        startup = trio.CancelScope(deadline=trio.current_time() + max(1.0, STARTUP_BUDGET - _elapsed_since_start()))
        step = "redis"
        try:
            async with trio.open_nursery() as guard:

                async def abort_on_shutdown_request() -> None:
                    await shutdown_requested.wait()
                    startup.cancel()

                guard.start_soon(abort_on_shutdown_request)
                with startup:
                    await stream.ping()
                    _log.info("redis master reachable", addr=f"{settings.redis_host}:{settings.redis_port}")
                    step = "postgres"
                    await db.open()
                    _log.info("postgres pool opened", pool_size=settings.postgres_pool_size)
                    step = "migrations"
                    applied = await db.migrate()
                    _log.info("migrations applied", applied=applied)
                    step = "instance identity"
                    await identity.acquire()
                    step = "templates"
                    catalog = load_catalog(settings)
                    _log.info("template catalog parsed", templates=sorted(catalog.template_ids))
                guard.cancel_scope.cancel()
        except BaseException:
            await identity.release()
            await _close(stream, db, 1.0)
            raise
        if startup.cancelled_caught:
            await identity.release()
            await _close(stream, db, 1.0)
            if shutdown_requested.is_set():
                _log.info("startup interrupted by a shutdown request", step=step)
                return
            raise StartupError(f"startup step {step!r} did not finish within {STARTUP_BUDGET:.0f}s")
        try:
            async with trio.open_nursery() as keeper:
                # Kept and watched to the end; IdentityConflict from it stops everything (exit 1).
                await keeper.start(identity.run)
                await _serve(settings, stream, db, catalog, identity, shutdown_requested, task_status)
                keeper.cancel_scope.cancel()
        finally:
            await identity.release()
            await _close(stream, db, 5.0)


async def _serve(
    settings: Settings,
    stream: Stream,
    db: Database,
    catalog: Catalog,
    identity: InstanceIdentity,
    shutdown_requested: trio.Event,
    task_status: trio.TaskStatus[Any],
) -> None:
    from mailtrio.http.app import create_app
    from mailtrio.http.server import serve as http_serve
    from mailtrio.providers.build import build_provider

    provider = build_provider(settings)
    send, receive = trio.open_memory_channel[Any](0)
    pool = WorkerPool(settings, db, catalog, provider, receive, identity=identity)
    scheduler = Scheduler(settings, db, send, pool, identity=identity)
    consumer = Consumer(settings, stream, db, catalog)
    retention = Retention(settings, db)
    publisher = Publisher(settings, db)
    http_app = create_app(settings, db)
    http_stop = trio.Event()
    shutdown_deadline = math.inf

    async with trio.open_nursery() as root:
        # The attempt worker pool lives longest: it drains after its feeders stop.
        pool_scope = trio.CancelScope()

        async def run_pool(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with pool_scope:
                    await pool.run(task_status=task_status)
            finally:
                # The workers' last outcomes are in the outbox: the event publisher gets a short
                # share of what is left of the shutdown bound to publish them, then stops.
                publisher.stop(within=min(2.0, shutdown_deadline - trio.current_time() - 1.0))

        # The event publisher outlives the workers, so their last outcomes are published too.
        await root.start(publisher.run)
        await root.start(run_pool)
        async with trio.open_nursery() as feeders:
            await feeders.start(scheduler.run)
            await feeders.start(consumer.run)
            await feeders.start(retention.run)
            await feeders.start(telemetry.ScheduleMonitor(db).run)
            async with trio.open_nursery() as http_nursery:
                binds = await http_nursery.start(http_serve, http_app, settings, http_stop.wait)
                _log.info("internal http listener started", binds=binds)
                task_status.started(binds)
                await shutdown_requested.wait()
                shutdown_deadline = trio.current_time() + settings.shutdown_timeout
                _log.info("shutdown started", timeout_s=settings.shutdown_timeout)
                http_stop.set()
                http_nursery.cancel_scope.deadline = trio.current_time() + min(5.0, settings.shutdown_timeout / 3)
            _log.info("internal http listener stopped")
            feeders.cancel_scope.cancel()
        _log.info("command consumer, scheduler and retention worker stopped")
        # In-flight attempts may finish until shortly before the bound; the rest is kept for
        # putting cancelled attempts back on the schedule and closing connections.
        reserve = min(3.0, settings.shutdown_timeout * 0.2)
        pool_scope.deadline = shutdown_deadline - reserve
    if pool_scope.cancelled_caught:
        _log.warning("attempt worker pool stopped at the shutdown deadline; running attempts were cancelled")
    else:
        _log.info("attempt worker pool stopped")


async def _close(stream: Stream, db: Database, within: float) -> None:
    with trio.CancelScope(shield=True):
        await stream.close(within=within)
        await db.close(within=within)


async def main(settings: Settings, *, install_signals: bool = True) -> None:
    """Run the service until SIGTERM/SIGINT; return after a graceful stop."""
    shutdown_requested = trio.Event()
    async with trio.open_nursery() as nursery:
        if install_signals:

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        _log.info("signal received", signal=signal.Signals(signum).name)
                        shutdown_requested.set()

            nursery.start_soon(watch_signals)
        await run(settings, shutdown_requested)
        nursery.cancel_scope.cancel()
