"""Careless and hostile bodies against the API surface added for structured outputs, scoring and
the Responses API; prints one line per probe (status, seconds, start of the body).

    python -m bench.hostile_api --base-url http://127.0.0.1:8000 [--api-key KEY]

Run against `entrypoint.py --model-path builtin:tiny`. Every probe must answer quickly with a 200
or a 4xx in the OpenAI error shape, never a 500, and the server must serve a plain request after.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import httpx

MESSAGES = [{"role": "user", "content": "hi"}]
DEEP_SCHEMA = json.loads('{"type": "object", "properties": {"a": ' * 200 + "{}" + "}}" * 200)
PROBES: list[tuple[str, str, dict]] = [
    ("choice 50k", "/v1/chat/completions", {"guided_choice": [f"option{i:06d}" for i in range(50_000)]}),
    ("regex unbalanced", "/v1/chat/completions", {"guided_regex": "(" * 5000}),
    ("regex blow-up", "/v1/chat/completions", {"guided_regex": "(a|aa)*(a{1,500}){1,500}b"}),
    ("grammar left-recursive", "/v1/completions", {"guided_grammar": 'start: start "a" | "b"'}),
    ("json nested 200 deep", "/v1/completions", {"guided_json": DEEP_SCHEMA}),
    ("whitespace pattern bad", "/v1/chat/completions", {"guided_json": {}, "guided_whitespace_pattern": "(((("}),
    ("prompt_logprobs long", "/v1/completions", {"prompt": "word " * 3000, "max_tokens": 1, "prompt_logprobs": 20}),
    ("prompt_logprobs n=8", "/v1/completions", {"prompt": "word " * 1000, "max_tokens": 4, "prompt_logprobs": 20, "n": 8}),
    ("echo n=4 max_tokens 0", "/v1/completions", {"prompt": "hi there", "max_tokens": 0, "echo": True, "logprobs": 5, "n": 4}),
    ("max_tokens 0 without echo", "/v1/completions", {"prompt": "x", "max_tokens": 0}),
    ("responses 5k items", "/v1/responses", {"input": MESSAGES * 5000, "max_output_tokens": 4}),
    ("responses 1 MB instructions", "/v1/responses", {"input": "hi", "instructions": "x" * 1_000_000, "max_output_tokens": 4}),
    ("responses orphan tool output", "/v1/responses", {"input": [{"type": "function_call_output", "call_id": "x", "output": "y"}], "max_output_tokens": 4}),
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = httpx.Client(base_url=args.base_url, timeout=120, headers=headers)
    worst = 0
    for name, path, extra in PROBES:
        body = (
            {"prompt": "x", "max_tokens": 8}
            if path == "/v1/completions"
            else {"messages": MESSAGES, "max_tokens": 8}
        )
        if path == "/v1/responses":
            body = {}
        started = time.monotonic()
        response = client.post(path, json={**body, **extra})
        worst = max(worst, response.status_code)
        print(f"{name:30s} {response.status_code} {time.monotonic() - started:6.2f}s {response.text[:100]!r}")
    statuses: list[int] = []

    def mixed(i: int) -> None:
        body = {"prompt": "word " * (50 * i + 10), "max_tokens": 8}
        if i % 2:
            body["prompt_logprobs"] = 5
        if i % 3 == 0:
            body.update(echo=True, logprobs=2)
        statuses.append(client.post("/v1/completions", json=body).status_code)

    threads = [threading.Thread(target=mixed, args=(i,)) for i in range(20)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"{'20 mixed scoring at once':30s} {sorted(set(statuses))} {time.monotonic() - started:6.2f}s")
    after = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4})
    print(f"{'plain request after':30s} {after.status_code}")
    return 1 if worst >= 500 or max(statuses) >= 500 or after.status_code != 200 else 0


if __name__ == "__main__":
    raise SystemExit(main())
