"""egressd end to end: the real daemon, iptables, ipset, conntrack and journald, in the
lab's namespaces (see lab.py). The agent is uid 64123, run with setpriv.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from lab import (
    INET_V4,
    ROGUE_ANSWER,
    ROGUE_V4,
    ROGUE_V6,
    Daemon,
    Lab,
    poll,
)

pytestmark = pytest.mark.netns

AGENT = 64123
OTHER = 64999
PORT = 153


def write_config(
    lab: Lab,
    allow: list[str],
    *,
    name: str = "egressd.toml",
    grants: str = "",
    daemon: str = "",
    profile: str = "",
    upstreams: tuple[str, ...] = (INET_V4,),
    upstream_timeout: float = 1.0,
    verify_interval: float = 1.0,
    users: tuple[int | str, ...] = (AGENT,),
) -> Path:
    """A config + allowlist file in the lab's root-only temp dir."""
    allowlist = lab.tmpdir / f"{name}.allow.txt"
    allowlist.write_text("# test allowlist\n" + "\n".join(allow) + "\n", encoding="utf-8")
    path = lab.tmpdir / name
    path.write_text(
        f"""
[daemon]
upstreams = {json.dumps(list(upstreams))}
upstream_timeout = {upstream_timeout}
verify_interval = {verify_interval}
{daemon}

[grants]
{grants}

[profiles.agent]
users = {json.dumps(list(users))}
allowlists = ["{allowlist.name}"]
port = {PORT}
{profile}
""",
        encoding="utf-8",
    )
    return path


def start(
    lab: Lab, config: Path, *, journald: bool = False, env: dict[str, str] | None = None
) -> Daemon:
    log = "journal" if journald else "json"
    d = lab.start_daemon(["run", "--config", str(config), "--log", log], journald=journald, env=env)
    d.wait_ready()
    return d


def events(d: Daemon, event: str) -> list[dict[str, Any]]:
    return [e for e in d.stderr_json() if e.get("event") == event]


def ipset_members(lab: Lab, name: str) -> dict[str, int]:
    out = lab.netns_exec("host", ["ipset", "list", name]).stdout
    members: dict[str, int] = {}
    in_members = False
    for line in out.splitlines():
        if line.startswith("Members:"):
            in_members = True
            continue
        if in_members and line.strip():
            parts = line.split()
            members[parts[0]] = int(parts[2]) if len(parts) >= 3 else 0
    return members


def rogue_sees_others(lab: Lab) -> None:
    """Positive twin of "the rogue resolver got nothing from the agent": an unrestricted
    user's query does reach it, and its log shows it."""
    r = lab.agent("dnsq", ROGUE_V4, 53, "twin.test", "A", "udp", uid=OTHER)
    assert r["ok"], r
    assert lab.rogue.queries(qname="twin.test.")


BASIC = {
    "ok.test.": [["A", "203.0.113.10", 300], ["AAAA", "2001:db8:113::10", 300]],
    "blocked.test.": [["A", "203.0.113.66", 300]],
}


# 1 -----------------------------------------------------------------------------------------


def test_allowed_name_connects_blocked_fails_fast_unresolved_ip_rejected(lab: Lab) -> None:
    lab.dns.set(BASIC)
    start(lab, write_config(lab, ["ok.test"]))

    r = lab.agent("resolve", "ok.test", "any")
    assert r["ok"], r
    assert set(r["addrs"]) == {"203.0.113.10", "2001:db8:113::10"}
    assert lab.agent("connect", "203.0.113.10", 80)["ok"]
    assert lab.agent("connect", "2001:db8:113::10", 443)["ok"]

    blocked = lab.agent("resolve", "blocked.test", "any")
    assert not blocked["ok"] and blocked["gaierror"] == "EAI_NONAME", blocked
    assert blocked["elapsed"] < 1.0

    for ip in ("203.0.113.66", "2001:db8:113::66"):
        c = lab.agent("connect", ip, 80, 10)
        assert not c["ok"] and c["error"] in ("refused", "reset", "unreachable"), c
        assert c["elapsed"] < 1.0, c
    u = lab.agent("udp", "203.0.113.66", 9999, 5)
    assert not u["ok"] and u["error"] != "timeout", u
    assert lab.echo.connections(dst="203.0.113.66") == []
    assert lab.echo.connections(dst="203.0.113.10")  # the echo log does record connections
    assert lab.rogue.queries() == []
    rogue_sees_others(lab)


