"""The configuration: every setting declared once, with its type, default, doc and check.

The YAML file, the error messages and the reference in the README (``python -m master
config-reference``) all come from the declarations below. :func:`load` refuses a config with a
:class:`ConfigError` listing every mistake found in one pass, each with the file, the key path
and the reason, in the order of the keys in the file; an unknown key is an error, with the
closest known key as a suggestion. A mistake that makes the checks under it meaningless (YAML
that does not parse, a section that is not a mapping) hides only those checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from shared import privileges
from shared.address import parse_address


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One mistake in a config: ``str(problem)`` is ``"FILE: KEY.PATH: reason"``, or
    ``"FILE: reason"`` for a mistake of the whole file (``path`` empty)."""

    source: str
    path: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}: {self.path}" if self.path else self.source
        return f"{where}: {self.reason}"


class ConfigError(Exception):
    """An invalid config. :attr:`errors` holds every mistake found, in file order (at least
    one); ``str(error)`` is one line ``"FILE: KEY.PATH: reason"`` per mistake. :attr:`source`,
    :attr:`path` and :attr:`reason` are those of the first mistake."""

    def __init__(
        self, source: str, path: str, reason: str, more: Sequence[ConfigProblem] = ()
    ) -> None:
        super().__init__(source, path, reason)
        self.source = source
        self.path = path
        self.reason = reason
        self.errors: list[ConfigProblem] = [ConfigProblem(source, path, reason), *more]

    @classmethod
    def of(cls, problems: Sequence[ConfigProblem]) -> ConfigError:
        """The error of one or more problems, the first one first."""
        first, *more = problems
        return cls(first.source, first.path, first.reason, more)

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.errors)


Check = Callable[[Any], str | None]


def setting(default: Any, doc: str, check: Check | None = None, each: Check | None = None) -> Any:
    """Declares one setting: its default, its documentation and optional extra checks, each a
    function returning a reason when the value is refused: ``check`` of the whole value,
    ``each`` of every item of a list (each refused item is a mistake of its own)."""
    metadata = {"doc": doc, "check": check, "each": each}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _not_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def _address(v: Any) -> str | None:
    try:
        parse_address(v)
    except ValueError as e:
        return str(e)
    return None


def _user(v: Any) -> str | None:
    try:
        privileges.user_entry(v)
    except LookupError as e:
        return str(e)
    return None


def _group(v: Any) -> str | None:
    try:
        privileges.group_id(v)
    except LookupError as e:
        return str(e)
    return None


def _app(v: Any) -> str | None:
    if v is None:
        return None
    module, _, attr = v.partition(":")
    if not module or not attr:
        return "expected MODULE:ATTRIBUTE, for example mypackage.gateway:MyGateway"
    return None


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"expected one of {', '.join(choices)}"

    return check


@dataclass(frozen=True, slots=True)
class ServerConfig:
    workers: int = setting(0, "Worker processes; 0 means one per CPU.", _not_negative)
    pid_file: str | None = setting(None, "Where the master writes its pid; none when unset.")
    grace_period_seconds: float = setting(
        30.0, "On a graceful stop, longest wait for in-flight requests to finish.", _not_negative
    )
    max_retries: int = setting(
        3,
        "How many times a retryable failure (e.g. connect refused) picks a peer again.",
        _not_negative,
    )
    worker_timeout_seconds: float = setting(
        30.0, "A worker silent for this long (no heartbeat) is killed and replaced.", _positive
    )
    control_socket: str | None = setting(
        None,
        "Unix-domain socket of the master's control commands (mode 0600, owned by the "
        "master's user); none when unset.",
    )
    max_connections: int = setting(
        10000,
        "Most client connections one worker keeps open (an HTTP/2 connection counts "
        "once). At the limit the worker stops accepting: new connections wait in the "
        "listening socket's queue (they are not refused) until it is about 5% below. 0 means "
        "no limit.",
        _not_negative,
    )
    user: str | int | None = setting(
        None,
        "User the workers run as, a name or a numeric id: the master binds the "
        "listeners and stays as it is; each worker opens its logs and reads its TLS files, "
        "then switches to this user before it loads the app. Needs a master started as root "
        "(otherwise ignored, with a warning). Unset: the master's user.",
        _user,
    )
    group: str | int | None = setting(
        None,
        "Group the workers run as, a name or a numeric id; unset: the primary group "
        "of server.user. The supplementary groups are server.user's.",
        _group,
    )


