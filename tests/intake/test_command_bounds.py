"""The bounds intake enforces for later stages (#12.7, #13.3): nesting, recipients, header-bound
text, control characters, the shared header-name rule, and numbers compared by value in the
idempotency fingerprint."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mailtrio import commands, message
from tests.intake.conftest import entry, payload, rendered_payload
from tests.intake.test_commands import accepted, code_of


def nested(depth: int) -> Any:
    """A value that makes the payload `depth` levels deep when it is a value of `variables` (the
    payload object is level 1, `variables` level 2)."""
    value: Any = "leaf"
    for i in range(depth - 2):
        value = [value] if i % 2 else {"k": value}
    return value


def test_nesting_at_the_limit_is_accepted_and_one_more_level_is_not() -> None:
    accepted(entry(payload_obj=payload(variables={"code": "1", "deep": nested(commands.MAX_DEPTH)})))
    assert code_of(entry(payload_obj=payload(variables={"code": "1", "deep": nested(commands.MAX_DEPTH + 1)}))) \
        == "invalid_field"
    # far deeper than any parser's own limit: still invalid_field, never a crash
    assert code_of(entry(payload='{"to": ["a@example.com"], "v": ' + "[" * 5000 + "]" * 5000 + "}")) \
        == "invalid_field"


def test_many_brackets_inside_strings_are_not_nesting() -> None:
    accepted(entry(payload_obj=payload(variables={"code": "[" * 200 + "{" * 200})))


def test_recipient_total_over_100_is_invalid_recipient() -> None:
    to = [f"t{i}@example.com" for i in range(50)]
    cc = [f"c{i}@example.com" for i in range(30)]
    accepted(entry(payload_obj=payload(to=to, cc=cc, bcc=[f"b{i}@example.com" for i in range(20)])))
    assert code_of(entry(payload_obj=payload(to=to, cc=cc, bcc=[f"b{i}@example.com" for i in range(21)]))) \
        == "invalid_recipient"


@pytest.mark.parametrize(
    ("body", "mode"),
    [
        (rendered_payload(subject="s" * (commands.MAX_SUBJECT + 1)), "rendered"),
        (payload(to=[{"email": "a@example.com", "name": "n" * (commands.MAX_NAME + 1)}]), "template"),
        (payload(reply_to={"email": "a@example.com", "name": "n" * (commands.MAX_NAME + 1)}), "template"),
        (payload(headers={"X-Long": "v" * (commands.MAX_HEADER_VALUE + 1)}), "template"),
        (payload(headers={f"X-H{i}": "v" for i in range(commands.MAX_HEADERS + 1)}), "template"),
        (payload(headers={"X-" + "n" * 75: "v"}), "template"),
        # a structured value whose URL cannot be folded within a line
        (payload(headers={"List-Unsubscribe": "<https://example.com/" + "u" * 990 + ">"}), "template"),
        (payload(headers={"List-Unsubscribe": "<https://example.com/ü>"}), "template"),
    ],
)
def test_header_bound_text_beyond_what_folds_is_invalid_field(body: dict[str, Any], mode: str) -> None:
    assert code_of(entry(payload_mode=mode, payload_obj=body)) == "invalid_field"


def test_header_bound_text_at_the_limits_is_accepted() -> None:
    accepted(entry(payload_mode="rendered", payload_obj=rendered_payload(
        subject="é" * commands.MAX_SUBJECT,
        to=[{"email": "a@example.com", "name": "ü" * commands.MAX_NAME}],
        headers={"X-Long": "v" * commands.MAX_HEADER_VALUE, "x-" + "n" * 74: "lower-case name",
                 "List-Unsubscribe": "<https://example.com/" + "u" * 900 + ">, <mailto:u@example.com>"},
    )))


@pytest.mark.parametrize("char", [*(chr(c) for c in range(0x20) if c != 0x09), "\x7f"])
@pytest.mark.parametrize("where", ["subject", "header", "name", "email", "reply_name", "header_name"])
def test_every_c0_control_but_tab_and_del_is_unsafe(char: str, where: str) -> None:
    bad = f"a{char}b"
    body = rendered_payload()
    if where == "subject":
        body["subject"] = bad
    elif where == "header":
        body["headers"] = {"X-A": bad}
    elif where == "header_name":
        body["headers"] = {f"X-{bad}": "v"}
    elif where == "name":
        body["to"] = [{"email": "a@example.com", "name": bad}]
    elif where == "email":
        body["to"] = [f"{bad}@example.com"]
    else:
        body["reply_to"] = {"email": "a@example.com", "name": bad}
    assert code_of(entry(payload_mode="rendered", payload_obj=body)) == "unsafe_header"


def test_tab_is_allowed_in_header_text() -> None:
    accepted(entry(payload_mode="rendered", payload_obj=rendered_payload(
        subject="a\tb", headers={"X-A": "x\ty"}, to=[{"email": "a@example.com", "name": "A\tB"}])))


@pytest.mark.parametrize(
    "name",
    ["X-A", "x-a", "X-Custom_Thing.1", "List-Unsubscribe", "list-unsubscribe-post", "LIST-UNSUBSCRIBE",
     "X-", "Subject", "Bcc", "X-A B", "X-A:B", "Xa", "X-" + "n" * 74, "X-" + "n" * 75, "X-é"],
)
def test_intake_and_builder_share_one_header_name_rule(name: str) -> None:
    out = commands.validate("1-1", {k.encode(): v.encode() for k, v in entry(
        payload_obj=payload(headers={name: "v"})).items()}, now=commands.datetime.now(commands.UTC),
        has_template=lambda _: True)
    intake_ok = isinstance(out, commands.Command)
    assert intake_ok == message.header_name_allowed(name)
    content = message.Content("s", "b", None, {name: "v"}, "en")
    if intake_ok:
        content.validate()  # never refused later for its header names
    else:
        with pytest.raises(message.ContentError):
            content.validate()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ('{"n": 1}', '{"n": 1.0}'),
        ('{"n": 1e20}', '{"n": 100000000000000000000.0}'),
        ('{"n": 100000000000000000000}', '{"n": 1E20}'),
        ('{"n": [0, -0.0, 2.50]}', '{"n": [0.0, 0, 2.5]}'),
    ],
)
def test_numbers_are_compared_by_value_in_the_fingerprint(a: str, b: str) -> None:
    def cmd(variables: str) -> commands.Command:
        text = '{"template_id": "login-code", "to": ["a@example.com"], "variables": ' + variables + "}"
        return accepted(entry(delivery_id="d-1", payload=text))

    assert cmd(a).fingerprint == cmd(b).fingerprint
    assert cmd(a).fingerprint != cmd('{"n": 2}').fingerprint
    assert cmd('{"n": 0.5}').fingerprint != cmd('{"n": 0.25}').fingerprint
    # the stored payload keeps what the producer sent
    assert json.loads(cmd(a).payload_json)["variables"] == json.loads(a)