# 2 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", [ROGUE_V4, ROGUE_V6, "192.0.2.53"])
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dns_to_any_server_is_answered_by_egressd(lab: Lab, server: str, proto: str) -> None:
    lab.dns.set(BASIC)
    start(lab, write_config(lab, ["ok.test"]))

    # 192.0.2.53 is an address nobody has: only the redirect can answer there.
    ok = lab.agent("dnsq", server, 53, "ok.test", "A", proto, "--edns")
    assert ok["ok"] and ok["rcode"] == "NOERROR", ok
    assert [a[2] for a in ok["answers"]] == ["203.0.113.10"], ok  # not the rogue's answer
    assert ROGUE_ANSWER not in json.dumps(ok)

    bad = lab.agent("dnsq", server, 53, "blocked.test", "A", proto, "--edns")
    assert bad["rcode"] == "NXDOMAIN" and bad["answers"] == [], bad
    assert bad["ede"] and bad["ede"][0][0] == 15 and "egressd" in bad["ede"][0][1], bad
    assert lab.rogue.queries() == []
    rogue_sees_others(lab)


# 3 -----------------------------------------------------------------------------------------


def test_blocked_query_never_reaches_upstream(lab: Lab) -> None:
    lab.dns.set(BASIC)
    d = start(lab, write_config(lab, ["ok.test", "!deny.ok.test", "**.wild.test"]))
    secret = "c2VjcmV0.exfil.example"
    for qtype in ("A", "AAAA", "TXT", "MX"):
        for proto in ("udp", "tcp"):
            r = lab.agent("dnsq", ROGUE_V4, 53, secret, qtype, proto)
            assert r["rcode"] == "NXDOMAIN", r
    r = lab.agent("dnsq", ROGUE_V4, 53, "deny.ok.test", "A", "udp")
    assert r["rcode"] == "NXDOMAIN", r
    # An allowed query, carrying an EDNS option (client subnet) that must not be forwarded.
    r = lab.agent("dnsq", ROGUE_V4, 53, "ok.test", "A", "udp", "--edns", "--opt=8:00012000c6336400")
    assert r["rcode"] == "NOERROR", r

    upstream = lab.dns.queries()
    names = {q["qname"] for q in upstream}
    assert names == {"ok.test."}, upstream
    assert all(not q.get("edns_options") for q in upstream), upstream
    assert lab.rogue.queries() == []
    rogue_sees_others(lab)
    blocked = events(d, "QueryBlocked")
    assert {e["EGRESSD_QNAME"] for e in blocked} == {secret, "deny.ok.test"}
    deny = [e for e in blocked if e["EGRESSD_QNAME"] == "deny.ok.test"][0]
    assert deny["EGRESSD_VERDICT"] == "deny" and deny["EGRESSD_RULE"].endswith(".allow.txt:3")


# 4 -----------------------------------------------------------------------------------------


def test_rotated_address_new_ip_works_old_expires_live_connection_survives(lab: Lab) -> None:
    lab.dns.set({"rot.test.": [["A", "203.0.113.20", 1]]})
    # Grant = clamp(TTL, 1, 2) + 1: short enough to watch it expire.
    start(lab, write_config(lab, ["rot.test"], grants="floor = 1\nceiling = 2\ngrace = 1"))

    assert lab.agent("resolve", "rot.test", "4")["addrs"] == ["203.0.113.20"]
    held: dict[str, Any] = {}
    holder = threading.Thread(
        target=lambda: held.update(lab.agent("hold", "203.0.113.20", 80, 7, timeout=30))
    )
    holder.start()
    time.sleep(0.5)  # the connection is open now, before the grant expires

    lab.dns.set({"rot.test.": [["A", "203.0.113.21", 1]]})
    new = poll(lambda: lab.agent("resolve", "rot.test", "4")["addrs"] == ["203.0.113.21"], 10)
    assert new, "the new address never came through"
    assert lab.agent("connect", "203.0.113.21", 80)["ok"]

    # The old address is granted for at most 3 s after its last answer.
    gone = poll(lambda: not lab.agent("connect", "203.0.113.20", 80, 3)["ok"], 10)
    assert gone, "the old address stayed reachable after its grant expired"
    assert "203.0.113.20" not in ipset_members(lab, "egressd-agent-v4")
    holder.join(30)
    assert held.get("ok"), f"a connection opened before expiry was cut: {held}"


