"""Metrics: the families of a status snapshot, parsed back with prometheus_client's own
parser; the upstream latency buckets (pure, and counted by the real resolver against a
fake server); the HTTP endpoint on real loopback sockets: 200 on /metrics, 404 elsewhere,
an oversized, slow or surplus client dropped, and the server moved and closed.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import fields
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from egressd.config import Upstream
from egressd.errors import UpstreamError
from egressd.metrics import NOT_EXPORTED, TOTALS, Exposition, MetricsServer, families
from egressd.stats import Stats
from egressd.upstream import LATENCY_BUCKETS, Latency, UpstreamResolver

SNAPSHOT: dict[str, Any] = {
    "version": "9.8.7",
    "pid": 4242,
    "config": "/etc/egressd/egressd.toml",
    "policy": "abc123",
    "started": 1_700_000_000.5,
    "healthy": False,
    "problems": ["the last reload failed"],
    "rules_checked": "on nf_tables events",
    "upstreams": ["198.51.100.1:53"],
    "profiles": [
        {
            "name": "agent",
            "mode": "enforce",
            "uids": [64123],
            "uid_ranges": [],
            "port": 153,
            "listeners": ["127.0.0.1:153"],
            "counts": {"answered": 10, "blocked": 4, "refused": 1, "servfail": 2, "audited": 0},
            "grants": 7,
            "sets": [
                {"name": "egressd-agent-4", "entries": 5, "maxelem": 65536},
                {"name": "egressd-agent-6", "entries": 2, "maxelem": 65536},
            ],
        },
        {
            "name": "learner",
            "mode": "audit",
            "uids": [64124],
            "uid_ranges": [[100000, 165535]],
            "port": 154,
            "listeners": ["127.0.0.1:154"],
            "counts": {"answered": 3, "blocked": 0, "refused": 0, "servfail": 0, "audited": 3},
            "grants": 0,
            "sets": [{"name": "egressd-learner-4", "entries": 0, "maxelem": 1024}],
        },
    ],
    "totals": {
        **{f.name: 0 for f in fields(Stats) if f.name != "profiles"},
        "queries": 21,
        "malformed": 1,
        "dropped_busy": 6,
        "servfail_upstream": 2,
        "servfail_grant": 0,
        "cache_hits": 5,
        "repairs": 3,
        "reloads": 2,
        "reload_failures": 1,
    },
    "last_reload": {"at": 1_700_000_100.0, "ok": False, "error": "bad line", "policy": "abc123"},
    "last_repair": {"at": 1_700_000_050.0, "what": "rule missing", "window_ms": 12},
}


def scrape(text: str) -> dict[str, float]:
    """Every sample as 'name{label="value",...}' -> value (labels sorted)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[key(s)] = s.value
    return out


def key(s: Sample) -> str:
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
    return f"{s.name}{{{labels}}}" if labels else s.name


def render(snap: dict[str, Any], latency: Latency | None = None) -> str:
    return Exposition(latency or Latency(), process=False).render(snap).decode()


# --- the families of a snapshot --------------------------------------------------------------


def test_snapshot_families_parse_back() -> None:
    m = scrape(render(SNAPSHOT))
    q = 'egressd_queries_total{profile="%s",verdict="%s"}'
    assert m[q % ("agent", "answered")] == 10
    assert m[q % ("agent", "blocked")] == 4
    assert m[q % ("agent", "refused")] == 1
    assert m[q % ("agent", "servfail")] == 2
    assert m[q % ("learner", "audited")] == 3
    assert m['egressd_profile_info{mode="audit",profile="learner"}'] == 1
    assert m['egressd_profile_info{mode="enforce",profile="agent"}'] == 1
    assert m['egressd_grants{profile="agent"}'] == 7
    assert m['egressd_set_entries{profile="agent",set="egressd-agent-4"}'] == 5
    assert m['egressd_set_maxelem{profile="learner",set="egressd-learner-4"}'] == 1024
    assert m['egressd_servfail_total{cause="upstream"}'] == 2
    assert m['egressd_servfail_total{cause="grant"}'] == 0
    assert m["egressd_messages_total"] == 21
    assert m["egressd_malformed_total"] == 1
    assert m["egressd_dropped_busy_total"] == 6
    assert m["egressd_cache_hits_total"] == 5
    assert m["egressd_repairs_total"] == 3
    assert m["egressd_reloads_total"] == 2
    assert m["egressd_reload_failures_total"] == 1
    assert m['egressd_build_info{version="9.8.7"}'] == 1
    assert m["egressd_healthy"] == 0
    assert m["egressd_last_reload_success"] == 0
    assert m["egressd_last_reload_timestamp_seconds"] == 1_700_000_100.0
    assert m["egressd_last_repair_timestamp_seconds"] == 1_700_000_050.0
    # per profile already: not repeated as unlabelled totals
    assert not [k for k in m if k.startswith(("egressd_allowed", "egressd_blocked_total"))]


