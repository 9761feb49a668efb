"""Counters of what egressd did (read by status/metrics later, and by tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Stats:
    queries: int = 0
    allowed: int = 0
    blocked: int = 0
    refused: int = 0
    malformed: int = 0
    dropped_busy: int = 0
    internal_errors: int = 0
    blocked_unlogged: int = 0
    servfail_upstream: int = 0
    servfail_grant: int = 0
    cache_hits: int = 0
    grant_writes: int = 0
    grant_skips: int = 0
    repairs: int = 0
    reloads: int = 0
    reload_failures: int = 0
    stale_answers: int = 0  # answers a reload overtook: decided again under the new policy
    revoked: int = 0  # set entries a reload took back
