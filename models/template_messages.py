"""What the server hands a chat template besides the messages' text: tool calls in the shape
templates read, call ids a template accepts, the arguments the server passes itself; and the
spellings of special tokens that typed text must not become."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

# Mistral's templates refuse tool call ids that are not 9 letters and digits (`id|length != 9`).
# Mistral's templates: "length != 9" (Mistral v0.3, Nemo), "length < 9" (Mistral Small 3.1).
NINE_CHARACTER_IDS = re.compile(r"\|\s*length\s*(?:!=|==|<|>=)\s*9\b")
_NINE_ALNUM = re.compile(r"[A-Za-z0-9]{9}")
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


# apply_chat_template's own arguments that the server sets (passing one again in
# chat_template_kwargs was a TypeError, reported with transformers' internals in the message).
SERVER_TEMPLATE_ARGUMENTS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "chat_template",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)

# The special tokens transformers hands a template (a client's value would replace the tokenizer's
# own and could forge a turn).
SPECIAL_TOKEN_ARGUMENTS = frozenset(
    {
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
        "additional_special_tokens",
        "extra_special_tokens",
    }
)

# Template arguments the server refuses as top-level fields too: through chat_template_kwargs they
# reached the template and did what the refusal says is not done. Values that change nothing pass.
REFUSED_TEMPLATE_ARGUMENTS: dict[str, tuple[tuple[Any, ...], str]] = {
    "continue_final_message": ((False, None), "continuing the last assistant message is not implemented"),
    "documents": ((None, (), []), "put the documents in the messages"),
}


def nine_character_id(call_id: str) -> str:
    """The id as is when it is 9 letters and digits, else 9 drawn from its hash: a call and the
    result that names it map alike."""
    if _NINE_ALNUM.fullmatch(call_id):
        return call_id
    value = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    return "".join(_BASE62[(value // 62**i) % 62] for i in range(9))


def tool_call_for_template(call: Mapping[str, Any], *, arguments_as_text: bool = False) -> dict[str, Any]:
    """Templates read `arguments` as a mapping (Qwen, Hermes, Llama 3); OpenAI sends a JSON string,
    which `arguments_as_text` keeps (for templates that join it into the text)."""
    call = dict(call)
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str) and not arguments_as_text:
        try:
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            pass
    call["function"] = function
    return call


def message_tail(message: Mapping[str, Any], chars: int | None) -> Mapping[str, Any]:
    content = message.get("content")
    if chars is None:
        return message
    if isinstance(content, str) and len(content) > chars:
        return {**message, "content": content[-chars:]}
    if isinstance(content, list) and any(
        len(p.get("text") or "") > chars for p in content if isinstance(p, Mapping)
    ):
        parts = [{**p, "text": p["text"][-chars:]} if isinstance(p.get("text"), str) else p for p in content]
        return {**message, "content": parts}
    return message


def special_tokens_pattern(tokenizer, image_token: str | None) -> re.Pattern | None:
    """Every spelling the tokenizer would turn into a special (control) token, longest first."""
    spellings = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False) and token.content:
            spellings.add(token.content)
    if image_token:
        spellings.add(image_token)
    spellings = {s for s in spellings if len(s) > 1}
    if not spellings:
        return None
    return re.compile("|".join(re.escape(s) for s in sorted(spellings, key=len, reverse=True)))


def short_error(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def template_reads(template: str, name: str) -> bool:
    """Whether a chat template reads the variable `name` (`tools`): Jinja's own list of the
    variables it takes from its caller, so that `xml_tools` (SmolLM3) or `message['tools']`
    (Phi-4-mini) do not count. A template transformers' Jinja cannot parse: its text is searched."""
    try:
        import jinja2.meta
        from transformers.utils.chat_template_utils import _compile_jinja_template

        environment = _compile_jinja_template(template).environment
        return name in jinja2.meta.find_undeclared_variables(environment.parse(template))
    except Exception:
        return re.search(rf"(?<![\w.'\"\[]){re.escape(name)}\b", template) is not None


