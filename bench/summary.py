"""Turns the runs of one comparison into the project's target ratios.

A run is `contended` when other processes took a real share of the CPU during it (see
bench.contention). Medians use uncontended runs when there are any; a target whose numbers had to
come from contended runs gets `"pass": null` (inconclusive) rather than a verdict.
"""

from __future__ import annotations

import statistics

SERVERS = ("ours", "peer")


def _runs(runs: list[dict], server: str, workload: str | None = None) -> list[dict]:
    return [
        r
        for r in runs
        if r.get("server") == server and "workload" in r
        and (workload is None or r["workload"] == workload)
    ]  # fmt: skip


def median(runs: list[dict], server: str, workload: str, key: str) -> tuple[float | None, bool]:
    """(median over error-free runs, whether it had to use contended ones)."""
    mine = [r for r in _runs(runs, server, workload) if r.get(key) is not None and r.get("errors") == 0]
    clean = [r[key] for r in mine if not r.get("contended")]
    values = clean or [r[key] for r in mine]
    return (round(statistics.median(values), 4) if values else None), bool(values) and not clean


def _target(values: dict, compared: float | None, op: str, bound: float, contended: bool) -> dict:
    verdict = None
    if compared is not None and not contended:
        verdict = compared >= bound if op == ">=" else compared <= bound
    return {**values, "target": f"{op} {bound}", "contended": contended, "pass": verdict}


def _ratio_target(
    runs: list[dict], workload: str, key: str, op: str, bound: float, peer_name: str = "peer"
) -> dict:
    (ours, ours_c), (peer, peer_c) = (median(runs, s, workload, key) for s in ("ours", peer_name))
    ratio = round(ours / peer, 3) if ours is not None and peer else None
    return _target({"ours": ours, "peer": peer, "ratio_ours_peer": ratio}, ratio, op, bound, ours_c or peer_c)


def summarize(runs: list[dict]) -> dict:
    mixed_ours, mixed_c = median(runs, "ours", "c_mixed", "short_long_latency_ratio")
    mixed = {"ours": mixed_ours, "peer": median(runs, "peer", "c_mixed", "short_long_latency_ratio")[0]}
    # (d) is about every run of ours: the worst p99 decides, over uncontended runs when there are any.
    health = {f"{r['workload']}#{r['repeat']}": r.get("health_p99_ms") for r in _runs(runs, "ours")}
    clean = [r.get("health_p99_ms") for r in _runs(runs, "ours") if not r.get("contended")]
    judged = clean or list(health.values())
    worst = None if not judged or None in judged else max(judged)
    summary = {
        "summary": True,
        "a_completion_tok_s": _ratio_target(runs, "a_throughput", "completion_tok_s", ">=", 1.3),
        "b_ttft_p50_s": _ratio_target(runs, "b_stream", "ttft_p50_s", "<=", 0.5),
        "c_short_over_long_p50": _target(mixed, mixed_ours, "<=", 0.3, mixed_c),
        "d_health_p99_ms": _target({"ours_worst": worst, "ours_per_run": health}, worst, "<=", 20, not clean),
        "sequential_tok_s": {s: median(runs, s, "sequential", "completion_tok_s")[0] for s in SERVERS},
        "image": {k: median(runs, "ours", "image", k)[0] for k in ("completion_tok_s", "ttft_p50_s")},
        "servers_with_request_errors": sorted({r["server"] for r in runs if r.get("errors")}),
        "servers_failed_to_run": sorted({r["server"] for r in runs if r.get("event") == "failed"}),
        "contended_runs": [f"{r['server']}:{r['workload']}#{r['repeat']}"
                           for r in runs if r.get("contended")],
        "note": "medians over repeats without errors, uncontended ones when any; ratios are ours/peer",
    }  # fmt: skip
    if _runs(runs, "llamacpp"):
        summary["llamacpp"] = _llamacpp_targets(runs)
    summary["streaming"] = {server: _streaming(runs, server) for server in _servers(runs)}
    return summary


def _servers(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["server"] for r in runs if "workload" in r))


def _streaming(runs: list[dict], server: str) -> dict:
    """What streaming costs one server: 16 concurrent streams read by the openai client (b) and
    as bytes (b_stream_lean) over the same requests not streamed (a), and the CPU seconds the server
    and the load generator spent in each (they share the machine's cores)."""
    out: dict = {}
    for workload in ("a_throughput", "a_hog", "b_stream", "b_stream_lean"):
        out[workload] = {
            key: median(runs, server, workload, key)[0]
            for key in ("completion_tok_s", "client_cpu_s", "server_cpu_s")
        }
    plain = out["a_throughput"]["completion_tok_s"]
    for workload in ("a_hog", "b_stream", "b_stream_lean"):
        streamed = out[workload]["completion_tok_s"]
        out[f"{workload}_over_a"] = round(streamed / plain, 3) if streamed and plain else None
    return out


def _llamacpp_targets(runs: list[dict]) -> dict:
    """The host-overhead issue's targets against llama.cpp's server."""
    ours_stream, stream_c = median(runs, "ours", "b_stream", "completion_tok_s")
    ours_plain, plain_c = median(runs, "ours", "a_throughput", "completion_tok_s")
    own = round(ours_stream / ours_plain, 3) if ours_stream and ours_plain else None
    by_repeat = _ratio_by_repeat(runs, "ours", "b_stream", "a_throughput")
    return {
        "stream_16_vs_llamacpp": _ratio_target(runs, "b_stream", "completion_tok_s", ">=", 1.2, "llamacpp"),
        "stream_vs_our_nonstream": _target(
            {"ours_stream": ours_stream, "ours_nonstream": ours_plain, "ratio": own, "ratio_by_repeat": by_repeat},
            own, ">=", 0.9, stream_c or plain_c,
        ),
        "single_stream_vs_llamacpp": _ratio_target(runs, "sequential", "completion_tok_s", ">=", 1.0, "llamacpp"),
    }  # fmt: skip


def _ratio_by_repeat(runs: list[dict], server: str, top: str, bottom: str) -> dict[int, float]:
    """`top` over `bottom` tok/s within each repeat where both ran without errors: the spread
    behind the ratio of medians."""
    rates: dict[str, dict[int, float]] = {top: {}, bottom: {}}
    for run in _runs(runs, server):
        if run["workload"] in rates and run.get("errors") == 0 and run.get("completion_tok_s"):
            rates[run["workload"]][run["repeat"]] = run["completion_tok_s"]
    return {
        repeat: round(rates[top][repeat] / rates[bottom][repeat], 3)
        for repeat in sorted(rates[top].keys() & rates[bottom].keys())
    }
