"""Request fields a route's Struct does not declare: refused when they would change the output,
ignored (and logged) when they would not.

OpenAI answers an unknown parameter with a 400; vLLM and SGLang clients send many extensions. The
policy, from most to least specific:

- `REFUSED`: known OpenAI and vLLM fields that change what is generated or returned, which this
  server does not implement: a 400 naming the field, unless the value is one that changes nothing
  (null, an empty list or object, or the listed no-op value such as `use_beam_search: false`).
  On /v1/responses, the Chat Completions fields it has no place for (`RESPONSES_REFUSED`) too.
- `IGNORED`: known fields that change nothing in the output (bookkeeping, routing, caching hints):
  accepted, logged at debug.
- Anything else: accepted as OpenAI-compatible clients (LangChain, LiteLLM) expect of servers with
  extensions, named in the answer's warnings (X-Request-Warnings, `warnings`: other APIs' names
  such as `num_predict` or `stop_sequences` would change the answer where they come from), and
  logged at info the first time each name is seen, so an operator learns what clients send that
  has no effect here.
"""

from __future__ import annotations

import logging
from typing import Any

from app.schemas.generate import GenerateParameters
from scheduler.errors import InvalidRequestError

log = logging.getLogger(__name__)

# Field -> (values that change nothing besides null and empty containers, why it is refused).
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_beam_search": ((False,), "beam search is not implemented"),
    "length_penalty": ((1, 1.0), "it applies to beam search, which is not implemented"),
    "best_of": ((1,), "it is a /v1/completions parameter"),
    "echo": ((False,), "it is a /v1/completions parameter"),
    "include_stop_str_in_output": ((False,), "stop strings are always left out of the output"),
    "spaces_between_special_tokens": ((True,), "special tokens are always decoded with spaces between them"),
    "truncate_prompt_tokens": ((), "prompts are truncated by the server's MAX_INPUT_TOKENS only"),
    "allowed_token_ids": ((), "use logit_bias or a guided_* constraint"),
    "bad_words": ((), "use logit_bias"),
    "logits_processors": ((), "custom logits processors are not accepted"),
    "vllm_xargs": ((), "custom logits processor arguments are not accepted"),
    "typical_p": ((1, 1.0), "typical sampling is not implemented"),
    "continue_final_message": ((False,), "continuing the last assistant message is not implemented"),
    "add_special_tokens": ((False,), "the chat template writes the special tokens"),
    "chat_template": (
        (),
        "per-request chat templates are not accepted; start the server with --chat-template",
    ),
    "documents": ((), "put the documents in the messages"),
    "mm_processor_kwargs": ((), "per-request processor arguments are not accepted"),
    "return_tokens_as_token_ids": ((False,), "tokens are returned as text"),
    "return_token_ids": ((False,), "token ids are not returned"),
    "functions": ((), "it is deprecated; use tools"),
    "function_call": ((), "it is deprecated; use tool_choice"),
    "audio": ((), "only text output is generated"),
    "modalities": ((["text"],), "only text output is generated"),
    "web_search_options": ((), "web search is not available"),
    "verbosity": (("medium",), "only 'medium', the default, is accepted"),
    "structural_tag": ((), "structural tags are not implemented; use response_format"),
    "max_new_tokens": ((), "it belongs to /generate's parameters; use max_tokens"),
    # The Responses API's names sent to Chat Completions or completions (a client moved the other
    # way): they would change the answer there, and nothing would happen here.
    "max_output_tokens": ((), "it is a /v1/responses field; use max_tokens (or max_completion_tokens)"),
    "instructions": ((), "it is a /v1/responses field; put the instructions in a system message"),
    "input": ((), "it is a /v1/responses field; use messages (prompt on /v1/completions)"),
    "text": ((), "it is a /v1/responses field; use response_format"),
    # OpenAI's moderation blocks flagged input or output ("block" mode) or scores it: no
    # moderation model runs here, so neither would happen.
    "moderation": ((), "no moderation model runs on this server"),
}