# 5 -----------------------------------------------------------------------------------------


def test_race_200_fresh_names_connect_immediately(lab: Lab) -> None:
    names = [f"n{i}.race.test" for i in range(1, 201)]
    lab.dns.set({f"{n}.": [["A", f"203.0.113.{i}", 300]] for i, n in enumerate(names, start=1)})
    start(lab, write_config(lab, ["*.race.test"]))
    r = lab.agent(
        "many", json.dumps(names), "--port=80", "--timeout=3", "--workers=16", timeout=120
    )
    failures = [x for x in r["results"] if not x["ok"]]
    assert r["n_ok"] == 200 and not failures, failures[:5]


# 6 -----------------------------------------------------------------------------------------


def test_cname_target_addresses_are_granted_and_deny_on_target_wins(lab: Lab) -> None:
    lab.dns.set(
        {
            "alias.test.": [["CNAME", "edge.cdn.example.", 300]],
            "edge.cdn.example.": [["A", "203.0.113.30", 300], ["AAAA", "2001:db8:113::30", 300]],
            "sneaky.test.": [["CNAME", "tracker.cdn.example.", 300]],
            "tracker.cdn.example.": [["A", "203.0.113.31", 300]],
        }
    )
    d = start(lab, write_config(lab, ["alias.test", "sneaky.test", "!tracker.cdn.example"]))
    r = lab.agent("resolve", "alias.test", "any")
    assert set(r["addrs"]) == {"203.0.113.30", "2001:db8:113::30"}, r
    assert lab.agent("connect", "203.0.113.30", 80)["ok"]
    assert lab.agent("connect", "2001:db8:113::30", 80)["ok"]
    # The target itself is not on the allowlist: asked directly, it is blocked.
    assert lab.agent("resolve", "edge.cdn.example", "4")["gaierror"] == "EAI_NONAME"
    assert lab.agent("resolve", "sneaky.test", "4")["gaierror"] == "EAI_NONAME"
    assert not lab.agent("connect", "203.0.113.31", 80, 3)["ok"]
    deny = [e for e in events(d, "QueryBlocked") if e["EGRESSD_QNAME"] == "sneaky.test"]
    assert deny and deny[0]["EGRESSD_VERDICT"] == "deny", events(d, "QueryBlocked")


# 7 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stop_and_crash_fail_closed_then_recover(lab: Lab, how: str) -> None:
    lab.dns.set({**BASIC, "later.test.": [["A", "203.0.113.40", 300]]})
    config = write_config(lab, ["ok.test", "later.test"])
    d = start(lab, config)
    assert lab.agent("resolve", "ok.test", "4")["ok"]
    assert lab.agent("connect", "203.0.113.10", 80)["ok"]

    if how == "SIGTERM":
        assert d.stop() == 0
        assert any("STOPPING=1" in n for n in d.notifications())
    else:
        d.kill()

    # Nothing new: no DNS answer (not even from the rogue resolver), no new address.
    r = lab.agent("resolve", "later.test", "4")
    assert not r["ok"] and r["elapsed"] < 3, r
    assert not lab.agent("connect", "203.0.113.40", 80, 3)["ok"]
    assert not lab.agent("dnsq", ROGUE_V4, 53, "later.test", "A", "tcp", "--timeout=2")["ok"]
    # What was granted keeps working.
    assert lab.agent("connect", "203.0.113.10", 80)["ok"]
    assert lab.rogue.queries() == []
    rogue_sees_others(lab)

    d2 = start(lab, config)
    assert "203.0.113.10" in ipset_members(lab, "egressd-agent-v4")  # grants kept
    assert lab.agent("resolve", "later.test", "4")["addrs"] == ["203.0.113.40"]
    assert lab.agent("connect", "203.0.113.40", 80)["ok"]
    assert lab.agent("connect", "203.0.113.10", 80)["ok"]
    assert d2.running
    # Applying the rules again did not duplicate the jumps.
    rules = lab.netns_exec("host", ["iptables", "-S", "OUTPUT"]).stdout
    assert rules.count("-j EGRESSD-OUTPUT") == 1, rules
    nat = lab.netns_exec("host", ["iptables", "-t", "nat", "-S", "OUTPUT"]).stdout
    assert nat.count("-j EGRESSD-DNS") == 1, nat


