"""The NetOps evaluation: the legacy dataset builder, rules, metrics and the summary (plain data),
and the whole path (gRPC -> gateway -> Ray -> vLLM) on the generated tiny model."""
from __future__ import annotations

import json
import math
from collections import Counter
from datetime import UTC, datetime
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airan.core.causes import CAUSES
from airan.core.query import KpiSample
from airan.evaluation import report, rules
from airan.evaluation.cases import DEV_SEED as CASES_DEV_SEED
from airan.evaluation.cases import SHIFTED_SEED, TEST_SEED, build_cases, shifted_cases
from airan.evaluation.dataset import (
    CELLS_PER_SITE,
    COSITE_KPIS,
    FOCUS_KPIS,
    INTERVAL_S,
    LABELS,
    N_SITES,
    WINDOW_INTERVALS,
    EvalItem,
    KpiRow,
    assert_disjoint,
    build_dataset,
    build_item,
    build_splits,
    read_jsonl,
    write_jsonl,
)
from airan.evaluation.metrics import (
    ERROR,
    INVALID,
    PREDICTED,
    SUMMARY_FIELDS,
    Prediction,
    accuracy,
    action_accuracy,
    bootstrap_macro_f1,
    cell_f1,
    codes,
    confusion_matrix,
    faithful,
    faithfulness,
    macro_f1,
    macro_f1_codes,
    per_class_scores,
    score_method,
    summarize,
)
from airan.evaluation.runner import (
    ACTION_NAMES, CAUSE_NAMES, NEAR_RT_SUFFIX, ask_request, evaluate, failed_prediction, prediction_of, stack_config,
)  # fmt: skip
from airan.v1 import netops_pb2
from sims.events import EventTable
from sims.kpis import RadioParams
from sims.simulate import SimConfig, Simulator
from sims.topology import generate_topology


@pytest.fixture(scope="module")
def splits():
    return build_splits(35, 70)


# -- dataset ---------------------------------------------------------------------------------------


def test_same_seed_same_items_and_jsonl_round_trip(tmp_path):
    a, b = build_dataset(21, 7), build_dataset(21, 7)
    assert a == b
    path = write_jsonl(a, tmp_path / "set.jsonl")
    assert read_jsonl(path) == a
    assert write_jsonl(read_jsonl(path), tmp_path / "again.jsonl").read_bytes() == path.read_bytes()
    assert build_dataset(21, 8) != a


def test_dev_and_test_come_from_disjoint_seeds(splits):
    dev, test = splits
    assert not {i.seed for i in dev} & {i.seed for i in test}
    with pytest.raises(AssertionError, match="share"):
        assert_disjoint(dev, dev[:3])
    with pytest.raises(ValueError, match="different"):
        build_splits(3, 3, dev_seed=4, test_seed=4)


