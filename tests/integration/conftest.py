"""Real servers for the integration suite: `entrypoint.py` in a subprocess (granian, the app
factory and the lifespan all run for real) on 127.0.0.1 and a free port.

Servers are few and session-scoped; each costs several seconds to start on a small CI box. The
processes of every server the collected tests need are launched together on first use (they load
in parallel), and each server fixture waits for its own `/health` to say ready. One model cache is
shared, so each built-in model is built once per session.

  text_server  builtin:tiny, API key, 2 MiB body limit, 64 max new tokens; MODEL_NAME and API_KEY
               set both in the environment and by flag, so the flag values must win (precedence).
  vlm_server   builtin:tiny-vlm, no API key, MODEL_NAME only from the environment, 2048 max new
               tokens (room for requests that outlive their client), SEED_DEFAULT = 2**64 - 1.
  edge_server  builtin:tiny with 2 s header and body timeouts, for the hostile-connection tests.
  vlm_fetch_server  builtin:tiny-vlm for remote-image tests: loopback (127.0.0.0/8) reachable while
               every other private range stays refused, 2 s fetch timeout, 1 MiB per image, at most
               3 images per request, images resized to 256 px at most.
  mistral_server  builtin:tiny-mistral: Mistral's chat template, whose `[TOOL_CALLS]` marker (a
               special token) makes the server pick the mistral tool-call format by itself.
  base_server  builtin:tiny-base, a model without a chat template: chat is refused, raw prompts work.
  template_server  builtin:tiny-base given `chat_template.jinja` (beside this file) by --chat-template.

A failing test gets the tail of each server log it used appended to its report.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from app.settings import ENV_NAMES

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 60

TEXT_MODEL_NAME = "text-from-flag"
TEXT_MODEL_NAME_ENV = "text-from-env"  # loses to --model-name
TEXT_API_KEY = "flag-key-0123456789"
TEXT_API_KEY_ENV = "env-key-0123456789"  # loses to --api-key
VLM_MODEL_NAME = "vlm-from-env"
MISTRAL_STREAM_INTERVAL = 3
VLM_DEFAULT_SEED = 2**64 - 1
MAX_BODY_BYTES = 2 * 1024 * 1024
TEXT_DEFAULT_MAX_TOKENS = 64  # below the default 128: the clamp test stays cheap on CPU
VLM_FETCH_MODEL_NAME = "vlm-fetch"
VLM_FETCH_MAX_IMAGE_BYTES = 1024 * 1024
VLM_FETCH_MAX_IMAGES = 3
VLM_FETCH_MAX_IMAGE_SIZE = 256
VLM_FETCH_TIMEOUT_S = 2
MISTRAL_MODEL_NAME = "mistral-tools"
CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")


@dataclass(frozen=True)
class ServerSpec:
    model_path: str
    model_name: str
    api_key: str | None
    flags: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def tiny_spec(name: str, *, flags: tuple[str, ...] = (), **env: str) -> ServerSpec:
    """A builtin:tiny server of a test's own (no key, fp32), named `name`, with `env` on top."""
    return ServerSpec("builtin:tiny", name, None, flags, {"MODEL_NAME": name, "DTYPE": "fp32", **env})


