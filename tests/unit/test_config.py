"""shared.config: loading YAML files, the embedded default, error messages and the reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.config import (
    EMBEDDED_SOURCE,
    Config,
    ConfigError,
    ListenerConfig,
    Server,
    UpstreamConfig,
    from_mapping,
    load,
    reference,
)
from tests.support.config import declared_settings

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


def reasons(path: str, error: ConfigError) -> list[str]:
    """Each mistake of ``error`` as ``key.path: reason``, without the file in front."""
    return [str(e).removeprefix(f"{path}: ") for e in error.errors]


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
    assert config.upstreams["web"] == UpstreamConfig(
        servers=[Server("10.0.0.1:80"), Server("10.0.0.2:80")]
    )
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
        pytest.param(
            "listener:\n  - address: 127.0.0.1:80\n",
            "listener: unknown key (did you mean 'listeners'?)",
            id="top-level",
        ),
        pytest.param(
            "server:\n  wokers: 2\n",
            "server.wokers: unknown key (did you mean 'workers'?)",
            id="section",
        ),
        pytest.param(
            "listeners:\n  - adress: 127.0.0.1:80\n",
            "listeners[0].adress: unknown key (did you mean 'address'?)",
            id="list-item",
        ),
        pytest.param(
            "upstreams:\n  web:\n    server: [127.0.0.1:80]\n",
            "upstreams.web.server: unknown key (did you mean 'servers'?)",
            id="named-upstream",
        ),
        pytest.param(
            "timeouts:\n  keepalive: 5\n",
            "timeouts.keepalive: unknown key (did you mean 'keepalive_seconds'?)",
            id="prefix",
        ),
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
        pytest.param(
            "server:\n  workers: '4'\n",
            "server.workers: expected an integer, got '4'",
            id="string-for-int",
        ),
        pytest.param(
            "server:\n  workers: true\n",
            "server.workers: expected an integer, got True",
            id="bool-for-int",
        ),
        pytest.param(
            "server:\n  workers: 2.5\n",
            "server.workers: expected an integer, got 2.5",
            id="float-for-int",
        ),
        pytest.param(
            "timeouts:\n  keepalive_seconds: false\n",
            "timeouts.keepalive_seconds: expected a number, got False",
            id="bool-for-float",
        ),
        pytest.param(
            "timeouts:\n  keepalive_seconds: soon\n",
            "timeouts.keepalive_seconds: expected a number, got 'soon'",
            id="string-for-float",
        ),
        pytest.param(
            "server:\n  pid_file: 5\n",
            "server.pid_file: expected a string, got 5",
            id="int-for-optional-str",
        ),
        pytest.param(
            "listeners:\n  address: 127.0.0.1:80\n",
            "listeners: expected a list, got {'address': '127.0.0.1:80'}",
            id="mapping-for-list",
        ),
        pytest.param(
            "server: [1, 2]\n", "server: expected a mapping, got [1, 2]", id="list-for-section"
        ),
        pytest.param(
            "app_options: [a]\n",
            "app_options: expected a mapping, got ['a']",
            id="list-for-mapping",
        ),
        pytest.param(
            "listeners:\n  - 127.0.0.1:80\n",
            "listeners[0]: expected a mapping, got '127.0.0.1:80'",
            id="string-for-list-item",
        ),
        pytest.param(
            "demo_origins: 127.0.0.1:80\n",
            "demo_origins: expected a list, got '127.0.0.1:80'",
            id="string-for-list",
        ),
        pytest.param(
            "server:\n  workers: -1\n", "server.workers: must be 0 or more", id="negative"
        ),
        pytest.param(
            "pool:\n  idle_timeout_seconds: 0\n",
            "pool.idle_timeout_seconds: must be greater than 0",
            id="zero",
        ),
        pytest.param(
            "logging:\n  access_log_format: xml\n",
            "logging.access_log_format: expected one of combined, json",
            id="not-a-choice",
        ),
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
        pytest.param(
            "listeners:\n  - address: 127.0.0.1\n",
            "listeners[0].address: '127.0.0.1': missing ':PORT'",
            id="missing-port",
        ),
        pytest.param(
            "listeners:\n  - address: 127.0.0.1:70000\n",
            "listeners[0].address: '127.0.0.1:70000': the port must be a number from 0 to 65535",
            id="port-out-of-range",
        ),
        pytest.param(
            "listeners:\n  - address: 127.0.0.1:http\n",
            "listeners[0].address: '127.0.0.1:http': the port must be a number from 0 to 65535",
            id="port-not-a-number",
        ),
        pytest.param(
            "listeners:\n  - address: '::1:8080'\n",
            "listeners[0].address: '::1:8080': write an IPv6 address as [ADDRESS]:PORT",
            id="ipv6-without-brackets",
        ),
        pytest.param(
            "listeners:\n  - address: ':8080'\n",
            "listeners[0].address: ':8080': missing host",
            id="missing-host",
        ),
        pytest.param(
            "demo_origins: [127.0.0.1:80, localhost]\n",
            "demo_origins: item 1: 'localhost': missing ':PORT'",
            id="list-item",
        ),
    ],
)
def test_bad_address(tmp_path: Path, text: str, message: str) -> None:
    """An address that is not HOST:PORT is refused, saying what is wrong with it."""
    path, error = load_error(tmp_path, text + APP)
    assert str(error) == f"{path}: {message}"


def test_bad_upstream_server_address(tmp_path: Path) -> None:
    """A bad server address names the upstream and the item."""
    path, error = load_error(
        tmp_path, "upstreams:\n  web:\n    servers: [10.0.0.1:80, 10.0.0.2:99999]\n"
    )
    assert str(error) == (
        f"{path}: upstreams.web.servers: item 1: '10.0.0.2:99999': "
        "the port must be a number from 0 to 65535"
    )


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        pytest.param(
            "server:\n  workers: [1, 2\n",
            "line 3, column 1",
            "expected ',' or ']', but got '<stream end>'",
            id="unclosed-list",
        ),
        pytest.param(
            "server:\n  workers: 2: 3\n",
            "line 2, column 13",
            "mapping values are not allowed here",
            id="colon-in-value",
        ),
        pytest.param(
            "server:\n\tworkers: 2\n",
            "line 2, column 1",
            "found character '\\t' that cannot start any token",
            id="tab",
        ),
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
    assert str(error) == (
        f"{path}: upstreams: the built-in load balancer needs at least one upstream with servers"
    )


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
        "  - address: 127.0.0.1:8080\n" + MINIMAL,
    )
    assert str(error) == f"{path}: listeners[2].address: 127.0.0.1:8080 is listed twice"


def test_no_listeners(tmp_path: Path) -> None:
    """An empty listener list is refused."""
    path, error = load_error(tmp_path, "listeners: []\n" + MINIMAL)
    assert str(error) == f"{path}: listeners: at least one listener is needed"


def test_upstreams_without_servers_and_no_app(tmp_path: Path) -> None:
    """Upstreams that list no servers leave the load balancer nothing to do."""
    path, error = load_error(tmp_path, "upstreams:\n  web:\n    hosts: [example.com]\n")
    assert str(error) == (
        f"{path}: upstreams: the built-in load balancer needs at least one upstream with servers"
    )


@pytest.mark.parametrize("spec", ["mypackage.gateway", "mypackage:", ":Gateway"])
def test_app_spec_needs_module_and_attribute(tmp_path: Path, spec: str) -> None:
    """An app that is not MODULE:ATTRIBUTE is refused with an example of the right form."""
    path, error = load_error(tmp_path, f"app: '{spec}'\n")
    assert str(error) == (
        f"{path}: app: expected MODULE:ATTRIBUTE, for example mypackage.gateway:MyGateway"
    )


def test_from_mapping_names_its_source() -> None:
    """from_mapping errors name the source given (not a file)."""
    with pytest.raises(ConfigError) as info:
        from_mapping({"pool": {"size_per_worker": "many"}, "app": "m:A"}, "<cli>")
    assert str(info.value) == "<cli>: pool.size_per_worker: expected an integer, got 'many'"


# -- every error of a file at once -----------------------------------------------------------

#: Eight mistakes in five sections, in this order in the file.
EIGHT = """\
server:
  wokers: 2
  max_retries: many