def _without_event(item: EvalItem) -> dict[str, float]:
    """The focus cell's last-interval KPIs in the same city, day and noise, with no event injected."""
    topo = generate_topology(N_SITES, seed=item.seed, cells_per_site=CELLS_PER_SITE)
    times = sorted({k.time_s for k in item.kpis})
    day0 = times[0] // 86_400 * 86_400
    config = SimConfig(duration_s=86_400.0, interval_s=INTERVAL_S, seed=item.seed,
                       start=datetime.fromtimestamp(day0, UTC))
    i0 = int((times[0] - day0) // INTERVAL_S)
    window = Simulator(topo, EventTable.empty(), config).window(i0, i0 + len(times))
    c = list(topo.cell_ids).index(item.focus_cell)
    return {name: float(window.kpis[name][-1, c]) for name in FOCUS_KPIS}


def test_labels_are_balanced_and_match_the_injected_event(splits):
    _, test = splits
    counts = Counter(i.label for i in test)
    assert set(counts) == set(LABELS) and set(LABELS) < set(CAUSES)
    assert max(counts.values()) - min(counts.values()) <= 1
    p = RadioParams()
    for item in test:
        focus = _series(item, item.focus_cell)
        first, last = min(focus["RRC.ConnMean"]), max(focus["RRC.ConnMean"])
        now = {name: values.get(last) for name, values in focus.items()}
        base = _without_event(item)
        if item.label == "NORMAL":
            assert item.affected_cells == () and item.event_start_s is None and item.severity == 0
            assert all(now[n] == pytest.approx(base[n], abs=1e-3) for n in FOCUS_KPIS)  # nothing injected
            continue
        assert item.affected_cells == (item.focus_cell,)
        assert 0.4 <= item.severity <= 1.0
        # the event started before the window's last interval; step-like events inside the window
        # (a flash crowd's ramp can start earlier: the window ends where its ramp ends)
        assert item.event_start_s < last
        assert item.label == "FLASH_CROWD" or first <= item.event_start_s
        # and against the same city without it, the labelled cell shows the event's signature
        if item.label == "CELL_OUTAGE":
            assert now["RRU.PrbAvailDl"] == 0 and now["PEE.AvgPower"] == 0 < base["PEE.AvgPower"]
        elif item.label == "CELL_SLEEP":
            assert now["RRU.PrbAvailDl"] == 0 and now["PEE.AvgPower"] == pytest.approx(p.psleep_w)
            assert not item.focus_cell.endswith("/c1")  # only capacity cells sleep
        elif item.label == "INTERFERENCE":
            assert now["L1M.SS-SINR"] < base["L1M.SS-SINR"] - 3.0
        elif item.label == "HO_FAILURE_STORM":
            ratio = lambda k: k["MM.HoExeInterFail"] / max(k["MM.HoExeInterReq"], 1.0)
            assert ratio(now) > ratio(base) + 0.1
        else:  # CONGESTION, FLASH_CROWD
            assert now["RRC.ConnMean"] > 1.5 * base["RRC.ConnMean"]


def test_contexts_name_the_affected_cell_and_never_leak_the_label(splits):
    _, test = splits
    site_questions = 0
    for item in test:
        cells = item.context_cells
        assert item.focus_cell in cells and set(item.affected_cells) <= set(cells)
        assert all(c.split("/")[0] == item.site_id for c in cells)  # the cell and its co-site cells
        assert len(cells) >= 2
        if item.cell_ids:
            assert item.cell_ids == (item.focus_cell,) and item.focus_cell in item.question
        else:
            site_questions += 1
            assert item.site_id in item.question
        times = sorted({k.time_s for k in item.kpis})
        assert len(times) == WINDOW_INTERVALS and all(b - a == INTERVAL_S for a, b in pairwise(times))
        assert all(t == int(t) for t in times)  # whole seconds: exact through the proto Timestamp
        # the same KPI names for every label: the first interval is always before any event
        assert {k.name for k in item.kpis if k.cell_id == item.focus_cell and k.time_s == times[0]} == set(FOCUS_KPIS)
        for c in cells:
            if c != item.focus_cell:
                assert {k.name for k in item.kpis if k.cell_id == c} <= set(COSITE_KPIS)
    assert 0 < site_questions < len(test)
    assert len({i.question.split(" ")[0] for i in test}) >= 4  # varied phrasings


def test_build_item_rejects_unknown_labels():
    with pytest.raises(ValueError, match="UNKNOWN"):
        build_item(1, "UNKNOWN", "x")


def _series(item: EvalItem, cell: str) -> dict[str, dict[float, float]]:
    out: dict[str, dict[float, float]] = {}
    for k in item.kpis:
        if k.cell_id == cell:
            out.setdefault(k.name, {})[k.time_s] = k.value
    return out


# -- metrics ---------------------------------------------------------------------------------------------


def test_macro_f1_by_hand():
    gold = ["CONGESTION", "CONGESTION", "INTERFERENCE", "INTERFERENCE", "CELL_OUTAGE"]
    pred = ["CONGESTION", "INTERFERENCE", "INTERFERENCE", "INTERFERENCE", "UNKNOWN"]
    # CONGESTION: P 1/1, R 1/2 -> F1 2/3; INTERFERENCE: P 2/3, R 2/2 -> F1 4/5; CELL_OUTAGE: 0
    assert macro_f1(gold, pred) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    scores = per_class_scores(gold, pred)
    assert set(scores) == {"CONGESTION", "INTERFERENCE", "CELL_OUTAGE"}  # UNKNOWN is not a label here
    assert scores["INTERFERENCE"].precision == pytest.approx(2 / 3) and scores["CONGESTION"].support == 2
    assert accuracy(gold, pred) == pytest.approx(3 / 5)
    rows, cols = ["CONGESTION", "INTERFERENCE", "CELL_OUTAGE"], ["CONGESTION", "INTERFERENCE", "UNKNOWN"]
    assert confusion_matrix(gold, pred, rows, cols) == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert macro_f1(gold, gold) == 1.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(LABELS), st.sampled_from(PREDICTED)), min_size=1, max_size=40))
