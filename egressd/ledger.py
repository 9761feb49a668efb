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

Times are ``time.monotonic()`` seconds, passed in (``now``) so the arithmetic is testable;
the expiries the ledger keeps are whole seconds (``Ledger._stamp``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from .allowlist import Labels
from .config import GrantSettings, profile_of
from .firewall.base import Key, Write, entries_for, family_of


def grant_timeout(ttl: int, settings: GrantSettings) -> int:
    """Seconds an address stays allowed for one answer: TTL clamped to [floor, ceiling] + grace.

    Never 0: ipset treats a timeout of 0 as "permanent", and the floor is at least 1.
    """
    return max(settings.floor, min(ttl, settings.ceiling)) + settings.grace


def name_of(labels: Labels) -> str:
    return b".".join(labels).decode("ascii", errors="replace")


def labels_from(name: str) -> Labels:
    return tuple(label.lower() for label in name.encode("ascii", errors="replace").split(b"."))


class Reason:
    """One allowed name's answers in one profile: what they justify, until when.

    The set entries it justifies follow from its addresses and ports (``keys``); they are
    not stored, nor are the name's labels: a ledger holds one of these per live name, so
    each byte counts (docs/design.md, "The hot path"). Most names answer with one address,
    so that one is kept in two slots, and a dict is made only for a name with several
    (a dict of one address costs ~190 B, more than the rest of the reason). A ledger's
    reasons hold its expiries (whole seconds); a new one may hold any.
    """

    __slots__ = ("_addrs", "_expiry", "chain", "name", "ports", "profile")

    def __init__(
        self,
        profile: str,
        name: str,  # the queried name, as in the set entries' comments
        chain: tuple[Labels, ...],  # its CNAME targets (a deny line on one revokes the name)
        ports: tuple[int, ...],  # the ports its allowlist line gave (empty: every port)
        addrs: Mapping[str, float],  # ip -> expiry
    ) -> None:
        self.profile = profile
        self.name = name
        self.chain = chain
        self.ports = ports
        # One address: its ip here and its expiry in _expiry; none or several: a dict.
        self._addrs: str | dict[str, float] = {}
        self._expiry = 0.0
        self._assign(addrs)

    def _assign(self, addrs: Mapping[str, float]) -> None:
        if len(addrs) == 1:
            ((self._addrs, self._expiry),) = addrs.items()
        else:
            self._addrs, self._expiry = dict(addrs), 0.0

    @property
    def addrs(self) -> Mapping[str, float]:
        """ip -> expiry: a copy (only the ledger changes a reason's addresses)."""
        a = self._addrs
        return {a: self._expiry} if isinstance(a, str) else dict(a)

    def expiry(self, ip: str) -> float | None:
        """Until when this reason justifies ``ip`` (None: it never named it)."""
        a = self._addrs
        if isinstance(a, str):
            return self._expiry if a == ip else None
        return a.get(ip)

    def last(self) -> float:
        """When its last address runs out (0 if it has none)."""
        a = self._addrs
        if isinstance(a, str):
            return self._expiry
        return max(a.values(), default=0.0)

    def items(self) -> Iterable[tuple[str, float]]:
        """(ip, expiry) of each address, without making a dict (prune and the index walk
        every reason: no generator for the common one-address case)."""
        a = self._addrs
        if isinstance(a, str):
            return ((a, self._expiry),)
        return a.items()

    @property
    def labels(self) -> Labels:
        return labels_from(self.name)

    def keys(self) -> list[Key]:
        """The set entries this reason's addresses were granted as."""
        return [
            e.key
            for ip, _ in self.items()
            for e in entries_for(self.profile, ip, family_of(ip), self.ports)
        ]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reason):
            return NotImplemented
        return (self.profile, self.name, self.chain, self.ports, self.addrs) == (
            other.profile,
            other.name,
            other.chain,
            other.ports,
            other.addrs,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass(eq=True) is

    def __repr__(self) -> str:
        return (
            f"Reason({self.profile!r}, {self.name!r}, {self.chain!r}, {self.ports!r}, "
            f"{dict(self.addrs)!r})"
        )


# What a reload's policy says of a reason: None (no longer allowed), or the entries it
# now grants (per address and port; an address missing is no longer granted).
Judge = Callable[[Reason], "Sequence[Write] | None"]

# Entries of one set: ip (hash:ip) or (ip, proto, port) (hash:ip,port) -> expiry.
_Entries = dict[str | tuple[str, int, int], int]


def _sub(key: Key) -> str | tuple[str, int, int]:
    _, ip, proto, port = key
    return (ip, proto, port) if proto else ip


@dataclass(frozen=True, slots=True)
class Past:
    """A reason that ran out and was pruned: what attribution says of its addresses."""

    profile: str
    name: str
    ports: tuple[int, ...]
    expired: float  # monotonic


# Addresses whose pruned reasons are remembered (for "a grant that expired" in the blocked
# connection records); the oldest are forgotten first. ~200 B each.
HISTORY = 20_000


class Ledger:
    __slots__ = ("_by_ip", "_history", "_reasons", "_sets", "_stamps")

    def __init__(self) -> None:
        # Per set: entry -> expiry. Nested rather than keyed by Key tuples, to keep a grant
        # small (the set name is shared, an every-port entry is its address alone).
        self._sets: dict[str, _Entries] = {}
        # Per profile: allowed name -> its reason.
        self._reasons: dict[str, dict[str, Reason]] = {}
        # ip -> the reasons naming it now (one, or a tuple of several): `about` is asked on
        # every attributed blocked connection, and a scan of every reason took ~6 ms (with
        # the event loop stopped) at 100,000 of them. ~40 B per grant.
        self._by_ip: dict[str, Reason | tuple[Reason, ...]] = {}
        # ip -> the reasons that justified it and were pruned (newest last).
        self._history: OrderedDict[str, list[Past]] = OrderedDict()
        # The expiries in use, each once (see _stamp).
        self._stamps: dict[int, int] = {}

    def _stamp(self, exp: float) -> int:
        """An expiry as the ledger keeps it: whole seconds, rounded down, one int object
        per second shared by every grant that runs out in it.

        A float per set entry and per reason was 64 B of every grant; the grants made
        within one second now share one int. Rounded down: the kernel's timeout starts
        when the write arrives, after ``now``, so the ledger never believes an entry
        outlives the kernel's (at worst a re-arm is written up to a second early).
        """
        s = math.floor(exp)
        return self._stamps.setdefault(s, s)

    def _link(self, r: Reason) -> None:
        """Index a reason under each of its addresses (after it got them)."""
        by_ip = self._by_ip
        for ip, _ in r.items():
            have = by_ip.get(ip)
            if have is None:
                by_ip[ip] = r
            elif isinstance(have, Reason):
                if have is not r:
                    by_ip[ip] = (have, r)
            elif not any(x is r for x in have):
                by_ip[ip] = (*have, r)

    def _unlink(self, r: Reason) -> None:
        """Take a reason out of the index (before its addresses change, or it goes)."""
        by_ip = self._by_ip
        for ip, _ in r.items():
            have = by_ip.get(ip)
            if have is r:
                del by_ip[ip]
            elif isinstance(have, tuple):
                rest = tuple(x for x in have if x is not r)
                by_ip[ip] = rest[0] if len(rest) == 1 else rest

    def _expiry(self, key: Key) -> int | None:
        entries = self._sets.get(key[0])
        return None if entries is None else entries.get(_sub(key))

    def remaining(self, key: Key, now: float) -> float:
        exp = self._expiry(key)
        return 0.0 if exp is None else max(0.0, exp - now)

    def until(self, keys: Iterable[Key]) -> float:
        """When the first of ``keys`` runs out (0 if one is not granted)."""
        return min((self._expiry(k) or 0.0 for k in keys), default=0.0)

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

    def _set(self, key: Key, exp: float) -> None:
        entries = self._sets.get(key[0])
        if entries is None:
            entries = self._sets[key[0]] = {}
        sub = _sub(key)
        old = entries.get(sub)
        stamp = self._stamp(exp)
        if old is None or old < stamp:
            entries[sub] = stamp

    def commit(self, writes: Iterable[Write], now: float) -> None:
        """Record writes the kernel has accepted."""
        for w in writes:
            self._set(w.key, now + w.timeout)

    def justify(self, reason: Reason) -> None:
        """Remember (or re-arm) why a name's addresses are granted."""
        names = self._reasons.get(reason.profile)
        if names is None:
            names = self._reasons[reason.profile] = {}
        addrs: dict[str, float] = {ip: self._stamp(exp) for ip, exp in reason.items()}
        old = names.get(reason.name)
        if old is not None:
            for ip, exp in old.items():
                if exp > addrs.get(ip, 0.0):
                    addrs[ip] = exp
            self._unlink(old)
        reason._assign(addrs)
        names[reason.name] = reason
        self._link(reason)

    def knows(self, reason: Reason) -> bool:
        """Whether a reason adds nothing: recorded already, for these entries, as long.

        Checked when a repeat answer needs no kernel write (the entries' grants still last
        long enough), so a repeat costs a few dict look-ups, not a merge.
        """
        old = self._reasons.get(reason.profile, {}).get(reason.name)
        if old is None or old.ports != reason.ports:
            return False
        slack = 60.0  # an expiry this close to the recorded one changes nothing a reload does
        return all((old.expiry(ip) or 0.0) >= exp - slack for ip, exp in reason.items())

    def load(self, entries: Iterable[Write], now: float) -> None:
        """Take over grants found in the kernel after a restart (timeout = seconds left).

        An entry's comment names the allowed name that justified it, so its reason is
        rebuilt (without the CNAME chain, which the kernel does not keep); an entry
        without one (written by an older egressd) is kept until it expires.
        """
        for w in entries:
            exp = now + w.timeout
            self._set(w.key, exp)
            if not w.comment:
                continue
            profile = profile_of(w.set_name)
            names = self._reasons.setdefault(profile, {})
            r = names.get(w.comment)
            if r is None:
                r = names[w.comment] = Reason(profile, w.comment, (), (), {})
            have = r.expiry(w.ip)
            if have is None or have < exp:
                self._unlink(r)
                r._assign({**r.addrs, w.ip: self._stamp(exp)})
                self._link(r)
            if w.port and w.port not in r.ports:
                r.ports = tuple(sorted((*r.ports, w.port)))

    def forget(self, set_name: str | None = None) -> None:
        """Drop knowledge of a set (it was flushed or re-created behind our back)."""
        if set_name is None:
            self._sets.clear()
        else:
            self._sets.pop(set_name, None)

    def live(self, set_name: str, now: float) -> int:
        return sum(1 for exp in self._sets.get(set_name, {}).values() if exp > now)

    def names(self, key: Key, now: float) -> list[str]:
        """The names whose live answers justify an entry (for `grants`, attribution)."""
        profile = profile_of(key[0])
        return sorted(
            r.name
            for r in self.about(key[1])[0]
            if r.profile == profile and (r.expiry(key[1]) or 0.0) > now
        )

    def prune(self, now: float) -> int:
        """Forget expired grants and reasons (remembering the reasons in the bounded
        history); returns how many grants."""
        dead = 0
        for entries in self._sets.values():
            gone = [sub for sub, exp in entries.items() if exp <= now]
            for sub in gone:
                del entries[sub]
            dead += len(gone)
        pruned: list[Reason] = []
        for names in self._reasons.values():
            for name in [n for n, r in names.items() if r.last() <= now]:
                r = names.pop(name)
                self._unlink(r)
                pruned.append(r)
        # The history keeps the newest HISTORY addresses: when more reasons than that run
        # out at once (a burst of names resolved together), the earlier ones would only be
        # pushed out again by the later ones, so they are not written (it took ~0.2 s at
        # 100,000, with the event loop stopped).
        for r in pruned[-HISTORY:]:
            for ip, exp in r.items():
                self._remember(ip, Past(r.profile, r.name, r.ports, exp))
        # A new grant runs out after now: the seconds up to now are not needed again.
        self._stamps = {s: s for s in self._stamps.values() if s > now}
        return dead

    def _remember(self, ip: str, past: Past) -> None:
        pasts = self._history.pop(ip, None) or []
        pasts = [p for p in pasts if (p.profile, p.name) != (past.profile, past.name)]
        pasts.append(past)
        self._history[ip] = pasts[-8:]
        while len(self._history) > HISTORY:
            self._history.popitem(last=False)

    def entries(self, now: float) -> Iterator[tuple[Key, float]]:
        """Every live set entry and its expiry (for ``egressd grants``)."""
        for set_name_, entries_ in self._sets.items():
            for sub, exp in entries_.items():
                if exp > now:
                    key = (set_name_, sub, 0, 0) if isinstance(sub, str) else (set_name_, *sub)
                    yield key, exp

    def names_by_address(self, now: float) -> dict[tuple[str, str], list[str]]:
        """(profile, ip) -> the names whose live answers justify it, sorted: ``names`` for
        every entry at once (for ``egressd grants``)."""
        out: dict[tuple[str, str], list[str]] = {}
        for profile, names in self._reasons.items():
            for r in names.values():
                for ip, exp in r.items():
                    if exp > now:
                        out.setdefault((profile, ip), []).append(r.name)
        for names_ in out.values():
            names_.sort()
        return out

    def about(self, ip: str) -> tuple[list[Reason], list[Past]]:
        """What is known of an address, for any profile: the reasons naming it (live, or
        run out but not pruned yet: their ``addrs[ip]`` says which), and pruned ones."""
        have = self._by_ip.get(ip)
        reasons = [] if have is None else [have] if isinstance(have, Reason) else list(have)
        return reasons, list(self._history.get(ip, ()))

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
        for names in self._reasons.values():
            for name, r in list(names.items()):
                justified_before.update(r.keys())
                entries = judge(r)
                self._unlink(r)
                if entries is None:
                    del names[name]
                    continue
                # What it justifies from now on: the addresses and ports judged.
                judged = {e.ip for e in entries}
                r._assign({ip: exp for ip, exp in r.items() if ip in judged})
                self._link(r)
                r.ports = tuple(sorted({e.port for e in entries if e.port}))
                for e in entries:
                    exp = r.expiry(e.ip) or 0.0
                    if exp <= now:
                        continue
                    prev = desired.get(e.key)
                    if prev is None or prev[1] < exp:
                        desired[e.key] = (e, exp)

        adds: list[Write] = []
        for key, (e, exp) in desired.items():
            have = self._expiry(key)
            # Missing, or granted for longer than anything still justifies (a revoked
            # name had extended it): write it with the justified timeout.
            if have is None or have > exp + 1:
                timeout = max(1, math.ceil(exp - now))
                adds.append(Write(e.set_name, e.family, e.ip, timeout, e.proto, e.port, e.comment))
                self._sets.setdefault(key[0], {})[_sub(key)] = self._stamp(exp)
        removes: list[Write] = []
        for set_name_, entries_ in self._sets.items():
            for sub in list(entries_):
                key = (set_name_, sub, 0, 0) if isinstance(sub, str) else (set_name_, *sub)
                if key in desired or key not in justified_before:
                    continue  # still justified, or taken over from the kernel (unknown reason)
                del entries_[sub]
                if set_name_ in sets:
                    _, ip, proto, port = key
                    removes.append(Write(set_name_, family_of(ip), ip, 0, proto, port))
        return adds, removes
