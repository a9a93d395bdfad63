"""shared.config: the load-balancing settings of an upstream (issue 12): servers as strings or
mappings with weight and backup, balance and hash_key, slow start, health checks, outlier
detection, retry_on, the fleet limits, resolve_seconds; every refusal with the file, the key
path and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import lb
from shared.config import (
    BALANCE_CHOICES,
    HASH_KEY_FORMS,
    ConfigError,
    HealthCheckConfig,
    Server,
    UpstreamConfig,
    from_mapping,
    load,
)
from shared.lb.keys import KEY_FORMS, key_function


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tenaya.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def upstream(text: str, tmp_path: Path) -> UpstreamConfig:
    """The upstream ``web`` of a file whose ``web:`` section is ``text`` (indented 4)."""
    body = "".join(f"    {line}\n" for line in text.splitlines())
    return load(write(tmp_path, f"upstreams:\n  web:\n{body}")).upstreams["web"]


def errors(tmp_path: Path, text: str) -> list[str]:
    """The mistakes of a file whose ``web:`` section is ``text``, without the file name."""
    body = "".join(f"    {line}\n" for line in text.splitlines())
    path = write(tmp_path, f"upstreams:\n  web:\n{body}")
    with pytest.raises(ConfigError) as info:
        load(path)
    for e in info.value.errors:
        assert e.source == path
    return [str(e).removeprefix(f"{path}: ") for e in info.value.errors]


def test_defaults(tmp_path: Path) -> None:
    """A plain list of strings keeps working, with the defaults of every new key."""
    web = upstream("servers: [10.0.0.1:80, 10.0.0.2:80]", tmp_path)
    assert web.servers == ["10.0.0.1:80", "10.0.0.2:80"]
    assert [(s.address, s.weight, s.backup) for s in web.servers] == [
        ("10.0.0.1:80", 1, False),
        ("10.0.0.2:80", 1, False),
    ]
    assert web.balance == "round_robin" and web.hash_key is None
    assert web.slow_start_seconds == 0.0 and web.health_check is None
    od = web.outlier_detection
    assert (od.consecutive_failures, od.ejection_seconds, od.max_ejection_percent) == (5, 30, 10)
    assert web.retry_on == []
    assert (web.max_connections, web.max_requests, web.max_pending) == (1024, 1024, 1024)
    assert web.resolve_seconds == 30.0


def test_servers_as_mappings(tmp_path: Path) -> None:
    """A server is a string or {address, weight, backup}; it is still its address as a string."""
    web = upstream(
        "servers:\n"
        "  - 127.0.0.1:9001\n"
        "  - {address: 127.0.0.1:9002, weight: 3}\n"
        "  - {address: backup.internal:9003, backup: true}",
        tmp_path,
    )
    assert [(s.address, s.weight, s.backup) for s in web.servers] == [
        ("127.0.0.1:9001", 1, False),
        ("127.0.0.1:9002", 3, False),
        ("backup.internal:9003", 1, True),
    ]
    assert all(isinstance(s, Server) and isinstance(s, str) for s in web.servers)
    assert web.servers[1] == Server("127.0.0.1:9002", 3)
    assert web.servers[1] != "127.0.0.1:9002"  # not the same server: its weight differs
    assert str(web.servers[1]) == "127.0.0.1:9002"


def test_the_issue_example(tmp_path: Path) -> None:
    """The issue's config, every key, loads as written."""
    web = upstream(
        "balance: hash\n"
        "hash_key: header:X-User\n"
        "servers:\n"
        "  - 127.0.0.1:9001\n"
        "  - {address: 127.0.0.1:9002, weight: 3}\n"
        "  - {address: backup.internal:9003, backup: true}\n"
        "health_check:\n"
        "  path: /healthz\n"
        "  interval_seconds: 5\n"
        "  timeout_seconds: 2\n"
        "  healthy_threshold: 2\n"
        "  unhealthy_threshold: 3\n"
        "outlier_detection:\n"
        "  consecutive_failures: 5\n"
        "  ejection_seconds: 30\n"
        "  max_ejection_percent: 10\n"
        "retry_on: [502, 503, 504]\n"
        "max_connections: 1024\n"
        "max_requests: 1024\n"
        "slow_start_seconds: 0\n"
        "resolve_seconds: 30",
        tmp_path,
    )
    assert web.balance == "hash" and web.hash_key == "header:X-User"
    assert web.health_check == HealthCheckConfig("/healthz", 5.0, 2.0, 2, 3)
    assert web.retry_on == [502, 503, 504]


