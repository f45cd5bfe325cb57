"""How message content reaches a text model's chat template: as the template reads it."""

from __future__ import annotations

import re

import pytest

from models.errors import InvalidRequestError
from models.params import PromptInput
from models.prompt import PromptBuilder
from models.template_messages import template_reads
from tests.unit.test_prompt_injection import text_prompt_builder

# Llama 3.2 Vision's way (its template on a text checkpoint): content is always a list of parts.
PARTS_ONLY = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'][0]['text'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "<|system|>{{ system_message }}<|end|>"
    "{%- for message in messages %}<|{{ message['role'] }}|>"
    "{%- for content in message['content'] %}{%- if content['type'] == 'text' %}{{ content['text'] }}{%- endif %}"
    "{%- endfor %}<|end|>{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)
# Strings or parts, as most templates that loop over content.
EITHER = (
    "{%- for message in messages %}<|{{ message['role'] }}|>{%- if message['content'] is string %}"
    "{{ message['content'] }}{%- else %}{%- for part in message['content'] %}{{ part['text'] }}|{%- endfor %}"
    "{%- endif %}<|end|>{%- endfor %}"
)
MESSAGES = (
    {"role": "system", "content": "You are terse."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "the weather?"}],
    },
    {"role": "assistant", "content": None},
    {"role": "user", "content": "And tomorrow?"},
)


def _builder(template: str) -> PromptBuilder:
    return text_prompt_builder(
        template, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), None, eos="<|end|>"
    )


def test_a_template_that_reads_parts_gets_parts_on_a_text_model():
    """A string looped over would render one character per 'part' (none of type text): the
    words would vanish from the prompt without an error."""
    builder = _builder(PARTS_ONLY)
    rendered = builder.render(PromptInput(messages=MESSAGES, add_generation_prompt=True))
    assert rendered == (
        "<|system|>You are terse.<|end|><|user|>What isthe weather?<|end|><|assistant|><|end|>"
        "<|user|>And tomorrow?<|end|><|assistant|>"
    )


def test_a_template_that_takes_strings_too_gets_parts_as_sent_as_transformers_renders_them():
    """Gemma 3's template trims each text part and joins them with nothing between: the server
    joined them with newlines first, so its prompt was not the one transformers (or vLLM) renders."""
    builder = _builder(EITHER)
    rendered = builder.render(PromptInput(messages=MESSAGES[1:2], add_generation_prompt=False))
    assert rendered == "<|user|>What is|the weather?|<|end|>"
    assert rendered == builder.tokenizer.apply_chat_template(
        [dict(m) for m in MESSAGES[1:2]], tokenize=False, chat_template=EITHER
    )
    as_string = builder.render(
        PromptInput(
            messages=({"role": "user", "content": "What is the weather?"},), add_generation_prompt=False
        )
    )
    assert as_string == "<|user|>What is the weather?<|end|>"


# Gemma 3's way: a system message's first text part only, folded into the first user turn.
FIRST_SYSTEM_PART = (
    "{%- if messages[0]['role'] == 'system' -%}{%- if messages[0]['content'] is string -%}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' -%}{%- else -%}"
    "{%- set prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}<|{{ message['role'] }}|>{%- if loop.first %}{{ prefix }}{% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- else -%}"
    "{%- for item in message['content'] -%}{{ item['text'] | trim }}{%- endfor -%}{%- endif -%}<|end|>"
    "{%- endfor -%}"
)


def test_a_role_whose_parts_the_template_shows_only_the_first_of_gets_them_joined():
    """Gemma 3's template reads `content[0]['text']` of a system message: given parts, every
    part after the first vanished from the prompt without a word."""
    builder = _builder(FIRST_SYSTEM_PART)
    system = {
        "role": "system",
        "content": [
            {"type": "text", "text": "Answer in French."},
            {"type": "text", "text": "Never mention cats."},
        ],
    }
    user = {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}
    rendered = builder.render(PromptInput(messages=(system, user), add_generation_prompt=False))
    assert rendered == "<|user|>Answer in French.\nNever mention cats.\n\nHelloworld<|end|>"
    assert "system" not in builder.part_roles and "user" in builder.part_roles


