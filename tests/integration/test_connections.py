"""Hostile and careless connections: thousands of idle sockets, stalled bodies, and a SIGTERM in
the middle of streams. Every socket goes to 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.integration.conftest import Server, launch, stop, tiny_spec, wait_ready
from tests.integration.helpers import assert_openai_error, chat_body

IDLE_CONNECTIONS = 5000
STALLED_BODIES = 200


def _open_files_for(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = count + 512
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"the open-files limit ({hard}) is too low for {count} sockets")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _address(server: Server) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


def _closed(sock: socket.socket, timeout_s: float) -> bytes | None:
    """What the server sent before closing, or None if it is still open after `timeout_s`."""
    sock.settimeout(timeout_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def test_idle_connections_and_stalled_bodies_never_wedge_the_server(edge_server: Server) -> None:
    _open_files_for(IDLE_CONNECTIONS + STALLED_BODIES)
    address = _address(edge_server)
    idle, stalled = [], []
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection(address, timeout=5))
        body = b'{"messages": [{"role": "user", "content": "hi"}]'  # never finished
        for _ in range(STALLED_BODIES):
            sock = socket.create_connection(address, timeout=5)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 4096\r\n\r\n" + body
            )
            stalled.append(sock)
        # Health and a real request still answer (the bound is generous: 2 shared cores).
        with edge_server.http() as client:
            assert client.get("/health", timeout=5).status_code == 200
            response = client.post("/v1/chat/completions", json=chat_body(max_tokens=4), timeout=10)
        assert response.status_code == 200, response.text
        # Stalled bodies get 408 in the OpenAI shape and are closed after HTTP_BODY_TIMEOUT_S (2 s).
        answers = [_closed(sock, 10) for sock in stalled[:20]]
        assert all(a is not None for a in answers), "a stalled body was never closed"
        head, _, payload = answers[0].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        error = json.loads(payload.split(b"\r\n")[1] if b"chunked" in head.lower() else payload)["error"]
        assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
        # Connections that never sent a byte are closed after HTTP_HEADER_TIMEOUT_S (2 s) too.
        assert all(_closed(sock, 10) is not None for sock in idle[:20])
    finally:
        for sock in idle + stalled:
            sock.close()
    with edge_server.http() as client:
        assert client.get("/health/live").status_code == 200


def test_a_stream_the_client_stops_reading_is_dropped_after_the_body_timeout(edge_server: Server) -> None:
    """granian makes a send wait once a few MiB are buffered: a client that never read kept its
    answer in the server's memory for as long as it kept the connection open."""
    body = json.dumps(
        {"prompt": "zebra " * 500, "max_tokens": 64, "n": 8, "stream": True, "echo": True, "logprobs": 20,
         "ignore_eos": True}
    ).encode()  # fmt: skip
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.settimeout(5)
    sock.connect(_address(edge_server))
    try:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        time.sleep(8)  # never reading: HTTP_BODY_TIMEOUT_S is 2 s here
        assert _closed(sock, 30) is not None  # the server ended the connection
        deadline = time.monotonic() + 60  # the request's rows come free (a generous bound: 2 shared cores)
        with edge_server.http() as client:
            while True:
                replicas = client.get("/health").json()["replicas"]
                if (
                    all(r["running"] == 0 and r["queued"] == 0 for r in replicas)
                    or time.monotonic() > deadline
                ):
                    break
                time.sleep(0.2)
        assert all(r["running"] == 0 and r["queued"] == 0 for r in replicas), replicas
    finally:
        sock.close()
    log = edge_server.log_path.read_text(errors="replace")
    assert "its response was dropped" in log and "Traceback" not in log


def test_partial_headers_are_dropped(edge_server: Server) -> None:
    sock = socket.create_connection(_address(edge_server), timeout=5)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the blank line never comes
        assert _closed(sock, 10) is not None
    finally:
        sock.close()


def test_a_slow_but_steady_body_is_accepted(edge_server: Server) -> None:
    body = json.dumps(chat_body(max_tokens=2)).encode()
    sock = socket.create_connection(_address(edge_server), timeout=10)
    try:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        for i in range(0, len(body), 8):  # 3 s in all, never 2 s without progress
            sock.sendall(body[i : i + 8])
            time.sleep(3 / (len(body) / 8))
        answer = _closed(sock, 30)
    finally:
        sock.close()
    assert answer is not None and answer.startswith(b"HTTP/1.1 200")


