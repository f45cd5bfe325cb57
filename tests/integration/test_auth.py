"""Bearer auth on every protected route of the key server; health and metrics stay open."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import TEXT_MODEL_NAME, Server
from tests.integration.helpers import assert_openai_error, user

# (method, path, JSON body) for every protected route, each with a body that succeeds when authorized.
PROTECTED: list[tuple[str, str, Any]] = [
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{TEXT_MODEL_NAME}", None),
    ("POST", "/v1/chat/completions", {"messages": user(), "max_tokens": 1}),
    ("POST", "/v1/apply_template", {"messages": user()}),
    ("POST", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 1}}),
    ("GET", "/docs", None),
    ("GET", "/redoc", None),
    ("GET", "/openapi.json", None),
    ("GET", "/schema/openapi.json", None),
    ("GET", "/schema/swagger", None),
    ("GET", "/schema/redoc", None),
    ("GET", "/schema", None),
    ("GET", "/metrics", None),  # behind the key when one is set, unless METRICS_PUBLIC
]
OPEN = ["/health", "/health/ready", "/health/live", "/version"]


def _basic(user_pass: str) -> str:
    return "Basic " + base64.b64encode(user_pass.encode()).decode()


def _credentials(key: str) -> dict[str, dict[str, str]]:
    return {
        "missing": {},
        "wrong key": {"Authorization": "Bearer not-the-key"},
        "bearer without token": {"Authorization": "Bearer"},
        "key without scheme": {"Authorization": key},
        "right key, Basic scheme": {"Authorization": _basic(f"user:{key}")},
        "raw key as Basic": {"Authorization": f"Basic {key}"},
        "key prefix": {"Authorization": f"Bearer {key[:-1]}"},
        "key plus suffix": {"Authorization": f"Bearer {key}x"},
    }


def _call(client: httpx.Client, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("method, path, body", PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_protected_route_refuses_bad_credentials(
    text_server: Server, method: str, path: str, body: Any
) -> None:
    with httpx.Client(base_url=text_server.base_url, timeout=60) as client:
        for label, headers in _credentials(text_server.api_key).items():
            response = _call(client, method, path, body, headers)
            assert response.status_code == 401, f"{label}: {response.status_code} {response.text[:200]}"
            assert_openai_error(response, 401, code="invalid_api_key", param=None)
            assert response.headers.get("www-authenticate", "").lower().startswith("bearer"), label


@pytest.mark.parametrize("method, path, body", PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_protected_route_accepts_the_key(text_server: Server, method: str, path: str, body: Any) -> None:
    with httpx.Client(base_url=text_server.base_url, timeout=60) as client:
        response = _call(client, method, path, body, text_server.auth_headers)
        assert response.status_code == 200, response.text[:300]
        # The auth scheme is case-insensitive (RFC 7235).
        lower = _call(client, method, path, body, {"Authorization": f"bearer {text_server.api_key}"})
        assert lower.status_code == 200


@pytest.mark.parametrize("path", OPEN)
def test_open_routes_need_no_key(text_server: Server, path: str) -> None:
    with httpx.Client(base_url=text_server.base_url, timeout=30) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Zm9vOmJhcg=="}):
            response = client.get(path, headers=headers)
            assert response.status_code == 200, f"{path} {headers}: {response.status_code}"


def test_docs_are_html_and_schema_is_json(text_server: Server) -> None:
    with text_server.http() as client:
        for path in ("/docs", "/redoc", "/schema/swagger"):
            response = client.get(path)
            assert response.headers["content-type"].startswith("text/html"), path
            assert "<html" in response.text.lower(), path
        for path in ("/openapi.json", "/schema/openapi.json"):
            response = client.get(path)
            assert "json" in response.headers["content-type"], (
                path
            )  # Litestar: application/vnd.oai.openapi+json
            assert response.json()["openapi"].startswith("3."), path


def test_openapi_declares_bearer_security(text_server: Server) -> None:
    with text_server.http() as client:
        schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == f"{TEXT_MODEL_NAME} - Docomentsio"
    schemes = schema["components"]["securitySchemes"]
    bearer = [
        name
        for name, s in schemes.items()
        if s.get("type") == "http" and s.get("scheme", "").lower() == "bearer"
    ]
    assert bearer, schemes
    for path, method in [("/v1/chat/completions", "post"), ("/v1/models", "get")]:
        security = schema["paths"][path][method].get("security") or schema.get("security")
        assert security and any(bearer[0] in requirement for requirement in security), (path, security)
    assert "/health" in schema["paths"]
    assert not schema["paths"]["/health"]["get"].get("security")


def test_openai_client_wrong_key_raises_authentication_error(text_server: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        text_server.openai(api_key="wrong").chat.completions.create(
            model=TEXT_MODEL_NAME, messages=user(), max_tokens=1
        )
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        list(text_server.openai(api_key="wrong").models.list())


def test_unauthorized_does_not_echo_the_key(text_server: Server) -> None:
    with httpx.Client(base_url=text_server.base_url, timeout=30) as client:
        response = client.get("/v1/models", headers={"Authorization": "Bearer sk-secret-guess"})
    assert response.status_code == 401
    assert "sk-secret-guess" not in response.text
    assert text_server.api_key not in response.text


def test_vlm_server_without_key_is_open(vlm_server: Server) -> None:
    with httpx.Client(base_url=vlm_server.base_url, timeout=30) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.get("/docs").status_code == 200
        # A key sent to a server without one is ignored.
        assert client.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


@pytest.mark.parametrize("order", ["good-first", "bad-first"])
def test_two_authorization_headers_are_refused_whatever_their_order(text_server: Server, order: str) -> None:
    """The first header used to win: good then bad got 200, bad then good 401."""
    good, bad = (
        (b"authorization", f"Bearer {text_server.api_key}".encode()),
        (b"authorization", b"Bearer bad"),
    )
    pair = [good, bad] if order == "good-first" else [bad, good]
    with httpx.Client(base_url=text_server.base_url, timeout=30) as client:
        request = client.build_request("GET", "/v1/models")
        request.headers = httpx.Headers(
            [(k, v) for k, v in request.headers.raw if k.lower() != b"authorization"] + pair
        )
        response = client.send(request)
        assert_openai_error(response, 401)
        assert (
            client.get("/v1/models", headers={"Authorization": f"Bearer {text_server.api_key}"}).status_code
            == 200
        )
