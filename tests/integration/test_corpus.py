"""The request corpus (tests/requests/): raw requests, valid and invalid, sent through the real
master to a real origin; each must get the expected statuses, leave the connection open or
closed as expected, and deliver to the origin exactly what its expectation says.

Each case's bytes follow a good request on the same connection, answered first: its worker
then holds a pooled upstream connection, on which a request head goes out as soon as the
engine starts, so a refusal that came too late shows as a request at the origin. A case whose
``upstream`` is ``[]`` must leave nothing there, not even a head: once it is answered, a marker
request on a new connection must reach the origin, which by then has read what came before it,
and the origin must have seen nothing else.

The files' format is described in tests/requests/README.md.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from tests.support.client import HttpConn, get
from tests.support.config import config_for
from tests.support.master import Master
from tests.support.origin import Origin, RecordedRequest
from tests.support.waits import wait_for

if TYPE_CHECKING:
    from tests.conftest import Fleet

CORPUS = Path(__file__).resolve().parent.parent / "requests"
MAX_BODY = 1_000_000
#: The target of the request each case follows.
WARM = "/corpus-warm"
#: The target of the request that follows a refused case.
MARKER = "/corpus-marker"


def load_request(path: Path) -> bytes:
    """The bytes of a ``.http`` file: real line breaks dropped, escapes decoded."""
    raw = path.read_bytes().replace(b"\r", b"").replace(b"\n", b"")
    return bytes(codecs.escape_decode(raw)[0])


def cases() -> list[str]:
    names = sorted(p.stem for p in CORPUS.glob("*.http"))
    missing = [n for n in names if not (CORPUS / f"{n}.yaml").exists()]
    assert not missing, f"requests without an expectation: {missing}"
    return names


@dataclass
class Env:
    master: Master
    origin: Origin


@pytest.fixture(scope="module")
def env(module_fleet: Fleet) -> Env:
    origin = module_fleet.origin("corpus")
    config = config_for(upstreams={"corpus": [origin.address]}, limits={"max_body_bytes": MAX_BODY})
    return Env(module_fleet.master(config), origin)


def check_upstream(got: RecordedRequest, want: dict[str, Any]) -> None:
    assert got.method == want["method"]
    assert got.target == want["target"]
    if "body" in want:
        assert got.body == str(want["body"]).encode("latin-1")
    if "framing" in want:
        assert got.framing == want["framing"]
    for name, value in (want.get("headers") or {}).items():
        assert got.header(name) == str(value), f"{name}: {got.headers}"
    for name, values in (want.get("all") or {}).items():
        assert got.header_all(name) == [str(v) for v in values], f"{name}: {got.headers}"
    for name in want.get("absent") or []:
        assert got.header(name) is None, f"{name} reached the origin: {got.headers}"


def test_corpus_is_not_empty() -> None:
    """The corpus holds both valid and invalid requests."""
    expectations = [yaml.safe_load((CORPUS / f"{n}.yaml").read_text()) for n in cases()]
    assert sum(1 for e in expectations if e["upstream"]) >= 10
    assert sum(1 for e in expectations if not e["upstream"]) >= 10
    assert all(e.get("about") for e in expectations)


@pytest.mark.parametrize("name", cases())
def test_request(env: Env, name: str) -> None:
    """One corpus request: statuses, connection state and what the origin got."""
    data = load_request(CORPUS / f"{name}.http")
    want = yaml.safe_load((CORPUS / f"{name}.yaml").read_text())
    env.origin.reset()
    with HttpConn(env.master.port) as conn:
        warm = conn.request("GET", WARM, [("Host", "corpus.test")])
        assert warm.status == 200
        conn.send(data)
        for i, expected in enumerate(want["responses"]):
            resp = conn.read_response()
            allowed = expected if isinstance(expected, list) else [expected]
            assert resp.status in allowed, f"response {i}: {resp.status} {resp.body[:200]!r}"
        if want.get("closed") is True:
            assert conn.closed_by_peer(), "the connection was left open"
        elif want.get("closed") is False:
            again = conn.request("GET", "/still-open", [("Host", "corpus.test")])
            assert again.status == 200
    upstream = want["upstream"]
    if not upstream:
        assert get(env.master.port, MARKER, [("Host", "corpus.test")]).status == 200
        wait_for(lambda: MARKER in env.origin.paths(), what="the marker at the origin")
    seen = [r for r in env.origin.requests if r.target not in (WARM, MARKER)]
    if not upstream:
        assert not seen, f"a refused request reached the origin: {[r.target for r in seen]}"
    # A request the proxy refused while streaming it may have reached the origin in part;
    # only complete ones count.
    got = [r for r in seen if r.complete]
    if want.get("closed") is False:
        assert got[-1].target == "/still-open"
        got = got[:-1]
    assert len(got) == len(upstream), [r.target for r in got]
    for g, w in zip(got, upstream, strict=True):
        check_upstream(g, w)
