"""GPU figures for Llama-shaped models of about 1B and 8B parameters in bf16 (random weights).

    python -m bench.gpu [--models 1b,8b] [--batches 1,8,32,64] [--steps 64] [--prompts 512,4096]

For each model, built from a config on the GPU and loaded through the server's own loader: decode
tok/s at each batch size with CUDA graphs and eagerly (`--enforce-eager`) in the same run, TTFT
of one prompt of each length, and the share of the memory-bandwidth bound reached at batch 1
(weight bytes read per step x steps per second / the card's bandwidth, from the table below or,
for a card not in it, measured with a device-to-device copy). Host time per decode step is the
executor's own timing (`scheduler/timings.py`).

Writes bench/results/<stamp>-gpu.json and prints one JSON line per measurement. Without a GPU it
says so and exits 0. `transformers serve` is not run here (it needs its own environment); its
ratio comes from `python -m bench.compare` on a GPU machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.server import write_results

# Peak memory bandwidth in bytes/s of the cards this is likely to meet (vendor data sheets).
KNOWN_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 SXM": 3.35e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100-SXM4-40GB": 1.555e12,
    "A100-PCIE-40GB": 1.555e12,
    "L40S": 0.864e12,
    "L4": 0.3e12,
    "A10G": 0.6e12,
    "A10": 0.6e12,
    "RTX 4090": 1.008e12,
}

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate: Llama 3.2 1B's and Llama 3.1 8B's blocks. The
    # vocabulary is the tiny tokenizer's, so the head is smaller than the real models' (the weight
    # bytes used for the bandwidth bound are counted from the built model, not assumed).
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192),
    "8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336),
}


def card_bandwidth(device: torch.device) -> tuple[float, str]:
    name = torch.cuda.get_device_name(device)
    for key, value in KNOWN_BANDWIDTH.items():
        if key.lower() in name.lower():
            return value, f"data sheet ({key})"
    return measured_bandwidth(device), "measured (device-to-device copy)"


def measured_bandwidth(device: torch.device, size: int = 1 << 30) -> float:
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    rounds = 10
    for _ in range(rounds):
        target.copy_(source)
    torch.cuda.synchronize(device)
    return 2 * size * rounds / (time.perf_counter() - started)  # read + write


def build_checkpoint(out: Path, shape: dict, device: torch.device) -> Path:
    """Random bf16 weights made on the GPU (an 8B model would take minutes to draw on the host),
    saved with save_pretrained so the server's own loader reads them."""
    from transformers import AutoModelForCausalLM

    from models.tiny import _generation_config, _text_config, build_tokenizer, chat_template

    tokenizer = build_tokenizer(4096, seed=0)
    tokenizer.model_max_length = 8192
    tokenizer.chat_template = chat_template(None)
    config = _text_config(
        "llama",
        tokenizer=tokenizer,
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        intermediate_size=shape["intermediate_size"],
        max_position_embeddings=8192,
        sliding_window=None,
    )
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def _replica(path: Path, device: str, *, graphs: str, max_batch: int):
    from models.loader import LoadSpec
    from models.replica import build_replica
    from tests.unit.configs import replica_config

    return build_replica(
        LoadSpec(source=str(path), dtype="bf16", attn_impl="flash_attention_2", device=device),
        replica_config(max_batch_size=max_batch, max_input_tokens=8192, decode_graphs=graphs),
    )


def _decode_rate(replica, batch: int, steps: int) -> dict:
    """Steady decode of `batch` sequences with 128-token prompts: tokens/s and host ms per step."""
    from models.params import SamplingParams
    from models.prompt import PreparedPrompt
    from tests.unit.engine_driver import EngineDriver

    driver = EngineDriver(replica, max_batch_size=batch, max_prefill_tokens=8192)
    params = SamplingParams(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
    streams = [
        driver.submit(PreparedPrompt([5 + (i + j) % 1000 for j in range(128)]), params) for i in range(batch)
    ]
    executor = driver.executor
    for _ in range(8):  # prefill, then a few steps to warm (and capture) the bucket
        executor.step()
    torch.cuda.synchronize(replica.loaded.device)
    executor.timings.reset()
    produced = sum(len(driver.tokens[(s.request_id, 0)]) for s in streams)
    started = time.perf_counter()
    for _ in range(steps):
        executor.step()
    torch.cuda.synchronize(replica.loaded.device)
    elapsed = time.perf_counter() - started
    produced = sum(len(driver.tokens[(s.request_id, 0)]) for s in streams) - produced
    timing = executor.timings.per_step()
    return {
        "batch": batch,
        "tok_s": round(produced / elapsed, 1),
        "step_ms": round(1000 * elapsed / steps, 3),
        "host_ms": {k: round(v, 3) for k, v in timing.items()},
    }


def _ttft(replica, length: int) -> float:
    from models.params import SamplingParams
    from models.prompt import PreparedPrompt
    from tests.unit.engine_driver import EngineDriver

    driver = EngineDriver(replica, max_batch_size=1, max_prefill_tokens=2048)
    stream = driver.submit(
        PreparedPrompt([5 + j % 1000 for j in range(length)]), SamplingParams(max_tokens=1, temperature=0.0)
    )
    started = time.perf_counter()
    driver.run([stream])
    torch.cuda.synchronize(replica.loaded.device)
    return round(time.perf_counter() - started, 4)


def bench_model(name: str, args, device: torch.device, bandwidth: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-gpu-{name}-") as folder:
        path = build_checkpoint(Path(folder), SHAPES[name], device)
        result: dict = {"model": name}
        for graphs in ("capture", "off"):
            replica = _replica(path, str(device), graphs=graphs, max_batch=max(args.batches))
            params = sum(p.numel() for p in replica.loaded.model.parameters())
            weight_bytes = sum(p.numel() * p.element_size() for p in replica.loaded.model.parameters())
            rows = [_decode_rate(replica, batch, args.steps) for batch in args.batches]
            mode = "graphs" if graphs == "capture" else "eager"
            result[mode] = {
                "decode": rows,
                "graphs_status": getattr(replica.runner, "graphs_status", "n/a"),
                "kernels": getattr(replica.runner, "backend", replica.path),
            }
            if graphs == "capture":
                result["parameters"] = params
                result["weight_bytes"] = weight_bytes
                result["ttft_s"] = {str(n): _ttft(replica, n) for n in args.prompts}
                single = rows[0]["tok_s"] if rows[0]["batch"] == 1 else None
                if single is not None:
                    result["bandwidth_fraction_batch1"] = round(single * weight_bytes / bandwidth, 3)
            print(json.dumps({"model": name, "mode": mode, **result[mode]}), flush=True)
            del replica
            gc.collect()
            torch.cuda.empty_cache()
        for g, e in zip(result["graphs"]["decode"], result["eager"]["decode"], strict=True):
            g["vs_eager"] = round(g["tok_s"] / e["tok_s"], 2) if e["tok_s"] else None
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--batches", default="1,8,32,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", default=64, type=int)
    parser.add_argument("--prompts", default="512,4096", type=lambda s: [int(x) for x in s.split(",")])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device is visible; nothing to measure")
        return 0
    device = torch.device("cuda", 0)
    bandwidth, source = card_bandwidth(device)
    summary = {
        "card": torch.cuda.get_device_name(device),
        "bandwidth_bytes_s": bandwidth,
        "bandwidth_source": source,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "models": [bench_model(name, args, device, bandwidth) for name in args.models.split(",")],
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "models"}))
    write_results("gpu", [summary])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
