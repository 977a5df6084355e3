"""Fixtures of the outcome-event tests: the engine tests' SMTP server factory."""

from tests.engine.conftest import smtp_factory

__all__ = ["smtp_factory"]