listeners:
  - address: 127.0.0.1
  - adress: 127.0.0.1:81
upstreams:
  web:
    servers: [10.0.0.1:80, localhost, 10.0.0.2:99999]
pool:
  idle_timeout_seconds: 0
logging:
  level: loud
"""


def test_all_errors_of_a_file_at_once(tmp_path: Path) -> None:
    """Every mistake of a file is reported in one go, one line ``FILE: key.path: reason`` each,
    in the order of the keys in the file; the first one's parts stay on the error."""
    path, error = load_error(tmp_path, EIGHT)
    expected = [
        "server.wokers: unknown key (did you mean 'workers'?)",
        "server.max_retries: expected an integer, got 'many'",
        "listeners[0].address: '127.0.0.1': missing ':PORT'",
        "listeners[1].adress: unknown key (did you mean 'address'?)",
        "upstreams.web.servers: item 1: 'localhost': missing ':PORT'",
        "upstreams.web.servers: item 2: '10.0.0.2:99999': the port must be a number from 0 "
        "to 65535",
        "pool.idle_timeout_seconds: must be greater than 0",
        "logging.level: expected one of debug, info, warning, error",
    ]
    assert str(error).splitlines() == [f"{path}: {line}" for line in expected]
    assert [str(e) for e in error.errors] == str(error).splitlines()
    assert [e.path for e in error.errors][:3] == [
        "server.wokers",
        "server.max_retries",
        "listeners[0].address",
    ]
    assert {e.source for e in error.errors} == {path}
    assert (error.source, error.path) == (path, "server.wokers")
    assert error.reason == "unknown key (did you mean 'workers'?)"


