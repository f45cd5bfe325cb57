"""The README's curl examples, run as written against a real server (host, key and model name
substituted), so the documentation cannot drift from what the server does."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import Server

README = Path(__file__).resolve().parents[2] / "README.md"


def curl_commands() -> list[str]:
    text = README.read_text()
    block = text.split("<!-- curl-examples:start -->", 1)[1].split("<!-- curl-examples:end -->", 1)[0]
    body = block.split("```bash", 1)[1].split("```", 1)[0]
    return [c.strip() for c in body.replace("\\\n", " ").splitlines() if c.strip().startswith("curl")]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize(
    "command",
    curl_commands(),
    ids=lambda c: re.sub(r"\W+", "-", c.split("http://localhost:8000")[1].split()[0]),
)
def test_readme_curl_example_runs(text_server: Server, command: str) -> None:
    command = command.replace("http://localhost:8000", text_server.base_url)
    command = command.replace('"model": "model"', f'"model": "{text_server.model_name}"')
    env = {**os.environ, "API_KEY": text_server.api_key}
    done = subprocess.run(
        ["bash", "-c", command + " -w '\\n%{http_code}'"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    output, _, status = done.stdout.rstrip().rpartition("\n")
    assert status == "200", done.stdout
    if '"stream": true' in command:
        events = [line for line in output.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"
    else:
        payload = json.loads(output)
        assert "error" not in payload