def test_the_vectorised_macro_f1_equals_the_plain_one(pairs):
    gold, pred = [g for g, _ in pairs], [p for _, p in pairs]
    assert macro_f1_codes(codes(gold), codes(pred)) == pytest.approx(macro_f1(gold, pred), abs=1e-12)
    twice = macro_f1_codes(np.vstack([codes(gold)] * 2), np.vstack([codes(pred)] * 2))
    assert twice.tolist() == pytest.approx([macro_f1(gold, pred)] * 2)


def test_bootstrap_ci_of_perfect_answers_is_one_and_any_ci_holds_its_estimate():
    gold = list(LABELS) * 10
    assert bootstrap_macro_f1(gold, gold) == (1.0, 1.0)
    rng = np.random.default_rng(3)
    pred = [g if rng.random() < 0.6 else str(rng.choice(LABELS)) for g in gold]
    lo, hi = bootstrap_macro_f1(gold, pred, n_resamples=1000, seed=7)
    assert 0.0 < lo < macro_f1(gold, pred) < hi < 1.0
    assert bootstrap_macro_f1(gold, pred, n_resamples=1000, seed=7) == (lo, hi)  # seeded: reproducible
    wider = bootstrap_macro_f1(gold[:14], pred[:14], n_resamples=1000, seed=7)
    assert wider[1] - wider[0] > hi - lo  # fewer items, less certainty
    with pytest.raises(ValueError):
        bootstrap_macro_f1(gold, pred[:-1])


def test_cell_f1_is_micro_over_items_and_normal_items_name_none():
    gold = [("a",), ("b", "c"), ()]
    pred = [("a", "x"), ("b",), ("z",)]  # x and z are false positives (z on a NORMAL item), c is missed
    assert cell_f1(gold, pred) == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert cell_f1(gold, gold) == 1.0 and cell_f1([(), ()], [(), ()]) == 1.0


def _p(cause: str, action: str = "", value: float | None = None, **kw) -> Prediction:
    return Prediction("x", cause, action=action, action_value=value, **kw)


def test_action_accuracy_compares_the_first_action_and_its_value():
    assert CAUSES["CONGESTION"].actions[0] == ("OFFLOAD_TRAFFIC", 20)
    labels = ["CONGESTION", "CONGESTION", "FLASH_CROWD", "NORMAL", "NORMAL", "CELL_OUTAGE", "INTERFERENCE"]
    preds = [
        _p("CONGESTION", "OFFLOAD_TRAFFIC", 20.0),  # right
        _p("FLASH_CROWD", "OFFLOAD_TRAFFIC", 30.0),  # right action, wrong value
        _p("FLASH_CROWD", "OFFLOAD_TRAFFIC", 30.0),  # right
        _p("NORMAL", "NO_ACTION", 0.0),  # right: the proto's unset value
        _p(INVALID),  # a failed query has no action
        _p("CELL_OUTAGE", "ESCALATE", None),  # right
        _p("INTERFERENCE", "RAISE_TX_POWER", 3.0),  # wrong value
    ]
    assert action_accuracy(labels, preds) == pytest.approx(4 / 7)


