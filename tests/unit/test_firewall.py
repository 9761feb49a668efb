"""The iptables/ipset backend's command layer with a fake `_run`: no root, no netlink.

Each test scripts what iptables would print and records the commands the backend sends,
so the parsing of `iptables -S`, the order of the stale-chain clean-up and the combining
of `iptables-save` with `nft` are checked without touching this host's firewall.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from egressd.allowlist import parse_lines
from egressd.config import Config, DaemonSettings, GrantSettings, Profile, Upstream
from egressd.errors import FirewallError
from egressd.firewall import iptables_ipset
from egressd.firewall.iptables_ipset import IptablesIpset
from egressd.policy import Policy

Reply = tuple[int, str, str]


@dataclass
class FakeRun:
    """Stands in for iptables_ipset._run: answers by argv, records every call."""

    answers: dict[tuple[str, ...], Reply | list[Reply]] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    stdin: list[str | None] = field(default_factory=list)
    default: Reply = (0, "", "")

    async def __call__(self, argv: Sequence[str], stdin: str | None = None) -> Reply:
        key = tuple(argv)
        self.calls.append(key)
        self.stdin.append(stdin)
        got = self.answers.get(key, self.default)
        if isinstance(got, list):  # successive answers to the same command
            return got.pop(0) if len(got) > 1 else got[0]
        return got

    def commands(self, pred: Callable[[tuple[str, ...]], bool]) -> list[tuple[str, ...]]:
        return [c for c in self.calls if pred(c)]


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    fake = FakeRun()
    monkeypatch.setattr(iptables_ipset, "_run", fake)
    return fake


def backend(*families: int) -> IptablesIpset:
    fw = IptablesIpset()  # no netlink socket until a set is touched
    fw.families = families
    return fw


def policy(*names: str) -> Policy:
    path = "/etc/egressd/allowlist.d/x.txt"
    profiles = tuple(
        Profile(
            name=n,
            uids=(1000 + i,),
            port=153 + i,
            rules=tuple(parse_lines("**.example.com\n", path)),
        )
        for i, n in enumerate(names)
    )
    return Policy(
        Config(
            path="/etc/egressd/egressd.toml",
            daemon=DaemonSettings(upstreams=(Upstream("192.0.2.53"),), ct_mask=0xFF000000),
            grants=GrantSettings(floor=300, ceiling=86400, grace=60, maxelem=65536),
            profiles=profiles,
        )
    )


def output(*rules: str) -> Reply:
    return (0, "-P OUTPUT ACCEPT\n" + "".join(r + "\n" for r in rules), "")


# --- _jumps: parsing `iptables -S OUTPUT` ------------------------------------------------------


def test_jumps_missing_first_not_first_and_doubled(fake_run: FakeRun) -> None:
    fake_run.answers[("iptables", "-w", "-t", "filter", "-S", "OUTPUT")] = output(
        "-A OUTPUT -d 10.0.0.0/8 -j ACCEPT",  # foreign rule above egressd's jump
        "-A OUTPUT -j EGRESSD-OUTPUT",
    )
    fake_run.answers[("iptables", "-w", "-t", "nat", "-S", "OUTPUT")] = output(
        "-A OUTPUT -p udp -j DOCKER"  # no jump to EGRESSD-DNS at all
    )
    missing, stale = asyncio.run(backend(4)._jumps(4))
    assert missing == [("nat", "EGRESSD-DNS")]
    assert stale == {("filter", "EGRESSD-OUTPUT"): 1}

    fake_run.answers[("ip6tables", "-w", "-t", "filter", "-S", "OUTPUT")] = output(
        "-A OUTPUT -j EGRESSD-OUTPUT", "-A OUTPUT -j EGRESSD-OUTPUT"
    )
    fake_run.answers[("ip6tables", "-w", "-t", "nat", "-S", "OUTPUT")] = output(
        "-A OUTPUT -j EGRESSD-DNS", "-A OUTPUT -j DOCKER"
    )
    missing, stale = asyncio.run(backend(4, 6)._jumps(6))
    assert missing == []
    assert stale == {("filter", "EGRESSD-OUTPUT"): 2}  # first, but twice


def test_jumps_in_place_are_neither_missing_nor_stale(fake_run: FakeRun) -> None:
    fake_run.answers[("iptables", "-w", "-t", "filter", "-S", "OUTPUT")] = output(
        "-A OUTPUT -j EGRESSD-OUTPUT", "-A OUTPUT -d 10.0.0.0/8 -j ACCEPT"
    )
    fake_run.answers[("iptables", "-w", "-t", "nat", "-S", "OUTPUT")] = output(
        "-A OUTPUT -j EGRESSD-DNS"
    )
    # A rule that only mentions the chain in a comment is not the jump.
    assert asyncio.run(backend(4)._jumps(4)) == ([], {})
    fake_run.answers[("iptables", "-w", "-t", "nat", "-S", "OUTPUT")] = output(
        '-A OUTPUT -m comment --comment "-j EGRESSD-DNS" -j ACCEPT'
    )
    assert asyncio.run(backend(4)._jumps(4)) == ([("nat", "EGRESSD-DNS")], {})


def test_jumps_failure_is_a_firewall_error(fake_run: FakeRun) -> None:
    fake_run.answers[("iptables", "-w", "-t", "filter", "-S", "OUTPUT")] = (
        4,
        "",
        "iptables v1.8.9: can't initialize iptables table `filter'\n",
    )
    with pytest.raises(FirewallError, match="iptables -t filter -S OUTPUT failed: .*filter"):
        asyncio.run(backend(4)._jumps(4))


# --- _apply: restore, then the stale chains of removed profiles --------------------------------


def test_apply_flushes_every_stale_chain_before_deleting_any(fake_run: FakeRun) -> None:
    fake_run.answers[("iptables", "-w", "-t", "filter", "-S", "OUTPUT")] = output(
        "-A OUTPUT -j EGRESSD-OUTPUT"
    )
    fake_run.answers[("iptables", "-w", "-t", "nat", "-S", "OUTPUT")] = output(
        "-A OUTPUT -j EGRESSD-DNS"
    )
    # A reload removed profile "old": its three chains are left, "agent"'s are wanted.
    filter_listing = (
        0,
        "-P OUTPUT ACCEPT\n"
        "-N DOCKER\n"
        "-N EGRESSD-OUTPUT\n"
        "-N EGRESSD-P-agent\n-N EGRESSD-A-agent\n-N EGRESSD-R-agent\n"
        "-N EGRESSD-P-old\n-N EGRESSD-A-old\n-N EGRESSD-R-old\n"
        "-A OUTPUT -j EGRESSD-OUTPUT\n"
        "-A EGRESSD-P-old -j EGRESSD-A-old\n",
        "",
    )
    fake_run.answers[("iptables", "-w", "-t", "filter", "-S")] = filter_listing
    fake_run.answers[("iptables", "-w", "-t", "nat", "-S")] = (
        0,
        "-P OUTPUT ACCEPT\n-N EGRESSD-DNS\n-A OUTPUT -j EGRESSD-DNS\n",
        "",
    )
    fw = backend(4)
    asyncio.run(fw._apply(policy("agent"), 4))

    restores = [i for i, c in enumerate(fake_run.calls) if c[0] == "iptables-restore"]
    assert len(restores) == 1
    assert fake_run.calls[restores[0]] == ("iptables-restore", "-w", "--noflush")
    text = fake_run.stdin[restores[0]]
    assert text is not None and "EGRESSD-P-agent" in text and "EGRESSD-P-old" not in text

    cleanup = [c[4:] for c in fake_run.calls if c[4:5] in (("-F",), ("-X",))]
    old = ["EGRESSD-P-old", "EGRESSD-A-old", "EGRESSD-R-old"]
    assert cleanup == [("-F", c) for c in old] + [("-X", c) for c in old]
    # After the restore, never before: the new rules must no longer jump to them.
    first_cleanup = next(i for i, c in enumerate(fake_run.calls) if c[4:5] == ("-F",))
    assert first_cleanup > restores[0]
    # Nothing of the wanted chains, the nat table or foreign chains is touched.
    assert all(c[3] == "filter" for c in fake_run.calls if c[4:5] in (("-F",), ("-X",)))
    # verify's snapshot is what iptables printed after the clean-up.
    assert fw._applied[4]["nat"] == ("-N EGRESSD-DNS", "-A OUTPUT -j EGRESSD-DNS")


def test_restore_failure_says_unchanged_and_deletes_nothing(fake_run: FakeRun) -> None:
    fake_run.answers[("iptables-restore", "-w", "--noflush")] = (
        1,
        "",
        "iptables-restore: line 7 failed\n",
    )
    with pytest.raises(FirewallError, match=r"iptables-restore of the rules failed \(unchanged\)"):
        asyncio.run(backend(4)._apply(policy("agent"), 4))
    assert not [c for c in fake_run.calls if c[4:5] in (("-F",), ("-X",))]


# --- lock: deny-all where the filter jump is missing -------------------------------------------


def test_lock_writes_a_deny_all_only_where_the_jump_is_missing(fake_run: FakeRun) -> None:
    # IPv4 has egressd's jump (already closed); IPv6 has none (a first start).
    fake_run.answers[("iptables", "-w", "-t", "filter", "-S", "OUTPUT")] = output(
        "-A OUTPUT -j EGRESSD-OUTPUT"
    )
    asyncio.run(backend(4, 6).lock(policy("agent")))
    restores = [(c, s) for c, s in zip(fake_run.calls, fake_run.stdin, strict=True) if s]
    assert [c[0] for c, _ in restores] == ["ip6tables-restore"]
    assert "-I OUTPUT 1 -j EGRESSD-OUTPUT" in (restores[0][1] or "")


def test_lock_tries_every_family_and_reports_all_failures(fake_run: FakeRun) -> None:
    fake_run.answers[("iptables", "-w", "-t", "filter", "-S", "OUTPUT")] = (1, "", "v4 broken")
    with pytest.raises(FirewallError, match="v4 broken") as err:
        asyncio.run(backend(4, 6).lock(policy("agent")))
    assert "ip6tables" not in str(err.value)
    # IPv4 failing did not stop IPv6 from being closed.
    assert [c[0] for c in fake_run.calls if c[0].endswith("-restore")] == ["ip6tables-restore"]


# --- mark_clashes: iptables-save of each family plus nft ---------------------------------------

V4_SAVE = """\
*mangle
-A OUTPUT -j CONNMARK --set-xmark 0x10000/0xffff0000
-A OUTPUT -j CONNMARK --set-mark 0x1
COMMIT
"""
V6_SAVE = """\
*mangle
-A OUTPUT -j CONNMARK --set-mark 0x1
COMMIT
"""
NFT = (
    '{"nftables": [{"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 3,'
    ' "expr": [{"mangle": {"key": {"ct": {"key": "mark"}}, "value": 5}}]}}]}'
)


def test_mark_clashes_combines_both_families_and_nft_without_repeats(
    fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(iptables_ipset.shutil, "which", lambda name: f"/usr/sbin/{name}")
    fake_run.answers[("iptables-save",)] = (0, V4_SAVE, "")
    fake_run.answers[("ip6tables-save",)] = (0, V6_SAVE, "")
    fake_run.answers[("nft", "-j", "list", "ruleset")] = (0, NFT, "")
    found = asyncio.run(backend(4, 6).mark_clashes(policy("agent")))
    assert found == [
        "mangle: -A OUTPUT -j CONNMARK --set-xmark 0x10000/0xffff0000",
        "mangle: -A OUTPUT -j CONNMARK --set-mark 0x1",  # in both families: said once
        found[2],
    ]
    assert found[2].startswith("nft inet t c handle 3")


def test_mark_clashes_without_nft_or_nft_support(
    fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_run.answers[("iptables-save",)] = (0, V4_SAVE, "")
    fake_run.answers[("nft", "-j", "list", "ruleset")] = (0, NFT, "")
    monkeypatch.setattr(iptables_ipset.shutil, "which", lambda name: None)
    assert len(asyncio.run(backend(4).mark_clashes(policy("agent")))) == 2
    assert ("nft", "-j", "list", "ruleset") not in fake_run.calls

    monkeypatch.setattr(iptables_ipset.shutil, "which", lambda name: f"/usr/sbin/{name}")
    fake_run.answers[("nft", "-j", "list", "ruleset")] = (1, "", "Operation not supported")
    assert len(asyncio.run(backend(4).mark_clashes(policy("agent")))) == 2
    assert ("nft", "-j", "list", "ruleset") in fake_run.calls  # asked, and it said no


def test_mark_clashes_failing_save_is_an_error(fake_run: FakeRun) -> None:
    fake_run.answers[("ip6tables-save",)] = (1, "", "ip6tables-save: no such table")
    with pytest.raises(FirewallError, match="ip6tables-save failed: .*no such table"):
        asyncio.run(backend(4, 6).mark_clashes(policy("agent")))


# --- _run itself -------------------------------------------------------------------------------


def test_run_translates_a_missing_tool_once() -> None:
    with pytest.raises(FirewallError, match="cannot run /nonexistent/iptables"):
        asyncio.run(iptables_ipset._run(["/nonexistent/iptables", "-S"]))


def test_run_passes_stdin_and_returns_code_and_both_streams() -> None:
    rc, out, err = asyncio.run(
        iptables_ipset._run(["/bin/sh", "-c", "cat; echo oops >&2; exit 3"], stdin="hello\n")
    )
    assert (rc, out, err) == (3, "hello\n", "oops\n")


# --- the way to READY: independent commands at the same time ------------------------------------


def test_start_path_runs_independent_commands_concurrently(
    fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mark dumps together, both families' listings together, both restores together;
    the deny-all of a family still comes before its rules. (READY within 300 ms.)"""
    monkeypatch.setattr(iptables_ipset.shutil, "which", lambda name: f"/usr/sbin/{name}")
    inflight: list[int] = [0]
    rounds: list[list[tuple[str, ...]]] = []

    async def slow(argv: Sequence[str], stdin: str | None = None) -> Reply:
        if inflight[0] == 0:
            rounds.append([])
        inflight[0] += 1
        rounds[-1].append(tuple(argv[:1]) + tuple(argv[3:4]))
        await asyncio.sleep(0.01)
        inflight[0] -= 1
        return await fake_run(argv, stdin)

    monkeypatch.setattr(iptables_ipset, "_run", slow)
    fw = backend(4, 6)
    asyncio.run(fw.mark_clashes(policy("agent")))
    assert [r[0] for r in rounds[0]] == ["iptables-save", "ip6tables-save", "nft"]
    assert len(rounds) == 1
    rounds.clear()
    # A first start: no jumps anywhere, so each family is locked, then gets its rules.
    asyncio.run(fw._lock_unguarded(policy("agent")))
    assert len(rounds) == 2
    assert sorted(rounds[0]) == sorted(
        [(t, tb) for t in ("iptables", "ip6tables") for tb in ("filter", "nat")]
    )
    assert sorted(rounds[1]) == [("ip6tables-restore",), ("iptables-restore",)]