def test_counters_are_counters_and_gauges_gauges() -> None:
    types = {f.name: f.type for f in text_string_to_metric_families(render(SNAPSHOT))}
    assert types["egressd_queries"] == "counter"
    assert types["egressd_repairs"] == "counter"
    assert types["egressd_servfail"] == "counter"
    assert types["egressd_grants"] == "gauge"
    assert types["egressd_set_entries"] == "gauge"
    assert types["egressd_upstream_latency_seconds"] == "histogram"


def test_every_stats_counter_is_in_the_scrape() -> None:
    # Each counter a distinct value, found again under its metric (per profile: in
    # egressd_queries_total; servfail: by cause), named in TOTALS or by the fallback.
    totals = {name: 1000 + i for i, name in enumerate(Stats().totals())}
    m = scrape(render({**SNAPSHOT, "totals": totals}))
    values = {v for k, v in m.items() if k.startswith("egressd_")}
    missing = {n for n, v in totals.items() if v not in values and n not in NOT_EXPORTED}
    assert not missing
    assert m['egressd_servfail_total{cause="grant"}'] == totals["servfail_grant"]
    assert not set(TOTALS) & NOT_EXPORTED


def test_a_counter_stats_gains_later_is_exported_by_its_name() -> None:
    snap = {**SNAPSHOT, "totals": {**SNAPSHOT["totals"], "new_thing": 5}}
    assert scrape(render(snap))["egressd_new_thing_total"] == 5
    assert "egressd_new_thing_total" not in scrape(render(SNAPSHOT))  # twin


def test_no_reload_or_repair_yet_and_a_healthy_daemon() -> None:
    snap = {**SNAPSHOT, "healthy": True, "last_reload": None, "last_repair": None}
    m = scrape(render(snap))
    assert m["egressd_healthy"] == 1
    assert not [k for k in m if k.startswith(("egressd_last_reload", "egressd_last_repair"))]


def test_an_empty_snapshot_still_renders() -> None:
    m = scrape(render({}))
    assert m["egressd_healthy"] == 0
    assert m["egressd_upstream_latency_seconds_count"] == 0


def test_process_metrics_come_from_this_process() -> None:
    text = Exposition(Latency()).render(SNAPSHOT).decode()
    m = scrape(text)
    assert m["process_open_fds"] > 0 and m["process_resident_memory_bytes"] > 0
    assert "process_open_fds" not in scrape(render(SNAPSHOT))  # twin: process=False


# --- latency buckets -------------------------------------------------------------------------


def test_latency_buckets_are_upper_bounds_and_cumulative_in_the_histogram() -> None:
    lat = Latency((0.01, 0.1, 1.0))
    for v in (0.0, 0.01, 0.0100001, 0.1, 0.5, 1.0, 3.0, 30.0):
        lat.observe(v)
    assert lat.counts == [2, 2, 2, 2]  # le: a value on a bound counts in that bucket
    m = scrape(render(SNAPSHOT, lat))
    b = 'egressd_upstream_latency_seconds_bucket{le="%s"}'
    assert [m[b % le] for le in ("0.01", "0.1", "1.0", "+Inf")] == [2, 4, 6, 8]
    assert m["egressd_upstream_latency_seconds_count"] == 8
    assert m["egressd_upstream_latency_seconds_sum"] == pytest.approx(34.6200001)


def test_default_buckets_ascend_and_cover_a_failover() -> None:
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    assert LATENCY_BUCKETS[0] <= 0.001 and LATENCY_BUCKETS[-1] >= 5.0
    assert len(Latency().counts) == len(LATENCY_BUCKETS) + 1


class _Upstream(asyncio.DatagramProtocol):
    """Answers each query after `delay` seconds: SERVFAIL when `rcode` says so, or not at
    all when `silent`."""

    def __init__(self, delay: float, rcode: int = 0, silent: bool = False) -> None:
        self.delay, self.rcode, self.silent = delay, rcode, silent
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.silent:
            return
        qid, flags = struct.unpack_from("!HH", data)
        question = data[12:-11]  # before our OPT record
        reply = struct.pack("!6H", qid, flags | 0x8080 | self.rcode, 1, 0, 0, 0) + question
        asyncio.get_running_loop().call_later(self.delay, self.transport.sendto, reply, addr)


@asynccontextmanager
async def upstream(delay: float, rcode: int = 0, silent: bool = False) -> AsyncIterator[Upstream]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Upstream(delay, rcode, silent), local_addr=("127.0.0.1", 0)
    )
    try:
        yield Upstream("127.0.0.1", transport.get_extra_info("sockname")[1])
    finally:
        transport.close()


