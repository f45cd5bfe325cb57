"""vLLM's structured-output fields against the real server: the legacy `guided_*` spelling and
the current `structured_outputs` object, on chat and completions, streamed or not; `strict`
json_schema and response_format on completions; and the fields this server refuses or ignores.

The tiny model writes noise; whatever it prefers, the grammar decides what comes out."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.integration.conftest import Server
from tests.integration.helpers import assert_openai_error, parse_sse, user

CHOICES = ["Paris", "a|b (c)", "café"]
CITY = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["city", "n"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2}"
LARK = 'start: ("yes" | "no") " " NUM\nNUM: /[0-9]{1,2}/'
GBNF = 'root ::= ("yes" | "no") " " [0-9] [0-9]?'  # llama.cpp's GBNF, vLLM's default grammar syntax
LARK_OUTPUT = r"(yes|no) [0-9]{1,2}"


def chat_texts(server: Server, stream: bool, n: int = 1, **extra: Any) -> list[str]:
    client = server.openai()
    ask = dict(
        model=server.model_name,
        messages=user("Pick one"),
        max_tokens=32,
        temperature=1.0,
        seed=11,
        n=n,
        extra_body=extra,
    )
    if not stream:
        reply = client.chat.completions.create(**ask)
        assert all(c.finish_reason == "stop" for c in reply.choices), reply
        return [c.message.content for c in reply.choices]
    texts = [""] * n
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    return texts


def completion_texts(server: Server, stream: bool, n: int = 1, **extra: Any) -> list[str]:
    client = server.openai()
    ask = dict(model=server.model_name, prompt="The answer:", max_tokens=32, temperature=1.0, seed=5, n=n)
    if not stream:
        reply = client.completions.create(**ask, extra_body=extra)
        assert all(c.finish_reason == "stop" for c in reply.choices), reply
        return [c.text for c in reply.choices]
    texts = [""] * n
    for chunk in client.completions.create(**ask, stream=True, extra_body=extra):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    return texts


ENDPOINTS = {"chat": chat_texts, "completions": completion_texts}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize(
    "fields",
    [{"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}}],
    ids=["guided_choice", "structured_outputs.choice"],
)
def test_choice(text_server: Server, endpoint: str, stream: bool, fields: dict) -> None:
    texts = ENDPOINTS[endpoint](text_server, stream, n=3, **fields)
    assert len(texts) == 3 and all(text in CHOICES for text in texts), texts


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize(
    "fields",
    [{"guided_regex": REGEX}, {"structured_outputs": {"regex": REGEX}}],
    ids=["guided_regex", "structured_outputs.regex"],
)
def test_regex(text_server: Server, endpoint: str, stream: bool, fields: dict) -> None:
    for text in ENDPOINTS[endpoint](text_server, stream, n=2, **fields):
        assert re.fullmatch(REGEX, text), text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize(
    "fields",
    [{"guided_json": CITY}, {"guided_json": json.dumps(CITY)}, {"structured_outputs": {"json": CITY}}],
    ids=["guided_json", "guided_json-text", "structured_outputs.json"],
)
def test_json_schema(text_server: Server, endpoint: str, stream: bool, fields: dict) -> None:
    for text in ENDPOINTS[endpoint](text_server, stream, n=2, **fields):
        value = json.loads(text)
        assert set(value) == {"city", "n"} and value["city"] in ("Paris", "Rome") and 0 <= value["n"] <= 99


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize(
    "fields",
    [{"guided_grammar": LARK}, {"guided_grammar": GBNF}, {"structured_outputs": {"grammar": LARK}}],
    ids=["guided_grammar", "guided_grammar-gbnf", "structured_outputs.grammar"],
)
def test_lark_grammar(text_server: Server, endpoint: str, stream: bool, fields: dict) -> None:
    for text in ENDPOINTS[endpoint](text_server, stream, n=2, **fields):
        assert re.fullmatch(LARK_OUTPUT, text), text


def test_a_regex_spelling_the_end_token_gets_its_text(text_server: Server) -> None:
    """The mask offered the end token itself for the text `<|im_end|>`: the answer ended empty,
    the regex unmatched, with no error. It gets the text, spelled in ordinary tokens."""
    reply = text_server.openai().chat.completions.create(
        model=text_server.model_name,
        messages=user("go"),
        max_tokens=16,
        temperature=0,
        extra_body={"guided_regex": r"<\|im_end\|>"},
    )
    assert reply.choices[0].message.content == "<|im_end|>" and reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_a_grammar_that_leaves_no_token_is_a_400_naming_it(text_server: Server, temperature: float) -> None:
    """A Lark grammar naming the end-of-text token as a token leaves no token after "ok": greedy
    picked token 0 anyway (masked tokens had become the lowest finite float), the grammar refused
    it, and the client got a 500; sampled, a 400. Both are the request's grammar's doing."""
    body = {
        "messages": user("go"),
        "max_tokens": 10,
        "temperature": temperature,
        "guided_grammar": 'start: "ok" <|im_end|>',
    }
    with text_server.http() as client:
        error = assert_openai_error(
            client.post("/v1/chat/completions", json=body), 400, param="guided_grammar"
        )
    assert "allows no token" in error["message"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_and_ignore_eos_yield_to_a_grammar_that_must_end(text_server: Server, temperature) -> None:
    """min_tokens and ignore_eos keep the end token out; where the grammar allows nothing else
    (it matches only "", or it is complete) no token was left to sample and the request was a
    500. The grammar wins: the answer ends there. Where it may go on, ignore_eos keeps it going."""
    with text_server.http() as http:

        def ask(**fields: Any) -> dict[str, Any]:
            body = {"messages": user("go"), "max_tokens": 8, "temperature": temperature, "seed": 3, **fields}
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]

        for fields in ({"min_tokens": 1}, {"ignore_eos": True}):
            empty = ask(guided_regex="^$", **fields)
            assert empty["message"]["content"] == "" and empty["finish_reason"] == "stop"
        assert ask(guided_choice=["yes"], min_tokens=6)["message"]["content"] == "yes"
        going = ask(guided_regex="(ab)+", ignore_eos=True)
        assert going["finish_reason"] == "length" and re.fullmatch("(ab)+a?", going["message"]["content"])


@pytest.mark.parametrize(
    "fields",
    [
        {"guided_json": CITY, "guided_whitespace_pattern": r"\n"},
        {"structured_outputs": {"json": CITY, "whitespace_pattern": r"\n"}},
    ],
    ids=["guided_whitespace_pattern", "structured_outputs.whitespace_pattern"],
)
def test_whitespace_pattern(text_server: Server, fields: dict) -> None:
    # Without a pattern the output is spaced as json.dumps writes it (`": "`); with `\n` a space can
    # only come inside a string, and any whitespace between tokens is a newline.
    for text in chat_texts(text_server, False, n=3, **fields):
        assert json.loads(text)["city"] in ("Paris", "Rome")
        assert " " not in text, text
    plain = chat_texts(text_server, False, guided_json=CITY)[0]
    assert '": ' in plain and "\n" not in plain, plain


@pytest.mark.parametrize("strict", [True, False])
def test_json_schema_response_format_is_always_strict(text_server: Server, strict: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": strict}}
    reply = text_server.openai().chat.completions.create(
        model=text_server.model_name, messages=user("Where?"), response_format=fmt, max_tokens=32, seed=2, n=2
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop" and json.loads(choice.message.content)["city"] in (
            "Paris",
            "Rome",
        )


OPEN = {  # no additionalProperties: plain JSON Schema lets the object take any other key
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok"],
}


def test_strict_closes_objects_to_their_properties(text_server: Server) -> None:
    """OpenAI's strict mode admits only the listed properties. Taken as plain JSON Schema, the
    random model wrote `{"ok": true, "<invented key>": ...` until max_tokens, for a response format
    and for a forced strict tool call alike."""
    client = text_server.openai()
    fmt = {"type": "json_schema", "json_schema": {"name": "flag", "schema": OPEN, "strict": True}}
    reply = client.chat.completions.create(
        model=text_server.model_name, messages=user("Flag?"), response_format=fmt, max_tokens=48, seed=3, n=3
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice
        assert set(json.loads(choice.message.content)) <= {"ok", "n"}
    tool = {"type": "function", "function": {"name": "flag", "parameters": OPEN, "strict": True}}
    reply = client.chat.completions.create(
        model=text_server.model_name,
        messages=user("Flag?"),
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=48,
        seed=3,
        n=3,
    )
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls", choice
        [call] = choice.message.tool_calls
        assert set(json.loads(call.function.arguments)) <= {"ok", "n"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_response_format_on_completions(text_server: Server, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    for text in completion_texts(text_server, stream, n=2, response_format=fmt):
        assert json.loads(text)["city"] in ("Paris", "Rome")


def test_a_constraint_leaves_no_room_for_tool_calls(text_server: Server) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    texts = chat_texts(text_server, False, n=2, guided_choice=["<tool_call>", "plain"], tools=[tool])
    assert all(text in ("<tool_call>", "plain") for text in texts)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    "fields, param",
    [
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_json": CITY, "structured_outputs": {"regex": "a"}}, "structured_outputs.regex"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"guided_regex": "(("}, "guided_regex"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
        ({"structured_outputs": {"grammar": 'start: "a'}}, "structured_outputs.grammar"),
        ({"guided_json": "not json"}, "guided_json"),
        (
            {"structured_outputs": {"json": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}}},
            "structured_outputs.json",
        ),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        # Whitespace patterns that match other characters made output that was not JSON.
        (
            {"guided_json": {"type": "object"}, "guided_whitespace_pattern": "[a-z]{0,3}"},
            "guided_whitespace_pattern",
        ),
        (
            {"response_format": {"type": "json_object"}, "guided_whitespace_pattern": ".*"},
            "guided_whitespace_pattern",
        ),
        # A schema under another type was dropped without a word; a name outside OpenAI's rule.
        (
            {
                "response_format": {
                    "type": "json_object",
                    "json_schema": {"name": "x", "schema": {"type": "object"}},
                }
            },
            "response_format.type",
        ),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
        ({"bad_words": ["the"]}, "bad_words"),
        ({"allowed_token_ids": [1, 2]}, "allowed_token_ids"),
        ({"logits_processors": ["x"]}, "logits_processors"),
        ({"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
        ({"truncate_prompt_tokens": 4}, "truncate_prompt_tokens"),
    ],
)
def test_unusable_fields_are_400s_naming_the_field(
    text_server: Server, path: str, fields: dict, param: str
) -> None:
    body = {"max_tokens": 4, **fields}
    body.update({"messages": user()} if path == "/v1/chat/completions" else {"prompt": "hi"})
    with text_server.http() as http:
        response = http.post(path, json=body)
        assert_openai_error(response, 400, param=param)
        # Nothing broke: the next request is served.
        assert http.post(path, json={k: v for k, v in body.items() if k not in fields}).status_code == 200


@pytest.mark.parametrize(
    "fields, param",
    [
        (
            {
                "guided_choice": ["a"],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "required",
            },
            "guided_choice",
        ),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"best_of": 2}, "best_of"),
        ({"chat_template": "{{ 'x' }}"}, "chat_template"),
    ],
)
def test_chat_only_refusals(text_server: Server, fields: dict, param: str) -> None:
    with text_server.http() as http:
        response = http.post("/v1/chat/completions", json={"messages": user(), "max_tokens": 4, **fields})
    assert_openai_error(response, 400, param=param)


def test_fields_that_change_nothing_are_accepted(text_server: Server) -> None:
    extra = {
        "use_beam_search": False,
        "length_penalty": 1.0,
        "modalities": ["text"],
        "metadata": {"team": "a"},
        "store": False,
        "service_tier": "auto",
        "prediction": {"type": "content", "content": "x"},
        "guided_decoding_backend": "xgrammar",
        "priority": 0,
        "some_client_extension": {"x": 1},
        "structured_outputs": {"choice": ["ok"], "disable_any_whitespace": True, "disable_fallback": True},
    }
    with text_server.http() as http:
        response = http.post("/v1/chat/completions", json={"messages": user(), "max_tokens": 4, **extra})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "ok"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_streamed_request_with_an_invalid_constraint_is_a_400_before_any_event(
    text_server: Server, path: str
) -> None:
    body = {"max_tokens": 4, "stream": True, "structured_outputs": {"regex": "(("}}
    body.update({"messages": user()} if path == "/v1/chat/completions" else {"prompt": "hi"})
    with text_server.http() as http:
        assert_openai_error(http.post(path, json=body), 400, param="structured_outputs.regex")


NO_END = {
    "$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}},
    "$ref": "#/$defs/n",
}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": NO_END}}},
            "response_format",
        ),
        ("/v1/chat/completions", {"guided_grammar": 'start: "a" start'}, "guided_grammar"),
        ("/generate", {"parameters": {"grammar": {"type": "json", "value": NO_END}}}, "parameters.grammar"),
    ],
    ids=["schema-requires-itself", "lark-without-base-case", "generate"],
)
def test_a_grammar_that_cannot_end_is_a_400_naming_its_field(text_server: Server, path, body, param) -> None:
    """They passed validation and failed on the first generated token with a 500."""
    payload = {"inputs": "hi"} if path == "/generate" else {"messages": user("hi"), "max_tokens": 8}
    with text_server.http() as client:
        response = client.post(path, json={**payload, **body})
    error = assert_openai_error(response, 400, param=param)
    assert "no finite output" in error["message"]


def test_an_object_with_hundreds_of_optional_properties_is_a_400_not_a_500(text_server: Server) -> None:
    """Accepted, then failed at the first key with a 500: the Earley row of some 500 optional
    properties passes llguidance's limit (2,000 items) only once a key has started, beyond what
    validation looks at. The grammar is the request's: a 400 naming its field, streamed or not."""
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(600)}}
    body = {
        "messages": user("hi"),
        "max_tokens": 16,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "wide", "schema": wide}},
    }
    with text_server.http() as client:
        error = assert_openai_error(
            client.post("/v1/chat/completions", json=body), 400, param="response_format"
        )
        assert "limits" in error["message"]
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
    failure = json.loads(parse_sse(streamed.text)[-2])["error"]
    assert failure["type"] == "invalid_request_error" and failure["param"] == "response_format"
