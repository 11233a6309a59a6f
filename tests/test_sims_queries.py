"""Query generator: triggers, fields that map onto AskRequest, budgets per class, open-loop arrivals."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sims.events import EVENT_KINDS, EventTable, KIND_INDEX, random_events
from sims.kpis import KPI_UNITS
from sims.queries import BUDGET_MS, DIAGNOSIS_KINDS, MAX_TOKENS, PRIORITIES, QUERY_KINDS, QueryParams
from sims.simulate import SimConfig, Simulator, run
from sims.timefmt import parse_start
from sims.topology import generate_topology

DURATION, DT = 7200.0, 30.0


@pytest.fixture(scope="module")
def generated():
    topo = generate_topology(6, seed=9)
    ev = random_events(topo, DURATION, 12, seed=9)
    cfg = SimConfig(duration_s=DURATION, interval_s=DT, seed=9, start=parse_start("2025-06-02T17:00:00"),
                    queries=QueryParams(summary_every_s=900, ops_per_hour=20))
    sim = Simulator(topo, ev, cfg)
    return sim, run(sim).queries


def test_every_query_is_well_formed_for_an_ask_request(generated):
    sim, queries = generated
    topo = sim.topology
    assert len(queries) >= 30
    assert [q.query_id for q in queries] == [f"q-{i + 1:06d}" for i in range(len(queries))]
    assert [q.t_s for q in queries] == sorted(q.t_s for q in queries)
    for q in queries:
        assert q.kind in QUERY_KINDS and q.priority in PRIORITIES
        assert 0 <= q.t_s < DURATION
        assert q.controller_id in topo.controller_ids
        assert q.site_ids and set(q.site_ids) <= set(topo.site_ids)
        assert set(q.cell_ids) <= set(topo.cell_ids)
        lo, hi = BUDGET_MS[q.priority]
        assert lo <= q.budget_ms <= hi
        if q.mode == "diagnosis":  # the server's default for a diagnosis of the class
            assert q.max_tokens == 0 and q.detector_fallback
        else:
            assert q.mode == "free_text" and q.max_tokens == MAX_TOKENS[q.priority] and not q.detector_fallback
        assert 0 < len(q.question) <= 4000 and "nan" not in q.question.lower().split()
        assert 1 <= len(q.kpi_context) <= 64
        for k in q.kpi_context:
            assert KPI_UNITS[k["name"]] == k["unit"] and math.isfinite(k["value"]) and 0 <= k["t_s"] < DURATION
            assert k["cell_id"] == "" or k["cell_id"] in set(topo.cell_ids)


def test_near_rt_why_questions_ask_for_a_diagnosis_with_the_detector_fallback(generated):
    _, queries = generated
    diagnoses = [q for q in queries if q.mode == "diagnosis"]
    assert diagnoses and all(q.priority == "NEAR_RT" and q.kind in DIAGNOSIS_KINDS for q in diagnoses)
    # every NEAR_RT "why" question is one; proposals and the other classes stay free text
    assert len(diagnoses) == sum(q.priority == "NEAR_RT" and q.kind in DIAGNOSIS_KINDS for q in queries)
    assert any(q.mode == "free_text" for q in queries if q.priority != "NEAR_RT")


def test_near_rt_budgets_stay_inside_the_near_rt_loop():
    lo, hi = BUDGET_MS["NEAR_RT"]
    assert lo >= 10 and hi <= 1000 and BUDGET_MS["NON_RT"][0] > 1000


def test_each_visible_event_gets_one_explanation_with_the_affected_kpis(generated):
    sim, queries = generated
    ev = sim.events
    explain = {q.event_id: q for q in queries if q.kind == "event_explain"}
    assert len(explain) == sum(1 for q in queries if q.kind == "event_explain")  # one per event
    visible = [e for e in range(len(ev)) if ev.start_s[e] + min(DT / 2, ev.duration_s[e] / 2) < DURATION - DT]
    assert {str(ev.event_ids[e]) for e in visible} <= set(explain)
    for e in visible:
        q = explain[str(ev.event_ids[e])]
        cell = str(sim.topology.cell_ids[ev.cell[e]])
        assert q.cell_ids[0] == cell and q.t_s >= ev.start_s[e]
        assert q.trigger == EVENT_KINDS[ev.kind[e]]
        names = {k["name"] for k in q.kpi_context if k["cell_id"] == cell}
        expected = {"cell_outage": "RRC.ConnMean", "interference": "L1M.SS-SINR", "congestion": "RRU.PrbTotDl",
                    "flash_crowd": "RRU.PrbTotDl", "ho_failure_storm": "MM.HoExeInterFail",
                    "cell_sleep": "PEE.AvgPower"}[q.trigger]
        assert expected in names
        assert q.priority == ("NON_RT" if q.trigger == "cell_sleep" else "NEAR_RT")
        times = {k["t_s"] for k in q.kpi_context if k["cell_id"] == cell}
        if ev.start_s[e] >= DT:
            assert len(times) == 2  # values before and after: the change is the evidence
    proposals = [q for q in queries if q.kind == "param_proposal" and q.event_id]
    assert proposals and all(p.event_id in explain and p.t_s > explain[p.event_id].t_s for p in proposals)


def test_outage_question_shows_the_cell_going_dark():
    topo = generate_topology(3, seed=1, cells_per_site=(2, 2))
    ev = EventTable.build([KIND_INDEX["cell_outage"]], [0], [300.0], [600.0], [1.0])
    cfg = SimConfig(duration_s=1800, interval_s=60, seed=1, start=parse_start("2025-06-02T12:00:00"),
                    queries=QueryParams(summary_every_s=0, ops_per_hour=0))
    q = next(q for q in run(Simulator(topo, ev, cfg)).queries if q.kind == "event_explain")
    after = {k["name"]: k["value"] for k in q.kpi_context if k["cell_id"] == "bs-01/c1" and k["t_s"] == 300.0}
    before = {k["name"]: k["value"] for k in q.kpi_context if k["cell_id"] == "bs-01/c1" and k["t_s"] == 240.0}
    assert after["RRC.ConnMean"] == 0 and before["RRC.ConnMean"] > 0
    assert after["RRU.PrbAvailDl"] == 0 and "DRB.UEThpDl" not in after  # NaN: not sent as a sample
    assert any(k["cell_id"] == "bs-01/c2" for k in q.kpi_context)  # the co-site cell that took the UEs
    assert q.t_s == pytest.approx(360.0, abs=2.0)  # at the KPI report of the interval, plus a reaction time


def test_periodic_summaries_per_site_and_poisson_operator_questions(generated):
    sim, queries = generated
    summaries = [q for q in queries if q.kind == "kpi_summary"]
    assert len(summaries) == sim.topology.n_sites * int(DURATION // 900 - 1)  # the last one falls at the end
    for n in range(1, int(DURATION // 900)):
        at = [q for q in summaries if n * 900 <= q.t_s < n * 900 + 10]
        assert sorted(q.site_ids[0] for q in at) == sorted(sim.topology.site_ids)
    ops = [q for q in queries if q.kind == "ops_question"]
    assert 15 <= len(ops) <= 75  # 20/h for 2 h
    gaps = np.diff([q.t_s for q in ops])
    assert gaps.std() > 0.4 * gaps.mean()  # exponential-like gaps, not a fixed period


def test_anomalies_are_asked_once_per_cooldown():
    topo = generate_topology(4, seed=2)
    ev = EventTable.build([KIND_INDEX["congestion"]], [0], [60.0], [3000.0], [1.0])
    cfg = SimConfig(duration_s=3600, interval_s=10, seed=2, start=parse_start("2025-06-02T20:00:00"),
                    queries=QueryParams(summary_every_s=0, ops_per_hour=0, cooldown_s=900))
    queries = run(Simulator(topo, ev, cfg)).queries
    by_cell: dict[str, list[float]] = {}
    for q in queries:
        if q.kind in ("anomaly_explain", "event_explain"):
            by_cell.setdefault(q.cell_ids[0], []).append(q.t_s)
    assert by_cell
    for times in by_cell.values():
        assert all(np.diff(times) >= 900 - 1e-6)