@dataclass(frozen=True, slots=True)
class CertConfig:
    cert: str = setting("", "PEM certificate chain (a path, relative to the config file).")
    key: str = setting("", "PEM private key of that certificate.")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: str = setting(
        "",
        "PEM certificate chain of the default certificate (used when the "
        "client sends no SNI or an unknown name).",
    )
    key: str = setting("", "PEM private key of the default certificate.")
    certificates: list[CertConfig] = setting(
        [], "More certificates, each chosen by SNI for the DNS names in its subjectAltName."
    )
    client_ca: str | None = setting(
        None, "PEM CA bundle: when set, clients must present a certificate it signed (mTLS)."
    )
    min_version: str = setting("1.2", "Oldest TLS version accepted.", _one_of("1.2", "1.3"))
    ciphers: str | None = setting(
        None,
        "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's); unset: "
        "ECDHE with AES-GCM or ChaCha20 only.",
    )


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    address: str = setting(
        "127.0.0.1:6188", "HOST:PORT to listen on ([::1]:PORT for IPv6).", _address
    )
    backlog: int = setting(2048, "Length of each socket's accept queue.", _positive)
    tls: TlsConfig | None = setting(None, "Terminate TLS on this listener (see tls.*).")


#: The values of ``upstreams.<name>.balance``, the default first (``shared.lb`` builds a selector
#: for each; a unit test keeps the two lists the same).
BALANCE_CHOICES = ("round_robin", "random", "least_conn", "hash")
#: The forms of ``upstreams.<name>.hash_key`` (``shared.lb.keys`` makes each a function).
HASH_KEY_FORMS = ("header:NAME", "cookie:NAME", "query:NAME", "path", "client_ip")


def _hash_key(v: Any) -> str | None:
    kind, colon, name = v.partition(":")
    if not colon:
        return (
            None if v in ("path", "client_ip") else f"expected one of {', '.join(HASH_KEY_FORMS)}"
        )
    if kind not in ("header", "cookie", "query"):
        return f"expected one of {', '.join(HASH_KEY_FORMS)}"
    if not name or not name.isascii() or any(c in name for c in " \t;=&?"):
        return f"{kind}: needs a name (for example {kind}:X-User)"
    return None


def _status_to_retry(v: Any) -> str | None:
    return None if 400 <= v <= 599 else "expected an HTTP status from 400 to 599"


def _percent(v: Any) -> str | None:
    return None if 0 <= v <= 100 else "must be from 0 to 100"


def _url_path(v: Any) -> str | None:
    return None if v.startswith("/") else "must start with /"


class Server(str):
    """One item of ``upstreams.<name>.servers``: the server's ``HOST:PORT`` as a string (what
    the item was before weights existed, so an app reading ``servers[0]`` gets the address),
    with its :attr:`weight` and :attr:`backup` flag. Equal to a plain string of its address
    when its weight is 1 and it is not a backup."""

    weight: int
    """Its share of the upstream's requests (round robin, random, least_conn, hash), at least 1."""
    backup: bool
    """True: takes requests only while no other server of the upstream is usable."""

    def __new__(cls, address: str, weight: int = 1, backup: bool = False) -> Server:
        server = super().__new__(cls, address)
        server.weight = weight
        server.backup = backup
        return server

    @property
    def address(self) -> str:
        """The ``HOST:PORT`` as a plain string."""
        return str.__str__(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Server):
            return str.__eq__(self, other) and (self.weight, self.backup) == (
                other.weight,
                other.backup,
            )
        if isinstance(other, str):
            return str.__eq__(self, other) and self.weight == 1 and not self.backup
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = str.__hash__

    def __repr__(self) -> str:
        if self.weight == 1 and not self.backup:
            return repr(self.address)
        return f"Server({self.address!r}, weight={self.weight}, backup={self.backup})"


