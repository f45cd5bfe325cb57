"""Request fields -> the engine's output constraint (app.structured), and the policy for fields a
route does not declare (app.request_fields). Pure translation: no model."""

from __future__ import annotations

import json
import logging

import msgspec
import pytest

from app.request_fields import IGNORED, REFUSED, check_undeclared
from app.schemas.chat import ChatCompletionRequest
from app.schemas.completions import CompletionRequest
from app.structured import output_grammar
from scheduler.errors import InvalidRequestError

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def chat(**fields) -> ChatCompletionRequest:
    return msgspec.convert({"messages": [{"role": "user", "content": "x"}], **fields}, ChatCompletionRequest)


def completion(**fields) -> CompletionRequest:
    return msgspec.convert({"prompt": "x", **fields}, CompletionRequest)


@pytest.mark.parametrize("make", [chat, completion])
@pytest.mark.parametrize(
    "fields, kind, source, param",
    [
        ({"guided_json": SCHEMA}, "json_schema", json.dumps(SCHEMA), "guided_json"),
        ({"guided_json": json.dumps(SCHEMA)}, "json_schema", json.dumps(SCHEMA), "guided_json"),
        ({"guided_regex": "[0-9]+"}, "regex", "[0-9]+", "guided_regex"),
        ({"guided_choice": ["a", "b"]}, "choice", '["a", "b"]', "guided_choice"),
        ({"guided_grammar": 'start: "x"'}, "lark", 'start: "x"', "guided_grammar"),
        (
            {"structured_outputs": {"json": SCHEMA}},
            "json_schema",
            json.dumps(SCHEMA),
            "structured_outputs.json",
        ),
        ({"structured_outputs": {"regex": "a+"}}, "regex", "a+", "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["y"]}}, "choice", '["y"]', "structured_outputs.choice"),
        (
            {"structured_outputs": {"grammar": 'start: "x"'}},
            "lark",
            'start: "x"',
            "structured_outputs.grammar",
        ),
        ({"structured_outputs": {"json_object": True}}, "json_object", "", "structured_outputs.json_object"),
        ({"response_format": {"type": "json_object"}}, "json_object", "", "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "json_schema",
            json.dumps(SCHEMA),
            "response_format",
        ),
        (  # strict: the object admits only the properties it lists (app.strict_schema)
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": True}}},
            "json_schema",
            json.dumps({**SCHEMA, "additionalProperties": False}),
            "response_format",
        ),
    ],
)
def test_each_spelling_becomes_one_grammar(make, fields, kind, source, param) -> None:
    spec = output_grammar(make(**fields))
    assert (spec.kind, spec.source, spec.param, spec.whitespace_pattern) == (kind, source, param, None)


def test_no_constraint_is_free_text() -> None:
    assert output_grammar(chat(response_format={"type": "text"}, structured_outputs={})) is None


@pytest.mark.parametrize(
    "fields",
    [
        {"guided_json": SCHEMA, "guided_whitespace_pattern": "[ ]?"},
        {"structured_outputs": {"json": SCHEMA, "whitespace_pattern": "[ ]?"}},
        {"response_format": {"type": "json_object"}, "guided_whitespace_pattern": "[ ]?"},
    ],
)
def test_whitespace_pattern_rides_on_the_json_constraint(fields) -> None:
    assert output_grammar(completion(**fields)).whitespace_pattern == "[ ]?"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_json": SCHEMA, "structured_outputs": {"regex": "a"}}, "structured_outputs.regex"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"structured_outputs": {"choice": ["a"], "grammar": 'start: "a"'}}, "structured_outputs.grammar"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        (
            {
                "guided_json": SCHEMA,
                "guided_whitespace_pattern": " ",
                "structured_outputs": {"whitespace_pattern": " "},
            },
            "structured_outputs.whitespace_pattern",
        ),
    ],
)
def test_conflicting_constraints_are_refused(fields, param) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        output_grammar(completion(**fields))
    assert caught.value.param == param