_NO_SYSTEM_ROLE = re.compile(
    r"system (role|message|prompt)s? (is |are )?not (supported|allowed)|(do|does|is) not support\w* (a |the )?system",
    re.IGNORECASE,
)


_POSITION = re.compile(r"\b(beginning|first|initial|start)")


def blamed_message(messages, error: str) -> str:
    """`messages[i]` for a template that refuses the system role (Gemma's "System role not
    supported"), naming the system message (on /v1/responses, `instructions`); for one that says
    roles must alternate (Mistral's, Gemma's), the first message that repeats the role before it;
    for one about where the system message goes, a system message that follows another turn;
    else `messages`. (Mistral's alternation error mentions "the optional system message": that
    message was blamed for a valid system turn.)"""
    messages = list(messages or ())
    roles = [message.get("role") for message in messages]
    lowered = error.lower()
    if _NO_SYSTEM_ROLE.search(error) and "system" in roles:
        return f"messages[{roles.index('system')}]"
    if "alternat" in lowered:
        previous = None
        for index, role in enumerate(roles):
            if role == "system" and previous is None:
                continue
            if role == previous:
                return f"messages[{index}]"
            previous = role
    # "System message must be at the beginning" (Qwen3.5), "... an initial optional system
    # message" (Mistral): a system message after another turn is the one at fault.
    if "system" in lowered and _POSITION.search(lowered):
        for index, role in enumerate(roles):
            if role == "system" and any(r != "system" for r in roles[:index]):
                return f"messages[{index}]"
    return "messages"


def template_repairs(
    tools: list[Mapping[str, Any]] | None, messages: list[Mapping[str, Any]], error: str
) -> list[tuple[list[Mapping[str, Any]] | None, list[Mapping[str, Any]]]]:
    """What to render again, in order, after a template failed on a request OpenAI accepts:
    - tools without `description` (optional in OpenAI's API) given an empty one, for templates
      that print it unguarded (Hermes'), when the error names it;
    - an assistant turn with several calls split into one turn per call, each followed by its
      result, for templates that take one call a turn (Llama 3.1's "only supports single
      tool-calls at once", while the same model wrote several when asked)."""
    variants = []
    if (
        tools
        and "description" in error
        and any("description" not in (t.get("function") or {}) for t in tools)
    ):
        tools = [described_tool(t) for t in tools]
        variants.append((tools, messages))
    if any(m.get("role") == "assistant" and len(m.get("tool_calls") or ()) > 1 for m in messages):
        variants.append((tools, one_call_per_turn(messages)))
    return variants


