"""Gemma 4's tiny vision-language checkpoint: per-layer text settings, soft image tokens pooled
from a variable patch grid, a processor with audio and video halves (built images-only, as the
server loads it without torchvision). Registered in vlm_builders.ARCHS."""

from __future__ import annotations

from pathlib import Path

from models.processors import images_only_processor_class
from tests.unit.vlm_builder_parts import save_checkpoint, text_kwargs, tiny_tokenizer, token_ids

_GEMMA4_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{{ '<|turn>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<turn|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}{%- endif -%}"
)


def build_gemma4(out: Path) -> None:
    """Gemma 4: sliding and global layers of different head sizes; 70 soft tokens per image (the
    smallest budget its image processor accepts)."""
    from transformers import Gemma4Processor
    from transformers.models.gemma4.configuration_gemma4 import (
        Gemma4Config,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    named = {
        "image_token": "<|image|>",
        "boi_token": "<|image>",
        "eoi_token": "<image|>",
        "audio_token": "<|audio|>",
        "boa_token": "<|audio>",
        "eoa_token": "<audio|>",
    }
    tok = tiny_tokenizer(named, extra=("<|turn>", "<turn|>", "<|video|>"), bos="<bos>")
    image, boi, eoi, audio, boa, eoa, video = token_ids(tok, *named.values(), "<|video|>")
    tok.image_token_id = image  # the processor reads it from the tokenizer
    config = Gemma4Config(
        text_config=Gemma4TextConfig(
            **text_kwargs(tok, bos_token_id=tok.bos_token_id),
            vocab_size_per_layer_input=len(tok),
            hidden_size_per_layer_input=16,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
            global_head_dim=32,
        ),
        vision_config=Gemma4VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=8,
            patch_size=16,
            pooling_kernel_size=3,
            position_embedding_size=1024,
        ),
        audio_config=None,
        boi_token_id=boi,
        eoi_token_id=eoi,
        image_token_id=image,
        video_token_id=video,
        boa_token_id=boa,
        eoa_token_index=eoa,
        audio_token_id=audio,
        tie_word_embeddings=False,
    )
    image_processor = Gemma4ImageProcessorPil(max_soft_tokens=70, patch_size=16, pooling_kernel_size=3)
    processor = images_only_processor_class(Gemma4Processor)(
        Gemma4AudioFeatureExtractor(),
        image_processor,
        tok,
        chat_template=_GEMMA4_TEMPLATE,
        image_seq_length=70,
    )
    save_checkpoint(out, config, processor)