# 8 -----------------------------------------------------------------------------------------


def test_reload_applies_new_allowlist_and_survives_a_broken_config(lab: Lab) -> None:
    lab.dns.set(
        {
            "a.test.": [["A", "203.0.113.50", 300]],
            "b.test.": [["A", "203.0.113.51", 300]],
        }
    )
    config = write_config(lab, ["a.test"])
    d = start(lab, config)
    assert lab.agent("resolve", "a.test", "4")["ok"]
    assert lab.agent("resolve", "b.test", "4")["gaierror"] == "EAI_NONAME"

    (lab.tmpdir / "egressd.toml.allow.txt").write_text("b.test\n", encoding="utf-8")
    d.signal(signal.SIGHUP)
    assert poll(lambda: len(events(d, "Reloaded")) == 1, 10), d.stderr_text()
    assert lab.agent("resolve", "b.test", "4")["addrs"] == ["203.0.113.51"]
    assert lab.agent("connect", "203.0.113.51", 80)["ok"]
    assert lab.agent("resolve", "a.test", "4")["gaierror"] == "EAI_NONAME"
    # Its grant is taken back too (test_live_policy.py has the details).
    assert not lab.agent("connect", "203.0.113.50", 80, 3)["ok"]
    notes = d.notifications()
    assert any("RELOADING=1" in n for n in notes) and sum("READY=1" in n for n in notes) >= 2

    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("[grants]", "[grants]\nfloorr = 3"), encoding="utf-8")
    d.signal(signal.SIGHUP)
    failed = poll(lambda: events(d, "ReloadFailed"), 10)
    assert failed, d.stderr_text()
    msg = failed[0]["EGRESSD_ERROR"]
    line = text.replace("[grants]", "[grants]\nfloorr = 3").splitlines().index("floorr = 3") + 1
    assert f"{config}:{line}" in msg and "grants.floorr" in msg, msg
    # The old policy runs on.
    assert lab.agent("resolve", "b.test", "4")["ok"]
    assert lab.agent("resolve", "a.test", "4")["gaierror"] == "EAI_NONAME"
    assert d.running


# 9 -----------------------------------------------------------------------------------------


def test_blocked_query_is_a_structured_journald_record(lab: Lab) -> None:
    lab.dns.set(BASIC)
    start(lab, write_config(lab, ["ok.test"]), journald=True)
    assert lab.agent("resolve", "blocked.test", "4")["gaierror"] == "EAI_NONAME"
    records = lab.journal_wait("EGRESSD_QNAME=blocked.test", "EGRESSD_QTYPE=A")
    assert records, "no journal record for the blocked query"
    rec = records[0]
    assert rec["MESSAGE_ID"] == "1cf3818a89bc4b63bd9688aac4e787a2"
    assert rec["EGRESSD_VERDICT"] == "block"
    assert rec["EGRESSD_PROFILE"] == "agent"
    assert rec["EGRESSD_UIDS"] == str(AGENT)
    assert rec["SYSLOG_IDENTIFIER"] == "egressd"
    assert "blocked.test" in rec["MESSAGE"]
    by_verdict = lab.journal_query("EGRESSD_VERDICT=block")
    assert any(r["EGRESSD_QNAME"] == "blocked.test" for r in by_verdict)
    assert lab.journal_query("EGRESSD_QNAME=ok.test") == []  # allowed queries are not logged


# 10 ----------------------------------------------------------------------------------------


