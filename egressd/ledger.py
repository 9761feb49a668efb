"""The ledger: what egressd has granted, per set entry, until when, and why.

ipset's ``add -exist`` *resets* an entry's timeout to the new value, so a shorter TTL seen
later would cut an earlier, longer grant short. The ledger remembers each entry's expiry so
that a new grant is ``max(already granted, new)`` and so that an address whose grant
already lasts long enough costs no kernel write at all.

It also remembers *why* each entry is there: which allowed name (per profile) justified
which addresses, on which ports, until when. A reload asks the new policy about every such
reason (``reconcile``) and gets back the entries to add (a name now allowed on more ports)
and to remove (nothing the new policy allows justifies them any more), so a policy change
reaches live state within a reload, without ever taking out an entry that is still
justified.

Times are ``time.monotonic()`` seconds, passed in (``now``) so the arithmetic is testable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .allowlist import Labels
from .config import GrantSettings, Profile

TCP, UDP = 6, 17  # IP protocol numbers, as hash:ip,port entries carry them

Key = tuple[str, str, int, int]  # (set name, ip, proto, port); proto = port = 0: every port


def grant_timeout(ttl: int, settings: GrantSettings) -> int:
    """Seconds an address stays allowed for one answer: TTL clamped to [floor, ceiling] + grace.

    Never 0: ipset treats a timeout of 0 as "permanent", and the floor is at least 1.
    """
    return max(settings.floor, min(ttl, settings.ceiling)) + settings.grace


@dataclass(frozen=True, slots=True)
class Write:
    """One kernel write: add ``ip`` to ``set_name`` with ``timeout`` seconds.

    ``proto``/``port`` are 0 for a hash:ip set (every port), else the entry of a
    hash:ip,port set (``ip,tcp:443``).
    """

    set_name: str
    family: int
    ip: str
    timeout: int
    proto: int = 0
    port: int = 0
    # The allowed name that justified the entry, kept in the kernel entry's comment, so
    # a restarted egressd still knows why it is there (and a reload can judge it).
    comment: str = field(default="", compare=False)

    @property
    def key(self) -> Key:
        return (self.set_name, self.ip, self.proto, self.port)


def entries_for(
    profile: Profile, ip: str, family: int, ports: Sequence[int], name: str = ""
) -> list[Write]:
    """The set entries (timeout 0, to be filled in) that grant ``ip`` on ``ports``.

    No ports: one entry of the every-port set. Else one hash:ip,port entry per port and
    protocol (TCP and UDP). ``name`` (the allowed name) becomes the entries' comment.
    """
    if not ports:
        return [Write(profile.set_for(family, False), family, ip, 0, comment=name)]
    s = profile.set_for(family, True)
    return [Write(s, family, ip, 0, proto, port, name) for port in ports for proto in (TCP, UDP)]


def name_of(labels: Labels) -> str:
    return b".".join(labels).decode("ascii", errors="replace")


def labels_from(name: str) -> Labels:
    return tuple(label.lower() for label in name.encode("ascii", errors="replace").split(b"."))


def profile_of(set_name: str) -> str:
    """ "egressd-agent-p4" -> "agent" (the sets' names, see config.Profile.set_for)."""
    return set_name[len("egressd-") : -3]


@dataclass(slots=True)
class Reason:
    """One allowed name's answers in one profile: what they justify, until when."""

    profile: str
    labels: Labels  # the queried name
    chain: tuple[Labels, ...]  # its CNAME targets (a deny line on one revokes the name)
    ports: tuple[int, ...]  # the ports its allowlist line gave (empty: every port)
    addrs: dict[tuple[str, int], float]  # (ip, family) -> expiry
    keys: set[Key]  # the set entries it granted


# What a reload's policy says of a reason: None (no longer allowed), or the ports it now
# gets and the entries that grants (per address; an address missing is not granted).
Judge = Callable[[Reason], "Sequence[Write] | None"]


class Ledger:
    __slots__ = ("_expiry", "_reasons")

    def __init__(self) -> None:
        self._expiry: dict[Key, float] = {}
        self._reasons: dict[tuple[str, Labels], Reason] = {}

    def remaining(self, key: Key, now: float) -> float:
        exp = self._expiry.get(key)
        return 0.0 if exp is None else max(0.0, exp - now)

    def plan(
        self, entries: Iterable[tuple[Write, int]], settings: GrantSettings, now: float
    ) -> list[Write]:
        """Kernel writes needed to grant each ``(entry, ttl)``.

        An entry is skipped when its current grant lasts at least the new one minus half
        the grace period: it then stays allowed for the full clamped TTL anyway, with at
        least half the grace on top. The written timeout is never shorter than what is
        left of the current grant.
        """
        slack = settings.grace // 2
        out: dict[Key, Write] = {}
        for entry, ttl in entries:
            want = grant_timeout(ttl, settings)
            key = entry.key
            prev = out.get(key)
            if prev is not None and prev.timeout >= want:
                continue
            have = self.remaining(key, now)
            if have >= want - slack:
                continue
            out[key] = Write(
                entry.set_name,
                entry.family,
                entry.ip,
                max(want, math.ceil(have)),
                entry.proto,
                entry.port,
                entry.comment,
            )
        return list(out.values())

    def commit(self, writes: Iterable[Write], now: float) -> None:
        """Record writes the kernel has accepted."""
        for w in writes:
            key = w.key
            self._expiry[key] = max(self._expiry.get(key, 0.0), now + w.timeout)

    def justify(self, reason: Reason) -> None:
        """Remember (or re-arm) why a name's addresses are granted."""
        rid = (reason.profile, reason.labels)
        old = self._reasons.get(rid)
        if old is not None:
            for addr, exp in old.addrs.items():
                if exp > reason.addrs.get(addr, 0.0):
                    reason.addrs[addr] = exp
            reason.keys |= old.keys
        self._reasons[rid] = reason

    def knows(self, reason: Reason) -> bool:
        """Whether a reason adds nothing: recorded already, for these entries, as long.

        Checked when a repeat answer needs no kernel write (the entries' grants still last
        long enough), so a cache hit costs a few dict look-ups, not a merge.
        """
        old = self._reasons.get((reason.profile, reason.labels))
        if old is None or not reason.keys <= old.keys or old.ports != reason.ports:
            return False
        slack = 60.0  # an expiry this close to the recorded one changes nothing a reload does
        return all(old.addrs.get(a, 0.0) >= exp - slack for a, exp in reason.addrs.items())

    def load(self, entries: Iterable[Write], now: float) -> None:
        """Take over grants found in the kernel after a restart (timeout = seconds left).

        An entry's comment names the allowed name that justified it, so its reason is
        rebuilt (without the CNAME chain, which the kernel does not keep); an entry
        without one (written by an older egressd) is kept until it expires.
        """
        for w in entries:
            key = w.key
            exp = now + w.timeout
            self._expiry[key] = max(self._expiry.get(key, 0.0), exp)
            if not w.comment:
                continue
            rid = (profile_of(w.set_name), labels_from(w.comment))
            r = self._reasons.get(rid)
            if r is None:
                r = self._reasons[rid] = Reason(rid[0], rid[1], (), (), {}, set())
            addr = (w.ip, w.family)
            r.addrs[addr] = max(r.addrs.get(addr, 0.0), exp)
            r.keys.add(key)
            if w.port and w.port not in r.ports:
                r.ports = tuple(sorted((*r.ports, w.port)))

    def forget(self, set_name: str | None = None) -> None:
        """Drop knowledge of a set (it was flushed or re-created behind our back)."""
        if set_name is None:
            self._expiry.clear()
            return
        for key in [k for k in self._expiry if k[0] == set_name]:
            del self._expiry[key]

    def live(self, set_name: str, now: float) -> int:
        return sum(1 for k, exp in self._expiry.items() if k[0] == set_name and exp > now)

    def names(self, key: Key, now: float) -> list[str]:
        """The names whose live answers justify an entry (for `grants`, attribution)."""
        out = []
        for r in self._reasons.values():
            exp = r.addrs.get((key[1], 4 if ":" not in key[1] else 6), 0.0)
            if exp > now:
                out.append(name_of(r.labels))
        return sorted(out)

    def prune(self, now: float) -> int:
        """Forget expired grants and reasons; returns how many grants."""
        dead = [k for k, exp in self._expiry.items() if exp <= now]
        for k in dead:
            del self._expiry[k]
        for rid in [
            rid for rid, r in self._reasons.items() if max(r.addrs.values(), default=0) <= now
        ]:
            del self._reasons[rid]
        return len(dead)

    def reconcile(
        self, judge: Judge, live_sets: Iterable[str], now: float
    ) -> tuple[list[Write], list[Write]]:
        """After a reload: (entries to add or re-time, entries to remove).

        Every remembered reason is judged by the new policy. An entry stays exactly as
        long as some reason the new policy still accepts justifies it; entries that only
        rejected reasons justified are removed. Entries a reason newly justifies (its line
        now lists more ports) are added, with the reason's expiry. Entries taken over from
        the kernel at start, whose reasons are unknown, are left to expire. The caller
        applies the additions before the removals, so a still-justified address is never
        missing, not even for a moment.
        """
        sets = set(live_sets)
        justified_before: set[Key] = set()
        desired: dict[Key, tuple[Write, float]] = {}
        kept: dict[tuple[str, Labels], Reason] = {}
        for rid, r in self._reasons.items():
            justified_before |= r.keys
            entries = judge(r)
            if entries is None:
                continue
            r.keys = {e.key for e in entries}
            for e in entries:
                exp = r.addrs.get((e.ip, e.family), 0.0)
                if exp <= now:
                    continue
                prev = desired.get(e.key)
                if prev is None or prev[1] < exp:
                    desired[e.key] = (e, exp)
            kept[rid] = r
        self._reasons = kept

        adds: list[Write] = []
        for key, (e, exp) in desired.items():
            have = self._expiry.get(key)
            # Missing, or granted for longer than anything still justifies (a revoked
            # name had extended it): write it with the justified timeout.
            if have is None or have > exp + 1:
                timeout = max(1, math.ceil(exp - now))
                adds.append(Write(e.set_name, e.family, e.ip, timeout, e.proto, e.port, e.comment))
                self._expiry[key] = exp
        removes: list[Write] = []
        for key in list(self._expiry):
            if key in desired or key not in justified_before:
                continue  # still justified, or taken over from the kernel (unknown reason)
            del self._expiry[key]
            if key[0] in sets:
                set_name, ip, proto, port = key
                removes.append(Write(set_name, 4 if ":" not in ip else 6, ip, 0, proto, port))
        return adds, removes
