"""Replay: the pure scheduler and classifier, and open-loop runs against an in-process gRPC control plane."""
from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from airan.cli import app
from airan.v1 import control_pb2, control_pb2_grpc, netops_pb2, netops_pb2_grpc
from sims.replay import (
    OUTCOMES,
    DuplicateOutcome,
    OutcomeBook,
    ReplayOptions,
    Replayer,
    ask_request,
    build_schedule,
    classify,
    outcome_templates,
    read_results,
    write_results,
)
from sims.trace import read_trace

EXAMPLE = Path(__file__).resolve().parents[1] / "sims" / "examples" / "city-3sites"


# -- pure core -------------------------------------------------------------------------------------

def test_schedule_scales_time_and_pushes_load_before_queries_of_the_same_instant():
    acts = build_schedule(np.array([10.0, 5.0, 20.0]), np.array([0.0, 10.0, 20.0]), speed=10)
    assert [(a.due_s, a.kind, a.index) for a in acts] == [
        (0.0, "ran_load", 0), (0.5, "ask", 1), (1.0, "ran_load", 1), (1.0, "ask", 0),
        (2.0, "ran_load", 2), (2.0, "ask", 2),
    ]
    with pytest.raises(ValueError):
        build_schedule(np.array([1.0]), np.array([]), speed=0)


def test_ask_request_maps_every_query_field():
    tr = read_trace(EXAMPLE)
    q = next(q for q in tr.queries if q.cell_ids and q.kpi_context)
    now = 1_750_000_000.25
    req = ask_request(q, now_unix=now, request_id="run-" + q.query_id, trace_start_unix=tr.start.timestamp())
    assert req.response_mode == {"free_text": netops_pb2.FREE_TEXT, "diagnosis": netops_pb2.DIAGNOSIS}[q.mode]
    assert req.HasField("detector_fallback") == q.detector_fallback  # unset: the server's default
    assert req.controller_id == q.controller_id and list(req.site_ids) == q.site_ids
    assert list(req.cell_ids) == q.cell_ids and req.question == q.question
    assert req.priority == getattr(netops_pb2, q.priority) and req.max_tokens == q.max_tokens
    assert req.request_id == "run-" + q.query_id
    assert req.deadline.ToNanoseconds() / 1e9 == pytest.approx(now + q.budget_ms / 1000, abs=1e-6)
    assert len(req.kpi_context) == len(q.kpi_context)
    for sample, k in zip(req.kpi_context, q.kpi_context):
        assert (sample.name, sample.value, sample.unit, sample.cell_id) == (k["name"], k["value"], k["unit"], k["cell_id"])
        assert sample.time.ToNanoseconds() / 1e9 == pytest.approx(tr.start.timestamp() + k["t_s"], abs=1e-6)


def test_ask_request_asks_near_rt_why_questions_as_diagnoses_that_may_fall_back():
    tr = read_trace(EXAMPLE)
    start = tr.start.timestamp()
    diagnosis = next(q for q in tr.queries if q.mode == "diagnosis")
    free = next(q for q in tr.queries if q.mode == "free_text")
    req = ask_request(diagnosis, now_unix=start, request_id="d", trace_start_unix=start)
    assert req.response_mode == netops_pb2.DIAGNOSIS and req.HasField("detector_fallback") and req.detector_fallback
    assert req.max_tokens == 0  # the server's default for a NEAR_RT diagnosis
    req = ask_request(free, now_unix=start, request_id="f", trace_start_unix=start)
    assert req.response_mode == netops_pb2.FREE_TEXT and not req.HasField("detector_fallback")


@pytest.mark.parametrize("code,details,timed_out,expected", [
    ("OK", "", False, ("served", "answered")),
    ("RESOURCE_EXHAUSTED", "queue is full", False, ("shed", "overloaded")),
    ("UNAVAILABLE", "no replica can take this query: every site is surged", False, ("shed", "no_replica")),
    ("DEADLINE_EXCEEDED", "deadline already passed on arrival", False, ("shed", "deadline_before_dispatch")),
    ("DEADLINE_EXCEEDED", "deadline passed 812 ms after arrival while replica r1 at bs-01 was answering", False,
     ("error", "deadline_during_generation")),
    ("DEADLINE_EXCEEDED", "Deadline Exceeded", True, ("error", "client_timeout")),
    ("UNAVAILABLE", "failed to connect to all addresses; last error: Connection refused", False,
     ("error", "transport")),
    ("UNAVAILABLE", "replica r1 at bs-01 failed mid-answer (engine died); retry the query", False,
     ("error", "replica_failed")),
    ("INVALID_ARGUMENT", "question is empty", False, ("error", "invalid_argument")),
    ("INTERNAL", "boom", False, ("error", "internal")),
])
def test_classify(code, details, timed_out, expected):
    assert classify(code, details, timed_out) == expected


