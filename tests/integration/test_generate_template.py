"""POST /generate (TGI shape) and POST /v1/apply_template."""

from __future__ import annotations

from tests.integration.conftest import TEXT_DEFAULT_MAX_TOKENS, Server
from tests.integration.helpers import assert_openai_error, user


def test_generate_tgi_shape(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.post(
            "/generate", json={"inputs": "Write a haiku about GPUs", "parameters": {"max_new_tokens": 8}}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["generated_text"], str)
    assert body["finish_reason"] in {"stop", "length"}
    assert 0 < body["generated_tokens"] <= 8


def test_generate_greedy_is_deterministic_and_bounded(text_server: Server) -> None:
    payload = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 12, "do_sample": False}}
    with text_server.http() as client:
        first = client.post("/generate", json=payload).json()
        second = client.post("/generate", json=payload).json()
    assert first["generated_text"] == second["generated_text"]
    assert first["generated_tokens"] <= 12


def test_generate_without_parameters(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.post("/generate", json={"inputs": "hello"})
    assert response.status_code == 200, response.text
    assert response.json()["generated_tokens"] <= TEXT_DEFAULT_MAX_TOKENS  # the server's default cap


def test_generate_rejects_empty_inputs(text_server: Server) -> None:
    with text_server.http() as client:
        assert_openai_error(client.post("/generate", json={"inputs": ""}), 400, param="inputs")
        assert_openai_error(client.post("/generate", json={"parameters": {}}), 400, param="inputs")


def test_apply_template_chatml(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.post("/v1/apply_template", json={"messages": user("hello")})
    assert response.status_code == 200, response.text
    prompt = response.json()["prompt"]
    assert isinstance(prompt, str)
    assert "<|im_start|>user\nhello<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_apply_template_keeps_roles_and_order(text_server: Server) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second"},
    ]
    with text_server.http() as client:
        prompt = client.post("/v1/apply_template", json={"messages": messages}).json()["prompt"]
    positions = [prompt.index(f"<|im_start|>{m['role']}\n{m['content']}") for m in messages]
    assert positions == sorted(positions)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_apply_template_without_generation_prompt(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.post(
            "/v1/apply_template", json={"messages": user("hi"), "add_generation_prompt": False}
        )
    assert response.status_code == 200
    assert not response.json()["prompt"].endswith("<|im_start|>assistant\n")


def test_apply_template_renders_image_placeholder_without_fetching(vlm_server: Server) -> None:
    """Rendering an image message needs no pixels: the placeholder shows up in the prompt."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "https://example.invalid/x.png"}},
            ],
        }
    ]
    with vlm_server.http() as client:
        response = client.post("/v1/apply_template", json={"messages": messages})
    assert response.status_code == 200, response.text
    prompt = response.json()["prompt"]
    assert "<|im_start|>user\n" in prompt
    assert "look" in prompt
    assert "<image>" in prompt  # builtin:tiny-vlm's image token
    assert prompt.endswith("<|im_start|>assistant\n")
