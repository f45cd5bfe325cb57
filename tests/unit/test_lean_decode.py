"""The lean decode step: taken only by the Llama template's classes and only after answering bit
for bit as the runner's own step; every token it decodes the one the model's modules decode, with
rows of different lengths, packed or plain linears, per-head norms and sliding windows."""

from __future__ import annotations

import pytest
import torch

from models import cpu_kernels, cpu_rotary, lean_decode, lean_native
from models.attention import FULL, LayerRule, ObservedCall
from models.loader import LoadSpec
from models.params import SamplingParams
from models.prompt import PreparedPrompt
from models.replica import build_replica
from models.tiny import build_text_model, build_tokenizer
from tests.unit.configs import replica_config
from tests.unit.engine_driver import EngineDriver
from tests.unit.test_text_architectures import build

pytestmark = pytest.mark.slow  # builds and loads checkpoints


def _replica(path, **overrides):
    return build_replica(
        LoadSpec(source=str(path), dtype="fp32", attn_impl="sdpa"),
        replica_config(max_batch_size=8, **overrides),
    )


def _decode(
    replica, *, lean: bool, native: bool = True, lengths=(3, 40, 150), max_tokens=10, n=1
) -> list[list[list[int]]]:
    """Greedy and sampled outputs of prompts of `lengths` decoding together, with the lean step
    on or off (and its compiled layers, where installed, on or off)."""
    runner = replica.runner
    installed, runner.lean = runner.lean, runner.lean if lean else None
    compiled = None if installed is None else installed.native
    if installed is not None and not native:
        installed.native = None
    calls = []
    if runner.lean is not None:
        forward = runner.lean.forward
        runner.lean.forward = lambda *args: calls.append(1) or forward(*args)
    try:
        driver = EngineDriver(replica)
        streams = []
        for index, length in enumerate(lengths):
            prompt = PreparedPrompt([(11 * i + 5 * index + 1) % 500 + 3 for i in range(length)])
            greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            sampled = SamplingParams(max_tokens=max_tokens, temperature=0.9, seed=index, ignore_eos=True)
            streams.append(driver.submit(prompt, greedy))
            streams.append(driver.submit(prompt, sampled, n=n))
        driver.run(streams)
        if lean:
            assert calls, "no decode step went through the lean step"
        return [driver.outputs(stream) for stream in streams]
    finally:
        if lean:
            del runner.lean.forward
        runner.lean = installed
        if installed is not None:
            installed.native = compiled


@pytest.fixture(scope="module")
def packed_path(tmp_path_factory):
    """Layers wide enough to be packed, q/k/v and gate/up as one product each."""
    return build_text_model(
        tmp_path_factory.mktemp("lean") / "wide",
        hidden_size=512,
        intermediate_size=1024,
        num_heads=8,
        num_kv_heads=2,
    )


def test_a_cpu_llama_takes_it_and_decodes_the_same_tokens(tiny_text_path, monkeypatch):
    replica = _replica(tiny_text_path)
    assert replica.runner.lean is not None
    stored = []
    if cpu_rotary.pool_kernel() is not None:  # the keys and values go to the pool with the rotation
        into_pool = cpu_rotary.FusedRotary.into_pool
        monkeypatch.setattr(
            cpu_rotary.FusedRotary, "into_pool", lambda *args: stored.append(1) or into_pool(*args)
        )
    assert _decode(replica, lean=True, n=2) == _decode(replica, lean=False, n=2)
    assert bool(stored) == (cpu_rotary.pool_kernel() is not None)


def test_packed_siblings_run_as_one_product_and_decode_the_same_tokens(packed_path):
    replica = _replica(packed_path)
    lean = replica.runner.lean
    assert lean is not None and lean.layers[0].qkv is not None and lean.layers[0].gate_up is not None
    modules = _decode(replica, lean=False, n=2)
    assert _decode(replica, lean=True, native=False, n=2) == modules
    if lean_native.available():  # a CPU with AVX-512 and a C compiler
        assert lean.native is not None
        assert _decode(replica, lean=True, n=2) == modules


def _wide(model_type: str, out, **extra):
    """Layers wide enough for every linear to be packed (and the compiled layers to apply)."""
    sizes = {
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    }
    return _build(model_type, out, **sizes, **extra)


