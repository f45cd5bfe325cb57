"""Facts read off a loaded checkpoint's config, tokenizer and processor: the context length, the
end-of-sequence ids, the chat template and the image placeholder token; and whether the
checkpoint's weights fit the class it was loaded as."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

log = logging.getLogger(__name__)

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


def weights_not_loaded(model: PreTrainedModel, loading: dict) -> str | None:
    """Why `model` cannot be served as loaded, when the checkpoint's weights do not fit its class
    (a sequence or image classifier, ShieldGemma 2, loaded as a causal LM): transformers fills
    what is missing with random values, and the server answered from a random head as if ready.
    Its embeddings or output head missing, or most of its parameters, is that; fewer missing
    parameters are logged (randomly initialised, as transformers leaves them)."""
    missing = set(loading.get("missing_keys") or ())
    if not missing:
        return None
    names = {id(param): name for name, param in model.named_parameters(remove_duplicate=False)}
    core = [
        names[id(param)]
        for module in (model.get_input_embeddings(), model.get_output_embeddings())
        if module is not None
        for param in module.parameters()
        if names.get(id(param)) in missing
    ]
    total = sum(param.numel() for param in model.parameters()) or 1
    absent = sum(param.numel() for name, param in model.named_parameters() if name in missing)
    if core or absent > total // 2:
        examples = ", ".join(sorted(core or missing)[:3])
        return (
            f"the checkpoint's weights do not fit {type(model).__name__} ({len(missing)} of its parameters "
            f"are not in it, {examples} among them): it is not a checkpoint of a generative model (a "
            "classifier, or one that needs trust_remote_code)"
        )
    log.warning(
        "parameters missing from the checkpoint (randomly initialised): %s", ", ".join(sorted(missing)[:8])
    )
    return None
