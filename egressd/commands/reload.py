"""``egressd reload``: apply the configuration now and say whether it worked.

Synchronous, unlike SIGHUP: it returns when the daemon has applied the new policy or kept
the old one. ``systemctl reload egressd`` runs it (ExecReload), so a failed reload fails
there too. Exit 0 applied, 1 failed (the previous policy keeps running), 3 not running.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..control import ControlError, NotRunning, call
from . import EXIT_NO, EXIT_NOT_RUNNING, EXIT_OK, add_common, control_path, fail, print_json


def add_parser(sub: Any) -> None:
    p = sub.add_parser("reload", help="apply the configuration now; fails when the reload does")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    try:
        result = call(control_path(args), "reload", timeout=120.0)
    except NotRunning as err:
        return fail(str(err), EXIT_NOT_RUNNING)
    except ControlError as err:
        return fail(str(err), EXIT_NO)
    if args.json:
        print_json(result)
    else:
        print(f"egressd: reloaded {result['config']} (policy {result['policy']})")
    return EXIT_OK
