"""Help that teaches: every command's --help says what it does, the variables it reads and its
exit codes."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from mailtrio import enums
from mailtrio.cli import build_parser
from mailtrio.config import VARIABLES
from tests.foundation.conftest import run_cli
from tests.support.serve import base_env


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                             argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def test_every_command_documents_variables_and_exit_codes() -> None:
    found = dict(_commands(build_parser()))
    assert {" ".join(p) for p in found} >= {
        "serve", "check", "migrate", "templates", "templates check", "enqueue", "deliveries", "deliveries list",
        "deliveries show", "deliveries retry", "deliveries cancel", "dead-letters", "dead-letters list",
        "dead-letters retry", "malformed", "malformed list", "schedule", "events", "events tail"}
    for path, parser in found.items():
        text = parser.format_help()
        assert "variables" in text and "exit codes:" in text, path
        assert "  0  " in text and "  1  " in text and "  2  " in text, path
        assert parser.description, path
    serve = found[("serve",)].format_help()
    assert all(name in serve for name in VARIABLES) and "NOTIFY_SOCKET" in serve
    assert "MAIL_POSTGRES_PRIMARY_DSN" in found[("migrate",)].format_help()
    assert "MAIL_INTERNAL_HTTP_TOKEN" in found[("dead-letters", "retry")].format_help()
    tail = found[("events", "tail")].format_help()
    assert all(name in tail for name in ("MAIL_REDIS_MASTER_ADDR", "MAIL_REDIS_PASSWORD", "MAIL_REDIS_DB",
                                         "MAIL_REDIS_EVENT_STREAM"))
    assert ", ".join(enums.EVENT_TYPES) in tail  # the event types it prints, from the one enumeration


def test_help_runs_from_the_command_line() -> None:
    done = run_cli(["schedule", "--help"], base_env())
    assert done.code == 0 and "postqueue -p" in done.stdout and "MAIL_INTERNAL_HTTP_ADDR" in done.stdout
