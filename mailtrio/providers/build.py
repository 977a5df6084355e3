"""Choose the provider for MAIL_SMTP_MODE."""

from __future__ import annotations

from typing import Any

from mailtrio.config import Settings


def build_provider(settings: Settings) -> Any:
    return None
