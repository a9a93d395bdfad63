"""shared.app: which phases an app overrides, and loading an app from MODULE:ATTRIBUTE."""

# The base class declares phases as plain def; apps here override some with async def.
# mypy: disable-error-code="override"

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared.app import (
    BUILTIN_APP,
    PHASES,
    AppLoadError,
    ProxyHttp,
    load_app,
    overridden_phases,
)
from shared.apps.load_balancer import LoadBalancer
from shared.errors import ErrorKind, ErrorSource, ProxyError, upstream_error
from shared.headers import ResponseHeader
from shared.peer import HttpPeer


class Minimal(ProxyHttp):
    """Overrides only the required phase."""

    def upstream_peer(self, session: Any, ctx: Any) -> HttpPeer:
        return HttpPeer("127.0.0.1:9000")


class Filters(Minimal):
    """Inherits upstream_peer, adds two phases (one async) and non-phase overrides."""

    def new_ctx(self) -> Any:
        return {}

    def configure(self, config: Any) -> None:
        super().configure(config)

    async def request_filter(self, session: Any, ctx: Any) -> bool:
        return False

    def response_filter(self, session: Any, upstream_response: ResponseHeader, ctx: Any) -> None:
        upstream_response.set("X-Proxy", "tenaya")


class AsyncPeer(ProxyHttp):
    """upstream_peer may be async."""

    async def upstream_peer(self, session: Any, ctx: Any) -> HttpPeer:
        return HttpPeer("127.0.0.1:9000")


class NoPeer(ProxyHttp):
    """Forgets upstream_peer."""

    def request_filter(self, session: Any, ctx: Any) -> bool:
        return True


# async def on the phases that must be plain def.


class AsyncUpstreamResponseFilter(Minimal):
    async def upstream_response_filter(self, s: Any, resp: Any, ctx: Any) -> None:
        pass


class AsyncResponseBodyFilter(Minimal):
    async def response_body_filter(self, s: Any, body: Any, eos: Any, ctx: Any) -> None:
        pass


class AsyncFailToConnect(Minimal):
    async def fail_to_connect(self, s: Any, peer: Any, error: Any, ctx: Any) -> Any:
        return error


class AsyncErrorWhileProxy(Minimal):
    async def error_while_proxy(self, s: Any, peer: Any, error: Any, ctx: Any) -> Any:
        return error


@dataclass
class Counted:
    """A typed per-request context."""

    chunks: int = 0


class TypedCtx(ProxyHttp[Counted]):
    """Declares its ctx type, as a typed app does (mypy then checks each phase's ``ctx``)."""

    def new_ctx(self) -> Counted:
        return Counted()

    def upstream_peer(self, session: Any, ctx: Counted) -> HttpPeer:
        return HttpPeer("127.0.0.1:9000")

    def request_body_filter(
        self, session: Any, body: bytes, end_of_stream: bool, ctx: Counted
    ) -> bytes | None:
        ctx.chunks += 1
        return None

    def logging(self, session: Any, error: ProxyError | None, ctx: Counted | None) -> None:
        if ctx is not None:
            ctx.chunks = -ctx.chunks


class BrokenInit(Minimal):
    def __init__(self) -> None:
        raise RuntimeError("GATEWAY_TOKEN is not set")


class NotAnApp:
    def upstream_peer(self, session: Any, ctx: Any) -> HttpPeer:
        return HttpPeer("127.0.0.1:9000")


INSTANCE = Minimal()
NOT_AN_APP_INSTANCE = NotAnApp()


def spec(attr: str) -> str:
    """The MODULE:ATTRIBUTE of an object of this test module."""
    return f"{__name__}:{attr}"


# -- overridden_phases -------------------------------------------------------------------


def test_overridden_phases_minimal() -> None:
    """An app overriding only upstream_peer has only that phase, bound to the app."""
    app = Minimal()
    phases = overridden_phases(app)
    assert list(phases) == ["upstream_peer"]
    assert str(phases["upstream_peer"](None, None)) == "127.0.0.1:9000"


