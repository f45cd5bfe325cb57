"""Structured-output wire types: OpenAI's `response_format` and vLLM's two spellings of the same
constraints (the legacy `guided_*` fields and the current `structured_outputs` object).

`app.structured` turns them into one grammar; these Structs only bound what may be sent.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from app.schemas.common import JSONObject

# Regexes, grammars, JSON schemas and tool lists are rendered or compiled per request: bounded.
MAX_GRAMMAR_CHARS = 256 * 1024
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 4096
GrammarText = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_GRAMMAR_CHARS)]
Choices = Annotated[
    list[Annotated[str, msgspec.Meta(max_length=MAX_CHOICE_CHARS)]],
    msgspec.Meta(min_length=1, max_length=MAX_CHOICES),
]
# vLLM takes the schema as an object or as its JSON text.
JsonSchemaValue = JSONObject | GrammarText


class JsonSchemaFormat(msgspec.Struct):
    # Any name, as vLLM takes it (OpenAI's 1-64 of A-Z a-z 0-9 _ - would refuse the openai SDK's
    # `parse()` of a generic pydantic model, "Page[Item]"): it changes nothing in the output.
    name: str = "response"
    schema: JSONObject | None = None
    description: str | None = None
    # Accepted either way: the output is always constrained to the schema.
    strict: bool | None = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's `structured_outputs`. Its other members (`structural_tag`,
    `disable_additional_properties`) change the output and are not implemented: unknown fields
    are refused here rather than ignored."""

    json: JsonSchemaValue | None = None
    regex: GrammarText | None = None
    choice: Choices | None = None
    grammar: GrammarText | None = None
    json_object: bool | None = None
    whitespace_pattern: GrammarText | None = None
    # What this server does anyway: JSON without free whitespace (unless whitespace_pattern).
    disable_any_whitespace: bool = False
    # Backend selection only; llguidance has no fallback to disable.
    disable_fallback: bool = False


class StructuredFields(msgspec.Struct, kw_only=True):
    """The constraint fields chat and completions requests share."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchemaValue | None = None
    guided_regex: GrammarText | None = None
    guided_choice: Choices | None = None
    guided_grammar: GrammarText | None = None
    guided_whitespace_pattern: GrammarText | None = None

    def constrains_output(self) -> bool:
        """Whether a field here restricts what the model may write (no room for free text)."""
        so = self.structured_outputs
        return (
            (self.response_format is not None and self.response_format.type != "text")
            or any(
                v is not None
                for v in (self.guided_json, self.guided_regex, self.guided_choice, self.guided_grammar)
            )
            or (
                so is not None
                and (
                    any(v is not None for v in (so.json, so.regex, so.choice, so.grammar))
                    or bool(so.json_object)
                )
            )
        )
