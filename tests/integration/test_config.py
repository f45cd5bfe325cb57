"""Settings precedence on real servers (CLI flag > environment > default) and the model-name
contract. The text server gets MODEL_NAME and API_KEY from both the environment and flags; the VLM
server gets MODEL_NAME from the environment only (see conftest)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import (
    MAX_BODY_BYTES,
    TEXT_API_KEY_ENV,
    TEXT_MODEL_NAME,
    TEXT_MODEL_NAME_ENV,
    Server,
)
from tests.integration.helpers import assert_openai_error, chat_body, user


def test_model_name_flag_beats_env(text_server: Server) -> None:
    with text_server.http() as client:
        ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
        assert ids == [TEXT_MODEL_NAME]
        # The environment's name lost, so the contract refuses it.
        response = client.post("/v1/chat/completions", json=chat_body(model=TEXT_MODEL_NAME_ENV))
    assert_openai_error(response, 404, code="model_not_found", param="model")


def test_model_name_from_env_only(vlm_server: Server) -> None:
    with vlm_server.http() as client:
        ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
        health = client.get("/health").json()
    assert ids == ["vlm-from-env"]
    assert health["model"] == "vlm-from-env"


def test_api_key_flag_beats_env(text_server: Server) -> None:
    with httpx.Client(base_url=text_server.base_url, timeout=30) as client:
        env_key = client.get("/v1/models", headers={"Authorization": f"Bearer {TEXT_API_KEY_ENV}"})
        flag_key = client.get("/v1/models", headers=text_server.auth_headers)
    assert_openai_error(env_key, 401)
    assert flag_key.status_code == 200


def test_body_limit_from_env(text_server: Server) -> None:
    """MAX_REQUEST_BODY_BYTES (2 MiB here, 64 MiB by default) is enforced."""
    padding = "a" * (MAX_BODY_BYTES + 1024)
    with text_server.http() as client:
        response = client.post("/v1/chat/completions", json=chat_body(padding))
    assert_openai_error(response, 413, code="request_too_large")


def test_openapi_title_follows_model_name(text_server: Server) -> None:
    with text_server.http() as client:
        schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == f"{TEXT_MODEL_NAME} - Docomentsio"


# -- the model-name contract ----------------------------------------------------------------------


def test_wrong_model_is_404_model_not_found(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.post("/v1/chat/completions", json=chat_body(model="gpt-4o"))
    error = assert_openai_error(response, 404, code="model_not_found", param="model")
    assert "gpt-4o" in error["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        text_server.openai().chat.completions.create(model="gpt-4o", messages=user(), max_tokens=2)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


def test_wrong_model_on_apply_template_is_404(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.post("/v1/apply_template", json={"messages": user(), "model": "gpt-4o"})
    assert_openai_error(response, 404, code="model_not_found", param="model")


def test_omitted_model_is_the_served_model(text_server: Server) -> None:
    with text_server.http() as client:
        response = client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
    assert response.status_code == 200, response.text
    assert response.json()["model"] == TEXT_MODEL_NAME


def test_right_model_name_works(text_server: Server) -> None:
    completion = text_server.openai().chat.completions.create(
        model=TEXT_MODEL_NAME, messages=user(), max_tokens=2
    )
    assert completion.model == TEXT_MODEL_NAME
    assert completion.choices[0].message.content is not None
