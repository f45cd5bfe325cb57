"""Tiny random Qwen vision-language checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): M-RoPE positions
from each image's grid, the processors' images-only half. Registered in vlm_builders.ARCHS."""

from __future__ import annotations

from pathlib import Path

from models.processors import images_only_processor_class
from tests.unit.vlm_builder_parts import save_checkpoint, text_kwargs, tiny_tokenizer, token_ids

_QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The smallest vision tower of Qwen2.5-VL and Qwen3-VL, whose merger projects to the text width.
_MERGER_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64)


def _qwen_tokens():
    """The tokenizer with Qwen's vision tokens, and the config fields that name their ids."""
    tok = tiny_tokenizer(
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        extra=("<|vision_start|>", "<|vision_end|>"),
    )
    ids = token_ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    fields = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return tok, dict(zip(fields, ids, strict=True))


def _save_qwen(out: Path, config, processor_class, tok, image_processor) -> None:
    processor = images_only_processor_class(processor_class)(
        image_processor=image_processor, tokenizer=tok, chat_template=_QWEN2_VL_TEMPLATE
    )
    save_checkpoint(out, config, processor)


def build_qwen2_vl(out: Path) -> None:
    """Qwen2-VL: M-RoPE (3-D positions for image tokens), image_grid_thw."""
    from transformers import Qwen2VLConfig, Qwen2VLProcessor
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok, token_fields = _qwen_tokens()
    config = Qwen2VLConfig(
        text_config=Qwen2VLTextConfig(
            **text_kwargs(tok),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=14),
        **token_fields,
    )
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56})
    _save_qwen(out, config, Qwen2VLProcessor, tok, image_processor)


def build_qwen2_5_vl(out: Path) -> None:
    """Qwen2.5-VL: M-RoPE, windowed vision attention."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok, token_fields = _qwen_tokens()
    config = Qwen2_5_VLConfig(
        text_config=Qwen2_5_VLTextConfig(
            **text_kwargs(tok),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=Qwen2_5_VLVisionConfig(
            **_MERGER_VISION,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        **token_fields,
    )
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56})
    _save_qwen(out, config, Qwen2_5_VLProcessor, tok, image_processor)


def build_qwen3_vl(out: Path) -> None:
    """Qwen3-VL: interleaved M-RoPE, deepstack visual features added inside the text decoder."""
    from transformers import Qwen3VLConfig, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig

    tok, token_fields = _qwen_tokens()
    config = Qwen3VLConfig(
        text_config=Qwen3VLTextConfig(
            **text_kwargs(tok),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision_config=Qwen3VLVisionConfig(
            **_MERGER_VISION,
            patch_size=16,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        **token_fields,
    )
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, patch_size=16, merge_size=2
    )
    _save_qwen(out, config, Qwen3VLProcessor, tok, image_processor)


def build_qwen3_5(out: Path) -> None:
    """Qwen3.5: Qwen3-VL's vision side over a hybrid text model (Gated DeltaNet layers beside full
    attention), whose recurrent states send it to the generic path."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_5.configuration_qwen3_5 import (
        Qwen3_5Config,
        Qwen3_5TextConfig,
        Qwen3_5VisionConfig,
    )

    tok, token_fields = _qwen_tokens()
    config = Qwen3_5Config(
        text_config=Qwen3_5TextConfig(
            **text_kwargs(tok),
            layer_types=["linear_attention", "full_attention"],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
                "partial_rotary_factor": 1.0,
            },
        ),
        vision_config=Qwen3_5VisionConfig(**_MERGER_VISION, patch_size=16, num_position_embeddings=16),
        **token_fields,
    )
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, patch_size=16, merge_size=2
    )
    _save_qwen(out, config, Qwen3VLProcessor, tok, image_processor)
