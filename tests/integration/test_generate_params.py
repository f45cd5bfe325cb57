"""POST /generate's TGI `parameters` against the real server: nothing a client sends is dropped
silently. `return_full_text`, `frequency_penalty` and `grammar` act as in TGI; the parameters this
server does not implement are a 400 naming them, unless sent at a value that changes nothing (as
huggingface_hub's `InferenceClient.text_generation` sends them).

The tiny model writes noise; whatever it prefers, a grammar decides what comes out."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Server
from tests.integration.helpers import assert_openai_error

INPUTS = "The quick brown fox"
GREEDY = {"max_new_tokens": 8, "do_sample": False}
# What huggingface_hub's text_generation sends by default (its None values are left out).
NEUTRAL = {
    "details": False,
    "decoder_input_details": False,
    "watermark": False,
    "best_of": 1,
    "top_n_tokens": 0,
    "typical_p": 1.0,
    "adapter_id": None,
    "grammar": None,
    "return_full_text": False,
    "frequency_penalty": 0.0,
    "truncate": None,
}
REFUSED = [
    ("details", True),
    ("decoder_input_details", True),
    ("top_n_tokens", 3),
    ("best_of", 2),
    ("typical_p", 0.5),
    ("watermark", True),
    ("adapter_id", "some-lora"),
    ("truncate", 4),  # below the server's MAX_INPUT_TOKENS (16384)
]
NUMBER = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["n"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2}"


def generate(http: httpx.Client, inputs: str = INPUTS, stream: bool | None = None, **parameters: Any):
    body: dict[str, Any] = {"inputs": inputs, "parameters": parameters}
    if stream is not None:
        body["stream"] = stream
    return http.post("/generate", json=body)


def generated_text(http: httpx.Client, inputs: str = INPUTS, **parameters: Any) -> str:
    response = generate(http, inputs, **parameters)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


@pytest.mark.parametrize("field, value", REFUSED, ids=[name for name, _ in REFUSED])
def test_unimplemented_parameters_are_400s_naming_them(text_server: Server, field: str, value: Any) -> None:
    with text_server.http() as http:
        error = assert_openai_error(generate(http, **{field: value}), 400, param=f"parameters.{field}")
    assert f"parameters.{field}" in error["message"] and "not supported" in error["message"]


def test_the_probes_request_is_refused_not_answered_as_plain_text(text_server: Server) -> None:
    parameters = {
        "max_new_tokens": 3,
        "grammar": {"type": "json", "value": {"type": "integer"}},
        "return_full_text": True,
        "details": True,
    }
    with text_server.http() as http:
        assert_openai_error(generate(http, "hi", **parameters), 400, param="parameters.details")


def test_neutral_values_are_accepted_and_change_nothing(text_server: Server) -> None:
    with text_server.http() as http:
        plain = generated_text(http, **GREEDY)
        neutral = generated_text(http, **GREEDY, **{**NEUTRAL, "truncate": 16384})
    assert plain and neutral == plain


def test_return_full_text_prepends_the_inputs(text_server: Server) -> None:
    with text_server.http() as http:
        plain = generated_text(http, **GREEDY)
        full = generated_text(http, **GREEDY, return_full_text=True)
    assert plain and full == INPUTS + plain


def test_frequency_penalty_is_used_and_bounded_as_chats(text_server: Server) -> None:
    with text_server.http() as http:
        assert generate(http, **GREEDY, frequency_penalty=1.5).status_code == 200
        assert_openai_error(generate(http, frequency_penalty=2.5), 400, param="parameters.frequency_penalty")


@pytest.mark.parametrize(
    "value",
    [NUMBER, json.dumps(NUMBER)],
    ids=["schema", "schema-text"],
)
@pytest.mark.parametrize("kind", ["json", "json_object"])
def test_json_grammar_output_matches_the_schema(text_server: Server, kind: str, value: Any) -> None:
    grammar = {"type": kind, "value": value}
    with text_server.http() as http:
        for seed in (1, 2):
            text = generated_text(http, max_new_tokens=32, temperature=1.0, seed=seed, grammar=grammar)
            parsed = json.loads(text)
            assert set(parsed) == {"n"} and isinstance(parsed["n"], int) and 0 <= parsed["n"] <= 99, text


def test_json_grammar_of_a_bare_integer(text_server: Server) -> None:
    grammar = {"type": "json", "value": {"type": "integer", "minimum": 0, "maximum": 999}}
    with text_server.http() as http:
        text = generated_text(http, "hi", max_new_tokens=16, seed=3, temperature=1.0, grammar=grammar)
    assert isinstance(json.loads(text), int) and 0 <= json.loads(text) <= 999, text


def test_json_schema_grammar_as_tgi_wraps_it(text_server: Server) -> None:
    grammar = {"type": "json_schema", "value": {"name": "number", "schema": NUMBER}}
    with text_server.http() as http:
        text = generated_text(http, max_new_tokens=32, seed=4, temperature=1.0, grammar=grammar)
    assert set(json.loads(text)) == {"n"}, text


def test_regex_grammar_output_matches_the_regex(text_server: Server) -> None:
    with text_server.http() as http:
        for seed in (1, 2):
            text = generated_text(
                http, max_new_tokens=32, temperature=1.0, seed=seed, grammar={"type": "regex", "value": REGEX}
            )
            assert re.fullmatch(REGEX, text), text


def test_grammar_with_return_full_text(text_server: Server) -> None:
    with text_server.http() as http:
        text = generated_text(
            http, max_new_tokens=32, return_full_text=True, grammar={"type": "regex", "value": REGEX}
        )
    assert text.startswith(INPUTS) and re.fullmatch(REGEX, text[len(INPUTS) :]), text


@pytest.mark.parametrize(
    "grammar",
    [
        {"type": "regex", "value": "(("},
        {"type": "json", "value": "{not json"},
        {"type": "json", "value": {"type": 12}},
        {"type": "regex", "value": {"not": "a string"}},
        {"type": "json_schema", "value": {"name": "missing its schema"}},
    ],
    ids=["bad-regex", "schema-text-not-json", "bad-schema", "regex-not-a-string", "json_schema-no-schema"],
)
def test_an_invalid_grammar_is_a_400_naming_it(text_server: Server, grammar: dict) -> None:
    with text_server.http() as http:
        assert_openai_error(generate(http, grammar=grammar), 400, param="parameters.grammar")


def test_a_grammar_of_another_type_or_shape_is_a_400(text_server: Server) -> None:
    with text_server.http() as http:
        response = generate(http, grammar={"type": "lark", "value": 'start: "x"'})
        assert_openai_error(response, 400, param="parameters.grammar.type")
        response = generate(http, grammar={"type": "regex", "value": "a", "extra": 1})
        assert_openai_error(response, 400, param="parameters.grammar.extra")


def test_unknown_parameters_follow_the_other_routes_policy(text_server: Server) -> None:
    """Not TGI's: accepted and logged (as chat's unknown fields), unless it is a known field that
    would change the answer, which is refused naming it."""
    with text_server.http() as http:
        plain = generated_text(http, **GREEDY)
        assert generated_text(http, **GREEDY, some_client_extension={"x": 1}) == plain
        named = generate(http, **GREEDY, some_client_extension={"x": 1}).json()["warnings"]
        assert named == ["unknown field 'parameters.some_client_extension' ignored"]
        response = generate(http, **GREEDY, use_beam_search=True)
        assert_openai_error(response, 400, param="parameters.use_beam_search")
        assert generated_text(http, **GREEDY, use_beam_search=False) == plain


@pytest.mark.parametrize(
    "field, value, advice",
    [
        ("max_tokens", 2, "parameters.max_new_tokens"),
        ("min_tokens", 2, "parameters.min_new_tokens"),
        ("response_format", {"type": "json_object"}, "parameters.grammar"),
        ("guided_json", {"type": "integer"}, "parameters.grammar"),
        ("n", 2, "/v1/completions"),
        ("logit_bias", {"5": 10}, "/v1/completions"),
        ("presence_penalty", 1.0, "/v1/completions"),
        # REFUSED's advice for the OpenAI routes was given here, renamed halfway by the TGI rewording.
        ("max_output_tokens", 5, "parameters.max_new_tokens"),
        ("text", {"format": {"type": "json_object"}}, "parameters.grammar"),
        ("input", "hi", "use inputs"),
    ],
)
def test_openai_names_in_parameters_are_400s_saying_what_to_use(
    text_server: Server, field: str, value: Any, advice: str
) -> None:
    """Clients moving from /v1/completions send its names: `parameters.max_tokens: 2` was answered
    with 128 tokens and a warning that named `parameters.max_new_tokens` (the field it has)."""
    with text_server.http() as http:
        error = assert_openai_error(generate(http, **{field: value}), 400, param=f"parameters.{field}")
        assert f"parameters.{field}" in error["message"] and advice in error["message"]
        beside = http.post("/generate", json={"inputs": INPUTS, field: value})
        error = assert_openai_error(beside, 400, param=field)
        assert advice in error["message"]
        # Values that change nothing stay accepted, as on the other routes.
        assert generate(http, **GREEDY, n=1, min_tokens=0, presence_penalty=0).status_code == 200
        # TGI's parameters beside `parameters`: `temperature: 0` there was ignored, and the answer sampled.
        misplaced = http.post("/generate", json={"inputs": INPUTS, "temperature": 0})
        assert "put it in parameters" in assert_openai_error(misplaced, 400, param="temperature")["message"]
        # At the values that change nothing (a careless client's `details: false`), accepted.
        careless = http.post("/generate", json={"inputs": INPUTS, "details": False, "parameters": GREEDY})
        assert careless.status_code == 200, careless.text
        unknown = generate(http, **GREEDY, **{"limit-max_tokens": 3}).json()["warnings"]
        assert unknown == ["unknown field 'parameters.limit-max_tokens' ignored"]


def test_stream_follows_the_same_rules(text_server: Server) -> None:
    """/generate does not stream (stream: true is refused as a whole, TGI streams on another
    route); stream: false with the neutral values is answered, an effective refused field is not."""
    with text_server.http() as http:
        plain = generated_text(http, **GREEDY)
        response = generate(http, stream=False, **GREEDY, **NEUTRAL)
        assert response.status_code == 200 and response.json()["generated_text"] == plain
        assert_openai_error(generate(http, stream=True, **GREEDY, details=True), 400)
        assert_openai_error(generate(http, stream=True, **GREEDY, **NEUTRAL), 400, param="stream")
        response = generate(http, stream=False, **GREEDY, details=True)
        assert_openai_error(response, 400, param="parameters.details")


def test_huggingface_hub_text_generation(text_server: Server) -> None:
    """The client whose defaults the neutral values are: its default call, return_full_text and
    a grammar work; details=True is refused (an error, not a silent plain answer)."""
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    client = InferenceClient(model=f"{text_server.base_url}/generate", token=text_server.api_key)
    with text_server.http() as http:
        plain = generated_text(http, **GREEDY)
    assert client.text_generation(INPUTS, max_new_tokens=8, do_sample=False) == plain
    full = client.text_generation(INPUTS, max_new_tokens=8, do_sample=False, return_full_text=True)
    assert full == INPUTS + plain
    grammar = {"type": "regex", "value": REGEX}
    assert re.fullmatch(REGEX, client.text_generation(INPUTS, max_new_tokens=32, grammar=grammar))
    with pytest.raises(HfHubHTTPError, match="parameters.details"):
        client.text_generation(INPUTS, max_new_tokens=8, details=True)


def test_lengths_are_reported_under_generates_own_names(text_server: Server) -> None:
    """The shared path wrote chat's field names: a lowered max_new_tokens was reported as
    "max_tokens ...", and its errors named param "max_tokens"."""
    with text_server.http() as client:
        lowered = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 5000}})
        assert lowered.status_code == 200, lowered.text
        assert lowered.json()["warnings"][0].startswith("max_new_tokens 5000 was lowered")
        assert "max_new_tokens 5000" in lowered.headers["X-Request-Warnings"]
        too_long = client.post(
            "/generate", json={"inputs": "word " * 4060, "parameters": {"max_new_tokens": 100}}
        )
        error = assert_openai_error(
            too_long, 400, code="context_length_exceeded", param="parameters.max_new_tokens"
        )
        assert "max_new_tokens" in error["message"] and "max_tokens" not in error["message"]
        too_few = client.post(
            "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2, "min_new_tokens": 5}}
        )
        error = assert_openai_error(too_few, 400, param="parameters.min_new_tokens")
        assert "min_new_tokens (5) is larger than max_new_tokens (2)" in error["message"]
