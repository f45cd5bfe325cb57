"""bench.client_cost's figures are per event the client really read: its fake server delivers every
event of every stream, however many go out per write."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bench.client_cost import STREAMS, read_all, serve


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("per_write", [1, 4])
def test_the_openai_client_reads_every_event_the_fake_server_sends(per_write):
    port, steps = free_port(), 8

    async def both() -> tuple[int, float]:
        server = asyncio.create_task(serve(port, "ours", per_write, "sleep:2", 0, steps=steps))
        await asyncio.sleep(0.2)
        events, us_per_event = await asyncio.wait_for(read_all(port), timeout=60)
        await asyncio.wait_for(server, timeout=10)
        return events, us_per_event

    events, us_per_event = asyncio.run(both())
    assert events == STREAMS * steps
    assert us_per_event > 0
