"""The benchmark's streaming figures: per-server ratios in the summary, and the server's own CPU
seconds next to the load generator's."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.contention import CpuWatch
from bench.hog import cpu_hog
from bench.summary import summarize


def run(server: str, workload: str, tok_s: float, client_cpu_s: float, repeat: int = 0, **extra) -> dict:
    return {
        "server": server,
        "workload": workload,
        "repeat": repeat,
        "completion_tok_s": tok_s,
        "client_cpu_s": client_cpu_s,
        "server_cpu_s": 30.0,
        "errors": 0,
        **extra,
    }


def test_the_summary_gives_each_server_its_streamed_over_non_streamed_ratios():
    runs = [
        run("ours", "a_throughput", 300.0, 0.2),
        run("ours", "b_stream", 240.0, 2.0),
        run("ours", "b_stream_lean", 285.0, 0.8),
        run("ours", "a_hog", 255.0, 0.2),
        # A contended repeat is left out of the medians while a clean one exists.
        run("ours", "b_stream", 100.0, 2.0, repeat=1, contended=True),
        run("base", "a_throughput", 310.0, 0.2),
        run("base", "b_stream", 248.0, 2.0),
    ]
    streaming = summarize(runs)["streaming"]
    assert set(streaming) == {"ours", "base"}
    ours = streaming["ours"]
    assert ours["b_stream_over_a"] == 0.8 and ours["b_stream_lean_over_a"] == 0.95
    assert ours["a_hog_over_a"] == 0.85
    assert ours["b_stream"] == {"completion_tok_s": 240.0, "client_cpu_s": 2.0, "server_cpu_s": 30.0}
    assert streaming["base"]["b_stream_over_a"] == 0.8 and streaming["base"]["b_stream_lean_over_a"] is None


def test_cpu_watch_reports_the_watched_server_group_cpu_apart_from_its_own():
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    with CpuWatch() as idle:
        pass
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        with CpuWatch({server.pid}) as watch:
            # CPU burnt in our own group is the load generator's, not the server's.
            subprocess.run([sys.executable, "-c", burn], check=True)
        assert watch.result()["server_cpu_s"] == pytest.approx(0.0, abs=0.05)
    finally:
        server.kill()
        server.wait()
    # A server burns CPU and stays up (its ticks are read from /proc while it lives).
    busy = subprocess.Popen(
        [sys.executable, "-c", burn + "print(flush=True)\ntime.sleep(60)"],
        start_new_session=True,
        stdout=subprocess.PIPE,
    )
    try:
        with CpuWatch({busy.pid}) as watch:
            busy.stdout.readline()  # the burn is over
        assert watch.result()["server_cpu_s"] >= 0.25
    finally:
        busy.kill()
        busy.wait()
    assert idle.result()["server_cpu_s"] == 0.0


def test_cpu_watch_splits_the_server_cpu_by_thread_name():
    """A replica's CPU reads apart from the rest of the server: its thread is named at the OS level
    (scheduler.threads) and the watch sums ticks by thread name."""
    server_code = (
        "import threading, time\n"
        "from scheduler.threads import name_os_thread\n"
        "def replica():\n"
        "    name_os_thread('replica-7')\n"
        "    end = time.thread_time() + 0.3\n"
        "    while time.thread_time() < end: pass\n"
        "    print(flush=True)\n"
        "    time.sleep(60)\n"
        "threading.Thread(target=replica, daemon=True).start()\n"
        "time.sleep(60)\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", server_code], start_new_session=True, stdout=subprocess.PIPE
    )
    try:
        with CpuWatch({server.pid}) as watch:
            server.stdout.readline()  # the replica thread's burn is over
        threads = watch.result()["server_threads_cpu_s"]
        assert threads.get("replica-7", 0.0) >= 0.25
        assert sum(seconds for name, seconds in threads.items() if name != "replica-7") < 0.15
    finally:
        server.kill()
        server.wait()


def test_name_os_thread_names_the_calling_thread_only():
    import threading

    from scheduler.threads import name_os_thread

    seen: dict[str, str] = {}

    def named() -> None:
        assert name_os_thread("replica-a-very-long-name")
        seen["comm"] = open(f"/proc/self/task/{threading.get_native_id()}/comm").read().strip()

    thread = threading.Thread(target=named)
    thread.start()
    thread.join()
    assert seen["comm"] == "replica-a-very-"  # the kernel keeps 15 bytes
    main_comm = open(f"/proc/self/task/{threading.get_native_id()}/comm").read().strip()
    assert main_comm != seen["comm"]


def test_the_hog_burns_about_its_share_of_a_core_and_says_how_much() -> None:
    with cpu_hog(0.3) as hog:
        time.sleep(1.0)
    assert hog["hog_share_of_core"] == 0.3
    assert 0.1 < hog["hog_cpu_s"] < 0.6  # 0.3 s expected; a busy test machine delays its bursts
    with cpu_hog(0.0) as none:
        pass
    assert none == {}


def test_the_streamed_over_non_streamed_target_shows_each_repeat_s_ratio():
    runs = [
        run("ours", "a_throughput", 500.0, 0.1, repeat=0),
        run("ours", "b_stream", 450.0, 1.0, repeat=0),
        run("ours", "a_throughput", 400.0, 0.1, repeat=1),
        run("ours", "b_stream", 380.0, 1.0, repeat=1),
        # A repeat whose streamed run failed a request has no ratio of its own.
        run("ours", "a_throughput", 450.0, 0.1, repeat=2),
        {**run("ours", "b_stream", 300.0, 1.0, repeat=2), "errors": 1},
        run("llamacpp", "b_stream", 300.0, 1.0),
        run("llamacpp", "a_throughput", 330.0, 0.1),
    ]
    target = summarize(runs)["llamacpp"]["stream_vs_our_nonstream"]
    assert target["ratio_by_repeat"] == {0: 0.9, 1: 0.95}
    assert target["ratio"] == round(415.0 / 450.0, 3)