def test_other_uids_are_not_affected(lab: Lab) -> None:
    lab.dns.set(BASIC)
    start(lab, write_config(lab, ["ok.test"]))
    r = lab.agent("resolve", "blocked.test", "4", uid=OTHER)
    assert r["addrs"] == [ROGUE_ANSWER], r  # its DNS went to its own resolver
    assert lab.rogue.queries(qname="blocked.test.")
    assert lab.agent("connect", "203.0.113.66", 80, uid=OTHER)["ok"]
    assert lab.agent("udp", "203.0.113.66", 9999, uid=OTHER)["ok"]
    assert lab.agent("connect", "2001:db8:113::66", 80, uid=OTHER)["ok"]
    root = lab.netns_exec(
        "host", ["dig", "+short", "+time=2", "+tries=1", f"@{ROGUE_V4}", "anything.test"]
    )
    assert root.stdout.strip() == ROGUE_ANSWER
    # ...while the agent, at the same moment, is still restricted.
    assert not lab.agent("connect", "203.0.113.66", 80, 3)["ok"]


# lifecycle, protocol and safety details ------------------------------------------------------


def test_sd_notify_status_and_watchdog(lab: Lab) -> None:
    lab.dns.set(BASIC)
    d = start(lab, write_config(lab, ["ok.test"]), env={"WATCHDOG_USEC": "200000"})
    assert poll(lambda: sum("WATCHDOG=1" in n for n in d.notifications()) >= 3, 5)
    ready = [n for n in d.notifications() if "READY=1" in n]
    assert ready and "STATUS=" in ready[0]


def test_truncated_upstream_answer_is_fetched_over_tcp(lab: Lab) -> None:
    lab.dns.set(
        {
            "big.test.": [["A", f"203.0.113.{i}", 300] for i in range(100, 104)],
            "__tc__": ["big.test."],
        }
    )
    start(lab, write_config(lab, ["big.test"]))
    r = lab.agent("resolve", "big.test", "4")
    assert set(r["addrs"]) == {f"203.0.113.{i}" for i in range(100, 104)}, r
    transports = [q["transport"] for q in lab.dns.queries(qname="big.test.")]
    assert "udp" in transports and "tcp" in transports, transports
    assert all(lab.agent("connect", f"203.0.113.{i}", 80)["ok"] for i in range(100, 104))


def test_malformed_and_unsupported_messages(lab: Lab) -> None:
    lab.dns.set(BASIC)
    start(lab, write_config(lab, ["ok.test"]))
    garbage = lab.agent("dnsraw", ROGUE_V4, 53, "deadbeef00", "udp", "--timeout=1")
    assert not garbage["ok"] and garbage["error"] == "timeout", garbage  # dropped, no reply
    # Two questions (ok.test A twice): refused locally, never forwarded.
    q = "ok.test"
    qname = b"".join(bytes([len(p)]) + p.encode() for p in q.split(".")) + b"\0"
    two = bytes.fromhex("123401000002000000000000") + (qname + b"\x00\x01\x00\x01") * 2
    r = lab.agent("dnsraw", ROGUE_V4, 53, two.hex(), "udp")
    assert r["rcode"] == "REFUSED", r
    # Class CH (e.g. version.bind): refused.
    ch = (
        bytes.fromhex("123401000001000000000000") + b"\x07version\x04bind\x00" + b"\x00\x10\x00\x03"
    )
    assert lab.agent("dnsraw", ROGUE_V4, 53, ch.hex(), "udp")["rcode"] == "REFUSED"
    assert lab.dns.queries() == []
    # And egressd still answers (through the fake DNS, whose log shows it).
    assert lab.agent("resolve", "ok.test", "4")["ok"]
    assert lab.dns.queries(qname="ok.test.")


