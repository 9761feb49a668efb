"""BlockLog: a flood of blocked queries is summarised, other events always pass."""

from __future__ import annotations

from egressd.blocklog import BlockLog
from egressd.events import Event, QueryBlocked, QueryRefused, Reloaded, Unlogged


def blocked(i: int, profile: str = "agent") -> QueryBlocked:
    return QueryBlocked(profile, (64123,), f"x{i}.example", "A", "block", "")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_passes_then_excess_is_counted_and_summarised() -> None:
    seen: list[Event] = []
    clock = Clock()
    log = BlockLog(seen.append, rate=10, burst=5, clock=clock)
    for i in range(12):
        log(blocked(i))
    assert [e.qname for e in seen if isinstance(e, QueryBlocked)] == [
        f"x{i}.example" for i in range(5)
    ]
    assert log.unlogged == 7
    log(Reloaded("/etc/egressd/egressd.toml", "abc"))  # never rate-limited
    assert isinstance(seen[-1], Reloaded)
    log(QueryRefused("agent", "2 questions"))  # also per query: counted with the rest
    log.flush()
    assert seen[-1] == Unlogged(8, "agent:QueryBlocked=7,agent:QueryRefused=1")
    assert log.unlogged == 0 and log.unlogged_total == 8
    log.flush()  # nothing new: no empty summary
    assert seen[-1] == Unlogged(8, "agent:QueryBlocked=7,agent:QueryRefused=1")
    assert len(seen) == 7


def test_tokens_refill_with_time() -> None:
    seen: list[Event] = []
    clock = Clock()
    log = BlockLog(seen.append, rate=10, burst=2, clock=clock)
    for i in range(4):
        log(blocked(i))
    assert len(seen) == 2
    clock.now += 0.5  # 5 tokens at 10/s, capped at the burst of 2
    for i in range(4, 8):
        log(blocked(i))
    assert len(seen) == 4 and log.unlogged == 4


def test_one_profiles_flood_does_not_use_up_another_profiles_budget() -> None:
    seen: list[Event] = []
    clock = Clock()
    log = BlockLog(seen.append, rate=10, burst=5, clock=clock)
    for i in range(1000):  # the agent floods: 5 logged, 995 counted
        log(blocked(i))
    for i in range(2):  # the build profile's records all get through
        log(blocked(i, profile="build"))
        log(QueryRefused("build", "2 questions"))
    build = [e for e in seen if getattr(e, "profile", "") == "build"]
    assert len(build) == 4
    assert sum(1 for e in seen if getattr(e, "profile", "") == "agent") == 5
    # Each profile has its own burst of 5: build's fifth passes, its sixth is counted.
    log(blocked(98, profile="build"))
    log(blocked(99, profile="build"))
    assert len(seen) == 10
    log.flush()
    assert seen[-1] == Unlogged(996, "agent:QueryBlocked=995,build:QueryBlocked=1")
    # And each refills on its own: after 0.2 s both profiles log two more each.
    clock.now += 0.2
    for i in range(3):
        log(blocked(i))
        log(blocked(i, profile="build"))
    assert len(seen) == 11 + 4
