"""Counters of what egressd did (read by status/metrics later, and by tests)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class Counts:
    """One profile's answers by outcome (``egressd status``, metrics)."""

    answered: int = 0  # answered with the upstream's answer (from the cache or not)
    blocked: int = 0
    refused: int = 0
    servfail: int = 0
    audited: int = 0  # audit mode: answered although enforcing mode would block it


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
    # Rejected packets read back from NFLOG (egressd.firewall.nflog): each is one
    # ConnectionBlocked record unless over the profile's record budget (blocked_unlogged
    # counts those); messages that could not be read; times the kernel dropped messages.
    connections_blocked: int = 0
    nflog_malformed: int = 0
    nflog_overruns: int = 0
    # Per profile name; kept across reloads (counters only grow), shown for live profiles.
    profiles: dict[str, Counts] = field(default_factory=dict)

    def of(self, profile: str) -> Counts:
        counts = self.profiles.get(profile)
        if counts is None:
            counts = self.profiles[profile] = Counts()
        return counts

    def totals(self) -> dict[str, int]:
        """Every counter but the per-profile ones."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "profiles"}