def test_empty_health_check_is_a_tcp_check_with_haproxy_defaults(tmp_path: Path) -> None:
    check = upstream("servers: [a:1]\nhealth_check: {}", tmp_path).health_check
    assert check == HealthCheckConfig(None, 2.0, 1.0, 2, 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "servers: [{address: a:1, weight: 0}]",
            ["upstreams.web.servers[0].weight: must be greater than 0"],
            id="weight-0",
        ),
        pytest.param(
            "servers: [{address: a:1, weight: 1.5}]",
            ["upstreams.web.servers[0].weight: expected an integer, got 1.5"],
            id="weight-float",
        ),
        pytest.param(
            "servers: [a:1, {weight: 2}]",
            ["upstreams.web.servers[1].address: required (HOST:PORT)"],
            id="no-address",
        ),
        pytest.param(
            "servers: [{address: nowhere}]",
            ["upstreams.web.servers[0].address: 'nowhere': missing ':PORT'"],
            id="bad-address",
        ),
        pytest.param(
            "servers: [a:1, {address: b:1, wieght: 2}]",
            ["upstreams.web.servers[1].wieght: unknown key (did you mean 'weight'?)"],
            id="unknown-key",
        ),
        pytest.param(
            "servers: [a:1, 7]",
            ["upstreams.web.servers[1]: expected HOST:PORT or a mapping with an address, got 7"],
            id="not-a-server",
        ),
        pytest.param(
            "servers: [{address: a:1, backup: yes please}]",
            ["upstreams.web.servers[0].backup: expected true or false, got 'yes please'"],
            id="backup-not-bool",
        ),
        pytest.param(
            "servers: [{address: a:1, backup: true}]",
            ["upstreams.web.servers: every server is a backup: at least one must not be"],
            id="only-backups",
        ),
        pytest.param(
            "servers: [a:1]\nbalance: fair",
            ["upstreams.web.balance: expected one of round_robin, random, least_conn, hash"],
            id="balance",
        ),
        pytest.param(
            "servers: [a:1]\nbalance: hash",
            [
                "upstreams.web.hash_key: balance: hash needs a hash_key (header:NAME, "
                "cookie:NAME, query:NAME, path, client_ip)"
            ],
            id="hash-without-key",
        ),
        pytest.param(
            "servers: [a:1]\nhash_key: path",
            ["upstreams.web.hash_key: only for balance: hash (balance is round_robin)"],
            id="key-without-hash",
        ),
        pytest.param(
            "servers: [a:1]\nbalance: hash\nhash_key: 'header:'",
            ["upstreams.web.hash_key: header: needs a name (for example header:X-User)"],
            id="key-without-name",
        ),
        pytest.param(
            "servers: [a:1]\nbalance: hash\nhash_key: uri",
            [
                "upstreams.web.hash_key: expected one of header:NAME, cookie:NAME, "
                "query:NAME, path, client_ip"
            ],
            id="key-unknown",
        ),
        pytest.param(
            "servers: [a:1]\nslow_start_seconds: -1",
            ["upstreams.web.slow_start_seconds: must be 0 or more"],
            id="slow-start",
        ),
        pytest.param(
            "servers: [a:1]\nhealth_check: {path: healthz, interval_seconds: 0}",
            [
                "upstreams.web.health_check.path: must start with /",
                "upstreams.web.health_check.interval_seconds: must be greater than 0",
            ],
            id="health-check",
        ),
        pytest.param(
            "servers: [a:1]\nhealth_check: {interval_seconds: 1, timeout_seconds: 2}",
            [
                "upstreams.web.health_check.timeout_seconds: "
                "must not be more than interval_seconds (1)"
            ],
            id="health-timeout-over-interval",
        ),
        pytest.param(
            "servers: [a:1]\nhealth_check: {healthy_threshold: 0, unhealthy_threshold: 0}",
            [
                "upstreams.web.health_check.healthy_threshold: must be greater than 0",
                "upstreams.web.health_check.unhealthy_threshold: must be greater than 0",
            ],
            id="health-thresholds",
        ),
        pytest.param(
            "servers: [a:1]\nhealth_check: {interval: 2}",
            ["upstreams.web.health_check.interval: unknown key (did you mean 'interval_seconds'?)"],
            id="health-unknown-key",
        ),
        pytest.param(
            "servers: [a:1]\noutlier_detection:\n  consecutive_failures: -1\n"
            "  ejection_seconds: 0\n  max_ejection_percent: 150",
            [
                "upstreams.web.outlier_detection.consecutive_failures: must be 0 or more",
                "upstreams.web.outlier_detection.ejection_seconds: must be greater than 0",
                "upstreams.web.outlier_detection.max_ejection_percent: must be from 0 to 100",
            ],
            id="outlier",
        ),
        pytest.param(
            "servers: [a:1]\nretry_on: [502, 200, x]",
            [
                "upstreams.web.retry_on: item 1: expected an HTTP status from 400 to 599",
                "upstreams.web.retry_on[2]: expected an integer, got 'x'",
            ],
            id="retry-on",
        ),
        pytest.param(
            "servers: [a:1]\nmax_connections: 0\nmax_requests: -5\nmax_pending: 0",
            [
                "upstreams.web.max_connections: must be greater than 0",
                "upstreams.web.max_requests: must be greater than 0",
                "upstreams.web.max_pending: must be greater than 0",
            ],
            id="limits",
        ),
        pytest.param(
            "servers: [a:1]\nresolve_seconds: 0",
            ["upstreams.web.resolve_seconds: must be greater than 0"],
            id="resolve",
        ),
    ],
)
def test_refused(tmp_path: Path, text: str, expected: list[str]) -> None:
    """Each invalid value is refused with the file, the key path and the reason."""
    assert errors(tmp_path, text) == expected


def test_balance_names_are_the_librarys() -> None:
    """The config's names and forms are those shared.lb builds (the master may not import
    shared.lb, so the config keeps its own copy)."""
    assert BALANCE_CHOICES == lb.BALANCE_NAMES
    assert HASH_KEY_FORMS == KEY_FORMS


@pytest.mark.parametrize(
    "spec",
    ["path", "client_ip", "header:X-User", "cookie:sid", "query:u", "header:", "uri", "x:y", "a"],
)
def test_hash_key_check_agrees_with_key_function(spec: str) -> None:
    """A hash_key the config accepts is one key_function accepts, and the other way round."""
    raw = {"upstreams": {"w": {"servers": ["a:1"], "balance": "hash", "hash_key": spec}}}
    try:
        from_mapping(raw)
        accepted = True
    except ConfigError:
        accepted = False
    try:
        key_function(spec)
        parsed = True
    except ValueError:
        parsed = False
    assert accepted == parsed
