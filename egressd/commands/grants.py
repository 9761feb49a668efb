"""``egressd grants [--profile P] [ADDRESS|NAME]``: live set entries, the time each has
left and the allowed names that justified it.

Exit 0 when something is listed, 1 when a filter matched nothing, 3 not running.
"""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

from ..control import ControlError, NotRunning, call
from . import EXIT_NO, EXIT_NOT_RUNNING, EXIT_OK, add_common, control_path, fail, print_json
from .status import ago


def add_parser(sub: Any) -> None:
    p = sub.add_parser("grants", help="live set entries: address, time left, names")
    add_common(p)
    p.add_argument("--profile", metavar="P", help="only this profile's grants")
    p.add_argument("what", nargs="?", metavar="ADDRESS|NAME", help="only this address or name")


def run(args: argparse.Namespace) -> int:
    query: dict[str, str] = {}
    if args.profile:
        query["profile"] = args.profile
    if args.what:
        try:
            query["address"] = str(ipaddress.ip_address(args.what))
        except ValueError:
            query["name"] = args.what
    try:
        result = call(control_path(args), "grants", query)
    except NotRunning as err:
        return fail(str(err), EXIT_NOT_RUNNING)
    except ControlError as err:
        return fail(str(err), EXIT_NO)
    grants = result["grants"]
    if args.json:
        print_json(grants)
    elif grants:
        print(render(grants))
    else:
        print("no live grants" + (" match" if query else ""))
    return EXIT_OK if grants or not query else EXIT_NO


def render(grants: list[dict[str, Any]]) -> str:
    rows = [("PROFILE", "ADDRESS", "PORT", "LEFT", "NAMES")]
    for g in grants:
        names = ", ".join(g["names"]) or "(taken over at start; name unknown)"
        rows.append((g["profile"], g["address"], g["port"] or "all", ago(g["expires_in"]), names))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(
        "  ".join(col.ljust(w) for col, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
        for r in rows
    )
