"""Metrics end to end: the real daemon in the lab, scraped by root in the host namespace.

The counters move by exactly what the agent did; metrics are off unless configured and
follow the address through a reload; the agent uid cannot reach the port (loopback is
closed to it), another uid can.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from lab import Daemon, Lab, poll
from prometheus_client.parser import text_string_to_metric_families
from test_egressd import BASIC, OTHER, events, start, write_config

pytestmark = pytest.mark.netns

MPORT = 9153
MPORT2 = 9154

# Run by root in the host namespace: one HTTP/1.0 GET on a raw socket (no proxy settings,
# no name lookup); on stdout the status line, a newline, the body.
GET = """
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as s:
    s.sendall(b"GET " + sys.argv[2].encode() + b" HTTP/1.0\\r\\nHost: egressd\\r\\n\\r\\n")
    out = b""
    while chunk := s.recv(65536):
        out += chunk
head, _, body = out.partition(b"\\r\\n\\r\\n")
sys.stdout.write(head.split(b"\\r\\n")[0].decode() + "\\n" + body.decode())
"""
# Exit 0 when something accepts a TCP connection on the port, 1 when refused.
KNOCK = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
except ConnectionRefusedError:
    sys.exit(1)
"""


def http_get(lab: Lab, port: int, path: str = "/metrics") -> tuple[str, str]:
    """(status line, body) as root in the host namespace."""
    out = lab.netns_exec("host", [sys.executable, "-c", GET, str(port), path]).stdout
    status, _, body = out.partition("\n")
    return status, body


def scrape(lab: Lab, port: int = MPORT) -> dict[str, float]:
    """Every egressd_ sample as 'name{label="value",...}' -> value."""
    status, body = http_get(lab, port)
    assert status == "HTTP/1.0 200 OK", (status, body[:500])
    if os.environ.get("EGRESSD_SHOW_SCRAPE"):  # for docs/commands/metrics.md
        print(body)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def listens(lab: Lab, port: int) -> bool:
    r = lab.netns_exec("host", [sys.executable, "-c", KNOCK, str(port)], check=False)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode == 0


def config(lab: Lab, metrics: str | None) -> Path:
    daemon = f'control = "{lab.tmpdir}/control"'
    if metrics is not None:
        daemon += f'\nmetrics = "{metrics}"'
    return write_config(lab, ["ok.test"], daemon=daemon)


QUERIES = 'egressd_queries_total{profile="agent",verdict="%s"}'


def test_counters_move_by_exactly_what_the_agent_did(lab: Lab) -> None:
    lab.dns.set(BASIC)
    start(lab, config(lab, f"127.0.0.1:{MPORT}"))
    before = scrape(lab)
    for verdict in ("answered", "blocked", "refused", "servfail"):
        assert before[QUERIES % verdict] == 0
    assert before["egressd_upstream_latency_seconds_count"] == 0
    assert before["egressd_messages_total"] == 0
    assert before['egressd_grants{profile="agent"}'] == 0
    assert before["egressd_healthy"] == 1

    ok = lab.agent("dnsq", "192.0.2.53", 53, "ok.test", "A", "udp")
    assert ok["ok"] and ok["rcode"] == "NOERROR", ok
    bad = lab.agent("dnsq", "192.0.2.53", 53, "blocked.test", "A", "udp")
    assert bad["rcode"] == "NXDOMAIN", bad

    after = scrape(lab)
    assert after[QUERIES % "answered"] == 1
    assert after[QUERIES % "blocked"] == 1
    assert after[QUERIES % "refused"] == after[QUERIES % "servfail"] == 0
    assert after["egressd_messages_total"] == 2
    # one upstream resolution (the blocked name never left the host), answered in time
    assert after["egressd_upstream_latency_seconds_count"] == 1
    assert 0 < after["egressd_upstream_latency_seconds_sum"] < 1.0
    assert after['egressd_upstream_latency_seconds_bucket{le="1.0"}'] == 1
    assert after['egressd_grants{profile="agent"}'] == 1  # 203.0.113.10
    sets = {k: v for k, v in after.items() if k.startswith("egressd_set_entries")}
    assert sum(sets.values()) == 1, sets
    assert all(v > 0 for k, v in after.items() if k.startswith("egressd_set_maxelem"))
    assert after["egressd_grant_writes_total"] == 1
    assert after["process_open_fds"] > 0


def test_metrics_are_off_by_default_and_follow_the_config_through_reloads(lab: Lab) -> None:
    lab.dns.set(BASIC)
    path = config(lab, None)
    d = start(lab, path)
    assert lab.agent("dnsq", "192.0.2.53", 53, "ok.test", "A", "udp")["ok"]  # serving
    assert not listens(lab, MPORT)

    config(lab, f"127.0.0.1:{MPORT}")  # same file, metrics on
    reload(d, 1)
    assert listens(lab, MPORT)  # twin of the check above
    assert scrape(lab)["egressd_reloads_total"] == 1

    config(lab, f"127.0.0.1:{MPORT2}")  # moved
    reload(d, 2)
    assert listens(lab, MPORT2) and not listens(lab, MPORT)
    m = scrape(lab, MPORT2)
    assert m["egressd_reloads_total"] == 2 and m[QUERIES % "answered"] == 1

    config(lab, "")  # off again
    reload(d, 3)
    assert not listens(lab, MPORT2)
    assert not [e for e in events(d, "Error") if "metrics" in str(e)]


def reload(d: Daemon, n: int) -> None:
    d.signal(signal.SIGHUP)
    assert poll(lambda: len(events(d, "Reloaded")) >= n, 10), d.stderr_text()[-3000:]


def test_the_agent_cannot_reach_the_metrics_port(lab: Lab) -> None:
    lab.dns.set(BASIC)
    start(lab, config(lab, f"127.0.0.1:{MPORT}"))
    # The same probe (TCP connects for a while) as the agent and as another uid.
    agent = lab.agent("probe", 0.5, MPORT, "127.0.0.1", "--timeout=2")
    assert agent["attempts"] and not agent["successes"], agent
    assert "timeout" not in agent["errors"], agent  # rejected at once, not left hanging
    other = lab.agent("probe", 0.5, MPORT, "127.0.0.1", "--timeout=2", uid=OTHER)
    assert other["successes"], other  # twin: another uid gets through
    assert scrape(lab)  # and root


def test_a_taken_metrics_port_is_an_error_and_egressd_serves_dns_anyway(lab: Lab) -> None:
    lab.dns.set(BASIC)
    squatter = lab.start_process(
        [
            sys.executable,
            "-c",
            "import socket, time; s = socket.socket(); "
            f"s.bind(('127.0.0.1', {MPORT})); s.listen(); time.sleep(600)",
        ],
        name="squatter",
    )
    assert poll(lambda: listens(lab, MPORT), 10), squatter.stderr_text()
    d = start(lab, config(lab, f"127.0.0.1:{MPORT}"))
    errors = [e for e in events(d, "Error") if "metrics" in str(e)]
    assert errors and f"127.0.0.1:{MPORT}" in str(errors[0]), events(d, "Error")
    ok = lab.agent("dnsq", "192.0.2.53", 53, "ok.test", "A", "udp")
    assert ok["ok"] and ok["rcode"] == "NOERROR", ok
    # twin: the same start on a free port says nothing of metrics (first test: it serves)
    d.stop()
    d2 = start(lab, config(lab, f"127.0.0.1:{MPORT2}"))
    assert not [e for e in events(d2, "Error") if "metrics" in str(e)]
    assert scrape(lab, MPORT2)["egressd_healthy"] == 1
