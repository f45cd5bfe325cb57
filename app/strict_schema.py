"""OpenAI's `strict: true` on a JSON schema: objects admit only the properties they list.

OpenAI refuses a strict schema whose objects do not say `additionalProperties: false`; vLLM
accepts it and ignores `strict`. Plain JSON Schema lets such an object take any other key, and
the constrained output of a model that does not end the object by itself (a small or unsure
one) then runs on with invented keys until max_tokens. Here a strict schema closes the objects
that list their properties, and only those whose keys all come from that list: an object that
says `additionalProperties` (or pattern/unevaluated properties) keeps what it says, a free-form
`{"type": "object"}` stays free, and an object whose keys also come from elsewhere (`$ref`,
`allOf`/`anyOf`/`oneOf` branches) stays open, since closing it would refuse those keys. Nothing
is closed under `not` or `if`/`then`/`else`, where closing would change which instances match.
"""

from __future__ import annotations

import json
from typing import Any

_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_VALUES = ("items", "additionalProperties", "contains")
_KEYS_FROM_ELSEWHERE = ("$ref", "allOf", "anyOf", "oneOf", "dependentSchemas", "if")


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` (a dict, or its JSON text) with objects closed; anything else as it is
    (the grammar compiler reports what is wrong with it)."""
    if isinstance(schema, str):
        try:
            parsed = json.loads(schema)
        except ValueError:
            return schema
        return json.dumps(_closed(parsed)) if isinstance(parsed, dict) else schema
    return _closed(schema) if isinstance(schema, dict) else schema


def _closable(schema: dict[str, Any]) -> bool:
    return (
        isinstance(schema.get("properties"), dict)
        and not any(key in schema for key in _OPEN_KEYS)
        and not any(key in schema for key in _KEYS_FROM_ELSEWHERE)
    )


def _closed(schema: dict[str, Any], *, close_self: bool = True) -> dict[str, Any]:
    out = dict(schema)
    # Branches of a union under an object that lists properties of its own complete that object:
    # closing a branch would refuse the parent's keys. Their nested objects are still closed.
    branches_whole = "properties" not in out
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(s) if isinstance(s, dict) else s for name, s in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            whole = branches_whole or key == "prefixItems"
            out[key] = [_closed(s, close_self=whole) if isinstance(s, dict) else s for s in out[key]]
    for key in _SCHEMA_VALUES:
        value = out.get(key)
        if isinstance(value, dict):
            out[key] = _closed(value)
        elif key == "items" and isinstance(value, list):
            out[key] = [_closed(s) if isinstance(s, dict) else s for s in value]
    if close_self and _closable(out):
        out["additionalProperties"] = False
    return out