def _evidence_context():
    """bs-01/c1: SINR falls 12 -> 2 dB, load steady; bs-01/c2: steady."""
    rows = []
    for t in range(4):
        for cell, sinr in (("bs-01/c1", 12.0 if t < 3 else 2.0), ("bs-01/c2", 12.0)):
            rows += [KpiRow("L1M.SS-SINR", sinr, "dB", cell, 60.0 * t), KpiRow("RRU.PrbTotDl", 40.0, "%", cell, 60.0 * t)]
    return rows, rules.evidence_of(rows)


def test_faithfulness_checks_every_cited_kpi_moved_on_a_named_or_asked_cell():
    _, ev = _evidence_context()
    assert ev.moved("bs-01/c1", "L1M.SS-SINR") and not ev.moved("bs-01/c1", "RRU.PrbTotDl")
    sinr = Prediction("x", "INTERFERENCE", ("bs-01/c1",), cited_kpis=("L1M.SS-SINR",))
    both = Prediction("x", "INTERFERENCE", ("bs-01/c1",), cited_kpis=("L1M.SS-SINR", "RRU.PrbTotDl"))
    elsewhere = Prediction("x", "INTERFERENCE", ("bs-01/c2",), cited_kpis=("L1M.SS-SINR",))
    silent = Prediction("x", "INTERFERENCE", ("bs-01/c1",))
    assert faithful(sinr, ev, ()) is True and faithful(both, ev, ()) is False
    assert faithful(elsewhere, ev, ()) is False  # it moved, but not on the cell the answer names
    assert faithful(elsewhere, ev, ("bs-01/c1",)) is True  # ... or on the asked one
    assert faithful(silent, ev, ()) is None
    assert faithfulness([sinr, both, elsewhere, silent], [ev] * 4, [()] * 4) == pytest.approx(1 / 3)
    assert faithfulness([silent], [ev], [()]) is None


def test_summary_fields_are_exactly_the_reported_ones():
    assert SUMMARY_FIELDS == (
        "macro_f1", "macro_f1_ci95", "n", "cell_f1", "action_accuracy", "faithfulness", "prompt_tokens_p50",
        "latency_p50_ms", "latency_p95_ms", "normal_recall", "per_class_f1",
    )  # fmt: skip


def test_score_method_counts_failures_as_misses():
    items = build_cases(7, 21)
    evidence = [rules.evidence_of(i.kpis) for i in items]
    preds = [Prediction(i.item_id, i.label, i.affected_cells, latency_ms=10.0 * k, prompt_tokens=100 + k)
             for k, i in enumerate(items)]  # fmt: skip
    perfect = score_method(items, preds, evidence)
    assert perfect.macro_f1 == 1.0 and perfect.macro_f1_ci95 == (1.0, 1.0) and perfect.cell_f1 == 1.0
    assert perfect.normal_recall == 1.0 and perfect.prompt_tokens_p50 == 103 and perfect.faithfulness is None
    assert perfect.latency_p50_ms == 30.0
    broken = [*preds[:-2], Prediction(items[-2].item_id, INVALID), Prediction(items[-1].item_id, ERROR, latency_ms=1e6)]
    s = score_method(items, broken, evidence)
    assert s.n == 7 and s.macro_f1 < 1.0 and s.per_class_f1[items[-1].label] == 0.0
    assert s.latency_p95_ms < 1e6  # an ERROR (no response) is not a latency sample
    with pytest.raises(ValueError, match="aligned"):
        score_method(items, preds[::-1], evidence)


def test_legacy_summary_counts_invalid_answers_as_misses_and_against_validity():
    items = build_dataset(4, 9)
    preds = [
        Prediction(items[0].item_id, items[0].label, (), valid=True, latency_ms=100, completion_tokens=50),
        Prediction(items[1].item_id, INVALID, (), valid=False, latency_ms=300),
        Prediction(items[2].item_id, "UNKNOWN", items[2].affected_cells, valid=True, latency_ms=200, completion_tokens=30),
        Prediction(items[3].item_id, items[3].label, ("bs-99/c9",), valid=True, latency_ms=400, completion_tokens=20),
    ]
    r = summarize("diagnosis", items, preds, wall_s=2.0, uses_model=True)
    assert r.accuracy == 0.5 and r.validity == 0.75 and r.invalid == 1 and r.abstentions == 1
    assert r.cells_outside_context == 1 and r.tok_s == 50.0 and r.latency_p50_ms == 250.0


