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
# model_type -> (extra config, expected path)
ARCHS = {
    "qwen2": ({}, "fast"),
    "qwen3": ({"head_dim": 16}, "fast"),
    "gemma": ({"head_dim": 16}, "fast"),
    "gemma3_text": ({"head_dim": 16, "sliding_window": 8}, "fast"),
    "mistral": ({"sliding_window": 8}, "fast"),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, "fast"),
    "phi3": ({"pad_token_id": 0}, "fast"),
    "gpt2": ({"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512, "_replace": True}, "fast"),
    "gpt_neox": ({"num_key_value_heads": None}, "fast"),
    "opt": ({"ffn_dim": 128, "word_embed_proj_dim": 64, "num_key_value_heads": None}, "fast"),
    "olmo2": ({}, "fast"),
    "cohere": ({}, "fast"),
    "starcoder2": ({}, "fast"),
    "granite": ({}, "fast"),
    "smollm3": ({"pad_token_id": 0}, "fast"),
    # Its attention does not go through transformers' AttentionInterface: the packed step raises.
    "falcon": (
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "new_decoder_architecture": False,
            "multi_query": True,
            "_replace": True,
        },
        "generic",
    ),
    # Soft-capped attention logits: plain SDPA over the cache would change the math.
    "gemma2": ({"head_dim": 16, "sliding_window": 8}, "generic"),
}
MAX_NEW = 12

pytestmark = pytest.mark.slow  # builds and loads many checkpoints


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer(512)
    tok.chat_template = chat_template(None)
    return tok


def build(model_type: str, extra: dict, tokenizer, out) -> None:
    extra = dict(extra)
    sizes = {} if extra.pop("_replace", False) else dict(COMMON)
    sizes.update({k: v for k, v in extra.items() if v is not None})
    if extra.get("num_key_value_heads", 0) is None:
        sizes.pop("num_key_value_heads", None)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), initializer_range=0.2, **sizes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_architecture_matches_generate(model_type, tokenizer, tmp_path):
    extra, expected_path = ARCHS[model_type]
    build(model_type, extra, tokenizer, tmp_path)
    replica = build_replica(
        LoadSpec(source=str(tmp_path), dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=4)
    )
    assert replica.path == expected_path, replica.path_reason
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    prompt = PreparedPrompt(tokenizer("hello world, this is a test of the architecture " * 3)["input_ids"])
    neighbour = PreparedPrompt(tokenizer("another request")["input_ids"])
    expected = hf_greedy(replica, prompt, MAX_NEW)
    driver = EngineDriver(replica, max_prefill_tokens=16)
    busy = driver.submit(neighbour, params)
    driver.executor.step()
    driver.executor.step()
    joined = driver.submit(prompt, params)  # joins while the neighbour decodes, prefilled in chunks
    driver.run([busy, joined])
    again = driver.submit(prompt, params)  # finds the prompt's full blocks in the prefix cache
    driver.run([again])
    assert driver.outputs(joined)[0] == expected
    assert driver.outputs(again)[0] == expected
    if replica.path == "fast":
        assert driver.executor.batch.blocks.hit_tokens >= replica.block_size