def test_listener_port_cannot_be_squatted(lab: Lab) -> None:
    lab.dns.set(BASIC)
    # egressd refuses an unprivileged port...
    d = lab.start_daemon(
        [
            "run",
            "--user",
            str(AGENT),
            "--allow",
            "ok.test",
            "--upstream",
            INET_V4,
            "--listen",
            "127.0.0.1:5353",
            "--log",
            "json",
        ]
    )
    assert d.wait(15) == 2
    assert "ip_unprivileged_port_start" in d.stderr_text()
    # ...and its own port cannot be bound by the agent while egressd is not running.
    code = (
        "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).bind(('127.0.0.1', 153))"
    )
    r = lab.netns_exec(
        "host",
        [
            "setpriv",
            f"--reuid={AGENT}",
            f"--regid={AGENT}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            code,
        ],
        check=False,
    )
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_one_line_form_and_min_ttl(lab: Lab) -> None:
    lab.dns.set({"short.test.": [["A", "203.0.113.60", 0]]})
    allowlist = lab.tmpdir / "one.txt"
    allowlist.write_text("short.test\n", encoding="utf-8")
    d = lab.start_daemon(
        [
            "run",
            "--user",
            str(AGENT),
            "--allowlist",
            str(allowlist),
            "--upstream",
            INET_V4,
            "--listen",
            "127.0.0.1:154",
            "--min-ttl",
            "120",
            "--log",
            "json",
        ]
    )
    d.wait_ready()
    assert lab.agent("resolve", "short.test", "4")["addrs"] == ["203.0.113.60"]
    timeout = ipset_members(lab, "egressd-default-v4")["203.0.113.60"]
    # TTL 0 still gets the floor (120) + grace (60); never 0, which ipset would keep forever.
    assert 170 <= timeout <= 180, timeout
    assert lab.agent("connect", "203.0.113.60", 80)["ok"]


def output_rules(lab: Lab, table: str = "filter", tool: str = "iptables") -> list[str]:
    out = lab.netns_exec("host", [tool, "-t", table, "-S", "OUTPUT"]).stdout
    return [ln for ln in out.splitlines() if ln.startswith("-A OUTPUT")]


@pytest.mark.parametrize(
    "tamper",
    [
        # another tool flushes egressd's chains and drops its jump, adding its own rule
        [
            ["iptables", "-F", "EGRESSD-OUTPUT"],
            ["iptables", "-D", "OUTPUT", "-j", "EGRESSD-OUTPUT"],
            ["iptables", "-I", "OUTPUT", "1", "-j", "ACCEPT"],
        ],
        # a profile chain emptied: the jump into it would fall through to ACCEPT
        [["iptables", "-F", "EGRESSD-P-agent"], ["ip6tables", "-F", "EGRESSD-P-agent"]],
        # a foreign ACCEPT inserted above egressd's jump, in filter and nat
        [
            ["iptables", "-I", "OUTPUT", "1", "-j", "ACCEPT"],
            ["iptables", "-t", "nat", "-I", "OUTPUT", "1", "-j", "ACCEPT"],
        ],
        # the redirect gone
        [["iptables", "-t", "nat", "-F", "EGRESSD-DNS"]],
        # a set destroyed (after its rules are gone, as `iptables -F` + `ipset destroy` do)
        [["iptables", "-F", "EGRESSD-P-agent"], ["ipset", "destroy", "egressd-agent-v4"]],
    ],
    ids=["flush-and-unjump", "empty-profile-chain", "foreign-rule-first", "no-redirect", "set"],
)
def test_self_healing_after_tampering(lab: Lab, tamper: list[list[str]]) -> None:
    lab.dns.set(BASIC)
    d = start(lab, write_config(lab, ["ok.test"]))
    before = {t: lab.netns_exec("host", [t]).stdout for t in ("iptables-save", "ip6tables-save")}
    assert lab.agent("resolve", "ok.test", "4")["ok"]
    for cmd in tamper:
        lab.netns_exec("host", cmd)
    repaired = poll(lambda: events(d, "Repaired"), 10)
    assert repaired, d.stderr_text()
    for table, chain in (("filter", "EGRESSD-OUTPUT"), ("nat", "EGRESSD-DNS")):
        rules = output_rules(lab, table)
        assert rules[0] == f"-A OUTPUT -j {chain}", rules
        assert rules.count(f"-A OUTPUT -j {chain}") == 1, rules
    for tool in ("iptables-save", "ip6tables-save"):
        after = lab.netns_exec("host", [tool]).stdout
        egressd_lines = sorted(ln for ln in after.splitlines() if "EGRESSD" in ln)
        assert egressd_lines == sorted(ln for ln in before[tool].splitlines() if "EGRESSD" in ln), (
            tool
        )
    assert not lab.agent("connect", "203.0.113.66", 80, 3)["ok"]
    assert lab.agent("resolve", "ok.test", "4")["ok"]  # grants written again where lost
    assert lab.agent("connect", "203.0.113.10", 80)["ok"]
    assert lab.agent("resolve", "blocked.test", "4")["gaierror"] == "EAI_NONAME"
    assert lab.rogue.queries() == []
    rogue_sees_others(lab)


