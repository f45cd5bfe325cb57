"""Images by URL through the real server: SSRF guard, hostile image hosts, odd but valid images.

Every image host is a local server on 127.0.0.1 (`ImageServer` from `image_host.py`, built on the
unit suite's `HostileServer`); redirects that point elsewhere (10.x, 169.254.169.254) must be
refused by the server before it connects, which the tests see as a fast refusal naming the private
address rule, with the image server having received only the first hop. `vlm_fetch_server` reaches 127.0.0.0/8
only; the default `vlm_server` reaches no private address at all.

The decoded-image cache is checked through `/metrics` (decode hits and misses).
"""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import msgspec
import openai
import pytest
from PIL import Image

from tests.integration.conftest import (
    VLM_FETCH_MAX_IMAGE_BYTES,
    VLM_FETCH_MAX_IMAGES,
    VLM_FETCH_TIMEOUT_S,
    Server,
)
from tests.integration.helpers import assert_openai_error, png_data_url
from tests.integration.image_host import IMAGE_A, IMAGE_B, IMAGES, ImageServer
from tests.unit._hostile_server import SECRET_BODY

pytestmark = pytest.mark.timeout(60)

IMAGE_TOKENS = 16  # builtin:tiny-vlm: every image becomes 32x32 pixels in 8x8 patches
PROMPT = "Describe the picture."
FORBIDDEN_IN_MESSAGES = (
    "127.0.0.1", "10.0.0.1", "169.254", "0x", "/etc", "/tmp", "Traceback", "Error(", "<", "SECRET",
)  # fmt: skip


# --- images ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with ImageServer() as server:
        yield server


def test_odd_images_are_what_they_claim() -> None:
    def opened(path: str) -> Image.Image:
        return Image.open(io.BytesIO(IMAGES[path][0]))

    assert opened("/1x1.png").size == (1, 1)
    assert opened("/cmyk.jpg").mode == "CMYK"
    assert opened("/16bit.png").mode.startswith("I")
    palette = opened("/palette-trns.png")
    assert palette.mode == "P" and "transparency" in palette.info
    assert opened("/rgba.png").mode == "RGBA"
    assert getattr(opened("/animated.gif"), "n_frames", 1) == 3
    assert opened("/ok.webp").format == "WEBP"
    assert opened("/wide.png").size == (20_000, 1)
    assert struct.unpack(">II", IMAGES["/bomb.png"][0][16:24]) == (100_000, 100_000)


# --- request helpers ------------------------------------------------------------------------------


def part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*urls: str, text: str = PROMPT) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *(part(u) for u in urls)]}]


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode("ascii")


def image_tokens(usage: Any) -> int:
    details = usage.prompt_tokens_details
    return 0 if details is None else getattr(details, "image_tokens", 0) or 0


def chat(server: Server, messages: list[dict[str, Any]], **extra: Any):
    extra.setdefault("max_tokens", 2)
    return server.openai().chat.completions.create(model=server.model_name, messages=messages, **extra)


