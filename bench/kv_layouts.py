"""Offline comparison of KV-cache layouts on the same model and workload (no HTTP).

    python -m bench.kv_layouts [--model bench/models/bench-80m] [--requests 16] [--max-tokens 64]

Layouts measured, all greedy with EOS ignored, all requests submitted at once:
- slot:        this server's fast path (preallocated per-slot cache, packed prefill, index writes)
- slot+packed: the same with oneDNN pre-packed linear weights (the server's CPU default)
- padded:      transformers generate() on a left-padded batch with DynamicCache (what a padded
               join/leave design runs between joins; every step concatenates the cache)
- paged:       transformers' own continuous batching (generate_batch, paged attention)
Also a staggered-arrival run for `slot` and `padded` where a request joins every 4 steps: the
padded design must re-pad and concatenate the whole cache at each join.
Prints one JSON line per layout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models.cpu_kernels import pack_linears
from models.loader import LoadSpec
from models.params import SamplingParams
from models.prompt import PreparedPrompt
from models.replica import ReplicaConfig, build_replica


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    out = []
    for i in range(count):
        ids = tokenizer(f"Request {i}: " + "lorem ipsum dolor sit amet " * 40)["input_ids"][:length]
        out.append(ids)
    return out


def run_slot(replica, inputs: list[list[int]], max_tokens: int, stagger: int = 0) -> tuple[float, int]:
    runner = replica.runner
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    pending = [replica.new_sequences(PreparedPrompt(ids), params)[0] for ids in inputs]
    running, done, step = [], 0, 0
    start = time.perf_counter()
    while pending or running:
        joining = pending if not stagger else ([pending[0]] if step % stagger == 0 and pending else [])
        for seq in list(joining):
            runner.admit(seq)
            running.append(seq)
            pending.remove(seq)
        decode = [s for s in running if not s.is_prefilling]
        prefill = [(s, s.remaining_prompt) for s in running if s.is_prefilling]
        runner.step(decode, prefill)
        for seq in [s for s in running if s.is_finished]:
            runner.release(seq)
            running.remove(seq)
            done += len(seq.output_ids)
        step += 1
    return time.perf_counter() - start, done


def run_padded(model, inputs: list[list[int]], max_tokens: int, pad_id: int) -> tuple[float, int]:
    width = max(len(ids) for ids in inputs)
    batch = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in inputs])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in inputs])
    start = time.perf_counter()
    out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id)
    return time.perf_counter() - start, (out.shape[1] - width) * len(inputs)


def run_padded_staggered(model, inputs, max_tokens: int, pad_id: int, stagger: int) -> tuple[float, int]:
    """Join every `stagger` steps: prefill the newcomer alone, left-pad both, concatenate caches."""
    from transformers import DynamicCache

    start = time.perf_counter()
    rows: list[dict] = []
    cache = None
    mask = None
    pending = list(inputs)
    produced = 0
    step = 0
    with torch.inference_mode():
        while pending or rows:
            if pending and step % stagger == 0:
                ids = pending.pop(0)
                new_cache = DynamicCache()
                out = model(input_ids=torch.tensor([ids]), past_key_values=new_cache, use_cache=True)
                rows.append({"next": int(out.logits[0, -1].argmax()), "left": max_tokens})
                cache, mask = _concat(cache, mask, new_cache, len(ids))
            tokens = torch.tensor([[r["next"]] for r in rows])
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
            positions = (mask.cumsum(-1) - 1)[:, -1:]
            out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
            keep = []
            for i, r in enumerate(rows):
                r["next"] = int(out.logits[i, -1].argmax())
                r["left"] -= 1
                produced += 1
                if r["left"] > 0:
                    keep.append(i)
            if len(keep) < len(rows):
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index)
                mask = mask[index]
                rows = [rows[i] for i in keep]
                if not rows:
                    cache, mask = None, None
            step += 1
    return time.perf_counter() - start, produced


def _concat(cache, mask, new_cache, length):
    new_mask = torch.ones(1, length, dtype=torch.long)
    if cache is None:
        return new_cache, new_mask
    old_len, new_len = mask.shape[1], length
    width = max(old_len, new_len)
    for layer, new_layer in zip(cache.layers, new_cache.layers):
        for name in ("keys", "values"):
            old, new = getattr(layer, name), getattr(new_layer, name)
            old = torch.nn.functional.pad(old, (0, 0, width - old_len, 0))
            new = torch.nn.functional.pad(new, (0, 0, width - new_len, 0))
            setattr(layer, name, torch.cat([old, new], dim=0))
    mask = torch.cat([torch.nn.functional.pad(mask, (width - old_len, 0)), torch.nn.functional.pad(new_mask, (width - new_len, 0))])
    return cache, mask


def run_paged(model, inputs: list[list[int]], max_tokens: int) -> tuple[float, int]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    results = model.generate_batch(inputs=inputs, generation_config=config, progress_bar=False)
    return time.perf_counter() - start, sum(len(r.generated_tokens) for r in results.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="bench/models/bench-80m")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stagger", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.model).exists():
        from bench.build_model import build

        build(Path(args.model))
    spec = LoadSpec(source=args.model, dtype="fp32", attn_impl="sdpa")
    replica = build_replica(spec, ReplicaConfig(max_batch_size=args.requests, pack_cpu_linears=False))
    tokenizer = replica.loaded.tokenizer
    inputs = prompts(tokenizer, args.requests, args.prompt_tokens)
    pad = tokenizer.pad_token_id or 0
    run_slot(replica, inputs[:2], 4)  # warm-up

    def report(layout, elapsed, tokens, **extra):
        print(json.dumps({"layout": layout, "tokens": tokens, "seconds": round(elapsed, 3), "tok_s": round(tokens / elapsed, 1), **extra}), flush=True)

    report("slot", *run_slot(replica, inputs, args.max_tokens))
    report("slot", *run_slot(replica, inputs, args.max_tokens, stagger=args.stagger), arrivals=f"every {args.stagger} steps")
    runner = replica.runner
    runner.restore_attention()
    model = replica.loaded.model
    report("padded", *run_padded(model, inputs, args.max_tokens, pad))
    report("padded", *run_padded_staggered(model, inputs, args.max_tokens, pad, args.stagger), arrivals=f"every {args.stagger} steps")
    try:
        model.set_attn_implementation("sdpa_paged")
    except Exception:
        pass
    try:
        report("paged", *run_paged(model, inputs, args.max_tokens))
    except Exception as exc:  # transformers' CB is young; report rather than crash the comparison
        print(json.dumps({"layout": "paged", "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
    packed = build_replica(spec, ReplicaConfig(max_batch_size=args.requests, pack_cpu_linears=True))
    run_slot(packed, inputs[:2], 4)
    report("slot+packed", *run_slot(packed, inputs, args.max_tokens))


if __name__ == "__main__":
    main()