@pytest.mark.skipif(not lean_native.available(), reason="no AVX-512 or no C compiler here")
def test_compiled_layers_with_separate_products_per_head_norms_and_windows(tmp_path, monkeypatch):
    """q, k and v as three products (no sibling groups); heads narrower than the hidden size
    divided among them, with biases everywhere; Qwen2's q/k/v biases; Qwen3's query and key
    norms; Mistral's window, far past which the 150-token prompt decodes."""
    with monkeypatch.context() as patch:
        patch.setattr(cpu_kernels.SharedInputs, "groups", lambda self: [])
        separate = _replica(_wide("llama", tmp_path / "llama"))
    layer = separate.runner.lean.layers[0]
    assert layer.qkv is None and layer.gate_up is None and separate.runner.lean.native is not None
    # Heads narrower than hidden / heads, and biases on every projection.
    biased = _replica(_wide("llama", tmp_path / "biased", head_dim=32, attention_bias=True, mlp_bias=True))
    assert biased.runner.lean.native is not None
    assert biased.runner.model.model.layers[0].mlp.down_proj.bias is not None
    qwen2 = _replica(_wide("qwen2", tmp_path / "qwen2"))
    assert (
        qwen2.runner.lean.native is not None
        and qwen2.runner.model.model.layers[0].self_attn.q_proj.bias is not None
    )
    qwen3 = _replica(_wide("qwen3", tmp_path / "qwen3", head_dim=64))
    assert qwen3.runner.lean.native is not None and qwen3.runner.lean.layers[0].q_norm is not None
    mistral = _replica(_wide("mistral", tmp_path / "mistral", sliding_window=8))
    assert mistral.runner.lean.native is not None
    assert [layer.rule for layer in mistral.runner.lean.layers] == [LayerRule(window=8)] * 2
    for replica in (separate, biased, qwen2, qwen3, mistral):
        modules = _decode(replica, lean=False)
        assert _decode(replica, lean=True) == modules
        assert _decode(replica, lean=True, native=False) == modules


@pytest.mark.skipif(not lean_native.available(), reason="no AVX-512 or no C compiler here")
def test_compiled_layers_that_differ_by_one_bit_leave_the_python_loop(packed_path, monkeypatch):
    replica = _replica(packed_path)
    runner = replica.runner
    forward = lean_native.NativeLayers.forward

    def nudged(self, x, *args):
        out = forward(self, x, *args)
        out[0, 0] = torch.nextafter(out[0, 0], torch.tensor(float("inf")))
        return out

    monkeypatch.setattr(lean_native.NativeLayers, "forward", nudged)
    runner.lean = None
    decision = lean_decode.install(runner)
    assert "compiled layers off (its logits differ" in decision and decision.startswith(
        "lean decode step: on"
    )
    assert runner.lean is not None and runner.lean.native is None


def test_only_with_the_cpu_kernels_on(tiny_text_path):
    assert _replica(tiny_text_path, pack_cpu_linears=False).runner.lean is None


def _build(model_type: str, out, **extra):
    build(model_type, extra, build_tokenizer(512), out)
    return out


def test_per_head_norms_and_windows_as_the_runner_observed_them(tmp_path):
    """Qwen3's query and key norms; Mistral's window, which reaches attention only in the call."""
    qwen3 = _replica(_build("qwen3", tmp_path / "qwen3", head_dim=16))
    assert qwen3.runner.lean is not None and qwen3.runner.lean.layers[0].q_norm is not None
    assert _decode(qwen3, lean=True) == _decode(qwen3, lean=False)
    mistral = _replica(_build("mistral", tmp_path / "mistral", sliding_window=8))
    assert [layer.rule for layer in mistral.runner.lean.layers] == [LayerRule(window=8)] * 2
    # The 150-token prompt decodes far past the window.
    assert _decode(mistral, lean=True) == _decode(mistral, lean=False)


@pytest.mark.parametrize("model_type", ["gemma", "olmo2", "granite"])
def test_other_architectures_keep_the_model_s_modules(model_type, tmp_path):
    """Gemma scales its embeddings, OLMo2 normalises after each block, Granite multiplies its
    residuals: none is the template, whatever their modules are called."""
    extra = {"head_dim": 16} if model_type == "gemma" else {}
    replica = _replica(_build(model_type, tmp_path / model_type, **extra))
    assert replica.path == "fast" and replica.runner.lean is None
    lean, reason = lean_decode.build(replica.runner.model)
    assert lean is None and "not" in reason


def test_a_step_that_differs_by_one_bit_is_refused(tiny_text_path):
    replica = _replica(tiny_text_path)
    runner = replica.runner
    lean, _ = lean_decode.build(runner.model)
    nudged = lean.layers[-1].act
    lean.layers[-1].act = lambda x: torch.nextafter(nudged(x), torch.tensor(float("inf")))
    with torch.inference_mode():
        assert lean_decode.verify(runner, lean) == "its logits differ from the runner's own step"
    assert runner.lean is None


def test_attention_beyond_plain_is_refused(tiny_text_path):
    lean, _ = lean_decode.build(_replica(tiny_text_path).runner.model)
    plain = {layer.index: ObservedCall(FULL, 0.25, True) for layer in lean.layers}
    assert lean.adopt(plain) is None and lean.layers[0].scaling == 0.25
    assert "not plain" in lean.adopt({**plain, 1: ObservedCall(FULL, 0.25, False)})
    assert "was not called" in lean.adopt({0: plain[0]})