# -- rules ---------------------------------------------------------------------------------------------------

BASE = {"RRC.ConnMean": 80.0, "RRU.PrbAvailDl": 106.0, "L1M.SS-SINR": 12.0, "TB.BlerDl": 8.0,
        "MM.HoExeInterReq": 20.0, "MM.HoExeInterFail": 0.0, "PEE.AvgPower": 160.0}  # fmt: skip
NAN = float("nan")


def _ctx(cells: dict[str, list[dict[str, float]]]) -> list[KpiRow]:
    units = {"RRC.ConnMean": "UEs", "PEE.AvgPower": "W"}
    return [KpiRow(n, v, units.get(n, ""), cell, 60.0 * t)
            for cell, rows in cells.items() for t, row in enumerate(rows) for n, v in row.items()]  # fmt: skip


@pytest.mark.parametrize(
    "later, cause, cited",
    [
        ({}, "NORMAL", ()),
        ({"RRC.ConnMean": 0.0, "RRU.PrbAvailDl": 0.0, "PEE.AvgPower": 0.0, "L1M.SS-SINR": NAN, "TB.BlerDl": NAN},
         "CELL_OUTAGE", ("RRC.ConnMean", "RRU.PrbAvailDl", "PEE.AvgPower")),
        ({"RRC.ConnMean": 0.0, "RRU.PrbAvailDl": 0.0, "PEE.AvgPower": 20.0}, "CELL_SLEEP",
         ("RRC.ConnMean", "RRU.PrbAvailDl", "PEE.AvgPower")),
        ({"MM.HoExeInterReq": 60.0, "MM.HoExeInterFail": 25.0}, "HO_FAILURE_STORM", ("MM.HoExeInterFail",)),
        ({"L1M.SS-SINR": 2.0, "TB.BlerDl": 40.0}, "INTERFERENCE", ("L1M.SS-SINR", "TB.BlerDl")),
        ({"RRC.ConnMean": 300.0}, "CONGESTION", ("RRC.ConnMean",)),
    ],
)
def test_rules_on_hand_built_contexts(later, cause, cited):
    rows = [BASE, BASE, BASE, {**BASE, **later}]  # the event shows in the latest sample
    ev = rules.evidence_of(_ctx({"bs-01/c2": rows}))
    got, cells, why = rules.rule_diagnose(ev, ["bs-01/c2"], rules.RuleThresholds())
    assert (got, why) == (cause, cited)
    assert cells == (() if cause == "NORMAL" else ("bs-01/c2",))


def test_rules_call_a_surge_that_was_already_ramping_a_flash_crowd():
    rows = [BASE, {**BASE, "RRC.ConnMean": 140.0}, {**BASE, "RRC.ConnMean": 250.0}, {**BASE, "RRC.ConnMean": 400.0}]
    cause, _, _ = rules.rule_diagnose(rules.evidence_of(_ctx({"bs-01/c1": rows})), [], rules.RuleThresholds())
    assert cause == "FLASH_CROWD"


def test_rules_answer_the_asked_cell_else_the_most_anomalous_one():
    """c2 goes off and c1 takes its UEs: a site question gets the outage (an earlier rule beats a
    surge); a question about c1 gets c1's surge; a missing (NaN) KPI is no evidence."""
    off = {**BASE, "RRC.ConnMean": 0.0, "RRU.PrbAvailDl": 0.0, "PEE.AvgPower": 0.0}
    kpis = _ctx({
        "bs-01/c1": [BASE, BASE, {**BASE, "RRC.ConnMean": 250.0}],
        "bs-01/c2": [BASE, BASE, {**off, "L1M.SS-SINR": NAN, "TB.BlerDl": NAN, "MM.HoExeInterFail": NAN}],
        "bs-01/c3": [{**BASE, "TB.BlerDl": NAN}] * 3,
    })  # fmt: skip
    ev = rules.evidence_of(kpis)
    th = rules.RuleThresholds()
    assert rules.rule_diagnose(ev, [], th)[:2] == ("CELL_OUTAGE", ("bs-01/c2",))
    assert rules.rule_diagnose(ev, ["bs-01/c1"], th)[:2] == ("CONGESTION", ("bs-01/c1",))
    assert rules.rule_diagnose(ev, ["bs-01/c3"], th)[:2] == ("NORMAL", ())
    assert rules.rule_diagnose(ev, ["bs-09/c9"], th)[0] == "CELL_OUTAGE"  # not in the context: all cells


