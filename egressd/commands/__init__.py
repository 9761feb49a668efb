"""The operator's commands (``egressd status``, ``check``, ``grants``, ``reload``, ``suggest``,
``doctor``): one module each, with ``add_parser(sub)`` and ``run(args) -> int``.

Conventions (those of resolvectl, fail2ban-client, nft): human output by default, ``--json``
for scripts; exit codes mean something:

  0  done, healthy / allowed / nothing found
  1  done, and the answer is "no": unhealthy, blocked, findings
  2  usage or configuration error
  3  egressd is not running (nobody answers on the control socket)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from typing import Any

from ..config import DEFAULT_CONTROL

DEFAULT_CONFIG = "/etc/egressd/egressd.toml"

EXIT_OK = 0
EXIT_NO = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3


def add_common(p: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    """--config, --socket (and --json): every command that may talk to the daemon."""
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"configuration file (default {DEFAULT_CONFIG}); also where the control socket is",
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help=f"the daemon's control socket (default: daemon.control, {DEFAULT_CONTROL})",
    )
    if json_output:
        p.add_argument("--json", action="store_true", help="print JSON for scripts")


def control_path(args: argparse.Namespace) -> str:
    """The control socket: --socket, else the config's daemon.control, else the default.

    Only that one key is read from the file, so a config that no longer loads (the reason
    someone runs `status`) still tells where the running daemon listens.
    """
    if getattr(args, "socket", None):
        return str(args.socket)
    path = getattr(args, "config", None) or DEFAULT_CONFIG
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return DEFAULT_CONTROL
    daemon = data.get("daemon")
    value = daemon.get("control") if isinstance(daemon, dict) else None
    return value if isinstance(value, str) and os.path.isabs(value) else DEFAULT_CONTROL


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def fail(message: str, code: int) -> int:
    print(f"egressd: {message}", file=sys.stderr)
    return code
