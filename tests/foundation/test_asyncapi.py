"""The AsyncAPI 3 document of the command stream is valid and cannot drift from the code.

It is validated against the official AsyncAPI 3.0.0 JSON Schema (`data/asyncapi-3.0.0.schema.json`,
from the `@asyncapi/specs` package, Apache-2.0), its schemas against JSON Schema draft-07, and it
is checked field by field against `mailtrio.commands`: every example must be accepted by the
validator the consumer runs, and every malformed example must get its documented failure code.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from mailtrio import __version__, commands
from mailtrio.catalog import Catalog
from mailtrio.config import VARIABLES
from tests.support.serve import TEMPLATES

DOC_PATH = Path(str(resources.files("mailtrio") / "api" / "delivery-commands-asyncapi.yaml"))
SPEC_SCHEMA = Path(__file__).parent / "data" / "asyncapi-3.0.0.schema.json"
NOW = datetime(2026, 11, 1, tzinfo=UTC)
CATALOG = Catalog.load(TEMPLATES, "en")


def _load() -> dict[str, Any]:
    loaded = yaml.safe_load(DOC_PATH.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


DOC = _load()


@pytest.fixture
def doc() -> dict[str, Any]:
    return json.loads(json.dumps(DOC))  # a private copy per test


def _schemas(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["components"]["schemas"]  # type: ignore[no-any-return]


def _validator(doc: dict[str, Any], name: str) -> jsonschema.Draft7Validator:
    """A draft-07 validator for one component schema, resolving the document's local $refs."""
    resource = Resource.from_contents(doc, default_specification=DRAFT7)
    registry: Registry[Any] = Registry().with_resource("urn:doc", resource)
    schema = {"$ref": f"urn:doc#/components/schemas/{name}"}
    checker = jsonschema.Draft7Validator.FORMAT_CHECKER
    return jsonschema.Draft7Validator(schema, registry=registry, format_checker=checker)


def _spec_validator() -> jsonschema.Draft7Validator:
    """The official AsyncAPI 3.0.0 schema; its definitions are registered under their own $id."""
    spec = json.loads(SPEC_SCHEMA.read_text(encoding="utf-8"))
    registry: Registry[Any] = Registry().with_resources(
        (uri, Resource.from_contents(sub, default_specification=DRAFT7)) for uri, sub in spec["definitions"].items()
    )
    return jsonschema.Draft7Validator(spec, registry=registry)


def _message(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["components"]["messages"]["DeliveryCommand"]  # type: ignore[no-any-return]


def _validate(fields: dict[str, str]) -> commands.Outcome:
    return commands.validate("1-0", fields, now=NOW, has_template=CATALOG.has_template)


# -- the document is a valid AsyncAPI 3 document ----------------------------------------------------


def test_document_is_valid_asyncapi_3(doc: dict[str, Any]) -> None:
    validator = _spec_validator()
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]


def test_the_validator_rejects_a_broken_document(doc: dict[str, Any]) -> None:
    """Counter-check: the official schema does catch mistakes (so the test above can fail)."""
    validator = _spec_validator()
    broken = json.loads(json.dumps(doc))
    broken["operations"]["consumeDeliveryCommands"]["action"] = "consume"
    assert list(validator.iter_errors(broken))
    broken = json.loads(json.dumps(doc))
    broken["channels"]["deliveryCommands"]["adress"] = broken["channels"]["deliveryCommands"].pop("address")
    assert list(validator.iter_errors(broken))


def test_component_schemas_are_valid_draft_07(doc: dict[str, Any]) -> None:
    assert len(_schemas(doc)) >= 7
    for schema in _schemas(doc).values():
        jsonschema.Draft7Validator.check_schema(schema)


def test_document_ships_in_the_package_and_names_this_version(doc: dict[str, Any]) -> None:
    assert doc["info"]["version"] == __version__
    assert DOC_PATH.is_file()


# -- the document agrees with the code --------------------------------------------------------------


def test_stream_and_group_defaults_match_configuration(doc: dict[str, Any]) -> None:
    assert doc["channels"]["deliveryCommands"]["address"] == VARIABLES["MAIL_REDIS_COMMAND_STREAM"][1]
    description = doc["info"]["description"]
    assert f"default `{VARIABLES['MAIL_REDIS_CONSUMER_GROUP'][1]}`" in description
    assert f"default `{VARIABLES['MAIL_REDIS_CLAIM_IDLE'][1]}`" in description
    assert f"default `{VARIABLES['MAIL_IDEMPOTENCY_TTL'][1]}`" in description
    assert doc["operations"]["consumeDeliveryCommands"]["action"] == "receive"
    for phrase in ("MKSTREAM", "stream command rejected", "stream command duplicate", "mail.stream_commands.malformed",
                   "mail.malformed_commands", "failure_code", "stream_entry_id", "traceparent"):
        assert phrase in description


