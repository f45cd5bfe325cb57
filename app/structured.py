"""Output constraints of a request -> one `GrammarSpec` for the engine's grammar (llguidance).

Three spellings reach the same engine: OpenAI's `response_format`, vLLM's legacy `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` (Lark, as llguidance reads it) with
`guided_whitespace_pattern`, and vLLM's current `structured_outputs: {json, regex, choice, grammar,
json_object, whitespace_pattern}`. A request states at most one constraint: two would either
contradict or leave the server to pick one silently, so both are refused. Forced tool calls are a
constraint of their own (`app.translate`) and combine with none of these.
"""

from __future__ import annotations

import json
import re
import string
import warnings
from typing import Any

import msgspec

from app.schemas.structured import MAX_GRAMMAR_CHARS, ResponseFormat, StructuredFields
from app.strict_schema import closed_objects
from scheduler.errors import InvalidRequestError
from scheduler.request import GrammarSpec


def output_grammar(req: StructuredFields, *, forced_tool_calls: bool = False) -> GrammarSpec | None:
    """What the output must match, from whichever constraint field the request set; None: free text."""
    found = [(param, spec) for param, spec in _constraints(req) if spec is not None]
    if len(found) > 1:
        first, second = found[0][0], found[1][0]
        raise InvalidRequestError(
            f"{first} and {second} are both set; a request may constrain its output in one way only",
            param=second,
        )
    pattern, pattern_param = _whitespace_pattern(req)
    if not found:
        if pattern is not None:
            raise InvalidRequestError(
                f"{pattern_param} applies to JSON output only; no JSON constraint is set", param=pattern_param
            )
        return None
    param, spec = found[0]
    if forced_tool_calls:
        raise InvalidRequestError(
            f"{param} cannot be combined with tool_choice 'required' or a named function", param=param
        )
    if pattern is not None:
        if spec.kind not in ("json_schema", "json_object"):
            raise InvalidRequestError(
                f"{pattern_param} applies to JSON output only, not to {param}", param=pattern_param
            )
        _check_whitespace_only(pattern, pattern_param)
        spec = GrammarSpec(spec.kind, spec.source, param=spec.param, whitespace_pattern=pattern)
    return spec


def _check_whitespace_only(pattern: str, param: str) -> None:
    """A whitespace pattern that matches other characters (`[a-z]{0,3}`, `.*`) put them between
    JSON tokens: the output no longer parsed, and still finished with "stop". Checked on single
    characters with Python's regex engine (llguidance's is Rust's: a pattern Python cannot read
    is left to it)."""
    try:
        with warnings.catch_warnings():
            # "Possible nested set": POSIX classes and set operations, which Rust reads otherwise.
            warnings.simplefilter("error")
            compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError, Warning):
        return
    stray = next((c for c in string.printable if not c.isspace() and compiled.fullmatch(c)), None)
    if stray is not None:
        raise InvalidRequestError(
            f"{param} matches {stray!r}, which is not whitespace: the output would not be JSON",
            param=param,
        )


def _constraints(req: StructuredFields) -> list[tuple[str, GrammarSpec | None]]:
    so = req.structured_outputs
    found = [("response_format", _response_format(req.response_format))]
    found += [
        ("guided_json", _json_schema(req.guided_json, "guided_json")),
        ("guided_regex", _text("regex", req.guided_regex, "guided_regex")),
        ("guided_choice", _choice(req.guided_choice, "guided_choice")),
        ("guided_grammar", _text("lark", req.guided_grammar, "guided_grammar")),
    ]
    if so is not None:
        found += [
            ("structured_outputs.json", _json_schema(so.json, "structured_outputs.json")),
            ("structured_outputs.regex", _text("regex", so.regex, "structured_outputs.regex")),
            ("structured_outputs.choice", _choice(so.choice, "structured_outputs.choice")),
            ("structured_outputs.grammar", _text("lark", so.grammar, "structured_outputs.grammar")),
            (
                "structured_outputs.json_object",
                GrammarSpec("json_object", param="structured_outputs.json_object")
                if so.json_object
                else None,
            ),
        ]
    return found


def _whitespace_pattern(req: StructuredFields) -> tuple[str | None, str]:
    so = req.structured_outputs
    nested = so.whitespace_pattern if so is not None else None
    if req.guided_whitespace_pattern is not None and nested is not None:
        raise InvalidRequestError(
            "guided_whitespace_pattern and structured_outputs.whitespace_pattern are both set",
            param="structured_outputs.whitespace_pattern",
        )
    if nested is not None:
        return nested, "structured_outputs.whitespace_pattern"
    return req.guided_whitespace_pattern, "guided_whitespace_pattern"


def _response_format(response_format: ResponseFormat | None) -> GrammarSpec | None:
    if response_format is not None and response_format.type != "json_schema" and response_format.json_schema:
        # The client believes its schema is enforced; with this type it would be dropped.
        raise InvalidRequestError(
            f"response_format.json_schema is set but type is '{response_format.type}': "
            "use type 'json_schema' for the schema to apply",
            param="response_format.type",
        )
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return GrammarSpec("json_object")
    if response_format.json_schema is None or response_format.json_schema.schema is None:
        raise InvalidRequestError(
            "response_format of type json_schema needs json_schema.schema", param="response_format"
        )
    schema = response_format.json_schema.schema
    if response_format.json_schema.strict:
        schema = closed_objects(schema)  # objects admit only the properties they list, as at OpenAI
    return _json_schema(schema, "response_format")


def _json_schema(schema: dict[str, Any] | str | None, param: str) -> GrammarSpec | None:
    if schema is None:
        return None
    # A schema sent as JSON text is parsed by the compiler, which names `param` if it is not JSON.
    text = schema if isinstance(schema, str) else check_size(schema, param)
    return GrammarSpec("json_schema", text, param=param)


def _text(kind: str, source: str | None, param: str) -> GrammarSpec | None:
    return None if source is None else GrammarSpec(kind, source, param=param)  # type: ignore[arg-type]


def _choice(choices: list[str] | None, param: str) -> GrammarSpec | None:
    if choices is None:
        return None
    return GrammarSpec("choice", check_size(choices, param), param=param)


def check_size(value: Any, param: str) -> str:
    """`value` as JSON, refused when it is too big to render or compile every request."""
    text = json.dumps(msgspec.to_builtins(value))
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidRequestError(
            f"{param} is {len(text)} characters of JSON; at most {MAX_GRAMMAR_CHARS} are accepted",
            param=param,
        )
    return text
