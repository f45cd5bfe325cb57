"""A client that goes away frees its batch slot (and is counted as 499, not as a success)."""

from __future__ import annotations

import functools
import re
import time

import anyio
import httpx
import pytest

from tests.integration.conftest import Server
from tests.integration.helpers import chat_body

SETTLE_S = 10.0
pytestmark = pytest.mark.slow


def _busy(client: httpx.Client) -> int:
    replicas = client.get("/health").json()["replicas"]
    return sum(r["running"] + r["queued"] for r in replicas)


def _count_499(client: httpx.Client, metric: str = 'docoserve_requests_total{endpoint="chat"') -> float:
    pattern = re.escape(metric) + r',\s*status="499"\} (\S+)$'
    if "route" in metric:  # the HTTP counter's labels: method, route, status
        pattern = re.escape(metric) + r'[^}]*status="499"\} (\S+)$'
    match = re.search("^" + pattern, client.get("/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


HTTP_CHAT = 'docoserve_http_requests_total{method="POST",route="/v1/chat/completions"'


def _wait_until(predicate, timeout_s: float = SETTLE_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def idle_vlm(vlm_server: Server) -> Server:
    """The VLM server with nothing running (these tests look at its running/queued counters)."""
    with vlm_server.http() as client:
        assert _wait_until(lambda: _busy(client) == 0), "server busy before the test"
    return vlm_server


def test_stream_disconnect_frees_the_slot(idle_vlm: Server) -> None:
    body = chat_body(max_tokens=2000, ignore_eos=True, stream=True)
    with idle_vlm.http() as client:
        before, http_before = _count_499(client), _count_499(client, HTTP_CHAT)
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
            assert _busy(client) == 1
        # The connection is closed mid-stream: the row leaves the batch at the next step.
        assert _wait_until(lambda: _busy(client) == 0), "a cancelled stream kept its slot"
        assert _wait_until(lambda: _count_499(client) >= before + 1), (
            "a cancelled stream was not counted as 499"
        )
        # The HTTP counter too, though its 200 headers had gone out.
        assert _wait_until(lambda: _count_499(client, HTTP_CHAT) >= http_before + 1)


def test_non_streamed_disconnect_frees_the_slot(idle_vlm: Server) -> None:
    async def abandon() -> None:
        async with idle_vlm.async_http() as client:
            async with anyio.create_task_group() as tg:
                body = chat_body(max_tokens=2000, ignore_eos=True)
                tg.start_soon(functools.partial(client.post, "/v1/chat/completions", json=body))
                with anyio.fail_after(SETTLE_S):
                    while sum(r["running"] for r in (await client.get("/health")).json()["replicas"]) == 0:
                        await anyio.sleep(0.02)
                tg.cancel_scope.cancel()  # drops the connection while the request is generating

    with idle_vlm.http() as client:
        before = _count_499(client)
        anyio.run(abandon)
        assert _wait_until(lambda: _busy(client) == 0), "an abandoned request kept its slot"
        assert _wait_until(lambda: _count_499(client) >= before + 1), (
            "an abandoned request was not counted as 499"
        )


def test_a_hundred_client_timeouts_leave_nothing_running(idle_vlm: Server) -> None:
    """100 requests whose clients give up after 0.5 s (streamed and not): every slot is freed,
    and a short request afterwards completes promptly."""

    async def give_up(client: httpx.AsyncClient, i: int) -> str:
        body = chat_body(f"request {i}", max_tokens=2000, ignore_eos=True, stream=i % 2 == 0)
        # A whole-request deadline: httpx's own timeouts are per read, which a stream never hits.
        with anyio.move_on_after(0.5) as scope:
            await client.post("/v1/chat/completions", json=body)
        return "timeout" if scope.cancelled_caught else "answered"

    async def run_all() -> list[str]:
        async with httpx.AsyncClient(base_url=idle_vlm.base_url, timeout=30) as client:
            with anyio.fail_after(60):
                outcomes = []

                async def one(i: int) -> None:
                    outcomes.append(await give_up(client, i))

                async with anyio.create_task_group() as tg:
                    for i in range(100):
                        tg.start_soon(one, i)
        return outcomes

    outcomes = anyio.run(run_all)
    assert outcomes.count("timeout") == 100  # a 2000-token answer never fits in 0.5 s here
    with idle_vlm.http() as client:
        assert _wait_until(lambda: _busy(client) == 0), "timed-out requests kept their slots"
        response = client.post("/v1/chat/completions", json=chat_body("short", max_tokens=4))
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] <= 4
