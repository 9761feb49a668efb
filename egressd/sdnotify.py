"""sd_notify: READY/RELOADING/STOPPING/STATUS/WATCHDOG to systemd (no-op outside it).

Uses systemd-python's ``daemon.notify`` when installed, else speaks the (tiny) protocol on
the NOTIFY_SOCKET datagram socket itself.
"""

from __future__ import annotations

import os
import socket
import time


def _fallback_notify(state: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
            s.sendall(state.encode())
        except OSError:
            return False
    return True


try:
    from systemd import daemon as _daemon  # type: ignore[import-not-found,attr-defined,unused-ignore]

    def _notify(state: str) -> bool:
        return bool(_daemon.notify(state))
except ImportError:  # pragma: no cover - depends on the host
    _notify = _fallback_notify


def notify(*states: str) -> bool:
    """Send one notification made of ``KEY=VALUE`` lines."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    return _notify("\n".join(states))


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    # MONOTONIC_USEC lets Type=notify-reload units match the reload to this message.
    return notify(
        "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    )


def stopping(status: str) -> bool:
    return notify("STOPPING=1", f"STATUS={status}")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2_000_000, 0.05)
    except ValueError:
        return None
