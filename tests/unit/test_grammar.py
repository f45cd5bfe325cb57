"""Constrained decoding on the tiny random model: whatever noise it prefers, the grammar decides
the shape. JSON outputs parse, forced tool calls name a declared tool with matching arguments,
bad schemas are refused before admission, and n > 1 choices each keep their own matcher."""

from __future__ import annotations

import json
import re

import anyio
import pytest
import torch

from app.tool_calls import HERMES, parse_message
from app.tool_calls.llama3 import LLAMA3_JSON
from app.tool_calls.mistral import MISTRAL, MISTRAL_ARGS
from models.errors import InvalidRequestError
from models.grammar import GrammarCompiler, tool_calls_lark
from models.loader import LoadSpec
from models.params import GrammarSpec, PromptInput, SamplingParams
from models.prompt import PreparedPrompt
from models.replica import build_replica
from scheduler.core import Scheduler
from scheduler.request import EngineRequest
from tests.unit.configs import engine_config, replica_config
from tests.unit.engine_driver import EngineDriver

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            # A local $ref: it must still resolve once the schema sits inside the call's schema.
            "parameters": {
                "type": "object",
                "properties": {"zone": {"$ref": "#/$defs/zone"}},
                "required": ["zone"],
                "additionalProperties": False,
                "$defs": {"zone": {"enum": ["UTC", "CET"]}},
            },
        },
    },
]


@pytest.fixture(scope="module")
def replica(tiny_text_path):
    return build_replica(
        LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=8)
    )


def generate(
    replica, params: SamplingParams, *, n: int = 1, prompt: str = "Answer in JSON please"
) -> list[tuple[str, str]]:
    """(text, finish_reason) per choice, through the executor's step loop."""
    driver = EngineDriver(replica)
    stream = driver.submit(PreparedPrompt(replica.loaded.tokenizer(prompt)["input_ids"]), params, n=n)
    driver.run([stream])
    return [
        (driver.text[(stream.request_id, i)], driver.finished[(stream.request_id, i)][0]) for i in range(n)
    ]


def check_person(value) -> None:
    assert isinstance(value, dict) and set(value) <= {"name", "age", "tags"} and {"name", "age"} <= set(value)
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 150
    assert all(tag in ("a", "b") for tag in value.get("tags", []))


# Every format's markup, forced on a model whose template knows none of them (ChatML).
FORMATS = pytest.mark.parametrize(
    "fmt",
    [HERMES, LLAMA3_JSON, MISTRAL, MISTRAL_ARGS],
    ids=["hermes", "llama3_json", "mistral", "mistral_args"],
)


def check_call(call: dict, names=("get_weather", "get_time")) -> None:
    assert call["type"] == "function" and call["id"]
    name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
    assert name in names
    if name == "get_weather":
        assert (
            set(arguments) == {"city", "unit"}
            and arguments["unit"] in ("c", "f")
            and len(arguments["city"]) <= 12
        )
    else:
        assert arguments["zone"] in ("UTC", "CET")


def test_any_json_object_parses(replica):
    # Unbounded strings could run into max_tokens; a bias towards closing quotes and braces makes
    # the noise end early. Which tokens may follow is still the grammar's call alone.
    tokenizer = replica.loaded.tokenizer
    bias = {tokenizer.convert_tokens_to_ids(t): 20.0 for t in ('"', "}")}
    params = SamplingParams(
        max_tokens=64, temperature=1.0, seed=1, logit_bias=bias, grammar=GrammarSpec("json_object")
    )
    for text, reason in generate(replica, params, n=4):
        assert reason == "stop", text
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(replica, temperature):
    spec = GrammarSpec("json_schema", json.dumps(PERSON))
    for text, reason in generate(
        replica, SamplingParams(max_tokens=64, temperature=temperature, seed=5, grammar=spec), n=3
    ):
        assert reason == "stop", text
        check_person(json.loads(text))