@dataclass(frozen=True, slots=True)
class ServerEntry:
    """The mapping form of an ``upstreams.<name>.servers`` item (converted to a :class:`Server`)."""

    address: str = setting("", "HOST:PORT of the server (required).", _address)
    weight: int = setting(1, "Its share of the requests, relative to the others.", _positive)
    backup: bool = setting(
        False, "Takes requests only while no other server of the upstream is usable."
    )


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    path: str | None = setting(
        None,
        "HTTP path probed with GET (a 2xx or 3xx status is a success, any other a failure at "
        "once); unset: a TCP connect check.",
        _url_path,
    )
    interval_seconds: float = setting(2.0, "Time between two probes of one server.", _positive)
    timeout_seconds: float = setting(
        1.0, "A probe that takes longer fails (at most interval_seconds).", _positive
    )
    healthy_threshold: int = setting(
        2, "Consecutive successes that mark a down server up.", _positive
    )
    unhealthy_threshold: int = setting(
        3, "Consecutive failures that mark an up server down.", _positive
    )


@dataclass(frozen=True, slots=True)
class OutlierDetectionConfig:
    consecutive_failures: int = setting(
        5,
        "Consecutive failures of a server (connect errors, timeouts, resets, 502/503/504), "
        "over the whole fleet, that eject it; 0 turns passive ejection off.",
        _not_negative,
    )
    ejection_seconds: float = setting(
        30.0,
        "How long an ejected server stays out, times the number of its ejections (at most 300 s).",
        _positive,
    )
    max_ejection_percent: int = setting(
        10,
        "Most servers of the upstream ejected at once, in percent (at least one server may "
        "always be ejected).",
        _percent,
    )


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    servers: list[Server] = setting(
        [],
        "The servers, each HOST:PORT (weight 1) or a mapping {address: HOST:PORT, weight: N, "
        "backup: true}; weight is a positive integer (default 1); a backup takes requests only "
        "while no other server is usable.",
        each=_address,
    )
    hosts: list[str] = setting(
        [],
        "Host header values routed to this upstream by the load balancer; the first "
        "upstream also takes every other host.",
    )
    http2: bool = setting(
        False, "Speak HTTP/2 to these servers (h2c prior knowledge; needed for gRPC)."
    )
    balance: str = setting(
        "round_robin",
        "How a server is chosen, the same for every worker of the fleet (counted in shared "
        "memory): round_robin (smooth weighted, nginx's), random (weighted), least_conn (fewest "
        "requests in flight per weight, power of two choices), hash (consistent, Ketama, "
        "nginx's and Pingora's mapping; by hash_key).",
        _one_of(*BALANCE_CHOICES),
    )
    hash_key: str | None = setting(
        None,
        "What balance: hash hashes: header:NAME, cookie:NAME, query:NAME, path or client_ip; "
        "a request without it is balanced by round robin. Required for hash, refused otherwise.",
        _hash_key,
    )
    slow_start_seconds: float = setting(
        0.0,
        "A server that becomes usable again ramps its weight up over this long (0: at once). "
        "It acts once health checks and ejection mark servers down and up again; until then "
        "no server comes back, so none ramps.",
        _not_negative,
    )
    health_check: HealthCheckConfig | None = setting(
        None,
        "Active health checks, probed once for the whole fleet by the master (HAProxy's "
        "model: none unless configured; `health_check: {}` is a TCP connect check with the "
        "defaults below).",
    )
    outlier_detection: OutlierDetectionConfig = setting(
        OutlierDetectionConfig(), "Passive health: servers ejected on consecutive failures."
    )
    retry_on: list[int] = setting(
        [],
        "Response statuses that send an idempotent request to another server, beyond connect "
        "failures and resets (e.g. [502, 503, 504] for rolling restarts of the origins).",
        each=_status_to_retry,
    )
    max_connections: int = setting(
        1024,
        "Most upstream connections to this upstream over the whole fleet; over it a request "
        "gets 503 at once.",
        _positive,
    )
    max_requests: int = setting(
        1024,
        "Most requests in flight to this upstream over the whole fleet; over it a request "
        "gets 503 at once.",
        _positive,
    )
    max_pending: int = setting(
        1024,
        "Most requests waiting for a connection to this upstream over the whole fleet; over "
        "it a request gets 503 at once.",
        _positive,
    )
    resolve_seconds: float = setting(
        30.0,
        "A server given as a host name is resolved at start and again this often; each "
        "address is a server.",
        _positive,
    )


