"""/v1/models (httpx and the openai client), /health, /metrics."""

from __future__ import annotations

import re

import openai
import pytest

from tests.integration.conftest import Server
from tests.integration.helpers import assert_openai_error, chat_body


def test_models_list_over_http(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == [text_server.model_name]
    card = body["data"][0]
    assert card["object"] == "model"
    assert isinstance(card["created"], int) and card["created"] > 0
    assert isinstance(card["owned_by"], str)


def test_models_list_with_openai_client(text_server: Server) -> None:
    models = list(text_server.openai().models.list())
    assert [m.id for m in models] == [text_server.model_name]
    assert models[0].object == "model"


def test_retrieve_model(text_server: Server) -> None:
    model = text_server.openai().models.retrieve(text_server.model_name)
    assert model.id == text_server.model_name
    with text_server.http() as client:
        response = client.get(f"/v1/models/{text_server.model_name}")
    assert response.status_code == 200
    assert response.json()["id"] == text_server.model_name


def test_retrieve_unknown_model_is_404(text_server: Server) -> None:
    with text_server.http() as client:
        assert_openai_error(client.get("/v1/models/not-this-one"), 404, code="model_not_found", param="model")
    with pytest.raises(openai.NotFoundError) as caught:
        text_server.openai().models.retrieve("not-this-one")
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize("path", ["/health", "/health/ready"])
def test_health_is_ready_with_replica_info(vlm_server: Server, path: str) -> None:
    with vlm_server.http() as client:
        response = client.get(path)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["ready"] is True
    assert body["model"] == vlm_server.model_name
    assert body["uptime_s"] >= 0
    # REDACT_SOURCE defaults to on: no model path, revision or cache folder in /health
    assert body["source"] is body["revision"] is body["cache_dir"] is None
    replicas = body["replicas"]
    assert len(replicas) >= 1
    for replica in replicas:
        assert replica["state"] == "ready"
        assert {"name", "device", "running", "queued"} <= set(replica)
        # The paged KV pool, sized once at startup, and what the engine does with it.
        assert (
            replica["kv_blocks_total"] > 0 and replica["kv_block_size"] > 0 and replica["kv_pool_bytes"] > 0
        )
        assert 0 <= replica["kv_blocks_used"] <= replica["kv_blocks_total"]
        assert replica["prefix_caching"] is True and replica["path"] == "fast"
        assert replica["kernels"]
        assert replica["cuda_graphs"] == "off"  # CPU never captures


def _metric(text: str, name: str) -> float:
    match = re.search(rf'^{re.escape(name)}\{{model_name="[^"]+"\}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_prefix_cache_hits_are_exported_with_vllm_names(text_server: Server) -> None:
    system = "You are a terse assistant. Keep every answer short and to the point. " * 4
    body = {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}],
        "max_tokens": 2,
    }
    with text_server.http() as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        before = client.get("/metrics").text
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        after = client.get("/metrics").text
        health = client.get("/health").json()["replicas"][0]
    assert re.search(r"^# TYPE vllm:prefix_cache_hits(_total)? counter$", after, re.MULTILINE)
    assert _metric(after, "vllm:prefix_cache_queries_total") > _metric(
        before, "vllm:prefix_cache_queries_total"
    )
    assert (
        _metric(after, "vllm:prefix_cache_hits_total") >= _metric(before, "vllm:prefix_cache_hits_total") + 32
    )
    assert 0.0 <= _metric(after, "vllm:kv_cache_usage_perc") <= 1.0
    assert health["prefix_cache_hits"] >= 32


def test_health_live(text_server: Server) -> None:
    with text_server.http(authenticated=False) as client:
        response = client.get("/health/live")
    assert response.status_code == 200
    assert response.json() == {"status": "alive"}


def _requests_total(text: str, endpoint: str, status: str) -> float:
    pattern = rf'^docoserve_requests_total\{{endpoint="{endpoint}",status="{status}"\}} (\S+)$'
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_requests(text_server: Server) -> None:
    with text_server.http() as client:
        before = _requests_total(client.get("/metrics").text, "chat", "200")
        assert client.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE docoserve_requests_total counter" in response.text
    assert _requests_total(response.text, "chat", "200") >= before + 1
    assert re.search(r'^docoserve_replica_ready\{replica="0"\} 1\.0$', response.text, re.MULTILINE)


def test_max_model_len_is_what_one_sequence_may_hold_here(base_server: Server) -> None:
    """MAX_INPUT_TOKENS=64 plus MAX_NEW_TOKENS_DEFAULT=16 hold 80 tokens of the model's 4,096; the
    card said 4,096, and a client sizing a request by it had its prompt cut."""
    with base_server.http() as http:
        card = http.get(f"/v1/models/{base_server.model_name}").json()
        tokenized = http.post("/tokenize", json={"prompt": "hello"}).json()
        fits = http.post("/v1/completions", json={"prompt": [1] * 64, "max_tokens": 16, "ignore_eos": True})
    assert card["max_model_len"] == tokenized["max_model_len"] == 80
    assert fits.status_code == 200, fits.text
    assert fits.json()["usage"]["total_tokens"] == 80


def test_health_names_the_source_revision_and_cache_when_redaction_is_off(base_server: Server) -> None:
    with base_server.http() as http:
        body = http.get("/health").json()
    assert body["source"] == "builtin:tiny-base" and body["revision"] == "0123abcd"
    assert isinstance(body["cache_dir"], str) and body["cache_dir"]
