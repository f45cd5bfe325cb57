"""Tiny vision-language checkpoints of Idefics2 (image splitting, perceiver resampler),
DeepSeek-VL, VipLLaVA (features from several vision layers) and Ovis2 (visual indicator
embeddings: the generic path). Registered in vlm_builders.ARCHS."""

from __future__ import annotations

from pathlib import Path

from tests.unit.vlm_builder_parts import (
    TINY_VISION,
    parts_template,
    save_checkpoint,
    text_kwargs,
    tiny_tokenizer,
    token_ids,
)

# Idefics2's own format: "User:<image>text<end_of_utterance>\nAssistant:".
_IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_idefics2(out: Path) -> None:
    """Idefics2: each image split into four crops plus the whole, each resampled to 8 latents;
    its image processor divides by a scaled height that rounds to 0 on a 1-pixel-high image."""
    from transformers import Idefics2Config, Idefics2Processor, MistralConfig
    from transformers.models.idefics2.configuration_idefics2 import (
        Idefics2PerceiverConfig,
        Idefics2VisionConfig,
    )
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tok = tiny_tokenizer(extra=("<fake_token_around_image>", "<image>", "<end_of_utterance>"), bos="<s>")
    text = text_kwargs(tok, bos_token_id=tok.bos_token_id)
    text["sliding_window"] = None
    config = Idefics2Config(
        vision_config=Idefics2VisionConfig(**TINY_VISION),
        perceiver_config=Idefics2PerceiverConfig(
            hidden_size=64,
            resampler_n_latents=8,
            resampler_depth=1,
            resampler_n_heads=4,
            resampler_head_dim=16,
            num_key_value_heads=2,
        ),
        text_config=MistralConfig(**text),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    image_processor = Idefics2ImageProcessorPil(
        size={"shortest_edge": 32, "longest_edge": 64}, do_image_splitting=True
    )
    processor = Idefics2Processor(image_processor, tok, image_seq_len=8, chat_template=_IDEFICS2_TEMPLATE)
    save_checkpoint(out, config, processor)


def build_deepseek_vl(out: Path) -> None:
    """DeepSeek-VL: a SigLIP tower, a fixed number of image tokens, a Llama text model."""
    from transformers import DeepseekVLConfig, DeepseekVLProcessor, LlamaConfig, SiglipVisionConfig
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil

    tok = tiny_tokenizer({"image_token": "<image_placeholder>"}, bos="<｜begin▁of▁sentence｜>")
    config = DeepseekVLConfig(
        vision_config=SiglipVisionConfig(**TINY_VISION),
        text_config=LlamaConfig(**text_kwargs(tok, bos_token_id=tok.bos_token_id)),
        image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"),
        tie_word_embeddings=False,
    )
    image_processor = DeepseekVLImageProcessorPil(size={"height": 32, "width": 32}, min_size=8)
    processor = DeepseekVLProcessor(
        image_processor, tok, chat_template=parts_template("<image_placeholder>"), num_image_tokens=16
    )
    save_checkpoint(out, config, processor)


def build_vipllava(out: Path) -> None:
    """VipLLaVA: the projector reads the last two vision layers' features, normed together."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaProcessor, VipLlavaConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tiny_tokenizer({"image_token": "<image>"})
    config = VipLlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION),
        text_config=LlamaConfig(**text_kwargs(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layers=[-2, -1],
        tie_word_embeddings=False,
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor,
        tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=parts_template("<image>\n"),
        image_token="<image>",
    )
    save_checkpoint(out, config, processor)


def build_ovis2(out: Path) -> None:
    """Ovis2: image crops as visual-token distributions, plus embedded indicator tokens."""
    from transformers import Ovis2Config, Ovis2Processor, Qwen2Config
    from transformers.models.ovis2.configuration_ovis2 import Ovis2VisionConfig
    from transformers.models.ovis2.image_processing_pil_ovis2 import Ovis2ImageProcessorPil

    indicators = ("<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>")
    tok = tiny_tokenizer(extra=("<image>", "<IMG_ATOM>", *indicators))
    config = Ovis2Config(
        vision_config=Ovis2VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            vocab_size=64,
            hidden_stride=2,
        ),
        text_config=Qwen2Config(**text_kwargs(tok)),
        image_token_id=tok.convert_tokens_to_ids("<IMG_ATOM>"),
        visual_indicator_token_ids=token_ids(tok, *indicators),
        vocab_size=len(tok),
        hidden_size=64,
        tie_word_embeddings=False,
    )
    image_processor = Ovis2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = Ovis2Processor(
        image_processor, tok, chat_template=parts_template("<image>\n"), image_seq_length=4
    )
    save_checkpoint(out, config, processor)
