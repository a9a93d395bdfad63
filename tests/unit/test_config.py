"""shared.config: loading YAML files, the embedded default, error messages and the reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import declared_settings

from shared.config import (
    EMBEDDED_SOURCE,
    Config,
    ConfigError,
    ListenerConfig,
    UpstreamConfig,
    from_mapping,
    load,
    reference,
)

GOOD = """\
server:
  workers: 4
  max_retries: 1
  pid_file: /run/tenaya.pid
listeners:
  - address: 0.0.0.0:8080
    backlog: 100
  - address: "[::1]:8080"
upstreams:
  web:
    servers: [10.0.0.1:80, 10.0.0.2:80]
  api:
    servers: ["[2001:db8::1]:8000"]
    hosts: [api.example.com]
pool:
  idle_timeout_seconds: 5
logging:
  access_log_format: json
app_options:
  greeting: hello
"""

#: Enough to be valid: one upstream with a server.
MINIMAL = "upstreams:\n  web:\n    servers: [127.0.0.1:9000]\n"
#: Appended to a faulty file so that only the fault under test is wrong with it.
APP = "app: mypackage.gateway:Gateway\n"


def write(tmp_path: Path, text: str, name: str = "tenaya.yaml") -> str:
    """Writes ``text`` to a config file under ``tmp_path`` and returns its path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load_error(tmp_path: Path, text: str) -> tuple[str, ConfigError]:
    """Loads ``text`` from a file, expecting a ConfigError; returns the path and the error."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    return path, info.value


# -- good files --------------------------------------------------------------------------


def test_load_good_file_sets_every_given_value(tmp_path: Path) -> None:
    """A valid file is loaded with its values, nested sections, lists and mappings in order."""
    path = write(tmp_path, GOOD)
    config = load(path)
    assert config.server.workers == 4
    assert config.worker_count() == 4
    assert config.server.max_retries == 1
    assert config.server.pid_file == "/run/tenaya.pid"
    assert config.listeners == [
        ListenerConfig(address="0.0.0.0:8080", backlog=100),
        ListenerConfig(address="[::1]:8080", backlog=2048),
    ]
    assert list(config.upstreams) == ["web", "api"]
    assert config.upstreams["web"] == UpstreamConfig(servers=["10.0.0.1:80", "10.0.0.2:80"])
    assert config.upstreams["api"].hosts == ["api.example.com"]
    assert config.logging.access_log_format == "json"
    assert config.app_options == {"greeting": "hello"}
    assert config.source == path


def test_load_good_file_keeps_defaults_for_unset_keys(tmp_path: Path) -> None:
    """Settings absent from the file keep their declared defaults."""
    config = load(write(tmp_path, MINIMAL))
    assert config.server.grace_period_seconds == 30.0
    assert config.server.pid_file is None
    assert config.listeners == [ListenerConfig(address="127.0.0.1:6188", backlog=2048)]
    assert config.timeouts.upstream_connect_seconds == 5.0
    assert config.limits.max_header_bytes == 32768
    assert config.logging.access_log == "stderr"
    assert config.app is None


def test_load_converts_integer_to_float_setting(tmp_path: Path) -> None:
    """An integer written for a number setting becomes a float."""
    config = load(write(tmp_path, GOOD))
    assert config.pool.idle_timeout_seconds == 5.0
    assert type(config.pool.idle_timeout_seconds) is float


def test_load_keeps_raw_mapping_for_workers(tmp_path: Path) -> None:
    """The loaded config carries the parsed mapping, so a worker can rebuild the same config."""
    path = write(tmp_path, GOOD)
    config = load(path)
    assert config.raw["server"] == {"workers": 4, "max_retries": 1, "pid_file": "/run/tenaya.pid"}
    assert from_mapping(config.raw, path) == config


def test_null_section_takes_defaults(tmp_path: Path) -> None:
    """A section written with no value (``server:``) is the same as leaving it out."""
    config = load(write(tmp_path, "server:\n" + MINIMAL))
    assert config.server == Config().server


def test_app_without_upstreams_is_valid(tmp_path: Path) -> None:
    """With an app configured, no upstream servers are needed."""
    config = load(write(tmp_path, "app: mypackage.gateway:Gateway\n"))
    assert config.app == "mypackage.gateway:Gateway"
    assert config.upstreams == {}


def test_embedded_default() -> None:
    """load(None) gives the embedded default: two workers in front of two demo origins."""
    config = load(None)
    assert config.source == EMBEDDED_SOURCE
    assert config.server.workers == 2
    assert config.server.grace_period_seconds == 10.0
    assert [listener.address for listener in config.listeners] == ["127.0.0.1:6188"]
    assert config.upstreams["demo"].servers == ["127.0.0.1:6190", "127.0.0.1:6191"]
    assert config.demo_origins == ["127.0.0.1:6190", "127.0.0.1:6191"]


def test_workers_zero_means_one_per_cpu() -> None:
    """server.workers: 0 runs one worker per CPU."""
    config = from_mapping({"server": {"workers": 0}, "app": "m:A"})
    assert config.worker_count() == (os.cpu_count() or 1)


# -- errors: file, key path, reason --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("listener:\n  - address: 127.0.0.1:80\n",
                     "listener: unknown key (did you mean 'listeners'?)", id="top-level"),
        pytest.param("server:\n  wokers: 2\n",
                     "server.wokers: unknown key (did you mean 'workers'?)", id="section"),
        pytest.param("listeners:\n  - adress: 127.0.0.1:80\n",
                     "listeners[0].adress: unknown key (did you mean 'address'?)",
                     id="list-item"),
        pytest.param("upstreams:\n  web:\n    server: [127.0.0.1:80]\n",
                     "upstreams.web.server: unknown key (did you mean 'servers'?)",
                     id="named-upstream"),
        pytest.param("timeouts:\n  keepalive: 5\n",
                     "timeouts.keepalive: unknown key (did you mean 'keepalive_seconds'?)",
                     id="prefix"),
        pytest.param("server:\n  zzzz: 1\n", "server.zzzz: unknown key", id="no-suggestion"),
    ],
)
def test_unknown_key(tmp_path: Path, text: str, message: str) -> None:
    """An unknown key is refused with its key path and the closest known key, if any."""
    path, error = load_error(tmp_path, text + APP)
    assert str(error) == f"{path}: {message}"
    assert error.source == path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("server:\n  workers: '4'\n",
                     "server.workers: expected an integer, got '4'", id="string-for-int"),
        pytest.param("server:\n  workers: true\n",
                     "server.workers: expected an integer, got True", id="bool-for-int"),
        pytest.param("server:\n  workers: 2.5\n",
                     "server.workers: expected an integer, got 2.5", id="float-for-int"),
        pytest.param("timeouts:\n  keepalive_seconds: false\n",
                     "timeouts.keepalive_seconds: expected a number, got False",
                     id="bool-for-float"),
        pytest.param("timeouts:\n  keepalive_seconds: soon\n",
                     "timeouts.keepalive_seconds: expected a number, got 'soon'",
                     id="string-for-float"),
        pytest.param("server:\n  pid_file: 5\n",
                     "server.pid_file: expected a string, got 5", id="int-for-optional-str"),
        pytest.param("listeners:\n  address: 127.0.0.1:80\n",
                     "listeners: expected a list, got {'address': '127.0.0.1:80'}",
                     id="mapping-for-list"),
        pytest.param("server: [1, 2]\n",
                     "server: expected a mapping, got [1, 2]", id="list-for-section"),
        pytest.param("app_options: [a]\n",
                     "app_options: expected a mapping, got ['a']", id="list-for-mapping"),
        pytest.param("listeners:\n  - 127.0.0.1:80\n",
                     "listeners[0]: expected a mapping, got '127.0.0.1:80'",
                     id="string-for-list-item"),
        pytest.param("demo_origins: 127.0.0.1:80\n",
                     "demo_origins: expected a list, got '127.0.0.1:80'",
                     id="string-for-list"),
        pytest.param("server:\n  workers: -1\n",
                     "server.workers: must be 0 or more", id="negative"),
        pytest.param("pool:\n  idle_timeout_seconds: 0\n",
                     "pool.idle_timeout_seconds: must be greater than 0", id="zero"),
        pytest.param("logging:\n  access_log_format: xml\n",
                     "logging.access_log_format: expected one of combined, json",
                     id="not-a-choice"),
    ],
)
def test_wrong_type_or_value(tmp_path: Path, text: str, message: str) -> None:
    """A value of the wrong type or out of range is refused with the key path and why."""
    path, error = load_error(tmp_path, text + APP)
    assert str(error) == f"{path}: {message}"


def test_upstream_names_must_be_strings(tmp_path: Path) -> None:
    """A non-string upstream name is refused."""
    path, error = load_error(tmp_path, "upstreams:\n  1:\n    servers: [127.0.0.1:80]\n")
    assert str(error) == f"{path}: upstreams: keys must be strings, got 1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("listeners:\n  - address: 127.0.0.1\n",
                     "listeners[0].address: '127.0.0.1': missing ':PORT'", id="missing-port"),
        pytest.param("listeners:\n  - address: 127.0.0.1:70000\n",
                     "listeners[0].address: '127.0.0.1:70000': the port must be a number "
                     "from 0 to 65535", id="port-out-of-range"),
        pytest.param("listeners:\n  - address: 127.0.0.1:http\n",
                     "listeners[0].address: '127.0.0.1:http': the port must be a number "
                     "from 0 to 65535", id="port-not-a-number"),
        pytest.param("listeners:\n  - address: '::1:8080'\n",
                     "listeners[0].address: '::1:8080': write an IPv6 address as "
                     "[ADDRESS]:PORT", id="ipv6-without-brackets"),
        pytest.param("listeners:\n  - address: ':8080'\n",
                     "listeners[0].address: ':8080': missing host", id="missing-host"),
        pytest.param("demo_origins: [127.0.0.1:80, localhost]\n",
                     "demo_origins: item 1: 'localhost': missing ':PORT'", id="list-item"),
    ],
)
def test_bad_address(tmp_path: Path, text: str, message: str) -> None:
    """An address that is not HOST:PORT is refused, saying what is wrong with it."""
    path, error = load_error(tmp_path, text + APP)
    assert str(error) == f"{path}: {message}"


def test_bad_upstream_server_address(tmp_path: Path) -> None:
    """A bad server address names the upstream and the item."""
    path, error = load_error(
        tmp_path, "upstreams:\n  web:\n    servers: [10.0.0.1:80, 10.0.0.2:99999]\n")
    assert str(error) == (f"{path}: upstreams.web.servers: item 1: '10.0.0.2:99999': "
                          "the port must be a number from 0 to 65535")


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        pytest.param("server:\n  workers: [1, 2\n", "line 3, column 1",
                     "expected ',' or ']', but got '<stream end>'", id="unclosed-list"),
        pytest.param("server:\n  workers: 2: 3\n", "line 2, column 13",
                     "mapping values are not allowed here", id="colon-in-value"),
        pytest.param("server:\n\tworkers: 2\n", "line 2, column 1",
                     "found character '\\t' that cannot start any token", id="tab"),
    ],
)
def test_invalid_yaml(tmp_path: Path, text: str, where: str, problem: str) -> None:
    """Invalid YAML is refused with the line and column (1-based) and the parser's reason."""
    path, error = load_error(tmp_path, text)
    assert str(error) == f"{path}: invalid YAML: {where}: {problem}"
    assert error.path == ""


