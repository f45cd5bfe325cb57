"""Host time per decode step, by phase, on the built-in tiny model (2 layers: the arithmetic is
negligible, so what is left is Python and framework overhead).

    python -m bench.host [--batches 1,8,32] [--steps 60] [--profile 1] [--model-path builtin:tiny]
                         [--graphs off|static] [--compare-packing ROUNDS] [--compare-backends ROUNDS]
                         [--compare-fusions ROUNDS] [--compare-lean ROUNDS] [--workload ROUNDS]

In process, through the real executor: `batch` requests decode together (their prompts are
prefilled first and not counted); the executor's own step timings (`scheduler/timings.py`) give
schedule / execute (forward, sample) / postprocess / emit per step. `--profile B` also prints the
top functions of a cProfile run at batch B. Prints one JSON line per batch size and writes them to
bench/results/<timestamp>-host.json.

`--workload ROUNDS` runs bench.compare's (a) workload in process instead: 64 chat requests (the
same synthetic prompts, cut to 32 tokens of the model's vocabulary, in its chat template), 16 in
flight, 64 greedy tokens each, through the real executor with the server's default engine
settings, no HTTP. Set beside the served figure of the same workload, the difference is what
the HTTP side (event loop, granian, SSE, the GIL they share with the replica thread) costs.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import json
import pstats
import tempfile
import time
from collections import deque

import torch

from bench.server import write_results
from models.loader import LoadSpec
from models.params import PromptInput, SamplingParams
from models.prompt import PromptBuilder
from models.replica import build_replica
from tests.unit.configs import replica_config
from tests.unit.engine_driver import EngineDriver


def _decode_steps(
    replica,
    batch: int,
    steps: int,
    profile: bool = False,
    around: contextlib.AbstractContextManager | None = None,
    filler: int = 0,
) -> dict:
    """`steps` decode steps of `batch` requests, timed by the executor; `around` is entered for
    exactly those steps (not the prefill before them nor the drain after). `filler` words lengthen
    each prompt (longer contexts for attention to read)."""
    builder = PromptBuilder.for_model(replica.loaded)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    driver = EngineDriver(replica, max_batch_size=batch)
    streams = []
    for index in range(batch):
        prompt = builder.prepare(
            PromptInput(messages=({"role": "user", "content": f"request {index} says hi" + " and" * filler},))
        )
        streams.append(driver.submit(prompt, params))
    executor = driver.executor
    while any(not driver.tokens[(s.request_id, 0)] for s in streams):
        executor.step()  # prefill, not counted
    executor.timings.reset()
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    with around if around is not None else contextlib.nullcontext():
        for _ in range(steps):
            executor.step()
    if profiler:
        profiler.disable()
    figures = executor.timings.per_step()
    figures["total"] = sum(
        v for k, v in figures.items() if k in ("schedule", "execute", "postprocess", "emit")
    )
    row = {"batch": batch, **{k: round(v, 3) for k, v in figures.items()}}
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        row["profile"] = out.getvalue()
    driver.run(streams)
    return row


def compare_packing(args) -> None:
    """Replicas packed three ways: every linear packed alone, the size rule alone, and the size
    rule with siblings sharing an input run as one product (the default)."""
    from models.cpu_kernels import pack_linears

    def pack_all(model, batch_hint=16, shared=()):
        return pack_linears(model, batch_hint=batch_hint, pays=lambda linear, hint: True)

    def by_size(model, batch_hint=16, shared=()):
        return pack_linears(model, batch_hint=batch_hint)

    packers = {"pack-all": pack_all, "by-size": by_size, "by-size+shared": pack_linears}
    variants = {mode: {"pack_linears": packer} for mode, packer in packers.items()}
    _interleaved(args, variants, args.compare_packing, "host-packing")


def compare_backends(args) -> None:
    """Replicas whose packed linears run through oneDNN's packed call and through the compiled
    panel kernel (`models.panel_linear`, the default where it builds), packed and grouped alike."""
    from models.cpu_kernels import pack_linears

    variants = {
        backend: {"pack_linears": functools.partial(pack_linears, backend=backend)}
        for backend in ("onednn", "panels")
    }
    _interleaved(args, variants, args.compare_backends, "host-backends")


def compare_fusions(args) -> None:
    """One replica, its RMSNorms and rotary embedding alternately as transformers' torch ops and
    as the compiled calls `models.cpu_norms` and `models.cpu_rotary` put in place (the default
    where they build): same weights, same memory, interleaved rounds."""
    import sys

    from models.cpu_rotary import FusedRotary

    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as cache:
        replica = build_replica(
            LoadSpec(source=args.model_path, dtype="fp32", attn_impl="sdpa", cache_dir=cache),
            replica_config(max_batch_size=max(batches)),
        )
        norms = {m: vars(m)["forward"] for m in replica.loaded.model.modules() if "forward" in vars(m)}
        rotary = {
            namespace: namespace.apply_rotary_pos_emb
            for namespace in list(sys.modules.values())
            if isinstance(getattr(namespace, "apply_rotary_pos_emb", None), FusedRotary)
        }

        def use(fused: bool) -> None:
            for module, forward in norms.items():
                if fused:
                    module.forward = forward
                else:
                    vars(module).pop("forward", None)
            for namespace, function in rotary.items():
                namespace.apply_rotary_pos_emb = function if fused else function.original

        try:
            modes = {"torch-ops": (replica, lambda: use(False)), "fused": (replica, lambda: use(True))}
            totals = _timed_rounds(args, modes, args.compare_fusions)
        finally:
            use(True)
    _report(totals, "host-fusions", norms_fused=len(norms), rotary_fused=sorted(n.__name__ for n in rotary))


def compare_lean(args) -> None:
    """One replica, its decode-only steps alternately through the model's modules, through the lean
    step `models.lean_decode` as its Python loop, and through the lean step as installed (the
    default where it applies: with its compiled layers, `models.lean_native`, where they apply):
    interleaved rounds."""
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as cache:
        replica = build_replica(
            LoadSpec(source=args.model_path, dtype="fp32", attn_impl="sdpa", cache_dir=cache),
            replica_config(max_batch_size=max(batches)),
        )
        runner = replica.runner
        lean = getattr(runner, "lean", None)
        if lean is None:
            raise SystemExit("--compare-lean: this replica has no lean decode step (see the log)")

        native = lean.native

        def use(on: bool, compiled: bool = True) -> None:
            runner.lean = lean if on else None
            lean.native = native if compiled else None

        try:
            modes = {"modules": (replica, lambda: use(False)), "lean": (replica, lambda: use(True))}
            if native is not None:
                modes = {**modes, "lean-python": (replica, lambda: use(True, compiled=False))}
            totals = _timed_rounds(args, modes, args.compare_lean)
        finally:
            use(True)
    _report(totals, "host-lean", compiled_layers=native is not None)


def _interleaved(args, variants: dict[str, dict], rounds: int, results_name: str) -> None:
    """One replica per variant built in one process (each variant: names in `models.replica`
    replaced while it builds), then interleaved rounds, so that the machine's drift (large on a
    shared 2-core box) falls on all alike."""

    import models.replica as replica_module

    batches = [int(b) for b in args.batches.split(",")]
    replicas = {}
    with tempfile.TemporaryDirectory() as cache:
        for mode, replacements in variants.items():
            originals = {name: getattr(replica_module, name) for name in replacements}
            try:
                for name, replacement in replacements.items():
                    setattr(replica_module, name, replacement)
                replicas[mode] = build_replica(
                    LoadSpec(source=args.model_path, dtype="fp32", attn_impl="sdpa", cache_dir=cache),
                    replica_config(max_batch_size=max(batches)),
                )
            finally:
                for name, original in originals.items():
                    setattr(replica_module, name, original)
        totals = _timed_rounds(args, {mode: (replica, None) for mode, replica in replicas.items()}, rounds)
    _report(totals, results_name)


def _timed_rounds(args, modes: dict, rounds: int) -> dict[str, dict[int, list[float]]]:
    """`rounds` rounds, each timing every mode (a replica, and what to call before timing it, or
    None) at every batch size in turn: total ms per decode step, per mode and batch size."""
    batches = [int(b) for b in args.batches.split(",")]
    totals = {mode: {b: [] for b in batches} for mode in modes}
    for _ in range(rounds):
        for mode, (replica, enter) in modes.items():
            if enter is not None:
                enter()
            for batch in batches:
                _decode_steps(replica, batch, 5)
                totals[mode][batch].append(round(_decode_steps(replica, batch, args.steps)["total"], 3))
    return totals


def _report(totals: dict[str, dict[int, list[float]]], results_name: str, **extra) -> None:
    import statistics

    rows = [
        {"mode": mode, "batch": b, "median_ms": round(statistics.median(v), 3), "rounds_ms": v, **extra}
        for mode, per_batch in totals.items()
        for b, v in per_batch.items()
    ]
    for row in rows:
        print(json.dumps(row), flush=True)
    write_results(results_name, rows)


def engine_workload(
    replica,
    model_path: str,
    *,
    requests: int = 64,
    concurrency: int = 16,
    prompt_tokens: int = 32,
    max_tokens: int = 64,
) -> dict:
    """bench.compare's (a) workload without the server: a new request joins as soon as one of the
    `concurrency` in flight finishes, as the load generator's semaphore does."""
    from bench.synthetic import load_tokenizer, synthetic_prompt
    from tests.unit.configs import executor_config

    tokenizer = load_tokenizer(model_path) if not model_path.startswith("builtin:") else None
    builder = PromptBuilder.for_model(replica.loaded)
    prompts = [
        builder.prepare(
            PromptInput(
                messages=({"role": "user", "content": synthetic_prompt(i, prompt_tokens, tokenizer)},)
            )
        )
        for i in range(requests)
    ]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    driver = EngineDriver(
        replica, max_batch_size=concurrency, max_prefill_tokens=executor_config().max_prefill_tokens
    )
    pending = deque(prompts)
    running: list = []
    started = time.perf_counter()
    steps = in_flight = submitted = 0
    while pending or running:
        running = [s for s in running if not driver.done(s)]
        while pending and len(running) < concurrency:
            running.append(driver.submit(pending.popleft(), params))
            submitted += 1
        in_flight = max(in_flight, len(running))
        if running:
            driver.executor.step()
            steps += 1
    wall = time.perf_counter() - started
    produced = sum(len(t) for t in driver.tokens.values())  # counted, not assumed
    return {
        "mode": "engine-workload",
        "requests": submitted,
        "max_in_flight": in_flight,
        "prompt_tokens_mean": round(sum(len(p.token_ids) for p in prompts) / requests, 1),
        "completion_tokens": produced,
        "steps": steps,
        "wall_s": round(wall, 3),
        "completion_tok_s": round(produced / wall, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--profile", type=int, default=0, help="batch size to profile (0: none)")
    parser.add_argument("--model-path", default="builtin:tiny", help="e.g. bench/models/bench-80m")
    parser.add_argument(
        "--graphs",
        choices=("off", "static"),
        default="off",
        help="static: decode steps on the CUDA-graph path's padded buffers (no capture on CPU)",
    )
    parser.add_argument(
        "--compare-packing",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="A/B in one process: every linear packed, the size rule, the size rule with shared-input siblings as one product (models.cpu_kernels), interleaved",
    )
    parser.add_argument(
        "--compare-backends",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="A/B in one process: packed linears through oneDNN and through the compiled panel kernel, interleaved",
    )
    parser.add_argument(
        "--compare-fusions",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="A/B on one replica: RMSNorm and rotary embedding as torch ops and as compiled calls (models.cpu_norms, models.cpu_rotary), interleaved",
    )
    parser.add_argument(
        "--compare-lean",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="A/B on one replica: decode-only steps through the model's modules and through the lean step (models.lean_decode), interleaved",
    )
    parser.add_argument(
        "--workload",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="bench.compare's (a) workload in process, ROUNDS times (no HTTP: the engine's own throughput)",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.workload:
        with tempfile.TemporaryDirectory() as cache:
            replica = build_replica(
                LoadSpec(source=args.model_path, dtype="fp32", attn_impl="sdpa", cache_dir=cache),
                replica_config(max_batch_size=16),
            )
            engine_workload(replica, args.model_path, requests=16, max_tokens=8)  # warm-up
            rows = [{**engine_workload(replica, args.model_path), "round": i} for i in range(args.workload)]
        for row in rows:
            print(json.dumps(row), flush=True)
        write_results("host-workload", rows)
        return
    if args.compare_packing:
        compare_packing(args)
        return
    if args.compare_backends:
        compare_backends(args)
        return
    if args.compare_fusions:
        compare_fusions(args)
        return
    if args.compare_lean:
        compare_lean(args)
        return
    with tempfile.TemporaryDirectory() as cache:
        replica = build_replica(
            LoadSpec(source=args.model_path, dtype="fp32", attn_impl="sdpa", cache_dir=cache),
            replica_config(
                max_batch_size=max(int(b) for b in args.batches.split(",")), decode_graphs=args.graphs
            ),
        )
        results = []
        for batch in (int(b) for b in args.batches.split(",")):
            _decode_steps(replica, batch, 10)  # warm-up
            row = _decode_steps(replica, batch, args.steps, profile=batch == args.profile)
            row["graphs"] = args.graphs
            profile = row.pop("profile", None)
            print(json.dumps(row), flush=True)
            if profile:
                print(profile)
            results.append(row)
    write_results("host", results)


if __name__ == "__main__":
    main()
