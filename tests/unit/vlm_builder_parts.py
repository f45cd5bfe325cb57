"""What every tiny vision-language builder (vlm_builders.py, vlm_builders_qwen.py) shares: the
project's tokenizer with an architecture's special tokens, the smallest vision tower and text
model, a chat template over content parts, and saving a random-weight checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from models.tiny import ENDOFTEXT, IM_END, IM_START, _random_model, build_tokenizer

GREEDY = dict(temperature=0.0, ignore_eos=True)
VOCAB = 512
MAX_NEW = 10


def tiny_tokenizer(
    named: dict[str, str] | None = None, extra: tuple[str, ...] = (), *, bos: str | None = None
):
    """The project's tiny BPE tokenizer plus this architecture's special tokens. `named` ones become
    tokenizer attributes (`tokenizer.image_token`, `tokenizer.boi_token`, ...), as in real checkpoints."""
    from transformers import PreTrainedTokenizerFast

    named = dict(named or {})
    specials = tuple(dict.fromkeys([*named.values(), *extra, *([bos] if bos else [])]))
    base = build_tokenizer(VOCAB, extra_special=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=bos,
        extra_special_tokens=named or [IM_START],
        clean_up_tokenization_spaces=False,
    )


def token_ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


# The smallest vision tower every CLIP/SigLIP-style config accepts (32-pixel images, 16 patches).
TINY_VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
)


def text_kwargs(tokenizer, **overrides) -> dict:
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        bos_token_id=None,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    kwargs.update(overrides)
    return kwargs


def save_checkpoint(out: Path, config, processor, *, gates: float | None = None) -> None:
    from transformers import AutoModelForImageTextToText

    model = _random_model(AutoModelForImageTextToText, config, seed=0)
    if gates is not None:
        # Gated layers drawn near zero (tanh(0.02 x N(0, 1))) would barely touch the output, and a
        # test could not tell a wrong image path from a right one: open them wide.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_gate"):
                    param.fill_(gates)
    model.save_pretrained(out)
    processor.save_pretrained(out)


# Chat templates in the style of each family (what PromptBuilder must detect: part lists,
# string checks, images rendered from parts).
_PARTS_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}@@IMAGE@@"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def parts_template(image: str) -> str:
    return _PARTS_TEMPLATE.replace("@@IMAGE@@", image)
