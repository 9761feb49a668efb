"""BlockLog: a flood of blocked queries is summarised, other events always pass."""

from __future__ import annotations

from egressd.blocklog import BlockLog
from egressd.events import Event, QueryBlocked, QueryRefused, Reloaded, Unlogged


def blocked(i: int) -> QueryBlocked:
    return QueryBlocked("agent", (64123,), f"x{i}.example", "A", "block", "")


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
    assert seen[-1] == Unlogged(8, "QueryBlocked=7,QueryRefused=1")
    assert log.unlogged == 0 and log.unlogged_total == 8
    log.flush()  # nothing new: no empty summary
    assert seen[-1] == Unlogged(8, "QueryBlocked=7,QueryRefused=1") and len(seen) == 7


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
