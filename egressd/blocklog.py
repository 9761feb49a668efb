"""Keeps a flood of per-query records (blocked queries above all) from flooding the journal.

An agent probing thousands of names (or exfiltrating through them) would otherwise write a
record per query; journald's own rate limit would then drop egressd's other records too.
Events marked ``PER_QUERY`` pass through a token bucket per profile (default 50/s, bursts
of 200 each), so one profile's flood never uses up another profile's budget and hides its
records; what does not fit is counted (by profile and event type) and summarised once per
flush as one ``Unlogged`` record. Every other event passes straight through. journald's own
per-unit rate limit is off in egressd.service (``LogRateLimitIntervalSec=0``): these budgets
decide, and a profile's flood cannot make journald drop egressd's other records. Time is
injected, so this is testable.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .events import Event, Unlogged


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last: float


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
        # One bucket per profile, made full on the profile's first per-query record. The
        # profiles are the configured ones (events never carry a name the agent chose),
        # so this stays small.
        self._buckets: dict[str, _Bucket] = {}
        self._unlogged: Counter[tuple[str, str]] = Counter()  # since the last flush
        self.unlogged_total = 0

    @property
    def unlogged(self) -> int:
        return sum(self._unlogged.values())

    def __call__(self, event: Event) -> None:
        if event.PER_QUERY and not self._spend(
            str(getattr(event, "profile", "")), type(event).__name__
        ):
            return
        self.report(event)

    def per_query(self, profile: str, kind: str, make: Callable[[], Event]) -> None:
        """A per-query record of ``kind`` (its event class's name), made only if it is
        to be logged: under a flood nearly none is, and making one costs more than the
        rest of answering a repeated blocked query (Pipeline.repeat)."""
        if self._spend(profile, kind):
            self.report(make())

    def _spend(self, profile: str, kind: str) -> bool:
        """Take a token of the profile's budget; False (and counted) when there is none."""
        now = self.clock()
        b = self._buckets.get(profile)
        if b is None:
            b = self._buckets[profile] = _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.last) * self.rate)
        b.last = now
        if b.tokens < 1.0:
            self._unlogged[(profile, kind)] += 1
            self.unlogged_total += 1
            return False
        b.tokens -= 1.0
        return True

    def flush(self) -> None:
        """Report how many per-query records went unlogged since the last flush.

        One record for all profiles, each kind prefixed with its profile
        ("agent:QueryBlocked=950,build:QueryRefused=3").
        """
        if self._unlogged:
            kinds = ",".join(f"{p}:{k}={n}" for (p, k), n in sorted(self._unlogged.items()))
            self.report(Unlogged(self.unlogged, kinds))
            self._unlogged.clear()
