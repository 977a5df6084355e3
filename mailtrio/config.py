"""Configuration: parsed once from an environment mapping into a frozen Settings (CONTRACT §2).

Every check happens here, before any network I/O. A mistake raises ConfigError naming the
variable; the CLI turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path

from mailtrio import bcp47


class ConfigError(Exception):
    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable
        self.message = message


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Parse a Go duration (`250ms`, `1m30s`, `4h`) into seconds. Raises ValueError."""
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
        if not s:
            raise ValueError(f"invalid duration {text!r} (Go syntax, e.g. 250ms, 30s, 1m30s, 4h)")
    if s == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f"invalid duration {text!r} (Go syntax, e.g. 250ms, 30s, 1m30s, 4h)")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """Inverse of parse_duration for display (`90` -> `1m30s`)."""
    if seconds == 0:
        return "0s"
    ms = round(seconds * 1000)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    out = ""
    if h:
        out += f"{h}h"
    if m:
        out += f"{m}m"
    if s or ms:
        out += f"{s}.{ms:03d}".rstrip("0").rstrip(".") + "s" if ms else f"{s}s"
    return out


def parse_hostport(text: str) -> tuple[str, int]:
    """Parse `host:port` (IPv6 as `[::1]:25`). Raises ValueError."""
    t = text.strip()
    if t.startswith("["):
        end = t.find("]")
        if end < 0 or t[end + 1 : end + 2] != ":":
            raise ValueError(f"invalid address {text!r}, expected host:port")
        host, port_s = t[1:end], t[end + 2 :]
    else:
        host, sep, port_s = t.rpartition(":")
        if not sep:
            raise ValueError(f"invalid address {text!r}, expected host:port")
    if not host:
        raise ValueError(f"invalid address {text!r}: empty host")
    if any(c.isspace() or c in "/[]" for c in host) or (":" in host and not t.startswith("[")):
        raise ValueError(f"invalid address {text!r}, expected host:port (IPv6 as [addr]:port)")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"invalid address {text!r}: port must be 1-65535")
    return host, int(port_s)


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP addresses (no name is resolved: configuration does no I/O)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    redis_host: str
    redis_port: int
    redis_password: str = field(repr=False)
    redis_db: int
    command_stream: str
    consumer_group: str
    instance_id: str
    redis_claim_idle: float
    postgres_dsn: str = field(repr=False)
    postgres_pool_size: int
    template_dir: Path
    default_locale: str
    smtp_mode: str
    smtp_host: str | None
    smtp_port: int | None
    smtp_from: str
    smtp_username: str | None
    smtp_password: str | None = field(repr=False)
    smtp_tls: str
    smtp_ca_file: Path | None
    smtp_timeout: float
    http_host: str
    http_port: int
    http_token: str | None = field(repr=False)
    shutdown_timeout: float
    worker_concurrency: int
    retry_ladder: tuple[float, ...]
    idempotency_ttl: float
    retention_period: float
    retention_interval: float
    log_format: str
    log_level: str
    # outcome events (README "Outcome events")
    event_stream: str
    event_stream_maxlen: int
    event_stream_max_age: float
    events_publisher: bool
    event_outbox_retention: float
    # What EHLO says; None: the host's fully qualified name, else the domain of MAIL_SMTP_FROM
    # (worked out by the SMTP provider: the name lookup is network I/O, never done here).
    smtp_helo_name: str | None = None
    http_protected_mode: bool = True
    # systemd's NOTIFY_SOCKET (not a MAIL_* variable: systemd sets it under Type=notify)
    notify_socket: str | None = None
    max_interrupted: int = 3
    console_session_ttl: float = 12 * 3600.0

    @property
    def lease_seconds(self) -> float:
        """A delivery's lease lasts the SMTP timeout plus a 15 s margin (CONTRACT §2)."""
        return self.smtp_timeout + 15.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        return _parse(os.environ if env is None else env)