@dataclass(frozen=True, slots=True)
class PoolConfig:
    idle_timeout_seconds: float = setting(
        60.0,
        "An idle upstream connection unused for this long is closed (a peer's "
        "PeerOptions.idle_timeout wins for its HTTP/1.1 connections).",
        _positive,
    )
    size_per_worker: int = setting(
        128, "Most idle upstream connections one worker keeps (over all peers).", _not_negative
    )
    shared: bool = setting(
        True,
        "Share idle plaintext HTTP/1.1 upstream connections between workers through "
        "the master's pool broker.",
    )
    size_shared: int = setting(
        1024,
        "Most idle upstream connections the pool broker holds (over all peers).",
        _not_negative,
    )


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_header_bytes: int = setting(
        32768, "Largest request line plus headers; larger gets 431.", _positive
    )
    max_body_bytes: int = setting(
        104857600, "Largest request body; larger gets 413. 0 means no limit.", _not_negative
    )


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    keepalive_seconds: float = setting(
        75.0, "An idle downstream keep-alive connection is closed after this long.", _positive
    )
    client_header_seconds: float = setting(
        60.0, "Longest time a client may take to send a request's head (408 after).", _positive
    )
    upstream_connect_seconds: float = setting(
        5.0, "Longest wait for a new upstream connection (504 after).", _positive
    )
    upstream_read_seconds: float = setting(
        60.0, "Longest wait for an upstream response head or body read (504 after).", _positive
    )
    upstream_write_seconds: float = setting(
        60.0,
        "Longest time sending a request (head and body) to an upstream may stall while the "
        "upstream does not read it (504 after, unless the response has started).",
        _positive,
    )


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    access_log: str = setting("stderr", "Access log: stderr, stdout, off, or a file path.")
    access_log_format: str = setting(
        "combined",
        "combined (nginx's format plus the upstream and time) or json.",
        _one_of("combined", "json"),
    )
    error_log: str = setting("stderr", "Error log: stderr or a file path.")
    level: str = setting("info", "Error log level.", _one_of("debug", "info", "warning", "error"))


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated config, read-only; an app gets it in ``ProxyHttp.configure``.

    Each section is an attribute named as in the YAML file (``config.server.max_retries``,
    ``config.upstreams["api"].servers``); ``app_options`` is the free-form mapping for the app.
    The README's configuration reference (``python -m master config-reference``) lists every
    key with its type and default.
    """

    server: ServerConfig = field(default_factory=ServerConfig)
    listeners: list[ListenerConfig] = field(default_factory=lambda: [ListenerConfig()])
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    pool: PoolConfig = field(default_factory=PoolConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    app: str | None = setting(
        None,
        "The app as MODULE:ATTRIBUTE (a ProxyHttp subclass or instance); unset: the "
        "built-in load balancer.",
        _app,
    )
    app_options: dict[str, Any] = setting({}, "Free-form settings handed to the app.")
    demo_origins: list[str] = setting(
        [],
        "HOST:PORT of demo origins the master starts itself (each answers with a page "
        "naming itself).",
        each=_address,
    )
    #: Where this config came from (a file path, or "<embedded default>"); not a setting.
    source: str = field(default="<defaults>", compare=False)
    #: The raw mapping it was loaded from, to hand to workers; not a setting.
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def resolve(self, path: str) -> str:
        """A path from the config, relative to the config file's folder."""
        if os.path.isabs(path) or not os.path.isfile(self.source):
            return path
        return os.path.join(os.path.dirname(os.path.abspath(self.source)), path)

    def worker_count(self) -> int:
        """The number of workers to run: ``server.workers``, or one per CPU when 0."""
        return self.server.workers or os.cpu_count() or 1


_NOT_SETTINGS = {"source", "raw"}

EMBEDDED_DEFAULT: dict[str, Any] = {
    "server": {
        "workers": 2,
        "grace_period_seconds": 10,
        "pid_file": "/tmp/tenaya-6188.pid",
        "control_socket": "/tmp/tenaya-6188.sock",
    },
    "listeners": [{"address": "127.0.0.1:6188"}],
    "upstreams": {"demo": {"servers": ["127.0.0.1:6190", "127.0.0.1:6191"]}},
    "demo_origins": ["127.0.0.1:6190", "127.0.0.1:6191"],
}
EMBEDDED_SOURCE = "<embedded default config>"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        if type(None) in args:
            names.append("unset")
        return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is Server:
        return "HOST:PORT or a mapping"
    return str(tp)


