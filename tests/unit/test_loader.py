"""load_model on real tiny checkpoints: dtype and attention decisions, fallbacks, clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, LlavaProcessor

from models import load_choices, loader
from models.loader import LoadSpec, ModelLoadError, load_model, resolve_source
from models.tiny import BUILD_VERSION, IM_END, IMAGE_TOKEN


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("hub-cache"))


@pytest.fixture(scope="module")
def text_model(builtin_cache: str):
    return load_model(LoadSpec(source="builtin:tiny", cache_dir=builtin_cache))


@pytest.fixture(scope="module")
def vlm_model(builtin_cache: str):
    return load_model(LoadSpec(source="builtin:tiny-vlm", cache_dir=builtin_cache))


def test_resolve_source(builtin_cache: str) -> None:
    path = resolve_source(LoadSpec(source="builtin:tiny", cache_dir=builtin_cache))
    assert path == str(Path(builtin_cache) / "builtin" / f"tiny-v{BUILD_VERSION}")
    assert resolve_source(LoadSpec(source="org/model")) == "org/model"
    with pytest.raises(ModelLoadError, match="valid names: tiny, tiny-base, tiny-mistral, tiny-vlm"):
        resolve_source(LoadSpec(source="builtin:nope", cache_dir=builtin_cache))


def test_a_revision_for_a_local_folder_is_said_to_be_ignored(tiny_text_path) -> None:
    loaded = load_model(LoadSpec(source=str(tiny_text_path), dtype="fp32", revision="v2"))
    assert "MODEL_REVISION ignored: the model is a local folder, not a hub id" in loaded.decisions
    plain = load_model(LoadSpec(source=str(tiny_text_path), dtype="fp32"))
    assert not any("MODEL_REVISION" in line for line in plain.decisions)


def test_builtin_text_model(text_model) -> None:
    loaded = text_model
    assert not loaded.is_vision and loaded.processor is None
    assert loaded.dtype == torch.float32 and loaded.model.dtype == torch.float32
    assert "dtype=fp32 (bf16 requested; forced on CPU)" in loaded.decisions
    assert loaded.attn_impl == "sdpa"
    assert loaded.device == torch.device("cpu")
    assert loaded.tokenizer.convert_tokens_to_ids(IM_END) in loaded.eos_token_ids
    assert loaded.eos_token_ids == frozenset(
        loaded.tokenizer.convert_tokens_to_ids([IM_END, "<|endoftext|>"])
    )
    assert loaded.max_context == 4096
    assert loaded.chat_template and "<|im_start|>" in loaded.chat_template
    assert loaded.image_token_id is None
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_flash_attention_on_cpu_falls_back_to_sdpa_with_reason(text_model) -> None:
    [line] = [d for d in text_model.decisions if d.startswith("attention=")]
    assert line.startswith("attention=sdpa (flash_attention_2 requested;")
    assert "CUDA" in line


def test_builtin_vlm_model(vlm_model) -> None:
    loaded = vlm_model
    assert loaded.is_vision
    assert isinstance(loaded.processor, LlavaProcessor)
    assert loaded.tokenizer is loaded.processor.tokenizer
    assert loaded.image_token_id == loaded.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert loaded.tokenizer.convert_tokens_to_ids(IM_END) in loaded.eos_token_ids
    assert loaded.max_context == 4096
    assert loaded.dtype == torch.float32 and loaded.attn_impl == "sdpa"
    assert any(d.startswith("kind=vision-language") for d in loaded.decisions)
    assert "<image>" in loaded.chat_template


def test_strict_attention_raises_instead_of_falling_back(tiny_text_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="flash_attention_2"):
        load_model(LoadSpec(source=str(tiny_text_path), attn_strict=True))


def test_flash_attn_missing_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA branch cannot run here; the availability check itself is pure.
    monkeypatch.setattr(load_choices.importlib.util, "find_spec", lambda name: None)
    reason = load_choices.attention_unavailable("flash_attention_2", torch.device("cuda", 0), torch.bfloat16)
    assert reason == "flash_attn not installed"
    assert load_choices.attention_unavailable("flash_attention_2", torch.device("cuda", 0), torch.float32)
    assert load_choices.attention_unavailable("sdpa", torch.device("cpu"), torch.float32) is None


def _sdpa_breaks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    tried: list[str] = []
    real = AutoModelForCausalLM.from_pretrained

    def from_pretrained(*args, **kwargs):
        tried.append(kwargs.get("attn_implementation"))
        if kwargs.get("attn_implementation") == "sdpa":
            raise ValueError("simulated: sdpa kernel unavailable")
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return tried


def test_sdpa_failure_falls_back_to_eager(tiny_text_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tried = _sdpa_breaks(monkeypatch)
    loaded = load_model(LoadSpec(source=str(tiny_text_path), dtype="fp32", attn_impl="sdpa"))
    assert tried == ["sdpa", "eager"]
    assert loaded.attn_impl == "eager"
    [line] = [d for d in loaded.decisions if d.startswith("attention=")]
    assert (
        line.startswith("attention=eager (sdpa requested;") and "simulated: sdpa kernel unavailable" in line
    )
    assert "dtype=fp32 (requested)" in loaded.decisions


def test_sdpa_failure_with_strict_raises(tiny_text_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tried = _sdpa_breaks(monkeypatch)
    with pytest.raises(ModelLoadError, match="sdpa.*simulated"):
        load_model(LoadSpec(source=str(tiny_text_path), attn_impl="sdpa", attn_strict=True))
    assert tried == ["sdpa"]


def test_warmup_failure_falls_back(tiny_text_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def warmup(model, tokenizer, device):
        calls.append(model.config._attn_implementation)
        if len(calls) == 1:
            raise RuntimeError("simulated kernel crash")

    monkeypatch.setattr(loader, "_warmup", warmup)
    loaded = load_model(LoadSpec(source=str(tiny_text_path), attn_impl="sdpa"))
    assert calls == ["sdpa", "eager"] and loaded.attn_impl == "eager"


def test_eager_requested(tiny_text_path: Path) -> None:
    loaded = load_model(LoadSpec(source=str(tiny_text_path), attn_impl="eager", dtype="fp16"))
    assert loaded.attn_impl == "eager" and "attention=eager (requested)" in loaded.decisions
    assert "dtype=fp32 (fp16 requested; forced on CPU)" in loaded.decisions
    assert torch.get_default_dtype() == torch.float32  # no process-global state was touched


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (LoadSpec(source="builtin:tiny", dtype="int8"), "invalid dtype 'int8'"),
        (LoadSpec(source="builtin:tiny", attn_impl="flash"), "invalid attention implementation"),
        (LoadSpec(source="builtin:tiny", device="tpu"), "device"),
    ],
)
def test_invalid_spec(spec: LoadSpec, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda() -> None:
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(LoadSpec(source="builtin:tiny", device="cuda:0"))


def test_missing_local_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist") as redacted:
        load_model(LoadSpec(source=str(missing)))
    assert str(missing) not in str(redacted.value)
    with pytest.raises(ModelLoadError, match="does not exist") as shown:
        load_model(LoadSpec(source=str(missing), redact_source=False))
    assert str(missing) in str(shown.value)


def test_uncached_hub_id_offline(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="could not load model config") as info:
        load_model(LoadSpec(source="secret-org/secret-model", cache_dir=str(tmp_path)))
    assert "secret" not in str(info.value)


def test_logs_never_show_the_source(tiny_text_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="models.loader"):
        load_model(LoadSpec(source=str(tiny_text_path)))
    messages = [r.getMessage() for r in caplog.records if r.name == "models.loader"]
    assert messages and not any(str(tiny_text_path) in m for m in messages)


def test_a_configured_chat_template_replaces_the_checkpoints(builtin_cache: str) -> None:
    loaded = load_model(LoadSpec(source="builtin:tiny", cache_dir=builtin_cache, chat_template="{{ 'X' }}"))
    assert loaded.chat_template == "{{ 'X' }}"
    assert "chat_template=from --chat-template" in loaded.decisions


def test_a_classifier_checkpoint_is_refused_not_served_with_a_random_head(tiny_text_path, tmp_path) -> None:
    """A sequence classifier loaded as a causal LM gets a random lm_head from transformers: it was
    served as ready, answering from random weights. A config transformers has no causal LM for
    is said to be that, not an attention failure (it was retried with every kernel)."""
    import shutil

    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_text_path)
    config.num_labels = 2
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(config)
    classifier.config.architectures = [type(classifier).__name__]
    out = tmp_path / "classifier"
    classifier.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_text_path / name).exists():
            shutil.copy(tiny_text_path / name, out / name)
    with pytest.raises(ModelLoadError, match="do not fit") as refused:
        load_model(LoadSpec(source=str(out), dtype="fp32", attn_impl="sdpa"))
    assert "attention" not in str(refused.value)

    colpali = tmp_path / "colpali"
    shutil.copytree(out, colpali)
    (colpali / "config.json").write_text(
        '{"model_type": "colpali", "vlm_config": {"model_type": "paligemma"}}'
    )
    with pytest.raises(ModelLoadError) as unsupported:
        load_model(LoadSpec(source=str(colpali), dtype="fp32", attn_impl="sdpa"))
    assert "any attention implementation" not in str(unsupported.value)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_weights_are_one_clear_error_not_a_retry_per_attention_kernel(
    damage: str, tiny_text_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing or truncated model.safetensors was reported as "Attention sdpa unavailable" and
    read again with every other kernel (minutes each for a large model)."""
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(tiny_text_path, out)
    weights = out / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with caplog.at_level(logging.INFO), pytest.raises(ModelLoadError, match="weights could not be read"):
        load_model(LoadSpec(source=str(out), dtype="fp32", attn_impl="sdpa"))
    attempts = [r for r in caplog.records if r.getMessage().startswith("Loading model (attn=")]
    assert len(attempts) == 1
    assert not any("unavailable" in r.getMessage() for r in caplog.records)


def test_a_model_that_fails_alike_under_every_kernel_is_not_blamed_on_the_attention_kernels(
    tmp_path: Path,
) -> None:
    """DBRX without `clip_qkv` fails in transformers' own forward (torch.clamp with no bounds),
    whatever the attention: the error said "could not load ... with any attention implementation"."""
    from transformers import DbrxConfig, DbrxForCausalLM

    from models.tiny import build_tokenizer

    tokenizer = build_tokenizer(512)
    config = DbrxConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=512,
        vocab_size=512,
        attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
        ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
    )
    torch.manual_seed(0)
    DbrxForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as raised:
        load_model(LoadSpec(source=str(tmp_path), dtype="fp32", attn_impl="sdpa"))
    assert str(raised.value).startswith("the model fails alike with every attention implementation"), (
        raised.value
    )
    assert "clamp" in str(raised.value)
