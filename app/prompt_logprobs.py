"""Prompt-token logprobs (computed by the engine during prefill) in the two wire shapes clients read:
vLLM's `prompt_logprobs` and the legacy completions `logprobs` of an echoed prompt."""

from __future__ import annotations

from app.schemas.common import PromptLogprob, PromptLogprobs
from app.schemas.completions import CompletionLogprobs
from scheduler.request import TokenLogprob


def vllm_prompt_logprobs(entries: list[TokenLogprob], top: int) -> PromptLogprobs:
    """One dict per prompt token, token id -> {logprob, rank, decoded_token}: the prompt's own
    token first, then the `top` most likely (the engine may have computed more for another field).
    The first token's entry is null."""
    out: PromptLogprobs = []
    for entry in entries:
        if entry.logprob is None:
            out.append(None)
            continue
        item = {entry.token_id: PromptLogprob(entry.logprob, entry.rank, entry.token)}
        names = entry.top_tokens or []
        for rank, ((token_id, logprob), name) in enumerate(zip(entry.top[:top], names, strict=False), 1):
            item.setdefault(token_id, PromptLogprob(logprob, rank, name))
        out.append(item)
    return out


def echo_logprobs(entries: list[TokenLogprob], top: int) -> CompletionLogprobs:
    """The prompt's part of an echoed completion's `logprobs`: its first token has neither
    logprob nor alternatives (null, as OpenAI and vLLM write it); offsets count from 0 over the
    tokens' texts."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    offset = 0
    for entry in entries:
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        alternatives = None
        if entry.logprob is not None:
            names = entry.top_tokens or []
            alternatives = {name: lp for (_, lp), name in zip(entry.top[:top], names, strict=False)}
            alternatives.setdefault(entry.token, entry.logprob)  # the prompt's token always included
        top_logprobs.append(alternatives)
        text_offset.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(tokens, token_logprobs, top_logprobs, text_offset)


def joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    """The echoed prompt's logprobs followed by the completion's."""
    return CompletionLogprobs(
        first.tokens + then.tokens,
        first.token_logprobs + then.token_logprobs,
        first.top_logprobs + then.top_logprobs,
        first.text_offset + then.text_offset,
    )
