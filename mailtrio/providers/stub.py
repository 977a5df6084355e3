"""The stub provider (MAIL_SMTP_MODE=stub): nothing leaves the process (CONTRACT §5).

`authsession` deliveries end `suppressed` (attempt `suppressed`); `notification` deliveries end
`sent` (attempt `provider_accepted`, summary `stub`).
"""

from __future__ import annotations

from mailtrio.enums import Source
from mailtrio.providers.base import AttemptStatus, Envelope, Phase, SendReport

STUB_SUMMARY = "stub"
STUB_SUPPRESSED_SUMMARY = "stub: authsession deliveries are suppressed in stub mode"


class StubSession:
    phase = Phase.STUB
    handed_over = False

    async def send(self, envelope: Envelope, message: bytes) -> SendReport:
        if envelope.source == Source.AUTHSESSION:
            return SendReport(
                AttemptStatus.SUPPRESSED, STUB_SUPPRESSED_SUMMARY, Phase.STUB, suppressed=True
            )
        return SendReport(AttemptStatus.PROVIDER_ACCEPTED, STUB_SUMMARY, Phase.STUB)

    async def abort(self) -> None:
        return None

    async def close(self) -> None:
        return None


class StubProvider:
    name = "stub"

    def session(self) -> StubSession:
        return StubSession()
