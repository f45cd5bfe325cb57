"""Tiny random-weight checkpoints, built offline and saved like real ones.

Everything goes through `save_pretrained`, so the server loads these exactly as it loads a hub model.
The tokenizer is a byte-level BPE trained here on generated text that includes accented letters,
CJK and emoji: rare characters stay split across several byte tokens, which is what the incremental
detokenizer has to survive. Weights are random, so output is noise, but deterministic for a seed.

    python -m models.tiny --out DIR --kind tiny|tiny-vlm
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

# Bump when the output of a builder changes, so `ensure_builtin` never reuses a stale build.
BUILD_VERSION = 1

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
IMAGE_TOKEN = "<image>"
# Wider than the usual 0.02 (and embeddings untied): random logits then have clear winners, so
# greedy decoding does not flip on rounding differences between batched and single runs.
INIT_STD = 0.1

# Qwen2's split: single digits, letters with one leading non-letter, punctuation runs.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_WORDS = (
    "the of and to in is that it for was on are as with be at by this have from or one had not but "
    "what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make "
    "than first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know get through back much before go good new write our "
    "used me man too any day same right look think also around another came come work three word must "
    "because does part even place well such here take why things help put years different away again "
    "server model token request stream batch queue image answer question hello world weather city json"
).split()
_SYLLABLES = "ka lo mi ne ru ta shi ven dor al ex im pro ter qua zen bri stal mor phi gra un re de".split()
_ACCENTED = "café naïve résumé Zürich São Paulo jalapeño façade crème brûlée Ångström smörgåsbord".split()
# Frequent enough to become whole tokens; the rest of Unicode stays as raw bytes.
_CJK = "你好 世界 谢谢 中文 日本語 東京 こんにちは ありがとう 한국어 안녕하세요".split()
_EMOJI = ["😀", "🚀", "👍", "🎉", "❤️", "✨"]
_PUNCT = [".", ",", "!", "?", ":", ";", " -", "...", "(", ")", '"', "'"]


def _corpus(rng: random.Random, num_lines: int) -> list[str]:
    """Deterministic English-ish lines with numbers, JSON, tool calls and multi-byte text."""

    def word() -> str:
        roll = rng.random()
        if roll < 0.55:
            return rng.choice(_WORDS)
        if roll < 0.8:
            return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
        if roll < 0.88:
            return str(rng.randint(0, 10 ** rng.randint(1, 6)))
        if roll < 0.94:
            return rng.choice(_ACCENTED)
        if roll < 0.98:
            return rng.choice(_CJK)
        return rng.choice(_EMOJI)

    lines = []
    for _ in range(num_lines):
        kind = rng.random()
        if kind < 0.12:
            key, value = rng.choice(_WORDS), word()
            lines.append(
                f'{{"{key}": "{value}", "n": {rng.randint(0, 999)}, "ok": {rng.choice(["true", "false"])}}}'
            )
        elif kind < 0.18:
            lines.append(
                f'{TOOL_CALL_OPEN}\n{{"name": "get_{rng.choice(_WORDS)}", '
                f'"arguments": {{"{rng.choice(_WORDS)}": "{word()}"}}}}\n{TOOL_CALL_CLOSE}'
            )
        else:
            words = [word() for _ in range(rng.randint(4, 16))]
            text = " ".join(words)
            lines.append(text[:1].upper() + text[1:] + rng.choice(_PUNCT))
    return lines


def build_tokenizer(
    vocab_size: int, *, seed: int = 0, extra_special: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on generated text, wrapped as a transformers fast tokenizer."""
    # Like Qwen2.5: tool-call tags are atomic tokens but not special, so decoding with
    # skip_special_tokens=True keeps them for the tool-call parser.
    special = [ENDOFTEXT, IM_START, IM_END, *extra_special]
    plain = [TOOL_CALL_OPEN, TOOL_CALL_CLOSE]
    num_added = len(special) + len(plain)

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - num_added,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # More text for bigger vocabularies, so training reaches the requested size.
    num_lines = max(4000, vocab_size * 4)
    tok.train_from_iterator(_corpus(random.Random(seed), num_lines), trainer=trainer)

    # Added after training so the ids sit at the end of the vocabulary, in this order, as in Qwen2.5.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, *extra_special],
        clean_up_tokenization_spaces=False,
    )