def test_uninstall_removes_exactly_what_egressd_added(lab: Lab) -> None:
    lab.dns.set(BASIC)
    lab.netns_exec("host", ["iptables", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "DROP"])
    lab.netns_exec("host", ["ipset", "create", "foreign", "hash:ip"])
    d = start(lab, write_config(lab, ["ok.test"]))
    assert d.stop() == 0
    r = lab.start_process([sys.executable, "-m", "egressd", "uninstall"], name="uninstall")
    assert r.wait(30) == 0, r.stderr_text()
    for tool in ("iptables-save", "ip6tables-save"):
        saved = lab.netns_exec("host", [tool]).stdout
        assert "EGRESSD" not in saved, saved
    assert "--dport 9 -j DROP" in lab.netns_exec("host", ["iptables", "-S", "OUTPUT"]).stdout
    sets = lab.netns_exec("host", ["ipset", "list", "-n"]).stdout.split()
    assert sets == ["foreign"], sets
    # And the agent is free again (uninstall is the explicit opt-out).
    assert lab.agent("connect", "203.0.113.66", 80)["ok"]


def test_a_flood_of_blocked_names_is_summarised_not_logged_one_by_one(lab: Lab) -> None:
    lab.dns.set(BASIC)
    d = start(lab, write_config(lab, ["ok.test"]))
    names = [f"flood{i}.blocked.example" for i in range(600)]
    started = time.monotonic()
    r = lab.agent("many", json.dumps(names), "--workers=32", timeout=120)
    elapsed = time.monotonic() - started
    assert r["n_ok"] == 0
    unlogged = poll(lambda: events(d, "Unlogged"), 5)
    assert unlogged, d.stderr_text()[-2000:]
    logged = len(events(d, "QueryBlocked"))
    skipped = sum(int(e["EGRESSD_COUNT"]) for e in unlogged)
    assert logged <= 200 + 50 * (elapsed + 2), logged  # burst + rate
    assert logged + skipped >= 600  # every blocked query was either logged or counted
    assert lab.agent("resolve", "ok.test", "4")["ok"]  # and egressd still answers


def test_changed_grant_settings_and_maxelem_keep_the_sets_and_their_grants(lab: Lab) -> None:
    lab.dns.set(BASIC)
    config = write_config(lab, ["ok.test"], grants="maxelem = 1024")
    d = start(lab, config)
    assert lab.agent("resolve", "ok.test", "4")["ok"]
    assert d.stop() == 0

    # Another floor and grace (the sets' own parameters never depend on them) and a bigger
    # set: a restart takes the sets over, resized, with the grant still in place.
    config.write_text(
        config.read_text().replace("maxelem = 1024", "maxelem = 4096\nfloor = 100\ngrace = 5")
    )
    d = start(lab, config)
    header = lab.netns_exec("host", ["ipset", "list", "-t", "egressd-agent-v4"]).stdout
    assert "maxelem 4096" in header, header
    assert "203.0.113.10" in ipset_members(lab, "egressd-agent-v4")
    assert lab.agent("connect", "203.0.113.10", 80)["ok"]

    # And on reload.
    config.write_text(config.read_text().replace("maxelem = 4096", "maxelem = 2048"))
    d.signal(signal.SIGHUP)
    assert poll(lambda: events(d, "Reloaded"), 10), d.stderr_text()
    header = lab.netns_exec("host", ["ipset", "list", "-t", "egressd-agent-v4"]).stdout
    assert "maxelem 2048" in header, header
    assert "203.0.113.10" in ipset_members(lab, "egressd-agent-v4")
    assert lab.agent("connect", "203.0.113.10", 80)["ok"]
    sets = lab.netns_exec("host", ["ipset", "list", "-n"]).stdout.split()
    assert sorted(sets) == [f"egressd-agent-{k}" for k in ("p4", "p6", "v4", "v6")], sets