@FORMATS
def test_required_tool_call_is_one_declared_call(replica, fmt):
    spec = fmt.grammar(TOOLS, parallel=False)
    for text, reason in generate(
        replica, SamplingParams(max_tokens=64, temperature=1.0, seed=3, grammar=spec), n=4
    ):
        parsed = parse_message(text, fmt.parser(stream_arguments=True))
        assert reason == "stop" and parsed.content is None and len(parsed.tool_calls) == 1, text
        check_call(parsed.tool_calls[0])


@FORMATS
def test_parallel_tool_calls_may_repeat(replica, fmt):
    spec = fmt.grammar(TOOLS)
    for text, reason in generate(
        replica, SamplingParams(max_tokens=120, temperature=1.0, seed=3, grammar=spec), n=4
    ):
        parsed = parse_message(text, fmt.parser(stream_arguments=True))
        calls = parsed.tool_calls
        if (
            reason == "length" and fmt is MISTRAL
        ):  # noise may fill its list to max_tokens: the cut call is partial
            calls = calls[:-1]
        else:
            assert reason == "stop", text
        assert parsed.content is None and calls, text
        for call in calls:
            check_call(call)


@FORMATS
def test_named_tool_choice_calls_that_function(replica, fmt):
    spec = fmt.grammar(TOOLS, only="get_time")
    for text, reason in generate(
        replica, SamplingParams(max_tokens=64, temperature=1.0, seed=9, grammar=spec), n=3
    ):
        calls = parse_message(text, fmt.parser(stream_arguments=True)).tool_calls
        assert reason == "stop" and len(calls) == 1, text
        check_call(calls[0], names=("get_time",))


def test_choices_fork_their_matchers(replica):
    # n > 1: each choice has its own matcher; one finishing early does not end or bend the others.
    spec = GrammarSpec("json_schema", json.dumps(PERSON))
    results = generate(replica, SamplingParams(max_tokens=64, temperature=1.0, seed=11, grammar=spec), n=4)
    assert len({text for text, _ in results}) > 1
    for text, _ in results:
        check_person(json.loads(text))

    constraint = replica.grammars.constraint(GrammarSpec("regex", "(ab|ac)d"))
    a, b, c, d = (replica.loaded.tokenizer.convert_tokens_to_ids(t) for t in "abcd")
    constraint.advance(a)
    twin = constraint.fork()
    constraint.advance(b)
    twin.advance(c)
    for row in (constraint, twin):
        logits = row.mask_logits(torch.zeros(replica.vocab_size))
        assert torch.isfinite(logits).nonzero().flatten().tolist() == [d]
        row.advance(d)
        assert row.is_finished() and row.error is None


def test_eos_is_allowed_only_where_the_grammar_may_end(replica):
    eos = sorted(replica.loaded.eos_token_ids)
    constraint = replica.grammars.constraint(GrammarSpec("regex", "[0-9]+"))
    assert not torch.isfinite(constraint.mask_logits(torch.zeros(replica.vocab_size))[eos]).any()
    constraint.advance(replica.loaded.tokenizer.convert_tokens_to_ids("7"))
    assert torch.isfinite(constraint.mask_logits(torch.zeros(replica.vocab_size))[eos]).all()
    assert not constraint.is_finished()  # more digits may follow: the model decides


def test_an_end_token_the_grammar_refuses_fails_the_choice_instead_of_ending_it(replica):
    """Were an end token ever offered where the grammar may not end (the mask and the parser
    disagreeing, as with `<|im_end|>` spelled by a regex before), the choice ended as a success
    with text that does not match. It fails with the grammar's error instead."""
    params = SamplingParams(max_tokens=8, temperature=0.0, grammar=GrammarSpec("regex", "[0-9]+"))
    generation = replica.generations(PreparedPrompt([1, 2, 3]), params, n=1)[0]
    generation.sampler.constraint = replica.grammars.constraint(params.grammar)
    generation.append(min(replica.loaded.eos_token_ids), None)
    assert generation.finish_reason == "error" and generation.error is not None


