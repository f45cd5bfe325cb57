"""The Llama 3.x JSON and Mistral tool-call parsers (pure text, no model), and how a server picks
its format: TOOL_CALL_PARSER, or the chat template.

As for Hermes (test_tool_calls.py), streaming and non-streaming must agree: the same output cut at
every character boundary, fed piece by piece, reassembles to what the whole text parses to."""

from __future__ import annotations

import json

import pytest

from app.settings import SETTINGS, Settings, SettingsError
from app.tool_calls import FORMATS, HERMES, parse_message, select_format
from app.tool_calls.llama3 import LLAMA3_JSON
from app.tool_calls.mistral import MISTRAL, MISTRAL_ARGS
from models.grammar import tool_calls_lark
from tests.unit.test_tool_calls import calls_of, reassemble

WEATHER = ("get_weather", '{"city": "Paris", "unit": "c"}')
TRICKY = ("get_time", '{"zone": "}\\" ; ] [TOOL_CALLS] [ARGS]", "n": [1, {"x": null}]}')

# (format, text, expected content, expected calls) for every case, streamed or not; a forced call
# cannot be malformed (the grammar writes it), so the broken cases are read unforced only.
CASES = {
    "llama3_one": (
        LLAMA3_JSON,
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
        None,
        [WEATHER],
    ),
    "llama3_two": (
        LLAMA3_JSON,
        '\n{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}; '
        '{"name": "get_time", "parameters": {"zone": "}\\" ; ] [TOOL_CALLS] [ARGS]", "n": [1, {"x": null}]}}',
        None,
        [WEATHER, TRICKY],
    ),
    "llama3_python_tag": (
        LLAMA3_JSON,
        'Let me look.\n<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
        "Let me look.",
        [WEATHER],
    ),
    "llama3_plain": (LLAMA3_JSON, "Paris is sunny {today}.\n", "Paris is sunny {today}.\n", []),
    "llama3_json_reply": (LLAMA3_JSON, ' {"answer": 42}', ' {"answer": 42}', []),
    "llama3_broken": (
        LLAMA3_JSON,
        '{"name": "f", "parameters": {"a": }',
        '{"name": "f", "parameters": {"a": }',
        [],
    ),
    "mistral_list": (
        MISTRAL,
        'Checking.\n[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
        '{"name": "get_time", "arguments": {"zone": "}\\" ; ] [TOOL_CALLS] [ARGS]", "n": [1, {"x": null}]}}]',
        "Checking.",
        [WEATHER, TRICKY],
    ),
    "mistral_args": (
        MISTRAL_ARGS,
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}'
        '[TOOL_CALLS]get_time[ARGS]{"zone": "}\\" ; ] [TOOL_CALLS] [ARGS]", "n": [1, {"x": null}]}',
        None,
        [WEATHER, TRICKY],
    ),
    "mistral_plain": (MISTRAL, "No [TOOL_CALL here [", "No [TOOL_CALL here [", []),
    "mistral_broken": (MISTRAL, "Hmm [TOOL_CALLS][{oops}]", "Hmm [TOOL_CALLS][{oops}]", []),
}


# A forced call (streamed arguments) is never malformed, and a grammar that forces calls never
# lets a JSON reply start where a call does: the broken cases and that one are free-text only.
@pytest.mark.parametrize(
    "key, stream_arguments",
    [
        (key, stream)
        for key in sorted(CASES)
        for stream in (False, True)
        if not (stream and (key.endswith("broken") or key == "llama3_json_reply"))
    ],
)
def test_whole_text_and_every_split_agree(key, stream_arguments):
    fmt, text, content, calls = CASES[key]
    whole = parse_message(text, fmt.parser(stream_arguments=stream_arguments))
    assert (whole.content, calls_of(whole)) == (content, calls)
    splits = [
        [text[:i], text[i:j], text[j:]] for i in range(len(text) + 1) for j in range(i, len(text) + 1, 9)
    ]
    splits.append(list(text))
    for pieces in splits:
        parser = fmt.parser(stream_arguments=stream_arguments)
        deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
        assert reassemble(deltas) == (content, calls), pieces
        assert parser.num_calls == len(calls)
        assert all(d for d in deltas if isinstance(d, str)), "empty content deltas"


@pytest.mark.parametrize(
    "fmt, text",
    [
        (LLAMA3_JSON, '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}'),
        (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]'),
        (MISTRAL_ARGS, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}'),
    ],
)
def test_forced_calls_stream_header_first_then_argument_fragments(fmt, text):
    parser = fmt.parser(stream_arguments=True)
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
    header, *fragments = deltas
    assert header.payload()["function"] == {"name": "get_weather", "arguments": ""}
    assert len(fragments) > 5 and all(f.id is None for f in fragments)
    assert json.loads("".join(f.arguments for f in fragments)) == {"city": "Paris", "unit": "c"}


