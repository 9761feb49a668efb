"""``egressd suggest [--since 1h] [--profile P] [--write FILE]``: allowlist lines for what
was blocked, from the journal's QueryBlocked and QueryAudited records, grouped by
registrable domain, for a person to review (egressd.suggest decides; this reads and writes).

The journal is read with ``journalctl -o json MESSAGE_ID=<QueryBlocked> MESSAGE_ID=<QueryAudited>``
(two matches on one field are alternatives); ``--directory``/``--file`` go to journalctl,
``--log FILE`` reads egressd's JSON-lines log instead (no journald). Nothing is resolved.

``--write FILE`` appends the block (dated header comment, the lines, the ``**.domain``
alternatives commented out) to an allowlist file: created 0644 if missing, never truncated.
A reload applies it.

Exit 0 when there is something to suggest (and it was written), 1 when there is nothing
(like grep), 2 on a usage error or when the journal can't be read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from .. import suggest as core
from ..allowlist import Matcher
from ..config import Config
from ..errors import ConfigError
from ..events import QueryAudited, QueryBlocked
from ..sources import Sources, load
from ..subids import getsubids
from . import DEFAULT_CONFIG, EXIT_NO, EXIT_OK, EXIT_USAGE, fail, print_json

_UNITS = {"s": 1, "min": 60, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^(\d+)(s|min|m|h|d|w)$")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "suggest",
        help="allowlist lines for the names that were blocked (from the journal), to review",
        description="Allowlist lines for the names blocked (or audited) recently, grouped by "
        "registrable domain, with counts and first time seen. Never resolves a name.",
    )
    p.add_argument(
        "--since",
        default="1h",
        metavar="WHEN",
        help="records since: a duration (30m, 1h, 2d, 1w), a time (2026-11-29 20:00), "
        "@UNIXTIME or 'all' (default 1h)",
    )
    p.add_argument("--profile", metavar="P", help="only this profile's records")
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"configuration (default {DEFAULT_CONFIG}): names it allows now are left out",
    )
    p.add_argument(
        "--write",
        metavar="FILE",
        help="append the lines to this allowlist file (created if missing), then reload",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--directory", metavar="DIR", help="journalctl --directory: another journal")
    src.add_argument("--file", metavar="FILE", help="journalctl --file: one journal file")
    src.add_argument(
        "--log",
        metavar="FILE",
        help="egressd's JSON-lines log (egressd run without journald) instead; - for stdin",
    )


def run(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        since = parse_since(args.since, now)
    except ValueError as err:
        return fail(str(err), EXIT_USAGE)
    try:
        entries = read_log(args.log) if args.log else read_journal(args, since)
    except OSError as err:
        return fail(str(err), EXIT_USAGE)
    config = _config(args)
    current = {p.name: Matcher(p.rules) for p in config.profiles} if config else None
    records = (r for e in entries if (r := core.record_of(e)) is not None)
    s = core.suggest(records, profile=args.profile, since=since, current=current)
    written = None
    if args.write and s.groups:
        path = os.path.abspath(args.write)
        try:
            append(path, core.allowlist_text(s, now=now))
        except OSError as err:
            return fail(f"cannot write {path}: {err.strerror or err}", EXIT_USAGE)
        written = path
        if config is not None:
            _check_listed(config, path, s)
    if args.json:
        print_json({**core.to_json(s), "written": written})
    else:
        sys.stdout.write(core.render(s))
        if written:
            print(
                f"\nappended {len(s.lines)} line(s) to {written}; "
                "run `egressd reload` to apply them"
            )
        elif args.write:
            print(f"\nnothing to write; {os.path.abspath(args.write)} left as it was")
    return EXIT_OK if s.groups else EXIT_NO


def parse_since(text: str, now: float) -> float | None:
    """--since -> unix time (None: 'all')."""
    text = text.strip()
    if text == "all":
        return None
    m = _DURATION.match(text)
    if m:
        return now - int(m.group(1)) * _UNITS[m.group(2)]
    if text.startswith("@"):
        try:
            return float(text[1:])
        except ValueError:
            pass
    try:
        return datetime.fromisoformat(text).timestamp()  # local time unless it says otherwise
    except ValueError:
        pass
    raise ValueError(
        f"--since {text!r}: give a duration (30m, 1h, 2d, 1w), a time "
        "(2026-11-29 20:00), @UNIXTIME or 'all'"
    )


def read_journal(args: argparse.Namespace, since: float | None) -> list[dict[str, Any]]:
    """The QueryBlocked and QueryAudited records, from journalctl."""
    cmd = [
        "journalctl",
        "--output=json",
        "--no-pager",
        "--all",  # long fields too (the json output would show them as null)
        "--output-fields=MESSAGE_ID,EGRESSD_EVENT," + ",".join(core.FIELDS),
    ]
    if since is not None:
        cmd.append(f"--since=@{int(since)}")
    if args.directory:
        cmd.append(f"--directory={args.directory}")
    if args.file:
        cmd.append(f"--file={args.file}")
    # Two matches on one field are alternatives; another field's match narrows them.
    cmd += [f"MESSAGE_ID={QueryBlocked.MESSAGE_ID}", f"MESSAGE_ID={QueryAudited.MESSAGE_ID}"]
    if args.profile:
        cmd.append(f"EGRESSD_PROFILE={args.profile}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise OSError("journalctl not found; for egressd's JSON log use --log FILE") from None
    # "-- No entries --" exits 1 on older journalctl: an empty answer, not a failure.
    if proc.returncode != 0 and not ("No entries" in proc.stderr and not proc.stdout.strip()):
        raise OSError(f"journalctl failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    if os.geteuid() != 0 and not args.directory and not args.file:
        print(
            "egressd: not root: journalctl shows only the journals this user may read",
            file=sys.stderr,
        )
    return list(_json_lines(proc.stdout.splitlines()))


def read_log(path: str) -> list[dict[str, Any]]:
    """egressd's JSON-lines log (its stderr without journald), or journalctl -o json output."""
    if path == "-":
        return list(_json_lines(sys.stdin))
    with open(path, encoding="utf-8", errors="replace") as fh:
        return list(_json_lines(fh))