def test_rule_predictions_carry_the_served_playbook_action():
    rows = [BASE, BASE, {**BASE, "RRC.ConnMean": 300.0}]
    item = EvalItem("x", 0, "CONGESTION", ("bs-01/c1",), "bs-01", "bs-01/c1", "q?", ("bs-01/c1",),
                    tuple(_ctx({"bs-01/c1": rows})), 0.0, 1.0)  # fmt: skip
    (p,) = rules.predict([item], rules.RuleThresholds())
    assert (p.cause, p.action, p.action_value, p.cited_kpis) == ("CONGESTION", "OFFLOAD_TRAFFIC", 20.0, ("RRC.ConnMean",))


def test_rule_tuning_is_deterministic_and_beats_the_default_on_dev():
    dev = build_cases(42, CASES_DEV_SEED, name="dev")
    small = {"surge_ratio": (1.6, 1.2), "bler_pct": (25.0, float("inf")), "ho_fail_min": (5.0, 1.0)}  # default first
    th, score = rules.tune(dev, small)
    gold = [i.label for i in dev]
    default = macro_f1(gold, [p.cause for p in rules.predict(dev, rules.RuleThresholds())])
    assert score >= default - 1e-12 and score == pytest.approx(macro_f1(gold, [p.cause for p in rules.predict(dev, th)]))
    assert rules.tune(dev, small) == (th, score)
    # ties go to the first grid point: two thresholds that never fire score the same
    assert rules.tune(dev[:7], {"ho_fail_min": (1e9, 2e9)})[0].ho_fail_min == 1e9
    with pytest.raises(ValueError, match="unknown threshold"):
        rules.tune(dev, {"nope": (1.0,)})
    with pytest.raises(ValueError, match="non-empty"):
        rules.tune([])


# -- requests and answers -------------------------------------------------------------------------------------


def test_request_carries_the_item_context_and_priority():
    item = build_cases(3, 11)[2]
    req = ask_request(item, diagnosis=True)
    assert req.response_mode == netops_pb2.DIAGNOSIS and req.priority == netops_pb2.NON_RT
    assert not req.site_ids and not req.request_id and list(req.cell_ids) == list(item.cell_ids)
    assert len(req.kpi_context) == len(item.kpis)
    k0 = req.kpi_context[0]
    assert (k0.name, k0.cell_id, k0.time.ToNanoseconds() / 1e9) == (item.kpis[0].name, item.kpis[0].cell_id,
                                                                    item.kpis[0].time_s)  # fmt: skip
    assert k0.value == item.kpis[0].value or (math.isnan(k0.value) and math.isnan(item.kpis[0].value))
    assert ask_request(item, True, priority="near_rt").priority == netops_pb2.NEAR_RT
    # the in-process methods read the Query the gateway builds, as the training data does
    from airan.evaluation.queries import server_query
    from airan.evaluation.runner import server_queries

    assert repr(server_queries([item])[0].kpis) == repr(server_query(item).kpis)


