"""The contract's error format: {"error": {"code": "...", "message": "..."}}."""

from __future__ import annotations

from typing import Any

STATUS_BY_CODE = {
    "invalid_argument": 400,
    "unauthorized": 401,
    "not_found": 404,
    "conflict": 409,
    "internal": 500,
}


class ApiError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = STATUS_BY_CODE[code]

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}