def test_mask_covers_a_model_vocabulary_wider_than_the_tokenizer(replica):
    tokenizer = replica.loaded.tokenizer
    wide = len(tokenizer) + 45
    compiler = GrammarCompiler(tokenizer, vocab_size=wide, eos_token_ids=replica.loaded.eos_token_ids)
    # Logits even wider than the mask (whole 32-bit words): the extra ids are never allowed.
    logits = compiler.constraint(GrammarSpec("json_object")).mask_logits(torch.zeros(wide + 64))
    assert logits.shape == (wide + 64,)
    allowed = torch.isfinite(logits).nonzero().flatten().tolist()
    assert tokenizer.convert_tokens_to_ids("{") in allowed and max(allowed) < len(tokenizer)


def test_special_tool_tags_are_written_as_tokens():
    lark = tool_calls_lark(
        {
            "begin": "<tool_call>\n",
            "end": "\n</tool_call>",
            "separator": "\n",
            "tools": [{"name": "f", "parameters": None}],
            "parallel": False,
        },
        {"<tool_call>": 7, "</tool_call>": 8},
    )
    assert lark.startswith('start: call\ncall: <[7]> "\\n" %json {') and lark.rstrip().endswith('"\\n" <[8]>')


CHOICES = ["café", "a|b (c)", 'say "hi"', "你好", ""]


def test_choice_output_is_one_of_the_choices_verbatim(replica):
    # Regex metacharacters, quotes, non-ASCII and the empty string are all plain text.
    spec = GrammarSpec("choice", json.dumps(CHOICES), param="guided_choice")
    for text, reason in generate(
        replica, SamplingParams(max_tokens=16, temperature=1.0, seed=3, grammar=spec), n=6
    ):
        assert text in CHOICES and reason == "stop", text


def test_regex_and_lark_outputs_match(replica):
    params = SamplingParams(
        max_tokens=16, temperature=1.0, seed=2, grammar=GrammarSpec("regex", r"[0-9]{3}-[a-z]{2}")
    )
    for text, _ in generate(replica, params, n=3):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text), text
    lark = 'start: "yes" | "no" " " NUM\nNUM: /[0-9]/'
    gbnf = 'root ::= "yes" | "no" " " [0-9]'  # llama.cpp's GBNF, as vLLM's default backend takes
    for grammar in (lark, gbnf):
        params = SamplingParams(max_tokens=16, temperature=1.0, seed=2, grammar=GrammarSpec("lark", grammar))
        for text, _ in generate(replica, params, n=3):
            assert re.fullmatch(r"yes|no [0-9]", text), text


@pytest.mark.parametrize("pattern", [r"<tool_call>x", r"(<tool_call>)?[ab]</tool_call>"])
def test_a_grammar_that_spells_an_added_tokens_text_generates_it(replica, pattern):
    """The tiny tokenizer has `<tool_call>` as an added, non-special token, as Qwen's: llguidance
    treats it as special, yet offered it for the plain text a regex forces, then refused it once
    sampled, and the request failed. The text comes out, spelled in ordinary tokens."""
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=3, grammar=GrammarSpec("regex", pattern))
    for text, finish_reason in generate(replica, params, n=3):
        assert re.fullmatch(pattern, text) and finish_reason == "stop", (text, finish_reason)


def test_whitespace_pattern_is_the_only_whitespace_between_json_tokens(replica):
    schema = {
        "type": "object",
        "properties": {"a": {"enum": [1, 2]}},
        "required": ["a"],
        "additionalProperties": False,
    }
    spec = GrammarSpec("json_schema", json.dumps(schema), whitespace_pattern=r"\n")
    text, reason = generate(replica, SamplingParams(max_tokens=16, temperature=0.0, grammar=spec))[0]
    # llguidance lets each whitespace position match the pattern or stay empty.
    assert reason == "stop" and re.fullmatch(r'\{\n?"a"\n?:\n?[12]\n?\}', text) and "\n" in text, text
    # The default style: no free whitespace, separators as json.dumps writes them.
    text, _ = generate(
        replica,
        SamplingParams(
            max_tokens=16, temperature=0.0, grammar=GrammarSpec("json_schema", json.dumps(schema))
        ),
    )[0]
    assert re.fullmatch(r'\{"a": [12]\}', text), text