# Chat Completions and vLLM fields sent to /v1/responses (a client moved from one API to the
# other): the Responses API has them elsewhere or not at all, so they would be ignored there.
RESPONSES_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "messages": ((), "use input"),
    "max_tokens": ((), "use max_output_tokens"),
    "max_completion_tokens": ((), "use max_output_tokens"),
    "response_format": ((), "use text.format"),
    "structured_outputs": ((), "use text.format"),
    "guided_json": ((), "use text.format with a json_schema"),
    "guided_choice": ((), "use text.format with a json_schema"),
    "guided_regex": ((), "the Responses API has no regular-expression constraint"),
    "guided_grammar": ((), "the Responses API has no grammar constraint"),
    "guided_whitespace_pattern": ((), "the Responses API has no such constraint"),
    "n": ((1,), "the Responses API returns one answer"),
    "best_of": ((1,), "the Responses API returns one answer"),
    "logprobs": (
        (False,),
        'use include: ["message.output_text.logprobs"] (with top_logprobs for the alternatives)',
    ),
    "prompt_logprobs": ((), "prompt logprobs are a chat and completions field"),
    "reasoning_effort": ((), "use reasoning.effort"),
    "chat_template_kwargs": ((), "template arguments are a /v1/chat/completions field"),
    "add_generation_prompt": ((True,), "the generation prompt is always added"),
    "echo": ((False,), "it is a /v1/completions parameter"),
    "suffix": ((), "it is a /v1/completions parameter"),
    **{
        name: ((), "the Responses API has no such sampling parameter (temperature and top_p only)")
        for name in (
            "stop",
            "stop_token_ids",
            "seed",
            "logit_bias",
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
            "top_k",
            "min_p",
            "min_tokens",
        )
    },
    "ignore_eos": ((False,), "the Responses API has no such sampling parameter"),
    "skip_special_tokens": ((True,), "special tokens are always left out of the text"),
    # OpenAI compacts a long conversation into a `compaction` item past the threshold; this
    # server never rewrites the input (prompts over MAX_INPUT_TOKENS are cut from the left).
    "context_management": ((), "conversations are not compacted on this server"),
}
RESPONSES_PATH = "/v1/responses"

# OpenAI and vLLM sampling fields sent to /generate (in `parameters` or beside it): TGI's
# parameters spell some differently and have no place for the others, so they would be ignored.
GENERATE_REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "max_tokens": ((), "use parameters.max_new_tokens"),
    "max_completion_tokens": ((), "use parameters.max_new_tokens"),
    "max_new_tokens": ((), "put it in parameters"),
    "min_tokens": ((0,), "use parameters.min_new_tokens"),
    "response_format": ((), "use parameters.grammar"),
    "structured_outputs": ((), "use parameters.grammar"),
    **{
        name: ((), "use parameters.grammar")
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
    },
    "n": ((1,), "/generate returns one sequence; use /v1/completions"),
    "logprobs": ((False,), "/generate returns no logprobs; use /v1/completions"),
    "top_logprobs": ((0,), "/generate returns no logprobs; use /v1/completions"),
    "ignore_eos": ((False,), "use /v1/completions"),
    **{
        name: ((0, 0.0), "it is not a /generate parameter; use /v1/completions")
        for name in ("presence_penalty", "min_p")
    },
    **{
        name: ((), "it is not a /generate parameter; use /v1/completions")
        for name in ("logit_bias", "stop_token_ids", "bad_words", "allowed_token_ids", "add_special_tokens")
    },
    # The other APIs' names for the input, and the advice REFUSED gives for them elsewhere.
    "max_output_tokens": ((), "use parameters.max_new_tokens"),
    "prompt": ((), "use inputs"),
    "input": ((), "use inputs"),
    "instructions": ((), "put them in inputs"),
    "messages": ((), "/generate takes raw text in inputs; send messages to /v1/chat/completions"),
    "text": ((), "use parameters.grammar"),
    # TGI's own parameters beside `parameters` instead of in it (`temperature: 0` at the top level
    # was ignored with a warning, and the answer sampled).
    **{name: ((), "put it in parameters") for name in GenerateParameters.__struct_fields__},
    # ... except at the values that change nothing there either (huggingface_hub's defaults).
    **{
        name: (neutral, "put it in parameters")
        for name, neutral in (
            ("details", (False,)),
            ("decoder_input_details", (False,)),
            ("top_n_tokens", (0,)),
            ("best_of", (1,)),
            ("typical_p", (1, 1.0)),
            ("watermark", (False,)),
        )
    },
}
GENERATE_PATH = "/generate"

