"""entrypoint.py follows the docker-entrypoint convention: `docker run IMAGE python3 -c ...` (the
spec's flash_attn check) runs that command in place of the server, while flags still go to the
server's parser. Run as the image runs it: the script in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import entrypoint

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [sys.executable, str(ROOT / "entrypoint.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_command_runs_in_place_of_the_server():
    result = run(sys.executable, "-c", "print('ok')")
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


def test_the_commands_exit_status_is_the_containers():
    result = run(sys.executable, "-c", "import sys; sys.exit(3)")
    assert result.returncode == 3


def test_a_command_found_on_path_runs_too():
    """`python3 -c ...` as the spec writes it: looked up on PATH (execvp), not a path."""
    result = run(Path(sys.executable).name, "-c", "import sys; print(sys.argv[1:])", "a b", "--c")
    assert result.returncode == 0 and result.stdout == "['a b', '--c']\n"


def test_an_unknown_command_fails_with_one_line_and_127():
    result = run("no-such-command-for-docoserve")
    assert result.returncode == 127
    assert result.stderr.strip().splitlines() == [
        "entrypoint: cannot run 'no-such-command-for-docoserve': No such file or directory"
    ]


def test_flags_first_still_go_to_the_servers_parser():
    result = run("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: entrypoint.py")
    assert "--model-path" in result.stdout


def test_a_bad_flag_is_still_the_parsers_error():
    result = run("--no-such-flag")
    assert result.returncode == 2 and "unrecognized arguments: --no-such-flag" in result.stderr


def test_main_execs_only_for_a_non_flag_first_argument(monkeypatch):
    calls = []
    monkeypatch.setattr(entrypoint.os, "execvp", lambda file, args: calls.append((file, args)))
    entrypoint.exec_if_command(["python3", "-c", "import flash_attn"])
    for argv in ([], ["--print-config"], ["-h"], [""]):
        entrypoint.exec_if_command(argv)
    assert calls == [("python3", ["python3", "-c", "import flash_attn"])]


def test_main_reads_sys_argv_when_given_no_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["entrypoint.py", "echo", "hi"])

    def fake_exec(file, args):
        raise SystemExit(f"exec {file} {args}")

    monkeypatch.setattr(entrypoint.os, "execvp", fake_exec)
    with pytest.raises(SystemExit, match=r"exec echo \['echo', 'hi'\]"):
        entrypoint.main()