def test_the_resolver_counts_each_answer_once_in_a_shared_latency() -> None:
    lat = Latency((0.01, 0.05, 1.0))

    async def main() -> None:
        async with upstream(0.02) as slow, upstream(0.0, rcode=2) as failing:
            r1 = UpstreamResolver((slow,), 1.0, 1, lat)
            # three callers of one question in flight: one upstream resolution, one count
            await asyncio.gather(*(r1.resolve((b"a", b"test"), 1, True) for _ in range(3)))
            assert lat.counts == [0, 1, 0, 0]
            # a new resolver (a reload) keeps counting in the same buckets
            r2 = UpstreamResolver((failing,), 1.0, 1, lat)
            await r2.resolve((b"b", b"test"), 1, True)  # SERVFAIL is an answer too
            assert sum(lat.counts) == 2 and lat.counts[0] == 1

    asyncio.run(main())
    assert 0.02 <= lat.sum < 1.0


def test_no_answer_is_no_latency() -> None:
    lat = Latency()

    async def main() -> None:
        async with upstream(0.0, silent=True) as mute:
            r = UpstreamResolver((mute,), 0.05, 2, lat)
            with pytest.raises(UpstreamError):
                await r.resolve((b"a", b"test"), 1, True)

    asyncio.run(main())
    assert sum(lat.counts) == 0 and lat.sum == 0.0


# --- the HTTP endpoint -----------------------------------------------------------------------


@asynccontextmanager
async def serving(
    snapshot: Callable[[], Any] | None = None, **kw: Any
) -> AsyncIterator[MetricsServer]:
    server = MetricsServer(snapshot or (lambda: SNAPSHOT), Latency(), **kw)
    await server.serve("127.0.0.1:0")
    try:
        yield server
    finally:
        await server.close()