def test_answers_and_failures_become_predictions():
    item = build_cases(1, 11)[0]
    d = netops_pb2.Diagnosis(cause=netops_pb2.CAUSE_CONGESTION, affected_cell_ids=["bs-01/c1"], confidence=0.8,
                             cited_kpis=["RRU.PrbTotDl"],
                             actions=[netops_pb2.RecommendedAction(type=netops_pb2.ACTION_OFFLOAD_TRAFFIC, value=20)])  # fmt: skip
    r = netops_pb2.AskResponse(diagnosis=d, prompt_tokens=321, completion_tokens=9)
    p = prediction_of(item, r, 12.5)
    assert (p.cause, p.cells, p.cited_kpis, p.action, p.action_value) == (
        "CONGESTION", ("bs-01/c1",), ("RRU.PrbTotDl",), "OFFLOAD_TRAFFIC", 20.0)
    assert (p.prompt_tokens, p.latency_ms, p.valid) == (321, 12.5, True)
    assert CAUSE_NAMES[5] == "HO_FAILURE_STORM" and set(CAUSE_NAMES.values()) >= set(CAUSES)
    assert set(ACTION_NAMES.values()) >= {"NO_ACTION", "ESCALATE"}

    class RpcError(Exception):
        pass

    import grpc

    def rpc(code, details):
        e = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
        return failed_prediction(item, e, 5.0)

    assert rpc(grpc.StatusCode.INTERNAL, "model 'm' gave no valid diagnosis in 2 attempt(s)").cause == INVALID
    assert rpc(grpc.StatusCode.DEADLINE_EXCEEDED, "late").cause == ERROR
    assert failed_prediction(item, RpcError("boom"), 1.0).cause == ERROR


def test_the_model_stack_serves_the_named_models_and_their_parents():
    cfg = stack_config(["smollm2-netops-lora"])
    assert [m.name for m in cfg.models] == ["smollm2-135m-instruct", "smollm2-netops-lora"]
    assert [(r.model, r.adapters) for r in cfg.replicas] == [("smollm2-135m-instruct", ["smollm2-netops-lora"])]
    assert cfg.server.default_model == "smollm2-netops-lora"
    with pytest.raises(ValueError, match="unknown model"):
        stack_config(["no-such-model"])


# -- the whole evaluation on plain data: rules + detector ------------------------------------------------------


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    """rules + detector on 14 TEST and 14 SHIFTED items; the rule tuning is recorded (small grid)."""
    import asyncio

    from airan.store.registry import PACKAGED_DETECTOR

    if not (PACKAGED_DETECTOR / "model.txt").is_file():
        pytest.skip(f"no packaged detector at {PACKAGED_DETECTOR} (airan model build-detector)")
    tuned_on = []
    original = rules.tune

    def recording_tune(dev, grid=None):
        tuned_on.extend(dev)
        return original(dev, {"surge_ratio": (1.2, 1.6), "sinr_drop_db": (3.0, 4.0)})

    sets = {"test": build_cases(14, TEST_SEED, name="test"), "shifted": shifted_cases(14)}
    dev = build_cases(28, CASES_DEV_SEED, name="dev")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rules, "tune", recording_tune)
        evaluation = asyncio.run(evaluate(sets, dev, (), progress=False))
    out = tmp_path_factory.mktemp("eval")
    paths = report.write_outputs(evaluation, out)
    return evaluation, sets, dev, tuned_on, out, paths


def test_summary_has_every_field_for_every_method_and_set(small_eval):
    evaluation, sets, _, _, out, paths = small_eval
    summary = json.loads((out / report.SUMMARY_FILE).read_text())
    assert set(summary["sets"]) == {"test", "shifted"}
    for name, s in summary["sets"].items():
        assert s["n"] == 14 and set(s["methods"]) == {"rules", "detector"}
        for method, m in s["methods"].items():
            assert tuple(m) == SUMMARY_FIELDS, (name, method)
            assert m["n"] == 14
            lo, hi = m["macro_f1_ci95"]
            assert 0.0 <= lo <= m["macro_f1"] <= hi <= 1.0
            assert 0.0 <= m["cell_f1"] <= 1.0 and 0.0 <= m["action_accuracy"] <= 1.0
            assert m["prompt_tokens_p50"] is None and m["latency_p50_ms"] <= m["latency_p95_ms"]
            assert set(m["per_class_f1"]) == set(LABELS)
        assert s["methods"]["detector"]["faithfulness"] is None  # it cites nothing
        assert s["methods"]["rules"]["faithfulness"] is not None  # it cites its trigger KPIs
    for key in ("machine", "git_commit", "prompt_version", "sizes", "seeds", "bootstrap", "rules", "detector"):
        assert key in summary, key
    assert summary["machine"]["cpus"] >= 1 and summary["bootstrap"]["resamples"] >= 1000
    assert summary["sizes"] == {"dev": 28, "test": 14, "shifted": 14}
    for name in ("test", "shifted"):
        for png in (out / f"macro_f1_{name}.png", out / f"confusion_{name}.png"):
            assert png in paths and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / report.PREDICTIONS_FILE).read_text().splitlines()
    assert len(lines) == 2 * 2 * 14
    assert "| rules | 14 |" in report.markdown_summary(summary)