# ChatML as in Qwen2.5, with Hermes-style tools. Content may be a string, null, or a list of
# OpenAI content parts; image parts render the image token (or fail for text-only models).
_CHAT_TEMPLATE = r"""{%- macro render(content) -%}
{%- if content is none -%}
{%- elif content is string -%}{{- content -}}
{%- elif content is mapping -%}{{- render([content]) -}}
{%- else -%}
{%- for part in content -%}
{%- if part is string -%}{{- part -}}
{%- elif part.type == 'text' -%}{{- part.text -}}
{%- elif part.type in ('image', 'image_url') -%}@@IMAGE@@
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if messages and messages[0].role == 'system' -%}{{- render(messages[0].content) -}}
{%- else -%}{{- 'You are a helpful assistant.' -}}{%- endif -%}
{{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}{{- '\n' -}}{{- tool | tojson -}}{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif messages and messages[0].role == 'system' -%}
{{- '<|im_start|>system\n' + render(messages[0].content) + '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) -%}
{{- '<|im_start|>' + message.role + '\n' + render(message.content) + '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{{- '<|im_start|>assistant' -}}
{%- if message.content -%}{{- '\n' + render(message.content) -}}{%- endif -%}
{%- for tool_call in message.tool_calls -%}
{%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}{%- endif -%}
{{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' -}}
{%- if tool_call.arguments is string -%}{{- tool_call.arguments -}}{%- else -%}{{- tool_call.arguments | tojson -}}{%- endif -%}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + render(message.content) + '\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""


# Mistral's format (v3 tokenizer, as Mistral 7B v0.3 and Nemo): [INST] turns, the tools before the
# last user turn, calls as a JSON list after [TOOL_CALLS], results in [TOOL_RESULTS]. Tool-call ids
# must be Mistral's 9 letters and digits, as in the real templates.
MISTRAL_TOKENS = (
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)
MISTRAL_CHAT_TEMPLATE = r"""{%- if messages and messages[0].role == 'system' -%}
{%- set system = messages[0].content -%}{%- set loop_messages = messages[1:] -%}
{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}
{%- set last_user = namespace(index=-1) -%}
{%- for message in loop_messages -%}{%- if message.role == 'user' -%}{%- set last_user.index = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for message in loop_messages -%}
{%- if message.role == 'user' -%}
{%- if tools and loop.index0 == last_user.index -%}{{- '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' -}}{%- endif -%}
{{- '[INST]' -}}{%- if system is defined and loop.index0 == last_user.index -%}{{- system + '\n\n' -}}{%- endif -%}
{{- message.content + '[/INST]' -}}
{%- elif message.role == 'assistant' and message.tool_calls -%}
{{- '[TOOL_CALLS][' -}}
{%- for call in message.tool_calls -%}
{%- if call.id is not string or call.id | length != 9 -%}{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') -}}{%- endif -%}
{{- {'name': call.function.name, 'arguments': call.function.arguments, 'id': call.id} | tojson -}}
{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
{%- endfor -%}
{{- ']' + eos_token -}}
{%- elif message.role == 'assistant' -%}
{{- message.content + eos_token -}}
{%- elif message.role == 'tool' -%}
{{- '[TOOL_RESULTS]' + {'content': message.content, 'call_id': message.tool_call_id} | tojson + '[/TOOL_RESULTS]' -}}
{%- endif -%}
{%- endfor -%}"""


def chat_template(image_token: str | None) -> str:
    """The ChatML template; image parts become `image_token`, or an error when it is None."""
    placeholder = (
        "{{- '" + image_token + "' -}}"
        if image_token
        else "{{- raise_exception('This model does not accept images.') -}}"
    )
    return _CHAT_TEMPLATE.replace("@@IMAGE@@", placeholder)


_TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


def _text_config(arch: str, *, tokenizer: PreTrainedTokenizerFast, sliding_window: int | None, **sizes):
    if arch not in _TEXT_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; expected one of: {', '.join(_TEXT_CONFIGS)}")
    if sliding_window is not None:
        if arch != "mistral":
            raise ValueError("sliding_window needs arch='mistral'")
        sizes["sliding_window"] = sliding_window
    elif arch == "mistral":
        sizes["sliding_window"] = None  # MistralConfig would default to a 4096-token window
    # Qwen2Config adds q/k/v attention bias by itself.
    return _TEXT_CONFIGS[arch](
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **sizes,
    )


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    im_end, endoftext = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    return GenerationConfig(eos_token_id=[im_end, endoftext], pad_token_id=endoftext, bos_token_id=None)


def _random_model(model_class, config, seed: int):
    model = model_class.from_config(config, dtype=torch.float32)
    # Re-drawn from a private generator: the global RNG (shared by replica threads that may build
    # at the same time) would make the weights depend on interleaving. Norms start as identity.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                std = INIT_STD if param.dim() > 1 else 0.02
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    # Saved in bf16 like real checkpoints; the loader picks the serving dtype.
    return model.to(torch.bfloat16).eval()


def build_text_model(
    out_dir: str | Path,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 4096,
    vocab_size: int = 1024,
    seed: int = 0,
    sliding_window: int | None = None,
    template: str | None = None,
    extra_special: tuple[str, ...] = (),
    with_chat_template: bool = True,
) -> Path:
    """A random-weight CausalLM (llama, qwen2 or mistral) with a trained tokenizer and, unless
    `template` says otherwise, the ChatML chat template; without `with_chat_template`, a base
    model: the tokenizer has no chat template at all."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size, seed=seed, extra_special=extra_special)
    tokenizer.model_max_length = max_position_embeddings
    if with_chat_template:
        tokenizer.chat_template = template or chat_template(None)
    config = _text_config(
        arch,
        tokenizer=tokenizer,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        sliding_window=sliding_window,
    )
    model = _random_model(AutoModelForCausalLM, config, seed)
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# Vision tower geometry: a 32x32 image in 8x8 patches is 16 patches (+1 CLS, dropped by the
# "default" feature strategy), so each image expands to 16 placeholder tokens.
VLM_IMAGE_SIZE = 32
VLM_PATCH_SIZE = 8
VLM_IMAGE_TOKENS = (VLM_IMAGE_SIZE // VLM_PATCH_SIZE) ** 2


def build_vlm_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A tiny LLaVA: CLIP vision tower + Llama text model, with a PIL-only LlavaProcessor."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(1024, seed=seed, extra_special=(IMAGE_TOKEN,))
    tokenizer.model_max_length = 4096
    template = chat_template(IMAGE_TOKEN)
    tokenizer.chat_template = template

    text_config = _text_config(
        "llama",
        tokenizer=tokenizer,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=4096,
        sliding_window=None,
    )
    vision_config = CLIPVisionConfig(
        image_size=VLM_IMAGE_SIZE,
        patch_size=VLM_PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=VLM_IMAGE_TOKENS,
        tie_word_embeddings=False,
    )
    model = _random_model(AutoModelForImageTextToText, config, seed)
    model.generation_config = _generation_config(tokenizer)

    # The PIL backend: transformers 5 prefers torchvision processors, which this server does not need.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": VLM_IMAGE_SIZE},
        crop_size={"height": VLM_IMAGE_SIZE, "width": VLM_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=VLM_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
        image_token=IMAGE_TOKEN,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_mistral_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """builtin:tiny speaking Mistral's chat format, its markers special tokens as in Mistral's
    tokenizers (a server picks the `mistral` tool-call format from the template)."""
    return build_text_model(
        out_dir, arch="mistral", seed=seed, template=MISTRAL_CHAT_TEMPLATE, extra_special=MISTRAL_TOKENS
    )


BUILTIN_MODELS: dict[str, Callable[..., Path]] = {
    "tiny": build_text_model,
    # `tiny` without a chat template, as base models ship.
    "tiny-base": functools.partial(build_text_model, with_chat_template=False),
    "tiny-vlm": build_vlm_model,
    "tiny-mistral": build_mistral_model,
}


def ensure_builtin(name: str, cache_dir: str | Path) -> Path:
    """Path to the built-in model `name`, building it under `cache_dir/builtin/` on first use."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; valid names: {', '.join(sorted(BUILTIN_MODELS))}")
    parent = Path(cache_dir) / "builtin"
    final = parent / f"{name}-v{BUILD_VERSION}"
    if final.is_dir():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: readers never see a half-written folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    try:
        BUILTIN_MODELS[name](staging)
        try:
            os.replace(staging, final)
        except OSError:
            # Another builder won the race (the target is now a non-empty folder); use theirs.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight model folder.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--kind", choices=sorted(BUILTIN_MODELS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = BUILTIN_MODELS[args.kind](args.out, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
