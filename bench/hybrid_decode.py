"""The generic path's merged decoding on a hybrid model, against one forward per sequence.

    python -m bench.hybrid_decode [--model-type qwen3_5_text] [--requests 8] [--tokens 32] [--rounds 2]

Builds a random-weight hybrid (linear-attention layers beside full attention, hidden 1024, four
layers: big enough that a forward reads more weights than it spends in Python) and saves it, loads
it through the real loading path (the self-test sends it to the generic path), then drives
`--requests` greedy requests of different prompt lengths through the real executor, alternating
rounds with the step's decode calls merged (as served) and computed one per forward. Prints one
JSON line per run and writes them to bench/results/<timestamp>-hybrid-decode.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import models.generic as generic
from bench.server import write_results
from models.loader import LoadSpec
from models.params import SamplingParams
from models.replica import build_replica
from models.tiny import build_tokenizer, chat_template
from tests.unit.configs import replica_config
from tests.unit.engine_driver import EngineDriver
from tests.unit.test_text_architectures import _prompt

SIZES = {
    "qwen3_5_text": dict(
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        linear_num_value_heads=16,
        linear_num_key_heads=8,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
    ),
    "bamba": dict(attn_layer_indices=[3], mamba_d_head=64, mamba_n_heads=32),
}
COMMON = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=2048,
)


def _one_per_forward(calls, with_positions):
    return [[index] for index in range(len(calls))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-type", default="qwen3_5_text", choices=sorted(SIZES))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    tokenizer = build_tokenizer(512)
    tokenizer.chat_template = chat_template(None)
    merged_groups = generic.groups
    lines = []
    with tempfile.TemporaryDirectory() as folder:
        config = AutoConfig.for_model(
            args.model_type, vocab_size=len(tokenizer), **COMMON, **SIZES[args.model_type]
        )
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        replica = build_replica(
            LoadSpec(source=folder, dtype="fp32", attn_impl="sdpa"),
            replica_config(max_batch_size=max(16, args.requests)),
        )
        print(f"[bench] path={replica.path}; {replica.runner.backend}", flush=True)
        params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
        try:
            for round_index in range(args.rounds):
                for mode, grouping in (("merged", merged_groups), ("one_per_forward", _one_per_forward)):
                    generic.groups = grouping
                    driver = EngineDriver(replica, max_batch_size=max(16, args.requests))
                    streams = [
                        driver.submit(_prompt(tokenizer, 10 + 3 * i), params) for i in range(args.requests)
                    ]
                    began = time.perf_counter()
                    driver.run(streams)
                    seconds = time.perf_counter() - began
                    line = {
                        "model_type": args.model_type,
                        "mode": mode,
                        "round": round_index,
                        "requests": args.requests,
                        "tokens_each": args.tokens,
                        "seconds": round(seconds, 3),
                        "tok_s": round(args.requests * args.tokens / seconds, 1),
                    }
                    print(json.dumps(line), flush=True)
                    lines.append(line)
        finally:
            generic.groups = merged_groups
    print(f"[bench] results in {write_results('hybrid-decode', lines)}")


if __name__ == "__main__":
    main()