def test_rules_are_tuned_on_dev_only(small_eval):
    _, sets, dev, tuned_on, _, _ = small_eval
    assert [i.seed for i in tuned_on] == [i.seed for i in dev]
    test_seeds = {i.seed for s in sets.values() for i in s}
    assert not {i.seed for i in tuned_on} & test_seeds
    assert {i.seed // 100_000 for i in tuned_on} == {CASES_DEV_SEED}
    assert {i.seed // 100_000 for i in sets["shifted"]} == {SHIFTED_SEED}


def test_evaluate_refuses_a_dev_set_that_shares_a_test_scenario():
    import asyncio

    test = build_cases(7, TEST_SEED)
    with pytest.raises(ValueError, match="shares"):
        asyncio.run(evaluate({"test": test}, test[:3], (), baselines=("rules",), progress=False))
    with pytest.raises(ValueError, match="unknown baseline"):
        asyncio.run(evaluate({"test": test}, [], (), baselines=("oracle",), progress=False))


def test_report_json_is_strict():
    assert report.clean({"x": float("nan"), "y": [float("inf"), 1.0]}) == {"x": None, "y": ["inf", 1.0]}


# -- the whole path on the generated tiny model -----------------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_through_grpc_every_item_answered_or_counted(tmp_path):
    """Random weights give garbage diagnoses: the check is structural. Every request ends in an answer
    (a cause, cells from its context) or a counted failure, and the summary has every field."""
    import asyncio

    from conftest import prepare_tiny_models, tiny_stack_config

    # one site with one CPU: the replica gets one thread (without cpu_threads a lone replica asks Ray for every
    # core of the machine, more than the site offers, and is never placed)
    engine = {"kv_cache_gb": 0.25, "max_num_seqs": 8, "cpu_threads": 1}
    config = prepare_tiny_models(tiny_stack_config(n_sites=1, engine=engine))
    sets = {"test": build_cases(7, TEST_SEED, name="test"), "shifted": shifted_cases(7)}
    evaluation = asyncio.run(evaluate(sets, [], ["tiny-llama"], baselines=(), near_rt=True, config=config,
                                      concurrency=4, timeout_s=120, progress=False))  # fmt: skip
    summary = evaluation.summary()
    for name, s in evaluation.sets.items():
        assert set(s.predictions) == {"tiny-llama", "tiny-llama" + NEAR_RT_SUFFIX}
        for method, preds in s.predictions.items():
            assert [p.item_id for p in preds] == [i.item_id for i in s.items]
            for item, p in zip(s.items, preds):
                if p.cause in (INVALID, ERROR):
                    assert p.error, (method, item.item_id)
                else:
                    assert p.cause in CAUSES and set(p.cells) <= set(item.context_cells)
                    assert p.prompt_tokens > 0 and p.latency_ms > 0
                    if method.endswith(NEAR_RT_SUFFIX):
                        assert p.cited_kpis == ()  # a brief answer cites nothing
            m = summary["sets"][name]["methods"][method]
            assert tuple(m) == SUMMARY_FIELDS and m["n"] == len(s.items)
    paths = report.write_outputs(evaluation, tmp_path)
    assert json.loads((tmp_path / report.SUMMARY_FILE).read_text())["models"] == ["tiny-llama"]
    assert len(paths) == 6
