"""The AsyncAPI document's event message, as a validator for the entries the service publishes."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

DOC_PATH = Path(str(resources.files("mailtrio") / "api" / "delivery-commands-asyncapi.yaml"))
DOC: dict[str, Any] = yaml.safe_load(DOC_PATH.read_text(encoding="utf-8"))


def event_validator() -> jsonschema.Draft7Validator:
    resource = Resource.from_contents(DOC, default_specification=DRAFT7)
    registry: Registry[Any] = Registry().with_resource("urn:doc", resource)
    return jsonschema.Draft7Validator({"$ref": "urn:doc#/components/schemas/DeliveryEventEntry"},
                                      registry=registry, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def assert_documented(entry: dict[str, str]) -> None:
    """A stream entry (with or without the `id` a reader adds) matches the documented message."""
    fields = {k: v for k, v in entry.items() if k != "id"}
    errors = [e.message for e in event_validator().iter_errors(fields)]
    assert not errors, (fields, errors)
