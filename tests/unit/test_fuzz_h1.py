"""Fuzzing the HTTP/1.1 request path: H1Server on a fake transport, a real Engine, a recording
origin (tests/fuzz_targets.py), fed mutated corpus requests, built requests and pipelines, cut
into reads at random points.

Each input must pass :func:`fuzz_targets.check`: nothing escapes, nothing hangs, the client
gets well-formed responses, the upstream gets only requests the proxy accepted, parsed the same
way and stripped of hop-by-hop fields, and a request answered 4xx never reaches the upstream
whole (nor, when it came in one read, in part). Inputs that show only bugs listed in
``fuzz_targets.KNOWN_BUGS`` are skipped (none are listed now); the inputs that showed bugs
before they were fixed are kept in ``FOUND`` and checked with nothing tolerated.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz_strategies import H1_TOKENS, fuzz_settings, h1_requests, mutated, reads, verdict
from tests.fuzz_targets import CORPUS as CORPUS_DIR
from tests.fuzz_targets import check, corpus, h2_transcripts, load_request, run_connection

SEEDS = corpus()
#: HTTP/1.1 seeds and a few h2c conversations (the preface switches the protocol).
SEEDS_AND_H2C = SEEDS + h2_transcripts()[:2]
GET = load_request(CORPUS_DIR / "get_simple.http")
BAD_CHUNK = load_request(CORPUS_DIR / "bad_chunk_size.http")
#: Inputs that showed a bug in the HTTP/1.1 path (all fixed since), kept as regression cases:
#: the reads, and how many idle upstream connections the pool holds.
FOUND: dict[str, tuple[list[bytes], int]] = {
    # HTTP/0.9 (no version) was proxied as HTTP/1.1.
    "http09": ([b"GET /x\r\n\r\n"], 1),
    # 'Connection: host' dropped Host from the upstream request.
    "connection-host": ([b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: host\r\n\r\n"], 1),
    # No Host (400 at once), then an invalid transfer coding in the same read: answered twice,
    # counted active for good.
    "answered-twice": ([b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"], 0),
    # The head went upstream from on_headers_complete before the bad chunk after it was seen.
    "bad-chunk-pooled": ([BAD_CHUNK], 1),
    # ... and on a new connection, once it was made, though the body had already failed.
    "bad-chunk-connect": ([BAD_CHUNK], 0),
    # A request line with the method PRI but not the preface went upstream.
    "pri": ([b"PRI *oHTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x06\x04\x00\x00\x00\x00\x00"], 1),
}


@pytest.mark.parametrize("warm", [0, 1])
@pytest.mark.parametrize("name", sorted(p.stem for p in CORPUS_DIR.glob("*.http")))
def test_corpus_byte_at_a_time(name: str, warm: int) -> None:
    """Every corpus request, whole and a byte per read, with the pool empty and warm."""
    data = load_request(CORPUS_DIR / f"{name}.http")
    check(run_connection([data], warm=warm, strict=True))
    check(run_connection([data[i : i + 1] for i in range(len(data))], warm=warm))


@fuzz_settings(800)
@given(data=st.data(), warm=st.integers(0, 2), timeout=st.booleans())
def test_mutated_corpus(data: st.DataObject, warm: int, timeout: bool) -> None:
    """Corpus requests (and h2c conversations) with mutations, cut into random reads."""
    raw = data.draw(mutated(SEEDS_AND_H2C, H1_TOKENS), label="bytes")
    chunks = data.draw(reads(raw), label="reads")
    verdict(run_connection(chunks, warm=warm, timeout=timeout, strict=len(chunks) == 1))


@fuzz_settings(600)
@given(data=st.data(), warm=st.integers(0, 2))
def test_pipelines(data: st.DataObject, warm: int) -> None:
    """One to four requests, built or from the corpus, maybe mutated, sent back to back."""
    parts = data.draw(
        st.lists(
            st.one_of(h1_requests(), mutated(SEEDS, H1_TOKENS, most=2)), min_size=1, max_size=4
        ),
        label="requests",
    )
    chunks = data.draw(reads(b"".join(parts)), label="reads")
    verdict(run_connection(chunks, warm=warm, strict=len(chunks) == 1))


@fuzz_settings(300)
@given(raw=mutated(SEEDS, H1_TOKENS, most=3), warm=st.integers(0, 2))
def test_anything_after_a_request(raw: bytes, warm: int) -> None:
    """A valid request, then anything in a read of its own: the first is answered, the rest
    served or refused."""
    verdict(run_connection([GET, raw], warm=warm))


@pytest.mark.parametrize("warm", [1, 0], ids=["pooled", "connect"])
@fuzz_settings(300)
@given(raw=st.one_of(h1_requests(), mutated(SEEDS, H1_TOKENS, most=2)))
@example(raw=BAD_CHUNK)
def test_rejected_request_sends_nothing_upstream(raw: bytes, warm: int) -> None:
    """Strict: a request that came whole in one read and got a 4xx wrote not one byte
    upstream, with a pooled connection ready or a new one to make."""
    verdict(run_connection([raw], warm=warm, strict=True))


@pytest.mark.parametrize("name", sorted(FOUND))
def test_found(name: str) -> None:
    """Inputs that once showed a bug, each checked with no bug tolerated."""
    chunks, warm = FOUND[name]
    for strict in (True, False):
        check(run_connection(chunks, warm=warm, strict=strict), tolerate=())