def test_empty_file_needs_upstreams(tmp_path: Path) -> None:
    """An empty file is the defaults, which have no upstream for the load balancer."""
    path, error = load_error(tmp_path, "")
    assert str(error) == (f"{path}: upstreams: the built-in load balancer needs at least one "
                          "upstream with servers")


def test_comment_only_file_is_empty(tmp_path: Path) -> None:
    """A file with only comments behaves like an empty one."""
    path, error = load_error(tmp_path, "# nothing here yet\n")
    assert error.path == "upstreams"


@pytest.mark.parametrize("text", ["- server\n- listeners\n", "just a string\n", "42\n"])
def test_top_level_must_be_mapping(tmp_path: Path, text: str) -> None:
    """A file whose top level is not a mapping is refused as such."""
    path, error = load_error(tmp_path, text)
    assert str(error) == f"{path}: the top level must be a mapping"


def test_missing_file(tmp_path: Path) -> None:
    """A file that cannot be read is refused with the OS reason."""
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_duplicate_listener_address(tmp_path: Path) -> None:
    """The same listener address twice is refused at the second one."""
    path, error = load_error(
        tmp_path,
        "listeners:\n  - address: 127.0.0.1:8080\n  - address: 127.0.0.1:9090\n"
        "  - address: 127.0.0.1:8080\n" + MINIMAL)
    assert str(error) == f"{path}: listeners[2].address: 127.0.0.1:8080 is listed twice"


