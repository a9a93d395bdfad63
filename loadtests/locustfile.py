r"""Locust scenario against a running Tenaya: ``scripts/bench locust [ARGS]``.

Each simulated user sends a weighted mix of requests through the proxy: plain ``GET /``, a
``GET`` with a query string, and a ``POST`` with a small body. Every response's status code is
checked; an unexpected one (or a transport error) is recorded as a failure with the reason, so
Locust's failure count and its "fail/s" show errors instead of adding them to the throughput.

``scripts/bench locust`` installs the bench extras (Locust) and runs this file headless with
its defaults (50 users, 10 spawned a second, 30 seconds); ARGS go to Locust and override them.
By hand: ``pip install -e '.[bench]'``, then ``locust -f loadtests/locustfile.py --headless
-u 50 -r 10 -t 30s``. The expected status codes can be changed with ``--expect-get`` and
``--expect-post`` (comma-separated), e.g. for an origin that answers a POST with 201.

Environment:

``TENAYA_HOST``
    The base URL to load, used when ``--host`` is not given (``--host`` wins). Without either,
    the embedded default config's load balancer, ``http://127.0.0.1:6188``.
``TENAYA_HEADERS``
    Request header fields sent with every request, one ``Name: value`` per line, e.g.
    ``TENAYA_HEADERS=$'Authorization: Bearer abc\nX-Api-Key: k'`` in bash. Lines are the
    only separator, since values may hold ``;`` and ``,`` (cookies, media types); blank lines
    are skipped and the value is stripped of surrounding blanks. A line without a ``:``, with
    an empty or blank-holding name, is an error that stops Locust before its first request.
"""

from __future__ import annotations

import os
import random
import string
from typing import Any

from locust import FastHttpUser, between, events, task
from locust.argument_parser import LocustArgumentParser

#: Weights of the tasks: mostly plain GETs, some with a query, a few small POSTs.
WEIGHT_GET_ROOT = 6
WEIGHT_GET_QUERY = 3
WEIGHT_POST_SMALL = 1
#: Think time of a user between two requests, in seconds (min, max).
WAIT_MIN_SECONDS = 0.0
WAIT_MAX_SECONDS = 0.05
#: Size of the POST body and of the random query value, in characters.
POST_BODY_BYTES = 256
QUERY_VALUE_CHARS = 12
#: Status codes counted as success when not set on the command line.
DEFAULT_EXPECT_GET = "200"
DEFAULT_EXPECT_POST = "200,201,204"
#: How much of an unexpected response body a failure message quotes.
FAILURE_BODY_CHARS = 200
#: Environment variables: the base URL when ``--host`` is not given, and the extra headers.
HOST_ENV = "TENAYA_HOST"
HEADERS_ENV = "TENAYA_HEADERS"
#: The load balancer of the embedded default config (``scripts/start`` with no config).
DEFAULT_HOST = "http://127.0.0.1:6188"


def parse_headers(text: str) -> dict[str, str]:
    """Parse ``TENAYA_HEADERS``: one ``Name: value`` per line, blank lines skipped.

    Returns the fields in their order (a later line with the same name, in any case, replaces
    the earlier). Raises ``ValueError`` naming the line when it has no ``:``, or a name that is
    empty or holds blanks.
    """
    headers: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not name or any(c.isspace() for c in name):
            raise ValueError(f"{HEADERS_ENV} line {number} is not 'Name: value': {line!r}")
        for known in [k for k in headers if k.lower() == name.lower()]:
            del headers[known]
        headers[name] = value.strip()
    return headers


def _add_arguments(parser: LocustArgumentParser) -> None:
    """Add the expected status codes to Locust's command line (also settable in its web UI)."""
    parser.add_argument(
        "--expect-get",
        default=DEFAULT_EXPECT_GET,
        help="comma-separated status codes a GET must return",
    )
    parser.add_argument(
        "--expect-post",
        default=DEFAULT_EXPECT_POST,
        help="comma-separated status codes a POST must return",
    )


events.init_command_line_parser.add_listener(_add_arguments)


def _codes(text: str) -> frozenset[int]:
    """Parse a comma-separated list of status codes such as ``"200,204"``."""
    return frozenset(int(part) for part in text.split(",") if part.strip())


class ProxyUser(FastHttpUser):
    """One client of the proxy, checking every answer it gets."""

    wait_time = between(WAIT_MIN_SECONDS, WAIT_MAX_SECONDS)
    #: Locust's ``--host`` replaces this when given.
    host = os.environ.get(HOST_ENV) or DEFAULT_HOST
    #: Sent with every request, merged under the headers a task gives.
    default_headers = parse_headers(os.environ.get(HEADERS_ENV, ""))

    def on_start(self) -> None:
        """Read the expected status codes once per user (runs before the first task)."""
        options = self.environment.parsed_options
        self.expect_get = _codes(getattr(options, "expect_get", DEFAULT_EXPECT_GET))
        self.expect_post = _codes(getattr(options, "expect_post", DEFAULT_EXPECT_POST))

    def _check(self, response: Any, expected: frozenset[int]) -> None:
        """Mark the response as a success if its status is expected, else as a failure.

        A transport error (connection refused or reset, timeout) has status 0 and an ``error``;
        it fails with that error as the reason.
        """
        if response.status_code in expected:
            response.success()
        elif response.status_code == 0:
            response.failure(f"transport error: {getattr(response, 'error', None)!r}")
        else:
            body = (response.text or "")[:FAILURE_BODY_CHARS]
            response.failure(
                f"status {response.status_code}, expected {sorted(expected)}: {body!r}"
            )

    @task(WEIGHT_GET_ROOT)
    def get_root(self) -> None:
        """GET / through the proxy."""
        with self.client.get("/", catch_response=True) as response:
            self._check(response, self.expect_get)

    @task(WEIGHT_GET_QUERY)
    def get_with_query(self) -> None:
        """GET with a query string (named as one entry in the statistics)."""
        value = "".join(random.choices(string.ascii_lowercase, k=QUERY_VALUE_CHARS))
        with self.client.get(
            f"/search?q={value}&page=1", name="/search?q=[value]", catch_response=True
        ) as response:
            self._check(response, self.expect_get)

    @task(WEIGHT_POST_SMALL)
    def post_small(self) -> None:
        """POST a small form body through the proxy."""
        body = "data=" + "x" * (POST_BODY_BYTES - len("data="))
        with self.client.post(
            "/submit",
            data=body,
            catch_response=True,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ) as response:
            self._check(response, self.expect_post)
