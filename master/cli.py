"""``python -m master``: start, check and config-reference."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import Any

from master.arbiter import Arbiter, StartError
from master.listeners import ListenError
from shared.config import ConfigError, from_mapping, load, reference


def _load_with_overrides(args: argparse.Namespace) -> Any:
    config = load(args.config)
    raw = dict(config.raw)
    if getattr(args, "app", None):
        raw["app"] = args.app
    if getattr(args, "workers", None) is not None:
        raw["server"] = {**(raw.get("server") or {}), "workers": args.workers}
    return from_mapping(raw, config.source)


def _setup_master_log(level: str, target: str) -> None:
    handler: logging.Handler = (logging.StreamHandler(sys.stderr) if target == "stderr"
                                else logging.StreamHandler(sys.stdout) if target == "stdout"
                                else logging.FileHandler(target))
    handler.setFormatter(logging.Formatter(
        "%(asctime)s [master %(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger("tenaya")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def cmd_start(args: argparse.Namespace) -> int:
    try:
        config = _load_with_overrides(args)
    except ConfigError as e:
        print(f"tenaya: invalid config: {e}", file=sys.stderr)
        return 1
    _setup_master_log(config.logging.level, config.logging.error_log)
    arbiter = Arbiter(config)
    try:
        arbiter.start()
    except (StartError, ListenError) as e:
        logging.getLogger("tenaya").error("cannot start: %s", e)
        arbiter.stopping = True
        arbiter.shutdown()
        return 1
    return arbiter.run()


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = _load_with_overrides(args)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    # The app is imported in a separate process: the master never runs app code.
    cmd = [sys.executable, "-m", "worker", "--check"]
    if args.config:
        cmd += ["-c", args.config]
    if config.app:
        cmd += ["--app", config.app]
    env = dict(os.environ)
    if args.config:
        here = os.path.dirname(os.path.abspath(args.config))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    result = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        return 1
    print("ok")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    sys.stdout.write(reference())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m master",
        description="Tenaya: a programmable HTTP proxy (master process).")
    sub = parser.add_subparsers(dest="command", required=True)

    start = sub.add_parser("start", help="start serving (foreground)")
    start.add_argument("-c", "--config", help="YAML config file (default: the embedded "
                       "demo config: a load balancer on 127.0.0.1:6188)")
    start.add_argument("--app", help="the app as MODULE:ATTRIBUTE (overrides app:)")
    start.add_argument("--workers", type=int, help="worker processes (overrides "
                       "server.workers)")
    start.set_defaults(func=cmd_start)

    check = sub.add_parser("check", help="validate a config and import its app")
    check.add_argument("-c", "--config", required=True)
    check.add_argument("--app")
    check.set_defaults(func=cmd_check)

    ref = sub.add_parser("config-reference", help="print every setting as a Markdown table")
    ref.set_defaults(func=cmd_config_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