def test_outcome_book_takes_exactly_one_outcome_per_query():
    book = OutcomeBook(outcome_templates(read_trace(EXAMPLE)))
    book.record(0, outcome="served", met_deadline=True)
    with pytest.raises(DuplicateOutcome):
        book.record(0, outcome="error")
    with pytest.raises(RuntimeError):
        book.outcomes()
    assert book.fill_missing("not_sent") == len(book) - 1
    assert [o.outcome for o in book.outcomes()].count("served") == 1


# -- a scripted control plane on 127.0.0.1 -----------------------------------------------------------

class FakePlane(netops_pb2_grpc.NetOpsServiceServicer, control_pb2_grpc.ControlServiceServicer):
    """Answers by the query number in the request id: serve, serve late, shed three ways, fail; or hang."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.asked: list[str] = []
        self.loads: list[dict[str, float]] = []
        self.lock = threading.Lock()

    def Ask(self, request, context):
        with self.lock:
            self.asked.append(request.request_id)
        if self.hang:
            deadline = time.monotonic() + 30
            while context.is_active() and time.monotonic() < deadline:  # bounded
                time.sleep(0.01)
            context.abort(grpc.StatusCode.CANCELLED, "gave up")
        n = int(request.request_id.rsplit("-", 1)[1])
        behaviour = n % 6
        if behaviour == 0:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "admission queue is full")
        if behaviour == 3:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline cannot be met: queue is 2.1 s long")
        if behaviour == 4:
            context.abort(grpc.StatusCode.INTERNAL, "internal error (KeyError); see server log")
        if behaviour == 5:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no replica can take this query: every site is surged")
        if behaviour == 2:
            time.sleep(0.03)
        return netops_pb2.AskResponse(
            request_id=request.request_id, text="ok", prompt_tokens=40, completion_tokens=7,
            replica_id=f"{request.site_ids[0]}-r0", site_id=request.site_ids[0], model="fake", finish_reason="stop",
            timings=netops_pb2.Timings(queue_ms=1.0, ttft_ms=2.0, total_ms=3.0),
            placement=netops_pb2.Placement(answered_by=netops_pb2.ANSWER_SOURCE_DETECTOR, predicted_ms=0.0)
            if request.detector_fallback else netops_pb2.Placement(answered_by=netops_pb2.ANSWER_SOURCE_MODEL,
                                                                   predicted_ms=2.5),
        )

    def ReportRanLoad(self, request, context):
        loads = {x.site_id: x.ran_compute_share for x in request.loads}
        with self.lock:
            self.loads.append(loads)
        return control_pb2.ReportRanLoadResponse(
            accepted=len(loads), surged_site_ids=[s for s, v in loads.items() if v > 0.85])


@pytest.fixture
def plane_factory():
    servers = []

    def start(**kw):
        plane = FakePlane(**kw)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        netops_pb2_grpc.add_NetOpsServiceServicer_to_server(plane, server)
        control_pb2_grpc.add_ControlServiceServicer_to_server(plane, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return plane, f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(grace=None)


def expected_outcome(query_id: str) -> tuple[str, str]:
    return {0: ("shed", "overloaded"), 1: ("served", "answered"), 2: ("served", "answered"),
            3: ("shed", "deadline_before_dispatch"), 4: ("error", "internal"),
            5: ("shed", "no_replica")}[int(query_id.split("-")[1]) % 6]


async def test_open_loop_replay_records_exactly_one_outcome_per_query(plane_factory):
    plane, target = plane_factory()
    tr = read_trace(EXAMPLE)
    speed = 600.0
    rp = Replayer(tr, target, ReplayOptions(speed=speed, call_slack_s=2.0, progress=False))
    t0 = time.monotonic()
    await rp.run()
    took = time.monotonic() - t0
    outcomes = rp.book.outcomes()
    assert [o.query_id for o in outcomes] == [q.query_id for q in tr.queries]
    assert len(plane.asked) == len(tr.queries) == len(set(plane.asked))  # each sent once
    for o, q in zip(outcomes, tr.queries):
        assert (o.outcome, o.reason) == expected_outcome(o.query_id), o
        assert o.latency_ms >= 0 and o.sent_s >= o.scheduled_s - 0.005
        assert o.scheduled_s == pytest.approx(q.t_s / speed)
        if o.outcome == "served":
            assert o.served_site_id == q.site_ids[0] and o.completion_tokens == 7
            assert o.answered_by == ("detector" if q.detector_fallback else "model")
            assert o.predicted_ms == 2.5 if o.answered_by == "model" else math.isnan(o.predicted_ms)
            assert o.met_deadline == (o.latency_ms <= q.budget_ms)
    last = max(q.t_s for q in tr.queries) / speed
    assert last <= took < last + 5  # fired on time, did not wait for the grace period
    # RAN load: every trace time pushed once, all sites each time
    assert len(plane.loads) == tr.meta["n_intervals"] and all(len(x) == 3 for x in plane.loads)
    assert all(p.ok for p in rp.pushes)
    assert 0 <= outcomes[0].ran_share <= 1


async def test_interrupted_replay_still_ends_every_query_once(plane_factory):
    _, target = plane_factory()
    tr = read_trace(EXAMPLE)
    rp = Replayer(tr, target, ReplayOptions(speed=100.0, progress=False))
    task = asyncio.create_task(rp.run())
    await asyncio.sleep(1.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    outcomes = rp.book.outcomes()
    assert len(outcomes) == len(tr.queries) and rp.interrupted
    reasons = {o.reason for o in outcomes}
    assert "interrupted" in reasons and reasons - {"interrupted"}  # some done, the rest interrupted
    assert sum(rp.book.counts.values()) == len(tr.queries)


async def test_calls_time_out_and_the_grace_period_bounds_the_run(plane_factory):
    _, target = plane_factory(hang=True)
    tr = read_trace(EXAMPLE)
    tr.queries[:] = tr.queries[:8]
    for n, q in enumerate(tr.queries):
        # short budgets time out at budget + slack; long ones are still waiting when the grace period ends
        q.budget_ms = 50.0 if n < 5 else 60_000.0
    rp = Replayer(tr, target, ReplayOptions(speed=1000.0, call_slack_s=0.2, grace_s=1.0, progress=False))
    t0 = time.monotonic()
    await rp.run()
    # far below the 60 s budgets the last three would wait for without a grace period (slack for a busy box)
    assert time.monotonic() - t0 < 1.0 + max(q.t_s for q in tr.queries) / 1000 + 15
    by_id = {o.query_id: o for o in rp.book.outcomes()}
    for q in tr.queries[:5]:
        assert (by_id[q.query_id].outcome, by_id[q.query_id].reason) == ("error", "client_timeout")
        assert by_id[q.query_id].latency_ms == pytest.approx(250, abs=150)
    for q in tr.queries[5:]:
        assert by_id[q.query_id].reason == "cancelled_at_end"


async def test_no_control_plane_means_every_query_fails_to_connect():
    tr = read_trace(EXAMPLE)
    rp = Replayer(tr, "127.0.0.1:1", ReplayOptions(connect_timeout_s=0.5, progress=False))
    await rp.run()
    assert {(o.outcome, o.reason) for o in rp.book.outcomes()} == {("error", "connect_failed")}


def test_cli_replay_then_report_writes_results_table_and_plots(plane_factory, tmp_path):
    _, target = plane_factory()
    out = tmp_path / "results"
    runner = CliRunner()
    result = runner.invoke(app, ["sim", "replay", str(EXAMPLE), "--target", target, "--speed", "1200",
                                 "--out", str(out), "--no-progress", "--call-slack", "2"])
    assert result.exit_code == 0, result.output
    res = read_results(out)
    assert res.outcomes.num_rows == res.meta["n_queries"] == len(read_trace(EXAMPLE).queries)
    assert set(res.outcomes["outcome"].to_pylist()) <= set(OUTCOMES)
    assert res.meta["ran_load_pushes"] == 120
    result = runner.invoke(app, ["sim", "report", str(out)])
    assert result.exit_code == 0, result.output
    for words in ("Per class", "NEAR_RT", "attainment", "p95 ms", "shed", "Per site", "bs-01", "Outcomes by reason"):
        assert words in result.output
    for png in ("cell_load.png", "latency_cdf.png", "attainment.png"):
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_results_round_trip(tmp_path):
    tr = read_trace(EXAMPLE)
    book = OutcomeBook(outcome_templates(tr))
    book.fill_missing("not_sent")
    write_results(tmp_path / "r", {"format": "airan-sim-results", "version": 1, "n_queries": len(book)},
                  book.outcomes(), [])
    res = read_results(tmp_path / "r")
    assert res.outcomes["query_id"].to_pylist() == [q.query_id for q in tr.queries]
    assert res.pushes.num_rows == 0
    # version 1 results had no answered_by or predicted_ms: read with their defaults
    pq.write_table(res.outcomes.drop(["answered_by", "predicted_ms"]), tmp_path / "r" / "outcomes.parquet")
    old = read_results(tmp_path / "r").outcomes
    assert old["answered_by"].to_pylist() == [""] * len(tr.queries)
    assert all(math.isnan(v) for v in old["predicted_ms"].to_pylist())