def one_call_per_turn(messages: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """[assistant(c1, c2), tool(r1), tool(r2)] -> [assistant(c1), tool(r1), assistant(c2), tool(r2)]:
    results paired with their call by `tool_call_id`, else in order; the content stays on the first."""
    out: list[Mapping[str, Any]] = []
    i = 0
    while i < len(messages):
        message, i = messages[i], i + 1
        calls = list(message.get("tool_calls") or ()) if message.get("role") == "assistant" else []
        if len(calls) < 2:
            out.append(message)
            continue
        results = []
        while i < len(messages) and messages[i].get("role") == "tool":
            results.append(messages[i])
            i += 1
        ids = [call.get("id") for call in calls]
        by_id = all(r.get("tool_call_id") in ids for r in results)
        for k, call in enumerate(calls):
            out.append({**message, "tool_calls": [call], **({"content": ""} if k else {})})
            mine = (
                [r for r in results if r.get("tool_call_id") == call.get("id")]
                if by_id
                else results[k : k + 1]
            )
            out.extend(mine)
        if not by_id:
            out.extend(results[len(calls) :])
    return out


def described_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """`tool` with an empty `description` where its function has none (for templates that print
    it unguarded; OpenAI makes it optional)."""
    function = tool.get("function")
    if not isinstance(function, Mapping) or "description" in function:
        return dict(tool)
    return {**tool, "function": {**function, "description": ""}}


# A template that loops over message content expects OpenAI-style part lists.
_ITERATES_CONTENT = re.compile(r"for\s+\w+\s+in\s+(?:\w+\[['\"]content['\"]\]|\w+\.content)")
_CHECKS_STRING = re.compile(r"content['\"]?\]?\s+is\s+(?:not\s+)?string")
_PROBE_TEXT = "zq7probe"


class ContentHandling(NamedTuple):
    accepts_parts: bool  # the template reads message content as OpenAI parts
    must: bool  # ... and only as parts (a string would be read character by character)
    roles: frozenset[str]  # the roles whose every text part it shows
    lossy: frozenset[str] = frozenset()  # roles it rendered with a part lost or as a Python list


NO_PARTS = ContentHandling(False, False, frozenset())


def content_handling(tokenizer, template: str | None, *, with_tools: bool = False) -> ContentHandling:
    """Whether `template` takes message content as OpenAI parts, whether it must get parts (a
    template that loops over content and never checks for a string reads a string character by
    character), and the roles whose parts it shows, every one of them. Loops the pattern misses
    (a macro's `for part in content`: Qwen3-VL's, the built-in demo's) are found by rendering;
    missed, such a template got strings, and an image became the bare image token instead of the
    template's own markup. Roles too are found by rendering, with two parts: Llama 3.2 Vision's
    and Pixtral's templates read parts in user turns only, and printed a system or assistant
    turn's parts as a Python list; Gemma 3's reads only the first part of a system message, and
    the others vanished. `with_tools`: rendered with a tool, as requests with tools are (Llama
    3.2 Vision's template then writes the first user message with `| trim`, a Python list)."""
    iterates = bool(_ITERATES_CONTENT.search(template or ""))
    if not template:
        return NO_PARTS
    tools = [_PROBE_TOOL] if with_tools else None
    if iterates:
        must = not _CHECKS_STRING.search(template)
    else:
        iterates = _shown(tokenizer, template, "user", _PARTS[:1], tools) is True
        must = iterates and _shown(tokenizer, template, "user", _PROBE_TEXT, tools) is not True
    if not iterates:
        return NO_PARTS
    shown = {
        r: _shown(tokenizer, template, r, _PARTS, tools) for r in ("user", "system", "assistant", "tool")
    }
    return ContentHandling(
        True,
        must,
        frozenset(r for r, seen in shown.items() if seen is True),
        frozenset(r for r, seen in shown.items() if seen is False),
    )


_PARTS = [{"type": "text", "text": _PROBE_TEXT}, {"type": "text", "text": _PROBE_TEXT[::-1]}]
_PROBE_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {}}}
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "f", "description": "", "parameters": {"type": "object"}},
}


def _shown(tokenizer, template: str, role: str, content: Any, tools: list | None = None) -> bool | None:
    """Whether `content` in a turn of `role` renders as its text: True when all of it appears and
    no Python or JSON rendering of a part does, False when the turn renders otherwise, None when
    the template refuses the probe conversation (nothing learnt)."""
    hello = {"role": "user", "content": "hello"}
    turn = {"role": role, "content": content}
    conversation = {
        "system": [turn, hello],
        "user": [turn],
        "assistant": [hello, turn],
        "tool": [
            hello,
            {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
            {**turn, "tool_call_id": "call_1"},
        ],
    }[role]
    text = _probe_render(
        tokenizer, template, conversation, generation_prompt=role != "assistant", tools=tools
    )
    if text is None:
        return None
    # A part printed as a Python dict, or as JSON (which a tool's own schema also is, with tools).
    if "'type'" in text or ('"type"' in text and not tools):
        return False
    if isinstance(content, str):
        return content in text
    return all(part["text"] in text for part in content)


def _probe_render(
    tokenizer, template: str, conversation: list, *, generation_prompt: bool = True, tools: list | None = None
) -> str | None:
    """A probe conversation rendered by `template`; None when the template refuses it."""
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            tools=tools,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=template,
        )
    except Exception:  # noqa: BLE001 - any template error means the form is not taken
        return None
    return text if isinstance(text, str) else None