EDGE_CORS_ORIGIN = "https://chat.example.test"
SERVER_SPECS: dict[str, ServerSpec] = {
    "text_server": ServerSpec(
        model_path="builtin:tiny",
        model_name=TEXT_MODEL_NAME,
        api_key=TEXT_API_KEY,
        flags=(
            "--model-name",
            TEXT_MODEL_NAME,
            "--api-key",
            TEXT_API_KEY,
            "--default-max-tokens",
            str(TEXT_DEFAULT_MAX_TOKENS),
            "--dtype",
            "fp32",
            "--progress",
            "true",
        ),
        env={
            "MODEL_NAME": TEXT_MODEL_NAME_ENV,
            "API_KEY": TEXT_API_KEY_ENV,
            "MAX_REQUEST_BODY_BYTES": str(MAX_BODY_BYTES),
        },
    ),
    "vlm_server": ServerSpec(
        model_path="builtin:tiny-vlm",
        model_name=VLM_MODEL_NAME,
        api_key=None,
        flags=("--progress", "true"),
        env={
            "MODEL_NAME": VLM_MODEL_NAME,
            "DTYPE": "fp32",
            # Room for long generations: the disconnect tests need requests that outlive their client.
            "MAX_NEW_TOKENS_DEFAULT": "2048",
            # The largest seed Settings accepts; every choice of an n > 1 request still gets a seed of its own.
            "SEED_DEFAULT": str(VLM_DEFAULT_SEED),
        },
    ),
    # Short connection timeouts for the hostile-client tests.
    "edge_server": ServerSpec(
        model_path="builtin:tiny",
        model_name="edge",
        api_key=None,
        env={
            "MODEL_NAME": "edge",
            "DTYPE": "fp32",
            "HTTP_HEADER_TIMEOUT_S": "2",
            "HTTP_BODY_TIMEOUT_S": "2",
            "CORS_ALLOW_ORIGINS": EDGE_CORS_ORIGIN,
            "LOG_FORMAT": "json",
            "PROGRESS_LOGS": "1",
        },
    ),
    "vlm_fetch_server": ServerSpec(
        model_path="builtin:tiny-vlm",
        model_name=VLM_FETCH_MODEL_NAME,
        api_key=None,
        env={
            "MODEL_NAME": VLM_FETCH_MODEL_NAME,
            "DTYPE": "fp32",
            "IMAGE_URL_ALLOWED_NETWORKS": "127.0.0.0/8",
            "IMAGE_FETCH_TIMEOUT_S": str(VLM_FETCH_TIMEOUT_S),
            "MAX_IMAGE_BYTES": str(VLM_FETCH_MAX_IMAGE_BYTES),
            "MAX_IMAGES_PER_REQUEST": str(VLM_FETCH_MAX_IMAGES),
            "MAX_IMAGE_SIZE": str(VLM_FETCH_MAX_IMAGE_SIZE),
            # test_images_remote's busy batch runs 300-token streams: above the default cap of 128
            # they were lowered to it and could all end before the target was sent.
            "MAX_NEW_TOKENS_DEFAULT": "512",
        },
    ),
    # TOOL_CALL_PARSER left at auto: the chat template decides. Streams go out STREAM_INTERVAL
    # tokens at a time, so its streamed tool calls are read from grouped tokens too.
    "mistral_server": ServerSpec(
        model_path="builtin:tiny-mistral",
        model_name=MISTRAL_MODEL_NAME,
        api_key=None,
        env={
            "MODEL_NAME": MISTRAL_MODEL_NAME,
            "DTYPE": "fp32",
            "MAX_NEW_TOKENS_DEFAULT": "64",
            "STREAM_INTERVAL": str(MISTRAL_STREAM_INTERVAL),
        },
    ),
    "base_server": ServerSpec(
        model_path="builtin:tiny-base",
        model_name="base",
        api_key=None,
        flags=("--redact-source", "false", "--revision", "0123abcd"),
        # A small MAX_INPUT_TOKENS: test_completions cuts prompts of a multi-prompt request.
        env={"MODEL_NAME": "base", "DTYPE": "fp32", "MAX_NEW_TOKENS_DEFAULT": "16", "MAX_INPUT_TOKENS": "64"},
    ),
    "template_server": ServerSpec(
        model_path="builtin:tiny-base",
        model_name="templated",
        api_key=None,
        flags=("--chat-template", str(CHAT_TEMPLATE_PATH)),
        env={"MODEL_NAME": "templated", "DTYPE": "fp32", "MAX_NEW_TOKENS_DEFAULT": "16"},
    ),
}


