"""What a leaner or compiled decode step would save: the engine's forward against a hand-written one.

    python -m bench.lean_step [--batches 1,16] [--rounds 3] [--keys 96] [--model-path bench/models/bench-80m]
    python -m bench.lean_step --split 1     # the packed lean step: its linears alone, then the rest

A Llama decode step written out by hand in the style of gpt-fast (transformers' modules called
for their weights only, no paging: each row's past keys and values come contiguous, the new
token's own appended; attention as two grouped matmuls), over the bench model's weights, three ways:

- `f_linear`: eager, stock `nn.Linear` weights;
- `packed`: eager, the linears pre-packed for oneDNN as the engine packs them (`models.cpu_kernels`);
- `inductor`: `torch.compile` with weight freezing (inductor packs the linears itself and fuses the
  rest), static shapes, compiled once per batch size before timing;

and the engine's own forward (`models.runner` through the real executor, as `bench.host` runs it)
in the same process, in interleaved rounds. If the lean `packed` step is about as slow as the
engine, the engine's per-layer work around the linears (transformers' modules, paging) is not what
costs; if `inductor` is no faster than `packed`, compiling the step does not pay on this machine.
Prints one JSON line per (round, batch) and writes them to bench/results/<timestamp>-lean-step.json.
`--split B` instead times the packed lean step at batch B, then its 85 linears alone back to
back on the same inputs' shapes, and prints the torch profiler's table of the step's ops.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.server import write_results


class LeanLlamaStep(nn.Module):
    """One decode token per row over a Llama's own modules' weights; past keys come as inputs."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads

    def forward(self, ids, cos, sin, keys, values, mask):
        # ids [B]; cos/sin [B, D] at each row's position; keys/values [layers, B, Hkv, L, D] (after
        # rotary); mask [B, 1, 1, L + 1] bool over the past keys and the new one
        inner, heads, kv_heads, dim = self.model.model, self.heads, self.kv_heads, self.head_dim
        x = inner.embed_tokens(ids)
        rows = x.shape[0]
        cos, sin = cos[:, None, :], sin[:, None, :]

        def rotate(t):
            return t * cos + torch.cat((-t[..., dim // 2 :], t[..., : dim // 2]), -1) * sin

        for index, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = rotate(attn.q_proj(h).view(rows, heads, dim))
            k = rotate(attn.k_proj(h).view(rows, kv_heads, dim))
            v = attn.v_proj(h).view(rows, kv_heads, dim)
            layer_keys = torch.cat((keys[index], k[:, :, None]), 2)  # [B, Hkv, L + 1, D]
            layer_values = torch.cat((values[index], v[:, :, None]), 2)
            grouped = q.view(rows, kv_heads, heads // kv_heads, dim)
            scores = torch.matmul(grouped, layer_keys.transpose(-1, -2)) * attn.scaling
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
            x = x + attn.o_proj(torch.matmul(weights, layer_values).reshape(rows, heads * dim))
            h = layer.post_attention_layernorm(x)
            x = x + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
        return self.model.lm_head(inner.norm(x))


def rotary(step: LeanLlamaStep, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[B, D]` at each row's position, from the model's own rotary embedding."""
    probe = torch.zeros(1, 1, dtype=torch.float32)
    cos, sin = step.model.model.rotary_emb(probe, positions[None])
    return cos[0], sin[0]


def _inputs(step: LeanLlamaStep, batch: int, keys: int):
    config = step.model.config
    ids = torch.randint(0, config.vocab_size, (batch,))
    cos, sin = rotary(step, torch.full((batch,), keys))
    cache = torch.randn(config.num_hidden_layers, batch, step.kv_heads, keys, step.head_dim)
    mask = torch.ones(batch, 1, 1, keys + 1, dtype=torch.bool)
    return ids, cos, sin, cache, torch.randn_like(cache), mask


def _ms_per_call(fn, args, calls: int) -> float:
    for _ in range(3):
        fn(*args)
    started = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - started) / calls * 1e3


def split(step: LeanLlamaStep, batch: int, keys: int, calls: int) -> dict:
    """The packed lean step's time, and what its linears alone take back to back."""
    from torch.profiler import ProfilerActivity, profile

    from models.cpu_kernels import PackedLinear

    inputs = _inputs(step, batch, keys)
    linears = [module for module in step.model.modules() if isinstance(module, PackedLinear)]
    activations = [torch.randn(batch, linear.in_features) for linear in linears]

    def linears_only() -> None:
        for linear, x in zip(linears, activations, strict=True):
            linear(x)

    row = {
        "batch": batch,
        "step_ms": round(_ms_per_call(step, inputs, calls), 2),
        "linears_alone_ms": round(_ms_per_call(linears_only, (), calls), 2),
        "linears": len(linears),
    }
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(calls):
            step(*inputs)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM

    from bench.host import _decode_steps
    from models.cpu_kernels import pack_linears
    from models.loader import LoadSpec
    from models.replica import build_replica
    from tests.unit.configs import replica_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--keys", type=int, default=96, help="past keys per row (the engine's rows hold ~80-110)"
    )
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--model-path", default="bench/models/bench-80m")
    parser.add_argument(
        "--split", type=int, default=0, metavar="BATCH", help="linears vs the rest of the step"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.split:
        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
        pack_linears(model)
        with torch.inference_mode():
            row = split(LeanLlamaStep(model), args.split, args.keys, args.calls)
        print(json.dumps(row), flush=True)
        write_results("lean-step-split", [row])
        return
    batches = [int(b) for b in args.batches.split(",")]

    def load():
        return AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()

    stock = LeanLlamaStep(load())
    packed_model = load()
    pack_linears(packed_model)
    packed = LeanLlamaStep(packed_model)
    torch._inductor.config.freezing = True
    rows = []
    with tempfile.TemporaryDirectory() as cache_dir, torch.inference_mode():
        replica = build_replica(
            LoadSpec(source=args.model_path, dtype="fp32", attn_impl="sdpa", cache_dir=cache_dir),
            replica_config(max_batch_size=max(batches)),
        )
        inputs = {batch: _inputs(stock, batch, args.keys) for batch in batches}
        compiled = torch.compile(LeanLlamaStep(load()), dynamic=False)
        for batch in batches:
            started = time.perf_counter()
            reference, out = stock(*inputs[batch]), compiled(*inputs[batch])
            assert torch.allclose(reference, out, atol=1e-3), "the compiled step disagrees with eager"
            assert torch.allclose(reference, packed(*inputs[batch]), atol=1e-3)
            print(f"[lean_step] batch {batch}: compiled in {time.perf_counter() - started:.1f} s", flush=True)
        for round_index in range(args.rounds):
            for batch in batches:
                row = {"round": round_index, "batch": batch, "keys": args.keys}
                _decode_steps(replica, batch, 3)
                row["engine_forward_ms"] = round(_decode_steps(replica, batch, args.calls)["forward"], 2)
                for name, step in (("f_linear", stock), ("packed", packed), ("inductor", compiled)):
                    row[f"{name}_ms"] = round(_ms_per_call(step, inputs[batch], args.calls), 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
    write_results("lean-step", rows)


if __name__ == "__main__":
    main()