def test_a_malformed_or_cut_body_is_the_clients_error_not_a_500(edge_server: Server) -> None:
    """granian ends a body whose chunked encoding is broken as if the client had gone: that is a
    400 for the client, and neither it nor a client that hangs up mid-body counts as a 5xx."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in edge_server.auth_headers.items()).encode()
    )
    answers = []
    for body in (b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}xxxx\r\n0\r\n\r\n"):  # size not hex; chunk too long
        with socket.create_connection(_address(edge_server), timeout=10) as sock:
            sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + body)
            answers.append(_closed(sock, 10))
    for answer in answers:
        assert answer is not None and answer.startswith(b"HTTP/1.1 400"), answer
        assert b"\r\nconnection: close\r\n" in answer.partition(b"\r\n\r\n")[0].lower()
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "incomplete_body" and error["type"] == "invalid_request_error"
    full = json.dumps(chat_body(max_tokens=2)).encode()
    for _ in range(2):  # hangs up with the body half sent
        with socket.create_connection(_address(edge_server), timeout=10) as sock:
            sock.sendall(head + b"Content-Length: " + str(len(full)).encode() + b"\r\n\r\n" + full[:-10])
            time.sleep(0.3)
    time.sleep(0.5)
    with edge_server.http() as client:
        metrics = client.get("/metrics").text
        assert client.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200
    counted = [line for line in metrics.splitlines() if 'route="/v1/chat/completions"' in line]
    assert counted and not [line for line in counted if 'status="5' in line], counted


def test_a_transfer_coding_besides_chunked_is_refused_not_parsed(edge_server: Server) -> None:
    """granian undoes `chunked` only: "gzip, chunked" used to hand the compressed bytes on, and
    a body that happened to be plain JSON was answered 200 as if the coding were not there."""
    body = json.dumps(chat_body(max_tokens=2)).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in edge_server.auth_headers.items()).encode()
    )
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    answers = {}
    for coding in ("gzip, chunked", "chunked"):
        with socket.create_connection(_address(edge_server), timeout=10) as sock:
            sock.sendall(
                head + f"Transfer-Encoding: {coding}\r\nConnection: close\r\n\r\n".encode() + chunked
            )
            answers[coding] = _closed(sock, 10)
    refused = answers["gzip, chunked"]
    assert refused is not None and refused.startswith(b"HTTP/1.1 400"), refused
    payload = refused.partition(b"\r\n\r\n")[2]
    error = json.loads(payload[payload.index(b"{") : payload.rindex(b"}") + 1])["error"]
    assert "Transfer-Encoding" in error["message"]
    assert answers["chunked"] is not None and answers["chunked"].startswith(b"HTTP/1.1 200")


@pytest.mark.slow
def test_sigterm_drains_then_ends_every_request_with_an_answer(tmp_path) -> None:
    spec = tiny_spec("drain", SHUTDOWN_GRACE_S="1", MAX_NEW_TOKENS_DEFAULT="4000")
    server = launch("drain_server", spec, tmp_path / "cache", tmp_path)
    results: dict[str, object] = {}
    try:
        wait_ready(server)
        endless = {
            "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": 4000,
            "ignore_eos": True,
        }  # ~10 s on this CPU

        def stream(key: str) -> None:
            events = []
            with httpx.stream(
                "POST", f"{server.base_url}/v1/chat/completions", json={**endless, "stream": True}, timeout=60
            ) as r:
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
            results[key] = events

        def plain(key: str) -> None:
            results[key] = httpx.post(f"{server.base_url}/v1/chat/completions", json=endless, timeout=60)

        threads = [threading.Thread(target=stream, args=(f"s{i}",)) for i in range(3)]
        threads.append(threading.Thread(target=plain, args=("plain",)))
        for t in threads:
            t.start()
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            deadline = time.monotonic() + 30
            while client.get("/health").json()["replicas"][0]["running"] < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(server.process.pid, signal.SIGTERM)  # as Kubernetes does: the main process only
            deadline = time.monotonic() + 5
            while (health := client.get("/health")).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert health.status_code == 503 and health.json()["status"] == "draining"
            late = assert_openai_error(
                client.post("/v1/chat/completions", json=chat_body()), 503, code="server_shutting_down"
            )
            # Its whole body had arrived: the answer says the server stops, not that it was cut.
            assert "shutting down" in late["message"] and "had not all arrived" not in late["message"]
        for t in threads:
            t.join(60)
        assert server.process.wait(timeout=60) == 0
    finally:
        stop(server)
    for key in ("s0", "s1", "s2"):
        events = results[key]
        assert events[-1] == "data: [DONE]", f"{key} was cut: {events[-2:]}"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "server_shutting_down"
    plain_response = results["plain"]
    assert_openai_error(plain_response, 503, code="server_shutting_down")
    assert "Retry-After" in plain_response.headers
    assert "Traceback" not in server.log_path.read_text()


@pytest.mark.slow
def test_sigterm_while_the_worker_imports_the_app_stops_the_server_soon(tmp_path) -> None:
    """granian's worker is forked with the main process's signal handlers: a SIGTERM while it
    imported the app (a pod deleted as it started) was lost, the worker came up and served, and
    granian killed it SHUTDOWN_GRACE_S + 5 s later (26.6 s here, against 4.4 with the fix)."""
    spec = tiny_spec("early_stop", SHUTDOWN_GRACE_S="20")
    server = launch("early_stop_server", spec, tmp_path / "cache", tmp_path)
    try:
        children = f"/proc/{server.process.pid}/task/{server.process.pid}/children"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(children) as listed:
                if listed.read().split():
                    break
            time.sleep(0.01)
        time.sleep(0.3)  # the worker is importing the app (torch takes seconds), not yet serving
        signalled = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        assert time.monotonic() - signalled < 15
    finally:
        stop(server)
    log = server.log_path.read_text()
    assert "refused to gracefully stop" not in log and "Traceback" not in log
    assert "Not ready (degraded)" not in log  # stopped on purpose, not failed
    # Nor is the model loaded for nothing: that load went on in the drain's shadow, and on a
    # loaded machine it outlasted granian's kill timeout.
    assert "Loading model" not in log


@pytest.mark.slow
def test_sighup_is_ignored_rather_than_reloading_the_model(tmp_path) -> None:
    """granian respawned its worker on SIGHUP: a second copy of the model loaded beside the first,
    and nothing was answered until it had."""
    server = launch("sighup_server", tiny_spec("sighup"), tmp_path / "cache", tmp_path)
    try:
        wait_ready(server)
        os.kill(server.process.pid, signal.SIGHUP)
        time.sleep(1.0)
        with server.http() as client:
            assert client.get("/health").status_code == 200
            answer = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200
        assert server.process.poll() is None
    finally:
        stop(server)
    log = server.log_path.read_text()
    assert "SIGHUP ignored" in log
    assert log.count("Spawning worker-") == 1 and log.count("Loading model (attn=") == 1


def test_uploads_still_arriving_at_sigterm_end_with_503_and_do_not_hold_the_shutdown(tmp_path) -> None:
    """granian waits for every open connection before it exits: a body that trickles in (here
    one that stopped, with a body timeout far off) would keep the pod past its grace period."""
    spec = tiny_spec("uploads", SHUTDOWN_GRACE_S="2", HTTP_BODY_TIMEOUT_S="120")
    server = launch("uploads_server", spec, tmp_path / "cache", tmp_path)
    uploads: list[socket.socket] = []
    try:
        wait_ready(server)
        for _ in range(2):
            sock = socket.create_connection(_address(server), timeout=10)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 4096\r\n\r\n{"messages": [{"role": "user", "content": "hi"}]'
            )
            uploads.append(sock)
        time.sleep(0.5)  # the reads are waiting for the rest
        signalled = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        answers = [_closed(sock, 10) for sock in uploads]
        assert server.process.wait(timeout=30) == 0
        took = time.monotonic() - signalled
    finally:
        for sock in uploads:
            sock.close()
        stop(server)
    for answer in answers:
        assert answer is not None and answer.startswith(b"HTTP/1.1 503"), answer
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert b"retry-after" in head.lower()
        assert json.loads(payload)["error"]["code"] == "server_shutting_down"
    assert took < 10, f"the shutdown took {took:.1f} s with uploads open"
    assert "Traceback" not in server.log_path.read_text()