def test_a_constraint_and_forced_tool_calls_are_refused() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        output_grammar(chat(guided_choice=["a"]), forced_tool_calls=True)
    assert caught.value.param == "guided_choice"


@pytest.mark.parametrize(
    "fields",
    [
        {"structured_outputs": {"structural_tag": "{}"}},
        {"guided_choice": []},
        {"guided_regex": ""},
        {"guided_json": 3},
    ],
)
def test_malformed_fields_fail_conversion(fields) -> None:
    with pytest.raises(msgspec.ValidationError):
        chat(**fields)


def test_constrained_output_leaves_no_room_for_tool_calls() -> None:
    assert chat(guided_choice=["a"]).constrains_output()
    assert chat(structured_outputs={"json_object": True}).constrains_output()
    assert not chat(structured_outputs={"json_object": False}).constrains_output()
    assert not chat(response_format={"type": "text"}).constrains_output()


DECLARED = tuple(ChatCompletionRequest.__struct_fields__)


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_beam_search", True),
        ("bad_words", ["x"]),
        ("length_penalty", 0.5),
        ("modalities", ["audio"]),
        ("include_stop_str_in_output", True),
        ("best_of", 2),
        ("use_beam_search", 1),
        ("verbosity", "low"),
    ],
)
def test_unimplemented_fields_that_change_the_output_are_refused(field, value) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_undeclared({field: value}, DECLARED, "/v1/chat/completions")
    assert caught.value.param == field and "not supported" in caught.value.message
    assert caught.value.message.count(field) == 1  # the reason does not repeat the field's name


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_beam_search", False),
        ("bad_words", []),
        ("length_penalty", 1.0),
        ("modalities", ["text"]),
        ("spaces_between_special_tokens", True),
        ("allowed_token_ids", None),
        ("best_of", 1),
        ("verbosity", "medium"),  # OpenAI's default
    ],
)
def test_values_that_change_nothing_pass(field, value) -> None:
    check_undeclared({field: value}, DECLARED, "/v1/chat/completions")


def test_declared_fields_are_never_checked_here() -> None:
    # best_of and echo are CompletionRequest fields: the route implements them.
    check_undeclared(
        {"best_of": 2, "echo": True}, tuple(CompletionRequest.__struct_fields__), "/v1/completions"
    )


def test_ignored_and_unknown_fields_are_accepted_and_logged(caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="app.request_fields"):
        check_undeclared({"metadata": {"a": "b"}, "store": True, "zz_unknown_field": 1}, DECLARED, "/v1/x")
        check_undeclared({"zz_unknown_field": 2}, DECLARED, "/v1/x")
    assert "ignored fields that change nothing: metadata, store" in caplog.text
    assert caplog.text.count("unknown request field 'zz_unknown_field'") == 1  # once per name


def test_the_lists_do_not_overlap_the_declared_fields() -> None:
    # A field the Structs declare is implemented; listing it as refused or ignored would be a lie.
    declared = set(DECLARED) | set(CompletionRequest.__struct_fields__)
    assert not (set(REFUSED) | set(IGNORED)) & (declared - {"best_of", "echo", "add_special_tokens"})
    assert not set(REFUSED) & set(IGNORED)


def test_whitespace_patterns_python_reads_otherwise_are_left_to_llguidance() -> None:
    """POSIX classes and set operations are Rust regex syntax: Python read `[[:space:]]*` as a
    class of `[ : s p a c e` followed by `]*`, matched "a", and refused a whitespace-only pattern."""
    from app.structured import _check_whitespace_only

    for fine in (r"[[:space:]]*", r"[[:blank:]]*", r"[\s&&[^\n]]*", r"[ \t\n]*", r"\s*", r"[\n ]{0,2}"):
        _check_whitespace_only(fine, "guided_whitespace_pattern")
    for stray in (r"[a-z]{0,3}", r".*", r"x*"):
        with pytest.raises(InvalidRequestError):
            _check_whitespace_only(stray, "guided_whitespace_pattern")
