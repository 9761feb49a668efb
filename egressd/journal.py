"""Where events go: journald (structured, via systemd-python) or JSON lines on stderr.

systemd-python is imported here, at the edge, and only if present, so the core and the unit
tests never need libsystemd.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from .events import Event

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "egressd"


def _journal_send() -> Callable[..., Any] | None:
    if not os.path.exists(JOURNAL_SOCKET):
        return None
    try:
        from systemd import journal  # type: ignore[import-not-found,attr-defined,unused-ignore]
    except ImportError:
        return None
    send: Callable[..., Any] = journal.send
    return send


class Reporter:
    """Writes each event as one record. Picks journald when its socket is there."""

    def __init__(self, stream: TextIO | None = None, use_journal: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self._send = _journal_send() if use_journal in (None, True) else None
        if use_journal and self._send is None:
            raise RuntimeError("journald requested but systemd-python or its socket is missing")

    @property
    def backend(self) -> str:
        return "journald" if self._send else "stderr-json"

    def __call__(self, event: Event) -> None:
        fields = event.fields()
        if self._send is not None:
            try:
                self._send(
                    MESSAGE=event.message(),
                    MESSAGE_ID=event.MESSAGE_ID,
                    PRIORITY=str(event.PRIORITY),
                    SYSLOG_IDENTIFIER=IDENTIFIER,
                    EGRESSD_EVENT=type(event).__name__,
                    **fields,
                )
                return
            except OSError:
                pass  # journald gone (restarting?): fall through to stderr
        record = {
            "ts": round(time.time(), 3),
            "event": type(event).__name__,
            "message_id": event.MESSAGE_ID,
            "priority": event.PRIORITY,
            "message": event.message(),
            **fields,
        }
        try:
            self.stream.write(json.dumps(record, sort_keys=True) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass
