"""The cheap tests validation runs on the canonical payload text before the walks they spare:
each must pass whenever the walk would find something (hypothesis over arbitrary payloads)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailtrio import commands

_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), _text)
_value = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(_text, inner, max_size=4)), max_leaves=25)
_recipient = st.one_of(_text, st.dictionaries(st.sampled_from(["email", "name"]), _value, max_size=2), _value)
_payload = st.fixed_dictionaries(
    {},
    optional={
        "to": st.one_of(st.lists(_recipient, max_size=3), _value),
        "cc": st.one_of(st.lists(_recipient, max_size=3), _value),
        "bcc": st.one_of(st.lists(_recipient, max_size=3), _value),
        "reply_to": _recipient,
        "subject": st.one_of(_text, _value),
        "headers": st.one_of(st.dictionaries(_text, st.one_of(_text, _value), max_size=3), _value),
        "variables": _value,
    },
)


def _parsed(payload: dict[str, Any]) -> tuple[Any, bytes]:
    """The payload as validation reads it (either JSON path) and its canonical text."""
    value, _, text = commands._parse(json.dumps(payload).encode())
    return value, text


@settings(max_examples=500, deadline=None)
@given(_payload)
def test_an_unsafe_character_always_shows_in_the_canonical_text(payload: dict[str, Any]) -> None:
    payload, text = _parsed(payload)
    try:
        commands._check_unsafe(payload)
    except commands._Reject:
        assert b"\\" in text or b"\x7f" in text


@settings(max_examples=500, deadline=None)
@given(_value)
def test_a_float_or_deep_nesting_always_shows_in_the_canonical_text(value: Any) -> None:
    payload, text = _parsed({"variables": value})
    shape = text.translate(commands._SHAPE)
    gate = shape.count(b"[") > commands.MAX_DEPTH or b"0." in shape

    def has_float(v: Any) -> bool:
        if isinstance(v, float):
            return True
        if isinstance(v, dict):
            return any(has_float(x) for x in v.values())
        if isinstance(v, list):
            return any(has_float(x) for x in v)
        return False

    if has_float(payload):
        assert gate
    assert commands._check_depth(payload, text) == has_float(payload)


@pytest.mark.parametrize("depth", [commands.MAX_DEPTH - 1, commands.MAX_DEPTH, commands.MAX_DEPTH + 1])
def test_nesting_bound_through_the_shape_gate(depth: int) -> None:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    payload, text = _parsed({"variables": value})  # the payload object itself is level 1
    if depth + 1 > commands.MAX_DEPTH:
        with pytest.raises(commands._Reject):
            commands._check_depth(payload, text)
    else:
        assert commands._check_depth(payload, text) is False