# Field -> what it is for; none of them changes a token of the answer.
IGNORED: dict[str, str] = {
    "metadata": "stored-completion tags (nothing is stored)",
    "store": "OpenAI's completion storage (nothing is stored)",
    "service_tier": "OpenAI's processing tier",
    "prompt_cache_key": "OpenAI's cache routing hint (the prefix cache is automatic)",
    "prompt_cache_retention": "OpenAI's prompt-cache lifetime (the prefix cache keeps blocks while memory allows)",
    "prompt_cache_options": "OpenAI's cache breakpoints and lifetime (the prefix cache is automatic)",
    "safety_identifier": "an end-user id for abuse tracking",
    "prediction": "predicted output, a latency optimisation only",
    "priority": "vLLM's scheduling priority (requests are served first come, first served)",
    "request_id": "vLLM's request id (X-Request-Id is used instead)",
    "cache_salt": "vLLM's prefix-cache isolation salt",
    "kv_transfer_params": "vLLM's disaggregated-prefill parameters",
    "guided_decoding_backend": "vLLM's grammar backend choice (llguidance is the only one)",
}

_MAX_REMEMBERED = 256  # unknown names logged once each, up to this many (clients choose the names)
_MAX_WARNED = 8  # unknown names named in one answer's warnings (a header has a size limit)
_seen_unknown: set[str] = set()


def check_undeclared(body: object, declared: tuple[str, ...] | frozenset[str], path: str) -> list[str]:
    """Raise InvalidRequestError for a refused field with an effective value; log the rest, and
    return a warning for each unknown one."""
    if not isinstance(body, dict):
        return []
    extra = sorted(set(body) - set(declared))
    warnings = []
    refused = {
        RESPONSES_PATH: {**REFUSED, **RESPONSES_REFUSED},
        GENERATE_PATH: {**REFUSED, **GENERATE_REFUSED},
    }.get(path, REFUSED)
    ignored = []
    for name in extra:
        value = body[name]
        if name in refused:
            noop, why = refused[name]
            if not _changes_nothing(value, noop):
                raise InvalidRequestError(f"{name} is not supported on {path}: {why}", param=name)
            ignored.append(name)
        elif name in IGNORED:
            ignored.append(name)
        else:
            warnings.append(f"unknown field {name[:64]!r} ignored")
            if name not in _seen_unknown and len(_seen_unknown) < _MAX_REMEMBERED:
                _seen_unknown.add(name)
                log.info(
                    "%s: unknown request field %r accepted and ignored (logged once per name)",
                    path,
                    name[:64],
                )
    if ignored:
        log.debug("%s: ignored fields that change nothing: %s", path, ", ".join(ignored))
    return warnings[:_MAX_WARNED] + (
        [f"{len(warnings) - _MAX_WARNED} more unknown fields ignored"] if len(warnings) > _MAX_WARNED else []
    )


def _changes_nothing(value: Any, noop: tuple[Any, ...]) -> bool:
    if value is None or (isinstance(value, (list, dict, str)) and not value):
        return True
    # `type(...) is` keeps `1` from passing for `True` (and the reverse).
    return any(type(value) is type(ok) and value == ok for ok in noop)
