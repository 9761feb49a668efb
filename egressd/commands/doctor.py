"""``egressd doctor``: check the host for ways around egressd, each finding with its fix.

Exit 0 nothing found, 1 findings, 2 usage error or a config that does not load (the
checks that need it did not run; the others did and are printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import textwrap
from typing import Any

from ..doctor import CHECKS, INFO, Host, Report, examine
from . import DEFAULT_CONFIG, EXIT_NO, EXIT_OK, EXIT_USAGE, fail, print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="check the host for ways around egressd (resolvers, groups, sudo, setuid, "
        "loopback services, nftables, IPv6, ports)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"egressd's configuration (default {DEFAULT_CONFIG}, below --root)",
    )
    p.add_argument(
        "--root",
        metavar="DIR",
        default="/",
        help="read the host's files below DIR (a chroot or image); sockets, sysctls and "
        "iptables are the current network namespace's",
    )
    p.add_argument(
        "--check",
        action="append",
        choices=CHECKS,
        metavar="NAME",
        help=f"run only this check (repeatable): {', '.join(CHECKS)}",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    root = args.root or "/"
    if not os.path.isdir(root):
        return fail(f"--root {root}: not a directory", EXIT_USAGE)
    host = Host(root=os.path.abspath(root))
    config = args.config or host.path(DEFAULT_CONFIG)
    report = examine(host, config, tuple(args.check or CHECKS))
    if args.json:
        print_json(as_json(report))
    else:
        print(render(report), end="")
    # An `info` is shown, not counted: Debian's stock nftables.conf alone would otherwise
    # make every host with nftables installed "fail".
    if any(f.severity != INFO for f in report.findings):
        return EXIT_NO
    return EXIT_USAGE if report.config_error else EXIT_OK


def as_json(report: Report) -> dict[str, Any]:
    return {
        "findings": [dataclasses.asdict(f) for f in report.findings],
        "count": len(report.findings),
        "checks": list(report.checks),
        "skipped": [{"check": c, "reason": r} for c, r in report.skipped],
        "config": report.config,
        "config_error": report.config_error,
    }


def _wrap(label: str, text: str) -> list[str]:
    return textwrap.wrap(
        text,
        width=96,
        initial_indent=f"  {label:<10}",
        subsequent_indent=" " * 12,
        break_on_hyphens=False,
        break_long_words=False,
    )


def render(report: Report) -> str:
    out: list[str] = []
    if report.config_error:
        out.append(f"config not loaded: {report.config_error}")
        if report.skipped:
            names = ", ".join(c for c, _ in report.skipped)
            out.append(f"not checked: {names} (they need the restricted users from the config)")
        out.append("")
    for f in report.findings:
        out.append(f"{f.severity.upper()} [{f.check}]")
        out += _wrap("found:", f.what)
        out += _wrap("evidence:", f.evidence)
        out += _wrap("fix:", f.fix)
        out.append("")
    out.append(f"checked: {', '.join(report.checks) or 'nothing'}")
    n = len(report.findings)
    if n:
        counts = {
            s: sum(f.severity == s for f in report.findings) for s in ("leak", "warning", "info")
        }
        detail = ", ".join(f"{c} {s}{'s' if c > 1 else ''}" for s, c in counts.items() if c)
        out.append(f"{n} finding{'s' if n > 1 else ''} ({detail})")
    else:
        out.append("no findings")
    return "\n".join(out) + "\n"
