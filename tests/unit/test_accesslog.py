"""worker.accesslog: combined and json lines for finished requests, buffered writes."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from shared.errors import ErrorKind, upstream_error
from shared.peer import HttpPeer
from shared.session import Session
from worker.accesslog import AccessLog

#: nginx's $time_local: 24/Nov/2026:21:42:50 +0000
TIME_LOCAL = r"\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}"


class FakeConn:
    """The downstream connection a session arrived on: just its addresses."""

    client_addr = ("203.0.113.7", 51234)
    server_addr = ("127.0.0.1", 6188)


def finished(**changes: Any) -> Session:
    """A session as the engine leaves it after proxying a GET that took 0.25 s."""
    s = Session(FakeConn())  # type: ignore[arg-type]
    s.method = b"GET"
    s.url = b"/search?q=tenaya"
    s.version = "1.1"
    s.raw_headers = [
        (b"Host", b"example.com"),
        (b"User-Agent", b"curl/8.5.0"),
        (b"Referer", b"https://ref.example/page"),
        (b"X-Request-Id", b"abc-123"),
    ]
    s.status = 200
    s.resp_bytes = 1234
    s.peer = HttpPeer("10.0.0.1:8080")
    s.start_time = time.time() - 0.25
    for name, value in changes.items():
        setattr(s, name, value)
    return s


def lines(log: AccessLog, path: Path, *sessions: Session) -> list[str]:
    """Writes the sessions, flushes, and returns the file's lines."""
    for s in sessions:
        log.write(s)
    log.flush()
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_combined_line(tmp_path: Path) -> None:
    """A combined line is nginx's combined format, then the upstream and the request time."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "combined")
    (line,) = lines(log, path, finished())
    log.close()
    m = re.fullmatch(
        r"203\.0\.113\.7 - - \[(" + TIME_LOCAL + r')\] "GET /search\?q=tenaya HTTP/1\.1" 200 1234 '
        r'"https://ref\.example/page" "curl/8\.5\.0" 10\.0\.0\.1:8080 (\d+\.\d{3})\n',
        line,
    )
    assert m is not None, line
    logged = datetime.strptime(m.group(1), "%d/%b/%Y:%H:%M:%S %z").timestamp()
    assert abs(logged - time.time()) < 5
    assert 0.25 <= float(m.group(2)) < 5


def test_combined_line_missing_values(tmp_path: Path) -> None:
    """Absent referer, user agent and upstream are written as "-"; an error gives the status."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    s = finished(
        raw_headers=[(b"Host", b"example.com")],
        peer=None,
        status=0,
        resp_bytes=0,
        error=upstream_error(ErrorKind.CONNECT_REFUSED),
    )
    (line,) = lines(log, path, s)
    log.close()
    assert re.fullmatch(
        r"203\.0\.113\.7 - - \[" + TIME_LOCAL + r'\] "GET /search\?q=tenaya HTTP/1\.1" 502 0 '
        r'"-" "-" - \d+\.\d{3}\n',
        line,
    ), line


def test_combined_line_escapes_quotes(tmp_path: Path) -> None:
    """Quotes and backslashes in the request and headers are escaped, so fields stay parseable."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    s = finished(url=b'/a"b\\c', raw_headers=[(b"user-agent", b'evil" 200 1 "x')])
    (line,) = lines(log, path, s)
    log.close()
    assert '"GET /a\\"b\\\\c HTTP/1.1" 200 1234 "-" "evil\\" 200 1 \\"x" 10.0.0.1:8080' in line


def test_json_line(tmp_path: Path) -> None:
    """A json line is one object with the request, response, upstream and timing."""
    path = tmp_path / "access.json"
    log = AccessLog(str(path), "json")
    before = time.time()
    (line,) = lines(log, path, finished())
    log.close()
    assert line.endswith("}\n")
    record = json.loads(line)
    assert before <= record.pop("time") <= time.time()
    assert 0.25 <= record.pop("request_time") < 5
    assert record == {
        "client": "203.0.113.7",
        "method": "GET",
        "url": "/search?q=tenaya",
        "version": "1.1",
        "status": 200,
        "bytes": 1234,
        "referer": "https://ref.example/page",
        "user_agent": "curl/8.5.0",
        "upstream": "10.0.0.1:8080",
        "error": None,
        "request_id": "abc-123",
    }


def test_json_line_with_error(tmp_path: Path) -> None:
    """A failed request logs the error's status and its description."""
    path = tmp_path / "access.json"
    log = AccessLog(str(path), "json")
    s = finished(
        status=0,
        peer=None,
        start_time=0.0,
        error=upstream_error(ErrorKind.READ_TIMEOUT, "no response in 60s"),
    )
    (line,) = lines(log, path, s)
    log.close()
    record = json.loads(line)
    assert (record["status"], record["upstream"], record["request_time"]) == (504, "-", 0.0)
    assert record["error"] == "upstream error: read timeout: no response in 60s"


def test_non_ascii_request_bytes(tmp_path: Path) -> None:
    """Request bytes that are not ASCII are logged as their Latin-1 characters, in UTF-8."""
    path = tmp_path / "access.json"
    log = AccessLog(str(path), "json")
    (line,) = lines(log, path, finished(url=b"/caf\xe9"))
    log.close()
    assert json.loads(line)["url"] == "/caf\u00e9"


def test_lines_are_buffered_until_flush(tmp_path: Path) -> None:
    """Lines are kept in memory until flush(), then written in order."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write(finished(url=b"/one"))
    log.write(finished(url=b"/two"))
    assert path.read_bytes() == b""
    log.flush()
    text = path.read_text()
    assert text.count("\n") == 2
    assert text.index("/one") < text.index("/two")
    log.close()


def test_close_flushes(tmp_path: Path) -> None:
    """close() writes what is still buffered."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write(finished())
    log.close()
    assert path.read_text().count("\n") == 1


def test_appends_to_existing_file(tmp_path: Path) -> None:
    """A log file is appended to, never truncated."""
    path = tmp_path / "access.log"
    path.write_text("earlier line\n")
    log = AccessLog(str(path))
    lines(log, path, finished())
    log.close()
    assert path.read_text().startswith("earlier line\n203.0.113.7 ")


def test_reopen_after_rotation(tmp_path: Path) -> None:
    """After the file is renamed (logrotate), reopen() writes to a new file at the path."""
    path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    log = AccessLog(str(path))
    log.write(finished(url=b"/before"))
    log.flush()
    path.rename(rotated)
    log.write(finished(url=b"/pending"))
    log.reopen()
    log.write(finished(url=b"/after"))
    log.close()
    assert "/before" in rotated.read_text()
    assert "/pending" in rotated.read_text()
    assert "/after" in path.read_text()
    assert "/before" not in path.read_text()