# Every variable the service reads, with its default ("" = none). Documentation is generated
# from (and tested against) this table so the README cannot drift from the code.
VARIABLES: dict[str, tuple[bool, str, str]] = {
    "MAIL_REDIS_MASTER_ADDR": (True, "", "host:port of the Redis master"),
    "MAIL_REDIS_PASSWORD": (False, "", "Redis password (never logged)"),
    "MAIL_REDIS_DB": (False, "0", "Redis logical database"),
    "MAIL_REDIS_COMMAND_STREAM": (False, "mail:delivery_commands", "inbound command stream"),
    "MAIL_REDIS_CONSUMER_GROUP": (False, "mailservice", "consumer group; its offset is the persisted consumer offset"),
    "MAIL_INSTANCE_ID": (False, "<hostname>-<pid>", "consumer name and lease owner"),
    "MAIL_REDIS_CLAIM_IDLE": (False, "1m", "entries pending this long on another consumer are claimed"),
    "MAIL_POSTGRES_PRIMARY_DSN": (True, "", "libpq URI or key=value DSN (never logged)"),
    "MAIL_POSTGRES_POOL_SIZE": (False, "10", "PostgreSQL pool size (2-1000)"),
    "MAIL_TEMPLATE_DIR": (True, "", "template catalog root: `<template_id>/<locale>/subject.txt.j2`, `body.txt.j2`, "
                          "optional `body.html.j2`, shared `_partials/`; must be a directory"),
    "MAIL_DEFAULT_LOCALE": (False, "en", "last step of locale fallback"),
    "MAIL_SMTP_MODE": (True, "", "`smtp`, or `stub` (sends nothing: authsession ends `suppressed`, "
                       "notification `sent`)"),
    "MAIL_SMTP_ADDR": (False, "", "host:port of the SMTP server (required with smtp)"),
    "MAIL_SMTP_FROM": (False, "Mail Service <no-reply@localhost>", "sender identity (required with smtp)"),
    "MAIL_SMTP_USERNAME": (False, "", "SMTP AUTH user; both or neither with MAIL_SMTP_PASSWORD, only with "
                           "starttls or tls"),
    "MAIL_SMTP_PASSWORD": (False, "", "SMTP AUTH password (never logged)"),
    "MAIL_SMTP_TLS": (False, "starttls", "`starttls` (required), `tls` (implicit) or `none` (local relays "
                      "and tests)"),
    "MAIL_SMTP_CA_FILE": (False, "", "CA bundle to verify the SMTP server (default: system store)"),
    "MAIL_SMTP_TIMEOUT": (False, "30s", "bound on one SMTP transaction; lease = this + 15s"),
    "MAIL_SMTP_HELO_NAME": (False, "", "the name EHLO gives: a fully qualified domain name or an address "
                            "literal such as `[192.0.2.1]` (default: the host's fully qualified name, else "
                            "the domain of MAIL_SMTP_FROM)"),
    "MAIL_INTERNAL_HTTP_ADDR": (False, "127.0.0.1:8080", "internal HTTP listener"),
    "MAIL_INTERNAL_HTTP_TOKEN": (False, "", "bearer token required on every route when set; required when "
                                 "the listener is not on loopback (see MAIL_INTERNAL_HTTP_PROTECTED_MODE)"),
    "MAIL_INTERNAL_HTTP_PROTECTED_MODE": (False, "yes", "`yes`: a MAIL_INTERNAL_HTTP_ADDR that is not a loopback "
                                          "address (127.0.0.0/8, ::1, localhost) needs MAIL_INTERNAL_HTTP_TOKEN, "
                                          "else exit 2; `no` serves it without a token (the API shows login "
                                          "codes: only behind another access control)"),
    "MAIL_CONSOLE_SESSION_TTL": (False, "12h", "how long a sign-in to the operator console (`/console`) lasts "
                                 "when MAIL_INTERNAL_HTTP_TOKEN is set"),
    "MAIL_SHUTDOWN_TIMEOUT": (False, "30s", "bound on the whole coordinated shutdown (keep it below "
                              "systemd's TimeoutStopSec)"),
    "MAIL_ATTEMPT_WORKER_CONCURRENCY": (False, "16", "attempt workers (fed through a bounded memory channel)"),
    "MAIL_RETRY_LADDER": (False, "1m,5m,15m,1h,4h", "delay before retry 1, 2, ...; a retryable failure after "
                          "the last step dead-letters"),
    "MAIL_MAX_INTERRUPTED": (False, "3", "consecutive `interrupted` attempts (lease rescued, restart, shutdown "
                             "put-back) after which a delivery is dead-lettered `repeatedly interrupted` (1-1000)"),
    "MAIL_IDEMPOTENCY_TTL": (False, "168h", "an idempotency reservation lasts max(accepted, send_at) + this, and "
                             "while its delivery is unfinished; older stream entries are stale_command and trimmed"),
    "MAIL_RETENTION_PERIOD": (False, "720h", "age after which terminal rows are deleted"),
    "MAIL_RETENTION_INTERVAL": (False, "1h", "how often the retention worker runs"),
    "MAIL_REDIS_EVENT_STREAM": (False, "mail:delivery_events", "outbound stream of delivery outcome events "
                                "(`accepted`, `deferred`, `sent`, ... ; see Outcome events)"),
    "MAIL_REDIS_EVENT_STREAM_MAXLEN": (False, "1000000", "bound on the event stream's length (`XADD MAXLEN ~`); "
                                       "`0` = no length bound"),
    "MAIL_REDIS_EVENT_STREAM_MAX_AGE": (False, "168h", "bound on the age of event stream entries (`XTRIM MINID ~`); "
                                        "`0` = no age bound"),
    "MAIL_EVENTS_PUBLISHER": (False, "on", "`on`: this instance may be the (single) event publisher; `off`: it "
                              "never publishes (events wait in the outbox for an instance that does)"),
    "MAIL_EVENT_OUTBOX_RETENTION": (False, "24h", "age after which published outbox rows are deleted by the "
                                    "retention worker (unpublished rows are never deleted)"),
    "MAIL_LOG_FORMAT": (False, "json", "`json` (one object per line on stdout) or `console`"),
    "MAIL_LOG_LEVEL": (False, "info", "debug, info, warning, error or critical"),
}

