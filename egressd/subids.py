"""A user's subordinate uid ranges as NSS reports them, through shadow's ``getsubids``.

/etc/subuid is read by config itself; this adapter adds what an NSS subid module
(``subid: sss`` in /etc/nsswitch.conf: sssd, LDAP) knows. Without such a module getsubids
reads /etc/subuid too, which only repeats what config already has. config runs no
programs, so cli injects ``getsubids`` into ``sources.Sources``.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from .errors import ConfigError

TIMEOUT = 10.0  # sssd answers from its cache in milliseconds; a dead LDAP server does not
# getsubids exits 1 with this both when the user has no range and when the lookup failed
# (shadow 4.13: it only checks for an empty list); it is the only way to say "none".
NO_RANGES = "Error fetching ranges"
_LINE = re.compile(r"^\d+: (\S+) (\d+) (\d+)$")
_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def parse_getsubids(text: str, user: str) -> tuple[tuple[int, int], ...]:
    """(start, count) pairs from getsubids output lines ``INDEX: OWNER START COUNT``."""
    out: list[tuple[int, int]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _LINE.match(line.strip())
        if m is None:
            raise ConfigError(f"getsubids {user}: unexpected output line {line!r}")
        out.append((int(m.group(2)), int(m.group(3))))
    return tuple(out)


def getsubids(user: str) -> tuple[tuple[int, int], ...]:
    """The subordinate uid ranges of `user` (a name) as (start, count) pairs."""
    exe = shutil.which("getsubids", path=_PATH)
    if exe is None:
        # No uidmap package: no getsubids, and no newuidmap either, so no NSS range can be
        # put to use; the ranges in /etc/subuid are still restricted (config reads them).
        return ()
    if user.startswith("-"):
        # getsubids reads its arguments by position: "-g" or "-h" would be taken as options.
        raise ConfigError(f"cannot ask getsubids about a user name starting with '-': {user!r}")
    try:
        proc = subprocess.run(
            [exe, user],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env={"PATH": _PATH, "LC_ALL": "C"},
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise ConfigError(f"getsubids {user}: {err}") from err
    if proc.returncode != 0:
        if proc.stderr.strip() == NO_RANGES and not proc.stdout.strip():
            return ()
        raise ConfigError(
            f"getsubids {user} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
        )
    return parse_getsubids(proc.stdout, user)