def test_a_tool_template_that_reads_strings_gets_strings_when_the_default_reads_parts():
    """The checkpoint's "tool_use" template renders when tools are sent: probed for the default
    template only, it was handed parts it printed as a Python list."""
    strings_only = (
        "{%- for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{%- endfor %}"
    )
    builder = text_prompt_builder_with_tool_template(EITHER, strings_only)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    parts = {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}
    with_tools = builder.render(PromptInput(messages=(parts,), tools=(tool,), add_generation_prompt=False))
    assert with_tools == "<|user|>Hi\nthere<|end|>"
    without = builder.render(PromptInput(messages=(parts,), add_generation_prompt=False))
    assert without == "<|user|>Hi|there|<|end|>"


def text_prompt_builder_with_tool_template(template: str, tool_template: str) -> PromptBuilder:
    base = _builder(template)
    return PromptBuilder(
        base.tokenizer,
        chat_template=template,
        tool_chat_template=tool_template,
        image_token_id=None,
        max_input_tokens=4096,
        image_limits=base.image_limits,
    )


# DeepSeek-R1's way: a call's arguments joined into the text as the JSON string OpenAI sends.
JOINS_ARGUMENTS = (
    "{%- for message in messages %}<|{{ message['role'] }}|>"
    "{%- for tool in message['tool_calls'] or [] %}{{ tool['function']['name'] + '\\n' + "
    "tool['function']['arguments'] }}{%- endfor %}{{ message['content'] }}<|end|>{%- endfor %}"
)
# Most templates' way: the arguments as a mapping, written out with tojson.
MAPS_ARGUMENTS = (
    "{%- for message in messages %}<|{{ message['role'] }}|>"
    "{%- for tool in message['tool_calls'] or [] %}{{ tool['function']['arguments'] | tojson }}{%- endfor %}"
    "{{ message['content'] }}<|end|>{%- endfor %}"
)
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}}
WITH_A_CALL = (
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
)


def test_a_template_that_joins_arguments_as_text_gets_the_string():
    """Given the mapping, such a template failed ("can only concatenate str (not dict)"): every
    request replaying a call was a 400."""
    builder = _builder(JOINS_ARGUMENTS)
    for _ in range(2):  # the second render goes straight to the string
        rendered = builder.render(PromptInput(messages=WITH_A_CALL, add_generation_prompt=False))
        assert (
            rendered == '<|user|>weather?<|end|><|assistant|>f\n{"city": "Paris"}<|end|><|tool|>sunny<|end|>'
        )
    mapping = _builder(MAPS_ARGUMENTS).render(PromptInput(messages=WITH_A_CALL, add_generation_prompt=False))
    assert '<|assistant|>{"city": "Paris"}<|end|>' in mapping


def test_arguments_as_text_is_learnt_per_template_and_hides_no_other_error():
    """One model, two templates (a tools-only one reading the mapping, a default one joining the
    string): what the default needs did not carry over to the other, which then printed a JSON
    string inside the call. And a request the joining template refuses for another reason (roles
    that do not alternate) was told about the mapping's TypeError instead."""
    builder = _builder(
        JOINS_ARGUMENTS + "{%- if messages[-1]['role'] == messages[-2]['role'] %}"
        "{{ raise_exception('roles must alternate') }}{%- endif %}"
    )
    builder.tool_chat_template = MAPS_ARGUMENTS
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    twice = (*WITH_A_CALL, {"role": "user", "content": "a"}, {"role": "user", "content": "b"})
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        builder.render(PromptInput(messages=twice, add_generation_prompt=False))
    builder.render(PromptInput(messages=WITH_A_CALL, add_generation_prompt=False))  # learns the default's way
    with_tools = builder.render(PromptInput(messages=WITH_A_CALL, tools=(tool,), add_generation_prompt=False))
    assert '<|assistant|>{"city": "Paris"}<|end|>' in with_tools


