"""Ours vs `transformers serve --continuous-batching`, same model, same machine, one run.

    python -m bench.compare [--quick] [--servers ours,peer] [--repeat N] [--image]
                            [--our-args "--max-batch-size 32"] [--peer-args "--cb-max-batch-tokens 512"]

Prints one JSON line per (server, workload, repeat), then a summary line with the target ratios, and
writes everything to bench/results/<timestamp>.json. Every server is stopped in a finally.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench.build_model import DEFAULT_MODEL_DIR, DEFAULT_VLM_DIR, build_bench_model, build_bench_vlm
from bench.load import LoadConfig, run_load
from bench.peer import peer_server
from bench.server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    load: dict  # LoadConfig fields
    servers: tuple[str, ...] = ("ours", "peer")
    repeatable: bool = True


def text_workloads(quick: bool) -> list[Workload]:
    n = 16 if quick else 64
    common = dict(max_tokens=64, prompt_tokens=32, ignore_eos=True, temperature=0.0)
    return [
        Workload("sequential", "reference: one request at a time, 64 tokens, greedy, non-stream",
                 dict(common, concurrency=1, requests=2 if quick else 4)),
        Workload("a_throughput", f"(a) {n} requests, 16 in flight, 64 tokens each, greedy, ignore_eos, non-stream",
                 dict(common, concurrency=16, requests=n)),
        Workload("b_stream", f"(b) as (a) with stream: TTFT = first non-empty content delta",
                 dict(common, concurrency=16, requests=n, stream=True)),
        Workload("c_mixed", "(c) 8 requests of 8 tokens sent together with 8 of 128 tokens, stream",
                 dict(common, concurrency=16, mixed=((8, 8), (128, 8)), stream=True)),
    ]


def image_workload(quick: bool) -> Workload:
    return Workload("image", "16 concurrent image+text requests (synthetic 64x64 PNG), 32 tokens, stream",
                    dict(concurrency=16, requests=16, max_tokens=32, prompt_tokens=16, ignore_eos=True,
                         stream=True, image="synthetic"), servers=("ours",), repeatable=not quick)


@dataclass
class Target:
    """A running server and how to talk to it."""

    server: str
    base_url: str
    model: str
    health_url: str
    api_key: str = "EMPTY"
    # How "ignore EOS" is said to this server: the peer 422s on unknown fields (see bench.peer).
    send_ignore_eos: bool = True
    ignore_eos_body: dict = field(default_factory=dict)


def our_server(model_path: Path, model_name: str, *, extra_args: list[str], env: dict, log_path: Path,
               ready_timeout_s: float) -> tuple[ServerProcess, Target]:
    port = free_port()
    api_key = secrets.token_hex(8)  # the guarded path is the one clients use
    command = [
        str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "entrypoint.py"),
        "--model-path", str(model_path), "--model-name", model_name,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "fp32", "--default-sampling", "false",
        "--api-key", api_key, *extra_args,
    ]
    base = f"http://127.0.0.1:{port}"
    server = ServerProcess(command, health_url=f"{base}/health", log_path=log_path, env=env, cwd=ROOT,
                           ready_timeout_s=ready_timeout_s)
    return server, Target("ours", f"{base}/v1", model_name, f"{base}/health", api_key=api_key)


def load_config(target: Target, workload: Workload, *, tokenizer: Path, sample_health: bool,
                timeout_s: float) -> LoadConfig:
    cfg = LoadConfig(base_url=target.base_url, model=target.model, api_key=target.api_key, server=target.server,
                     tokenizer=str(tokenizer), timeout=timeout_s,
                     health_url=target.health_url if sample_health else None, **workload.load)
    if cfg.ignore_eos and not target.send_ignore_eos:
        cfg = replace(cfg, ignore_eos=False, extra_body={**cfg.extra_body, **target.ignore_eos_body})
    return cfg


def run_workloads(target: Target, workloads: list[Workload], args, *, tokenizer: Path, record) -> None:
    sample_health = target.server == "ours" or args.sample_peer_health
    # Not measured: first requests pay for lazy init (the peer builds its CB manager on the first one).
    warmup = Workload("warmup", "", dict(concurrency=16, requests=16, max_tokens=16, prompt_tokens=32,
                                         ignore_eos=True, image=workloads[0].load.get("image")))
    for stream in (False, True):
        asyncio.run(run_load(load_config(target, replace(warmup, load={**warmup.load, "stream": stream}),
                                         tokenizer=tokenizer, sample_health=False, timeout_s=args.timeout)))
    for workload in workloads:
        for repeat in range(args.repeat if workload.repeatable else 1):
            cfg = load_config(target, workload, tokenizer=tokenizer, sample_health=sample_health,
                              timeout_s=args.timeout)
            result = asyncio.run(run_load(cfg))
            record({"workload": workload.name, "repeat": repeat,
                    "eos_off_via": ("ignore_eos" if target.send_ignore_eos else "generation_config")
                    if workload.load.get("ignore_eos") else None, **result})


def serve_and_run(name: str, start, workloads: list[Workload], args, *, tokenizer: Path, record) -> None:
    """Start one server, run its workloads, stop it; a server that fails is recorded, not fatal."""
    runnable = [w for w in workloads if name in w.servers]
    if not runnable:
        return
    try:
        server, target = start()
        with server:
            record({"server": name, "event": "ready", "startup_s": round(server.startup_s, 2),
                    "command": server.command})
            run_workloads(target, runnable, args, tokenizer=tokenizer, record=record)
    except Exception as exc:  # noqa: BLE001 - the other server's numbers are still worth having
        record({"server": name, "event": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]})


def _median(runs: list[dict], server: str, workload: str, key: str) -> float | None:
    values = [r[key] for r in runs if r.get("server") == server and r.get("workload") == workload
              and r.get(key) is not None and r.get("errors") == 0]
    return round(statistics.median(values), 4) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarize(runs: list[dict]) -> dict:
    tok_s = {s: _median(runs, s, "a_throughput", "completion_tok_s") for s in ("ours", "peer")}
    ttft = {s: _median(runs, s, "b_stream", "ttft_p50_s") for s in ("ours", "peer")}
    mixed = {s: _median(runs, s, "c_mixed", "short_long_latency_ratio") for s in ("ours", "peer")}
    ours_health = {f"{r['workload']}#{r['repeat']}": r.get("health_p99_ms") for r in runs
                   if r.get("server") == "ours" and "workload" in r}
    worst_health = max((v for v in ours_health.values() if v is not None), default=None)
    tok_ratio, ttft_ratio = _ratio(tok_s["ours"], tok_s["peer"]), _ratio(ttft["ours"], ttft["peer"])
    with_errors = sorted({r["server"] for r in runs if r.get("errors")})
    failed = sorted({r["server"] for r in runs if r.get("event") == "failed"})
    return {
        "summary": True,
        "a_completion_tok_s": {**tok_s, "ratio_ours_peer": tok_ratio, "target": ">= 1.3",
                               "pass": tok_ratio is not None and tok_ratio >= 1.3},
        "b_ttft_p50_s": {**ttft, "ratio_ours_peer": ttft_ratio, "target": "<= 0.5",
                         "pass": ttft_ratio is not None and ttft_ratio <= 0.5},
        "c_short_over_long_p50": {**mixed, "target": "ours <= 0.3",
                                  "pass": mixed["ours"] is not None and mixed["ours"] <= 0.3},
        "d_health_p99_ms": {"ours_worst": worst_health, "ours_per_run": ours_health, "target": "<= 20",
                            "pass": bool(ours_health) and None not in ours_health.values()
                            and worst_health is not None and worst_health <= 20},
        "sequential_tok_s": {s: _median(runs, s, "sequential", "completion_tok_s") for s in ("ours", "peer")},
        "image": {k: _median(runs, "ours", "image", k) for k in ("completion_tok_s", "ttft_p50_s")},
        "servers_with_request_errors": with_errors,
        "servers_failed_to_run": failed,
        "note": "medians over repeats of runs without errors; ratios are ours/peer",
    }


def _machine() -> dict:
    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": pkg("torch"), "transformers": pkg("transformers")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 requests per workload, one repeat: a smoke run")
    p.add_argument("--servers", default="ours,peer", help="comma-separated, run in this order")
    p.add_argument("--repeat", type=int, default=None, help="runs per workload (default 3, quick 1)")
    p.add_argument("--image", action="store_true", help="also run the image workload against ours + a tiny VLM")
    p.add_argument("--model-path", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--vlm-path", default=str(DEFAULT_VLM_DIR))
    p.add_argument("--our-args", default="", help="extra flags for entrypoint.py")
    p.add_argument("--peer-args", default="", help="extra flags for transformers serve (e.g. --cb-* tuning)")
    p.add_argument("--server-env", action="append", default=[], metavar="K=V",
                   help="environment for both servers, e.g. OMP_NUM_THREADS=2")
    p.add_argument("--sample-peer-health", action="store_true",
                   help="poll the peer's /health during its runs too (it slows the peer; off by default)")
    p.add_argument("--timeout", type=float, default=None, help="bound on each run, s (default 600, quick 240)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="bound on each server's startup, s")
    args = p.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.timeout = args.timeout or (240.0 if args.quick else 600.0)
    env = dict(kv.split("=", 1) for kv in args.server_env)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    model_path = build_bench_model(args.model_path)
    runs: list[dict] = []

    def record(line: dict) -> None:
        runs.append(line)
        print(json.dumps(line), flush=True)

    workloads = text_workloads(args.quick)
    starters = {
        "ours": lambda: our_server(model_path, "bench", extra_args=shlex.split(args.our_args), env=env,
                                   log_path=RESULTS_DIR / f"{stamp}-ours.log", ready_timeout_s=args.ready_timeout),
        "peer": lambda: _peer(model_path, args, env, RESULTS_DIR / f"{stamp}-peer.log"),
    }
    started = time.perf_counter()
    for name in [s.strip() for s in args.servers.split(",") if s.strip()]:
        if name not in starters:
            sys.exit(f"unknown server {name!r}; expected ours or peer")
        serve_and_run(name, starters[name], workloads, args, tokenizer=model_path, record=record)
    if args.image and "ours" in args.servers:
        vlm_path = build_bench_vlm(args.vlm_path)
        serve_and_run("ours", lambda: our_server(vlm_path, "bench-vlm", extra_args=shlex.split(args.our_args),
                                                 env=env, log_path=RESULTS_DIR / f"{stamp}-ours-vlm.log",
                                                 ready_timeout_s=args.ready_timeout),
                      [image_workload(args.quick)], args, tokenizer=vlm_path, record=record)
    summary = summarize(runs)
    print(json.dumps(summary), flush=True)
    out = RESULTS_DIR / f"{stamp}.json"
    out.write_text(json.dumps({"started_utc": stamp, "elapsed_s": round(time.perf_counter() - started, 1),
                               "machine": _machine(), "args": vars(args), "summary": summary,
                               "workloads": [w.__dict__ for w in workloads], "runs": runs}, indent=1, default=str))
    print(f"[compare] results in {out}", file=sys.stderr)


def _peer(model_path: Path, args, env: dict, log_path: Path) -> tuple[ServerProcess, Target]:
    server, info = peer_server(model_path, log_path=log_path, extra_args=tuple(shlex.split(args.peer_args)),
                               env=env, ready_timeout_s=args.ready_timeout)
    return server, Target("peer", info["base_url"], info["model"], info["health_url"],
                          send_ignore_eos=info["send_ignore_eos"], ignore_eos_body=info["ignore_eos_body"])


if __name__ == "__main__":
    main()
