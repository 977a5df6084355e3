"""Check response bodies against the schemas of the served OpenAPI document."""

from __future__ import annotations

from typing import Any

import jsonschema

from mailtrio.http import openapi

_DOC = openapi.document("/api/v1/internal", bearer=False)


def assert_conforms(schema_name: str, body: Any) -> None:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": _DOC["components"]}
    validator = jsonschema.Draft202012Validator
    validator(schema, format_checker=validator.FORMAT_CHECKER).validate(body)
