"""Text architectures beyond Llama, on tiny random checkpoints: each loads, takes the path the
self-test picks, and produces exactly the greedy tokens of transformers' generate() (in a batch
with a second request on the fast path)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from models.loader import LoadSpec
from models.params import SamplingParams
from models.prompt import PreparedPrompt
from models.replica import build_replica
from models.tiny import build_tokenizer, chat_template
from tests.unit.configs import replica_config
from tests.unit.engine_driver import EngineDriver, hf_greedy

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
# DeepSeek's multi-head latent attention and experts, tiny.
_MLA = {
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 12,
    "head_dim": 8,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 1,
}
_FALCON = {
    "_model_type": "falcon",
    "_replace": True,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "new_decoder_architecture": False,
}
# model_type -> (extra config, expected path)
ARCHS = {
    "qwen2": ({}, "fast"),
    "qwen3": ({"head_dim": 16}, "fast"),
    "gemma": ({"head_dim": 16}, "fast"),
    "gemma3_text": ({"head_dim": 16, "sliding_window": 8}, "fast"),
    "mistral": ({"sliding_window": 8}, "fast"),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, "fast"),
    "phi3": ({"pad_token_id": 0}, "fast"),
    # LongRoPE: sequences past 64 tokens use the long factors; one that crosses during decode is
    # computed again, as generate() does.
    "phi3-longrope": (
        {
            "_model_type": "phi3",
            "pad_token_id": 0,
            "original_max_position_embeddings": 64,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [2.0 + 0.5 * i for i in range(8)],
                "original_max_position_embeddings": 64,
            },
        },
        "fast",
    ),
    # Its decoder layer does not pass keyword arguments on to attention (the layout is thread-local).
    "stablelm": ({}, "fast"),
    # MLA: keys of qk_nope + qk_rope, values of v_head_dim, as the model computes them.
    "deepseek_v2": ({**_MLA, "q_lora_rank": None}, "fast"),
    "deepseek_v3": ({**_MLA, "q_lora_rank": 24, "n_group": 1, "topk_group": 1}, "fast"),
    # Chunked attention on rope layers, temperature-tuned queries on the NoPE layer.
    "llama4_text": (
        {
            "head_dim": 16,
            "attention_chunk_size": 16,
            "no_rope_layers": [1, 0],
            "layer_types": ["chunked_attention", "full_attention"],
            "floor_scale": 8,
            "attn_scale": 0.5,
            "num_local_experts": 2,
            "intermediate_size_mlp": 128,
        },
        "fast",
    ),
    # The window reaches attention only through the mask (layer_types), not the attention call.
    "qwen2_moe": (
        {
            "use_sliding_window": True,
            "sliding_window": 8,
            "max_window_layers": 2,  # layer 0 slides, layer 1 is global
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
        },
        "fast",
    ),
    # Attention sinks and alternating sliding windows.
    "gpt_oss": (
        {"head_dim": 16, "sliding_window": 8, "num_local_experts": 4, "num_experts_per_tok": 2},
        "fast",
    ),
    "gpt2": ({"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512, "_replace": True}, "fast"),
    "gpt_neox": ({"num_key_value_heads": None}, "fast"),
    "opt": ({"ffn_dim": 128, "word_embed_proj_dim": 64, "num_key_value_heads": None}, "fast"),
    "olmo2": ({}, "fast"),
    "cohere": ({}, "fast"),
    "starcoder2": ({}, "fast"),
    "granite": ({}, "fast"),
    "smollm3": ({"pad_token_id": 0}, "fast"),
    # Its attention bypasses transformers' AttentionInterface: `models.falcon` gives it a forward
    # that calls the paged attention. Multi-query, as Falcon-7B.
    "falcon": ({**_FALCON, "new_decoder_architecture": False, "multi_query": True}, "fast"),
    # Grouped keys and values inside the fused projection, as Falcon-40B/180B and Falcon 2.
    "falcon-new-decoder": ({**_FALCON, "new_decoder_architecture": True, "num_kv_heads": 2}, "fast"),
    # Plain multi-head attention, sequential attention and MLP.
    "falcon-mha": ({**_FALCON, "multi_query": False, "parallel_attn": False}, "fast"),
    # ALiBi instead of rotary positions, as Falcon-RW: a per-head bias over key positions.
    "falcon-alibi": ({**_FALCON, "multi_query": False, "parallel_attn": False, "alibi": True}, "fast"),
    # Soft-capped attention logits, computed by an explicit softmax as the model's eager attention does.
    "gemma2": ({"head_dim": 16, "sliding_window": 8}, "fast"),
    # Per-layer settings the config refuses to read globally (head_dim: sliding 16, global 32),
    # the last two layers reading the keys and values of earlier ones, per-layer input embeddings.
    "gemma4_text": (
        {
            "num_hidden_layers": 4,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "head_dim": 16,
            "global_head_dim": 32,
            "sliding_window": 8,
            "num_kv_shared_layers": 2,
            "vocab_size_per_layer_input": 512,
            "hidden_size_per_layer_input": 16,
        },
        "fast",
    ),
    # Hybrids: linear layers keep a recurrent state per sequence, which the paged cache has no place
    # for, so they run on the generic path, their decode steps merged (states stacked by row).
    # Gated DeltaNet beside full attention, as Qwen3.5 and Qwen3-Next.
    "qwen3_5_text": ({"head_dim": 16, "layer_types": ["linear_attention", "full_attention"]}, "generic"),
    # Mamba-2 beside attention. Its prepare_inputs_for_generation takes only **kwargs, so generate()
    # checks its arguments against the forward's signature (the generic runner's interceptor's).
    "bamba": ({"attn_layer_indices": [1], "mamba_d_head": 16, "mamba_n_heads": 8}, "generic"),
    # Short convolutions beside attention, as LFM2.
    "lfm2": ({"layer_types": ["conv", "full_attention"]}, "generic"),
    # No attention at all: its output carries no past_key_values for the fast path's self-test.
    "mamba": (
        {"_drop": ["num_attention_heads", "num_key_value_heads"], "state_size": 8, "use_mambapy": False},
        "generic",
    ),
    # Griffin: its recurrent and convolution states live on the modules, not in a cache object,
    # so the generic runner swaps them per sequence and never merges its decode calls.
    "recurrent_gemma": (
        {
            "head_dim": 16,
            "block_types": ["recurrent", "attention"],
            "attention_window_size": 8,
            "lru_width": 64,
            "num_key_value_heads": 4,
        },
        "generic",
    ),
}
MAX_NEW = 12
# Their decoder layers are the Llama template: on CPU, decode-only steps take the lean step.
LEAN = {"qwen2", "qwen3", "mistral"}

pytestmark = pytest.mark.slow  # builds and loads many checkpoints


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer(512)
    tok.chat_template = chat_template(None)
    return tok


# Generic-path models whose decode calls are never merged: recurrent state on the modules (one
# batch of it per model), or kept in `cache_params` (Mamba's), which is no past_key_values to stack.
UNMERGED = {"mamba"}


def build(model_type: str, extra: dict, tokenizer, out) -> None:
    extra = dict(extra)
    model_type = extra.pop("_model_type", model_type)
    sizes = {} if extra.pop("_replace", False) else dict(COMMON)
    for name in extra.pop("_drop", ()):  # settings the architecture does not have
        sizes.pop(name, None)
    # None: the architecture has no such setting (num_key_value_heads of GPT-NeoX, OPT), or the
    # setting is really None (DeepSeek-V2-Lite's q_lora_rank: no query compression; leaving it out
    # would give the config's default rank of 1536, a model several times the Llama's size).
    sizes.update({k: v for k, v in extra.items() if v is not None or k != "num_key_value_heads"})
    if extra.get("num_key_value_heads", 0) is None:
        sizes.pop("num_key_value_heads", None)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), initializer_range=0.2, **sizes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def test_a_model_the_fast_path_cannot_run_says_so_without_reading_like_a_crash(tokenizer, tmp_path):
    """The reason was a bare "AttributeError: 'MambaCausalLMOutput' object has no attribute
    'past_key_values'" in /health and the log."""
    build("mamba", ARCHS["mamba"][0], tokenizer, tmp_path)
    replica = build_replica(
        LoadSpec(source=str(tmp_path), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=2)
    )
    assert replica.path == "generic"
    assert "the self-test could not run the model on the fast path (AttributeError" in replica.path_reason