def refusal(server: Server, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The 400 `error` object for `messages` (via the openai client)."""
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, messages)
    error = assert_openai_error(caught.value.response, 400)
    assert caught.value.code == error["code"]
    return error


def assert_client_safe(message: str, *, port: int) -> None:
    assert len(message) <= 200, message
    for marker in (*FORBIDDEN_IN_MESSAGES, str(port)):
        assert marker not in message, f"{marker!r} leaks into the client message: {message!r}"
    assert SECRET_BODY.decode() not in message


def assert_healthy(server: Server) -> None:
    with httpx.Client(timeout=5) as client:
        response = client.get(f"{server.base_url}/health")
    assert response.status_code == 200 and response.json()["status"] == "ready", response.text


# --- valid images ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_tokens(vlm_fetch_server: Server) -> tuple[int, int]:
    """(prompt tokens of `ask()` without images, tokens each inline image adds to it)."""
    text_only = chat(vlm_fetch_server, ask()).usage.prompt_tokens
    per_image = chat(vlm_fetch_server, ask(data_url(IMAGES["/ok.png"][0]))).usage.prompt_tokens - text_only
    # The placeholder expands to IMAGE_TOKENS; the template may add a separator around it.
    assert IMAGE_TOKENS <= per_image <= IMAGE_TOKENS + 2
    return text_only, per_image


@pytest.mark.parametrize(
    "path",
    [
        "/ok.png", "/ok.jpg", "/ok.gif", "/ok.webp",  # the accepted formats
        "/1x1.png", "/cmyk.jpg", "/16bit.png", "/palette-trns.png", "/rgba.png", "/animated.gif",  # odd ones
        "/large.png",  # larger than MAX_IMAGE_SIZE: resized, not refused
        "/png-as-octets",  # a generic content type: the decoder checks the real format
        "/chain/3",  # redirects up to the limit
    ],
)  # fmt: skip
def test_remote_image_is_fetched_and_counted(
    vlm_fetch_server: Server, images: ImageServer, prompt_tokens: tuple[int, int], path: str
) -> None:
    completion = chat(vlm_fetch_server, ask(images.url(path)))
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert image_tokens(completion.usage) == IMAGE_TOKENS
    text_only, per_image = prompt_tokens
    assert completion.usage.prompt_tokens == text_only + per_image


def test_two_images_in_one_message_and_across_messages(
    vlm_fetch_server: Server, images: ImageServer, prompt_tokens: tuple[int, int]
) -> None:
    a, b = images.url("/a.png"), images.url("/b.png")
    one_message = chat(vlm_fetch_server, ask(a, b))
    assert image_tokens(one_message.usage) == 2 * IMAGE_TOKENS
    two_messages = [
        *ask(a, text="first"),
        {"role": "assistant", "content": "noted"},
        *ask(b, text="second"),
    ]
    across = chat(vlm_fetch_server, two_messages)
    assert image_tokens(across.usage) == 2 * IMAGE_TOKENS
    text_only, per_image = prompt_tokens
    assert one_message.usage.prompt_tokens == text_only + 2 * per_image

    # The rendered prompt holds one placeholder per image, where each image part was.
    with httpx.Client(base_url=vlm_fetch_server.base_url, timeout=30) as client:
        response = client.post("/v1/apply_template", json={"messages": two_messages})
    assert response.status_code == 200, response.text
    prompt = response.json()["prompt"]
    assert prompt.count("<image>") == 2
    first, second = prompt.index("first"), prompt.index("second")
    positions = [i for i in range(len(prompt)) if prompt.startswith("<image>", i)]
    assert first < positions[0] < prompt.index("noted") < second < positions[1]


def top_logprobs(completion: Any) -> list[tuple[str, float]]:
    return [(t.token, t.logprob) for t in completion.choices[0].logprobs.content[0].top_logprobs]


def test_images_reach_the_model_in_order(vlm_fetch_server: Server, images: ImageServer) -> None:
    """Fetched concurrently, placed in order: a slow first image still comes first."""

    def first_step(*urls: str) -> list[tuple[str, float]]:
        greedy = {"max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5}
        completion = chat(vlm_fetch_server, ask(*urls), **greedy)
        return top_logprobs(completion)

    inline = first_step(data_url(IMAGE_A), data_url(IMAGE_B))
    remote = first_step(images.url("/slow-a.png"), images.url("/b.png"))
    swapped = first_step(data_url(IMAGE_B), data_url(IMAGE_A))
    assert [t for t, _ in remote] == [t for t, _ in inline]
    assert all(abs(x - y) < 1e-3 for (_, x), (_, y) in zip(remote, inline, strict=False)), (remote, inline)
    assert swapped != inline, "swapping the two images changed nothing: order is not observable"


# --- hostile image hosts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/trickle", f"timed out after {VLM_FETCH_TIMEOUT_S} s"),
        ("/trickle-headers", f"timed out after {VLM_FETCH_TIMEOUT_S} s"),
        ("/oversized-nolen", f"larger than the {VLM_FETCH_MAX_IMAGE_BYTES}-byte limit"),
        ("/oversized-chunked", f"larger than the {VLM_FETCH_MAX_IMAGE_BYTES}-byte limit"),
        ("/big-announced", f"larger than the {VLM_FETCH_MAX_IMAGE_BYTES}-byte limit"),
        ("/lying-length", "could not be decoded"),
        ("/short-body", "connection broke"),
        ("/loop", "redirected more than 3 times"),
        ("/chain/4", "redirected more than 3 times"),
        ("/html", "non-image content type"),
        ("/status/404", "HTTP 404"),
        ("/empty", "empty body"),
        ("/truncated", "could not be decoded"),
        ("/bomb.png", "pixel"),  # 100000 x 100000 in the header: refused before decoding
        ("/wide.png", "aspect ratio"),  # 20000 x 1
        ("/redirect-file", "must use http"),
        ("/redirect-userinfo", "credentials"),
    ],
)
def test_hostile_image_host_is_a_client_error(
    vlm_fetch_server: Server, images: ImageServer, path: str, expected: str
) -> None:
    error = refusal(vlm_fetch_server, ask(images.url(path)))
    assert error["code"] == "invalid_image", error
    assert expected in error["message"], error
    assert_client_safe(error["message"], port=images.port)
    assert_healthy(vlm_fetch_server)


def test_loop_is_followed_at_most_three_times(vlm_fetch_server: Server, images: ImageServer) -> None:
    before = images.hits("/loop")
    refusal(vlm_fetch_server, ask(images.url("/loop")))
    assert images.hits("/loop") - before == 4  # the first request and three redirects


@pytest.mark.parametrize(
    "path", ["/redirect-private", "/redirect-metadata", "/redirect-decimal", "/redirect-mapped"]
)
def test_redirect_to_a_private_address_is_refused_before_connecting(
    vlm_fetch_server: Server, images: ImageServer, path: str
) -> None:
    """10.0.0.1 / 169.254.169.254 (also as 167772161 and ::ffff:10.0.0.1) are outside 127.0.0.0/8.

    The address rule's own message (not "could not connect" nor a timeout) and a
    single request at the image server show the second hop was refused before any connect.
    """
    before = images.hits(path)
    error = refusal(vlm_fetch_server, ask(images.url(path)))
    assert error["code"] == "invalid_image"
    assert error["message"] == "image URL points to a private or reserved network address"
    assert images.hits(path) - before == 1
    assert_client_safe(error["message"], port=images.port)
    assert_healthy(vlm_fetch_server)


def test_default_server_refuses_loopback_urls(vlm_server: Server, images: ImageServer) -> None:
    before = len(images.requests)
    for host in ("127.0.0.1", "localhost", "2130706433", "[::1]"):
        url = f"http://{host}:{images.port}/ok.png"
        error = refusal(vlm_server, ask(url))
        assert error["code"] == "invalid_image", (host, error)
        assert_client_safe(error["message"], port=images.port)
    assert len(images.requests) == before, "the default server connected to a loopback image host"
    assert_healthy(vlm_server)


# --- limits ---------------------------------------------------------------------------------------


def test_too_many_images_names_the_limit(vlm_fetch_server: Server, images: ImageServer) -> None:
    before = len(images.requests)
    urls = [images.url("/ok.png")] * (VLM_FETCH_MAX_IMAGES + 1)
    error = refusal(vlm_fetch_server, ask(*urls))
    assert f"at most {VLM_FETCH_MAX_IMAGES}" in error["message"], error
    assert len(images.requests) == before, "images were fetched although the request was refused"
    completion = chat(vlm_fetch_server, ask(*urls[:VLM_FETCH_MAX_IMAGES]))
    assert image_tokens(completion.usage) == VLM_FETCH_MAX_IMAGES * IMAGE_TOKENS


def test_data_url_over_the_byte_limit(vlm_fetch_server: Server) -> None:
    payload = IMAGES["/ok.png"][0] + b"\x00" * VLM_FETCH_MAX_IMAGE_BYTES
    error = refusal(vlm_fetch_server, ask(data_url(payload)))
    assert error["code"] == "invalid_image"
    assert f"{VLM_FETCH_MAX_IMAGE_BYTES}-byte limit" in error["message"]
    assert_healthy(vlm_fetch_server)


def test_large_data_url_image_is_resized(vlm_fetch_server: Server) -> None:
    completion = chat(vlm_fetch_server, ask(png_data_url((700, 300))))
    assert image_tokens(completion.usage) == IMAGE_TOKENS


def test_remote_images_can_be_switched_off() -> None:
    """ALLOW_REMOTE_IMAGES=false, at the Translator (no server): remote URLs are refused before any
    connection, even with every private address allowed; data URLs still work. The policy is built
    as app.main.image_policy builds it (importing app.main would load transformers here: ~4 s)."""
    from app.media import ImageFetchPolicy
    from app.schemas.chat import ChatMessage
    from app.settings import Settings
    from app.translate import Translator
    from scheduler.errors import InvalidImageError

    settings = Settings.from_env({"ALLOW_REMOTE_IMAGES": "false", "ALLOW_PRIVATE_IMAGE_URLS": "true"})
    assert not settings.allow_remote_images
    policy = ImageFetchPolicy(
        allow_remote=settings.allow_remote_images, allow_private=settings.allow_private_image_urls
    )
    translator = Translator(settings, policy, None)
    options: dict[str, Any] = {"tools": None, "add_generation_prompt": True, "chat_template_kwargs": None}

    def messages(url: str) -> list[ChatMessage]:
        return msgspec.convert(ask(url), list[ChatMessage])

    async def run() -> None:
        with pytest.raises(InvalidImageError, match="remote image URLs are disabled"):
            await translator.chat_prompt(messages("http://127.0.0.1:9/ok.png"), **options)
        prompt = await translator.chat_prompt(messages(data_url(IMAGE_A)), **options)
        assert prompt.images == (IMAGE_A,)

    anyio.run(run)


# --- batching -------------------------------------------------------------------------------------


def test_greedy_image_output_is_the_same_alone_and_in_a_busy_batch(
    vlm_fetch_server: Server, images: ImageServer
) -> None:
    """The target joins a batch of 6 streams (3 with images) that started before it and end after it
    (300 tokens each, the server's cap raised for them: at 40, and at the default cap of 128, all six
    had ended before the target's 12 in a CI run)."""
    model = vlm_fetch_server.model_name
    target = {"messages": ask(images.url("/a.png"), text="What is this?"), "max_tokens": 12, "temperature": 0}
    others = [
        {"messages": ask(images.url("/b.png"), text="and this?"), "temperature": 0},
        {"messages": ask(images.url("/ok.jpg"), images.url("/ok.webp")), "temperature": 0.9, "seed": 7},
        {"messages": ask(data_url(IMAGE_B))},
        {"messages": [{"role": "user", "content": "hello there"}], "temperature": 0},
        {"messages": [{"role": "user", "content": "weather in the city"}], "temperature": 1.0},
        {"messages": [{"role": "user", "content": "a json answer"}]},
    ]

    async def run() -> tuple[Any, Any, list[float], float]:
        async with vlm_fetch_server.async_openai() as client:

            async def complete() -> Any:
                return await client.chat.completions.create(
                    model=model, extra_body={"ignore_eos": True}, **target
                )

            async def stream(body: dict[str, Any], started: asyncio.Event) -> float:
                chunks = await client.chat.completions.create(
                    model=model, max_tokens=300, stream=True, extra_body={"ignore_eos": True}, **body
                )
                async for _ in chunks:
                    started.set()
                return time.monotonic()

            alone = await complete()
            with anyio.fail_after(45):
                started = [asyncio.Event() for _ in others]
                tasks = [
                    asyncio.ensure_future(stream(body, event))
                    for body, event in zip(others, started, strict=False)
                ]
                await asyncio.gather(*(event.wait() for event in started))  # all six are generating
                busy = await complete()
                busy_done = time.monotonic()
                ends = await asyncio.gather(*tasks)
        return alone, busy, ends, busy_done

    alone, busy, ends, busy_done = asyncio.run(run())
    assert alone.usage.completion_tokens == busy.usage.completion_tokens == 12
    assert busy.choices[0].message.content == alone.choices[0].message.content
    assert max(ends) > busy_done, "the other requests were no longer in flight"


def _metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_identical_images_are_decoded_once(vlm_fetch_server: Server) -> None:
    url = png_data_url((48, 40), (12, 34, 56))
    part = {"type": "image_url", "image_url": {"url": url}}
    misses = _metric(vlm_fetch_server, "docoserve_image_decode_cache_misses")
    hits = _metric(vlm_fetch_server, "docoserve_image_decode_cache_hits")
    chat(vlm_fetch_server, [{"role": "user", "content": [part, part, {"type": "text", "text": "twice"}]}])
    chat(vlm_fetch_server, [{"role": "user", "content": [part, {"type": "text", "text": "again"}]}])
    assert _metric(vlm_fetch_server, "docoserve_image_decode_cache_misses") == misses + 1
    assert _metric(vlm_fetch_server, "docoserve_image_decode_cache_hits") == hits + 2