def test_one_error_is_one_line(tmp_path: Path) -> None:
    """A file with one mistake gives an error with one entry and one line."""
    path, error = load_error(tmp_path, "server:\n  workers: -1\n" + APP)
    assert len(error.errors) == 1
    assert str(error) == f"{path}: server.workers: must be 0 or more"
    assert str(error.errors[0]) == str(error)


def test_errors_follow_file_order_not_check_order(tmp_path: Path) -> None:
    """Errors found by checks across settings take their key's place in the file too."""
    path, error = load_error(
        tmp_path,
        "logging:\n  level: loud\nlisteners:\n  - address: 127.0.0.1:80\n"
        "  - address: 127.0.0.1:80\nserver:\n  wokers: 1\n" + APP,
    )
    assert [e.path for e in error.errors] == [
        "logging.level",
        "listeners[1].address",
        "server.wokers",
    ]
    assert error.errors[1].reason == "127.0.0.1:80 is listed twice"


def test_section_not_a_mapping_hides_only_its_own_checks(tmp_path: Path) -> None:
    """A section of the wrong type is one error; the other sections are still checked."""
    path, error = load_error(
        tmp_path, "server: [1, 2]\nlisteners: 127.0.0.1:80\npool:\n  size_shared: -1\n" + APP
    )
    assert str(error).splitlines() == [
        f"{path}: server: expected a mapping, got [1, 2]",
        f"{path}: listeners: expected a list, got '127.0.0.1:80'",
        f"{path}: pool.size_shared: must be 0 or more",
    ]


def test_bad_list_items_each_reported(tmp_path: Path) -> None:
    """Every refused item of a list is an error of its own; the other items are checked."""
    path, error = load_error(
        tmp_path,
        "listeners:\n  - 127.0.0.1:80\n  - address: nope\n  - backlog: 0\n"
        "demo_origins: [a, 127.0.0.1:1, 5]\n" + APP,
    )
    assert reasons(path, error) == [
        "listeners[0]: expected a mapping, got '127.0.0.1:80'",
        "listeners[1].address: 'nope': missing ':PORT'",
        "listeners[2].backlog: must be greater than 0",
        "demo_origins: item 0: 'a': missing ':PORT'",
        "demo_origins[2]: expected a string, got 5",
    ]