def test_overridden_phases_ignores_non_phases_and_keeps_inherited() -> None:
    """Inherited overrides count; configure and new_ctx are not phases."""
    assert sorted(overridden_phases(Filters())) == [
        "request_filter",
        "response_filter",
        "upstream_peer",
    ]


def test_overridden_phases_of_base_is_empty() -> None:
    """The base class overrides nothing, so no phase of it would ever be called."""
    assert overridden_phases(ProxyHttp()) == {}


def test_every_phase_has_a_default() -> None:
    """Every phase the engine looks up exists on the base class."""
    assert all(callable(getattr(ProxyHttp, name)) for name in PHASES)


# -- load_app ----------------------------------------------------------------------------


def test_load_app_none_is_load_balancer() -> None:
    """No app in the config gives the built-in load balancer."""
    app = load_app(None)
    assert type(app) is LoadBalancer
    assert list(overridden_phases(app)) == ["upstream_peer"]


def test_load_app_none_is_the_builtin_app_by_name() -> None:
    """The built-in load balancer is loaded by name, as any app: the same as naming it."""
    assert BUILTIN_APP == "shared.apps.load_balancer:LoadBalancer"
    assert type(load_app(BUILTIN_APP)) is LoadBalancer


def test_app_with_a_typed_ctx() -> None:
    """An app generic in its ctx type loads and runs as any other: the type is for mypy."""
    app = load_app(spec("TypedCtx"))
    assert isinstance(app, TypedCtx)
    assert sorted(overridden_phases(app)) == ["logging", "request_body_filter", "upstream_peer"]
    ctx = app.new_ctx()
    app.request_body_filter(None, b"x", False, ctx)
    app.logging(None, None, ctx)
    app.logging(None, None, None)
    assert ctx == Counted(chunks=-1)


def test_load_app_builds_a_class() -> None:
    """A class is instantiated."""
    app = load_app(spec("Filters"))
    assert type(app) is Filters


def test_load_app_takes_an_instance_as_is() -> None:
    """An instance is used as it is."""
    assert load_app(spec("INSTANCE")) is INSTANCE


def test_load_app_allows_async_where_allowed() -> None:
    """async def is accepted on phases that may be async."""
    assert type(load_app(spec("AsyncPeer"))) is AsyncPeer


def test_load_app_module_missing() -> None:
    """A module that cannot be imported is named, with the import error."""
    with pytest.raises(AppLoadError) as info:
        load_app("tenaya_no_such_module:App")
    assert str(info.value) == (
        "cannot import 'tenaya_no_such_module': ModuleNotFoundError: "
        "No module named 'tenaya_no_such_module'"
    )