async def exchange(port: int, request: bytes, *, host: str = "127.0.0.1") -> bytes:
    """What the server sends back until it closes (b"" = dropped without an answer)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:  # closed with our request unread: dropped, unanswered
        return b""
    finally:
        writer.close()


def split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


def test_get_metrics_is_200_in_the_text_format() -> None:
    async def main() -> None:
        async with serving() as srv:
            status, headers, body = split(
                await exchange(srv.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            )
            assert status == "HTTP/1.0 200 OK"
            assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert int(headers["Content-Length"]) == len(body)
            assert scrape(body.decode())['egressd_grants{profile="agent"}'] == 7
            # a query string is ignored; HEAD has the headers only
            assert split(await exchange(srv.port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"))[0] == (
                "HTTP/1.0 200 OK"
            )
            status, headers, body = split(
                await exchange(srv.port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
            )
            assert (
                status == "HTTP/1.0 200 OK" and body == b"" and int(headers["Content-Length"]) > 0
            )
            assert srv.scrapes == 3

    asyncio.run(main())


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"GET / HTTP/1.0", "HTTP/1.0 404 Not Found"),
        (b"GET /metricsx HTTP/1.0", "HTTP/1.0 404 Not Found"),
        (b"GET /metrics/ HTTP/1.1", "HTTP/1.0 404 Not Found"),
        (b"POST /metrics HTTP/1.0", "HTTP/1.0 405 Method Not Allowed"),
        (b"GET /metrics", "HTTP/1.0 400 Bad Request"),
        (b"\x16\x03\x01 hello", "HTTP/1.0 400 Bad Request"),
    ],
)
def test_anything_else_is_refused(request_line: bytes, status: str) -> None:
    async def main() -> None:
        async with serving() as srv:
            assert split(await exchange(srv.port, request_line + b"\r\n\r\n"))[0] == status
            assert srv.scrapes == 0

    asyncio.run(main())


def test_oversized_request_is_dropped_unanswered() -> None:
    async def main() -> None:
        async with serving(max_request=1024) as srv:
            big = b"GET /metrics HTTP/1.0\r\nX-Pad: " + b"a" * 2000 + b"\r\n\r\n"
            assert await exchange(srv.port, big) == b""
            # twin: the same request under the limit is answered
            small = b"GET /metrics HTTP/1.0\r\nX-Pad: " + b"a" * 500 + b"\r\n\r\n"
            assert (await exchange(srv.port, small)).startswith(b"HTTP/1.0 200 OK")

    asyncio.run(main())


def test_slow_request_is_dropped_after_the_timeout() -> None:
    async def main() -> None:
        async with serving(timeout=0.3) as srv:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            began = loop.time()
            writer.write(b"GET /metrics HTTP/1.0\r\n")  # and never the blank line
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert 0.25 <= loop.time() - began < 5
            writer.close()
            # twin: a prompt request on the same server is answered
            assert (await exchange(srv.port, b"GET /metrics HTTP/1.0\r\n\r\n")).startswith(
                b"HTTP/1.0 200"
            )

    asyncio.run(main())


def test_clients_beyond_the_bound_are_turned_away() -> None:
    async def main() -> None:
        async with serving(max_clients=2) as srv:
            idle = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(2)]
            await asyncio.sleep(0.1)  # both accepted and waiting for their request
            assert await exchange(srv.port, b"GET /metrics HTTP/1.0\r\n\r\n") == b""
            for _, w in idle:
                w.close()
            await asyncio.sleep(0.1)
            assert (await exchange(srv.port, b"GET /metrics HTTP/1.0\r\n\r\n")).startswith(
                b"HTTP/1.0 200"
            )

    asyncio.run(main())


def test_a_failing_snapshot_is_a_500_and_the_server_goes_on() -> None:
    calls: list[int] = []

    def snapshot() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("profiles")
        return SNAPSHOT

    async def main() -> None:
        async with serving(snapshot) as srv:
            status, _, body = split(await exchange(srv.port, b"GET /metrics HTTP/1.0\r\n\r\n"))
            assert status == "HTTP/1.0 500 Internal Server Error" and b"KeyError" in body
            status, _, _ = split(await exchange(srv.port, b"GET /metrics HTTP/1.0\r\n\r\n"))
            assert status == "HTTP/1.0 200 OK"

    asyncio.run(main())


def test_an_async_snapshot_is_awaited() -> None:
    async def snapshot() -> dict[str, Any]:
        await asyncio.sleep(0)
        return SNAPSHOT

    async def main() -> None:
        async with serving(snapshot) as srv:
            body = split(await exchange(srv.port, b"GET /metrics HTTP/1.0\r\n\r\n"))[2]
            assert scrape(body.decode())["egressd_reloads_total"] == 2

    asyncio.run(main())


def listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


@pytest.fixture
def two_ports() -> Iterator[tuple[int, int]]:
    """Two ports free on 127.0.0.1 just now (held until the test runs)."""
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = tuple(s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    yield ports[0], ports[1]


def test_serve_moves_stays_and_stops(two_ports: tuple[int, int]) -> None:
    a, b = two_ports

    async def main() -> None:
        srv = MetricsServer(lambda: SNAPSHOT, Latency())
        assert srv.address == "" and srv.port == 0
        await srv.serve(f"127.0.0.1:{a}")
        assert listening(a) and not listening(b)
        await srv.serve(f"127.0.0.1:{a}")  # unchanged: nothing happens
        assert srv.port == a
        await srv.serve(f"127.0.0.1:{b}")
        assert listening(b) and not listening(a) and srv.address == f"127.0.0.1:{b}"
        await srv.serve("")
        assert not listening(b) and srv.address == ""
        await srv.serve(f"127.0.0.1:{a}")
        await srv.close()
        assert not listening(a) and srv.address == ""

    asyncio.run(main())


def test_a_taken_address_raises_and_the_old_one_keeps_serving(two_ports: tuple[int, int]) -> None:
    a, b = two_ports

    async def main() -> None:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", b))
            squatter.listen()
            srv = MetricsServer(lambda: SNAPSHOT, Latency())
            await srv.serve(f"127.0.0.1:{a}")
            with pytest.raises(OSError):
                await srv.serve(f"127.0.0.1:{b}")
            assert srv.address == f"127.0.0.1:{a}"
            assert (await exchange(a, b"GET /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 200")
            await srv.close()

    asyncio.run(main())


def test_ipv6_loopback(two_ports: tuple[int, int]) -> None:
    async def main() -> None:
        srv = MetricsServer(lambda: SNAPSHOT, Latency())
        await srv.serve(f"[::1]:{two_ports[0]}")
        try:
            response = await exchange(two_ports[0], b"GET /metrics HTTP/1.0\r\n\r\n", host="::1")
            assert response.startswith(b"HTTP/1.0 200")
        finally:
            await srv.close()

    asyncio.run(main())


def test_close_ends_a_client_in_the_middle_of_its_request() -> None:
    async def main() -> None:
        srv = MetricsServer(lambda: SNAPSHOT, Latency())
        await srv.serve("127.0.0.1:0")
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET /metr")
        await asyncio.sleep(0.1)
        await asyncio.wait_for(srv.close(), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    asyncio.run(main())


def test_families_takes_the_snapshot_as_given() -> None:
    # pure: the same snapshot, the same families (no hidden state between scrapes)
    lat = Latency()
    assert [f.name for f in families(SNAPSHOT, lat)] == [f.name for f in families(SNAPSHOT, lat)]
