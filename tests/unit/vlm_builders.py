"""Tiny random vision-language checkpoints, one builder per architecture, each saved with its real
processor class (PIL image processor, a tokenizer with the architecture's special tokens, a chat
template in that family's style). Used by test_vlm_architectures.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from models.processors import images_only_processor_class
from models.tiny import ENDOFTEXT, IM_END, IM_START, _random_model, build_tokenizer

GREEDY = dict(temperature=0.0, ignore_eos=True)
VOCAB = 512
MAX_NEW = 10


# --- checkpoint builders -------------------------------------------------------------------------


def _tokenizer(named: dict[str, str] | None = None, extra: tuple[str, ...] = (), *, bos: str | None = None):
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


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


# The smallest vision tower every CLIP/SigLIP-style config accepts (32-pixel images, 16 patches).
_VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
)


def _text_kwargs(tokenizer, **overrides) -> dict:
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


def _save(out: Path, config, processor, *, gates: float | None = None) -> None:
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


def _parts_template(image: str) -> str:
    return _PARTS_TEMPLATE.replace("@@IMAGE@@", image)


# LLaVA-NeXT (llava-hf): images first, then text, content always a part list.
_LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_llava_next(out: Path) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = _tokenizer({"image_token": "<image>"})
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_VISION, projection_dim=32),
        text_config=LlamaConfig(**_text_kwargs(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_NEXT_TEMPLATE,
        image_token="<image>",
    )
    _save(out, config, processor)


_IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _build_tiled(
    out: Path, config_class, vision_config_class, image_processor_class, processor_class
) -> None:
    """Idefics3 and SmolVLM share a layout: image splitting into tiles, pixel_attention_mask, pixel shuffle."""
    from transformers import LlamaConfig

    rows = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
    tok = _tokenizer(
        extra=("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rows),
        bos="<|begin_of_text|>",
    )
    config = config_class(
        vision_config=vision_config_class(**_VISION),
        text_config=LlamaConfig(**_text_kwargs(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        tie_word_embeddings=False,
    )
    image_processor = image_processor_class(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    # (32 // 8) ** 2 patches, pixel-shuffled by 2 -> 4 image tokens per tile.
    processor = processor_class(image_processor, tok, image_seq_len=4, chat_template=_IDEFICS3_TEMPLATE)
    _save(out, config, processor)


def build_idefics3(out: Path) -> None:
    """Idefics3 (SmolVLM's parent)."""
    from transformers import Idefics3Config, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    _build_tiled(out, Idefics3Config, Idefics3VisionConfig, Idefics3ImageProcessorPil, Idefics3Processor)


def build_smolvlm(out: Path) -> None:
    """SmolVLM: its processor requires a video processor (torchvision), so it is built images-only,
    as the server's loader does."""
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMConfig, SmolVLMVisionConfig
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

    processor_class = images_only_processor_class(SmolVLMProcessor)
    _build_tiled(out, SmolVLMConfig, SmolVLMVisionConfig, SmolVLMImageProcessorPil, processor_class)


def build_paligemma(out: Path) -> None:
    """PaliGemma: prefix-LM (image + prompt attend bidirectionally), no chat template."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaProcessor, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = _tokenizer({"image_token": "<image>"}, bos="<bos>")
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**_VISION, projection_dim=64),
        text_config=GemmaConfig(**_text_kwargs(tok, bos_token_id=tok.bos_token_id)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=64,
        hidden_size=64,
        vocab_size=len(tok),
        tie_word_embeddings=False,
    )
    config.vision_config.projection_dim = 64
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    _save(out, config, processor)


_GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def build_gemma3(out: Path) -> None:
    """Gemma 3: image tokens attend to each other bidirectionally (token_type_ids), sliding layers."""
    from transformers import Gemma3Config, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = _tokenizer(
        {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        extra=("<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
    )
    boi, eoi, image = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    config = Gemma3Config(
        text_config=Gemma3TextConfig(
            **_text_kwargs(tok, bos_token_id=tok.bos_token_id),
            query_pre_attn_scalar=16,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
        ),
        vision_config=SiglipVisionConfig(**_VISION),
        mm_tokens_per_image=4,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=image,
        tie_word_embeddings=False,
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor, tok, chat_template=_GEMMA3_TEMPLATE, image_seq_length=4)
    _save(out, config, processor)


_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|image|>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def build_mllama(out: Path) -> None:
    """Llama 3.2 Vision: gated cross-attention layers read the image; tiles with aspect-ratio ids."""
    from transformers import MllamaConfig, MllamaProcessor
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = _tokenizer(
        extra=("<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"),
        bos="<|begin_of_text|>",
    )
    config = MllamaConfig(
        vision_config=MllamaVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=4,
            intermediate_size=64,
            vision_output_dim=64,
            intermediate_layers_indices=[0],
            image_size=32,
            patch_size=8,
            max_num_tiles=2,
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        ),
        text_config=MllamaTextConfig(
            # Two cross-attention layers of four: their states spread over every layer's pool.
            **_text_kwargs(tok, num_hidden_layers=4, bos_token_id=tok.bos_token_id),
            cross_attention_layers=[1, 3],
        ),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    image_processor = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor, tok, chat_template=_LLAMA3_TEMPLATE)
    _save(out, config, processor, gates=1.5)


_QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_vl(out: Path) -> None:
    """Qwen2-VL: M-RoPE (3-D positions for image tokens), image_grid_thw."""
    from transformers import Qwen2VLConfig, Qwen2VLProcessor
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer(
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        extra=("<|vision_start|>", "<|vision_end|>"),
    )
    image, video, start, end = _ids(
        tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    config = Qwen2VLConfig(
        text_config=Qwen2VLTextConfig(
            **_text_kwargs(tok),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=14),
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56})
    processor = images_only_processor_class(Qwen2VLProcessor)(
        image_processor=image_processor, tokenizer=tok, chat_template=_QWEN2_VL_TEMPLATE
    )
    _save(out, config, processor)


def build_qwen2_5_vl(out: Path) -> None:
    """Qwen2.5-VL: M-RoPE, windowed vision attention."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tokenizer(
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        extra=("<|vision_start|>", "<|vision_end|>"),
    )
    image, video, start, end = _ids(
        tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    config = Qwen2_5_VLConfig(
        text_config=Qwen2_5_VLTextConfig(
            **_text_kwargs(tok),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=Qwen2_5_VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56})
    processor = images_only_processor_class(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tok, chat_template=_QWEN2_VL_TEMPLATE
    )
    _save(out, config, processor)


def build_qwen3_vl(out: Path) -> None:
    """Qwen3-VL: interleaved M-RoPE, deepstack visual features added inside the text decoder."""
    from transformers import Qwen3VLConfig, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig

    tok = _tokenizer(
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        extra=("<|vision_start|>", "<|vision_end|>"),
    )
    image, video, start, end = _ids(
        tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    )
    config = Qwen3VLConfig(
        text_config=Qwen3VLTextConfig(
            **_text_kwargs(tok),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        vision_config=Qwen3VLVisionConfig(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            patch_size=16,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, patch_size=16, merge_size=2
    )
    processor = images_only_processor_class(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tok, chat_template=_QWEN2_VL_TEMPLATE
    )
    _save(out, config, processor)


def build_internvl(out: Path) -> None:
    """InternVL 3: dynamic tiles (crop_to_patches), pixel shuffle, Qwen2 text model."""
    from transformers import InternVLConfig, InternVLProcessor, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    tok = _tokenizer(
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        }
    )
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=(32, 32),
            patch_size=(8, 8),
        ),
        text_config=Qwen2Config(**_text_kwargs(tok)),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = images_only_processor_class(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=4,
        chat_template=_parts_template("<IMG_CONTEXT>\n"),
    )
    _save(out, config, processor)


_COHERE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' }}"
    "{% else %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|END_OF_TURN_TOKEN|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)


def build_aya_vision(out: Path) -> None:
    """Aya Vision: Cohere2 text model (sliding + global layers, logit scale), tiles, pixel shuffle."""
    from transformers import AyaVisionConfig, AyaVisionProcessor, Cohere2Config, SiglipVisionConfig
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = _tokenizer(
        extra=(
            "<image>",
            "<|START_OF_IMG|>",
            "<|END_OF_IMG|>",
            "<|IMG_PATCH|>",
            "<|IMG_LINE_BREAK|>",
            "<|START_OF_TURN_TOKEN|>",
            "<|USER_TOKEN|>",
            "<|CHATBOT_TOKEN|>",
            "<|END_OF_TURN_TOKEN|>",
        ),
        bos="<BOS_TOKEN>",
    )
    text = _text_kwargs(tok, bos_token_id=tok.bos_token_id, sliding_window=8)
    text.pop("head_dim")
    config = AyaVisionConfig(
        vision_config=SiglipVisionConfig(**_VISION),
        text_config=Cohere2Config(**text, layer_types=["sliding_attention", "full_attention"]),
        downsample_factor=2,
        image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"),
        tie_word_embeddings=False,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = AyaVisionProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        img_size=32,
        downsample_factor=2,
        chat_template=_COHERE_TEMPLATE,
    )
    _save(out, config, processor)


def build_llava_onevision(out: Path) -> None:
    """LLaVA-OneVision: SigLIP tower, anyres tiles with unpadding and image_newline, Qwen2 text model."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionProcessor, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = _tokenizer({"image_token": "<image>", "video_token": "<video>"})
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_VISION),
        text_config=Qwen2Config(**_text_kwargs(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = images_only_processor_class(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=_parts_template("<image>\n"),
    )
    _save(out, config, processor)


# --- the harness ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[Path], None]
    path: str  # the execution path the engine must choose
    why: str = ""  # a phrase of the engine's reason for the generic path


ARCHS = [
    Arch("llava_next", build_llava_next, "fast"),
    Arch("idefics3", build_idefics3, "fast"),
    Arch("smolvlm", build_smolvlm, "fast"),
    # Prefix-LM: image and prompt attend to each other (a declared span, from its token types).
    Arch("paligemma", build_paligemma, "fast"),
    # Each image's tokens attend to each other both ways (declared spans); sliding/global layers.
    Arch("gemma3", build_gemma3, "fast"),
    # Cross-attention layers read each request's vision states from its side blocks.
    Arch("mllama", build_mllama, "fast"),
    # M-RoPE positions computed per request from its image grid. The processors' video half needs
    # torchvision; the loader falls back to the processor without it (images only), as here.
    Arch("qwen2_vl", build_qwen2_vl, "fast"),
    Arch("qwen2_5_vl", build_qwen2_5_vl, "fast"),
    Arch("qwen3_vl", build_qwen3_vl, "fast"),
    Arch("internvl", build_internvl, "fast"),
    Arch("aya_vision", build_aya_vision, "fast"),
    Arch("llava_onevision", build_llava_onevision, "fast"),
]


# Not built here, and why (each needs a package the server does not install):
NOT_BUILT = {
    "mistral3/pixtral": "PixtralProcessor imports torchvision at import time; no images-only fallback is possible",
}
