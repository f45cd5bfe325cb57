"""What the `openai` client's CPU per streamed event depends on, against a fake SSE server.

Streamed (b) loses to non-streamed (a) mostly by the client's parsing on the same two cores, so
this asks which of the things a server controls would make that parsing cheaper: the fields of a
chunk, how many events go out in one write, and whether a step's writes to the 16 streams leave
in one burst or spread out. The fake server (a subprocess, plain asyncio, chunked HTTP/1.1 as
granian sends it) paces its steps by spinning on its core through each (as the engine's forward
does) or by sleeping (its core free), for as long as a served step or shorter.

    .venv/bin/python -m bench.client_cost [--repeat 3]

Prints, per variant and repeat, the client's CPU microseconds per content event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time

STREAMS = 16
STEPS = 256
DONE = b"data: [DONE]\n\n"


def event(fields: str) -> bytes:
    """One content chunk: ours as sent (`ours`), or without the keys a client can do without."""
    chunk: dict = {
        "object": "chat.completion.chunk",
        "id": "chatcmpl-4f82fa871a3e40e8a06847a84b10baa6",
        "created": 1796440476,
        "model": "model",
        "choices": [{"index": 0, "delta": {"content": " tok"}, "logprobs": None, "finish_reason": None}],
        "system_fingerprint": "fp_docoserve_0_1",
    }
    if fields == "bare":
        del chunk["system_fingerprint"]
        chunk["choices"] = [{"index": 0, "delta": {"content": " tok"}}]
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def busy(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


async def serve(
    port: int, fields: str, per_write: int, step: str, spread_us: float, steps: int = STEPS
) -> None:
    writers: list[asyncio.StreamWriter] = []
    all_here = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        writers.append(writer)
        if len(writers) == STREAMS:
            all_here.set()

    def chunked(payload: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(payload), payload)

    server = await asyncio.start_server(accept, "127.0.0.1", port)
    body = event(fields) * per_write
    kind, step_ms = step.split(":")  # "spin:25": a step spun through for 25 ms; "sleep:25" slept
    step_s = float(step_ms) / 1000
    async with server:
        await all_here.wait()
        for _ in range(steps // per_write):
            if kind == "spin":  # the forward holds this core
                busy(step_s * per_write)
            else:
                await asyncio.sleep(step_s * per_write)
            for writer in writers:
                writer.write(chunked(body))
                if spread_us:  # the event loop's per-stream work between writes
                    busy(spread_us / 1e6)
                    await asyncio.sleep(0)
        for writer in writers:
            writer.write(chunked(DONE) + b"0\r\n\r\n")
            await writer.drain()
            writer.close()


async def read_all(port: int) -> tuple[int, float]:
    """Reads the fake server's 16 streams: content events, and client CPU microseconds per event."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

    async def one() -> int:
        stream = await client.chat.completions.create(
            model="model", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return len([chunk async for chunk in stream if chunk.choices and chunk.choices[0].delta.content])

    began = time.process_time()
    events = sum(await asyncio.gather(*(one() for _ in range(STREAMS))))
    spent = time.process_time() - began
    await client.close()
    return events, spent / max(events, 1) * 1e6


VARIANTS = {  # name: (fields, events per write, step kind:ms, spread between streams' writes in us)
    "ours, 25 ms steps spun": ("ours", 1, "spin:25", 0),
    "bare fields, 25 ms steps spun": ("bare", 1, "spin:25", 0),
    "writes spread 70 us, 25 ms steps spun": ("ours", 1, "spin:25", 70),
    "ours, 25 ms steps slept": ("ours", 1, "sleep:25", 0),
    "ours, 8 ms steps slept": ("ours", 1, "sleep:8", 0),
    "ours, 4 ms steps slept": ("ours", 1, "sleep:4", 0),
    "ours, 2 ms steps slept": ("ours", 1, "sleep:2", 0),
    "2 events per write, 2 ms a token": ("ours", 2, "sleep:2", 0),
    "4 events per write, 2 ms a token": ("ours", 4, "sleep:2", 0),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        port, fields, per_write, step, spread = args.serve
        asyncio.run(serve(int(port), fields, int(per_write), step, float(spread)))
        return
    for repeat in range(args.repeat):
        for name, (fields, per_write, step, spread) in VARIANTS.items():
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            argv = [
                sys.executable,
                "-m",
                "bench.client_cost",
                "--serve",
                str(port),
                fields,
                str(per_write),
                step,
                str(spread),
            ]
            server = subprocess.Popen(argv)
            try:
                time.sleep(1.0)
                print(
                    f"repeat {repeat + 1}  {name:<40} {asyncio.run(read_all(port))[1]:6.1f} us per event",
                    flush=True,
                )
            finally:
                server.kill()
                server.wait()


if __name__ == "__main__":
    main()