def _json_lines(lines: Iterable[str]) -> Iterable[dict[str, Any]]:
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue  # a traceback or other text in a stderr log
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def _config(args: argparse.Namespace) -> Config | None:
    """The configuration in force, to leave out names it allows; None (and why, on stderr)
    when it does not load: the suggestion is still made, just not filtered."""
    path = args.config or DEFAULT_CONFIG
    if args.config is None and not os.path.exists(path):
        return None
    try:
        return load(path, Sources(nss_subuids=getsubids))
    except ConfigError as err:
        print(
            f"egressd: {err}; names it already allows are not left out",
            file=sys.stderr,
        )
        return None


def _check_listed(config: Config, path: str, s: core.Suggestion) -> None:
    """Warn when the reload will not read the file for the profiles that need the lines."""
    readers = {p.name for p in config.profiles if path in map(os.path.abspath, p.allowlists)}
    needed = {name for g in s.groups for t in g.names for name in t.profiles}
    if not readers:
        print(
            f"egressd: warning: no profile in {config.path} lists {path} in `allowlists`; "
            "add it there, or the reload will not read it",
            file=sys.stderr,
        )
    elif needed - readers:
        print(
            f"egressd: warning: the names were blocked for profile(s) "
            f"{', '.join(sorted(needed - readers))}, but {path} is read by "
            f"{', '.join(sorted(readers))}",
            file=sys.stderr,
        )


def append(path: str, text: str) -> None:
    """Append ``text`` to an allowlist file: created 0644 if missing, never truncated; a blank
    line first when the file has content (and a newline if its last line has none)."""
    created = not os.path.exists(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        if created:
            os.fchmod(fd, 0o644)  # not the umask's idea: egressd and people read it
        else:
            text = _separator(path) + text
        fh.write(text)


def _separator(path: str) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return ""
        fh.seek(-1, os.SEEK_END)
        return "\n" if fh.read(1) == b"\n" else "\n\n"
