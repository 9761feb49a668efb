"""bench/run's CPU accounting: /proc parsing and the per-query split."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

RUN = Path(__file__).resolve().parents[2] / "bench" / "run"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("bench_run", str(RUN))
    spec = importlib.util.spec_from_loader("bench_run", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


def test_proc_stat_times_reads_the_aggregate_line(bench: ModuleType) -> None:
    tck = bench.CLK_TCK
    text = "cpu  100 1 50 1000 20 3 7 2 0 0\ncpu0 50 1 25 500 10 1 3 1 0 0\nintr 12345\n"
    busy, idle, softirq = bench.proc_stat_times(text)
    assert busy == pytest.approx((100 + 1 + 50 + 3 + 7 + 2) / tck)
    assert idle == pytest.approx(1020 / tck)
    assert softirq == pytest.approx(7 / tck)


def test_proc_stat_without_cpu_line_is_an_error(bench: ModuleType) -> None:
    with pytest.raises(ValueError):
        bench.proc_stat_times("intr 1\n")


def test_pid_cpu_survives_spaces_and_parentheses_in_the_name(bench: ModuleType) -> None:
    rest = "S 1 2 3 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 12345"
    text = f"4242 (we (ird) name) {rest}\n"
    assert bench.pid_cpu(text) == pytest.approx(300 / bench.CLK_TCK)
    assert bench.pid_user_sys(text) == (250 / bench.CLK_TCK, 50 / bench.CLK_TCK)


def test_pid_cpu_of_this_process_is_plausible(bench: ModuleType) -> None:
    assert bench.pid_cpu(Path("/proc/self/stat").read_text()) >= 0


def times(bench: ModuleType, **kw: float) -> object:
    base = dict(wall=0.0, busy=0.0, idle=0.0, softirq=0.0, resolver=0.0, upstream=0.0)
    return bench.CpuTimes(**(base | {"resolver_sys": 0.0, "dnsperf": 0.0} | kw))


def test_cpu_use_splits_busy_per_query(bench: ModuleType) -> None:
    before = times(bench, wall=10, busy=100, idle=50, softirq=5, resolver=1, upstream=2, dnsperf=3)
    before = bench.dataclasses.replace(before, resolver_sys=0.5)
    after = times(
        bench, wall=12, busy=103.5, idle=50.5, softirq=5.5, resolver=2.5, upstream=2.5, dnsperf=4
    )
    after = bench.dataclasses.replace(after, resolver_sys=1.0)
    c = bench.cpu_use(before, after, 10000, 2)
    assert c["wall_s"] == pytest.approx(2)
    assert c["resolver_us"] == pytest.approx(150)
    assert c["resolver_sys_us"] == pytest.approx(50)
    assert c["upstream_us"] == pytest.approx(50)
    assert c["dnsperf_us"] == pytest.approx(100)
    assert c["busy_us"] == pytest.approx(350)
    assert c["rest_us"] == pytest.approx(50)
    assert c["softirq_us"] == pytest.approx(50)
    assert c["idle_share"] == pytest.approx(0.5 / 4)
    assert c["resolver_core"] == pytest.approx(0.75)
    # everything but the resolver: 200 µs per query; 2 cores -> 10,000 q/s at most
    assert c["ceiling_qps"] == pytest.approx(10000)


def test_other_processes_are_part_of_rest_and_not_of_the_ceiling(bench: ModuleType) -> None:
    before = times(bench, wall=0, busy=0)
    after = times(bench, wall=1, busy=3, resolver=1, upstream=0.5, dnsperf=0.5)
    c = bench.cpu_use(before, after, 10000, 2, others=0.5, kthreads=0.25)
    assert c["rest_us"] == pytest.approx(100)
    assert c["others_us"] == pytest.approx(50) and c["kthreads_us"] == pytest.approx(25)
    # 300 busy - 100 resolver - 50 others = 150 µs per query: 2 cores -> 13,333 q/s
    assert c["ceiling_qps"] == pytest.approx(2e6 / 150)


def test_processes_delta_splits_user_processes_from_kernel_threads(bench: ModuleType) -> None:
    before = {1: (False, 1.0), 2: (True, 5.0), 3: (False, 2.0)}
    after = {1: (False, 1.5), 2: (True, 5.25), 4: (False, 0.125)}  # 3 ended, 4 started
    assert bench.processes_delta(before, after) == (pytest.approx(0.625), pytest.approx(0.25))


def test_processes_cpu_sees_this_process_and_not_the_excluded(bench: ModuleType) -> None:
    procs = bench.processes_cpu({1})
    assert 1 not in procs
    assert procs[os.getpid()][0] is False


def test_cpu_use_of_a_run_that_completed_nothing_is_nan(bench: ModuleType) -> None:
    c = bench.cpu_use(times(bench), times(bench, wall=1, busy=1), 0, 2)
    assert math.isnan(c["busy_us"]) and math.isnan(c["ceiling_qps"])


def test_cpu_medians_take_each_field_over_the_runs(bench: ModuleType) -> None:
    runs = [bench.Run(1.0, 1, 0, {}, cpu={"rest_us": v, "busy_us": 2 * v}) for v in (1, 5, 3)]
    runs.append(bench.Run(1.0, 1, 0, {}))  # no CPU figures: left out
    assert bench.cpu_medians(runs) == {"rest_us": 3, "busy_us": 6}
    assert bench.cpu_medians([]) == {}


@pytest.mark.parametrize("flag", [True, False, None])
def test_softirq_note_says_where_softirq_is(bench: ModuleType, flag: bool | None) -> None:
    note = bench.softirq_note(flag)
    assert ("in rest" in note) is (flag is True)


def test_a_run_with_lost_queries_is_measured_up_to_its_run_time(bench: ModuleType) -> None:
    samples = [times(bench, wall=w, busy=w) for w in (1.0, 1.02, 1.04, 1.06)]
    end = times(bench, wall=3.1, busy=5.0)
    assert bench.window_end(samples, end, 1.03).wall == 1.04
    assert bench.window_end(samples, end, 1.07) is end  # no sample after the cut: the end
    assert bench.window_end([], end, 0.0) is end