def test_a_tool_without_a_description_reaches_a_template_that_prints_it():
    """Hermes' template prints `tool.function.description` unguarded: a tool without one (OpenAI
    makes it optional) was a 400 "'dict object' has no attribute 'description'". Templates that
    show the tools as JSON still get them as sent."""
    prints = (
        "{%- for tool in tools %}{{ tool.function.name }}: {{ tool.function.description }};{%- endfor %}"
        "{%- for message in messages %}{{ message['content'] }}{%- endfor %}"
    )
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    rendered = _builder(prints).render(
        PromptInput(messages=MESSAGES, tools=(tool,), add_generation_prompt=False)
    )
    assert rendered.startswith("f: ;")
    as_json = "{{ tools | tojson }}{%- for message in messages %}{{ message['content'] }}{%- endfor %}"
    shown = _builder(as_json).render(
        PromptInput(messages=MESSAGES, tools=(tool,), add_generation_prompt=False)
    )
    assert "description" not in shown


def test_several_calls_in_one_turn_reach_a_template_that_takes_one_a_turn():
    """Llama 3.1's template raises "only supports single tool-calls at once" while the model
    writes several when asked: the next request, replaying them, was a 400. Each call becomes a
    turn of its own, followed by its result; a template taking several gets them as sent."""
    single = (
        "{%- for message in messages %}{%- if message['tool_calls'] and message['tool_calls'] | length > 1 %}"
        "{{ raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
        "<|{{ message['role'] }}|>{%- for tool in message['tool_calls'] or [] %}"
        "{{ tool['function']['arguments'] | tojson }}{%- endfor %}{{ message['content'] }}<|end|>{%- endfor %}"
    )
    second = {**CALL, "id": "call_2", "function": {"name": "f", "arguments": '{"city": "Rome"}'}}
    messages = (
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, second]},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    )
    rendered = _builder(single).render(PromptInput(messages=messages, add_generation_prompt=False))
    assert rendered == (
        '<|user|>weather?<|end|><|assistant|>{"city": "Paris"}<|end|><|tool|>sunny<|end|>'
        '<|assistant|>{"city": "Rome"}<|end|><|tool|>rain<|end|>'
    )
    together = _builder(MAPS_ARGUMENTS).render(PromptInput(messages=messages, add_generation_prompt=False))
    assert '<|assistant|>{"city": "Paris"}{"city": "Rome"}<|end|><|tool|>rain' in together


def test_several_calls_reach_a_template_joining_arguments_in_one_turn_from_the_first_request():
    """The split into one call a turn was tried before the arguments as text, so the first such
    request to a DeepSeek-R1-like template rendered split turns (later ones did not)."""
    second = {**CALL, "id": "call_2", "function": {"name": "g", "arguments": '{"city": "Rome"}'}}
    messages = (
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL, second]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    )
    builder = _builder(JOINS_ARGUMENTS)
    first = builder.render(PromptInput(messages=messages, add_generation_prompt=False))
    assert first == builder.render(PromptInput(messages=messages, add_generation_prompt=False))
    assert '<|assistant|>f\n{"city": "Paris"}g\n{"city": "Rome"}<|end|>' in first


def test_tool_turns_a_template_never_prints_are_named_in_the_warnings():
    """Phi-3's template knows system, user and assistant turns only: a tool result (and the call
    it answers) vanished from the prompt without a word."""
    phi3_like = (
        "{%- for message in messages %}{%- if message['role'] in ('system', 'user', 'assistant') %}"
        "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{%- endif %}{%- endfor %}"
    )
    history = PromptInput(messages=WITH_A_CALL, add_generation_prompt=False)
    warnings = _builder(phi3_like).template_warnings(history)
    assert any("tool results" in w for w in warnings) and any("tool_calls" in w for w in warnings)
    assert _builder(MAPS_ARGUMENTS).template_warnings(history) == []  # it prints both


