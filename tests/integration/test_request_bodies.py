"""Request bodies as careless clients send them: over the size limit (declared or chunked), with a
byte order mark, declared as other than JSON, compressed. Each gets the OpenAI error shape and the
connection stays usable."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import openai
import pytest

from tests.integration.conftest import MAX_BODY_BYTES, Server
from tests.integration.helpers import assert_openai_error, user


def _chat(**extra: Any) -> dict[str, Any]:
    return {"messages": user(), "max_tokens": 4, **extra}


def test_body_over_limit_is_413(text_server: Server) -> None:
    """The rest of the body is never read, so the connection closes after the 413, and says so:
    without `Connection: close` a pooling client sent its next request into the closing socket
    ("Server disconnected without sending a response")."""
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * (MAX_BODY_BYTES + 1) + b'"}]}'
    with text_server.http() as client:
        for _ in range(3):
            response = client.post(
                "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
            )
            error = assert_openai_error(response, 413, code="request_too_large")
            # It said "Request Entity Too Large".
            assert f"limit of {MAX_BODY_BYTES} bytes" in error["message"]
            assert response.headers["connection"] == "close"
            after = client.post("/v1/chat/completions", json=_chat(max_tokens=2))
            assert after.status_code == 200, after.text
    openai_client = text_server.openai()  # max_retries=0: a retry would hide the failure
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as caught:
            openai_client.chat.completions.create(
                model=text_server.model_name, messages=user("a" * (MAX_BODY_BYTES + 1))
            )
        assert caught.value.status_code == 413
        openai_client.chat.completions.create(model=text_server.model_name, messages=user(), max_tokens=2)


def test_chunked_body_over_limit_is_413(text_server: Server) -> None:
    """No Content-Length: the limit still holds while the body streams in."""

    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"a" * 65536
        yield b'"}]}'

    with text_server.http() as client:
        response = client.post(
            "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
        )
    assert_openai_error(response, 413, code="request_too_large")


def test_a_huge_max_tokens_is_quoted_short_in_its_warning(text_server: Server) -> None:
    """An integer of up to 4,300 digits is a valid max_tokens (lowered to the cap); quoted whole,
    it made a 4.5 KB X-Request-Warnings header."""
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 4000 + b"}"
    with text_server.http() as client:
        answered = client.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
    assert answered.status_code == 200, answered.text
    warning = answered.headers["x-request-warnings"]
    assert "(4000 digits)" in warning and len(warning) < 300


def test_a_utf8_byte_order_mark_before_the_json_is_ignored(text_server: Server) -> None:
    """PowerShell 5.1 and .NET clients start bodies with a BOM, which RFC 8259 lets parsers skip:
    it was a 400 saying the JSON was malformed at byte 0."""
    body = b"\xef\xbb\xbf" + json.dumps({"messages": user(), "max_tokens": 2}).encode()
    with text_server.http() as client:
        answered = client.post(
            "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
    assert answered.status_code == 200, answered.text


def test_bodies_declared_as_other_than_json_are_415(text_server: Server) -> None:
    """text/plain, forms and multipart are what a browser sends cross-site without a preflight:
    read as JSON, any web page could start generations on a server without an API key."""
    body = json.dumps({"messages": user(), "max_tokens": 2}).encode()
    with text_server.http() as client:
        for declared in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
        ):
            error = assert_openai_error(
                client.post("/v1/chat/completions", content=body, headers={"Content-Type": declared}),
                415,
                param=None,
            )
            assert "application/json" in error["message"]
        for fine in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json"):
            answered = client.post("/v1/chat/completions", content=body, headers={"Content-Type": fine})
            assert answered.status_code == 200, (fine, answered.text)
        # No Content-Type at all is read as JSON (curl -d users forget it).
        request = client.build_request("POST", "/v1/chat/completions", content=body)
        assert "content-type" not in request.headers
        assert client.send(request).status_code == 200
        # ... except from a web page: a typeless Blob or sendBeacon body goes cross-site unasked.
        request = client.build_request(
            "POST", "/v1/chat/completions", content=body, headers={"Origin": "https://elsewhere.example"}
        )
        assert_openai_error(client.send(request), 415, param=None)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_compressed_bodies_are_415_after_the_key_check(text_server: Server, encoding: str) -> None:
    body = json.dumps({"messages": user(), "max_tokens": 2}).encode()
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)  # br: the header decides
    headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
    with text_server.http() as client:
        error = assert_openai_error(
            client.post("/v1/chat/completions", content=packed, headers=headers), 415, param=None
        )
        assert encoding in error["message"] and "uncompressed" in error["message"]
        # identity spelled out, or a charset where it does not belong: an uncompressed body
        for careless in ("identity", "UTF-8"):
            plain = client.post(
                "/v1/chat/completions", content=body, headers=headers | {"Content-Encoding": careless}
            )
            assert plain.status_code == 200, plain.text
    with text_server.http(authenticated=False) as anonymous:
        refused = anonymous.post("/v1/chat/completions", content=packed, headers=headers)
    assert refused.status_code == 401  # the key is checked first: a stranger learns nothing