@pytest.mark.parametrize(
    "spec, param",
    [
        (
            GrammarSpec(
                "json_schema", json.dumps({"type": "object", "properties": {"a": {"$ref": "#/nope"}}})
            ),
            "response_format",
        ),
        (GrammarSpec("json_schema", "[1, 2]"), "response_format"),
        (GrammarSpec("regex", "((", param="guided_regex"), "guided_regex"),
        (
            GrammarSpec("lark", "start: nowhere", param="structured_outputs.grammar"),
            "structured_outputs.grammar",
        ),
        (GrammarSpec("lark", "root ::= nowhere", param="guided_grammar"), "guided_grammar"),
        (GrammarSpec("lark", "root ::= (", param="guided_grammar"), "guided_grammar"),
        (GrammarSpec("json_schema", "not json", param="guided_json"), "guided_json"),
        # Nested past llguidance's JSON reader's recursion limit: a ValueError from the converter.
        (
            GrammarSpec(
                "json_schema",
                '{"type": "object", "properties": {"a": ' * 200 + "{}" + "}}" * 200,
                param="guided_json",
            ),
            "guided_json",
        ),
        (GrammarSpec("json_object", whitespace_pattern="[", param="guided_json"), "guided_json"),
        (
            HERMES.grammar([{"function": {"name": "f", "parameters": {"type": "nonsense"}}}]),
            "tools[0].function.parameters",
        ),
        # Integer bounds llguidance would clamp to 2**63 - 1, generating numbers the schema forbids.
        (
            GrammarSpec("json_schema", '{"type": "integer", "minimum": 1e30}', param="guided_json"),
            "guided_json",
        ),
        (
            GrammarSpec("json_schema", '{"items": {"type": "integer", "maximum": -9223372036854775808}}'),
            "response_format",
        ),
        (
            HERMES.grammar(
                [{"function": {"name": "f", "parameters": {"properties": {"n": {"minimum": 2**64}}}}}]
            ),
            "tools",
        ),
    ],
)
def test_invalid_grammars_are_request_errors(replica, spec, param):
    with pytest.raises(InvalidRequestError) as caught:
        replica.grammars.validate(spec)
    assert caught.value.param == param and caught.value.message


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_scheduler_refuses_a_bad_schema_before_admission(tiny_text_path, anyio_backend):
    config = engine_config(
        tiny_text_path, max_batch_size=4, max_input_tokens=200, default_max_tokens=64, max_queue_size=8
    )
    scheduler = Scheduler(config)
    messages = ({"role": "user", "content": "hi"},)
    bad = SamplingParams(max_tokens=8, grammar=GrammarSpec("json_schema", json.dumps({"type": "nonsense"})))
    good = SamplingParams(
        max_tokens=64, temperature=0.0, grammar=GrammarSpec("json_schema", json.dumps(PERSON))
    )
    await scheduler.start()
    with anyio.fail_after(120):
        while scheduler.status == "loading":
            await anyio.sleep(0.05)
    try:
        with pytest.raises(InvalidRequestError) as caught:
            await scheduler.submit(EngineRequest("bad", PromptInput(messages=messages), bad))
        assert caught.value.param == "response_format"
        assert scheduler.executors[0].queue_depth == 0 and not scheduler._inflight
        stream = await scheduler.submit(EngineRequest("good", PromptInput(messages=messages), good))
        text, reason = "", None
        async for update in stream:
            text += update.choices[0].text
            reason = update.choices[0].finish_reason or reason
        assert reason == "stop"
        check_person(json.loads(text))
    finally:
        await scheduler.drain(5)
