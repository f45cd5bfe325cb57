"""How fast this CPU runs the bench model's linear layers: the floor under a decode step.

    python -m bench.linears [--batches 1,16] [--threads 2] [--calls 200]

For each of the bench model's weight shapes (in x out; the engine runs q/k/v as one 768x1280
product and gate/up as one 768x4096), `F.linear`, oneDNN's packed call (`models.cpu_kernels`) and,
where it builds, the compiled panel kernel (`models.panel_linear`) at each batch size, over distinct weights in turn (256 MB of them, more
than any CPU cache), so that the weights come from memory, as they do in a forward. Prints microseconds per call, the
weight bytes streamed per second (what bounds a decode step at small batches) and GFLOP/s (what
bounds it at large ones). A decode step at batch 1 reads every weight once: the model's weight
bytes divided by the best GB/s here is the least time any engine can take per token in fp32.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F

from bench.server import write_results
from models import panel_linear

# The bench model (bench/build_model.py): hidden 768, 12 heads of 64, 4 KV heads, MLP 2048, vocab 8192.
SHAPES = ((768, 768), (768, 256), (768, 2048), (2048, 768), (768, 8192), (768, 1280), (768, 4096))
_BYTES_CYCLED = 256 << 20


def _per_call_us(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def measure(
    in_features: int, out_features: int, batch: int, calls: int, bytes_cycled: int = _BYTES_CYCLED
) -> dict:
    copies = max(2, -(-bytes_cycled // (in_features * out_features * 4)))
    weights = [torch.randn(out_features, in_features) for _ in range(copies)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, batch) for w in weights]
    panels = [panel_linear.PanelProduct(w, None) for w in weights] if panel_linear.available() else []
    x = torch.randn(batch, in_features)
    turn = itertools.count()

    def plain() -> None:
        F.linear(x, weights[next(turn) % copies])

    def packed_call() -> None:
        torch.ops.mkldnn._linear_pointwise(x, packed[next(turn) % copies], None, "none", [], "")

    def panel_call() -> None:
        panels[next(turn) % copies](x)

    row: dict = {"shape": f"{in_features}x{out_features}", "batch": batch}
    weight_bytes = in_features * out_features * 4
    calls_by_name = {"f_linear": plain, "packed": packed_call}
    if panels:
        calls_by_name["panels"] = panel_call
    for name, fn in calls_by_name.items():
        us = _per_call_us(fn, calls)
        row[f"{name}_us"] = round(us, 1)
        row[f"{name}_gb_s"] = round(weight_bytes / us / 1e3, 1)
        row[f"{name}_gflop_s"] = round(2 * in_features * out_features * batch / us / 1e3, 1)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for batch in (int(b) for b in args.batches.split(",")):
            for in_features, out_features in SHAPES:
                row = {**measure(in_features, out_features, batch, args.calls), "threads": args.threads}
                print(json.dumps(row), flush=True)
                rows.append(row)
    write_results("linears", rows)


if __name__ == "__main__":
    main()
