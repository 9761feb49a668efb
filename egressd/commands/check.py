"""``egressd check NAME``: is NAME allowed, by which line, and which line would allow it.

Offline (the default) it reads the configuration file, so it works with egressd stopped
and for a config not yet loaded. ``--resolve`` asks the running daemon instead: its live
policy decides, and a name it allows is resolved through its upstream to show the CNAME
chain and the addresses (nothing is granted). A name the policy blocks is never resolved.

Exit codes: 0 allowed (in the profile asked, or in some profile), 1 blocked or denied,
2 usage or configuration error, 3 egressd not running (``--resolve``).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from .. import control, explain
from ..errors import ConfigError
from ..policy import Policy
from ..sources import Sources, load
from . import (
    DEFAULT_CONFIG,
    EXIT_NO,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    add_common,
    control_path,
    fail,
    print_json,
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "check",
        help="is a name allowed, by which line, and which line would allow it",
        description="Decide NAME as egressd would: the deciding allowlist line (file:line), "
        "the ports it grants and, for a blocked name, the exact line to add. Offline against "
        "the config file; --resolve asks the running daemon and shows the CNAME chain of an "
        "allowed name (a blocked name is never resolved). Exit 0 allowed, 1 blocked, "
        "2 usage/config error, 3 not running.",
    )
    p.add_argument("name", metavar="NAME", help="the domain name (unicode or punycode)")
    p.add_argument("--profile", metavar="P", help="only this profile (default: every profile)")
    p.add_argument(
        "--type", default="A", metavar="TYPE", help="query type: A, AAAA, TXT, ... (default A)"
    )
    p.add_argument(
        "--resolve",
        action="store_true",
        help="ask the running daemon: its policy, and the live answer of an allowed name",
    )
    add_common(p)


def run(args: argparse.Namespace) -> int:
    try:
        explain.parse_name(args.name)
        explain.parse_type(args.type)
    except explain.CheckError as err:
        return fail(str(err), EXIT_USAGE)
    if args.resolve:
        return _live(args)
    path = args.config or DEFAULT_CONFIG
    try:
        # Default sources but no NSS subordinate-uid lookup: ranges do not decide names,
        # and `check` runs no programs.
        policy = Policy(load(path, Sources()))
        checks = explain.check(policy, args.name, args.profile, args.type)
    except ConfigError as err:
        return fail(str(err), EXIT_USAGE)
    except explain.CheckError as err:
        return fail(str(err), EXIT_USAGE)
    result = {
        "name": checks[0].name.text,
        "type": checks[0].qtype,
        "config": path,
        "checks": [c.to_json() for c in checks],
    }
    return _report(result, args.json)


def _live(args: argparse.Namespace) -> int:
    path = control_path(args)
    request = {"name": args.name, "profile": args.profile, "type": args.type}
    try:
        result = control.call(path, "resolve", request)
    except control.NotRunning as err:
        return fail(
            f"{err}; without --resolve, `egressd check` decides offline from the config file",
            EXIT_NOT_RUNNING,
        )
    except control.ControlError as err:
        return fail(str(err), EXIT_USAGE)
    if not isinstance(result, dict) or not isinstance(result.get("checks"), list):
        return fail(f"unexpected answer from the daemon: {result!r}", EXIT_USAGE)
    return _report(result, args.json)


def _report(result: dict[str, Any], as_json: bool) -> int:
    code = EXIT_OK if allowed(result) else EXIT_NO
    if as_json:
        print_json(result)
    else:
        for line in render(result):
            print(line)
    return code


def allowed(result: dict[str, Any]) -> bool:
    """Allowed in some profile checked, and (resolved live) no deny line on its CNAME chain."""
    denied = set()
    resolved = result.get("resolved")
    if resolved:
        denied = {p["profile"] for p in resolved.get("profiles", ()) if p.get("denied_by")}
    return any(c["verdict"] == "allow" and c["profile"] not in denied for c in result["checks"])


def render(result: dict[str, Any]) -> list[str]:
    """The human text of a check (offline) or of a daemon's resolve result."""
    lines: list[str] = []
    for c in result["checks"]:
        lines.extend(_check_lines(c))
    if "resolved" in result:
        lines.extend(_resolved_lines(result))
    return lines


def _check_lines(c: dict[str, Any]) -> list[str]:
    name = (
        c["name"]
        if c["input"].rstrip(".").lower() == c["name"]
        else (f"{c['name']} ({c['input']})")
    )
    head = f"{name}  profile {c['profile']}  "
    audit = c["mode"] == "audit"
    if c["verdict"] == "allow":
        return [f"{head}ALLOWED by {c['rule']} ({c['source']}), ports: {_ports(c['ports'])}"]
    note = " (audit mode: answered and granted anyway, and logged)" if audit else ""
    if c["verdict"] == "deny":
        lines = [f"{head}DENIED by {c['rule']} ({c['source']}){note}"]
        also = c.get("also_allowed_by")
        over = f" (here over {also['rule']} ({also['source']}))" if also else ""
        lines.append(
            f"  a deny line beats every allow line{over}: to allow {c['name']}, remove or "
            "change that deny line"
        )
        return lines
    lines = [f"{head}BLOCKED: no rule allows it{note}"]
    fix = c.get("fix")
    if fix:
        if fix["key"]:
            table, _, key = fix["key"].rpartition(".")
            lines.append(f"  to allow it, add this to `{key}` in [{table}] of {fix['file']}:")
            lines.append(f'    "{fix["line"]}"')
        else:
            lines.append(f"  to allow it, add this line to {fix['file']}:")
            lines.append(f"    {fix['line']}")
        if fix["wider"]:
            lines.append(f"  or, for {fix['wider_covers']}:")
            lines.append(f"    {fix['wider']}")
        if fix["hint"]:
            lines.append(f"  note: {fix['hint']}")
    return lines


def _resolved_lines(result: dict[str, Any]) -> list[str]:
    resolved = result["resolved"]
    if resolved is None:
        return [
            f"  not resolved: the policy blocks {result['name']}, so no query was sent "
            "(egressd never asks an upstream about a blocked name)"
        ]
    if resolved["error"]:
        return [f"  not resolved: {resolved['error']}"]
    lines = [
        f"  resolved live ({result['type']}, {resolved['rcode']}) through egressd's upstream; "
        "nothing was granted:"
    ]
    for hop in resolved["chain"]:
        lines.append(f"    {hop['owner']}  CNAME  {hop['target']}  (ttl {hop['ttl']})")
    if resolved["addresses"]:
        lines.append(f"    addresses: {_addresses(resolved['addresses'])}")
    else:
        lines.append("    no addresses")
    for p in resolved["profiles"]:
        deny = p.get("denied_by")
        if deny:
            lines.append(
                f"  profile {p['profile']}: BLOCKED by a deny line on the CNAME chain: "
                f"{deny['name']} matches {deny['rule']} ({deny['source']})"
            )
        for f in p.get("filtered", ()):
            lines.append(
                f"  profile {p['profile']}: {f['ip']} is removed from the answer, never "
                f"granted: {f['why']}"
            )
    return lines


def _ports(ports: Iterable[int]) -> str:
    return ",".join(map(str, ports)) or "all"


def _addresses(addrs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{a['ip']} (ttl {a['ttl']})" for a in addrs)
