"""examples/multimodal_examples.py runs end to end against a real, fetch-enabled VLM server.

The example's "remote URL" is served by a local image server on 127.0.0.1, which
`vlm_fetch_server` may reach (IMAGE_URL_ALLOWED_NETWORKS=127.0.0.0/8); nothing leaves the machine.
"""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from PIL import Image

from tests.integration.conftest import ROOT, Server
from tests.unit._hostile_server import HostileServer

pytestmark = pytest.mark.timeout(150)

EXAMPLE = ROOT / "examples" / "multimodal_examples.py"
IMAGE_TOKENS = 16  # builtin:tiny-vlm, per image


@pytest.fixture(scope="module")
def image_host() -> Iterator[HostileServer]:
    out = io.BytesIO()
    Image.new("RGB", (48, 32), (30, 140, 200)).save(out, "PNG")
    with HostileServer(out.getvalue()) as server:
        yield server


LABELS = ("data URL   :", "remote URL :", "3 images   :", "httpx      :")


def sections(output: str) -> dict[str, str]:
    """The example's four printed results, by label. The random-weight model's answers may hold
    newlines and control characters, so split on the labels (printed in this order), not on lines."""
    found: dict[str, str] = {}
    rest = output
    for label, following in zip(LABELS, (*LABELS[1:], None), strict=False):
        assert rest.startswith(label), f"expected {label!r} next in the output:\n{output}"
        end = rest.rfind("\n" + following) if following else len(rest)
        assert end > 0, f"no {following!r} after {label!r}:\n{output}"
        found[label.split()[0]] = rest[len(label) : end]
        rest = rest[end + 1 :]
    return found


def prompt_tokens(section: str) -> int:
    match = re.search(r"\| prompt tokens: (\d+)\s*$", section)
    assert match, section
    return int(match.group(1))


def test_multimodal_examples(vlm_fetch_server: Server, image_host: HostileServer) -> None:
    image_url = image_host.url("/png")
    before = sum(1 for path, _ in image_host.requests if path == "/png")
    # No proxy may sit between the example and the local server; the gibberish answers print as UTF-8.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--base-url", vlm_fetch_server.base_url,
         "--model", vlm_fetch_server.model_name, "--image-url", image_url],
        cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
    )  # fmt: skip
    output = result.stdout
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{output}\nstderr:\n{result.stderr[-3000:]}"
    )

    printed = sections(output)
    assert set(printed) == {"data", "remote", "3", "httpx"}, printed  # "remote URL" prints no token count
    assert prompt_tokens(printed["data"]) > IMAGE_TOKENS
    assert prompt_tokens(printed["3"]) > 3 * IMAGE_TOKENS
    usage = ast.literal_eval(printed["httpx"].rsplit("| usage:", 1)[1].strip())
    assert usage["prompt_tokens"] > 2 * IMAGE_TOKENS
    assert usage["prompt_tokens_details"]["image_tokens"] == 2 * IMAGE_TOKENS
    # The remote image was fetched by the server once per request that used it: remote, 3 images, httpx.
    assert sum(1 for path, _ in image_host.requests if path == "/png") - before == 3
