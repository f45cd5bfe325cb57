"""How long a request may run: the server's max-tokens cap, then the context and what a sequence
may hold on the replica; the errors name the field at fault."""

from __future__ import annotations

import dataclasses

from models.errors import ContextLengthExceededError, InvalidRequestError
from models.prompt import PreparedPrompt, PromptBuilder
from models.replica import ModelReplica
from scheduler.request import EngineRequest

# The request field that holds the prompt, by kind of request: where a prompt too long is the fault.
PROMPT_PARAM = {"chat": "messages", "completion": "prompt", "generate": "inputs"}


def resolve_lengths(
    request: EngineRequest, prepared: PreparedPrompt, builder: PromptBuilder, replica: ModelReplica, cap: int
) -> EngineRequest:
    """The server's max-tokens cap applies first (the seed clamps larger requests to it; reported
    in the request's warnings, never silent); then prompt plus completion must fit the context."""
    context = replica.loaded.max_context
    prompt_len = len(prepared.token_ids)
    if prompt_len == 0:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    params = request.params
    room = min(context, replica.max_seq_len) - prompt_len
    # A prompt already cut to MAX_INPUT_TOKENS was longer than the figure the error gives.
    cut = (
        f" after MAX_INPUT_TOKENS={builder.max_input_tokens} cut a longer prompt to its end"
        if any("MAX_INPUT_TOKENS" in warning for warning in prepared.warnings)
        else ""
    )
    if params.max_tokens is None:
        if room < 1:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens; the prompt alone is "
                f"{prompt_len} tokens{cut}.",
                param=PROMPT_PARAM.get(request.kind, "messages"),
            )
        max_tokens = min(cap, room, params.default_max_tokens or cap)
    else:
        max_tokens = params.max_tokens
        if max_tokens > cap:
            prepared.warnings.append(
                f"max_tokens {_shown(max_tokens)} was lowered to this server's limit of {cap} (MAX_NEW_TOKENS_DEFAULT)"
            )
            max_tokens = cap
        lowered = "" if max_tokens == params.max_tokens else f" (lowered from {_shown(params.max_tokens)})"
        if room < min(1, max_tokens):  # scoring (max_tokens 0) may fill the context
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens; the prompt alone is "
                f"{prompt_len} tokens{cut}.",
                param=PROMPT_PARAM.get(request.kind, "messages"),
            )
        if prompt_len + max_tokens > context:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens}{lowered} for the "
                "completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )
        if max_tokens > room:
            raise ContextLengthExceededError(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}{lowered}) exceeds the "
                f"{replica.max_seq_len} tokens a sequence may hold on this server",
                param="max_tokens",
            )
    builder.check_ids(params.logit_bias or (), param="logit_bias")
    builder.check_ids(params.stop_token_ids, param="stop_token_ids")
    if params.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens ({params.min_tokens}) is larger than max_tokens ({max_tokens})",
            param="min_tokens",
        )
    return dataclasses.replace(request, params=dataclasses.replace(params, max_tokens=max_tokens))


def _shown(number: int) -> str:
    """A client's number as a message quotes it: Python takes integers of 4,300 digits, and one
    echoed whole made a 4.5 KB X-Request-Warnings header (past some proxies' buffers)."""
    text = str(number)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"