def test_control_tokens_typed_in_tools_and_call_arguments_stay_text():
    """Message content was tokenized as text, a tool's description and a call's arguments were
    not: `<|end|>` there became the control token (a forged turn), and on a VLM `<image>` in a
    tool description made every image request a 400 (one image token too many)."""
    shows_all = (
        "{{ tools | tojson }}{%- for message in messages %}<|{{ message['role'] }}|>"
        "{%- for call in message['tool_calls'] or [] %}{{ call['function']['arguments'] | tojson }}{%- endfor %}"
        "{{ message['content'] }}<|end|>{%- endfor %}"
    )
    builder = _builder(shows_all)
    end = builder.tokenizer.convert_tokens_to_ids("<|end|>")
    typed = {**CALL, "function": {"name": "f", "arguments": '{"city": "<|end|>"}'}}
    messages = (
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [typed]},
    )
    tool = {"type": "function", "function": {"name": "f", "description": "<|end|>", "parameters": {}}}
    prompt = PromptInput(messages=messages, tools=(tool,), add_generation_prompt=False)
    ids = builder.prepare(prompt).token_ids
    assert ids.count(end) == 2  # the template's own two, one per turn


def test_short_call_ids_reach_a_template_asking_for_at_least_nine():
    """Mistral Small 3.1's template checks `length < 9` (v0.3's `!= 9`): only the second was
    recognised, and a client's id `c1` was a 400 there."""
    at_least_nine = (
        "{%- for message in messages %}{%- for call in message['tool_calls'] or [] %}"
        "{%- if call['id'] | length < 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings "
        "with length >= 9!') }}{%- endif %}[{{ call['id'] }}]{%- endfor %}{{ message['content'] }}{%- endfor %}"
    )
    short = {**CALL, "id": "c1"}
    messages = (
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [short]},
    )
    rendered = _builder(at_least_nine).render(PromptInput(messages=messages, add_generation_prompt=False))
    assert re.search(r"\[[A-Za-z0-9]{9}\]", rendered), rendered


# Pixtral's way: parts looped over, strings let through with `is not string`.
IS_NOT_STRING = (
    "{%- for message in messages %}<|{{ message['role'] }}|>{%- if message[\"content\"] is not string %}"
    "{%- for part in message['content'] %}{{ part['text'] }}{%- endfor %}"
    "{%- else %}{{ message['content'] }}{%- endif %}<|end|>{%- endfor %}"
)


def test_a_template_testing_is_not_string_keeps_strings():
    """The test for templates that take strings missed `is not string`: every string became
    parts, and a template joining `[INST]` + content failed, or printed a list's repr."""
    builder = _builder(IS_NOT_STRING)
    messages = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})
    assert builder.render(PromptInput(messages=messages, add_generation_prompt=False)) == (
        "<|user|>hi<|end|><|assistant|>hello<|end|>"
    )
    assert not builder.content_as_parts


@pytest.mark.parametrize(
    ("template", "reads"),
    [
        ("{%- if tools %}{{ tools | tojson }}{%- endif %}", True),
        ("{%- for tool in tools %}{{ tool }}{%- endfor %}", True),
        ("{%- if xml_tools %}{{ xml_tools }}{%- endif %} You may call tools.", False),  # SmolLM3
        ("{%- for m in messages %}{%- if m['tools'] %}{{ m['tools'] }}{%- endif %}{%- endfor %}", False),
        ("{%- set tools = [] %}{{ tools }}", False),  # assigned inside, not read from the caller
    ],
)
def test_whether_a_template_reads_tools(template, reads):
    assert template_reads(template, "tools") is reads


NAMED = {
    "default": "{%- for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{%- endfor %}",
    "tool_use": (
        "{%- for tool in tools %}<tool>{{ tool['function']['name'] }}</tool>{%- endfor %}"
        "{%- for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{%- endfor %}"
    ),
}


