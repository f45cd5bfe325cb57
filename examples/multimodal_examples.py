"""Image + text requests against the server, with the official `openai` client and with httpx.

    python examples/multimodal_examples.py --base-url http://localhost:8000 [--api-key KEY]
        [--model model] [--image-url https://.../picture.jpg]

Shows: an image sent inline as a base64 data URL, an image fetched by the server from a URL, and
several images in one request (across two messages). The built-in demo VLM has random weights,
so its answers are gibberish; the request shapes are what matter here.
"""

from __future__ import annotations

import argparse
import base64
import io

import httpx
from openai import OpenAI

DEFAULT_IMAGE_URL = "https://upload.wikimedia.org/wikipedia/commons/4/47/PNG_transparency_demonstration_1.png"


def synthetic_png(width: int = 64, height: int = 48, shift: int = 0) -> bytes:
    """A small gradient PNG made locally, so the data-URL example needs no file."""
    from PIL import Image

    image = Image.new("RGB", (width, height))
    image.putdata([((x * 4 + shift) % 256, (y * 5) % 256, 128) for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def with_openai(client: OpenAI, model: str, image_url: str) -> None:
    # 1. An inline image (base64 data URL).
    reply = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    image_part(data_url(synthetic_png())),
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        max_tokens=32,
    )
    print("data URL   :", reply.choices[0].message.content, "| prompt tokens:", reply.usage.prompt_tokens)

    # 2. An image the server downloads (SSRF-guarded; see the README's Images section).
    reply = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Describe this picture."}, image_part(image_url)],
            }
        ],
        max_tokens=32,
    )
    print("remote URL :", reply.choices[0].message.content)

    # 3. Several images, across messages, in order; streamed.
    stream = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    image_part(data_url(synthetic_png(shift=40))),
                    {"type": "text", "text": "Remember this one."},
                ],
            },
            {"role": "assistant", "content": "Noted."},
            {
                "role": "user",
                "content": [
                    image_part(data_url(synthetic_png(shift=90))),
                    image_part(image_url),
                    {"type": "text", "text": "Compare all three."},
                ],
            },
        ],
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    print("3 images   :", text, "| prompt tokens:", usage.prompt_tokens if usage else "?")


def with_httpx(base_url: str, api_key: str | None, model: str, image_url: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    image_part(data_url(synthetic_png())),
                    image_part(image_url),
                    {"type": "text", "text": "Two images."},
                ],
            }
        ],
        "max_tokens": 16,
    }
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    response.raise_for_status()
    payload = response.json()
    print("httpx      :", payload["choices"][0]["message"]["content"], "| usage:", payload["usage"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://localhost:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default="model")
    parser.add_argument("--image-url", default=DEFAULT_IMAGE_URL)
    args = parser.parse_args()
    client = OpenAI(base_url=f"{args.base_url}/v1", api_key=args.api_key or "EMPTY", timeout=120)
    with_openai(client, args.model, args.image_url)
    with_httpx(args.base_url, args.api_key, args.model, args.image_url)


if __name__ == "__main__":
    main()
