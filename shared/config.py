"""The configuration: every setting declared once, with its type, default, doc and check.

The YAML file, the error messages and the reference in the README (``python -m master
config-reference``) all come from the declarations below. :func:`load` refuses a config with a
:class:`ConfigError` naming the file, the key path and the reason; an unknown key is an error,
with the closest known key as a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from shared.peer import parse_address


class ConfigError(Exception):
    """An invalid config: ``str(error)`` is ``"FILE: KEY.PATH: reason"``."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        super().__init__(source, path, reason)
        self.source = source
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        where = f"{self.source}: {self.path}" if self.path else self.source
        return f"{where}: {self.reason}"


Check = Callable[[Any], str | None]


def setting(default: Any, doc: str, check: Check | None = None) -> Any:
    """Declares one setting: its default, its documentation and an optional extra check
    (a function returning a reason when the value is refused)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default),
                     metadata={"doc": doc, "check": check})
    return field(default=default, metadata={"doc": doc, "check": check})


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


def _addresses(v: Any) -> str | None:
    for i, item in enumerate(v):
        reason = _address(item)
        if reason:
            return f"item {i}: {reason}"
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
        30.0, "On a graceful stop, longest wait for in-flight requests to finish.", _not_negative)
    max_retries: int = setting(
        3, "How many times a retryable failure (e.g. connect refused) picks a peer again.",
        _not_negative)
    worker_timeout_seconds: float = setting(
        30.0, "A worker silent for this long (no heartbeat) is killed and replaced.", _positive)
    control_socket: str | None = setting(
        None, "Unix-domain socket of the master's control commands; none when unset.")


@dataclass(frozen=True, slots=True)
class CertConfig:
    cert: str = setting("", "PEM certificate chain (a path, relative to the config file).")
    key: str = setting("", "PEM private key of that certificate.")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: str = setting("", "PEM certificate chain of the default certificate (used when the "
                        "client sends no SNI or an unknown name).")
    key: str = setting("", "PEM private key of the default certificate.")
    certificates: list[CertConfig] = setting(
        [], "More certificates, each chosen by SNI for the DNS names in its subjectAltName.")
    client_ca: str | None = setting(
        None, "PEM CA bundle: when set, clients must present a certificate it signed (mTLS).")
    min_version: str = setting("1.2", "Oldest TLS version accepted.", _one_of("1.2", "1.3"))
    ciphers: str | None = setting(
        None, "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's); unset: "
        "ECDHE with AES-GCM or ChaCha20 only.")


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    address: str = setting("127.0.0.1:6188", "HOST:PORT to listen on ([::1]:PORT for IPv6).",
                           _address)
    backlog: int = setting(2048, "Length of each socket's accept queue.", _positive)
    tls: TlsConfig | None = setting(None, "Terminate TLS on this listener (see tls.*).")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    servers: list[str] = setting([], "HOST:PORT of each server, tried in round-robin order.",
                                 _addresses)
    hosts: list[str] = setting(
        [], "Host header values routed to this upstream by the load balancer; the first "
        "upstream also takes every other host.")
    http2: bool = setting(
        False, "Speak HTTP/2 to these servers (h2c prior knowledge; needed for gRPC).")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    idle_timeout_seconds: float = setting(
        60.0, "An idle upstream connection unused for this long is closed.", _positive)
    size_per_worker: int = setting(
        128, "Most idle upstream connections one worker keeps (over all peers).", _not_negative)
    shared: bool = setting(
        True, "Share idle plaintext HTTP/1.1 upstream connections between workers through "
        "the master's pool broker.")
    size_shared: int = setting(
        1024, "Most idle upstream connections the pool broker holds (over all peers).",
        _not_negative)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_header_bytes: int = setting(
        32768, "Largest request line plus headers; larger gets 431.", _positive)
    max_body_bytes: int = setting(
        104857600, "Largest request body; larger gets 413. 0 means no limit.", _not_negative)


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    keepalive_seconds: float = setting(
        75.0, "An idle downstream keep-alive connection is closed after this long.", _positive)
    client_header_seconds: float = setting(
        60.0, "Longest time a client may take to send a request's head (408 after).",
        _positive)
    upstream_connect_seconds: float = setting(
        5.0, "Longest wait for a new upstream connection (504 after).", _positive)
    upstream_read_seconds: float = setting(
        60.0, "Longest wait for an upstream response head or body read (504 after).",
        _positive)
    upstream_write_seconds: float = setting(
        60.0, "Longest time a write to an upstream may stay blocked.", _positive)


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    access_log: str = setting(
        "stderr", "Access log: stderr, stdout, off, or a file path.")
    access_log_format: str = setting(
        "combined", "combined (nginx's format plus the upstream and time) or json.",
        _one_of("combined", "json"))
    error_log: str = setting("stderr", "Error log: stderr or a file path.")
    level: str = setting("info", "Error log level.",
                         _one_of("debug", "info", "warning", "error"))


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    listeners: list[ListenerConfig] = field(default_factory=lambda: [ListenerConfig()])
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    pool: PoolConfig = field(default_factory=PoolConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    app: str | None = setting(
        None, "The app as MODULE:ATTRIBUTE (a ProxyHttp subclass or instance); unset: the "
        "built-in load balancer.", _app)
    app_options: dict[str, Any] = setting({}, "Free-form settings handed to the app.")
    demo_origins: list[str] = setting(
        [], "HOST:PORT of demo origins the master starts itself (each answers with a page "
        "naming itself).", _addresses)
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
    "server": {"workers": 2, "grace_period_seconds": 10, "pid_file": "/tmp/tenaya-6188.pid",
               "control_socket": "/tmp/tenaya-6188.sock"},
    "listeners": [{"address": "127.0.0.1:6188"}],
    "upstreams": {"demo": {"servers": ["127.0.0.1:6190", "127.0.0.1:6191"]}},
    "demo_origins": ["127.0.0.1:6190", "127.0.0.1:6191"],
}
EMBEDDED_SOURCE = "<embedded default config>"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _type_name(inner[0]) + " or unset"
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


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    """Checks ``value`` against the declared type ``tp``; returns the converted value."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, source, path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, path, f"expected a list, got {value!r}")
        return [_convert(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, path, f"expected a mapping, got {value!r}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(source, path, f"keys must be strings, got {k!r}")
            out[k] = _convert(args[1], v, source, f"{path}.{k}") if args[1] is not Any else v
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
        raise ConfigError(source, path, f"expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: Any, raw: Any, source: str, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, path, f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_SETTINGS]
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(source, where, f"unknown key{hint}")
        converted = _convert(hints[key], value, source, where)
        f = next(f for f in dataclasses.fields(cls) if f.name == key)
        check = f.metadata.get("check")
        if check is not None and converted is not None:
            reason = check(converted)
            if reason:
                raise ConfigError(source, where, reason)
        kwargs[key] = converted
    return cls(**kwargs)


def from_mapping(raw: Any, source: str = "<config>") -> Config:
    """Validates a parsed config mapping; raises :class:`ConfigError`."""
    if raw is None:
        raw = {}
    config = _build(Config, raw, source, "")
    if not config.listeners:
        raise ConfigError(source, "listeners", "at least one listener is needed")
    seen: set[str] = set()
    for i, listener in enumerate(config.listeners):
        if listener.address in seen:
            raise ConfigError(source, f"listeners[{i}].address",
                              f"{listener.address} is listed twice")
        seen.add(listener.address)
    for i, listener in enumerate(config.listeners):
        if listener.tls is not None:
            _check_tls(config, source, f"listeners[{i}].tls", listener.tls)
    if config.app is None and not any(u.servers for u in config.upstreams.values()):
        raise ConfigError(source, "upstreams",
                          "the built-in load balancer needs at least one upstream with servers")
    return dataclasses.replace(config, source=source, raw=raw)


def _check_tls(config: Config, source: str, where: str, tls: TlsConfig) -> None:
    """The files a TLS listener names must be readable (a worker would fail later)."""
    pairs = [(f"{where}.cert", tls.cert), (f"{where}.key", tls.key)]
    for i, c in enumerate(tls.certificates):
        pairs += [(f"{where}.certificates[{i}].cert", c.cert),
                  (f"{where}.certificates[{i}].key", c.key)]
    if tls.client_ca:
        pairs.append((f"{where}.client_ca", tls.client_ca))
    for key, path in pairs:
        if not path:
            raise ConfigError(source, key, "a file is needed")
        full = dataclasses.replace(config, source=source).resolve(path)
        if not os.access(full, os.R_OK):
            raise ConfigError(source, key, f"cannot read {path}")


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
                    rows.append(f"| `{prefix}{f.name}` | a mapping or unset | `unset` | "
                                f"{f.metadata.get('doc', '')} |")
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
            shown = "unset" if default is None else yaml.safe_dump(
                default, default_flow_style=True).strip().removesuffix("...").strip()
            rows.append(f"| `{prefix}{f.name}` | {_type_name(tp)} | `{shown}` | "
                        f"{f.metadata.get('doc', '')} |")

    walk(Config, "")
    return "\n".join(rows) + "\n"
