"""The policy comparison's statistics and plots on plain data (sims/report.py)."""
import dataclasses
import math

import numpy as np
import pytest
import pyarrow as pa

from sims.replay import Outcome, outcomes_table
from sims.report import (
    UsageSamples,
    demand_mask,
    plot_attainment_by_policy,
    plot_headroom_vs_use,
    policy_row,
)


def _outcome(i, priority, outcome, met=False, latency_ms=100.0, tokens=5, t_s=0.0, sent_s=0.0):
    return Outcome(query_id=f"q{i}", t_s=t_s, kind="k", priority=priority, controller_id="c", site_id="bs-01",
                   cell_id="", budget_ms=500.0, ran_share=0.5, outcome=outcome, met_deadline=met,
                   latency_ms=latency_ms, completion_tokens=tokens if outcome == "served" else 0, sent_s=sent_s)


def _usage(use, radio, demand=None):
    use, radio = np.asarray(use, float), np.asarray(radio, float)
    k, s = use.shape
    return UsageSamples(tuple(f"bs-0{i + 1}" for i in range(s)), np.arange(k) * 60.0, use, radio,
                        np.full((k, s), np.nan), np.zeros((k, s), bool),
                        np.ones(k, bool) if demand is None else np.asarray(demand))  # fmt: skip


def test_goodput_attainment_rejects_and_throughput():
    table = outcomes_table([
        _outcome(0, "NEAR_RT", "served", met=True),
        _outcome(1, "NEAR_RT", "served", met=False),
        _outcome(2, "NEAR_RT", "shed", latency_ms=0.8),
        _outcome(3, "NEAR_RT", "shed", latency_ms=1.2),
        _outcome(4, "NEAR_RT", "error"),  # admitted, then missed
        _outcome(5, "NON_RT", "served", met=True, tokens=30),
        _outcome(6, "BEST_EFFORT", "shed"),
        # queued, then dropped when it could no longer start in time: admitted and missed
        dataclasses.replace(_outcome(7, "NEAR_RT", "shed", latency_ms=400.0),
                            detail="still waiting for a slot at r1 ... so it was dropped before its deadline"),
        # refused at admission and answered at once by the detector: in time, but not by a model
        dataclasses.replace(_outcome(8, "NEAR_RT", "served", met=True, latency_ms=3.0, tokens=4),
                            answered_by="detector"),
    ])
    row = policy_row("p", table, _usage([[0.1]], [[0.5]]), wall_s=10.0, tolerance_cpus=0.02)
    assert (row.near_rt_sent, row.near_rt_met, row.near_rt_met_model, row.near_rt_by_detector) == (7, 2, 1, 1)
    assert (row.near_rt_admitted, row.early_rejects) == (4, 3)
    assert math.isclose(row.goodput, 2 / 7) and math.isclose(row.model_goodput, 1 / 7)
    assert math.isclose(row.attainment_admitted, 1 / 4)  # the model's: 1 of the 4 given to a replica
    assert math.isclose(row.early_reject_share, 3 / 7) and row.reject_ms_p50 == 1.2
    assert (row.non_rt_served, row.non_rt_met, row.best_effort_served) == (1, 1, 0)
    assert row.tokens == 5 + 5 + 30 + 4


def test_violations_are_use_above_what_the_radio_left():
    u = _usage([[0.30, 0.10], [0.55, 0.10], [0.10, 0.50]], [[0.5, 0.5], [0.5, 0.5], [0.5, 0.45]])
    assert u.violations(0.02).tolist() == [[False, False], [True, False], [False, True]]
    assert u.violations(0.06).sum() == 0


def test_idle_compute_used_counts_only_intervals_with_demand():
    u = _usage([[0.5, 0.0], [0.0, 0.0]], [[0.5, 0.5], [1.0, 1.0]], demand=[True, False])
    assert u.idle_used_share() == 0.5  # 0.5 of the 1.0 left in the interval with demand
    over = _usage([[0.9]], [[0.5]])
    assert over.idle_used_share() == 1.0  # use above the headroom counts once, as a violation


def test_demand_mask_overlaps():
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    sent = np.array([0.5, 2.2, np.nan])
    done = np.array([0.9, 2.5, np.nan])
    assert demand_mask(edges, sent, done).tolist() == [True, False, True]


def test_plots_write_files(tmp_path):
    tables = {p: outcomes_table([_outcome(i, "NEAR_RT", "served", met=i % 2 == 0, t_s=600.0 * i)
                                 for i in range(8)]) for p in ("round_robin", "radio_first")}  # fmt: skip
    usage = {p: _usage([[0.1, 0.2]] * 5, [[0.5, 0.4]] * 5) for p in tables}
    a = plot_headroom_vs_use(usage, [{"site_id": "bs-01", "kind": "swap", "t_s": 120.0}], tmp_path / "h.png")
    b = plot_attainment_by_policy(tables, tmp_path / "a.png", bins=4)
    assert a.stat().st_size > 1000 and b.stat().st_size > 1000
    assert isinstance(tables["radio_first"], pa.Table)


@pytest.mark.parametrize("at", ["start", "end"])
async def test_replay_can_stamp_ran_load_with_the_trace_clock(at):
    """A radio-first forecast needs the trace's time of day: reports carry trace start + t_s, or, pushed
    when the trace format says a row becomes visible (the end of its interval), that end."""
    from concurrent import futures
    from pathlib import Path

    import grpc

    from airan.v1 import control_pb2, control_pb2_grpc
    from sims.replay import ReplayOptions, Replayer
    from sims.trace import read_trace

    stamps = []

    class Plane(control_pb2_grpc.ControlServiceServicer):
        def ReportRanLoad(self, request, context):
            stamps.append(request.loads[0].time.ToNanoseconds() / 1e9)
            return control_pb2.ReportRanLoadResponse(accepted=len(request.loads))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    control_pb2_grpc.add_ControlServiceServicer_to_server(Plane(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        trace = read_trace(Path(__file__).resolve().parents[1] / "sims" / "examples" / "city-3sites")
        trace.queries = []  # RAN load only
        rp = Replayer(trace, f"127.0.0.1:{port}", ReplayOptions(speed=600, ran_load_time="trace", progress=False,
                                                                grace_s=1, ran_load_at=at))  # fmt: skip
        await rp.run()
    finally:
        server.stop(grace=None)
    times = np.unique(trace.ran_load["t_s"].to_numpy())
    delay = trace.interval_s if at == "end" else 0.0
    assert sorted(stamps) == pytest.approx(list(trace.start.timestamp() + times + delay))
    pushes = sorted(rp.pushes, key=lambda p: p.t_s)
    assert pushes[-1].sent_s == pytest.approx((times[-1] + delay) / 600, abs=0.25)
    assert rp.t0 is not None