def test_no_listeners(tmp_path: Path) -> None:
    """An empty listener list is refused."""
    path, error = load_error(tmp_path, "listeners: []\n" + MINIMAL)
    assert str(error) == f"{path}: listeners: at least one listener is needed"


def test_upstreams_without_servers_and_no_app(tmp_path: Path) -> None:
    """Upstreams that list no servers leave the load balancer nothing to do."""
    path, error = load_error(tmp_path, "upstreams:\n  web:\n    hosts: [example.com]\n")
    assert str(error) == (f"{path}: upstreams: the built-in load balancer needs at least one "
                          "upstream with servers")


@pytest.mark.parametrize("spec", ["mypackage.gateway", "mypackage:", ":Gateway"])
def test_app_spec_needs_module_and_attribute(tmp_path: Path, spec: str) -> None:
    """An app that is not MODULE:ATTRIBUTE is refused with an example of the right form."""
    path, error = load_error(tmp_path, f"app: '{spec}'\n")
    assert str(error) == (f"{path}: app: expected MODULE:ATTRIBUTE, for example "
                          "mypackage.gateway:MyGateway")


def test_from_mapping_names_its_source() -> None:
    """from_mapping errors name the source given (not a file)."""
    with pytest.raises(ConfigError) as info:
        from_mapping({"pool": {"size_per_worker": "many"}}, "<cli>")
    assert str(info.value) == "<cli>: pool.size_per_worker: expected an integer, got 'many'"


