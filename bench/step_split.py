"""Where the engine's decode step goes on a real model: linear layers, decode attention (its KV
gather apart) and everything else, timed in place.

    python -m bench.step_split --model-path bench/models/bench-80m [--batches 1,16] [--steps 40] [--rounds 3]
        [--compare-attention] [--filler WORDS]

In process, through the real executor, as `bench.host` drives it: `batch` requests decode
together, prefill not counted. Every linear layer's call (nn.Linear, packed or grouped) and the
paged decode attention (`models.attention.decode_attention`, and within it `gather`, which copies
the rows' key and value blocks out of the pool) are wrapped in a timer; `rest` is the forward's
time less those (norms, rotary embeddings, activations, residual adds, writing the new keys and
values, the logits' row selection). The timers add about 1 us per call. The lean step's compiled
layers (`models.lean_native`) call the kernels from C, where no Python timer reaches: they are
switched off here, so the split is that of the lean step's Python loop (`bench.host
--compare-lean` times the two against each other). Prints one JSON line per batch size and round
and writes them to bench/results/<timestamp>-step-split.json.

With `--compare-attention`, each round times the decode attention both ways, one right after the
other on the same replica: the compiled kernel reading the pool in place (`models.cpu_attention`,
the default where a C compiler is present) and the gather + SDPA path it replaces.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time

import torch
from torch import nn

import models.attention as attention
from bench.host import _decode_steps
from bench.server import write_results
from models import cpu_attention, cpu_kernels, panel_linear
from models.loader import LoadSpec
from models.replica import build_replica
from tests.unit.configs import replica_config


@contextlib.contextmanager
def timed_parts(seconds: dict[str, float]):
    """While inside, adds the seconds spent in each part to `seconds`."""
    patched: list[tuple[object, str, object]] = []

    def wrap(owner, attribute: str, part: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - started

        patched.append((owner, attribute, original))
        setattr(owner, attribute, timed)

    try:
        # The products themselves: the lean decode step calls them without their modules, and a
        # group of siblings counts once (its members' hand-out of slices falls under `rest`).
        wrap(nn.Linear, "forward", "linears")
        wrap(cpu_kernels.OneDNNProduct, "__call__", "linears")
        wrap(panel_linear.PanelProduct, "__call__", "linears")
        wrap(attention, "decode_attention", "decode_attention")
        wrap(attention, "gather", "kv_gather")
        yield seconds
    finally:
        for owner, attribute, original in reversed(patched):
            setattr(owner, attribute, original)


def split(replica, batch: int, steps: int, filler: int = 0) -> dict:
    seconds: dict[str, float] = {}
    row = _decode_steps(replica, batch, steps, around=timed_parts(seconds), filler=filler)
    per_step = {part: value / steps * 1e3 for part, value in seconds.items()}
    linears = per_step.get("linears", 0.0)
    attend = per_step.get("decode_attention", 0.0)
    return {
        "batch": batch,
        "forward_ms": round(row["forward"], 3),
        "linears_ms": round(linears, 3),
        "decode_attention_ms": round(attend, 3),
        "of_which_kv_gather_ms": round(per_step.get("kv_gather", 0.0), 3),
        "rest_ms": round(row["forward"] - linears - attend, 3),
        "sample_ms": round(row["sample"], 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default="bench/models/bench-80m")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--filler", type=int, default=0, help="words added to each prompt: longer contexts")
    parser.add_argument(
        "--compare-attention",
        action="store_true",
        help="time each round with the compiled decode attention and with gather + SDPA",
    )
    args = parser.parse_args(argv)
    ways = {"kernel": True, "gather+sdpa": False} if args.compare_attention else {"default": None}
    if args.compare_attention and cpu_attention.kernel() is None:
        parser.error("--compare-attention: the kernel cannot be built here (see the log)")
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        replica = build_replica(
            LoadSpec(source=args.model_path, dtype="fp32", attn_impl="sdpa", cache_dir=cache),
            replica_config(max_batch_size=max(batches)),
        )
        if replica.runner.lean is not None:
            replica.runner.lean.native = None  # its kernels' calls are C's, out of the timers' reach
        for round_index in range(args.rounds):
            for batch in batches:
                for way, in_place in ways.items():
                    if in_place is not None:
                        replica.runner.in_place_decode = in_place
                    _decode_steps(replica, batch, 5, filler=args.filler)  # warm-up
                    row = {
                        **split(replica, batch, args.steps, args.filler),
                        "round": round_index,
                        "attention": way,
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    write_results("step-split", rows)


if __name__ == "__main__":
    main()
