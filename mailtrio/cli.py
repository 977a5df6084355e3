"""Command line: the only place that reads os.environ, installs signals and calls trio.run.

Exit codes (CONTRACT §1): 0 graceful stop, 2 configuration error (one line naming the
variable, before any network I/O), 1 any other startup or runtime failure (one clear line).
"""

from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from mailtrio import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _fail(code: int, message: str) -> int:
    print(f"mailtrio: {message}", file=sys.stderr, flush=True)
    return code


def cmd_serve(_: argparse.Namespace) -> int:
    import trio

    from mailtrio import app, log, shutdown, telemetry
    from mailtrio.config import ConfigError, Settings
    from mailtrio.store import StartupError

    try:
        settings = Settings.from_env(os.environ)
        telemetry.check_env(os.environ)
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, f"configuration error: {exc}")
    except ValueError as exc:
        return _fail(EXIT_CONFIG, f"configuration error: {exc}")
    log.configure(settings.log_format, settings.log_level)
    logger = log.get("mailtrio")
    tel = telemetry.setup(settings.instance_id, os.environ)
    # The last resort: armed by the first SIGTERM/SIGINT, it ends the process with exit 1 at the
    # shutdown bound plus WATCHDOG_GRACE whatever the event loop is doing.
    watchdog = shutdown.Watchdog(settings.shutdown_timeout)
    code = EXIT_OK
    try:
        logger.info("starting", version=__version__, instance_id=settings.instance_id,
                    smtp_mode=settings.smtp_mode)
        try:
            trio.run(partial(app.main, settings, watchdog=watchdog))
        except BaseExceptionGroup as group:
            raise _leaf(group) from group
    except StartupError as exc:
        logger.error("startup failed", error=str(exc))
        code = _fail(EXIT_FAILURE, f"startup failed: {exc}")
    except KeyboardInterrupt:
        code = EXIT_OK
    except BaseException as exc:
        logger.error("runtime failure", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        code = _fail(EXIT_FAILURE, f"runtime failure: {type(exc).__name__}: {exc}")
    _flush_telemetry(tel, logger, shutdown.current)
    if code == EXIT_OK:
        logger.info("shutdown complete", hurried=shutdown.current.hurried)
    # Exit now: the interpreter's own finalisation would wait for threads still blocked on a
    # collector (when the flush did not finish) and restores the default signal handlers, so a
    # signal arriving then would kill the process without a word.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# An unreachable or stalled collector must not hold the exit (the OTLP exporters retry for up
# to their own 10 s timeout each): the flush gets at most this long, and never more than until
# the shutdown deadline plus shutdown.FLUSH_GRACE.
TELEMETRY_FLUSH_BOUND = 3.0


def _flush_telemetry(tel: Any, logger: Any, stop: Any) -> bool:
    """Flush and stop the OpenTelemetry providers in a helper thread, bounded in time; True when
    the flush finished."""
    # This is the providers' shutdown: the SDK's own at-exit shutdown would wait again, unbounded.
    for provider in (tel.tracer_provider, tel.meter_provider):
        atexit.unregister(provider.shutdown)
    done = threading.Event()
    budget = stop.flush_budget(TELEMETRY_FLUSH_BOUND)

    def flush() -> None:
        try:
            tel.shutdown(timeout=budget)
        except Exception as exc:
            logger.warning("telemetry flush failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            done.set()

    threading.Thread(target=flush, name="otel-flush", daemon=True).start()
    # Waited in small steps: a signal during the flush (stop.hurried) cuts it short.
    until = time.monotonic() + budget
    while not done.wait(max(0.0, min(0.05, until - time.monotonic()))):
        if time.monotonic() >= until or stop.hurried:
            logger.warning("telemetry flush did not finish in time; unexported data dropped",
                           timeout_s=round(budget, 3))
            return False
    return True


def cmd_migrate(_: argparse.Namespace) -> int:
    import trio

    from mailtrio import bridge
    from mailtrio.config import ConfigError, postgres_dsn
    from mailtrio.store import Database, StartupError

    try:
        dsn = postgres_dsn(os.environ)
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, f"configuration error: {exc}")

    async def _migrate() -> list[int]:
        async with bridge.open_loop():
            db = Database(dsn, 2)
            try:
                await db.open()
                return await db.migrate()
            finally:
                await db.close()

    try:
        try:
            applied = trio.run(_migrate)
        except BaseExceptionGroup as group:
            raise _leaf(group) from group
    except StartupError as exc:
        return _fail(EXIT_FAILURE, f"migrate failed: {exc}")
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(map(str, applied)) if applied else ''}")
    return EXIT_OK


def cmd_templates_check(args: argparse.Namespace) -> int:
    from mailtrio.catalog import Catalog, CatalogError

    directory = args.dir or os.environ.get("MAIL_TEMPLATE_DIR", "").strip()
    if not directory:
        return _fail(EXIT_CONFIG, "configuration error: MAIL_TEMPLATE_DIR: is required (or pass DIR)")
    default_locale = os.environ.get("MAIL_DEFAULT_LOCALE", "").strip() or "en"
    try:
        catalog = Catalog.load(Path(directory), default_locale)
    except CatalogError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{len(exc.problems)} problem(s) in {directory}", file=sys.stderr)
        return EXIT_FAILURE
    for template_id in sorted(catalog.template_ids):
        print(f"ok {template_id}: {', '.join(sorted(catalog.locales(template_id)))}")
    return EXIT_OK


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailtrio", description="mailtrio mail delivery service")
    parser.add_argument("--version", action="version", version=f"mailtrio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the service until SIGTERM/SIGINT").set_defaults(fn=cmd_serve)
    sub.add_parser("migrate", help="apply the embedded migrations and exit").set_defaults(fn=cmd_migrate)
    templates = sub.add_parser("templates", help="template catalog tools")
    tsub = templates.add_subparsers(dest="templates_command", required=True)
    check = tsub.add_parser("check", help="parse the whole catalog, print problems with file:line")
    check.add_argument("dir", nargs="?", help="catalog root (default: MAIL_TEMPLATE_DIR)")
    check.set_defaults(fn=cmd_templates_check)
    try:
        from mailtrio.producer import add_enqueue_parser
    except ImportError:  # pragma: no cover - the producer helper ships with intake
        pass
    else:
        add_enqueue_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