# -- the reference -----------------------------------------------------------------------


def reference_rows() -> dict[str, list[str]]:
    """The rows of the reference table by key, each as its cells."""
    rows = {}
    for line in reference().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        rows[cells[0].strip("`")] = cells
    return rows


def test_reference_lists_every_setting_once_with_its_doc() -> None:
    """Every declared setting has a doc and a row in the reference, and no row is extra."""
    settings = declared_settings()
    rows = reference_rows()
    assert "server.workers" in settings and "listeners[].address" in settings
    assert "upstreams.<name>.servers" in settings
    assert sorted(rows) == sorted(settings)
    for key, f in settings.items():
        doc = f.metadata.get("doc")
        assert doc, f"{key} has no doc"
        assert rows[key][3] == doc


def test_reference_shows_types_and_defaults() -> None:
    """The reference gives each setting's type and default as a user would write them."""
    rows = reference_rows()
    assert rows["server.workers"][1:3] == ["an integer", "`0`"]
    assert rows["server.pid_file"][1:3] == ["a string or unset", "`unset`"]
    assert rows["listeners[].address"][1:3] == ["a string", "`127.0.0.1:6188`"]
    assert rows["upstreams.<name>.servers"][1:3] == ["a list", "`[]`"]
    assert rows["timeouts.keepalive_seconds"][1:3] == ["a number", "`75.0`"]
    assert rows["app_options"][1:3] == ["a mapping", "`{}`"]
    assert reference().startswith("| key | type | default | meaning |\n|---|---|---|---|\n")
