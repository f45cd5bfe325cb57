"""Mistral 3's tiny vision-language checkpoint (Pixtral vision tower, patch merger, [IMG_BREAK]
rows): its processor's module imports a torchvision helper, so it is built, as the server loads
it without torchvision, through models.processors.processor_class. Registered in vlm_builders.ARCHS."""

from __future__ import annotations

from pathlib import Path

from models.processors import processor_class
from tests.unit.vlm_builder_parts import (
    TINY_VISION,
    parts_template,
    save_checkpoint,
    text_kwargs,
    tiny_tokenizer,
)

_MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST]' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '[IMG]' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}"
    "{%- endif -%}{%- endfor -%}"
)


def _pixtral_parts():
    """The tiny Pixtral tower's config and its image processor (64-pixel longest edge, 8-pixel
    patches), as the three Pixtral checkpoints here share them."""
    from transformers import PixtralVisionConfig
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    vision = PixtralVisionConfig(**{**TINY_VISION, "image_size": 64, "head_dim": 8})
    return vision, PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 8, "width": 8})


def build_mistral3(out: Path) -> None:
    """Mistral 3: 8-pixel patches merged 2x2, a row break after each row of merged patches."""
    from transformers import Mistral3Config, MistralConfig

    vision, image_processor = _pixtral_parts()
    tok = tiny_tokenizer(extra=("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"), bos="<s>")
    config = Mistral3Config(
        vision_config=vision,
        text_config=MistralConfig(**text_kwargs(tok)),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    processor = processor_class("PixtralProcessor")(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        spatial_merge_size=2,
        chat_template=_MISTRAL3_TEMPLATE,
    )
    save_checkpoint(out, config, processor)


def build_llava_pixtral(out: Path) -> None:
    """pixtral-12b's layout: a `llava` model with a Pixtral vision tower whose processor, named in
    the checkpoint, is a PixtralProcessor (not the `llava` model type's LlavaProcessor)."""
    from transformers import LlavaConfig, MistralConfig

    vision, image_processor = _pixtral_parts()
    tok = tiny_tokenizer(extra=("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"), bos="<s>")
    config = LlavaConfig(
        vision_config=vision,
        text_config=MistralConfig(**text_kwargs(tok)),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    processor = processor_class("PixtralProcessor")(
        image_processor=image_processor, tokenizer=tok, patch_size=8, chat_template=_MISTRAL3_TEMPLATE
    )
    save_checkpoint(out, config, processor)


def build_lighton_ocr(out: Path) -> None:
    """LightOnOCR: Pixtral's tower and merger under a Qwen3 text model; its processor rounds sides
    to whole patches, not merged ones, so a long thin image scaled to `longest_edge` can come out
    one patch high, which the merger cannot take."""
    from transformers import LightOnOcrConfig, Qwen3Config

    vision, image_processor = _pixtral_parts()
    tok = tiny_tokenizer(
        {
            "image_token": "<|image_pad|>",
            "image_break_token": "<|vision_pad|>",
            "image_end_token": "<|vision_end|>",
        }
    )
    config = LightOnOcrConfig(
        vision_config=vision,
        text_config=Qwen3Config(**text_kwargs(tok)),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        spatial_merge_size=2,
        tie_word_embeddings=False,
    )
    processor = processor_class("LightOnOcrProcessor")(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        spatial_merge_size=2,
        chat_template=parts_template("<|image_pad|>"),
    )
    save_checkpoint(out, config, processor)
