"""`strict: true` closes a schema's objects to the properties they list, as OpenAI's strict mode
requires them to be; what a schema says itself is kept."""

from __future__ import annotations

import json

from app.strict_schema import closed_objects


def test_objects_everywhere_in_the_schema_are_closed() -> None:
    schema = {
        "type": "object",
        "properties": {
            "point": {"type": "object", "properties": {"x": {"type": "number"}}},
            "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
            "either": {"anyOf": [{"$ref": "#/$defs/Leaf"}, {"type": "null"}]},
            "maybe": {"type": ["object", "null"], "properties": {"y": {"type": "integer"}}},
        },
        "$defs": {"Leaf": {"properties": {"v": {"type": "boolean"}}}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    props = closed["properties"]
    assert props["point"]["additionalProperties"] is False
    assert props["tags"]["items"]["additionalProperties"] is False
    assert props["maybe"]["additionalProperties"] is False
    assert closed["$defs"]["Leaf"]["additionalProperties"] is False
    assert "additionalProperties" not in props["either"]["anyOf"][1]  # not an object
    assert (
        "additionalProperties" not in schema and "additionalProperties" not in schema["$defs"]["Leaf"]
    )  # a copy


def test_what_the_schema_says_is_kept_and_compositions_are_left_open() -> None:
    schema = {
        "type": "object",
        "properties": {
            "free": {"type": "object", "additionalProperties": True},
            "typed": {"type": "object", "additionalProperties": {"type": "object", "properties": {"z": {}}}},
            "patterned": {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
            "merged": {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},
        },
    }
    props = closed_objects(schema)["properties"]
    assert props["free"]["additionalProperties"] is True
    assert props["typed"]["additionalProperties"]["additionalProperties"] is False  # the values' own objects
    assert "additionalProperties" not in props["patterned"]
    assert all("additionalProperties" not in part for part in props["merged"]["allOf"])


def test_a_schema_as_json_text_and_anything_else() -> None:
    text = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert json.loads(closed_objects(text))["additionalProperties"] is False
    assert closed_objects("{not json") == "{not json"
    assert closed_objects(None) is None and closed_objects(True) is True


def test_objects_whose_keys_come_from_elsewhere_stay_open() -> None:
    """Closing these made ordinary strict schemas unsatisfiable (a 400) or looser: an object whose
    properties come from allOf/anyOf branches or a $ref, a union's branches under an object that
    lists its own properties, and anything under not/if."""
    branch = {"properties": {"a": {"type": "integer"}}, "required": ["a"]}
    composed = {"type": "object", "allOf": [branch, {"properties": {"b": {"type": "string"}}}]}
    assert closed_objects(composed) == composed
    assert closed_objects({"type": "object", "anyOf": [branch]}) == {
        "type": "object",
        "anyOf": [{**branch, "additionalProperties": False}],  # a whole object: its own keys only
    }
    union = {
        "type": "object",
        "properties": {"kind": {"enum": ["a", "b"]}},
        "oneOf": [{"properties": {"kind": {"const": "a"}, "x": {"type": "integer"}}}],
    }
    closed_union = closed_objects(union)
    assert (
        "additionalProperties" not in closed_union and "additionalProperties" not in closed_union["oneOf"][0]
    )
    with_ref = {"$ref": "#/$defs/A", "properties": {"extra": {}}}
    assert "additionalProperties" not in closed_objects(with_ref)
    conditional = {
        "type": "object",
        "properties": {"kind": {}},
        "if": {"properties": {"kind": {"const": "a"}}},
        "then": {"properties": {"y": {}}},
        "not": {"properties": {"z": {}}},
    }
    assert closed_objects(conditional) == conditional
    free = {"type": "object", "properties": {"meta": {"type": "object"}}}
    assert closed_objects(free)["properties"]["meta"] == {"type": "object"}  # free-form stays free
