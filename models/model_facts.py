"""Facts read off a loaded checkpoint's config, tokenizer and processor: the context length, the
end-of-sequence ids, the chat template and the image placeholder token."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

DEFAULT_MAX_CONTEXT = 2048
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Tokenizers without a known limit report a huge sentinel (transformers' VERY_LARGE_INTEGER).
_UNKNOWN_TOKENIZER_LIMIT = 10**9


def max_context(config: PreTrainedConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[int, str]:
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for source, cfg in (("text_config", text_config), ("config", config)):
        for key in _CONTEXT_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value, f"{source}.{key}"
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _UNKNOWN_TOKENIZER_LIMIT:
        return limit, "tokenizer.model_max_length"
    return DEFAULT_MAX_CONTEXT, "not found in config or tokenizer; default"


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(i for i in eos if isinstance(i, int))
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def chat_template(
    tokenizer: PreTrainedTokenizerBase, processor: ProcessorMixin | None, name: str = "default"
) -> str | None:
    """The checkpoint's chat template. Checkpoints with named templates (Hermes-2-Pro, Command-R)
    ship "default" and "tool_use": transformers renders a conversation with tools through the
    latter, and `name="tool_use"` finds it (None when there is no such template)."""
    for owner in (processor, tokenizer):
        template = getattr(owner, "chat_template", None)
        if isinstance(template, dict):
            template = template.get(name)
        elif name != "default":
            template = None
        if isinstance(template, str) and template:
            return template
    return None


def image_token_id(
    config: PreTrainedConfig, processor: ProcessorMixin | None, tokenizer: PreTrainedTokenizerBase
) -> int | None:
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    value = getattr(processor, "image_token_id", None)
    if isinstance(value, int):
        return value
    token = getattr(processor, "image_token", None)
    if isinstance(token, str):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            return token_id
    return None