def _prompt(tokenizer, length: int) -> PreparedPrompt:
    ids = tokenizer("hello world, this is a test of the architecture " * 40)["input_ids"]
    return PreparedPrompt(ids[:length])


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_architecture_matches_generate(model_type, tokenizer, tmp_path):
    check_architecture(model_type, tokenizer, tmp_path)


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_architecture_on_graph_buffers_matches_generate(model_type, tokenizer, tmp_path):
    """The same with decode steps on the CUDA-graph path's padded buffers (no capture on CPU):
    windows, chunks, soft-capping and sinks hold on padded batches and block tables too."""
    check_architecture(model_type, tokenizer, tmp_path, decode_graphs="static")


def check_architecture(
    model_type, tokenizer, out, *, device: str = "cpu", decode_graphs: str = "off"
) -> None:
    """Four requests at once: a short one decoding; a long one (past every window, attention
    chunk and the LongRoPE threshold) prefilled in chunks beside it; one that crosses the LongRoPE
    threshold while it decodes; then the long one again from the prefix cache. `tests/gpu` runs
    the same on CUDA with decode graphs captured."""
    extra, expected_path = ARCHS[model_type]
    build(model_type, extra, tokenizer, out)
    replica = build_replica(
        LoadSpec(source=str(out), dtype="fp32", attn_impl="sdpa", device=device),
        replica_config(max_batch_size=4, decode_graphs=decode_graphs),
    )
    assert replica.path == expected_path, replica.path_reason
    if device == "cpu":
        assert (getattr(replica.runner, "lean", None) is not None) == (model_type in LEAN)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    short, crossing, long = _prompt(tokenizer, 5), _prompt(tokenizer, 58), _prompt(tokenizer, 100)
    expected = {id(p): hf_greedy(replica, p, MAX_NEW) for p in (short, crossing, long)}
    driver = EngineDriver(replica, max_prefill_tokens=16)
    busy = driver.submit(short, params)
    driver.executor.step()
    driver.executor.step()
    joined = driver.submit(long, params)  # joins while the short one decodes, prefilled in chunks
    driver.executor.step()
    crosser = driver.submit(crossing, params)
    driver.run([busy, joined, crosser])
    again = driver.submit(long, params)  # finds the prompt's full blocks in the prefix cache
    driver.run([again])
    assert driver.outputs(busy)[0] == expected[id(short)]
    assert driver.outputs(joined)[0] == expected[id(long)]
    assert driver.outputs(crosser)[0] == expected[id(crossing)]
    assert driver.outputs(again)[0] == expected[id(long)]
    if replica.path == "fast":
        assert driver.executor.batch.blocks.hit_tokens >= replica.block_size
    elif replica.runner.recurrent_on_modules or model_type in UNMERGED:
        assert replica.runner.merged_calls == 0
    else:  # the generic path computed the concurrent decode steps together
        assert replica.runner.merged_calls > 0
    if decode_graphs != "off" and replica.path == "fast" and replica.runner.long_rope_after is None:
        graphs = replica.runner.graphs
        assert graphs.disabled is None and graphs.steps > 0, replica.runner.graphs_status


