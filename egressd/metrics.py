"""Prometheus metrics over HTTP on a loopback address (``daemon.metrics``; off by default).

The numbers are the daemon's status snapshot (the same dict ``egressd status`` shows) and
the upstream latency buckets, turned into metric families at scrape time by a collector
on a private registry: nothing is counted twice, and the query path pays nothing for
metrics beyond the latency bisect (egressd.upstream.Latency).

Served from the daemon's own event loop with a minimal HTTP/1.0 server rather than
prometheus_client's thread: the snapshot is then read between two queries, never while
the loop is changing it, and no thread runs in a daemon that is otherwise single-threaded.
GET (or HEAD) /metrics answers in the text format 0.0.4 that every Prometheus reads; any
other path is a 404. A request has MAX_REQUEST octets and READ_TIMEOUT seconds to arrive
and be answered, and at most MAX_CLIENTS are served at a time: a local user who can reach
the port can hold a few sockets, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

MAX_REQUEST = 4096  # the request line and headers; a scraper sends a few hundred octets
READ_TIMEOUT = 5.0  # seconds for a whole exchange (read the request, write the answer)
MAX_CLIENTS = 8
INF = float("inf")

Snapshot = Mapping[str, Any]
SnapshotSource = Callable[[], Snapshot | Awaitable[Snapshot]]


class Buckets(Protocol):
    """Latency counts as egressd.upstream.Latency keeps them (structural: the adapters
    do not import each other)."""

    @property
    def bounds(self) -> Sequence[float]: ...  # upper bounds, seconds, ascending

    @property
    def counts(self) -> Sequence[int]: ...  # per bucket, not cumulative; last = above all

    @property
    def sum(self) -> float: ...


# Counters of egressd.stats.Stats (the snapshot's "totals") with a metric of their own.
# allowed/blocked/refused are left out: egressd_queries_total has them per profile.
# servfail_upstream/servfail_grant become one metric with a cause label (below). A
# counter added to Stats later and not named here is exported as egressd_<name>_total.
TOTALS: dict[str, tuple[str, str]] = {
    "queries": ("egressd_messages", "DNS messages handled, every profile, malformed ones too."),
    "malformed": ("egressd_malformed", "Messages dropped: not a parsable DNS query."),
    "dropped_busy": (
        "egressd_dropped_busy",
        "Queries dropped because too many were in flight (the client retries).",
    ),
    "internal_errors": ("egressd_internal_errors", "Queries answered SERVFAIL because of a bug."),
    "blocked_unlogged": (
        "egressd_blocked_unlogged",
        "Blocked queries left out of the journal by its rate limit.",
    ),
    "cache_hits": ("egressd_cache_hits", "Queries answered from egressd's cache."),
    "grant_writes": ("egressd_grant_writes", "Set entries written to the kernel."),
    "grant_skips": (
        "egressd_grant_skips",
        "Set entries not written because the kernel's entry still lasted long enough.",
    ),
    "repairs": (
        "egressd_repairs",
        "Times the firewall rules or sets were found changed and repaired.",
    ),
    "reloads": ("egressd_reloads", "Successful reloads."),
    "reload_failures": ("egressd_reload_failures", "Failed reloads (the old policy kept running)."),
    "stale_answers": (
        "egressd_stale_answers",
        "Answers a reload overtook, decided again under the new policy.",
    ),
    "revoked": ("egressd_revoked", "Set entries a reload took back."),
    "connections_blocked": (
        "egressd_connections_blocked",
        "Rejected connections read back from NFLOG (attributed in the journal).",
    ),
    "nflog_malformed": ("egressd_nflog_malformed", "NFLOG messages that could not be read."),
    "nflog_overruns": (
        "egressd_nflog_overruns",
        "Times the kernel dropped NFLOG messages (egressd read too slowly).",
    ),
}
NOT_EXPORTED = frozenset({"allowed", "blocked", "refused", "servfail_upstream", "servfail_grant"})
SERVFAIL_CAUSES = {"servfail_upstream": "upstream", "servfail_grant": "grant"}


def families(snap: Snapshot, latency: Buckets) -> list[Metric]:
    """The metric families of one snapshot (what a scrape shows)."""
    out: list[Metric] = []
    info = GaugeMetricFamily(
        "egressd_build_info", "egressd's version (always 1).", labels=["version"]
    )
    info.add_metric([str(snap.get("version", ""))], 1)
    out.append(info)
    out.append(
        GaugeMetricFamily(
            "egressd_healthy",
            "1 when egressd status reports no problem, else 0.",
            value=1 if snap.get("healthy") else 0,
        )
    )

    profiles = list(snap.get("profiles", ()))
    mode = GaugeMetricFamily(
        "egressd_profile_info", "A profile and its mode (always 1).", labels=["profile", "mode"]
    )
    queries = CounterMetricFamily(
        "egressd_queries",
        "Queries per profile by outcome: answered, blocked, refused, servfail, audited.",
        labels=["profile", "verdict"],
    )
    grants = GaugeMetricFamily(
        "egressd_grants", "Live set entries (allowed addresses) per profile.", labels=["profile"]
    )
    entries = GaugeMetricFamily(
        "egressd_set_entries", "Entries in a kernel set.", labels=["profile", "set"]
    )
    maxelem = GaugeMetricFamily(
        "egressd_set_maxelem", "Capacity of a kernel set.", labels=["profile", "set"]
    )
    for p in profiles:
        name = str(p["name"])
        mode.add_metric([name, str(p.get("mode", "enforce"))], 1)
        for verdict, n in p.get("counts", {}).items():
            queries.add_metric([name, str(verdict)], n)
        if "grants" in p:
            grants.add_metric([name], p["grants"])
        for s in p.get("sets", ()):
            entries.add_metric([name, str(s["name"])], s["entries"])
            maxelem.add_metric([name, str(s["name"])], s["maxelem"])
    out += [mode, queries, grants, entries, maxelem]

    totals: Mapping[str, int] = snap.get("totals", {})
    servfail = CounterMetricFamily(
        "egressd_servfail",
        "Queries answered SERVFAIL by cause: no upstream answer, or the grant failed.",
        labels=["cause"],
    )
    for field, cause in SERVFAIL_CAUSES.items():
        if field in totals:
            servfail.add_metric([cause], totals[field])
    out.append(servfail)
    for field, value in totals.items():
        if field in NOT_EXPORTED:
            continue
        name, doc = TOTALS.get(field, (f"egressd_{field}", f"Stats.{field}."))
        out.append(CounterMetricFamily(name, doc, value=value))

    reload = snap.get("last_reload")
    if reload:
        out.append(
            GaugeMetricFamily(
                "egressd_last_reload_timestamp_seconds",
                "When the last reload was tried (unix time).",
                value=float(reload["at"]),
            )
        )
        out.append(
            GaugeMetricFamily(
                "egressd_last_reload_success",
                "1 when the last reload succeeded, else 0.",
                value=1 if reload["ok"] else 0,
            )
        )
    repair = snap.get("last_repair")
    if repair:
        out.append(
            GaugeMetricFamily(
                "egressd_last_repair_timestamp_seconds",
                "When the firewall state was last repaired (unix time).",
                value=float(repair["at"]),
            )
        )
    out.append(histogram(latency))
    return out


def histogram(latency: Buckets) -> HistogramMetricFamily:
    """The upstream latency as a Prometheus histogram (cumulative buckets, +Inf last)."""
    cumulative, buckets = 0, []
    for bound, n in zip((*latency.bounds, INF), latency.counts, strict=True):
        cumulative += n
        buckets.append(("+Inf" if bound == INF else repr(bound), float(cumulative)))
    return HistogramMetricFamily(
        "egressd_upstream_latency_seconds",
        "Time from asking the upstream resolvers to their answer, failovers included.",
        buckets=buckets,
        sum_value=latency.sum,
    )


class _Scrape(Collector):
    """Hands the registry the families of the snapshot being served."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return self.metrics


