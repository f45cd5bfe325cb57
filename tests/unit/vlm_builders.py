"""Tiny random vision-language checkpoints, one builder per architecture, each saved with its real
processor class (PIL image processor, a tokenizer with the architecture's special tokens, a chat
template in that family's style). Used by test_vlm_architectures.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.processors import images_only_processor_class
from tests.unit.vlm_builder_parts import (
    GREEDY,
    MAX_NEW,
    TINY_VISION,
    VOCAB,
    parts_template,
    save_checkpoint,
    text_kwargs,
    tiny_tokenizer,
    token_ids,
)
from tests.unit.vlm_builders_gemma import build_gemma4
from tests.unit.vlm_builders_glm import build_glm4v
from tests.unit.vlm_builders_mistral import build_lighton_ocr, build_llava_pixtral, build_mistral3
from tests.unit.vlm_builders_more import build_deepseek_vl, build_idefics2, build_ovis2, build_vipllava
from tests.unit.vlm_builders_qwen import build_qwen2_5_vl, build_qwen2_vl, build_qwen3_5, build_qwen3_vl

__all__ = ["ARCHS", "GREEDY", "MAX_NEW", "NOT_BUILT", "VOCAB", "Arch", "tiny_tokenizer"]


# --- checkpoint builders -------------------------------------------------------------------------


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

    tok = tiny_tokenizer({"image_token": "<image>"})
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION, projection_dim=32),
        text_config=LlamaConfig(**text_kwargs(tok)),
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
    save_checkpoint(out, config, processor)


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
    tok = tiny_tokenizer(
        extra=("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rows),
        bos="<|begin_of_text|>",
    )
    config = config_class(
        vision_config=vision_config_class(**TINY_VISION),
        text_config=LlamaConfig(**text_kwargs(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        tie_word_embeddings=False,
    )
    image_processor = image_processor_class(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    # (32 // 8) ** 2 patches, pixel-shuffled by 2 -> 4 image tokens per tile.
    processor = processor_class(image_processor, tok, image_seq_len=4, chat_template=_IDEFICS3_TEMPLATE)
    save_checkpoint(out, config, processor)


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

    tok = tiny_tokenizer({"image_token": "<image>"}, bos="<bos>")
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**TINY_VISION, projection_dim=64),
        text_config=GemmaConfig(**text_kwargs(tok, bos_token_id=tok.bos_token_id)),
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
    save_checkpoint(out, config, processor)


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

    tok = tiny_tokenizer(
        {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        extra=("<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
    )
    boi, eoi, image = token_ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    config = Gemma3Config(
        text_config=Gemma3TextConfig(
            **text_kwargs(tok, bos_token_id=tok.bos_token_id),
            query_pre_attn_scalar=16,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
        ),
        vision_config=SiglipVisionConfig(**TINY_VISION),
        mm_tokens_per_image=4,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=image,
        tie_word_embeddings=False,
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor, tok, chat_template=_GEMMA3_TEMPLATE, image_seq_length=4)
    save_checkpoint(out, config, processor)


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

    tok = tiny_tokenizer(
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
            **text_kwargs(tok, num_hidden_layers=4, bos_token_id=tok.bos_token_id),
            cross_attention_layers=[1, 3],
        ),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    image_processor = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor, tok, chat_template=_LLAMA3_TEMPLATE)
    save_checkpoint(out, config, processor, gates=1.5)


def build_internvl(out: Path) -> None:
    """InternVL 3: dynamic tiles (crop_to_patches), pixel shuffle, Qwen2 text model."""
    from transformers import InternVLConfig, InternVLProcessor, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    tok = tiny_tokenizer(
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
        text_config=Qwen2Config(**text_kwargs(tok)),
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
        chat_template=parts_template("<IMG_CONTEXT>\n"),
    )
    save_checkpoint(out, config, processor)


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

    tok = tiny_tokenizer(
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
    text = text_kwargs(tok, bos_token_id=tok.bos_token_id, sliding_window=8)
    text.pop("head_dim")
    config = AyaVisionConfig(
        vision_config=SiglipVisionConfig(**TINY_VISION),
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
    save_checkpoint(out, config, processor)


def build_llava_onevision(out: Path) -> None:
    """LLaVA-OneVision: SigLIP tower, anyres tiles with unpadding and image_newline, Qwen2 text model."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionProcessor, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = tiny_tokenizer({"image_token": "<image>", "video_token": "<video>"})
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**TINY_VISION),
        text_config=Qwen2Config(**text_kwargs(tok)),
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
        chat_template=parts_template("<image>\n"),
    )
    save_checkpoint(out, config, processor)


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
    # Per-layer text settings (head sizes differ by layer type); its processor hands the missing
    # video processor on by keyword (models.processors).
    Arch("gemma4", build_gemma4, "fast"),
    # Cross-attention layers read each request's vision states from its side blocks.
    Arch("mllama", build_mllama, "fast"),
    # M-RoPE positions computed per request from its image grid. The processors' video half needs
    # torchvision; the loader falls back to the processor without it (images only), as here.
    Arch("qwen2_vl", build_qwen2_vl, "fast"),
    Arch("qwen2_5_vl", build_qwen2_5_vl, "fast"),
    Arch("qwen3_vl", build_qwen3_vl, "fast"),
    # Hybrid text model (recurrent states per sequence): the generic path, decode steps merged with
    # each call's own M-RoPE positions.
    Arch("qwen3_5", build_qwen3_5, "generic"),
    Arch("internvl", build_internvl, "fast"),
    Arch("aya_vision", build_aya_vision, "fast"),
    # Pixtral's vision tower; its processor's module needs a torchvision helper (models.processors).
    Arch("mistral3", build_mistral3, "fast"),
    # A `llava` model whose checkpoint names PixtralProcessor: the processor it names is loaded.
    Arch("llava-pixtral", build_llava_pixtral, "fast"),
    # Pixtral's merger behind a processor that rounds to whole patches: long thin images are
    # stretched until the scaled short side holds two patches (models.images.MergerFit).
    Arch("lighton_ocr", build_lighton_ocr, "fast"),
    Arch("llava_onevision", build_llava_onevision, "fast"),
    # M-RoPE kept on the model between forwards (`rope_deltas`): each self-test probe's reference
    # starts without the last one's (the second self-test, after the CPU kernels, failed on it).
    Arch("glm4v", build_glm4v, "fast"),
    # Image splitting through a perceiver resampler; its processor fails on 1-pixel-high images,
    # which are enlarged and answered (with a warning).
    Arch("idefics2", build_idefics2, "fast"),
    Arch("deepseek_vl", build_deepseek_vl, "fast"),
    Arch("vipllava", build_vipllava, "fast"),
    # Visual indicator tokens embedded from the vision side: the fast path's self-test sees
    # different logits, and it runs on the generic path.
    Arch("ovis2", build_ovis2, "generic", "logits differ"),
]


# Not built here, and why (each needs a package the server does not install):
NOT_BUILT: dict[str, str] = {}
