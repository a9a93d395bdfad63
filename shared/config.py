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


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    servers: list[str] = setting(
        [], "HOST:PORT of each server, tried in round-robin order.", each=_address
    )
    hosts: list[str] = setting(
        [],
        "Host header values routed to this upstream by the load balancer; the first "
        "upstream also takes every other host.",
    )
    http2: bool = setting(
        False, "Speak HTTP/2 to these servers (h2c prior knowledge; needed for gRPC)."
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
