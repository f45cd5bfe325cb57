"""What an operator sees: the readiness line and banner, GET /version, CORS for browser clients."""

from __future__ import annotations

import time

from tests.integration.conftest import EDGE_CORS_ORIGIN, TEXT_DEFAULT_MAX_TOKENS, Server


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
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    with edge_server.http(authenticated=False) as client:
        allowed = client.options("/v1/chat/completions", headers=preflight)
        other = client.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.test"})
        simple = client.get("/v1/models", headers={"Origin": EDGE_CORS_ORIGIN})
    assert allowed.status_code in (200, 204)
    assert allowed.headers["access-control-allow-origin"] == EDGE_CORS_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert other.headers.get("access-control-allow-origin") is None
    assert simple.headers["access-control-allow-origin"] == EDGE_CORS_ORIGIN


def test_no_cors_headers_unless_configured(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.get("/v1/models", headers={"Origin": EDGE_CORS_ORIGIN})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
