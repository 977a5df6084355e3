"""Choose the provider for MAIL_SMTP_MODE."""

from __future__ import annotations

from mailtrio.config import Settings
from mailtrio.providers.base import Provider


def build_provider(settings: Settings) -> Provider:
    if settings.smtp_mode == "stub":
        from mailtrio.providers.stub import StubProvider

        return StubProvider()
    from mailtrio.providers.smtp import SmtpProvider

    return SmtpProvider(settings)
