"""A small blocking client of the internal HTTP API (urllib: no dependency beyond the stdlib).

Every failure the operator must act on becomes an `OpsError` with one line of text: the service
is unreachable, the token is missing or wrong, the service answered something that is not the
API. Other API errors (`404 not_found`, `409 conflict`, ...) come back as `ApiAnswer`s for the
caller to report per item.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mailtrio.config import parse_hostport

PREFIX = "/api/v1/internal"
DEFAULT_ADDR = "127.0.0.1:8080"
DEFAULT_TIMEOUT = 15.0


class OpsError(Exception):
    """A failure that stops the command: one line for the operator."""


class UsageError(OpsError):
    """Bad flags or variables (exit code 2)."""


@dataclass(frozen=True)
class ApiAnswer:
    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error_code(self) -> str:
        err = self.body.get("error") if isinstance(self.body, dict) else None
        return str(err.get("code", "")) if isinstance(err, dict) else ""

    @property
    def error_message(self) -> str:
        err = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(err, dict):
            return str(err.get("message", ""))
        return f"HTTP {self.status}"


def base_url(addr: str) -> str:
    """`http://host:port` for a `MAIL_INTERNAL_HTTP_ADDR` value (or an http(s) URL as given).

    A wildcard bind (`0.0.0.0`, `[::]`) is reached on the loopback address of its family."""
    text = addr.strip()
    if text.startswith(("http://", "https://")):
        return text.rstrip("/")
    try:
        host, port = parse_hostport(text)
    except ValueError as exc:
        raise UsageError(f"MAIL_INTERNAL_HTTP_ADDR / --addr: {exc}") from None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and ip.is_unspecified:
        host = "127.0.0.1" if ip.version == 4 else "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class ApiClient:
    def __init__(self, addr: str, token: str | None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base = base_url(addr)
        self.token = token or None
        self.timeout = timeout
        # The internal API is never reached through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method: str, path: str, query: Mapping[str, Any] | None = None) -> ApiAnswer:
        params = {k: str(v) for k, v in (query or {}).items() if v is not None and v != ""}
        url = f"{self.base}{PREFIX}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        req = urllib.request.Request(url, method=method, headers={"Accept": "application/json"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, (TimeoutError, socket.timeout)):
                why = f"no answer within {self.timeout:.0f}s"
            else:
                why = " ".join(str(reason).split()) or type(reason).__name__
            raise OpsError(f"cannot reach the internal API at {self.base}: {why} "
                           "(is `mailtrio serve` running? check MAIL_INTERNAL_HTTP_ADDR or --addr)") from None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            raise OpsError(f"{self.base} did not answer with the internal API's JSON (HTTP {status}); "
                           "check MAIL_INTERNAL_HTTP_ADDR or --addr") from None
        answer = ApiAnswer(status, body)
        if status == 401:
            if self.token:
                raise OpsError("the internal API refused the token (401): check MAIL_INTERNAL_HTTP_TOKEN or --token")
            raise OpsError("the internal API requires a bearer token (401): set MAIL_INTERNAL_HTTP_TOKEN or --token")
        if status >= 500:
            raise OpsError(f"the internal API failed ({status} {answer.error_code or 'error'}): "
                           f"{answer.error_message}")
        return answer

    def get(self, path: str, query: Mapping[str, Any] | None = None) -> Any:
        """GET that must succeed; any API error stops the command."""
        answer = self.request("GET", path, query)
        if not answer.ok:
            raise OpsError(f"{answer.error_code or answer.status}: {answer.error_message}")
        return answer.body

    def pages(self, path: str, query: Mapping[str, Any], limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Up to `limit` items of a keyset-paginated listing; and whether more remain."""
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page_size = min(500, limit - len(items))
            body = self.get(path, {**query, "limit": page_size, "cursor": cursor})
            items.extend(body["items"])
            cursor = body.get("next_cursor")
            if cursor is None:
                return items, False
            if len(items) >= limit:
                return items, True