def test_upstream_failover_and_a_dead_upstream_gives_servfail(lab: Lab) -> None:
    lab.dns.set(BASIC)
    # 198.51.100.77 is on the lab's link but nobody answers there: each try times out.
    dead = "198.51.100.77"
    d = start(lab, write_config(lab, ["ok.test"], upstreams=(dead, INET_V4), upstream_timeout=0.5))
    r = lab.agent("dnsq", ROGUE_V4, 53, "ok.test", "A", "udp", "--timeout=5")
    assert r["rcode"] == "NOERROR" and [a[2] for a in r["answers"]] == ["203.0.113.10"], r
    assert r["elapsed"] < 2.0, r  # one timed-out try, then the next server
    assert d.stop() == 0

    d = start(lab, write_config(lab, ["ok.test"], upstreams=(dead,), upstream_timeout=0.5))
    r = lab.agent("dnsq", ROGUE_V4, 53, "ok.test", "A", "udp", "--edns", "--timeout=10")
    assert r["rcode"] == "SERVFAIL" and r["answers"] == [], r
    assert poll(lambda: events(d, "UpstreamFailed"), 5)


def test_a_full_set_means_servfail_never_an_unreachable_address(lab: Lab) -> None:
    names = [f"f{i}.full.test" for i in range(1, 131)]
    lab.dns.set({f"{n}.": [["A", f"203.0.113.{i}", 300]] for i, n in enumerate(names, start=1)})
    d = start(lab, write_config(lab, ["*.full.test"], grants="maxelem = 128"))
    results = [lab.agent("dnsq", ROGUE_V4, 53, n, "A", "udp") for n in names]
    rcodes = [r["rcode"] for r in results]
    assert rcodes[:128] == ["NOERROR"] * 128, rcodes
    assert rcodes[128:] == ["SERVFAIL", "SERVFAIL"], rcodes
    assert all(r["answers"] == [] for r in results[128:])
    failed = poll(lambda: events(d, "GrantFailed"), 5)
    assert failed and "full" in failed[0]["EGRESSD_ERROR"], failed
    assert lab.agent("connect", "203.0.113.128", 80)["ok"]
    assert not lab.agent("connect", "203.0.113.129", 80, 3)["ok"]
    assert d.running


def test_reload_moves_the_listener_to_a_new_port(lab: Lab) -> None:
    lab.dns.set(BASIC)
    config = write_config(lab, ["ok.test"])
    d = start(lab, config)
    assert lab.agent("resolve", "ok.test", "4")["ok"]
    config.write_text(config.read_text().replace(f"port = {PORT}", "port = 155"))
    d.signal(signal.SIGHUP)
    assert poll(lambda: events(d, "Reloaded"), 10), d.stderr_text()
    nat = lab.netns_exec("host", ["iptables", "-t", "nat", "-S", "EGRESSD-DNS"]).stdout
    assert "--to-ports 155" in nat and f"--to-ports {PORT}" not in nat, nat
    for server in (ROGUE_V4, ROGUE_V6):
        for proto in ("udp", "tcp"):
            r = lab.agent("dnsq", server, 53, "ok.test", "A", proto)
            assert r["rcode"] == "NOERROR", (server, proto, r)
    assert lab.agent("resolve", "blocked.test", "4")["gaierror"] == "EAI_NONAME"
    # The old port is closed, and the agent may not talk to it anyway.
    old = lab.agent("dnsq", "127.0.0.1", PORT, "ok.test", "A", "udp", "--timeout=2")
    assert not old["ok"], old
    listening = lab.netns_exec("host", ["ss", "-lnu"]).stdout
    assert f":{PORT} " not in listening and ":155 " in listening, listening
