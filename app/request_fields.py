"""Request fields a route's Struct does not declare: refused when they would change the output,
ignored (and logged) when they would not.

OpenAI answers an unknown parameter with a 400; vLLM and SGLang clients send many extensions. The
policy, from most to least specific:

- `REFUSED`: known OpenAI and vLLM fields that change what is generated or returned, which this
  server does not implement: a 400 naming the field, unless the value is one that changes nothing
  (null, an empty list or object, or the listed no-op value such as `use_beam_search: false`).
- `IGNORED`: known fields that change nothing in the output (bookkeeping, routing, caching hints):
  accepted, logged at debug.
- Anything else: accepted as OpenAI-compatible clients (LangChain, LiteLLM) expect of servers with
  extensions, and logged at info the first time each name is seen, so an operator learns what
  clients send that has no effect here.
"""

from __future__ import annotations

import logging
from typing import Any

from scheduler.errors import InvalidRequestError

log = logging.getLogger(__name__)

# Field -> (values that change nothing besides null and empty containers, why it is refused).
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_beam_search": ((False,), "beam search is not implemented"),
    "length_penalty": ((1, 1.0), "length_penalty applies to beam search, which is not implemented"),
    "best_of": ((1,), "best_of is supported on /v1/completions only"),
    "echo": ((False,), "echo is supported on /v1/completions only"),
    "include_stop_str_in_output": ((False,), "stop strings are always left out of the output"),
    "spaces_between_special_tokens": ((True,), "special tokens are always decoded with spaces between them"),
    "truncate_prompt_tokens": ((), "prompts are truncated by the server's MAX_INPUT_TOKENS only"),
    "allowed_token_ids": (
        (),
        "allowed_token_ids is not implemented; use logit_bias or a guided_* constraint",
    ),
    "bad_words": ((), "bad_words is not implemented; use logit_bias"),
    "logits_processors": ((), "custom logits processors are not supported"),
    "vllm_xargs": ((), "vllm_xargs (custom logits processor arguments) is not supported"),
    "typical_p": ((1, 1.0), "typical_p sampling is not implemented"),
    "continue_final_message": ((False,), "continue_final_message is not implemented"),
    "add_special_tokens": (
        (False,),
        "add_special_tokens on chat is not implemented (the template writes them)",
    ),
    "chat_template": (
        (),
        "per-request chat templates are not accepted; start the server with --chat-template",
    ),
    "documents": ((), "documents are not implemented; put them in the messages"),
    "mm_processor_kwargs": ((), "mm_processor_kwargs is not supported"),
    "return_tokens_as_token_ids": ((False,), "return_tokens_as_token_ids is not implemented"),
    "return_token_ids": ((False,), "return_token_ids is not implemented"),
    "functions": ((), "functions is deprecated and not supported; use tools"),
    "function_call": ((), "function_call is deprecated and not supported; use tool_choice"),
    "audio": ((), "audio output is not supported"),
    "modalities": ((["text"],), "only text output is supported"),
    "web_search_options": ((), "web search is not supported"),
    "verbosity": ((), "verbosity is not supported"),
    "structural_tag": ((), "structural tags are not supported"),
    "max_new_tokens": ((), "max_new_tokens belongs to /generate's parameters; use max_tokens"),
}

# Field -> what it is for; none of them changes a token of the answer.
IGNORED: dict[str, str] = {
    "metadata": "stored-completion tags (nothing is stored)",
    "store": "OpenAI's completion storage (nothing is stored)",
    "service_tier": "OpenAI's processing tier",
    "prompt_cache_key": "OpenAI's cache routing hint (the prefix cache is automatic)",
    "safety_identifier": "an end-user id for abuse tracking",
    "prediction": "predicted output, a latency optimisation only",
    "priority": "vLLM's scheduling priority (requests are served first come, first served)",
    "request_id": "vLLM's request id (X-Request-Id is used instead)",
    "cache_salt": "vLLM's prefix-cache isolation salt",
    "kv_transfer_params": "vLLM's disaggregated-prefill parameters",
    "guided_decoding_backend": "vLLM's grammar backend choice (llguidance is the only one)",
}

_MAX_REMEMBERED = 256  # unknown names logged once each, up to this many (clients choose the names)
_seen_unknown: set[str] = set()


def check_undeclared(body: object, declared: tuple[str, ...] | frozenset[str], path: str) -> None:
    """Raise InvalidRequestError for a refused field with an effective value; log the rest."""
    if not isinstance(body, dict):
        return
    extra = sorted(set(body) - set(declared))
    ignored = []
    for name in extra:
        value = body[name]
        if name in REFUSED:
            noop, why = REFUSED[name]
            if not _changes_nothing(value, noop):
                raise InvalidRequestError(f"{name} is not supported by this server: {why}", param=name)
            ignored.append(name)
        elif name in IGNORED:
            ignored.append(name)
        elif name not in _seen_unknown and len(_seen_unknown) < _MAX_REMEMBERED:
            _seen_unknown.add(name)
            log.info(
                "%s: unknown request field %r accepted and ignored (logged once per name)", path, name[:64]
            )
    if ignored:
        log.debug("%s: ignored fields that change nothing: %s", path, ", ".join(ignored))


def _changes_nothing(value: Any, noop: tuple[Any, ...]) -> bool:
    if value is None or (isinstance(value, (list, dict, str)) and not value):
        return True
    # `type(...) is` keeps `1` from passing for `True` (and the reverse).
    return any(type(value) is type(ok) and value == ok for ok in noop)
