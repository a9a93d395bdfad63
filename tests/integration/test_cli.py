"""The command line: ``check`` accepts good configs and refuses bad ones with ``FILE: key.path:
reason``; ``start`` refuses them the same way; ``config-reference`` lists every setting;
``status``, ``stop`` and ``reload`` with no master running say why in a sentence."""

from __future__ import annotations

import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from shared import config as config_module
from tests.support.config import declared_settings

GOOD = {
    "server": {"workers": 2},
    "listeners": [{"address": "127.0.0.1:0"}],
    "upstreams": {"main": {"servers": ["127.0.0.1:9001", "127.0.0.1:9002"]}},
}

APP = """
from shared import HttpPeer, ProxyHttp


class Fixed(ProxyHttp):
    def upstream_peer(self, session, ctx):
        return HttpPeer("127.0.0.1:9001")
"""


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "master", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def write(tmp_path: Path, config: typing.Any, name: str = "tenaya.yaml") -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def test_check_good_config(tmp_path: Path) -> None:
    """A valid config: exit 0 and ``ok``."""
    result = run("check", "-c", str(write(tmp_path, GOOD)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_check_good_config_with_app_beside_it(tmp_path: Path) -> None:
    """An app module beside the config is importable, whatever the working directory."""
    (tmp_path / "myapp.py").write_text(APP)
    path = write(tmp_path, {**GOOD, "app": "myapp:Fixed"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run("check", "-c", str(path), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


BAD = {
    "unknown_key": (
        {**GOOD, "server": {"wokers": 2}},
        "server.wokers: unknown key (did you mean 'workers'?)",
    ),
    "unknown_top_level_key": (
        {**GOOD, "upstream": {}},
        "upstream: unknown key (did you mean 'upstreams'?)",
    ),
    "wrong_type_int": (
        {**GOOD, "server": {"workers": "two"}},
        "server.workers: expected an integer, got 'two'",
    ),
    "wrong_type_bool_for_int": (
        {**GOOD, "server": {"workers": True}},
        "server.workers: expected an integer, got True",
    ),
    "wrong_type_number": (
        {**GOOD, "timeouts": {"upstream_read_seconds": "fast"}},
        "timeouts.upstream_read_seconds: expected a number, got 'fast'",
    ),
    "negative": ({**GOOD, "server": {"workers": -1}}, "server.workers: must be 0 or more"),
    "listener_without_port": (
        {**GOOD, "listeners": [{"address": "127.0.0.1"}]},
        "listeners[0].address: ",
    ),
    "listener_port_out_of_range": (
        {**GOOD, "listeners": [{"address": "127.0.0.1:99999"}]},
        "listeners[0].address: ",
    ),
    "upstream_bad_address": (
        {**GOOD, "upstreams": {"main": {"servers": ["127.0.0.1:9001", "::1:80"]}}},
        "upstreams.main.servers",
    ),
    "no_upstream": ({"listeners": [{"address": "127.0.0.1:0"}]}, "upstreams: "),
    "bad_app_spec": ({**GOOD, "app": "justamodule"}, "app: expected MODULE:ATTRIBUTE"),
    "bad_enum": ({**GOOD, "logging": {"level": "loud"}}, "logging.level: expected one of"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_check_bad_config(tmp_path: Path, case: str) -> None:
    """An invalid config: exit 1 and one line ``FILE: key.path: reason`` on stderr."""
    config, expected = BAD[case]
    path = write(tmp_path, config)
    result = run("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{path}: {expected}"), lines[0]
    if "address" in case or "range" in case or "port" in case:
        assert len(lines[0]) > len(f"{path}: {expected}") + 3, "no reason given"


def test_check_invalid_yaml(tmp_path: Path) -> None:
    """Broken YAML names the file and the line."""
    path = write(tmp_path, "server:\n  workers: [1,\n")
    result = run("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}: invalid YAML: line ")


def test_check_missing_file(tmp_path: Path) -> None:
    """A config file that does not exist: exit 1, naming it."""
    path = tmp_path / "nope.yaml"
    result = run("check", "-c", str(path))
    assert result.returncode == 1
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "app, files, reason",
    [
        (
            "brokenapp:App",
            {"brokenapp.py": "import no_such_module_anywhere\n"},
            "no_such_module_anywhere",
        ),
        ("missingapp:App", {}, "missingapp"),
        ("okapp:Missing", {"okapp.py": "X = 1\n"}, "Missing"),
        ("notanapp:App", {"notanapp.py": "class App:\n    pass\n"}, "ProxyHttp"),
    ],
)
def test_check_app_that_fails_to_import(
    tmp_path: Path, app: str, files: dict[str, str], reason: str
) -> None:
    """An app that cannot be loaded: exit non-zero with the file, ``app`` and the reason,
    and no traceback."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    path = write(tmp_path, {**GOOD, "app": app})
    result = run("check", "-c", str(path))
    assert result.returncode != 0
    assert result.stdout.strip() != "ok"
    assert result.stderr.startswith(f"{path}: app"), result.stderr
    assert reason in result.stderr
    assert "Traceback" not in result.stderr


def test_check_app_override(tmp_path: Path) -> None:
    """``check --app`` checks that app instead of the config's."""
    (tmp_path / "myapp.py").write_text(APP)
    path = write(tmp_path, GOOD)
    assert run("check", "-c", str(path), "--app", "myapp:Fixed").returncode == 0
    result = run("check", "-c", str(path), "--app", "myapp:Nothing")
    assert result.returncode != 0
    assert "Nothing" in result.stderr


def test_start_refuses_bad_config(tmp_path: Path) -> None:
    """``start`` with an invalid config exits 1 at once with the same explanation."""
    path = write(tmp_path, {"server": {"wokers": 2}})
    result = run("start", "-c", str(path))
    assert result.returncode == 1
    assert f"{path}: server.wokers: unknown key (did you mean 'workers'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_reference_lists_every_setting() -> None:
    """``config-reference`` names every declared setting with its doc."""
    result = run("config-reference")
    assert result.returncode == 0
    paths = list(declared_settings(config_module.Config))
    assert len(paths) > 15
    for p in paths:
        assert f"`{p}`" in result.stdout, f"{p} missing from the reference"
    for p in (
        "limits.max_header_bytes",
        "limits.max_body_bytes",
        "timeouts.upstream_read_seconds",
        "upstreams.<name>.servers",
    ):
        assert f"`{p}`" in result.stdout


def test_check_reports_every_error_at_once(tmp_path: Path) -> None:
    """A config with several mistakes: exit 1 and one ``FILE: key.path: reason`` line for
    each, in the order of the file, in one run."""
    path = write(
        tmp_path,
        "server:\n  wokers: 2\nlisteners:\n  - address: 127.0.0.1\n"
        "upstreams:\n  web:\n    servers: [10.0.0.1:80, localhost]\n"
        "logging:\n  level: loud\n",
    )
    result = run("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}: server.wokers: unknown key (did you mean 'workers'?)",
        f"{path}: listeners[0].address: '127.0.0.1': missing ':PORT'",
        f"{path}: upstreams.web.servers: item 1: 'localhost': missing ':PORT'",
        f"{path}: logging.level: expected one of debug, info, warning, error",
    ]


# -- commands that find no running master --------------------------------------------------

CONTROL_COMMANDS = ("status", "stop", "reload")


def exited_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(proc.stdout)


def assert_says(result: subprocess.CompletedProcess[str], line: str) -> None:
    """Exit 1, nothing on stdout, and ``line`` alone on stderr, in words (no errno, no
    traceback)."""
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.splitlines() == [line]
    assert "Errno" not in result.stderr


@pytest.mark.parametrize("command", CONTROL_COMMANDS)
def test_no_pid_file(tmp_path: Path, command: str) -> None:
    """The pid file does not exist: the master is not running, said as a sentence."""
    pid_file = tmp_path / "tenaya.pid"
    path = write(tmp_path, {**GOOD, "server": {"pid_file": str(pid_file)}})
    assert_says(
        run(command, "-c", str(path)), f"tenaya: no master is running: {pid_file} does not exist"
    )


@pytest.mark.parametrize("command", CONTROL_COMMANDS)
def test_pid_file_of_a_process_that_exited(tmp_path: Path, command: str) -> None:
    """A pid file left behind by a master that is gone names its pid and says so."""
    pid_file = tmp_path / "tenaya.pid"
    pid = exited_pid()
    pid_file.write_text(f"{pid}\n")
    path = write(tmp_path, {**GOOD, "server": {"pid_file": str(pid_file)}})
    assert_says(
        run(command, "-c", str(path)),
        f"tenaya: no master is running: the pid file {pid_file} names process {pid}, "
        "which is not running",
    )


@pytest.mark.parametrize(
    ("content", "found"),
    [
        ("garbage\n", "it holds 'garbage'"),
        ("", "it is empty"),
        ("0\n", "it holds '0'"),
        ("-1\n", "it holds '-1'"),
    ],
    ids=["text", "empty", "zero", "negative"],
)
def test_pid_file_without_a_pid(tmp_path: Path, content: str, found: str) -> None:
    """A pid file that holds no process id says what it holds; 0 and negative numbers, which
    name process groups, are refused too. (``status`` and not ``stop``: should this break,
    ``stop`` would signal a process group, or every process of the user.)"""
    pid_file = tmp_path / "tenaya.pid"
    pid_file.write_text(content)
    path = write(tmp_path, {**GOOD, "server": {"pid_file": str(pid_file)}})
    assert_says(
        run("status", "-c", str(path)),
        f"tenaya: no master found: the pid file {pid_file} does not hold a process id ({found})",
    )


def test_pid_file_naming_another_program_is_not_signalled(tmp_path: Path) -> None:
    """A stale pid file whose pid now belongs to another program: ``stop`` says there is no
    master and sends that program nothing."""
    pid_file = tmp_path / "tenaya.pid"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_file.write_text(f"{other.pid}\n")
        path = write(tmp_path, {**GOOD, "server": {"pid_file": str(pid_file)}})
        assert_says(
            run("stop", "-c", str(path)),
            f"tenaya: no master is running: the pid file {pid_file} names process "
            f"{other.pid}, which is not a Tenaya master",
        )
        assert other.poll() is None, "the other program was signalled"
    finally:
        other.kill()
        other.wait(10)


@pytest.mark.parametrize("command", CONTROL_COMMANDS)
def test_no_control_socket(tmp_path: Path, command: str) -> None:
    """Only a control socket configured, and it does not exist: said as a sentence."""
    sock = tmp_path / "ctl.sock"
    path = write(tmp_path, {**GOOD, "server": {"control_socket": str(sock)}})
    assert_says(
        run(command, "-c", str(path)), f"tenaya: no master is running: {sock} does not exist"
    )


@pytest.mark.parametrize("command", CONTROL_COMMANDS)
def test_control_socket_nobody_listens_on(tmp_path: Path, command: str) -> None:
    """A control socket file left behind by a master that is gone (connection refused)."""
    sock_path = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock_path))
    assert sock_path.exists()
    path = write(tmp_path, {**GOOD, "server": {"control_socket": str(sock_path)}})
    assert_says(
        run(command, "-c", str(path)),
        f"tenaya: no master is running: nothing listens on {sock_path}",
    )