#: A key path as its parts: a mapping key (a string) or a list index (an integer).
_Path = tuple[str | int, ...]


class _Invalid:
    """The type of :data:`_INVALID`."""

    def __repr__(self) -> str:
        return "<invalid>"


#: Stands for a value that was refused (a problem says why), so that the checks of the rest
#: still run: an invalid list item keeps its place, so later items keep their indexes.
_INVALID: Any = _Invalid()


def _show(path: _Path) -> str:
    """A key path as the messages write it, e.g. ``listeners[0].address``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _position(raw: Any, path: _Path) -> tuple[int, ...]:
    """Where ``path`` is written in ``raw``, for sorting: for each part, the index of that key
    among its siblings as written; a key that is not written comes after those that are."""
    place = []
    node = raw
    for part in path:
        if isinstance(node, dict):
            keys = [str(k) for k in node]
            i = keys.index(part) if part in keys else len(keys)
            node = list(node.values())[i] if i < len(keys) else None
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            i, node = part, node[part]
        else:
            i, node = 0, None
        place.append(i)
    return tuple(place)


class _Problems:
    """The mistakes found so far in one config, each with where it is and the key path its
    message names (the same, but for a list item refused by an ``each`` check)."""

    def __init__(self) -> None:
        self.found: list[tuple[_Path, _Path, str]] = []

    def add(self, where: _Path, reason: str, shown: _Path | None = None) -> None:
        """Notes a mistake at ``where``; its message names ``shown`` (default ``where``)."""
        self.found.append((where, where if shown is None else shown, reason))

    def clean(self, where: _Path) -> bool:
        """True when no mistake was found at ``where`` or under it."""
        return not any(found[: len(where)] == where for found, _, _ in self.found)

    def error(self, source: str, raw: Any) -> ConfigError:
        """The error listing every mistake, in the order of their keys in ``raw``."""
        ordered = sorted(self.found, key=lambda found: _position(raw, found[0]))
        return ConfigError.of(
            [ConfigProblem(source, _show(shown), reason) for _, shown, reason in ordered]
        )


def _convert(tp: Any, value: Any, where: _Path, problems: _Problems) -> Any:
    """Checks ``value`` at ``where`` against the declared type ``tp``; returns the converted
    value, or ``_INVALID`` with the reason added to ``problems``. A list, mapping or section
    with refused parts is returned with the rest, each refused part noted in ``problems``."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:
            # Several types (a name or a numeric id): the first that takes the value.
            for option in inner:
                trial = _Problems()
                converted = _convert(option, value, where, trial)
                if not trial.found:
                    return converted
            problems.add(where, f"expected {_type_name(tp)}, got {value!r}")
            return _INVALID
        return _convert(inner[0], value, where, problems)
    if tp is Server:
        return _server(value, where, problems)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.add(where, f"expected a list, got {value!r}")
            return _INVALID
        return [_convert(args[0], v, (*where, i), problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.add(where, f"expected a mapping, got {value!r}")
            return _INVALID
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                problems.add((*where, str(k)), f"keys must be strings, got {k!r}", shown=where)
                continue
            out[k] = v if args[1] is Any else _convert(args[1], v, (*where, k), problems)
        return out
    if tp is Any:
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"undeclared setting type {tp!r}")
    if not ok:
        problems.add(where, f"expected {_type_name(tp)}, got {value!r}")
        return _INVALID
    return float(value) if tp is float else value


def _server(value: Any, where: _Path, problems: _Problems) -> Any:
    """A servers item: ``"HOST:PORT"`` or a :class:`ServerEntry` mapping, as a :class:`Server`
    (the address of a string item is checked by the list's ``each``, that of a mapping here)."""
    if isinstance(value, str):
        return Server(value)
    if not isinstance(value, dict):
        problems.add(where, f"expected HOST:PORT or a mapping with an address, got {value!r}")
        return _INVALID
    before = len(problems.found)
    entry = _build(ServerEntry, value, where, problems)
    if "address" not in value:
        problems.add((*where, "address"), "required (HOST:PORT)")
    if len(problems.found) > before:
        return _INVALID
    return Server(entry.address, entry.weight, entry.backup)


def _build(cls: Any, raw: Any, where: _Path, problems: _Problems) -> Any:
    """The section ``cls`` from the mapping ``raw`` at ``where``, every refused key noted in
    ``problems`` and left at its default; ``_INVALID`` when ``raw`` is not a mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(where, f"expected a mapping, got {raw!r}")
        return _INVALID
    hints = typing.get_type_hints(cls)
    declared = {f.name: f for f in dataclasses.fields(cls) if f.name not in _NOT_SETTINGS}
    kwargs = {}
    for key, value in raw.items():
        at = (*where, str(key))
        f = declared.get(key) if isinstance(key, str) else None
        if f is None:
            close = difflib.get_close_matches(str(key), list(declared), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(at, f"unknown key{hint}")
            continue
        converted = _convert(hints[key], value, at, problems)
        if converted is not _INVALID and converted is not None:
            converted = _checked(f, converted, at, problems)
        if converted is not _INVALID:
            kwargs[key] = converted
    return cls(**kwargs)


def _checked(f: dataclasses.Field[Any], value: Any, where: _Path, problems: _Problems) -> Any:
    """Runs the extra checks declared for setting ``f`` on its converted ``value`` (not None);
    returns the value, or ``_INVALID`` when a check refuses it. ``each`` runs on every item
    that has the right type; ``check`` only on a value with no refused part."""
    refused = False
    each: Check | None = f.metadata.get("each")
    if each is not None:
        for i, item in enumerate(value):
            reason = None if item is _INVALID else each(item)
            if reason:
                problems.add((*where, i), f"item {i}: {reason}", shown=where)
                refused = True
    check: Check | None = f.metadata.get("check")
    if check is not None and problems.clean(where):
        reason = check(value)
        if reason:
            problems.add(where, reason)
            refused = True
    return _INVALID if refused else value


def from_mapping(raw: Any, source: str = "<config>") -> Config:
    """Validates a parsed config mapping; raises :class:`ConfigError` with every mistake
    found. The checks across settings look only at settings that passed their own."""
    if raw is None:
        raw = {}
    problems = _Problems()
    config = _build(Config, raw, (), problems)
    if config is _INVALID:
        raise problems.error(source, raw)
    _check_listeners(config, source, problems)
    _check_identity(config, problems)
    _check_upstreams(config, problems)
    if (
        config.app is None
        and problems.clean(("app",))
        and problems.clean(("upstreams",))
        and not any(u.servers for u in config.upstreams.values())
    ):
        problems.add(
            ("upstreams",), "the built-in load balancer needs at least one upstream with servers"
        )
    if problems.found:
        raise problems.error(source, raw)
    return dataclasses.replace(config, source=source, raw=raw)


def _check_upstreams(config: Config, problems: _Problems) -> None:
    """Per upstream: ``hash_key`` goes with ``balance: hash`` (needed there, refused
    elsewhere), a health check's timeout fits in its interval, and the servers are not all
    backups."""
    if config.upstreams is _INVALID:
        return
    for name, upstream in config.upstreams.items():
        if upstream is _INVALID:
            continue
        at: _Path = ("upstreams", name)
        if problems.clean((*at, "balance")) and problems.clean((*at, "hash_key")):
            if upstream.balance == "hash" and upstream.hash_key is None:
                problems.add(
                    (*at, "hash_key"),
                    f"balance: hash needs a hash_key ({', '.join(HASH_KEY_FORMS)})",
                )
            elif upstream.balance != "hash" and upstream.hash_key is not None:
                problems.add(
                    (*at, "hash_key"), f"only for balance: hash (balance is {upstream.balance})"
                )
        check = upstream.health_check
        if (
            check is not None
            and check is not _INVALID
            and problems.clean((*at, "health_check"))
            and check.timeout_seconds > check.interval_seconds
        ):
            problems.add(
                (*at, "health_check", "timeout_seconds"),
                f"must not be more than interval_seconds ({check.interval_seconds:g})",
            )
        servers = upstream.servers
        if (
            problems.clean((*at, "servers"))
            and servers
            and all(isinstance(s, Server) and s.backup for s in servers)
        ):
            problems.add((*at, "servers"), "every server is a backup: at least one must not be")


def _check_identity(config: Config, problems: _Problems) -> None:
    """``server.group`` goes with ``server.user``, which together name a user and group that
    exist (each was checked alone already)."""
    server = config.server
    if server is _INVALID or not (
        problems.clean(("server", "user")) and problems.clean(("server", "group"))
    ):
        return
    if server.user is None:
        if server.group is not None:
            problems.add(
                ("server", "group"),
                "needs server.user: a worker that stays root could take any group back",
            )
        return
    try:
        privileges.resolve(server.user, server.group)
    except LookupError as e:
        problems.add(("server", "user"), str(e))


def _check_listeners(config: Config, source: str, problems: _Problems) -> None:
    """At least one listener, no address twice, and the TLS files readable."""
    if not config.listeners:
        problems.add(("listeners",), "at least one listener is needed")
    seen: set[str] = set()
    for i, listener in enumerate(config.listeners):
        if listener is _INVALID:
            continue
        if problems.clean(("listeners", i, "address")):
            if listener.address in seen:
                problems.add(("listeners", i, "address"), f"{listener.address} is listed twice")
            seen.add(listener.address)
        if listener.tls is not None:
            _check_tls(config, source, ("listeners", i, "tls"), listener.tls, problems)


def _check_tls(
    config: Config, source: str, where: _Path, tls: TlsConfig, problems: _Problems
) -> None:
    """The files a TLS listener names must be readable (a worker would fail later); a file
    setting refused already is not looked at again."""
    pairs: list[tuple[_Path, str]] = [((*where, "cert"), tls.cert), ((*where, "key"), tls.key)]
    for i, c in enumerate(tls.certificates):
        if c is not _INVALID:
            pairs += [
                ((*where, "certificates", i, "cert"), c.cert),
                ((*where, "certificates", i, "key"), c.key),
            ]
    if tls.client_ca:
        pairs.append(((*where, "client_ca"), tls.client_ca))
    located = dataclasses.replace(config, source=source)
    for key, path in pairs:
        if not problems.clean(key):
            continue
        if not path:
            problems.add(key, "a file is needed")
        elif not os.access(located.resolve(path), os.R_OK):
            problems.add(key, f"cannot read {path}")


def load(path: str | None) -> Config:
    """Reads and validates the config file at ``path``; None gives the embedded default."""
    if path is None:
        return from_mapping(EMBEDDED_DEFAULT, EMBEDDED_SOURCE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(path, "", f"invalid YAML: {where}{problem}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(path, "", "the top level must be a mapping")
    return from_mapping(raw, path)


def reference() -> str:
    """The config reference as a Markdown table, made from the declarations."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(cls: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in _NOT_SETTINGS:
                continue
            tp = hints[f.name]
            args = typing.get_args(tp)
            inner = args[0] if typing.get_origin(tp) is list and args else None
            if typing.get_origin(tp) in (typing.Union, types.UnionType):
                inner = [a for a in args if a is not type(None)]
                if inner and dataclasses.is_dataclass(inner[0]):
                    rows.append(
                        f"| `{prefix}{f.name}` | a mapping or unset | `unset` | "
                        f"{f.metadata.get('doc', '')} |"
                    )
                    walk(inner[0], f"{prefix}{f.name}.")
                    continue
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            if inner is not None and dataclasses.is_dataclass(inner):
                walk(inner, f"{prefix}{f.name}[].")
                continue
            if typing.get_origin(tp) is dict and dataclasses.is_dataclass(args[1]):
                walk(args[1], f"{prefix}{f.name}.<name>.")
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = ""
            shown = (
                "unset"
                if default is None
                else yaml.safe_dump(default, default_flow_style=True)
                .strip()
                .removesuffix("...")
                .strip()
            )
            rows.append(
                f"| `{prefix}{f.name}` | {_type_name(tp)} | `{shown}` | "
                f"{f.metadata.get('doc', '')} |"
            )

    walk(Config, "")
    return "\n".join(rows) + "\n"
