"""GLM-4.1V's tiny vision-language checkpoint (M-RoPE with partial rotary, image start/end tokens)
and Florence-2's (an encoder-decoder: BART text model behind a DaViT tower). Registered in
vlm_builders.ARCHS (GLM) or used on its own (Florence-2, whose output is decoder tokens only)."""

from __future__ import annotations

from pathlib import Path

from models.processors import images_only_processor_class
from tests.unit.vlm_builder_parts import parts_template, save_checkpoint, text_kwargs, tiny_tokenizer


def build_glm4v(out: Path) -> None:
    from transformers import Glm4vConfig
    from transformers.models.glm4v.configuration_glm4v import Glm4vTextConfig, Glm4vVisionConfig
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

    markers = ("<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>")
    tok = tiny_tokenizer({"image_token": "<|image|>", "video_token": "<|video|>"}, extra=markers)
    text = text_kwargs(tok)
    for name in ("head_dim", "bos_token_id", "eos_token_id", "tie_word_embeddings"):
        text.pop(name)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [1, 1, 2],
        "partial_rotary_factor": 0.5,
    }
    ids = dict(zip(markers, tok.convert_tokens_to_ids(list(markers)), strict=True))
    config = Glm4vConfig(
        text_config=Glm4vTextConfig(**text),
        vision_config=Glm4vVisionConfig(
            depth=2,
            hidden_size=32,
            num_heads=4,
            image_size=32,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            intermediate_size=64,
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video|>"),
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        tie_word_embeddings=False,
    )
    config.eos_token_id = tok.eos_token_id
    images = Glm4vImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
        patch_size=8,
        temporal_patch_size=2,
        merge_size=2,
    )
    processor = images_only_processor_class(Glm4vProcessor)(
        image_processor=images,
        tokenizer=tok,
        chat_template=parts_template("<|begin_of_image|><|image|><|end_of_image|>"),
    )
    save_checkpoint(out, config, processor)


def build_florence2(out: Path) -> None:
    from transformers import BartConfig, Florence2Config, Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

    tok = tiny_tokenizer({"image_token": "<image>"}, bos="<s>")
    config = Florence2Config(
        text_config=BartConfig(
            vocab_size=len(tok),
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            decoder_start_token_id=tok.eos_token_id,
            forced_eos_token_id=None,
        ),
        vision_config=Florence2VisionConfig(
            depths=(1, 1),
            patch_size=(7, 3),
            patch_stride=(4, 2),
            patch_padding=(3, 1),
            patch_prenorm=(False, True),
            embed_dim=(32, 64),
            num_heads=(2, 4),
            num_groups=(2, 4),
            window_size=2,
            projection_dim=64,
            max_position_embeddings=16,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    config.decoder_start_token_id = config.eos_token_id = tok.eos_token_id
    config.bos_token_id, config.pad_token_id = tok.bos_token_id, tok.pad_token_id
    images = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    images.image_seq_length = 17
    processor = Florence2Processor(images, tok, num_additional_image_tokens=1)
    processor.chat_template = parts_template("")
    save_checkpoint(out, config, processor)
