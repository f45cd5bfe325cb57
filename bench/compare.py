"""Ours vs `transformers serve --continuous-batching`: same model, same machine, same run.

    python -m bench.compare [--quick] [--servers ours,peer] [--repeat N] [--interleave] [--image]
                            [--our-args "--max-batch-size 32"] [--peer-args "--cb-max-batch-tokens 512"]
                            [--base DIR]  (then --servers ours,base --interleave: A/B of two checkouts)
                            [--only a_throughput,b_stream,b_stream_lean]

Builds the bench model if missing, starts ours, runs the workloads, stops it, then the same for the
peer (or, with --interleave, both up at once and alternating run by run). Prints one JSON line per
(server, workload, repeat), then a summary line with the target ratios, and writes everything to
bench/results/<timestamp>.json. Every server is stopped in a finally; every run has a time bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench.build_model import DEFAULT_MODEL_DIR, DEFAULT_VLM_DIR, build_bench_model, build_bench_vlm
from bench.contention import CpuWatch
from bench.llamacpp import llamacpp_server
from bench.load import LoadConfig, run_load
from bench.ours import our_server
from bench.peer import peer_server
from bench.server import Target
from bench.summary import summarize
from bench.workloads import Workload, image_workload, text_workloads, warmup_workload

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
# A run in which other processes used more than this share of all cores measured the neighbours too.
CONTENDED_SHARE = 0.10


@dataclass
class Live:
    target: Target
    pgid: int  # the server's process group: its CPU time is the server's, not contention


def load_config(
    target: Target, workload: Workload, args, *, tokenizer: Path, sample_health: bool
) -> LoadConfig:
    cfg = LoadConfig(
        base_url=target.base_url,
        model=target.model,
        api_key=target.api_key,
        server=target.server,
        tokenizer=str(tokenizer),
        timeout=args.timeout,
        health_url=target.health_url if sample_health else None,
        **workload.load,
    )
    if cfg.ignore_eos and not target.send_ignore_eos:
        cfg = replace(cfg, ignore_eos=False, extra_body={**cfg.extra_body, **target.ignore_eos_body})
    return cfg


def _warm(live: Live, workloads: list[Workload], args, tokenizer: Path) -> None:
    image = next((w.load["image"] for w in workloads if w.load.get("image")), None)
    for stream in (False, True):
        cfg = load_config(
            live.target, warmup_workload(image, stream), args, tokenizer=tokenizer, sample_health=False
        )
        asyncio.run(run_load(cfg))


def _measure(live: Live, workload: Workload, repeat: int, args, tokenizer: Path) -> dict:
    target = live.target
    sample_health = not args.no_health and (target.server in ("ours", "base") or args.sample_peer_health)
    cfg = load_config(target, workload, args, tokenizer=tokenizer, sample_health=sample_health)
    with CpuWatch({live.pgid}) as watch:
        result = asyncio.run(run_load(cfg))
    contention = watch.result()
    foreign = contention["foreign_cpu_share"]
    eos = None
    if workload.load.get("ignore_eos"):
        eos = "ignore_eos" if target.send_ignore_eos else "generation_config"
    return {
        "workload": workload.name,
        "repeat": repeat,
        "eos_off_via": eos,
        **result,
        **contention,
        "contended": foreign is not None and foreign > CONTENDED_SHARE,
    }


def run_phase(live: list[Live], workloads: list[Workload], args, *, tokenizer: Path, record) -> None:
    """Warms every live server, then each repeat runs each workload on each server in turn."""
    for server in live:
        _warm(server, workloads, args, tokenizer)
    for repeat in range(args.repeat):
        for workload in workloads:
            if repeat > 0 and not workload.repeatable:
                continue
            for server in live:
                if server.target.server in workload.servers:
                    record(_measure(server, workload, repeat, args, tokenizer))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def serve_and_run(starters: dict, workloads: list[Workload], args, *, tokenizer: Path, record) -> None:
    """Starts the servers (all at once when interleaving, else one after another), runs, stops them.

    A server that fails to start or dies is recorded, not fatal: the other's numbers are still worth having.
    """
    groups = [list(starters)] if args.interleave else [[name] for name in starters]
    for names in groups:
        with contextlib.ExitStack() as stack:
            live = []
            for name in names:
                if not any(name in w.servers for w in workloads):
                    continue
                try:
                    server, target = starters[name]()
                    stack.enter_context(server)
                except Exception as exc:  # noqa: BLE001
                    record({"server": name, "event": "failed", "error": _describe(exc)})
                    continue
                startup_s = round(server.startup_s, 2)
                record({"server": name, "event": "ready", "startup_s": startup_s, "command": server.command})
                live.append(Live(target, server.process.pid))
            if not live:
                continue
            try:
                run_phase(live, workloads, args, tokenizer=tokenizer, record=record)
            except Exception as exc:  # noqa: BLE001
                record({"server": ",".join(names), "event": "failed", "error": _describe(exc)})


def _machine() -> dict:
    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": pkg("torch"),
        "transformers": pkg("transformers"),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 requests per workload, one repeat: a smoke run")
    p.add_argument(
        "--servers",
        default="ours,peer",
        help="ours, base, peer, llamacpp: comma-separated, run in this order",
    )
    p.add_argument(
        "--base", default=None, metavar="DIR", help="server `base`: ours from this checkout (a worktree)"
    )
    p.add_argument("--repeat", type=int, default=None, help="runs per workload (default 3, quick 1)")
    p.add_argument(
        "--only", default="", help="these workloads only (comma-separated names), e.g. a_throughput,b_stream"
    )
    p.add_argument("--interleave", action="store_true", help="both servers up at once, alternating runs")
    p.add_argument("--image", action="store_true", help="also run ours on a tiny VLM with images")
    p.add_argument("--model-path", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--vlm-path", default=str(DEFAULT_VLM_DIR))
    p.add_argument("--our-args", default="", help="extra flags for entrypoint.py")
    p.add_argument(
        "--base-args", default=None, help="extra flags for base's entrypoint.py (default: --our-args)"
    )
    p.add_argument("--peer-args", default="", help="extra flags for transformers serve (e.g. --cb-* tuning)")
    p.add_argument("--server-env", action="append", default=[], metavar="K=V", help="env for both servers")
    p.add_argument("--sample-peer-health", action="store_true", help="poll the peer's /health too (slows it)")
    p.add_argument(
        "--no-health",
        action="store_true",
        help="poll no server's /health (no (d) target): throughput against servers that are not polled",
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="bound on each run, s (default 600, quick 240)"
    )
    p.add_argument("--ready-timeout", type=float, default=300.0, help="bound on each server's startup, s")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the finally blocks stop every server started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.timeout = args.timeout or (240.0 if args.quick else 600.0)
    env = dict(kv.split("=", 1) for kv in args.server_env)
    names = [name.strip() for name in args.servers.split(",") if name.strip()]
    if unknown := set(names) - {"ours", "base", "peer", "llamacpp"}:
        sys.exit(f"unknown server(s) {sorted(unknown)}; expected ours, base, peer and/or llamacpp")
    if ("base" in names) != bool(args.base):
        sys.exit("--servers base and --base DIR go together")

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    model_path = build_bench_model(args.model_path)
    runs: list[dict] = []

    def record(line: dict) -> None:
        runs.append(line)
        print(json.dumps(line), flush=True)

    def ours(path: Path, name: str, log: str, root: Path = ROOT, label: str = "ours"):
        flags = args.base_args if label == "base" and args.base_args is not None else args.our_args
        extra = tuple(shlex.split(flags))
        log_path = RESULTS_DIR / f"{stamp}-{log}"
        return lambda: our_server(path, name, extra_args=extra, env=env, log_path=log_path,
                                  ready_timeout_s=args.ready_timeout, root=root, label=label)  # fmt: skip

    def peer():
        extra = tuple(shlex.split(args.peer_args))
        return peer_server(model_path, log_path=RESULTS_DIR / f"{stamp}-peer.log", extra_args=extra, env=env,
                           ready_timeout_s=args.ready_timeout)  # fmt: skip

    def llamacpp():
        return llamacpp_server(model_path, log_path=RESULTS_DIR / f"{stamp}-llamacpp.log",
                               ready_timeout_s=args.ready_timeout)  # fmt: skip

    starters = {"ours": ours(model_path, "bench", "ours.log"), "peer": peer, "llamacpp": llamacpp}
    if args.base:
        starters["base"] = ours(model_path, "bench", "base.log", Path(args.base).resolve(), "base")
    workloads = text_workloads(args.quick)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        if unknown := wanted - {w.name for w in workloads}:
            sys.exit(f"unknown workload(s) {sorted(unknown)}; expected some of {[w.name for w in workloads]}")
        workloads = [w for w in workloads if w.name in wanted]
    started = time.perf_counter()
    serve_and_run({n: starters[n] for n in names}, workloads, args, tokenizer=model_path, record=record)
    if args.image and "ours" in names:
        vlm_path = build_bench_vlm(args.vlm_path)
        vlm = {"ours": ours(vlm_path, "bench-vlm", "ours-vlm.log")}
        serve_and_run(vlm, [image_workload(args.quick)], args, tokenizer=vlm_path, record=record)

    summary = summarize(runs)
    print(json.dumps(summary), flush=True)
    report = {
        "started_utc": stamp,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "machine": _machine(),
        "args": vars(args),
        "summary": summary,
        "workloads": [w.__dict__ for w in workloads],
        "runs": runs,
    }
    out = RESULTS_DIR / f"{stamp}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"[compare] results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