@pytest.mark.parametrize("model_type", ["qwen2_moe", "llama4_text", "phi3-longrope"])
def test_the_self_test_refuses_a_fast_path_blind_to_windows_chunks_or_long_rope(
    model_type, tokenizer, tmp_path, monkeypatch
):
    """Never a silently wrong answer: a fast path that ignored the mask-only sliding window, the
    attention chunks or LongRoPE's per-sequence factors would be refused by the startup probes."""
    import contextlib

    import models.replica as replica_module
    import models.runner as runner_module
    from models.loader import load_model
    from models.rope import LongRopeRows

    build(model_type, ARCHS[model_type][0], tokenizer, tmp_path)
    loaded = load_model(LoadSpec(source=str(tmp_path), dtype="fp32", attn_impl="sdpa"))
    monkeypatch.setattr(runner_module, "layer_rules", lambda config: {})
    monkeypatch.setattr(LongRopeRows, "rows", lambda self, flags: contextlib.nullcontext())
    runner = runner_module.PagedRunner(loaded.model, num_blocks=64, block_size=16, device=loaded.device)
    reason = replica_module._self_test(runner, loaded)
    assert reason is not None and "differ" in reason, reason


def test_forked_choices_on_the_generic_path_decode_as_their_parent(tokenizer, tmp_path):
    """n = 2 at temperature 0 on the generic path: both choices are generate()'s. A forked choice
    prefills the prompt and then decodes its first token, as its parent did; prompt and token as
    one prefill send DeepSeek-V3.2's sparse indexer to other keys, and the choices would differ."""
    sparse = {
        **_MLA,
        "v_head_dim": 16,
        "q_lora_rank": 24,
        "n_group": 1,
        "topk_group": 1,
        "index_n_heads": 2,
        "index_head_dim": 16,
        "index_topk": 8,
        "pad_token_id": 0,
    }
    build("deepseek_v32", sparse, tokenizer, tmp_path)
    replica = build_replica(
        LoadSpec(source=str(tmp_path), dtype="fp32", attn_impl="sdpa", device="cpu"),
        replica_config(max_batch_size=4),
    )
    assert replica.path == "generic", replica.path_reason
    messages = [{"role": "user", "content": "Tell me about the weather in the city."}]
    prompt = PreparedPrompt(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    expected = hf_greedy(replica, prompt, MAX_NEW)
    driver = EngineDriver(replica)
    request = driver.submit(prompt, SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True), n=2)
    driver.run([request])
    assert driver.outputs(request) == [expected, expected]


def test_dynamic_ntk_rope_decodes_each_sequence_alone_on_the_generic_path(tokenizer, tmp_path):
    """Past its original length, dynamic NTK RoPE rotates by the longest sequence of the forward:
    merged decode steps would give a short sequence its neighbour's frequencies (tokens that
    differed from generate()'s, found beside a 100-token neighbour). The startup check's short
    prompts cannot see it, so such models are never merged."""
    build(
        "llama",
        {"max_position_embeddings": 64, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
        tokenizer,
        tmp_path,
    )
    replica = build_replica(
        LoadSpec(source=str(tmp_path), dtype="fp32", attn_impl="sdpa", device="cpu"),
        replica_config(max_batch_size=4),
    )
    assert replica.path == "generic" and "dynamic" in replica.path_reason
    assert not replica.runner.batch_decode