def test_missing_upstreams_reported_beside_other_errors(tmp_path: Path) -> None:
    """Having no upstream for the load balancer is one more error among the others."""
    path, error = load_error(tmp_path, "server:\n  wokers: 2\n")
    assert [e.path for e in error.errors] == ["server.wokers", "upstreams"]


@pytest.mark.parametrize(
    ("text", "paths"),
    [
        pytest.param(
            "upstreams:\n  web:\n    server: [127.0.0.1:80]\n",
            ["upstreams.web.server"],
            id="misspelt-servers",
        ),
        pytest.param(
            "upstreams:\n  web:\n    servers: [localhost]\n",
            ["upstreams.web.servers"],
            id="bad-server",
        ),
        pytest.param("upstreams: [web]\n", ["upstreams"], id="upstreams-not-a-mapping"),
        pytest.param("app: justamodule\n", ["app"], id="bad-app"),
        pytest.param("app: 5\n", ["app"], id="app-not-a-string"),
    ],
)
def test_no_upstream_error_after_a_refused_upstream_or_app(
    tmp_path: Path, text: str, paths: list[str]
) -> None:
    """When the upstreams or the app were refused, "needs at least one upstream" is not added:
    it would only repeat the first error."""
    path, error = load_error(tmp_path, text)
    assert [e.path for e in error.errors] == paths


def test_no_duplicate_error_for_a_refused_address(tmp_path: Path) -> None:
    """Listeners whose address was refused are not compared with the others."""
    path, error = load_error(
        tmp_path, "listeners:\n  - address: 1\n  - address: 1\n  - {}\n  - {}\n" + APP
    )
    assert reasons(path, error) == [
        "listeners[0].address: expected a string, got 1",
        "listeners[1].address: expected a string, got 1",
        "listeners[3].address: 127.0.0.1:6188 is listed twice",
    ]


def test_tls_files_checked_beside_other_tls_errors(tmp_path: Path) -> None:
    """A TLS listener's unreadable files are reported with its other mistakes; a file
    setting of the wrong type is reported once, as such."""
    path, error = load_error(
        tmp_path,
        "listeners:\n  - tls:\n      cert: missing.pem\n      key: 5\n"
        "      min_version: '1.1'\n" + APP,
    )
    assert reasons(path, error) == [
        "listeners[0].tls.cert: cannot read missing.pem",
        "listeners[0].tls.key: expected a string, got 5",
        "listeners[0].tls.min_version: expected one of 1.2, 1.3",
    ]


def test_non_string_keys_each_reported(tmp_path: Path) -> None:
    """Each non-string key of a mapping is an error, at its place in the file."""
    path, error = load_error(
        tmp_path, "upstreams:\n  1:\n    servers: [127.0.0.1:80]\n  web:\n    sever: []\n  2: {}\n"
    )
    assert reasons(path, error) == [
        "upstreams: keys must be strings, got 1",
        "upstreams.web.sever: unknown key (did you mean 'servers'?)",
        "upstreams: keys must be strings, got 2",
    ]


def test_invalid_yaml_is_the_only_error(tmp_path: Path) -> None:
    """YAML that does not parse cannot be checked further: one error."""
    path, error = load_error(tmp_path, "server:\n  wokers: [1,\nlogging: {level: loud}\n")
    assert len(error.errors) == 1
    assert error.errors[0].reason.startswith("invalid YAML: ")


def test_from_mapping_reports_all_errors() -> None:
    """from_mapping, as the workers and overrides use it, lists every error too."""
    with pytest.raises(ConfigError) as info:
        from_mapping({"pool": {"size_per_worker": "many", "shared": 1}}, "<cli>")
    assert str(info.value).splitlines() == [
        "<cli>: pool.size_per_worker: expected an integer, got 'many'",
        "<cli>: pool.shared: expected true or false, got 1",
        "<cli>: upstreams: the built-in load balancer needs at least one upstream with servers",
    ]


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
