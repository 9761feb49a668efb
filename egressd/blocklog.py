"""Keeps a flood of per-query records (blocked queries above all) from flooding the journal.

An agent probing thousands of names (or exfiltrating through them) would otherwise write a
record per query; journald's own rate limit would then drop egressd's other records too.
Events marked ``PER_QUERY`` pass through a token bucket (default 50/s, bursts of 200); what
does not fit is counted (by event type) and summarised once per flush as one ``Unlogged``
record. Every other event passes straight through. Time is injected, so this is testable.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from .events import Event, Unlogged


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
        self._unlogged: Counter[str] = Counter()  # since the last flush
        self.unlogged_total = 0

    @property
    def unlogged(self) -> int:
        return sum(self._unlogged.values())

    def __call__(self, event: Event) -> None:
        if event.PER_QUERY:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1.0:
                self._unlogged[type(event).__name__] += 1
                self.unlogged_total += 1
                return
            self._tokens -= 1.0
        self.report(event)

    def flush(self) -> None:
        """Report how many per-query records went unlogged since the last flush."""
        if self._unlogged:
            kinds = ",".join(f"{k}={n}" for k, n in sorted(self._unlogged.items()))
            self.report(Unlogged(self.unlogged, kinds))
            self._unlogged.clear()
