"""/health/live: alive while the process answers, until a replica's step loop dies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from litestar.testing import create_test_client

from app.routes.health import live


@pytest.mark.parametrize(
    "scheduler, status",
    [
        (None, 200),  # still starting: the scheduler is not built yet
        (SimpleNamespace(crashed=False), 200),  # loading, serving, a failed load or draining
        (SimpleNamespace(crashed=True), 503),  # only a restart brings a crashed replica back
    ],
)
def test_liveness_fails_only_when_a_replica_crashed(scheduler, status) -> None:
    with create_test_client(route_handlers=[live]) as client:
        client.app.state.services = SimpleNamespace(scheduler=scheduler)
        response = client.get("/health/live")
    assert response.status_code == status
    assert response.json()["status"] == ("replica crashed" if status == 503 else "alive")


def test_a_failed_liveness_names_the_replica() -> None:
    executors = [SimpleNamespace(name="cuda:0", crashed=False), SimpleNamespace(name="cuda:1", crashed=True)]
    with create_test_client(route_handlers=[live]) as client:
        client.app.state.services = SimpleNamespace(
            scheduler=SimpleNamespace(crashed=True, executors=executors)
        )
        response = client.get("/health/live")
    assert response.status_code == 503
    assert response.json() == {"status": "replica crashed", "replicas": "cuda:1"}
