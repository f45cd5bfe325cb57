"""Images: base64 PNG data URLs to the VLM server; the text server refuses images."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import Server
from tests.integration.helpers import assert_openai_error, image_message, png_data_url, text_parts_message

IMAGE_TOKENS = 16  # builtin:tiny-vlm: 32x32 pixels in 8x8 patches


def test_image_adds_image_tokens_to_the_prompt(vlm_server: Server) -> None:
    client = vlm_server.openai()
    prompt = "What is in this image?"
    with_image = client.chat.completions.create(
        model=vlm_server.model_name, messages=image_message(prompt, png_data_url()), max_tokens=6
    )
    without = client.chat.completions.create(
        model=vlm_server.model_name, messages=text_parts_message(prompt), max_tokens=6
    )
    assert isinstance(with_image.choices[0].message.content, str)
    assert with_image.choices[0].finish_reason in {"stop", "length"}
    assert with_image.usage.prompt_tokens >= without.usage.prompt_tokens + IMAGE_TOKENS
    assert (
        with_image.usage.total_tokens == with_image.usage.prompt_tokens + with_image.usage.completion_tokens
    )


def test_image_usage_details_over_http(vlm_server: Server) -> None:
    with vlm_server.http() as client:
        response = client.post(
            "/v1/chat/completions",
            json={"messages": image_message("describe", png_data_url((48, 20))), "max_tokens": 3},
        )
    assert response.status_code == 200, response.text
    details = response.json()["usage"]["prompt_tokens_details"]
    assert details["image_tokens"] >= IMAGE_TOKENS


def test_image_streaming(vlm_server: Server) -> None:
    stream = vlm_server.openai().chat.completions.create(
        model=vlm_server.model_name,
        messages=image_message("describe", png_data_url()),
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens > IMAGE_TOKENS


def test_same_image_twice_is_deterministic(vlm_server: Server) -> None:
    client = vlm_server.openai()
    url = png_data_url(color=(10, 10, 250))

    def run() -> str:
        completion = client.chat.completions.create(
            model=vlm_server.model_name, messages=image_message("describe", url), max_tokens=8, temperature=0
        )
        return completion.choices[0].message.content

    assert run() == run()


def test_text_server_refuses_images(text_server: Server) -> None:
    body = {"messages": image_message("What is this?", png_data_url()), "max_tokens": 4}
    with text_server.http() as client:
        response = client.post("/v1/chat/completions", json=body)
    error = assert_openai_error(response, 400)
    assert "does not accept images" in error["message"]
    with pytest.raises(openai.BadRequestError):
        text_server.openai().chat.completions.create(model=text_server.model_name, **body)
    # Refused before anything is fetched: the text-only server downloaded client URLs first (and
    # here, a loopback address, answered that one instead), on chat, /tokenize and /v1/responses.
    remote = "http://127.0.0.1:9/never-fetched.png"
    with text_server.http() as client:
        for path, request in (
            ("/v1/chat/completions", {"messages": image_message("What?", remote), "max_tokens": 4}),
            ("/tokenize", {"messages": image_message("What?", remote)}),
            (
                "/v1/responses",
                {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": remote}]}]},
            ),
        ):
            error = assert_openai_error(client.post(path, json=request), 400)
            assert "does not accept images" in error["message"], (path, error)
            assert error["param"] and error["param"] != "messages", (path, error)


@pytest.mark.parametrize(
    "url, why",
    [
        ("data:image/png;base64,AAAA", "bytes that are no image"),
        ("data:image/png;base64,@@not-base64@@", "a payload that is not base64"),
        ("file:///etc/passwd", "a scheme other than http(s)/data"),
        ("http://127.0.0.1:1/cat.png", "a private address (SSRF guard)"),
    ],
)
def test_bad_image_urls_are_client_errors(vlm_server: Server, url: str, why: str) -> None:
    messages = [
        {"role": "user", "content": "first"},
        *image_message("describe", png_data_url()),
        *image_message("describe", url),
    ]
    with vlm_server.http() as client:
        response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    # The error names the image at fault: message 2, part 1 (after its text), not message 1's image.
    assert_openai_error(response, 400, param="messages[2].content[1].image_url")
