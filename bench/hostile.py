"""Hostile-client figures for docs/BENCHMARKS.md (the pass/fail versions are tests in make test).

    python -m bench.hostile [--model-path builtin:tiny]

- connections: 5,000 idle sockets and 200 stalled bodies held open; /health and a chat request
  timed meanwhile.
- heavy: two 8 MiB prompts sent together with an ordinary request: how long each takes, against
  the ordinary request alone.
- huge: one 60 MiB prompt: time to its answer, and the server's RSS before and after.

One JSON line per scenario; everything on 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.ours import our_server

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"


def _rss_mib(pid: int) -> float:
    import psutil  # comes with accelerate

    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return round(sum(p.memory_info().rss for p in processes) / 2**20, 1)


async def _timed_chat(client: httpx.AsyncClient, target, content: str | bytes) -> tuple[int, float]:
    headers = {"Authorization": f"Bearer {target.api_key}", "Content-Type": "application/json"}
    body = (
        content
        if isinstance(content, bytes)
        else json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 4}).encode()
    )
    started = time.perf_counter()
    response = await client.post(f"{target.base_url}/chat/completions", content=body, headers=headers)
    return response.status_code, round(time.perf_counter() - started, 3)


def _big_body(mib: int) -> bytes:
    text = "lorem ipsum dolor " * (mib * 2**20 // 18)
    return json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4}).encode()


async def connections(target) -> dict:
    host, port = target.base_url.removeprefix("http://").split("/")[0].split(":")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    sockets = [socket.create_connection((host, int(port))) for _ in range(5000)]
    for _ in range(200):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n{")
        sockets.append(sock)
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            started = time.perf_counter()
            health = (await client.get(target.health_url)).status_code
            health_s = round(time.perf_counter() - started, 3)
            chat = await _timed_chat(client, target, "hi")
    finally:
        for sock in sockets:
            sock.close()
    return {
        "scenario": "connections",
        "idle": 5000,
        "stalled_bodies": 200,
        "health": [health, health_s],
        "chat": chat,
    }


async def heavy(target) -> dict:
    async with httpx.AsyncClient(timeout=300) as client:
        alone = [(await _timed_chat(client, target, "hi"))[1] for _ in range(5)]
        big = _big_body(8)

        async def light() -> tuple[int, float]:
            await asyncio.sleep(0.05)
            return await _timed_chat(client, target, "hi")

        first, second, during = await asyncio.gather(
            _timed_chat(client, target, big), _timed_chat(client, target, big), light()
        )
    return {
        "scenario": "heavy",
        "ordinary_alone_s": alone,
        "8mib_prompts": [first, second],
        "ordinary_during": during,
    }


async def huge(target, pid: int) -> dict:
    async with httpx.AsyncClient(timeout=300) as client:
        await _timed_chat(client, target, "warm up")
        before = _rss_mib(pid)
        answer = await _timed_chat(client, target, _big_body(60))
        await asyncio.sleep(2)
        return {
            "scenario": "huge",
            "60mib_prompt": answer,
            "rss_before_mib": before,
            "rss_after_mib": _rss_mib(pid),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="builtin:tiny")
    args = parser.parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    server, target = our_server(args.model_path, "bench", log_path=RESULTS_DIR / f"{stamp}-hostile.log")
    lines = []
    with server:
        for run in (connections(target), heavy(target), huge(target, server.process.pid)):
            line = asyncio.run(run)
            lines.append(line)
            print(json.dumps(line), flush=True)
    (RESULTS_DIR / f"{stamp}-hostile.json").write_text(json.dumps(lines, indent=1))
    print(f"[hostile] results in {RESULTS_DIR / f'{stamp}-hostile.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
