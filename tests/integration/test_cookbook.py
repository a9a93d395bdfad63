"""The cookbook's recipes (examples/cookbook.py) run as written, each in a real master in front
of real origins, configured through ``app_options``: what a client sees (status codes, which
origin answered, added headers), what the origins see (paths, headers), and the app's log line.

The file itself is copied beside each master's config, where a worker imports it as
``cookbook``, exactly as the example's docstring says a user would.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from tests.support.client import get
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.origin import Origin
from tests.support.waits import wait_for

if TYPE_CHECKING:
    from tests.conftest import Fleet

COOKBOOK_PATH = Path(__file__).resolve().parents[2] / "examples" / "cookbook.py"
COOKBOOK = COOKBOOK_PATH.read_text()


def cookbook_module() -> ModuleType:
    """The example file imported in this process too (for its canary hash)."""
    name = "tenaya_cookbook_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, COOKBOOK_PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def recipe(
    fleet: Fleet,
    name: str,
    options: dict[str, object],
    files: dict[str, str] | None = None,
    app: str | None = None,
) -> Master:
    """A serving master running the recipe ``cookbook:<name>`` with ``app_options``."""
    config = config_for(app=app or f"cookbook:{name}", app_options=options)
    return fleet.master(config, files={"cookbook.py": COOKBOOK, **(files or {})})


# -- (a) authentication ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth(module_fleet: Fleet) -> tuple[Master, Origin]:
    origin = module_fleet.origin("app")
    return recipe(
        module_fleet, "BearerAuth", {"origin": origin.address, "tokens": ["s3cret", "other-token"]}
    ), origin


def test_auth_without_credentials_is_401(auth: tuple[Master, Origin]) -> None:
    master, origin = auth
    origin.reset()
    resp = get(master.port, "/private")
    assert resp.status == 401
    assert (resp.header("WWW-Authenticate") or "").startswith("Bearer")
    assert origin.requests == []


@pytest.mark.parametrize(
    "credentials", ["Bearer wrong", "Bearer s3cre", "Basic czNjcmV0", "Bearer"]
)
def test_auth_with_wrong_credentials_is_403(auth: tuple[Master, Origin], credentials: str) -> None:
    master, origin = auth
    origin.reset()
    resp = get(master.port, "/private", [("Authorization", credentials)])
    assert resp.status == 403
    assert resp.body == b"wrong credentials\n"
    assert origin.requests == []


@pytest.mark.parametrize("token", ["s3cret", "other-token"])
def test_auth_with_a_known_token_is_proxied(auth: tuple[Master, Origin], token: str) -> None:
    """The request reaches the origin, without the token."""
    master, origin = auth
    origin.reset()
    resp = get(master.port, "/private?x=1", [("Authorization", f"Bearer {token}")])
    assert resp.status == 200
    assert resp.json()["origin"] == "app"
    (seen,) = origin.requests
    assert seen.target == "/private?x=1"
    assert seen.header("Authorization") is None


# -- (b) routing by header and by path prefix ------------------------------------------------


@pytest.fixture(scope="module")
def router(module_fleet: Fleet) -> tuple[Master, dict[str, Origin]]:
    origins = {name: module_fleet.origin(name) for name in ("web", "beta", "api", "old")}
    options: dict[str, object] = {
        "default": origins["web"].address,
        "header": "X-Backend",
        "header_routes": {"beta": origins["beta"].address},
        "prefix_routes": {"/api/v1": origins["api"].address, "/api": origins["old"].address},
    }
    return recipe(module_fleet, "Router", options), origins


@pytest.mark.parametrize(
    ("target", "headers", "answered_by", "origin_saw"),
    [
        ("/api/v1/users?id=7", [], "api", "/users?id=7"),
        ("/api/v1", [], "api", "/"),
        ("/api/v1?q=1", [], "api", "/?q=1"),
        ("/api/v2/users", [], "old", "/v2/users"),
        ("/api/v1x", [], "old", "/v1x"),
        ("/index.html", [], "web", "/index.html"),
        ("/index.html", [("X-Backend", "beta")], "beta", "/index.html"),
        ("/api/v1/users", [("X-Backend", "beta")], "beta", "/api/v1/users"),
        ("/index.html", [("X-Backend", "gamma")], "web", "/index.html"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else "",
)
def test_router(
    router: tuple[Master, dict[str, Origin]],
    target: str,
    headers: list[tuple[str, str]],
    answered_by: str,
    origin_saw: str,
) -> None:
    """The header route wins; then the longest whole-segment prefix, which is taken off the
    path; then the default origin, with the path as sent."""
    master, origins = router
    for o in origins.values():
        o.reset()
    resp = get(master.port, target, headers)
    assert resp.status == 200
    assert resp.header("X-Origin") == answered_by
    assert origins[answered_by].paths() == [origin_saw]
    assert sum(len(o.requests) for o in origins.values()) == 1


# -- (c) a canary ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def canary_origins(module_fleet: Fleet) -> dict[str, Origin]:
    return {name: module_fleet.origin(name) for name in ("stable", "canary")}


def canary_master(fleet: Fleet, origins: dict[str, Origin], percent: int) -> Master:
    return recipe(
        fleet,
        "Canary",
        {
            "stable": origins["stable"].address,
            "canary": origins["canary"].address,
            "percent": percent,
        },
    )


def answered_by(master: Master, request_id: str) -> str:
    resp = get(master.port, "/release", [("X-Request-Id", request_id)])
    assert resp.status == 200
    origin = resp.header("X-Origin")
    assert resp.header("X-Canary") == ("yes" if origin == "canary" else "no")
    return str(origin)


@pytest.mark.parametrize(("percent", "side"), [(0, "stable"), (100, "canary")])
def test_canary_extremes(
    fleet: Fleet, canary_origins: dict[str, Origin], percent: int, side: str
) -> None:
    """0 sends nothing to the canary and 100 everything, whatever the request id."""
    master = canary_master(fleet, canary_origins, percent)
    for o in canary_origins.values():
        o.reset()
    assert {answered_by(master, f"req-{i}") for i in range(30)} == {side}
    assert get(master.port, "/no-id").header("X-Origin") == side
    assert len(canary_origins[side].requests) == 31


def test_canary_share_follows_the_request_id(
    fleet: Fleet, canary_origins: dict[str, Origin]
) -> None:
    """With 50 %, each request id goes where the recipe's hash puts it, the same way every
    time, whichever worker serves it; both sides get a part."""
    bucket = cookbook_module().canary_bucket
    master = canary_master(fleet, canary_origins, 50)
    ids = [f"req-{i}" for i in range(60)]
    seen = {i: answered_by(master, i) for i in ids}
    assert seen == {i: "canary" if bucket(i) < 50 else "stable" for i in ids}
    assert 10 < list(seen.values()).count("canary") < 50
    assert {i: answered_by(master, i) for i in ids[:20]} == {i: seen[i] for i in ids[:20]}


def test_canary_refuses_a_bad_percent(fleet: Fleet, canary_origins: dict[str, Origin]) -> None:
    """A wrong setting stops the start, with the key and the value in the log."""
    config = config_for(
        app="cookbook:Canary",
        app_options={
            "stable": canary_origins["stable"].address,
            "canary": canary_origins["canary"].address,
            "percent": 150,
        },
    )
    master = fleet.master(config, files={"cookbook.py": COOKBOOK}, start=False)
    assert master.spawn().wait(60) != 0
    assert "app_options.percent: expected 0 to 100, got 150" in master.logs()


# -- (d) adding response headers -------------------------------------------------------------


@pytest.fixture(scope="module")
def with_headers(module_fleet: Fleet) -> Master:
    origin = module_fleet.origin("plain")
    return recipe(
        module_fleet,
        "ResponseHeaders",
        {
            "origin": origin.address,
            "headers": {"Strict-Transport-Security": "max-age=63072000", "X-Origin": "hidden"},
        },
    )


@pytest.mark.parametrize("target", ["/page", "/status/404", "/chunked?parts=a,b"])
def test_response_headers_are_added(with_headers: Master, target: str) -> None:
    """Every origin response gets the fields; a field the origin set is replaced, once."""
    resp = get(with_headers.port, target)
    assert resp.status == (404 if "404" in target else 200)
    assert resp.header_all("Strict-Transport-Security") == ["max-age=63072000"]
    assert resp.header_all("X-Origin") == ["hidden"]


# -- (e) logging a field of your own ---------------------------------------------------------

# The test only needs to read the recipe's log lines: this app adds a file handler to its
# logger, as an app that wants its lines in a file of its own can.
CAPTURE = """
import logging