def test_load_app_module_fails_on_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module that raises while imported is named, with the exception it raised."""
    (tmp_path / "tenaya_broken_gateway.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AppLoadError) as info:
        load_app("tenaya_broken_gateway:Gateway")
    assert str(info.value) == (
        "cannot import 'tenaya_broken_gateway': RuntimeError: boom at import"
    )


def test_load_app_attribute_missing() -> None:
    """A missing attribute is named with its module."""
    with pytest.raises(AppLoadError) as info:
        load_app(spec("Missing"))
    assert str(info.value) == f"module {__name__!r} has no attribute 'Missing'"


def test_load_app_class_not_a_proxyhttp() -> None:
    """A class that does not derive from ProxyHttp is refused, even with upstream_peer."""
    with pytest.raises(AppLoadError) as info:
        load_app(spec("NotAnApp"))
    assert str(info.value) == f"{spec('NotAnApp')} is not a subclass of shared.app.ProxyHttp"


def test_load_app_instance_not_a_proxyhttp() -> None:
    """An object that is not a ProxyHttp is refused."""
    with pytest.raises(AppLoadError) as info:
        load_app(spec("NOT_AN_APP_INSTANCE"))
    assert str(info.value) == (
        f"{spec('NOT_AN_APP_INSTANCE')} is not a ProxyHttp subclass or instance"
    )


def test_load_app_constructor_fails() -> None:
    """A class whose constructor raises is refused with the exception."""
    with pytest.raises(AppLoadError) as info:
        load_app(spec("BrokenInit"))
    assert str(info.value) == (
        f"building {spec('BrokenInit')} failed: RuntimeError: GATEWAY_TOKEN is not set"
    )


def test_load_app_without_upstream_peer() -> None:
    """An app that does not choose an upstream is refused."""
    with pytest.raises(AppLoadError) as info:
        load_app(spec("NoPeer"))
    assert str(info.value) == f"{spec('NoPeer')} does not override upstream_peer"


@pytest.mark.parametrize(
    ("attr", "phase"),
    [
        ("AsyncUpstreamResponseFilter", "upstream_response_filter"),
        ("AsyncResponseBodyFilter", "response_body_filter"),
        ("AsyncFailToConnect", "fail_to_connect"),
        ("AsyncErrorWhileProxy", "error_while_proxy"),
    ],
)
def test_load_app_async_on_sync_phase(attr: str, phase: str) -> None:
    """async def on a phase that is called synchronously is refused, naming the phase."""
    with pytest.raises(AppLoadError) as info:
        load_app(spec(attr))
    assert str(info.value) == f"{spec(attr)}.{phase} must be a plain def, not async def"


def test_sync_only_phases_are_the_tested_ones() -> None:
    """The phases that must be sync are exactly the four tested above."""
    assert sorted(n for n, may_be_async in PHASES.items() if not may_be_async) == [
        "error_while_proxy",
        "fail_to_connect",
        "response_body_filter",
        "upstream_response_filter",
    ]


# -- default phases ----------------------------------------------------------------------


class FakeSession:
    """Records what the default fail_to_proxy writes."""

    def __init__(self, response_started: bool = False) -> None:
        self.response_started = response_started
        self.responses: list[tuple[int, bytes]] = []

    def respond(self, status: int, headers: Any = None, body: bytes = b"") -> None:
        self.responses.append((status, body))


def test_default_fail_to_proxy_writes_status_page() -> None:
    """The default error response is the error's status with a one-line text."""
    session = FakeSession()
    status = ProxyHttp().fail_to_proxy(session, upstream_error(ErrorKind.CONNECT_TIMEOUT), None)  # type: ignore[arg-type]
    assert status == 504
    assert session.responses == [(504, b"504 connect timeout\n")]


def test_default_fail_to_proxy_after_response_started() -> None:
    """Once the response has started, the default writes nothing but still gives the status."""
    session = FakeSession(response_started=True)
    status = ProxyHttp().fail_to_proxy(session, upstream_error(ErrorKind.READ_TIMEOUT), None)  # type: ignore[arg-type]
    assert status == 504
    assert session.responses == []


@pytest.mark.parametrize(
    ("error", "status", "page"),
    [
        (ProxyError.http_status(403, "no token"), 403, b"403 forbidden\n"),
        (ProxyError.http_status(429), 429, b"429 too many requests\n"),
        (ProxyError.http_status(599), 599, b"599 http status\n"),
        (
            ProxyError(ErrorKind.NO_PEER, ErrorSource.UPSTREAM, status=503),
            503,
            b"503 no upstream peer\n",
        ),
    ],
    ids=["403", "429", "no_reason", "override"],
)
def test_default_fail_to_proxy_of_a_chosen_status(
    error: ProxyError, status: int, page: bytes
) -> None:
    """An error of a status the app chose gets that status, and its reason as the text."""
    session = FakeSession()
    assert ProxyHttp().fail_to_proxy(session, error, None) == status  # type: ignore[arg-type]
    assert session.responses == [(status, page)]
