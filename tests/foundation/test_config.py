"""Unit tests of configuration parsing (CONTRACT §2): durations, addresses and every rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailtrio.config import VARIABLES, ConfigError, Settings, format_duration, parse_duration, parse_hostport
from tests.support.serve import TEMPLATES


def env(**overrides: str) -> dict[str, str]:
    base = {
        "MAIL_REDIS_MASTER_ADDR": "127.0.0.1:6379",
        "MAIL_POSTGRES_PRIMARY_DSN": "postgresql://mailservice@127.0.0.1:5432/mailtrio",
        "MAIL_TEMPLATE_DIR": str(TEMPLATES),
        "MAIL_SMTP_MODE": "stub",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def error_of(**overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env(**overrides))
    return info.value


# -- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("1m30s", 90.0),
        ("4h", 14400.0),
        ("1h15m30.5s", 4530.5),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("+5s", 5.0),
        ("-5s", -5.0),
        ("100us", 1e-4),
        ("100µs", 1e-4),
        ("100μs", 1e-4),
        ("1000000ns", 1e-3),
        ("168h", 604800.0),
        ("720h", 2592000.0),
        ("2h45m", 9900.0),
    ],
)
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", " ", "+", "-", "1", "10", "s", ".s", "1d", "1w", "1h 30m", "1e3s", "1,5s", "ms", "1sec", "--1s",
             "1.2.3s", "5 s", "0x10s"]
)
def test_invalid_go_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(sorted(_UNITS))), min_size=1, max_size=6))
def test_duration_is_the_sum_of_its_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    assert parse_duration(text) == pytest.approx(sum(n * _UNITS[u] for n, u in parts))


@given(st.integers(min_value=0, max_value=10**10))
def test_format_duration_round_trips(ms: int) -> None:
    text = format_duration(ms / 1000)
    assert parse_duration(text) == pytest.approx(ms / 1000)


@given(st.text(alphabet="0123456789hmsun.+- µ", max_size=12))
def test_parse_duration_accepts_only_go_syntax(text: str) -> None:
    import re

    go = re.fullmatch(r"[+-]?(0|((\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h))+)", text.strip())
    if go is None:
        with pytest.raises(ValueError):
            parse_duration(text)
    else:
        parse_duration(text)


# -- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:6379", ("127.0.0.1", 6379)),
        ("redis.internal:6380", ("redis.internal", 6380)),
        ("[::1]:25", ("::1", 25)),
        ("localhost:65535", ("localhost", 65535)),
        ("h:1", ("h", 1)),
    ],
)
def test_addresses_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "localhost", "localhost:", ":6379", "host:0", "host:65536", "host:port", "host:-1", "[::1]", "[::1:25",
     "::1:25", "my host:25", "host:25/x", "host:+25"],
)
def test_bad_addresses_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


# -- settings --------------------------------------------------------------------------------


def test_defaults_follow_the_contract() -> None:
    s = Settings.from_env(env())
    assert (s.redis_host, s.redis_port, s.redis_db, s.redis_password) == ("127.0.0.1", 6379, 0, "")
    assert s.command_stream == "mail:delivery_commands"
    assert s.consumer_group == "mailservice"
    assert s.redis_claim_idle == 60.0
    assert s.postgres_pool_size == 10
    assert s.default_locale == "en"
    assert s.smtp_from == "Mail Service <no-reply@localhost>"
    assert s.smtp_tls == "starttls"
    assert s.smtp_timeout == 30.0
    assert s.lease_seconds == 45.0
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8080)
    assert s.http_token is None
    assert s.shutdown_timeout == 30.0
    assert s.worker_concurrency == 16
    assert s.retry_ladder == (60.0, 300.0, 900.0, 3600.0, 14400.0)
    assert s.idempotency_ttl == 168 * 3600.0
    assert s.retention_period == 720 * 3600.0
    assert s.retention_interval == 3600.0
    assert (s.log_format, s.log_level) == ("json", "info")
    assert s.template_dir == TEMPLATES


def test_instance_id_defaults_to_hostname_and_pid() -> None:
    import os
    import socket

    assert Settings.from_env(env()).instance_id == f"{socket.gethostname()}-{os.getpid()}"
    assert Settings.from_env(env(MAIL_INSTANCE_ID="worker-7")).instance_id == "worker-7"


def test_settings_are_immutable_and_hide_secrets() -> None:
    s = Settings.from_env(
        env(
            MAIL_REDIS_PASSWORD="redis-pw-1",
            MAIL_POSTGRES_PRIMARY_DSN="postgresql://u:pg-pw-2@127.0.0.1/db",
            MAIL_SMTP_USERNAME="user",
            MAIL_SMTP_PASSWORD="smtp-pw-3",
            MAIL_INTERNAL_HTTP_TOKEN="http-token-4",
        )
    )
    with pytest.raises(AttributeError):
        s.smtp_mode = "smtp"  # type: ignore[misc]
    text = repr(s)
    for secret in ("redis-pw-1", "pg-pw-2", "smtp-pw-3", "http-token-4"):
        assert secret not in text


def test_full_smtp_configuration() -> None:
    s = Settings.from_env(
        env(
            MAIL_SMTP_MODE="smtp",
            MAIL_SMTP_ADDR="smtp.example.com:587",
            MAIL_SMTP_FROM="Acme <no-reply@example.com>",
            MAIL_SMTP_USERNAME="acme",
            MAIL_SMTP_PASSWORD="pw",
            MAIL_SMTP_TLS="tls",
            MAIL_SMTP_TIMEOUT="10s",
            MAIL_RETRY_LADDER="30s,2m",
            MAIL_REDIS_DB="3",
        )
    )
    assert (s.smtp_host, s.smtp_port, s.smtp_tls) == ("smtp.example.com", 587, "tls")
    assert (s.smtp_username, s.smtp_password) == ("acme", "pw")
    assert s.lease_seconds == 25.0
    assert s.retry_ladder == (30.0, 120.0)
    assert s.redis_db == 3


@pytest.mark.parametrize("name", [n for n, (req, _, _) in VARIABLES.items() if req])
def test_each_required_variable(name: str) -> None:
    assert error_of(**{name: ""}).variable == name
    e = env()
    del e[name]
    with pytest.raises(ConfigError) as info:
        Settings.from_env(e)
    assert info.value.variable == name
    assert "required" in str(info.value)


# (overrides, variable named in the error)
RULES: list[tuple[dict[str, str], str]] = [
    ({"MAIL_REDIS_MASTER_ADDR": "redis"}, "MAIL_REDIS_MASTER_ADDR"),
    ({"MAIL_REDIS_MASTER_ADDR": "redis:99999"}, "MAIL_REDIS_MASTER_ADDR"),
    ({"MAIL_REDIS_DB": "one"}, "MAIL_REDIS_DB"),
    ({"MAIL_REDIS_DB": "-1"}, "MAIL_REDIS_DB"),
    ({"MAIL_REDIS_COMMAND_STREAM": "a b"}, "MAIL_REDIS_COMMAND_STREAM"),
    ({"MAIL_REDIS_CONSUMER_GROUP": "a b"}, "MAIL_REDIS_CONSUMER_GROUP"),
    ({"MAIL_INSTANCE_ID": "bad id"}, "MAIL_INSTANCE_ID"),
    ({"MAIL_REDIS_CLAIM_IDLE": "5"}, "MAIL_REDIS_CLAIM_IDLE"),
    ({"MAIL_REDIS_CLAIM_IDLE": "0s"}, "MAIL_REDIS_CLAIM_IDLE"),
    ({"MAIL_POSTGRES_PRIMARY_DSN": "host=localhost port"}, "MAIL_POSTGRES_PRIMARY_DSN"),
    ({"MAIL_POSTGRES_POOL_SIZE": "lots"}, "MAIL_POSTGRES_POOL_SIZE"),
    ({"MAIL_POSTGRES_POOL_SIZE": "0"}, "MAIL_POSTGRES_POOL_SIZE"),
    ({"MAIL_TEMPLATE_DIR": "/nonexistent/templates"}, "MAIL_TEMPLATE_DIR"),
    ({"MAIL_TEMPLATE_DIR": str(TEMPLATES / "login-code" / "en" / "subject.txt.j2")}, "MAIL_TEMPLATE_DIR"),
    ({"MAIL_DEFAULT_LOCALE": "EN"}, "MAIL_DEFAULT_LOCALE"),
    ({"MAIL_DEFAULT_LOCALE": "en_US"}, "MAIL_DEFAULT_LOCALE"),
    ({"MAIL_SMTP_MODE": "sendmail"}, "MAIL_SMTP_MODE"),
    ({"MAIL_SMTP_MODE": "smtp"}, "MAIL_SMTP_ADDR"),
    ({"MAIL_SMTP_MODE": "smtp", "MAIL_SMTP_ADDR": "smtp.example.com"}, "MAIL_SMTP_ADDR"),
    ({"MAIL_SMTP_MODE": "smtp", "MAIL_SMTP_ADDR": "smtp.example.com:25"}, "MAIL_SMTP_FROM"),
    ({"MAIL_SMTP_FROM": "not an address"}, "MAIL_SMTP_FROM"),
    ({"MAIL_SMTP_FROM": "A <a@example.com>\r\nBcc: x@example.com"}, "MAIL_SMTP_FROM"),
    ({"MAIL_SMTP_USERNAME": "user"}, "MAIL_SMTP_PASSWORD"),
    ({"MAIL_SMTP_PASSWORD": "pw"}, "MAIL_SMTP_USERNAME"),
    ({"MAIL_SMTP_USERNAME": "user", "MAIL_SMTP_PASSWORD": "pw", "MAIL_SMTP_TLS": "none"}, "MAIL_SMTP_TLS"),
    ({"MAIL_SMTP_TLS": "ssl"}, "MAIL_SMTP_TLS"),
    ({"MAIL_SMTP_HELO_NAME": "vm"}, "MAIL_SMTP_HELO_NAME"),
    ({"MAIL_SMTP_HELO_NAME": "mail.example.com\r\nMAIL FROM:<x@y>"}, "MAIL_SMTP_HELO_NAME"),
    ({"MAIL_SMTP_HELO_NAME": "-bad.example.com"}, "MAIL_SMTP_HELO_NAME"),
    ({"MAIL_SMTP_CA_FILE": "/nonexistent/ca.pem"}, "MAIL_SMTP_CA_FILE"),
    ({"MAIL_SMTP_TIMEOUT": "30"}, "MAIL_SMTP_TIMEOUT"),
    ({"MAIL_SMTP_TIMEOUT": "-1s"}, "MAIL_SMTP_TIMEOUT"),
    ({"MAIL_INTERNAL_HTTP_ADDR": "8080"}, "MAIL_INTERNAL_HTTP_ADDR"),
    ({"MAIL_INTERNAL_HTTP_ADDR": "0.0.0.0:8080"}, "MAIL_INTERNAL_HTTP_TOKEN"),
    ({"MAIL_INTERNAL_HTTP_PROTECTED_MODE": "off"}, "MAIL_INTERNAL_HTTP_PROTECTED_MODE"),
    ({"MAIL_CONSOLE_SESSION_TTL": "12"}, "MAIL_CONSOLE_SESSION_TTL"),
    ({"MAIL_CONSOLE_SESSION_TTL": "500ms"}, "MAIL_CONSOLE_SESSION_TTL"),
    ({"MAIL_SHUTDOWN_TIMEOUT": "soon"}, "MAIL_SHUTDOWN_TIMEOUT"),
    ({"MAIL_SHUTDOWN_TIMEOUT": "0"}, "MAIL_SHUTDOWN_TIMEOUT"),
    ({"MAIL_ATTEMPT_WORKER_CONCURRENCY": "0"}, "MAIL_ATTEMPT_WORKER_CONCURRENCY"),
    ({"MAIL_ATTEMPT_WORKER_CONCURRENCY": "many"}, "MAIL_ATTEMPT_WORKER_CONCURRENCY"),
    ({"MAIL_RETRY_LADDER": "1m,,5m"}, "MAIL_RETRY_LADDER"),
    ({"MAIL_RETRY_LADDER": "1m,5"}, "MAIL_RETRY_LADDER"),
    ({"MAIL_RETRY_LADDER": "1m,-5m"}, "MAIL_RETRY_LADDER"),
    ({"MAIL_RETRY_LADDER": "1m,-"}, "MAIL_RETRY_LADDER"),
    ({"MAIL_MAX_INTERRUPTED": "0"}, "MAIL_MAX_INTERRUPTED"),
    ({"MAIL_MAX_INTERRUPTED": "three"}, "MAIL_MAX_INTERRUPTED"),
    ({"MAIL_IDEMPOTENCY_TTL": "7d"}, "MAIL_IDEMPOTENCY_TTL"),
    ({"MAIL_RETENTION_PERIOD": "30d"}, "MAIL_RETENTION_PERIOD"),
    ({"MAIL_RETENTION_INTERVAL": "hourly"}, "MAIL_RETENTION_INTERVAL"),
    ({"MAIL_LOG_FORMAT": "xml"}, "MAIL_LOG_FORMAT"),
    ({"MAIL_LOG_LEVEL": "loud"}, "MAIL_LOG_LEVEL"),
    ({"MAIL_REDIS_EVENT_STREAM": "my events"}, "MAIL_REDIS_EVENT_STREAM"),
    ({"MAIL_REDIS_EVENT_STREAM": "mail:delivery_commands"}, "MAIL_REDIS_EVENT_STREAM"),
    ({"MAIL_REDIS_EVENT_STREAM_MAXLEN": "-1"}, "MAIL_REDIS_EVENT_STREAM_MAXLEN"),
    ({"MAIL_REDIS_EVENT_STREAM_MAX_AGE": "7d"}, "MAIL_REDIS_EVENT_STREAM_MAX_AGE"),
    ({"MAIL_REDIS_EVENT_STREAM_MAX_AGE": "-1h"}, "MAIL_REDIS_EVENT_STREAM_MAX_AGE"),
    ({"MAIL_EVENTS_PUBLISHER": "maybe"}, "MAIL_EVENTS_PUBLISHER"),
    ({"MAIL_EVENT_OUTBOX_RETENTION": "0"}, "MAIL_EVENT_OUTBOX_RETENTION"),
]


@pytest.mark.parametrize(("overrides", "variable"), RULES, ids=[f"{v}-{i}" for i, (_, v) in enumerate(RULES)])
def test_each_rule_names_its_variable_on_one_line(overrides: dict[str, str], variable: str) -> None:
    exc = error_of(**overrides)
    assert exc.variable == variable
    assert str(exc).startswith(f"{variable}: ")
    assert "\n" not in str(exc) and "\r" not in str(exc)


def test_every_variable_is_covered_by_a_rule_or_is_free_text() -> None:
    free_text = {"MAIL_REDIS_PASSWORD", "MAIL_INTERNAL_HTTP_TOKEN"}
    ruled = {v for _, v in RULES} | {n for n, (req, _, _) in VARIABLES.items() if req}
    assert set(VARIABLES) - free_text <= ruled


def test_tls_none_without_credentials_and_ca_file_are_accepted(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = Settings.from_env(env(MAIL_SMTP_MODE="smtp", MAIL_SMTP_ADDR="127.0.0.1:2525", MAIL_SMTP_FROM="a@example.com",
                              MAIL_SMTP_TLS="none", MAIL_SMTP_CA_FILE=str(ca)))
    assert s.smtp_tls == "none"
    assert s.smtp_ca_file == ca
    assert s.smtp_username is None and s.smtp_password is None


def test_case_and_whitespace_are_forgiven_where_harmless() -> None:
    s = Settings.from_env(env(MAIL_SMTP_TLS="STARTTLS", MAIL_LOG_FORMAT="Console", MAIL_LOG_LEVEL="WARN",
                              MAIL_SHUTDOWN_TIMEOUT=" 5s "))
    assert (s.smtp_tls, s.log_format, s.log_level, s.shutdown_timeout) == ("starttls", "console", "warning", 5.0)


def test_variables_table_lists_every_contract_variable() -> None:
    contract = {
        "MAIL_REDIS_MASTER_ADDR", "MAIL_REDIS_PASSWORD", "MAIL_REDIS_DB", "MAIL_REDIS_COMMAND_STREAM",
        "MAIL_REDIS_CONSUMER_GROUP", "MAIL_INSTANCE_ID", "MAIL_REDIS_CLAIM_IDLE", "MAIL_POSTGRES_PRIMARY_DSN",
        "MAIL_POSTGRES_POOL_SIZE", "MAIL_TEMPLATE_DIR", "MAIL_DEFAULT_LOCALE", "MAIL_SMTP_MODE", "MAIL_SMTP_ADDR",
        "MAIL_SMTP_FROM", "MAIL_SMTP_USERNAME", "MAIL_SMTP_PASSWORD", "MAIL_SMTP_TLS", "MAIL_SMTP_CA_FILE",
        "MAIL_SMTP_TIMEOUT", "MAIL_INTERNAL_HTTP_ADDR", "MAIL_INTERNAL_HTTP_TOKEN", "MAIL_SHUTDOWN_TIMEOUT",
        "MAIL_ATTEMPT_WORKER_CONCURRENCY", "MAIL_RETRY_LADDER", "MAIL_IDEMPOTENCY_TTL", "MAIL_RETENTION_PERIOD",
        "MAIL_RETENTION_INTERVAL", "MAIL_LOG_FORMAT", "MAIL_LOG_LEVEL",
    }
    # variables beyond the contract, each documented in the README
    extensions = {"MAIL_CONSOLE_SESSION_TTL", "MAIL_INTERNAL_HTTP_PROTECTED_MODE", "MAIL_MAX_INTERRUPTED",
                  "MAIL_SMTP_HELO_NAME",
                  # outcome events
                  "MAIL_REDIS_EVENT_STREAM", "MAIL_REDIS_EVENT_STREAM_MAXLEN", "MAIL_REDIS_EVENT_STREAM_MAX_AGE",
                  "MAIL_EVENTS_PUBLISHER", "MAIL_EVENT_OUTBOX_RETENTION"}
    assert set(VARIABLES) == contract | extensions
    required = {n for n, (req, _, _) in VARIABLES.items() if req}
    assert required == {"MAIL_REDIS_MASTER_ADDR", "MAIL_POSTGRES_PRIMARY_DSN", "MAIL_TEMPLATE_DIR", "MAIL_SMTP_MODE"}


@pytest.mark.parametrize("name", ["mail.example.com", "mx1.mail.example.com.", "[192.0.2.1]", "[IPv6:2001:db8::1]",
                                  "xn--fa-hia.de"])
def test_helo_name_accepts_qualified_names_and_address_literals(name: str) -> None:
    assert Settings.from_env(env(MAIL_SMTP_HELO_NAME=name)).smtp_helo_name == name


def test_helo_name_default_is_left_to_the_provider() -> None:
    # No name lookup at configuration time (it can be network I/O): None means the default.
    assert Settings.from_env(env()).smtp_helo_name is None