@dataclass
class Server:
    """A running server: where it listens, its key, its process and its log."""

    name: str
    base_url: str
    api_key: str | None
    model_name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, *, authenticated: bool = True) -> httpx.Client:
        headers = self.auth_headers if authenticated else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=REQUEST_TIMEOUT_S)

    def async_http(self, *, authenticated: bool = True) -> httpx.AsyncClient:
        headers = self.auth_headers if authenticated else {}
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=REQUEST_TIMEOUT_S)

    def openai(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=api_key or self.api_key or "EMPTY",
            max_retries=0,
            timeout=REQUEST_TIMEOUT_S,
        )

    def langchain(self, **kwargs):
        """LangChain's ChatOpenAI against this server (greedy, no retries); `kwargs` add to it."""
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.api_key or "EMPTY",
            model=self.model_name,
            **{"temperature": 0, "max_retries": 0, **kwargs},
        )

    def async_openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.api_key or "EMPTY",
            max_retries=0,
            timeout=REQUEST_TIMEOUT_S,
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """The test process's environment without any server setting, so only the spec decides."""
    env = dict(os.environ)
    for names in ENV_NAMES.values():
        for name in names:
            env.pop(name, None)
    for name in ("HF_HUB_CACHE", "HF_HOME", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(name, None)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def launch(name: str, spec: ServerSpec, cache_dir: Path, log_dir: Path) -> Server:
    port = _free_port()
    env = _clean_env()
    env.update(CACHE_DIR=str(cache_dir), MODEL_PATH=spec.model_path, **spec.env)
    log_path = log_dir / f"{name}.log"
    optimize = ["-O"] * sys.flags.optimize  # a suite run under -O runs its servers under -O too
    command = [
        sys.executable,
        *optimize,
        "entrypoint.py",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *spec.flags,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Server(name, f"http://127.0.0.1:{port}", spec.api_key, spec.model_name, process, log_path)


def wait_ready(server: Server, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll /health until it answers 200 with status ready; fail early if the process dies."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"{server.name} exited with code {server.process.returncode} before it was ready"
                )
            try:
                response = client.get(f"{server.base_url}/health")
                last = f"{response.status_code} {response.text[:200]}"
                if response.status_code == 200 and response.json().get("status") == "ready":
                    return
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.2)
    raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f}s (last /health: {last})")


def stop(server: Server) -> None:
    """SIGTERM the whole process group (granian and its worker), then SIGKILL after a grace."""
    process = server.process
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_TIMEOUT_S)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        print(
            f"\n[{server.name}] did not stop within {STOP_TIMEOUT_S:.0f}s; killing. Log tail:\n{server.log_tail()}"
        )
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


class Launcher:
    """Starts the processes of every server this session needs at once; fixtures then wait."""

    def __init__(self, needed: set[str], cache_dir: Path, log_dir: Path) -> None:
        self.needed = needed
        self.cache_dir = cache_dir
        self.log_dir = log_dir
        self.servers: dict[str, Server] = {}
        self.ready: set[str] = set()

    def get(self, name: str) -> Server:
        if not self.servers:
            for other in sorted(self.needed | {name}):
                self.servers[other] = launch(other, SERVER_SPECS[other], self.cache_dir, self.log_dir)
        elif name not in self.servers:
            self.servers[name] = launch(name, SERVER_SPECS[name], self.cache_dir, self.log_dir)
        server = self.servers[name]
        if name not in self.ready:
            try:
                wait_ready(server)
            except RuntimeError as exc:
                stop(server)
                pytest.fail(f"{exc}\n--- {server.log_path} (tail) ---\n{server.log_tail()}", pytrace=False)
            self.ready.add(name)
        return server

    def stop_all(self) -> None:
        for server in self.servers.values():
            stop(server)


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)
    config.stash[_NEEDED] = {
        name for item in items for name in getattr(item, "fixturenames", ()) if name in SERVER_SPECS
    }


_NEEDED = pytest.StashKey[set]()


@pytest.fixture(scope="session")
def server_launcher(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launcher]:
    launcher = Launcher(
        request.config.stash.get(_NEEDED, set()),
        cache_dir=tmp_path_factory.mktemp("model-cache"),
        log_dir=tmp_path_factory.mktemp("server-logs"),
    )
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture(scope="session")
def text_server(server_launcher: Launcher) -> Server:
    return server_launcher.get("text_server")


@pytest.fixture(scope="session")
def vlm_server(server_launcher: Launcher) -> Server:
    return server_launcher.get("vlm_server")


@pytest.fixture(scope="session")
def edge_server(server_launcher: Launcher) -> Server:
    return server_launcher.get("edge_server")


@pytest.fixture(scope="session")
def vlm_fetch_server(server_launcher: Launcher) -> Server:
    return server_launcher.get("vlm_fetch_server")


@pytest.fixture(scope="session")
def mistral_server(server_launcher: Launcher) -> Server:
    return server_launcher.get("mistral_server")


@pytest.fixture(scope="session")
def base_server(server_launcher: Launcher) -> Server:
    return server_launcher.get("base_server")


@pytest.fixture(scope="session")
def template_server(server_launcher: Launcher) -> Server:
    return server_launcher.get("template_server")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Server):
                report.sections.append((f"{value.name} log tail ({value.log_path})", value.log_tail()))
    return report
