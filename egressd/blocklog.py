"""Keeps a flood of blocked queries from flooding the journal.

An agent probing thousands of names (or exfiltrating through them) would otherwise write a
record per query; journald's own rate limit would then drop egressd's other records too.
Blocked-query records pass through a token bucket (default 50/s, bursts of 200); what
does not fit is counted and summarised once per flush as one ``BlockedUnlogged`` record.
Every other event passes straight through. Time is injected, so this is testable.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .events import BlockedUnlogged, Event, QueryBlocked


class BlockLog:
    def __init__(
        self,
        report: Callable[[Event], None],
        *,
        rate: float = 50.0,
        burst: float = 200.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.report = report
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = burst
        self._last = clock()
        self.unlogged = 0  # since the last flush
        self.unlogged_total = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, QueryBlocked):
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1.0:
                self.unlogged += 1
                self.unlogged_total += 1
                return
            self._tokens -= 1.0
        self.report(event)

    def flush(self) -> None:
        """Report how many blocked queries went unlogged since the last flush."""
        if self.unlogged:
            self.report(BlockedUnlogged(self.unlogged))
            self.unlogged = 0
