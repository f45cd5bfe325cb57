"""The GPU issue's ratio: ours against `transformers serve --continuous-batching`, same model and
workload, over HTTP on one GPU.

    python -m bench.gpu_serve [--model 1b] [--device cuda] [--concurrency 32] [--requests 64]

Builds the model as `bench.gpu` does (random bf16 weights from a Llama config), starts our server
(`--device cuda --dtype bf16`) and measures `concurrency` greedy requests of 128 new tokens (EOS
off) in flight, then does the same with the peer, each after a warm-up. The peer runs with the
Python that runs this (`transformers serve` needs fastapi, uvicorn and openai there: on a GPU
image `make gpu-wheels` carries them); when it cannot start, the result says why and ours alone
is reported. Writes bench/results/<stamp>-gpu-serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench.gpu import SHAPES, build_checkpoint
from bench.load import LoadConfig, run_load
from bench.ours import our_server
from bench.peer import peer_server
from bench.server import Target, write_results

PEER_MODULES = ("fastapi", "uvicorn", "openai")


def _measure(target: Target, args, *, warmup: bool) -> dict:
    cfg = LoadConfig(
        base_url=target.base_url,
        model=target.model,
        api_key=target.api_key,
        server=target.server,
        concurrency=args.concurrency,
        requests=args.concurrency if warmup else args.requests,
        prompt_tokens=128,
        max_tokens=16 if warmup else 128,
        ignore_eos=target.send_ignore_eos,
        extra_body=dict(target.ignore_eos_body),
        temperature=0.0,
    )
    return asyncio.run(run_load(cfg))


def _run(server, target: Target, args) -> dict:
    with server:
        _measure(target, args, warmup=True)
        result = _measure(target, args, warmup=False)
    keys = ("completed", "errors", "error_samples", "wall_s", "completion_tok_s", "latency_p50_s")
    return {key: result[key] for key in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--model-path", default=None, help="serve this folder instead of building one")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_serve: no CUDA device is visible; nothing to measure")
        return 0
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-serve-") as folder:
        path = (
            Path(args.model_path)
            if args.model_path
            else build_checkpoint(Path(folder), SHAPES[args.model], torch.device(args.device))
        )
        if args.device == "cuda":
            torch.cuda.empty_cache()
        dtype = "bf16" if args.device == "cuda" else "fp32"
        ours, target = our_server(
            path,
            extra_args=("--device", args.device, "--dtype", dtype, "--max-batch-size", str(args.concurrency)),
            log_path=results_dir / "gpu-serve-ours.log",
            python=sys.executable,
        )
        summary: dict = {
            "model": args.model_path or args.model,
            "device": args.device,
            "ours": _run(ours, target, args),
        }
        missing = [name for name in PEER_MODULES if importlib.util.find_spec(name) is None]
        if missing:
            summary["peer"] = f"not run: {', '.join(missing)} not importable by {sys.executable}"
        else:
            peer, peer_target = peer_server(
                path,
                extra_args=("--device", args.device, "--dtype", "bfloat16" if dtype == "bf16" else "float32"),
                log_path=results_dir / "gpu-serve-peer.log",
                python=Path(sys.executable),
            )
            summary["peer"] = _run(peer, peer_target, args)
            theirs = summary["peer"]["completion_tok_s"]
            summary["ratio"] = round(summary["ours"]["completion_tok_s"] / theirs, 2) if theirs else None
    print(json.dumps(summary))
    write_results("gpu-serve", [summary])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