_NO_TOOLS_SHOWN = (
    "this model's chat template does not show tools to the model, so it was not told of them; calls "
    "are still read from its output, and tool_choice required or a named function forces them"
)
_NO_RESULTS_SHOWN = (
    "this model's chat template does not show tool results (role tool) to the model: they were left out"
)
_NO_CALLS_SHOWN = (
    "this model's chat template does not show an assistant turn's tool_calls to the model: they were left out"
)


def template_omissions(tokenizer, template: str, messages, tools) -> list[str]:
    """What rendering leaves out without an error, said to the client: tools a template never
    reads (Gemma's, Phi-3's, SmolLM3's `xml_tools`), tool results and calls it never prints
    (Phi-3's template knows system, user and assistant turns only)."""
    reads_tools, shows_results, shows_calls = _tool_handling(tokenizer, template)
    warnings = [_NO_TOOLS_SHOWN] if tools and not reads_tools else []
    if not shows_results and any(m.get("role") in ("tool", "function") for m in messages):
        warnings.append(_NO_RESULTS_SHOWN)
    if not shows_calls and any(m.get("role") == "assistant" and m.get("tool_calls") for m in messages):
        warnings.append(_NO_CALLS_SHOWN)
    return warnings


_TOOL_HANDLING: dict[str, tuple[bool, bool, bool]] = {}  # by template: a server has one or two


def _tool_handling(tokenizer, template: str) -> tuple[bool, bool, bool]:
    """Whether `template` reads `tools`, shows a tool result's text, and shows a call (its name
    or its arguments):
    found once per template by rendering (a result or call it fails on counts as shown: the
    client then gets the template's own error)."""
    if template not in _TOOL_HANDLING:
        if len(_TOOL_HANDLING) >= 64:
            _TOOL_HANDLING.clear()
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": _PROBE_TEXT, "arguments": {"q": "zq7arg"}},
        }
        turns = [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": _PROBE_TEXT + "result"},
        ]
        text = _probe_render(tokenizer, template, turns)
        calls_shown = (
            text is None or "zq7arg" in text or _PROBE_TEXT in text.replace(_PROBE_TEXT + "result", "")
        )
        result_shown = text is None or _PROBE_TEXT + "result" in text
        if not result_shown:
            # A template that reads content as parts only gets the result as parts (content_handling):
            # probed as a string alone, it was said to leave out results it shows.
            turns[-1] = {**turns[-1], "content": [{"type": "text", "text": _PROBE_TEXT + "result"}]}
            as_parts = _probe_render(tokenizer, template, turns)
            result_shown = as_parts is None or _PROBE_TEXT + "result" in as_parts
        _TOOL_HANDLING[template] = (template_reads(template, "tools"), result_shown, calls_shown)
    return _TOOL_HANDLING[template]


def each_string(value: Any, change) -> Any:
    """`value` (JSON-like) with `change` applied to every string in it, keys left as they are."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, Mapping):
        return {key: each_string(item, change) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [each_string(item, change) for item in value]
    return value


def paligemma_prefix(messages, content_chars: int | None, as_text: Callable[[str], str]) -> str:
    """PaliGemma takes a task prefix, not a conversation: the text of every message, one per
    line (its processor puts the images and <bos> before it and a newline after)."""
    lines = []
    for message in messages or ():
        content = message_tail(message, content_chars).get("content")
        if isinstance(content, str):
            lines.append(as_text(content))
        elif isinstance(content, list):
            lines.extend(as_text(str(p["text"])) for p in content if p.get("type") == "text")
    return "\n".join(line for line in lines if line)
