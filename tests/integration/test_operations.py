"""What an operator sees: the readiness line and banner, one log line per request (plain, and
JSON on the edge server), X-Request-Id on every response, HTTP counts, GET /version, CORS."""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from urllib.parse import urlsplit

import pytest

from tests.integration.conftest import (
    EDGE_CORS_ORIGIN,
    TEXT_DEFAULT_MAX_TOKENS,
    Server,
    launch,
    stop,
    tiny_spec,
    wait_ready,
)
from tests.integration.helpers import chat_body


def _log(server: Server, waiting_for: str = "[server] Ready") -> list[str]:
    """The server's log once it holds `waiting_for`: the readiness line follows /health turning
    ready by up to one heartbeat (a generous deadline, not a timing assertion)."""
    deadline = time.monotonic() + 60
    while True:
        lines = server.log_path.read_text(errors="replace").splitlines()
        if any(waiting_for in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_the_readiness_line_is_the_seeds_and_the_banner_says_what_matters(text_server: Server) -> None:
    lines = _log(text_server, waiting_for="built-in demo model")
    ready = f"[server] Ready. Health: {text_server.base_url}/health"
    assert any(line.endswith(ready) for line in lines), ready
    text = "\n".join(lines)
    assert "[server] startup took " in text
    import transformers

    assert f"[server] transformers {transformers.__version__} from " in text
    # The seed's per-device startup steps (text_server runs with --progress), in order.
    steps = [
        "Loading tokenizer…",
        "Tokenizer ready",
        "Loading model (attn=",
        "torch.compile=off",
        "Warmup…",
        "Ready.",
    ]
    found = [next(i for i, line in enumerate(lines) if f"[startup][cpu] {step}" in line) for step in steps]
    assert found == sorted(found)
    assert f"OpenAI-compatible API at {text_server.base_url}/v1" in text
    assert "auth: a bearer key (API_KEY) is required" in text
    assert f"answers are capped at {TEXT_DEFAULT_MAX_TOKENS} new tokens per request" in text
    assert "warning: serving the built-in demo model builtin:tiny" in text
    assert text_server.api_key not in text  # the key itself never reaches the log


def test_a_server_without_a_key_warns_in_its_banner(edge_server: Server) -> None:
    lines = _log(edge_server, waiting_for="auth is off")
    assert any("warning: auth is off (no API_KEY)" in line for line in lines)


def test_version_is_open_and_names_the_server_version(text_server: Server) -> None:
    with text_server.http(authenticated=False) as client:
        response = client.get("/version")
    assert response.status_code == 200
    from app.version import VERSION

    assert response.json() == {"version": VERSION}


def test_cors_answers_the_allowed_origin_only(edge_server: Server) -> None:
    preflight = {"Origin": EDGE_CORS_ORIGIN, "Access-Control-Request-Method": "POST",
                 # The openai JS SDK's own headers come with every request it sends.
                 "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,"
                                                   "x-stainless-retry-count,openai-project"}  # fmt: skip
    with edge_server.http(authenticated=False) as client:
        allowed = client.options("/v1/chat/completions", headers=preflight)
        other = client.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.test"})
        simple = client.get("/v1/models", headers={"Origin": EDGE_CORS_ORIGIN})
    assert allowed.status_code in (200, 204)
    assert allowed.headers["access-control-allow-origin"] == EDGE_CORS_ORIGIN
    allowed_headers = allowed.headers["access-control-allow-headers"].lower()
    assert {"authorization", "x-stainless-os", "x-stainless-retry-count"} <= set(
        allowed_headers.replace(" ", "").split(",")
    )
    assert other.headers.get("access-control-allow-origin") is None
    assert simple.headers["access-control-allow-origin"] == EDGE_CORS_ORIGIN
    # A stream's warnings come only in X-Request-Warnings: a web page must be able to read it.
    exposed = simple.headers["access-control-expose-headers"].lower().replace(" ", "").split(",")
    assert {"x-request-id", "retry-after", "x-request-warnings"} <= set(exposed)


def test_no_cors_headers_unless_configured(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.get("/v1/models", headers={"Origin": EDGE_CORS_ORIGIN})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_every_request_gets_one_log_line_and_its_request_id_back(text_server: Server) -> None:
    mine = f"trace-{uuid.uuid4().hex[:12]}"
    with text_server.http() as client:
        ok = client.post(
            "/v1/chat/completions",
            json=chat_body("hi", model=text_server.model_name, max_tokens=3),
            headers={"X-Request-Id": mine},
        )
        invalid = client.post("/v1/chat/completions", json={"model": text_server.model_name, "messages": []})
    with text_server.http(authenticated=False) as anonymous:
        refused = anonymous.post("/v1/chat/completions", json=chat_body("hi", model=text_server.model_name))
    assert ok.status_code == 200 and ok.headers["x-request-id"] == mine
    assert ok.json()["id"].startswith("chatcmpl-")  # the response id keeps OpenAI's form
    assert invalid.status_code == 400 and invalid.headers["x-request-id"].startswith("req-")
    assert refused.status_code == 401 and refused.headers["x-request-id"].startswith("req-")
    lines = _log(text_server, waiting_for=refused.headers["x-request-id"])
    [line] = [line for line in lines if f"request_id={mine}" in line]
    # The seed's line (text_server runs with --progress), then what this server adds.
    seed = (
        rf"\[req\] chat 200 id={ok.json()['id']} latency=[\d.]+s gen=[\d.]+s model={text_server.model_name} "
    )
    seed += r"tokens: prompt=\d+ completion=3 total=\d+ tps=[\d.]+ do_sample=(true|false) temp=[\d.]+ top_p=[\d.]+ seed=\S+"
    assert re.search(seed, line), line
    assert "path=/v1/chat/completions" in line and "finish_reason=length" in line and "ttft_s=" in line
    # /generate's is the seed's shorter line: a parser of `tokens: completion=` read none of ours.
    with text_server.http() as client:
        generated = client.post(
            "/generate",
            json={"inputs": "hi", "parameters": {"max_new_tokens": 2, "do_sample": False}},
            headers={"X-Request-Id": f"{mine}-gen"},
        )
    assert generated.status_code == 200, generated.text
    lines = _log(text_server, waiting_for=f"{mine}-gen")
    [line] = [line for line in lines if f"request_id={mine}-gen" in line]
    assert re.search(
        r"\[req\] generate 200 id=\S+ gen=[\d.]+s tokens: completion=2 tps=[\d.]+ do_sample=false ", line
    ), line
    assert any(
        "[req] POST /v1/chat/completions 400" in x and invalid.headers["x-request-id"] in x for x in lines
    )
    assert any(
        "[req] POST /v1/chat/completions 401" in x and refused.headers["x-request-id"] in x for x in lines
    )
    assert text_server.api_key not in "\n".join(lines)
    with text_server.http() as client:
        metrics = client.get("/metrics").text
    counted = re.search(
        r'^docoserve_http_requests_total\{method="POST",route="/v1/chat/completions",status="401"\} (\S+)$',
        metrics,
        re.M,
    )
    assert counted and float(counted.group(1)) >= 1


def test_unknown_paths_and_methods_are_logged_and_counted_under_one_label(text_server: Server) -> None:
    """The router's own 404 and 405 answers get a request id, a line and a count; a path the
    client made up never becomes a metrics label, and its odd bytes never reach the log raw."""
    mine = f"lost-{uuid.uuid4().hex[:12]}"
    odd = f"/v1/no-such-{uuid.uuid4().hex[:8]}"
    with text_server.http() as client:
        missing = client.get(odd + "%20x%0Ay=1", headers={"X-Request-Id": mine})
        wrong_method = client.delete("/v1/chat/completions")
    assert missing.status_code == 404 and missing.headers["x-request-id"] == mine
    assert "error" in missing.json()
    assert wrong_method.status_code == 405 and wrong_method.headers["x-request-id"].startswith("req-")
    lines = _log(text_server, waiting_for=wrong_method.headers["x-request-id"])
    [line] = [line for line in lines if f"request_id={mine}" in line]
    assert line.endswith(f"[req] GET {odd}?x?y=1 404 latency=0.000s request_id={mine}"), line
    assert any("[req] DELETE /v1/chat/completions 405" in x for x in lines)
    with text_server.http() as client:
        metrics = client.get("/metrics").text
    assert odd not in metrics
    counted = re.search(
        r'^docoserve_http_requests_total\{method="GET",route="unmatched",status="404"\} (\S+)$', metrics, re.M
    )
    assert counted and float(counted.group(1)) >= 1


def test_methods_the_client_invents_are_counted_under_one_label(text_server: Server) -> None:
    """The request line's method is the client's to choose, and no key is needed to send one: a
    label value per invented method would grow /metrics without bound."""
    host, port = urlsplit(text_server.base_url).hostname, urlsplit(text_server.base_url).port
    invented = [f"X{uuid.uuid4().hex[:11].upper()}" for _ in range(3)]
    for method in invented:
        with socket.create_connection((host, port), timeout=10) as raw:
            raw.sendall(f"{method} /health HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert raw.recv(200).startswith(b"HTTP/1.1 405")
    with text_server.http() as client:
        metrics = client.get("/metrics").text
    assert not any(method in metrics for method in invented)
    counted = re.search(
        r'^docoserve_http_requests_total\{method="other",route="unmatched",status="405"\} (\S+)$',
        metrics,
        re.M,
    )
    assert counted and float(counted.group(1)) >= len(invented)


def test_with_log_format_json_every_line_is_a_json_object(edge_server: Server) -> None:
    mine = f"json-{uuid.uuid4().hex[:12]}"
    with edge_server.http() as client:
        response = client.post(
            "/v1/chat/completions",
            json=chat_body("hi", model=edge_server.model_name, max_tokens=2),
            headers={"X-Request-Id": mine},
        )
    assert response.status_code == 200
    lines = [line for line in _log(edge_server, waiting_for=mine) if line.strip()]
    records = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records)
    [request] = [r for r in records if r.get("request_id") == mine]
    assert request["status"] == 200 and request["path"] == "/v1/chat/completions"
    assert request["completion_tokens"] == 2 and request["id"].startswith("chatcmpl-")


def test_metrics_need_the_key_and_speak_vllms_names(text_server: Server) -> None:
    with text_server.http(authenticated=False) as anonymous:
        assert anonymous.get("/metrics").status_code == 401
    with text_server.http() as client:
        assert (
            client.post(
                "/v1/chat/completions", json=chat_body("hi", model=text_server.model_name, max_tokens=4)
            ).status_code
            == 200
        )
        text = client.get("/metrics").text
        preemptions = sum(replica["preemptions"] for replica in client.get("/health").json()["replicas"])
    model = f'model_name="{text_server.model_name}"'
    counted = re.search(rf"^vllm:num_preemptions_total\{{{model}\}} (\S+)$", text, re.M)
    assert counted and float(counted.group(1)) == preemptions
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert re.search(rf"^{gauge}\{{{model}\}} \S+$", text, re.M), gauge
    for counter in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        match = re.search(rf"^{counter}\{{{model}\}} (\S+)$", text, re.M)
        assert match and float(match.group(1)) > 0, counter
    success = [line for line in text.splitlines() if line.startswith("vllm:request_success_total{")]
    assert any('finished_reason="length"' in line and model in line for line in success), success
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds"):  # fmt: skip
        match = re.search(rf"^vllm:{histogram}_count\{{{model}\}} (\S+)$", text, re.M)
        assert match and float(match.group(1)) >= 1, histogram
    assert "process_cpu_seconds_total" in text and "python_info" in text


def _vllm_figures(client, model: str) -> dict[str, float]:
    text = client.get("/metrics").text
    figures = {}
    for name in (
        "vllm:generation_tokens_total",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
    ):
        match = re.search(rf'^{name}\{{model_name="{model}"\}} (\S+)$', text, re.M)
        figures[name] = float(match.group(1)) if match else 0.0
    figures["success"] = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total{") and f'model_name="{model}"' in line
    )
    return figures


def test_vllm_series_count_every_prompt_and_choice(text_server: Server) -> None:
    """A multi-prompt completion fed vLLM's series with its first prompt only, and a non-streamed
    n > 1 answer counted the inter-token intervals of its first choice only."""
    body = {"prompt": ["one", "two"], "n": 2, "max_tokens": 5, "ignore_eos": True, "temperature": 1.0}
    with text_server.http() as client:
        before = _vllm_figures(client, text_server.model_name)
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        after = _vllm_figures(client, text_server.model_name)
    delta = {name: after[name] - before[name] for name in after}
    assert delta["vllm:generation_tokens_total"] == answer.json()["usage"]["completion_tokens"] == 20
    assert (
        delta["success"] == 4 and delta["vllm:e2e_request_latency_seconds_count"] == 2
    )  # a request per prompt
    assert delta["vllm:inter_token_latency_seconds_count"] == 2 * 2 * (5 - 1)


@pytest.mark.slow
def test_debug_with_json_logs_keeps_every_line_json_and_one_per_request(tmp_path) -> None:
    """DEBUG set TRANSFORMERS_VERBOSITY, and transformers printed its import-time lines with a
    handler of its own (plain text in a JSON log); granian's access log added a second line per
    request and wrote the decoded path raw, so `%0A` in a URL forged a log line."""
    spec = tiny_spec("debug", DEBUG="1", LOG_FORMAT="json")
    server = launch("debug_json_server", spec, tmp_path / "cache", tmp_path)
    mine = f"debug-{uuid.uuid4().hex[:12]}"
    try:
        wait_ready(server)
        with server.http() as client:
            client.get("/x%0A2026-12-05 00:00:00,000 INFO docoserve.requests: FORGED")
            answer = client.post(
                "/v1/chat/completions", json=chat_body("hi", max_tokens=2), headers={"X-Request-Id": mine}
            )
            assert answer.status_code == 200
        lines = [line for line in _log(server, waiting_for=mine) if line.strip()]
    finally:
        stop(server)
    records = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert any(r["logger"].startswith("transformers") for r in records)  # the libraries' lines, as JSON
    assert [r["logger"] for r in records if mine in json.dumps(r)] == ["docoserve.requests"]
    assert not any(r["message"].startswith("FORGED") or "\nFORGED" in r["message"] for r in records)
