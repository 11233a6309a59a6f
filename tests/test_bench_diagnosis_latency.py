"""The diagnosis-latency benchmark's bookkeeping (no engine): which case each engine is asked, and the
per-round statistics its table reports."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from airan.v1 import netops_pb2

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_diagnosis_latency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_diagnosis_latency", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module
    spec.loader.exec_module(module)
    return module


def test_every_case_is_asked_once_per_engine_with_classes_interleaved(bench):
    args = bench.parse_args(["--model", "tiny", "--requests", "3", "--mix", "4", "--mix-concurrency", "2", "--rounds", "3"])
    work = bench.build_workload(args)
    asked = work.warmup + [i for r in work.rounds for phase in bench.PHASES for i in r[phase]]
    assert sorted(asked) == list(range(len(work.items)))  # distinct: no prompt served from the prefix cache
    assert len(work.warmup) == 2 * len(bench.CLASSES) + args.mix_concurrency
    for r in work.rounds:
        assert len(r["c1"]) == 3 * len(bench.CLASSES) and len(r["mix"]) == 4
        for phase in bench.PHASES:
            classes = [work.classes[i] for i in r[phase]]
            assert classes[: len(bench.CLASSES)] == list(bench.CLASSES) and all(a != b for a, b in zip(classes, classes[1:]))
    near = work.requests[work.rounds[0]["c1"][0]]
    non = work.requests[work.rounds[0]["c1"][1]]
    assert (near.priority, non.priority) == (netops_pb2.NEAR_RT, netops_pb2.NON_RT)
    assert near.response_mode == netops_pb2.DIAGNOSIS and not near.HasField("deadline")


def test_class_stats_reports_median_and_spread_of_per_round_percentiles(bench):
    def samples(latencies, ok=True):
        return [bench.Sample(i, "near_rt", ok, latency_ms=v, first_ms=v / 2, prompt_tokens=100, completion_tokens=8)
                for i, v in enumerate(latencies)]  # fmt: skip

    rounds = [samples([100.0] * 20), samples([200.0] * 20), samples([300.0] * 19) + samples([0.0], ok=False)]
    s = bench.class_stats(rounds)
    assert (s["count"], s["ok"]) == (60, 59)
    assert s["p50"] == {"median": 200.0, "min": 100.0, "max": 300.0}
    assert s["p95"]["median"] == 200.0 and [r["ok"] for r in s["per_round"]] == [20, 20, 19]
    assert s["prompt_tokens_p50"] == 100 and s["completion_tokens_p50"] == 8
    assert s["after_first_ms_p50"] == pytest.approx(100.0)


def test_goal_is_the_median_over_rounds_of_near_rt_p95_one_at_a_time(bench):
    stats = {"p95": {"median": 480.0, "min": 400.0, "max": 620.0}}
    report = {"configs": {"one": {"phases": {"grpc": {"c1": {"near_rt": stats}}}},
                          "default": {"phases": {"grpc": {"c1": {"near_rt": stats | {"p95": {"median": 1200.0, "min": 1, "max": 2}}}}}}}}  # fmt: skip
    goals = bench.goals(report)
    assert goals["one"]["met"] and goals["one"]["worst_round_p95_ms"] == 620.0
    assert not goals["default"]["met"] and goals["default"]["goal_ms"] == 1000.0
