"""``egressd status``: is it running and healthy, and what has it done (per profile).

Exit 0 healthy, 1 running but unhealthy (a problem is listed), 3 not running.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..control import ControlError, NotRunning, call
from . import EXIT_NO, EXIT_NOT_RUNNING, EXIT_OK, add_common, control_path, fail, print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="is egressd running and healthy; counts per profile")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    try:
        snap = call(control_path(args), "status")
    except NotRunning as err:
        return fail(str(err), EXIT_NOT_RUNNING)
    except ControlError as err:
        return fail(str(err), EXIT_NO)
    if args.json:
        print_json(snap)
    else:
        print(render(snap, time.time()))
    return EXIT_OK if snap["healthy"] else EXIT_NO


def _when(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))} ({ago(now - t)} ago)"


def ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render(snap: dict[str, Any], now: float) -> str:
    health = "healthy" if snap["healthy"] else "UNHEALTHY"
    out = [
        f"egressd {snap['version']}: running (pid {snap['pid']}), {health}",
        f"       config: {snap['config']} (policy {snap['policy']})",
        f"      started: {_when(snap['started'], now)}",
        f"    upstreams: {', '.join(snap['upstreams'])}",
        f"        rules: checked {snap['rules_checked']}",
    ]
    r = snap["last_reload"]
    if r is None:
        out.append("  last reload: none since the start")
    elif r["ok"]:
        out.append(f"  last reload: {_when(r['at'], now)}, ok (policy {r['policy']})")
    else:
        out.append(f"  last reload: {_when(r['at'], now)}, FAILED (see PROBLEM below)")
    rep = snap["last_repair"]
    if rep is None:
        out.append("  last repair: none since the start")
    else:
        out.append(f"  last repair: {_when(rep['at'], now)}, {rep['window_ms']} ms: {rep['what']}")
    for text in snap["problems"]:
        out.append(f"      PROBLEM: {text}")
    for text in snap["warnings"]:
        out.append(f"      WARNING: {text}")
    for p in snap["profiles"]:
        mode = "AUDIT: nothing blocked" if p["mode"] == "audit" else "enforcing"
        uids = ",".join(map(str, p["uids"]))
        ranges = "".join(f", subordinate {a}-{b}" for a, b in p["uid_ranges"])
        listen = ", ".join(p["listeners"]) or "NOT LISTENING"
        c = p["counts"]
        counts = (
            f"answered {c['answered']}, blocked {c['blocked']}, refused {c['refused']}, "
            f"servfail {c['servfail']}"
        )
        if p["mode"] == "audit" or c["audited"]:
            counts += f", audited {c['audited']}"
        sets = ", ".join(f"{s['name']} {s['entries']}/{s['maxelem']}" for s in p["sets"])
        out += [
            "",
            f"profile {p['name']} ({mode}): uids {uids}{ranges}",
            f"    listening: {listen}",
            f"      queries: {counts}",
            f"       grants: {p['grants']} live ({sets})",
        ]
    return "\n".join(out)
