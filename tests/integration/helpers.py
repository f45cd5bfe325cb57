"""Assertions and payloads shared by the integration tests."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx

ERROR_KEYS = {"message", "type", "param", "code"}
TRACE_MARKERS = ("Traceback", 'File "', "site-packages", "Exception Group")


def user(text: str = "hello") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def chat_body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"messages": user(text), "max_tokens": 8, **extra}


def assert_no_trace(text: str) -> None:
    for marker in TRACE_MARKERS:
        assert marker not in text, f"response leaks server internals ({marker!r}): {text[:500]}"


def assert_openai_error(
    response: httpx.Response,
    status: int,
    *,
    code: str | None = None,
    param: Any = ...,
    type_: str | None = None,
) -> dict[str, Any]:
    """The response is `status` with exactly the OpenAI error shape; returns the `error` object.

    `param=...` (the default) leaves `param` unchecked; `param=None` requires it to be null.
    """
    assert response.status_code == status, (
        f"expected {status}, got {response.status_code}: {response.text[:500]}"
    )
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    assert "<html" not in response.text.lower()
    assert_no_trace(response.text)
    body = response.json()
    assert set(body) == {"error"}, f"not the OpenAI error shape (Litestar default body?): {body}"
    assert "status_code" not in body and "detail" not in body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if status >= 500:
        assert error["type"] == "server_error", error
    elif status == 401:
        assert error["type"] == "authentication_error", error
    else:
        assert error["type"] == "invalid_request_error", error
    if type_ is not None:
        assert error["type"] == type_, error
    if code is not None:
        assert error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    return error


def png_data_url(size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 40, 40)) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).rectangle(
        (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=(10, 220, 10)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_message(text: str, url: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


def text_parts_message(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def parse_sse(raw: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order; every event must be a lone `data:` line."""
    assert raw.endswith("\n\n"), raw[-200:]
    payloads = []
    for event in raw.strip("\n").split("\n\n"):
        lines = [line for line in event.split("\n") if line and not line.startswith(":")]
        assert len(lines) == 1 and lines[0].startswith("data: "), f"unexpected SSE event: {event!r}"
        payloads.append(lines[0][len("data: ") :])
    return payloads


def sse_chunks(raw: str) -> list[dict[str, Any]]:
    payloads = parse_sse(raw)
    assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
    assert payloads.count("[DONE]") == 1
    return [json.loads(p) for p in payloads[:-1]]


def comparable_response(response: Any) -> dict[str, Any]:
    """A response without what differs between two identical requests: ids, times, the prompt
    tokens the prefix cache held (the second finds the first's), logprobs' last bits."""
    body = json.loads(json.dumps(response if isinstance(response, dict) else response.model_dump()))
    for key in ("id", "created_at", "completed_at"):
        body.pop(key, None)
    if body.get("usage"):
        body["usage"]["input_tokens_details"].pop("cached_tokens", None)
    for item in body["output"]:
        for key in ("id", "call_id", "parsed_arguments"):
            item.pop(key, None)
        for part in item.get("content", []):
            part.pop("parsed", None)
            for entry in part.get("logprobs") or []:
                entry["logprob"] = round(entry["logprob"], 3)
                for top in entry["top_logprobs"]:
                    top["logprob"] = round(top["logprob"], 3)
    return body