def test_named_templates_render_tools_through_tool_use(tiny_text_path, tmp_path):
    """Hermes-2-Pro and Command-R ship "default" and "tool_use" templates: transformers renders a
    conversation with tools through the latter, and so does the server (loaded from the
    checkpoint as the server loads it)."""
    import shutil

    from transformers import AutoTokenizer

    from models.loader import LoadSpec, load_model

    checkpoint = tmp_path / "named"
    shutil.copytree(tiny_text_path, checkpoint)
    (checkpoint / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.chat_template = dict(NAMED)
    tokenizer.save_pretrained(checkpoint)
    loaded = load_model(LoadSpec(source=str(checkpoint), dtype="fp32", attn_impl="sdpa"))
    assert loaded.chat_template == NAMED["default"] and loaded.tool_chat_template == NAMED["tool_use"]
    builder = PromptBuilder.for_model(loaded)
    tool = {"type": "function", "function": {"name": "get_weather"}}
    messages = ({"role": "user", "content": "hi"},)
    with_tools = builder.render(PromptInput(messages=messages, tools=(tool,), add_generation_prompt=False))
    assert with_tools == "<tool>get_weather</tool>[user] hi"
    assert with_tools == loaded.tokenizer.apply_chat_template(list(messages), tools=[tool], tokenize=False)
    assert builder.render(PromptInput(messages=messages, add_generation_prompt=False)) == "[user] hi"


def test_a_tokenizer_that_drops_whitespace_is_not_cut_short_by_the_character_bound():
    """The kept end of a long prompt is sized by the longest token's characters; BERT-style
    normalisers drop whitespace, so 3,000 spaces held 8 tokens and the prompt was cut to 4."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from models.images import ImageLimits
    from models.params import PromptInput
    from models.prompt import PromptBuilder

    words = ["[UNK]", "hello", "world", "the", "quick", "say", ":"]
    backend = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    builder = PromptBuilder(
        tokenizer, chat_template=None, image_token_id=None, max_input_tokens=16, image_limits=ImageLimits()
    )
    text = "hello world the quick" + " " * 3000 + "say :"
    prepared = builder.prepare(PromptInput(text=text, add_special_tokens=False))
    assert prepared.token_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(prepared.token_ids) == 6 and not prepared.warnings
    # Past the limit, it is still cut to exactly the limit, and says so.
    longer = builder.prepare(
        PromptInput(text=" ".join(["hello"] * 40) + " " * 3000, add_special_tokens=False)
    )
    assert len(longer.token_ids) == 16 and longer.warnings


def test_a_template_that_reads_parts_only_is_not_said_to_leave_out_tool_results() -> None:
    """LLaVA-NeXT's kind of template loops over content parts and never checks for a string: the
    server sends it the tool result as parts, and it shows it; the probe sent the result as a
    string, and the answer warned that results were left out."""
    from models.template_messages import template_omissions
    from tests.unit.vlm_builder_parts import tiny_tokenizer

    parts_only = (
        "{%- for message in messages -%}{{- message['role'].upper() + ': ' -}}"
        "{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
        "{%- endif -%}{%- endfor -%}{{- ' ' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [], "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "RESULT 42"}]},
    ]
    warnings = template_omissions(tiny_tokenizer(), parts_only, messages, None)
    assert not any("tool results" in warning for warning in warnings), warnings
    # A template that shows no result in either shape still says so.
    no_tools = parts_only.replace(
        "{%- for message in messages -%}", "{%- for message in messages if message['role'] != 'tool' -%}"
    )
    warnings = template_omissions(tiny_tokenizer(), no_tools, messages, None)
    assert any("tool results" in warning for warning in warnings), warnings


# Llama 3.2 Vision's way: with tools, the first user message is written with `| trim`.
TRIMS_FIRST_WITH_TOOLS = (
    "{%- if tools %}<|user|>{{ messages[0]['content'] | trim }}<|end|>{%- else %}"
    "{%- for message in messages %}<|{{ message['role'] }}|>{%- if message['content'] is string %}"
    "{{ message['content'] }}{%- else %}{%- for part in message['content'] %}{{ part['text'] }}"
    "{%- endfor %}{%- endif %}<|end|>{%- endfor %}{%- endif %}"
)


def test_parts_a_template_prints_as_a_list_when_tools_are_sent_reach_it_joined():
    """The probe rendered without tools: with tools, Llama 3.2 Vision's template wrote the first
    user message's parts as a Python list, and the model got `[{'type': 'text', ...}]`."""
    builder = _builder(TRIMS_FIRST_WITH_TOOLS)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    parts = {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}
    with_tools = builder.render(PromptInput(messages=(parts,), tools=(tool,), add_generation_prompt=False))
    assert with_tools == "<|user|>Hi\nthere<|end|>"
    without = builder.render(PromptInput(messages=(parts,), add_generation_prompt=False))
    assert without == "<|user|>Hithere<|end|>"
