"""structlog setup: JSON lines on stdout, contextvars merged first, OpenTelemetry ids added.

Every line on stdout has the same shape, whoever wrote it: records of the standard library's
loggers (hypercorn, psycopg and its pool, redis, asyncio, trio-asyncio, the OpenTelemetry SDK)
and Python warnings (`logging.captureWarnings`) go through structlog's `ProcessorFormatter` with
the same processors, plus `logger` (the stdlib logger's name). Uncaught exceptions in threads and
"exception ignored" reports are logged the same way instead of printed to stderr. A library that
repeats the same message (a pool retrying to connect during an outage) is logged once per
REPEAT_WINDOW; the next line says how many were left out (`repeated`).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import MutableMapping
from functools import lru_cache
from typing import Any

import structlog
from opentelemetry import trace

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_SECRET_KEYS = ("password", "token", "secret", "dsn", "authorization")
# A stdlib logger's identical message (same template) is logged at most once in this window.
REPEAT_WINDOW = 10.0


def _add_otel_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("otel_trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("otel_span_id", format(ctx.span_id, "016x"))
    return event


@lru_cache(maxsize=4096)
def _secret(key: str) -> bool:
    lowered = key.lower()
    return any(s in lowered for s in _SECRET_KEYS)


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if _secret(key):
            event[key] = "[redacted]"
    return event


def _stdlib_fields(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    record = event.get("_record")
    if isinstance(record, logging.LogRecord):
        event["logger"] = record.name
        repeated = getattr(record, "repeated", None)
        if repeated:
            event["repeated"] = repeated
    return event


class _RepeatFilter(logging.Filter):
    """Drop a stdlib record whose logger and message template were logged within the window."""

    def __init__(self, window: float = REPEAT_WINDOW) -> None:
        super().__init__()
        self.window = window
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            last, dropped = self._seen.get(key, (-float("inf"), 0))
            if now - last < self.window:
                self._seen[key] = (last, dropped + 1)
                return False
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[key] = (now, 0)
        if dropped:
            record.repeated = dropped
        return True


class _StdoutHandler(logging.Handler):
    """Writes formatted records through structlog's PrintLogger: one lock for every line on
    stdout, so lines from threads never interleave."""

    def __init__(self) -> None:
        super().__init__()
        self._out = structlog.PrintLogger(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.msg(self.format(record))
        except Exception:
            pass


def configure(fmt: str = "json", level: str = "info") -> None:
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_otel_ids,
        _redact,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, 20)),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library: the same JSON lines on stdout. They are
    # kept at warning (info with MAIL_LOG_LEVEL=debug: their debug output is per query).
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _stdlib_fields],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = _StdoutHandler()
    handler.setFormatter(formatter)
    handler.addFilter(_RepeatFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(_LEVELS.get(level, 20), logging.WARNING) if level != "debug" else logging.INFO)
    logging.raiseExceptions = False
    logging.captureWarnings(True)
    _route_uncaught()


def _route_uncaught() -> None:
    """Uncaught exceptions in threads and unraisable exceptions: logged, not printed to stderr."""
    stdlib = logging.getLogger("mailtrio.uncaught")

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        stdlib.error("uncaught exception in thread %s", getattr(args.thread, "name", "?"),
                     exc_info=args.exc_value or True)

    def unraisable_hook(args: Any) -> None:
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback) if args.exc_value is not None else None
        stdlib.warning("exception ignored: %s", args.err_msg or "", exc_info=exc_info)

    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook


def get(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()
