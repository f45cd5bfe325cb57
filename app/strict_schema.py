"""OpenAI's `strict: true` on a JSON schema: objects admit only the properties they list.

OpenAI refuses a strict schema whose objects do not say `additionalProperties: false`; vLLM
accepts it and ignores `strict`. Plain JSON Schema lets such an object take any other key, and
the constrained output of a model that does not end the object by itself (a small or unsure
one) then runs on with invented keys until max_tokens. Here a strict schema means what it means
at OpenAI: an object without `additionalProperties` is closed. Objects that say otherwise keep
what they say, and `allOf` branches are left open (closing each part of a composition would
refuse the other parts' properties).
"""

from __future__ import annotations

import json
from typing import Any

_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_VALUES = ("items", "not", "if", "then", "else", "additionalProperties", "contains")


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


def _is_object(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in schema


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(s) if isinstance(s, dict) else s for name, s in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(s) if isinstance(s, dict) else s for s in out[key]]
    for key in _SCHEMA_VALUES:
        value = out.get(key)
        if isinstance(value, dict):
            out[key] = _closed(value)
        elif key == "items" and isinstance(value, list):
            out[key] = [_closed(s) if isinstance(s, dict) else s for s in value]
    if _is_object(out) and not any(key in out for key in _OPEN_KEYS):
        out["additionalProperties"] = False
    return out
