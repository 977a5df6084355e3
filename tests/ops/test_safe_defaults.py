"""Protected mode of the internal listener (an API off loopback needs a token unless the operator
opts out), and the 401's `WWW-Authenticate: Bearer` challenge with a case-insensitive scheme."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from mailtrio.config import ConfigError, Settings
from tests.foundation.conftest import offline_env, run_cli
from tests.ops.conftest import TOKEN, Service


def settings(**env: str) -> Settings:
    return Settings.from_env(offline_env(**env))


@pytest.mark.parametrize("addr", ["127.0.0.1:8080", "127.3.4.5:8080", "[::1]:8080", "localhost:8080"])
def test_loopback_needs_no_token(addr: str) -> None:
    assert settings(MAIL_INTERNAL_HTTP_ADDR=addr).http_token is None


@pytest.mark.parametrize("addr", ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080", "mail.internal:8080"])
def test_off_loopback_needs_a_token_or_an_explicit_opt_out(addr: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings(MAIL_INTERNAL_HTTP_ADDR=addr)
    assert err.value.variable == "MAIL_INTERNAL_HTTP_TOKEN"
    assert "MAIL_INTERNAL_HTTP_PROTECTED_MODE=no" in str(err.value)
    assert settings(MAIL_INTERNAL_HTTP_ADDR=addr, MAIL_INTERNAL_HTTP_TOKEN="t").http_token == "t"
    opted_out = settings(MAIL_INTERNAL_HTTP_ADDR=addr, MAIL_INTERNAL_HTTP_PROTECTED_MODE="no")
    assert opted_out.http_token is None and opted_out.http_protected_mode is False


def test_protected_mode_value_and_exit_code() -> None:
    with pytest.raises(ConfigError) as err:
        settings(MAIL_INTERNAL_HTTP_PROTECTED_MODE="maybe")
    assert err.value.variable == "MAIL_INTERNAL_HTTP_PROTECTED_MODE"
    done = run_cli(["serve"], offline_env(MAIL_INTERNAL_HTTP_ADDR="0.0.0.0:8080"))
    assert done.code == 2, done
    assert done.stderr_lines == [
        "mailtrio: configuration error: MAIL_INTERNAL_HTTP_TOKEN: is required when MAIL_INTERNAL_HTTP_ADDR "
        "(0.0.0.0) is not a loopback address: the API shows login codes (set MAIL_INTERNAL_HTTP_PROTECTED_MODE=no "
        "to serve it without a token anyway)"]


def _get(service: Service, authorization: str | None) -> tuple[int, str | None]:
    req = urllib.request.Request(f"http://{service.addr}/api/v1/internal/schedule")
    if authorization is not None:
        req.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("WWW-Authenticate")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("WWW-Authenticate")


def test_bearer_challenge_and_case_insensitive_scheme(service: Service) -> None:
    assert _get(service, None) == (401, 'Bearer realm="mailtrio"')
    assert _get(service, "Bearer wrong") == (401, 'Bearer realm="mailtrio", error="invalid_token"')
    assert _get(service, f"Basic {TOKEN}") == (401, 'Bearer realm="mailtrio"')
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        assert _get(service, f"{scheme} {TOKEN}") == (200, None), scheme
