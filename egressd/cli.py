"""Command line: ``egressd run``, ``check-config``, ``uninstall``, and the operator's
commands that ask the running daemon or the host (``egressd.commands``)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from . import __version__
from .config import DEFAULT_PRESETS_DIR, CommandLine, Config, restricts_nobody
from .errors import ConfigError, FirewallError
from .journal import Reporter
from .sources import Sources, from_command_line, load
from .subids import getsubids

DEFAULT_CONFIG = "/etc/egressd/egressd.toml"
# The operator's commands (egressd.commands.NAME): each adds its parser and runs itself.
# Imported only when the command line may name one: `egressd run` (the service's start,
# timed against the 300 ms budget of docs/design.md) does without doctor's, suggest's and
# check's modules.
COMMANDS = ("status", "check", "grants", "reload", "suggest", "doctor")


def _command(name: str) -> ModuleType:
    return importlib.import_module(f".commands.{name}", __package__)


# The real system, plus the NSS subordinate uid ranges (config itself runs no programs).
SOURCES = Sources(nss_subuids=getsubids)


def _parser(commands: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="egressd",
        description="Per-user DNS allowlist egress firewall: the restricted users reach only "
        "the addresses of allowlisted names.",
    )
    ap.add_argument("--version", action="version", version=f"egressd {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="install rules and sets, then serve DNS in the foreground")
    run.add_argument("--config", metavar="FILE", help=f"TOML configuration (e.g. {DEFAULT_CONFIG})")
    one = run.add_argument_group("one-line form (no config file; one profile named 'default')")
    one.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="USER|UID",
        help="user to restrict (repeatable)",
    )
    one.add_argument(
        "--allowlist",
        action="append",
        default=[],
        metavar="FILE",
        help="allowlist file, one pattern per line (repeatable)",
    )
    one.add_argument(
        "--preset",
        action="append",
        default=[],
        metavar="NAME",
        help="a preset allowlist shipped with egressd, e.g. python, node, github (repeatable)",
    )
    one.add_argument(
        "--presets-dir",
        metavar="DIR",
        help=f"where the presets are (default {DEFAULT_PRESETS_DIR})",
    )
    one.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PATTERN",
        help="an allowlist pattern (repeatable)",
    )
    one.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="upstream resolver (repeatable; default: /etc/resolv.conf)",
    )
    one.add_argument(
        "--listen",
        metavar="IP:PORT",
        help="listener port (127.0.0.1:PORT and [::1]:PORT; default 153)",
    )
    one.add_argument(
        "--min-ttl",
        type=int,
        metavar="SECONDS",
        help="shortest time a resolved address stays allowed (grant floor)",
    )
    one.add_argument(
        "--allow-private",
        action="append",
        default=[],
        metavar="CIDR|PATTERN",
        help="answers may carry addresses of this private network (or, for a name pattern, "
        "answers for those names may carry private addresses), as private_answers does "
        "(repeatable; the rebinding guard drops private addresses otherwise)",
    )
    run.add_argument(
        "--log",
        choices=("auto", "journal", "json"),
        default="auto",
        help="where events go (default: journald if reachable, else JSON on stderr)",
    )

    check = sub.add_parser("check-config", help="validate a configuration and its allowlists")
    check.add_argument("--config", metavar="FILE", default=DEFAULT_CONFIG)

    sub.add_parser("uninstall", help="remove every rule, chain and set egressd added")
    for name in COMMANDS if commands else ():
        _command(name).add_parser(sub)
    return ap


def _loader(args: argparse.Namespace) -> Callable[[], Config]:
    one_line = bool(
        args.user
        or args.allowlist
        or args.allow
        or args.upstream
        or args.listen
        or args.min_ttl is not None
        or args.allow_private
        or args.preset
        or args.presets_dir is not None
    )
    if args.config and one_line:
        raise ConfigError("use either --config or the one-line options (--user ...), not both")
    if args.config:
        path = args.config
        return lambda: _restricting(load(path, SOURCES))
    cl = CommandLine(
        users=args.user,
        allowlists=args.allowlist,
        allow=args.allow,
        upstreams=args.upstream,
        listen=args.listen,
        min_ttl=args.min_ttl,
        allow_private=args.allow_private,
        presets=args.preset,
        presets_dir=args.presets_dir,
    )
    return lambda: from_command_line(cl, SOURCES)


def _restricting(config: Config) -> Config:
    """`run` (and every reload) refuses a configuration that restricts nobody: egressd
    does not sit there looking like protection while the agent's user is unset."""
    if restricts_nobody(config):
        raise ConfigError(
            "no user configured: no profile has `users`; name the agent's user in a drop-in, "
            'e.g. /etc/egressd/conf.d/50-install.toml: [profiles.agent] users = ["agent"]',
            file=config.path,
        )
    return config


def _print_config(config: Config) -> None:
    """What check-config found, and which files it came from (the main file, conf.d
    drop-ins, presets, allowlist files), so a surprising rule can be traced to its file."""
    print(f"config: {', '.join(config.files)}")
    for p in config.profiles:
        uids = ",".join(map(str, p.uids)) or "none (restricts nobody)"
        print(f"profile {p.name}: uids {uids}, port {p.port}, {len(p.rules)} rules")
        if p.uid_ranges:
            ranges = ",".join(f"{a}-{b}" for a, b in p.uid_ranges)
            print(f"profile {p.name}: subordinate uids {ranges} (restricted too)")
        if p.presets:
            print(
                f"profile {p.name}: presets {', '.join(p.presets)} "
                f"(from {config.daemon.presets_dir})"
            )
        for file in p.allowlists:
            print(f"profile {p.name}: allowlist {file}")
    print(f"upstreams: {', '.join(map(str, config.daemon.upstreams))}")
    if restricts_nobody(config):
        # Valid (the shipped egressd.toml is like this until a drop-in names the user),
        # but `egressd run` refuses it.
        print(
            "no user configured: no profile restricts anybody; `egressd run` refuses this "
            "until a drop-in in conf.d/ sets `users` (e.g. conf.d/50-install.toml)"
        )


def _need_root() -> None:
    if os.geteuid() != 0:
        print("egressd: needs root (CAP_NET_ADMIN) to manage rules and sets", file=sys.stderr)
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = _parser(commands=words[:1] != ["run"]).parse_args(words)
    if args.command in COMMANDS:
        return int(_command(args.command).run(args))
    if args.command == "check-config":
        try:
            config = load(args.config, SOURCES)
        except ConfigError as err:
            print(f"egressd: {err}", file=sys.stderr)
            return 2
        _print_config(config)
        return 0

    if args.command == "uninstall":
        _need_root()
        from .firewall.iptables_ipset import IptablesIpset

        async def _uninstall() -> None:
            fw = IptablesIpset()
            try:
                await fw.uninstall()
            finally:
                await fw.close()

        try:
            asyncio.run(_uninstall())
        except FirewallError as err:
            print(f"egressd: uninstall incomplete: {err}", file=sys.stderr)
            return 1
        print("egressd: rules, chains and sets removed")
        return 0

    # run
    try:
        loader = _loader(args)
        loader()  # fail early with a clear message, before touching the firewall
    except ConfigError as err:
        print(f"egressd: {err}", file=sys.stderr)
        return 2
    _need_root()
    try:
        report = Reporter(use_journal={"auto": None, "journal": True, "json": False}[args.log])
    except RuntimeError as err:
        print(f"egressd: {err}", file=sys.stderr)
        return 2
    from .daemon import Daemon

    async def _run() -> int:
        return await Daemon(loader, report).run()

    return asyncio.run(_run())
