"""/generate's TGI `parameters` -> the engine request (app.translate): what is implemented reaches
the engine, what is not is refused naming the field unless sent at a value that changes nothing.
Pure translation: no model."""

from __future__ import annotations

import json

import msgspec
import pytest

from app.media import ImageFetchPolicy
from app.schemas.generate import GenerateRequest
from app.settings import Settings
from app.translate import Translator
from scheduler.errors import InvalidRequestError

MAX_INPUT_TOKENS = 512
SCHEMA = {"type": "integer"}


def translate(**parameters):
    request = msgspec.convert({"inputs": "hi", "parameters": parameters}, GenerateRequest, strict=True)
    translator = Translator(Settings(max_input_tokens=MAX_INPUT_TOKENS), ImageFetchPolicy(), None)
    return translator.generate(request, "gen-1")


@pytest.mark.parametrize(
    "field, value",
    [
        ("details", True),
        ("decoder_input_details", True),
        ("top_n_tokens", 2),
        ("best_of", 2),
        ("typical_p", 0.5),
        ("watermark", True),
        ("adapter_id", "my-lora"),
        ("truncate", MAX_INPUT_TOKENS - 1),
    ],
)
def test_unimplemented_parameters_are_refused_naming_them(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        translate(**{field: value})
    assert info.value.param == f"parameters.{field}"
    assert f"parameters.{field} is not supported on /generate" in info.value.message


def test_values_that_change_nothing_are_accepted() -> None:
    request = translate(
        details=False,
        decoder_input_details=False,
        top_n_tokens=0,
        best_of=1,
        typical_p=1.0,
        watermark=False,
        adapter_id=None,
        truncate=MAX_INPUT_TOKENS,
        grammar=None,
        return_full_text=False,
        frequency_penalty=0.0,
    )
    assert request.params.grammar is None
    assert request.params.frequency_penalty == 0.0


def test_frequency_penalty_reaches_the_engine_within_chats_range() -> None:
    assert translate(frequency_penalty=1.5).params.frequency_penalty == 1.5
    with pytest.raises(msgspec.ValidationError, match="parameters.frequency_penalty"):
        translate(frequency_penalty=2.5)


@pytest.mark.parametrize(
    "grammar, kind, source",
    [
        ({"type": "json", "value": SCHEMA}, "json_schema", json.dumps(SCHEMA)),
        ({"type": "json", "value": json.dumps(SCHEMA)}, "json_schema", json.dumps(SCHEMA)),
        ({"type": "json_object", "value": SCHEMA}, "json_schema", json.dumps(SCHEMA)),
        (
            {"type": "json_schema", "value": {"name": "n", "schema": SCHEMA}},
            "json_schema",
            json.dumps(SCHEMA),
        ),
        ({"type": "regex", "value": "[0-9]{2}"}, "regex", "[0-9]{2}"),
    ],
)
def test_grammar_becomes_the_engine_grammar(grammar: dict, kind: str, source: str) -> None:
    spec = translate(grammar=grammar).params.grammar
    assert (spec.kind, spec.source, spec.param) == (kind, source, "parameters.grammar")


@pytest.mark.parametrize(
    "grammar",
    [
        {"type": "regex", "value": {"pattern": "a"}},
        {"type": "json_schema", "value": {"name": "no schema"}},
        {"type": "json_schema", "value": "{}"},
    ],
)
def test_grammar_of_the_wrong_shape_is_refused(grammar: dict) -> None:
    with pytest.raises(InvalidRequestError) as info:
        translate(grammar=grammar)
    assert info.value.param == "parameters.grammar"


def test_grammar_type_outside_tgis_is_a_validation_error() -> None:
    with pytest.raises(msgspec.ValidationError, match="parameters.grammar"):
        translate(grammar={"type": "lark", "value": 'start: "x"'})
