"""The tiny checkpoints load through the ordinary transformers path and behave like real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
)

from models import tiny
from models.tiny import (
    BUILD_VERSION,
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    MISTRAL_CHAT_TEMPLATE,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    VLM_IMAGE_TOKENS,
    build_text_model,
    ensure_builtin,
)

MULTIBYTE = "Café naïve Zürich — 你好世界, 日本語 한국어 😀🚀 🦀 🧪 ∮ 𝔘"


@pytest.fixture(scope="module")
def tokenizer(tiny_text_path: Path):
    return AutoTokenizer.from_pretrained(tiny_text_path)


@pytest.fixture(scope="module")
def processor(tiny_vlm_path: Path):
    return AutoProcessor.from_pretrained(tiny_vlm_path)


def test_tokenizer_round_trips_multibyte_text(tokenizer) -> None:
    for text in (MULTIBYTE, '{"city": "São Paulo", "temp": -3.5}', "  spaces\n\ttabs\r\n", "ü" * 7):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


def test_some_multibyte_characters_span_several_tokens(tokenizer) -> None:
    # A character absent from the training text falls back to its raw UTF-8 bytes.
    ids = tokenizer.encode("🦀", add_special_tokens=False)
    assert len(ids) > 1
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in pieces)  # a lone piece is not valid UTF-8
    assert tokenizer.decode(ids) == "🦀"


def test_special_tokens_and_generation_config(tiny_text_path: Path, tokenizer) -> None:
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in (ENDOFTEXT, IM_START, IM_END, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)
    }
    assert len(set(ids.values())) == 5
    assert tokenizer.eos_token_id == ids[IM_END]
    assert tokenizer.pad_token_id == ids[ENDOFTEXT]
    assert tokenizer.bos_token is None
    assert tokenizer.encode(f"{IM_START}user", add_special_tokens=False)[0] == ids[IM_START]
    # Tool-call tags are atomic and survive skip_special_tokens, as in Qwen2.5.
    text = f'{TOOL_CALL_OPEN}{{"name": "f"}}{TOOL_CALL_CLOSE}{IM_END}'
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert encoded[0] == ids[TOOL_CALL_OPEN] and encoded[-2:] == [ids[TOOL_CALL_CLOSE], ids[IM_END]]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == text.removesuffix(IM_END)

    generation = GenerationConfig.from_pretrained(tiny_text_path)
    assert generation.eos_token_id == [ids[IM_END], ids[ENDOFTEXT]]
    config = json.loads((tiny_text_path / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) == 1024
    assert config["max_position_embeddings"] == 4096


def test_chat_template_renders_tools_and_all_roles(tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}},
            ],
        },
        {"role": "tool", "content": "18C"},
        {"role": "tool", "content": [{"type": "text", "text": "20C"}]},
        {"role": "assistant", "content": "Paris 18C, Lyon 20C."},
    ]
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(tools[0]) + "\n</tools>" in text
    assert "<|im_start|>user\nWeather in Paris?<|im_end|>\n" in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}'
        "\n</tool_call><|im_end|>\n"
    ) in text
    assert (
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>"
        "\n<tool_response>\n20C\n</tool_response><|im_end|>\n"
    ) in text
    assert text.endswith("<|im_start|>assistant\nParis 18C, Lyon 20C.<|im_end|>\n<|im_start|>assistant\n")

    plain = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert (
        plain
        == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )


def test_mistral_template_renders_tools_calls_and_results(tokenizer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {
        "id": "abcDEF123",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "sunny"},
        {"role": "user", "content": "Thanks"},
    ]
    text = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, chat_template=MISTRAL_CHAT_TEMPLATE
    )
    assert text == (
        '[INST]Weather?[/INST][TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, '
        '"id": "abcDEF123"}]<|im_end|>[TOOL_RESULTS]{"content": "sunny", "call_id": "abcDEF123"}[/TOOL_RESULTS]'
        "[AVAILABLE_TOOLS]" + json.dumps(tools) + "[/AVAILABLE_TOOLS][INST]Be brief.\n\nThanks[/INST]"
    )
    messages[2]["tool_calls"] = [{**call, "id": "call_0123456789"}]
    with pytest.raises(Exception, match="length 9"):
        tokenizer.apply_chat_template(messages, tokenize=False, chat_template=MISTRAL_CHAT_TEMPLATE)


def test_text_template_refuses_images(tokenizer) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    with pytest.raises(Exception, match="does not accept images"):
        tokenizer.apply_chat_template(messages, tokenize=False)


def test_text_model_runs_over_the_whole_vocab(tiny_text_path: Path, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_text_path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    input_ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])  # [1, seq]
    with torch.inference_mode():
        logits = model(input_ids=input_ids).logits  # [1, seq, vocab]
    assert logits.shape == (1, input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_build_is_deterministic_and_parametric(tmp_path: Path) -> None:
    first = build_text_model(
        tmp_path / "a", arch="qwen2", hidden_size=32, num_heads=2, num_kv_heads=1, seed=3
    )
    second = build_text_model(
        tmp_path / "b", arch="qwen2", hidden_size=32, num_heads=2, num_kv_heads=1, seed=3
    )
    other = build_text_model(
        tmp_path / "c", arch="qwen2", hidden_size=32, num_heads=2, num_kv_heads=1, seed=4
    )
    weights = [load_file(p / "model.safetensors") for p in (first, second, other)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["lm_head.weight"], weights[2]["lm_head.weight"])
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert "model.layers.0.self_attn.q_proj.bias" in weights[0]  # qwen2 keeps its attention bias


def test_mistral_sliding_window(tmp_path: Path) -> None:
    path = build_text_model(tmp_path / "m", arch="mistral", sliding_window=16)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "MistralForCausalLM" and model.config.sliding_window == 16


def test_unknown_arch_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        build_text_model(tmp_path / "x", arch="gpt9")


def test_vlm_processor_expands_one_image(tiny_vlm_path: Path, processor) -> None:
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for part in ({"type": "image"}, {"type": "image_url", "image_url": {"url": "data:,"}}):
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "What is this?"}]}]
        for owner in (processor, processor.tokenizer):
            text = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            assert "<|im_start|>user\n<image>What is this?<|im_end|>" in text

    inputs = processor(images=[Image.new("RGB", (50, 37), (200, 30, 30))], text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == image_token_id).sum()) == VLM_IMAGE_TOKENS == 16
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_path)
    assert model.config.image_token_id == image_token_id
    with torch.inference_mode():
        logits = model(**inputs).logits  # [1, seq, vocab]; raises if the token count mismatches
    assert torch.isfinite(logits).all()


def test_ensure_builtin_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def counting_builder(out_dir):
        calls.append(Path(out_dir))
        return build_text_model(out_dir, hidden_size=16, num_heads=2, num_kv_heads=1, num_layers=1)

    monkeypatch.setitem(tiny.BUILTIN_MODELS, "tiny", counting_builder)
    first = ensure_builtin("tiny", tmp_path)
    assert first == tmp_path / "builtin" / f"tiny-v{BUILD_VERSION}"
    assert (first / "config.json").is_file()
    second = ensure_builtin("tiny", str(tmp_path))
    assert second == first and len(calls) == 1  # found, not built again
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no staging left behind


def test_ensure_builtin_tolerates_losing_the_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "builtin" / f"tiny-v{BUILD_VERSION}"

    def racing_builder(out_dir):
        # Another process finishes first while this one is still building.
        build_text_model(final, hidden_size=16, num_heads=2, num_kv_heads=1, num_layers=1)
        return build_text_model(out_dir, hidden_size=16, num_heads=2, num_kv_heads=1, num_layers=1)

    monkeypatch.setitem(tiny.BUILTIN_MODELS, "tiny", racing_builder)
    assert ensure_builtin("tiny", tmp_path) == final
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]


def test_ensure_builtin_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny, tiny-base, tiny-mistral, tiny-vlm"):
        ensure_builtin("huge", tmp_path)


def test_cli_builds_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny.main(["--out", str(tmp_path / "cli"), "--kind", "tiny"])
    assert (tmp_path / "cli" / "tokenizer.json").is_file()
    assert str(tmp_path / "cli") in capsys.readouterr().out