from cookbook import TenantLog


class App(TenantLog):
    def configure(self, config):
        super().configure(config)
        handler = logging.FileHandler(config.app_options["log_file"])
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        logger = logging.getLogger("myapp")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
"""


def test_tenant_log_line(fleet: Fleet, tmp_path: Path) -> None:
    """One line per request on the ``myapp`` logger, with the tenant from the request header,
    the status and the origin that answered."""
    origin = fleet.origin("shop")
    log_file = tmp_path / "myapp.log"
    master = recipe(
        fleet,
        "TenantLog",
        {"origin": origin.address, "log_file": str(log_file)},
        files={"capture.py": CAPTURE},
        app="capture:App",
    )
    assert get(master.port, "/orders?page=2", [("X-Tenant", "acme")]).status == 200
    assert get(master.port, "/status/503").status == 503

    def lines() -> list[str]:
        text = log_file.read_text() if log_file.exists() else ""
        return [line for line in text.splitlines() if line.startswith("myapp INFO ")]

    found = wait_for(lambda: len(lines()) >= 2 and lines(), what="two myapp log lines")
    up = re.escape(origin.address)
    assert any(
        re.fullmatch(
            rf"myapp INFO tenant=acme GET /orders\?page=2 status=200 "
            rf"upstream={up} ms=\d+\.\d",
            line,
        )
        for line in found
    ), found
    assert any(
        re.fullmatch(
            rf"myapp INFO tenant=- GET /status/503 status=503 "
            rf"upstream={up} ms=\d+\.\d",
            line,
        )
        for line in found
    ), found