class Exposition:
    """The private registry: egressd's families plus the standard process_* metrics (CPU,
    memory, open fds, start time: a few /proc reads per scrape, and what shows a leak)."""

    def __init__(self, latency: Buckets, *, process: bool = True) -> None:
        self.latency = latency
        self.registry = CollectorRegistry()
        self._scrape = _Scrape()
        self.registry.register(self._scrape)
        if process:
            ProcessCollector(registry=self.registry)

    def render(self, snap: Snapshot) -> bytes:
        """The text format of one snapshot."""
        self._scrape.metrics = families(snap, self.latency)
        try:
            return generate_latest(self.registry)
        finally:
            self._scrape.metrics = []


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of "127.0.0.1:9153" or "[::1]:9153" (config checked the form)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    """Serves /metrics on one address at a time; ``serve`` moves it, ``close`` stops it."""

    def __init__(
        self,
        snapshot: SnapshotSource,
        latency: Buckets,
        *,
        timeout: float = READ_TIMEOUT,
        max_request: int = MAX_REQUEST,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.snapshot = snapshot
        self.exposition = Exposition(latency)
        self.timeout = timeout
        self.max_request = max_request
        self.max_clients = max_clients
        self.address = ""  # where it serves now; "" = nowhere
        self.scrapes = 0
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def serve(self, address: str) -> None:
        """Serve on ``address`` ("" = stop). Nothing happens when it serves there already.
        OSError when the address cannot be bound; then it goes on where it was."""
        if address == self.address:
            return
        if not address:
            await self.close()
            return
        host, port = split_address(address)
        server = await asyncio.start_server(self._client, host, port, limit=self.max_request)
        await self.close()
        self._server, self.address = server, address

    @property
    def port(self) -> int:
        """The port it listens on (the kernel's pick for port 0); 0 when serving nowhere."""
        if self._server is None or not self._server.sockets:
            return 0
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        server, self._server, self.address = self._server, None, ""
        if server is not None:
            server.close()
            for task in list(self._clients):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._clients, return_exceptions=True)
                await server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._clients) >= self.max_clients:
            writer.close()
            return
        self._clients.add(task)
        try:
            async with asyncio.timeout(self.timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                status, body, head_only = await self._respond(head)
                ctype = (
                    CONTENT_TYPE_PLAIN_0_0_4 if status == "200 OK" else "text/plain; charset=utf-8"
                )
                writer.write(
                    f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + (b"" if head_only else body)
                )
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # slow, oversized or gone: dropped without an answer
        finally:
            self._clients.discard(task)
            writer.close()

    async def _respond(self, head: bytes) -> tuple[str, bytes, bool]:
        """(status line, body, HEAD?) for one request head."""
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", b"bad request\n", False
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET /metrics\n", False
        if target.split(b"?", 1)[0] != b"/metrics":
            return "404 Not Found", b"egressd serves /metrics only\n", method == b"HEAD"
        try:
            snap = self.snapshot()
            if inspect.isawaitable(snap):
                snap = await snap
            body = self.exposition.render(snap)
        except Exception as err:  # noqa: BLE001 - a bug costs the scrape, not the daemon
            return "500 Internal Server Error", f"{type(err).__name__}: {err}\n".encode(), False
        self.scrapes += 1
        return "200 OK", body, method == b"HEAD"