def postgres_dsn(env: Mapping[str, str]) -> str:
    """MAIL_POSTGRES_PRIMARY_DSN, checked without connecting (the message never echoes it)."""
    dsn = env.get("MAIL_POSTGRES_PRIMARY_DSN", "").strip()
    if not dsn:
        raise ConfigError("MAIL_POSTGRES_PRIMARY_DSN", "is required")
    try:
        from psycopg.conninfo import conninfo_to_dict

        conninfo_to_dict(dsn)
    except Exception:
        raise ConfigError("MAIL_POSTGRES_PRIMARY_DSN", "is not a valid libpq URI or key=value DSN") from None
    return dsn


_STREAM_NAME_RE = re.compile(r"^[^\s]{1,256}$")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _parse(env: Mapping[str, str]) -> Settings:
    def get(name: str) -> str:
        return env.get(name, "").strip()

    def required(name: str) -> str:
        value = get(name)
        if not value:
            raise ConfigError(name, "is required")
        return value

    def default(name: str) -> str:
        return get(name) or VARIABLES[name][1]

    def duration(name: str, *, positive: bool = True) -> float:
        raw = default(name)
        try:
            value = parse_duration(raw)
        except ValueError as exc:
            raise ConfigError(name, str(exc)) from None
        if positive and value <= 0:
            raise ConfigError(name, f"must be a positive duration, got {raw!r}")
        return value

    def integer(name: str, lo: int, hi: int) -> int:
        raw = default(name)
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(name, f"must be an integer, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ConfigError(name, f"must be between {lo} and {hi}, got {value}")
        return value

    def address(name: str, raw: str) -> tuple[str, int]:
        try:
            return parse_hostport(raw)
        except ValueError as exc:
            raise ConfigError(name, str(exc)) from None

    redis_host, redis_port = address("MAIL_REDIS_MASTER_ADDR", required("MAIL_REDIS_MASTER_ADDR"))
    redis_db = integer("MAIL_REDIS_DB", 0, 1_000_000)
    stream = default("MAIL_REDIS_COMMAND_STREAM")
    if not _STREAM_NAME_RE.match(stream):
        raise ConfigError("MAIL_REDIS_COMMAND_STREAM", "must be a non-empty key without spaces")
    group = default("MAIL_REDIS_CONSUMER_GROUP")
    if not _STREAM_NAME_RE.match(group):
        raise ConfigError("MAIL_REDIS_CONSUMER_GROUP", "must be a non-empty name without spaces")
    instance_id = get("MAIL_INSTANCE_ID") or f"{socket.gethostname()}-{os.getpid()}"
    if not re.match(r"^[A-Za-z0-9._:@-]{1,200}$", instance_id):
        raise ConfigError("MAIL_INSTANCE_ID", "must be 1-200 chars of [A-Za-z0-9._:@-]")
    claim_idle = duration("MAIL_REDIS_CLAIM_IDLE")

    dsn = postgres_dsn(env)
    pool_size = integer("MAIL_POSTGRES_POOL_SIZE", 2, 1000)

    template_dir = Path(required("MAIL_TEMPLATE_DIR"))
    if not template_dir.is_dir():
        raise ConfigError("MAIL_TEMPLATE_DIR", f"{str(template_dir)!r} is not a directory")
    default_locale = default("MAIL_DEFAULT_LOCALE")
    if not bcp47.is_canonical(default_locale):
        raise ConfigError("MAIL_DEFAULT_LOCALE",
                          f"{default_locale!r} is not a canonical BCP 47 tag ({bcp47.EXAMPLES})")

    mode = required("MAIL_SMTP_MODE")
    if mode not in ("smtp", "stub"):
        raise ConfigError("MAIL_SMTP_MODE", f"must be 'smtp' or 'stub', got {mode!r}")
    smtp_host: str | None = None
    smtp_port: int | None = None
    if mode == "smtp":
        smtp_host, smtp_port = address("MAIL_SMTP_ADDR", required("MAIL_SMTP_ADDR"))
        smtp_from = required("MAIL_SMTP_FROM")
    else:
        if get("MAIL_SMTP_ADDR"):
            smtp_host, smtp_port = address("MAIL_SMTP_ADDR", get("MAIL_SMTP_ADDR"))
        smtp_from = default("MAIL_SMTP_FROM")
    if any(c in smtp_from for c in "\r\n\0"):
        raise ConfigError("MAIL_SMTP_FROM", "must not contain CR, LF or NUL")
    _, from_addr = parseaddr(smtp_from)
    if "@" not in from_addr:
        raise ConfigError("MAIL_SMTP_FROM", f"{smtp_from!r} is not 'Name <addr>' or 'addr'")
    tls = default("MAIL_SMTP_TLS").lower()
    if tls not in ("starttls", "tls", "none"):
        raise ConfigError("MAIL_SMTP_TLS", f"must be starttls, tls or none, got {tls!r}")
    username = get("MAIL_SMTP_USERNAME") or None
    password = env.get("MAIL_SMTP_PASSWORD") or None
    if username and not password:
        raise ConfigError("MAIL_SMTP_PASSWORD", "is required when MAIL_SMTP_USERNAME is set")
    if password and not username:
        raise ConfigError("MAIL_SMTP_USERNAME", "is required when MAIL_SMTP_PASSWORD is set")
    if username and tls == "none":
        raise ConfigError("MAIL_SMTP_TLS", "credentials require starttls or tls, not none")
    ca_raw = get("MAIL_SMTP_CA_FILE")
    ca_file = Path(ca_raw) if ca_raw else None
    if ca_file is not None and not ca_file.is_file():
        raise ConfigError("MAIL_SMTP_CA_FILE", f"{ca_raw!r} is not a readable file")
    smtp_timeout = duration("MAIL_SMTP_TIMEOUT")
    helo_name = get("MAIL_SMTP_HELO_NAME") or None
    if helo_name is not None and not helo_name_valid(helo_name):
        raise ConfigError("MAIL_SMTP_HELO_NAME",
                          f"{helo_name!r} is not a fully qualified domain name or an address literal")

    http_host, http_port = address("MAIL_INTERNAL_HTTP_ADDR", default("MAIL_INTERNAL_HTTP_ADDR"))
    http_token = env.get("MAIL_INTERNAL_HTTP_TOKEN") or None
    protected_raw = default("MAIL_INTERNAL_HTTP_PROTECTED_MODE").lower()
    if protected_raw not in ("yes", "no"):
        raise ConfigError("MAIL_INTERNAL_HTTP_PROTECTED_MODE", f"must be yes or no, got {protected_raw!r}")
    protected = protected_raw == "yes"
    # Protected mode (Redis's model): content routes show login codes, so an API reachable from
    # other hosts must ask for a token unless the operator says otherwise.
    if protected and http_token is None and not is_loopback(http_host):
        raise ConfigError(
            "MAIL_INTERNAL_HTTP_TOKEN",
            f"is required when MAIL_INTERNAL_HTTP_ADDR ({http_host}) is not a loopback address: the API "
            "shows login codes (set MAIL_INTERNAL_HTTP_PROTECTED_MODE=no to serve it without a token anyway)",
        )
    shutdown_timeout = duration("MAIL_SHUTDOWN_TIMEOUT")
    console_session_ttl = duration("MAIL_CONSOLE_SESSION_TTL")
    if console_session_ttl < 1:
        raise ConfigError("MAIL_CONSOLE_SESSION_TTL", "must be at least 1s")
    concurrency = integer("MAIL_ATTEMPT_WORKER_CONCURRENCY", 1, 10_000)

    ladder_raw = default("MAIL_RETRY_LADDER")
    try:
        ladder = tuple(parse_duration(p) for p in ladder_raw.split(","))
    except ValueError as exc:
        raise ConfigError("MAIL_RETRY_LADDER", str(exc)) from None
    if any(step < 0 for step in ladder):
        raise ConfigError("MAIL_RETRY_LADDER", "steps must not be negative")

    max_interrupted = integer("MAIL_MAX_INTERRUPTED", 1, 1000)

    idempotency_ttl = duration("MAIL_IDEMPOTENCY_TTL")
    retention_period = duration("MAIL_RETENTION_PERIOD")
    retention_interval = duration("MAIL_RETENTION_INTERVAL")
    event_stream = default("MAIL_REDIS_EVENT_STREAM")
    if not _STREAM_NAME_RE.match(event_stream):
        raise ConfigError("MAIL_REDIS_EVENT_STREAM", "must be a non-empty key without spaces")
    if event_stream == stream:
        raise ConfigError("MAIL_REDIS_EVENT_STREAM", "must differ from MAIL_REDIS_COMMAND_STREAM")
    event_maxlen = integer("MAIL_REDIS_EVENT_STREAM_MAXLEN", 0, 1_000_000_000)
    event_max_age = duration("MAIL_REDIS_EVENT_STREAM_MAX_AGE", positive=False)
    if event_max_age < 0:
        raise ConfigError("MAIL_REDIS_EVENT_STREAM_MAX_AGE", "must not be negative")
    publisher_raw = default("MAIL_EVENTS_PUBLISHER").lower()
    if publisher_raw not in ("on", "off"):
        raise ConfigError("MAIL_EVENTS_PUBLISHER", f"must be on or off, got {publisher_raw!r}")
    outbox_retention = duration("MAIL_EVENT_OUTBOX_RETENTION")
    log_format = default("MAIL_LOG_FORMAT").lower()
    if log_format not in ("json", "console"):
        raise ConfigError("MAIL_LOG_FORMAT", f"must be json or console, got {log_format!r}")
    log_level = default("MAIL_LOG_LEVEL").lower()
    if log_level == "warn":
        log_level = "warning"
    if log_level not in _LOG_LEVELS:
        raise ConfigError("MAIL_LOG_LEVEL", f"must be one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")

    return Settings(
        redis_host=redis_host,
        redis_port=redis_port,
        redis_password=env.get("MAIL_REDIS_PASSWORD", ""),
        redis_db=redis_db,
        command_stream=stream,
        consumer_group=group,
        instance_id=instance_id,
        redis_claim_idle=claim_idle,
        postgres_dsn=dsn,
        postgres_pool_size=pool_size,
        template_dir=template_dir,
        default_locale=default_locale,
        smtp_mode=mode,
        smtp_host=smtp_host,
        smtp_port=smtp_port,
        smtp_from=smtp_from,
        smtp_username=username,
        smtp_password=password,
        smtp_tls=tls,
        smtp_ca_file=ca_file,
        smtp_timeout=smtp_timeout,
        http_host=http_host,
        http_port=http_port,
        http_token=http_token,
        shutdown_timeout=shutdown_timeout,
        worker_concurrency=concurrency,
        retry_ladder=ladder,
        idempotency_ttl=idempotency_ttl,
        retention_period=retention_period,
        retention_interval=retention_interval,
        log_format=log_format,
        log_level=log_level,
        http_protected_mode=protected,
        notify_socket=env.get("NOTIFY_SOCKET") or None,
        event_stream=event_stream,
        event_stream_maxlen=event_maxlen,
        event_stream_max_age=event_max_age,
        events_publisher=publisher_raw == "on",
        event_outbox_retention=outbox_retention,
        smtp_helo_name=helo_name,
        max_interrupted=max_interrupted,
        console_session_ttl=console_session_ttl,
    )


_HELO_DOMAIN_RE = re.compile(
    r"(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))+\.?")
_HELO_LITERAL_RE = re.compile(r"\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]+)\]")


def helo_name_valid(name: str) -> bool:
    """A domain with at least two labels (RFC 5321 §4.1.1.1 asks for the primary host name; a
    server with reject_non_fqdn_helo_hostname refuses a single label) or an address literal."""
    return bool(_HELO_DOMAIN_RE.fullmatch(name) or _HELO_LITERAL_RE.fullmatch(name))


_REQUIRED_WITH_SMTP = ("MAIL_SMTP_ADDR", "MAIL_SMTP_FROM")


def markdown_reference() -> str:
    """The configuration reference table of the README, generated from VARIABLES (a test keeps the
    README equal to this text)."""
    rows = ["| variable | required | default | meaning |", "| --- | --- | --- | --- |"]
    for name, (is_required, default_value, meaning) in VARIABLES.items():
        required_text = "yes" if is_required else ("with `smtp`" if name in _REQUIRED_WITH_SMTP else "no")
        shown = f"`{default_value}`" if default_value else ""
        if name == "MAIL_SMTP_FROM":
            shown += " (stub mode)"
        rows.append(f"| `{name}` | {required_text} | {shown} | {meaning} |")
    rows.append("| `OTEL_*` | no | | standard OpenTelemetry SDK variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, "
                "`OTEL_TRACES_EXPORTER`, `OTEL_METRICS_EXPORTER`, `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, "
                "...); with no exporter configured nothing is exported, and with no span exporter and no "
                "`OTEL_TRACES_SAMPLER` spans carry trace ids for the logs but are not recorded |")
    return "\n".join(rows) + "\n"
