"""The service: startup in runbook order, one root nursery, bounded coordinated shutdown.

Startup (CONTRACT §3): ping Redis, open the PostgreSQL pools and check schema `mail`, apply the
embedded migrations under an advisory lock, take the instance identity lock (one
MAIL_INSTANCE_ID, one live process: see mailtrio.identity; kept and watched until the very end,
and if another live process takes this identity meanwhile the service stops and exits 1), parse
the whole template catalog, then bind the internal HTTP listener (a bind failure is a startup
failure: nothing has been claimed), and only then start the attempt worker pool, the scheduler,
the command consumer and the retention worker.

Shutdown (`mailtrio.shutdown`): the first SIGTERM/SIGINT fixes one deadline. In the same moment
the listener stops accepting and the consumer, scheduler and retention worker are cancelled (the
scheduler closing its send channel lets the workers drain); in-flight HTTP requests and attempts
then drain side by side until the deadline minus a reserve, after which their scopes are
cancelled and the workers put the deliveries back on the schedule; Redis and PostgreSQL are closed
by the deadline. A second signal cancels everything at once.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import trio

import mailtrio
from mailtrio import bridge, log, sdnotify, shutdown, telemetry
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


def api_pool_size(pool_size: int) -> int:
    """Connections of the HTTP API's own pool: a bounded share beside the engine's pool, so that
    slow operator requests can never take the connections claims, intake and outcomes need."""
    return max(2, min(8, pool_size // 4))


async def run(
    settings: Settings,
    stop: shutdown.Shutdown,
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with bridge.open_loop():
        stream = Stream(settings)
        # The engine's pool plans by index whatever the statistics (store.INDEX_PLAN_SETTINGS);
        # the HTTP API's pool keeps the planner's own choices for operator queries.
        db = Database(settings.postgres_dsn, settings.postgres_pool_size,
                      application_name=f"mailtrio:{settings.instance_id}", index_plans=True)
        api_db = Database(settings.postgres_dsn, api_pool_size(settings.postgres_pool_size),
                          application_name=f"mailtrio:{settings.instance_id}:api", min_size=0, name="mailtrio-api")
        identity = InstanceIdentity(db, settings.instance_id)
        # The startup steps stop at the budget's deadline, or at once on SIGTERM/SIGINT.
        startup = trio.CancelScope(deadline=trio.current_time() + max(1.0, STARTUP_BUDGET - _elapsed_since_start()))
        step = "redis"
        try:
            async with trio.open_nursery() as guard:

                async def abort_on_shutdown_request() -> None:
                    await stop.requested.wait()
                    startup.cancel()

                guard.start_soon(abort_on_shutdown_request)
                with startup:
                    await stream.ping()
                    _log.info("redis master reachable", addr=f"{settings.redis_host}:{settings.redis_port}")
                    step = "postgres"
                    await db.open()
                    await api_db.open(check=False)
                    _log.info("postgres pool opened", pool_size=settings.postgres_pool_size,
                              api_pool_size=api_db.pool.max_size)
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
            await _close(stop, stream, db, api_db, within=1.0)
            raise
        if startup.cancelled_caught:
            await identity.release()
            await _close(stop, stream, db, api_db, within=1.0)
            if stop.requested.is_set():
                _log.info("startup interrupted by a shutdown request", step=step)
                return
            raise StartupError(f"startup step {step!r} did not finish within {STARTUP_BUDGET:.0f}s")
        try:
            async with trio.open_nursery() as keeper:
                # Kept and watched to the end; IdentityConflict from it stops everything (exit 1).
                await keeper.start(identity.run)
                await _serve(settings, stream, db, api_db, catalog, identity, stop, task_status)
                keeper.cancel_scope.cancel()
        finally:
            # Released last (after the outcome writes), by the shutdown deadline like the rest.
            await identity.release()
            await _close(stop, stream, db, api_db, within=5.0)


# The young generation of the cyclic garbage collector is collected after this many allocations
# (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def _tune_gc() -> None:
    """Cyclic garbage collection for a long-running service. Everything built at startup (modules,
    the parsed catalog, the HTTP app) lives as long as the process: frozen (`gc.freeze`), it is no
    longer traversed by every full collection. The service allocates tens of thousands of
    short-lived, acyclic objects per intake batch, which reference counting frees: a young
    generation collected every GC_YOUNG_THRESHOLD allocations instead of 700 traverses the live
    ones (the batch in flight) a dozen times less often; cyclic garbage is still collected."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def _serve(
    settings: Settings,
    stream: Stream,
    db: Database,
    api_db: Database,
    catalog: Catalog,
    identity: InstanceIdentity,
    stop: shutdown.Shutdown,
    task_status: trio.TaskStatus[Any],
) -> None:
    from mailtrio.http.app import create_app
    from mailtrio.http.server import serve as http_serve
    from mailtrio.providers.build import build_provider

    provider = build_provider(settings)
    _tune_gc()
    send, receive = trio.open_memory_channel[Any](0)
    pool = WorkerPool(settings, db, catalog, provider, receive, identity=identity)
    scheduler = Scheduler(settings, db, send, pool, identity=identity)
    consumer = Consumer(settings, stream, db, catalog)
    retention = Retention(settings, db)
    publisher = Publisher(settings, db)
    http_app = create_app(settings, api_db)
    reserve = shutdown.drain_reserve(settings.shutdown_timeout)

    async with trio.open_nursery() as root:
        # The listener is bound before anything that claims starts: a port already in use is a
        # startup failure with nothing claimed.
        http_scope = trio.CancelScope()

        async def run_http(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
            with http_scope:
                await http_serve(http_app, settings, stop.requested.wait, task_status=task_status)
            _log.info("internal http listener stopped")

        try:
            binds = await root.start(run_http)
        except (OSError, BaseExceptionGroup) as exc:
            bind_error = _os_error(exc)
            if bind_error is None:
                raise
            raise StartupError(f"internal http listener: cannot listen on {settings.http_host}:"
                               f"{settings.http_port}: {bind_error.strerror or bind_error}") from exc
        _log.info("internal http listener started", binds=binds)

        # The attempt worker pool lives longest: it drains after its feeders stop.
        pool_scope = trio.CancelScope()

        async def run_pool(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with pool_scope:
                    await pool.run(task_status=task_status)
            finally:
                # The workers' last outcomes are in the outbox: the event publisher gets a short
                # share of what is left of the shutdown budget to publish them (never the time
                # kept for closing connections), then stops.
                publisher.stop(within=min(2.0, stop.cap(math.inf, shutdown.close_reserve(settings.shutdown_timeout))
                                          - trio.current_time()))
            if pool_scope.cancelled_caught:
                _log.warning("attempt worker pool stopped at the shutdown deadline; running attempts were "
                             "cancelled")
            else:
                _log.info("attempt worker pool stopped")

        # The event publisher outlives the workers, so their last outcomes are published too.
        await root.start(publisher.run)
        stop.on_hurry(publisher.cancel)
        await root.start(run_pool)
        async with trio.open_nursery() as feeders:

            async def begin_shutdown() -> None:
                # One moment: the listener stops accepting (its shutdown trigger is the same
                # event) and the consumer and scheduler stop claiming, even if they are still
                # starting; HTTP requests in flight and attempts then drain side by side until
                # the deadline minus the reserve.
                await stop.requested.wait()
                _log.info("shutdown started", timeout_s=settings.shutdown_timeout)
                sdnotify.notify(settings.notify_socket, "STOPPING=1", "STATUS=shutting down: draining attempts")
                feeders.cancel_scope.cancel()
                http_scope.deadline = stop.cap(http_scope.deadline, reserve)
                pool_scope.deadline = stop.cap(pool_scope.deadline, reserve)
                stop.on_hurry(http_scope.cancel)
                stop.on_hurry(pool_scope.cancel)

            feeders.start_soon(begin_shutdown)
            await feeders.start(scheduler.run)
            await feeders.start(consumer.run)
            await feeders.start(retention.run)
            await feeders.start(telemetry.ScheduleMonitor(db).run)
            _log.info("service ready", binds=binds)
            task_status.started(binds)
            sdnotify.notify(settings.notify_socket, "READY=1", f"STATUS=ready: API on {' '.join(map(str, binds))}, "
                            f"{settings.worker_concurrency} workers, {settings.smtp_mode} mode")
        _log.info("command consumer, scheduler and retention worker stopped")


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError inside (nested) exception groups, if that is what `exc` is."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError) else None


async def _close(stop: shutdown.Shutdown, stream: Stream, *dbs: Database, within: float) -> None:
    """Close Redis and the PostgreSQL pools side by side, by the shutdown deadline at the latest;
    whatever has not answered by then is abandoned."""
    with stop.shielded(within, reserve=0.0) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.close)
            for db in dbs:
                nursery.start_soon(db.close)
    if scope.cancelled_caught:
        _log.warning("closing Redis and PostgreSQL connections did not finish in time; abandoned")


async def main(settings: Settings, *, install_signals: bool = True,
               watchdog: shutdown.Watchdog | None = None) -> None:
    """Run the service until SIGTERM/SIGINT; return after a graceful stop."""
    stop = shutdown.install(settings.shutdown_timeout)
    with trio.CancelScope() as everything:
        stop.on_hurry(everything.cancel)
        if install_signals:
            with shutdown.signal_handlers(stop, watchdog):
                await run(settings, stop)
        else:
            await run(settings, stop)
