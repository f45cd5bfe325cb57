"""What prompt logprobs cost, and that rows which do not ask pay nothing, in process through the
real executor (no HTTP).

    python -m bench.scoring [--model-path bench/models/bench-80m] [--rows 4] [--prompt-tokens 384]
                            [--new-tokens 8] [--repeats 3] [--only plain,one,all]

`rows` greedy requests of `prompt-tokens` each are prefilled together (one step when the budget
allows) and then decode `new-tokens` tokens:

- plain: none asks for prompt logprobs;
- one: the first asks (prompt_logprobs=5, what echo + logprobs=5 computes);
- all: every request asks.

Reported: the prefill step (seconds until every request has its first token) and the mean decode
step, the best (least disturbed by other processes on a shared machine) and the median over
`repeats` runs taken in turn. `--only plain` runs on a tree without prompt
logprobs too, for the before/after comparison. Prints one JSON line per scenario and writes them
to bench/results/<timestamp>-scoring.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from bench.build_model import DEFAULT_MODEL_DIR, build_bench_model
from bench.server import write_results
from models.loader import LoadSpec
from models.params import SamplingParams
from models.prompt import PreparedPrompt
from models.replica import build_replica
from tests.unit.configs import replica_config
from tests.unit.engine_driver import EngineDriver

SCENARIOS = ("plain", "one", "all")
TOP = 5


def _run(
    replica, scenario: str, rows: int, prompt_tokens: int, new_tokens: int, salt: int
) -> tuple[float, float]:
    """One batch; returns (prefill seconds, mean decode step seconds). `salt` makes every run's
    prompts new, so that no run finds the previous one's prefix in the cache."""
    driver = EngineDriver(replica, max_batch_size=rows, max_prefill_tokens=rows * prompt_tokens)
    vocab = replica.vocab_size
    streams = []
    for index in range(rows):
        ids = [(salt * 7919 + index * 104_729 + p * 31) % (vocab - 10) + 5 for p in range(prompt_tokens)]
        asks = scenario == "all" or (scenario == "one" and index == 0)
        extra = {"prompt_logprobs": TOP} if asks else {}
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, **extra)
        streams.append(driver.submit(PreparedPrompt(ids), params))
    executor = driver.executor
    started = time.perf_counter()
    while any(not driver.tokens[(s.request_id, 0)] for s in streams):
        executor.step()
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    steps = 0
    while not all(driver.done(s) for s in streams):
        executor.step()
        steps += 1
    return prefill, (time.perf_counter() - started) / max(steps, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring", description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help=f"default: {DEFAULT_MODEL_DIR} (built if missing)")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=384)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    args = parser.parse_args(argv)
    scenarios = [s for s in args.only.split(",") if s]
    path = args.model_path or str(build_bench_model())
    replica = build_replica(
        LoadSpec(source=path, dtype="fp32", attn_impl="sdpa"), replica_config(max_batch_size=args.rows)
    )
    _run(replica, "plain", args.rows, args.prompt_tokens, 2, salt=0)  # warm-up
    figures: dict[str, list[tuple[float, float]]] = {s: [] for s in scenarios}
    for repeat in range(args.repeats):
        for index, scenario in enumerate(scenarios):
            salt = 1 + repeat * len(scenarios) + index
            figures[scenario].append(
                _run(replica, scenario, args.rows, args.prompt_tokens, args.new_tokens, salt)
            )
    results = []
    for scenario, runs in figures.items():
        row = {
            "scenario": scenario,
            "rows": args.rows,
            "prompt_tokens": args.prompt_tokens,
            "prefill_s_best": round(min(r[0] for r in runs), 3),
            "prefill_s_median": round(statistics.median(r[0] for r in runs), 3),
            "decode_step_ms_best": round(1000 * min(r[1] for r in runs), 2),
            "decode_step_ms_median": round(1000 * statistics.median(r[1] for r in runs), 2),
            "runs": [[round(p, 3), round(1000 * d, 2)] for p, d in runs],
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    write_results("scoring", results)


if __name__ == "__main__":
    main()
