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


def cmd_migrate(args: argparse.Namespace) -> int:
    import trio

    from mailtrio import bridge
    from mailtrio.config import ConfigError, postgres_dsn
    from mailtrio.store import Database, StartupError

    try:
        dsn = postgres_dsn(os.environ)
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, f"configuration error: {exc}")
    if getattr(args, "action", "up") == "status":
        from mailtrio.ops import migrate_status

        return migrate_status.main(dsn, as_json=args.json)

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


def cmd_check(args: argparse.Namespace) -> int:
    from mailtrio.ops import check

    return check.main(os.environ, args.json)


def cmd_ops(args: argparse.Namespace) -> int:
    from mailtrio.ops import commands

    return commands.run(args, os.environ)


def _wrap(names: Sequence[str], indent: str = "  ") -> str:
    lines, line = [], indent
    for name in names:
        if len(line) + len(name) + 2 > 96 and line.strip():
            lines.append(line.rstrip())
            line = indent
        line += name + ", "
    lines.append(line.rstrip().rstrip(","))
    return "\n".join(lines)


def _service_variables() -> str:
    from mailtrio.config import VARIABLES

    return _wrap([*VARIABLES, "OTEL_*"])


_EXITS_RUN = """exit codes:
  0  graceful stop (SIGTERM/SIGINT)
  1  a start-up step or the service failed (one line on stderr naming the step and the cause)
  2  configuration error (one line naming the variable, before any network I/O) or bad usage"""

_SERVE_HELP = """\
Run the service until SIGTERM or SIGINT: validate the configuration, ping Redis, open the
PostgreSQL pool and check schema mail, apply the embedded migrations, parse the template catalog,
then start the attempt workers, scheduler, command consumer, retention worker and the internal
HTTP listener. Logs go to stdout (MAIL_LOG_FORMAT). Under systemd (Type=notify) it sends READY=1
once everything has started, STOPPING=1 when shutdown begins, and STATUS= lines.

variables (see README "Configuration" for each; `mailtrio check` tries them all):
{variables}
  NOTIFY_SOCKET (set by systemd: where READY=1/STOPPING=1/STATUS= go)

{exits}
"""

_CHECK_HELP = """\
Run every start-up step of `mailtrio serve` without starting it, one line per step with ok,
failed or skipped and why: configuration, Redis (PING), PostgreSQL (connect, schema mail, pool),
migrations (applied and pending; nothing is applied), the instance identity (is MAIL_INSTANCE_ID
held by a live process; held is reported, not failed), the template catalog (parse all), the
listener address (can it be bound; in use is reported, not failed), and in smtp mode an SMTP
probe with the service's own client (connect, EHLO, STARTTLS or TLS, AUTH, QUIT; nothing is
sent). Run it before a deploy, with the service's environment.

variables: the service's (see `mailtrio serve --help`):
{variables}

exit codes:
  0  every step ok (pending migrations are ok: serve applies them)
  1  a step failed
  2  bad usage
"""

_MIGRATE_HELP = """\
Apply the embedded goose-format migrations to schema mail (the default action, `up`), under the
advisory lock the service takes at start-up, or show their status (`status`: each embedded
migration with the time it was applied, or Pending, as `goose status` shows it; nothing is
changed). Run `migrate` ahead of a rollout to keep migrations out of the start-up path.

variables:
  MAIL_POSTGRES_PRIMARY_DSN  libpq URI or key=value DSN of the database (required)

exit codes:
  0  applied (or nothing pending); status printed
  1  PostgreSQL unreachable, schema mail missing, or a migration failed
  2  MAIL_POSTGRES_PRIMARY_DSN missing or invalid, or bad usage
"""

_TEMPLATES_HELP = """\
Parse the whole template catalog as the service does at start-up and print each problem as
file:line (each template's locales when all is well).

variables:
  MAIL_TEMPLATE_DIR    catalog root, when DIR is not given
  MAIL_DEFAULT_LOCALE  the locale every template must have (default en)

exit codes:
  0  the catalog is valid
  1  problems were found (printed as file:line)
  2  no DIR and no MAIL_TEMPLATE_DIR
"""

_ENQUEUE_EPILOG = """\
variables:
  MAIL_REDIS_MASTER_ADDR (required), MAIL_REDIS_PASSWORD, MAIL_REDIS_DB, MAIL_REDIS_COMMAND_STREAM

exit codes:
  0  the command was added to the stream (its delivery id is printed)
  1  the command could not be added (Redis unreachable or refused it)
  2  a variable is missing or invalid, the command would be malformed, or bad usage
"""


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="mailtrio", formatter_class=fmt,
        description="mailtrio mail delivery service. `mailtrio COMMAND --help` says what a command does, "
                    "the variables it reads and its exit codes.",
        epilog="exit codes: 0 done, 1 failed or partly done, 2 configuration or usage error")
    parser.add_argument("--version", action="version", version=f"mailtrio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    variables = _service_variables()
    sub.add_parser("serve", help="run the service until SIGTERM/SIGINT", formatter_class=fmt,
                   description=_SERVE_HELP.format(variables=variables, exits=_EXITS_RUN)).set_defaults(fn=cmd_serve)
    check = sub.add_parser("check", help="run every start-up step without starting (pre-flight)",
                           formatter_class=fmt, description=_CHECK_HELP.format(variables=variables))
    check.add_argument("--json", action="store_true", help="print the steps as JSON")
    check.set_defaults(fn=cmd_check)
    migrate = sub.add_parser("migrate", help="apply the embedded migrations, or show their status",
                             formatter_class=fmt, description=_MIGRATE_HELP)
    migrate.add_argument("action", nargs="?", choices=("up", "status"), default="up",
                         help="up (default): apply pending migrations; status: list them and which are applied")
    migrate.add_argument("--json", action="store_true", help="status as JSON")
    migrate.set_defaults(fn=cmd_migrate)
    templates = sub.add_parser("templates", help="template catalog tools", formatter_class=fmt,
                               description=_TEMPLATES_HELP)
    tsub = templates.add_subparsers(dest="templates_command", required=True)
    tcheck = tsub.add_parser("check", help="parse the whole catalog, print problems with file:line",
                             formatter_class=fmt, description=_TEMPLATES_HELP)
    tcheck.add_argument("dir", nargs="?", help="catalog root (default: MAIL_TEMPLATE_DIR)")
    tcheck.set_defaults(fn=cmd_templates_check)
    try:
        from mailtrio.producer import add_enqueue_parser
    except ImportError:  # pragma: no cover - the producer helper ships with intake
        pass
    else:
        add_enqueue_parser(sub)
        enqueue = sub.choices.get("enqueue")
        if enqueue is not None and not enqueue.epilog:
            enqueue.formatter_class = fmt
            enqueue.epilog = _ENQUEUE_EPILOG
    from mailtrio.ops.commands import add_parsers

    add_parsers(sub, cmd_ops)
    from mailtrio.events_cli import add_events_parser

    add_events_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