def test_unforced_calls_wait_for_the_end_of_the_output():
    parser = LLAMA3_JSON.parser()
    assert parser.feed('{"name": "get_weather", "parameters": {}}') == []
    (header, fragment) = parser.finish()
    assert header.name == "get_weather" and fragment.arguments == "{}"


def test_a_forced_call_cut_by_max_tokens_stays_a_call():
    text = '[TOOL_CALLS]get_weather[ARGS]{"city": "Pa'
    parsed = parse_message(text, MISTRAL_ARGS.parser(stream_arguments=True))
    assert parsed.content is None and calls_of(parsed) == [("get_weather", '{"city": "Pa')]


@pytest.mark.parametrize("cut", ["[TOOL_CALLS]", "[TOOL_CALLS]get_wea"])
def test_a_forced_call_cut_before_its_name_is_neither_content_nor_a_call(cut):
    parsed = parse_message(cut, MISTRAL_ARGS.parser(stream_arguments=True))
    assert parsed.content is None and parsed.tool_calls == []


def test_call_ids_fit_the_format():
    mistral_ids = [c["id"] for c in parse_message(CASES["mistral_list"][1], MISTRAL.parser()).tool_calls]
    assert all(len(i) == 9 and i.isalnum() for i in mistral_ids) and len(set(mistral_ids)) == 2
    llama_ids = [c["id"] for c in parse_message(CASES["llama3_two"][1], LLAMA3_JSON.parser()).tool_calls]
    assert all(i.startswith("call_") for i in llama_ids)


# -- choosing the format -----------------------------------------------------------------------
LLAMA31_TEMPLATE = (
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n' }}"
    '{{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name '
    "and its value}.' }}{%- if message.tool_calls %}{{- '<|python_tag|>' }}{%- endif %}"
)


@pytest.mark.parametrize(
    "setting, template, name, why",
    [
        (
            "auto",
            "{{ '[AVAILABLE_TOOLS]' + tools|tojson + '[/AVAILABLE_TOOLS]' }}[TOOL_CALLS]",
            "mistral",
            "chat template",
        ),
        ("auto", "<tool_call>\n{{ call | tojson }}\n</tool_call>", "hermes", "chat template"),
        ("auto", LLAMA31_TEMPLATE, "llama3_json", "chat template"),
        ("auto", "{{ messages[0].content }}", "hermes", "default"),
        ("auto", "", "hermes", "default"),
        ("llama3_json", "<tool_call>", "llama3_json", "TOOL_CALL_PARSER"),
        ("mistral", "", "mistral", "TOOL_CALL_PARSER"),
    ],
)
def test_the_format_follows_the_setting_or_the_chat_template(setting, template, name, why):
    fmt, reason = select_format(setting, template)
    assert fmt.name == name and why in reason


def test_mistral_templates_with_args_get_the_args_layout():
    fmt, reason = select_format("auto", "[TOOL_CALLS]{{ name }}[ARGS]{{ arguments }}")
    assert fmt is MISTRAL_ARGS and "[ARGS]" in reason
    assert select_format("mistral", "[TOOL_CALLS][ARGS]")[0] is MISTRAL_ARGS
    assert select_format("hermes", "[TOOL_CALLS]")[0] is HERMES


def test_the_setting_accepts_exactly_the_registered_formats():
    assert Settings.from_env({}).tool_call_parser == "auto"
    for name in FORMATS:
        assert Settings.from_env({"TOOL_CALL_PARSER": name.upper()}).tool_call_parser == name
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"TOOL_CALL_PARSER": "pythonic"})
    assert caught.value.name == "TOOL_CALL_PARSER" and all(n in str(caught.value) for n in FORMATS)
    assert SETTINGS["tool_call_parser"].flags == ("--tool-call-parser",)


# -- grammars in each layout -------------------------------------------------------------------
TOOLS = [{"function": {"name": "f", "parameters": {"type": "object"}}}, {"function": {"name": "g"}}]


def lark(fmt, special=None, **kwargs) -> str:
    return tool_calls_lark(json.loads(fmt.grammar(TOOLS, **kwargs).source), special or {})


def test_llama3_grammar_writes_parameters_separated_by_semicolons():
    text = lark(LLAMA3_JSON)
    assert text.startswith('start: call ("; " call)*\ncall: %json ')
    assert '"parameters": {"type": "object"}' in text and '"arguments"' not in text


def test_mistral_grammars_wrap_a_list_or_write_name_then_args():
    listed = lark(MISTRAL, {"[TOOL_CALLS]": 5})
    assert listed.startswith('start: <[5]> "[" call (", " call)* "]"\ncall: %json ')
    named = lark(MISTRAL_ARGS, {"[TOOL_CALLS]": 5, "[ARGS]": 6}, only="g")
    assert named.startswith('start: call\ncall: <[5]> "g" <[6]> %json {"type": "object"')