def test_entry_fields_match_the_validator(doc: dict[str, Any]) -> None:
    entry = _schemas(doc)["DeliveryCommandEntry"]
    assert tuple(entry["required"]) == commands.REQUIRED_FIELDS
    assert set(entry["properties"]) == {*commands.REQUIRED_FIELDS, "send_at", "traceparent"}
    props = entry["properties"]
    assert all(p["type"] == "string" for p in props.values())
    assert tuple(props["source"]["enum"]) == commands.SOURCES
    assert tuple(props["payload_mode"]["enum"]) == commands.MODES
    assert props["delivery_id"]["pattern"] == f"^{commands._DELIVERY_ID_RE.pattern}$"
    assert props["locale"]["pattern"] == "^" + commands._LOCALE_RE.pattern.replace("(?:", "(") + "$"
    assert re.fullmatch(props["locale"]["pattern"].strip("^$"), "zh-Hant-TW")
    assert props["payload"]["x-max-bytes"] == commands.MAX_PAYLOAD_BYTES
    assert props["send_at"]["x-max-ahead-days"] == commands.MAX_SEND_AHEAD.days
    assert (props["idempotency_key"]["minLength"], props["idempotency_key"]["maxLength"]) == (1, 200)
    to = _schemas(doc)["ToRecipients"]
    assert (to["minItems"], to["maxItems"]) == (1, commands.MAX_TO)


def test_failure_codes_match_the_validator(doc: dict[str, Any]) -> None:
    documented = [item["code"] for item in _message(doc)["x-failure-codes"]]
    assert sorted(documented) == sorted(commands.FAILURE_CODES)
    assert documented[0] == "unsafe_header"  # checked first
    description = _message(doc)["description"]
    for code in commands.FAILURE_CODES:
        if code != "idempotency_conflict":
            assert f"`{code}`" in description


def test_examples_are_accepted_by_the_consumer_and_match_the_schemas(doc: dict[str, Any]) -> None:
    entry_schema = _validator(doc, "DeliveryCommandEntry")
    payload_schemas = {"template": _validator(doc, "TemplatePayload"), "rendered": _validator(doc, "RenderedPayload")}
    examples = _message(doc)["examples"]
    assert {json.loads(e["payload"]["payload"]).get("template_id") for e in examples} >= {"login-code", "newsletter"}
    assert {e["payload"]["payload_mode"] for e in examples} == set(commands.MODES)
    for example in examples:
        fields = example["payload"]
        entry_schema.validate(fields)
        payload_schemas[fields["payload_mode"]].validate(json.loads(fields["payload"]))
        outcome = _validate(fields)
        assert isinstance(outcome, commands.Command), (example["name"], outcome)
        assert outcome.delivery_id == fields["delivery_id"]


def test_malformed_examples_get_their_documented_code(doc: dict[str, Any]) -> None:
    entry_schema = _validator(doc, "DeliveryCommandEntry")
    payload_schemas = {"template": _validator(doc, "TemplatePayload"), "rendered": _validator(doc, "RenderedPayload")}
    examples = _message(doc)["x-malformed-examples"]
    assert len({e["failure_code"] for e in examples}) == len(examples)
    for example in examples:
        fields = example["payload"]
        outcome = _validate(fields)
        assert isinstance(outcome, commands.Malformed), example
        assert outcome.failure_code == example["failure_code"], (example, outcome)
        # the schemas reject them too, except what only the catalog knows
        if example["failure_code"] == "unknown_template":
            continue
        try:
            body = json.loads(fields["payload"])
        except ValueError:
            body = None
        schema_ok = entry_schema.is_valid(fields) and (
            isinstance(body, dict) and payload_schemas[fields["payload_mode"]].is_valid(body)
        )
        assert not schema_ok, example


@settings(deadline=None, max_examples=50)
@given(
    source=st.sampled_from(commands.SOURCES),
    delivery_id=st.from_regex(r"\A[A-Za-z0-9._:-]{1,128}\Z"),
    key=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=200),
    locale=st.sampled_from(["en", "fr", "fr-CA", "pt-BR", "zh-Hant-TW", "de-DE", "es-419"]),
    n_to=st.integers(1, 50),
)
def test_entries_the_schema_accepts_the_consumer_accepts(
    source: str, delivery_id: str, key: str, locale: str, n_to: int
) -> None:
    doc = DOC
    payload = {"template_id": "login-code", "to": [f"user{i}@example.com" for i in range(n_to)],
               "variables": {"code": "1"}}
    fields = {"delivery_id": delivery_id, "source": source, "idempotency_key": key, "payload_mode": "template",
              "locale": locale, "payload": json.dumps(payload)}
    _validator(doc, "DeliveryCommandEntry").validate(fields)
    _validator(doc, "TemplatePayload").validate(payload)
    assert isinstance(_validate(fields), commands.Command)
    too_many = {**payload, "to": [f"u{i}@example.com" for i in range(commands.MAX_TO + 1)]}
    assert not _validator(doc, "TemplatePayload").is_valid(too_many)
    outcome = _validate({**fields, "payload": json.dumps(too_many)})
    assert isinstance(outcome, commands.Malformed) and outcome.failure_code == "invalid_recipient"


@pytest.mark.parametrize(
    ("name", "allowed"),
    [("X-Campaign", True), ("x-a", True), ("List-Unsubscribe", True), ("list-unsubscribe-post", True),
     ("X-", False), ("Bcc", False), ("Subject", False), ("List-Help", False), ("X Bad", False)],
)
def test_header_allow_list_matches_the_validator(doc: dict[str, Any], name: str, allowed: bool) -> None:
    payload = {"template_id": "newsletter", "to": ["a@example.com"], "headers": {name: "v"},
               "variables": {"title": "t", "intro": "i"}}
    assert _validator(doc, "TemplatePayload").is_valid(payload) is allowed
    outcome = _validate({"delivery_id": "h-1", "source": "notification", "idempotency_key": "h-1",
                         "payload_mode": "template", "locale": "en", "payload": json.dumps(payload)})
    assert isinstance(outcome, commands.Command) is allowed, outcome
