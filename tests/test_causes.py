"""One vocabulary of causes: the table in airan/core/causes.py against the proto enums and the
simulator's KPIs and physics, and everything that reads it (simulator, diagnosis schema and
prompt, free-text scoring, rules, dataset labels, metrics). Plain data, no Ray/vLLM/gRPC."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from airan.core import causes, diagnosis
from airan.core.causes import ACTIONS, CAUSES, EVENT_CAUSES, EVENT_KINDS, FALLS, LABELS, RISES, SEVERITIES, STEADY
from airan.v1 import netops_pb2

# the int8 codes of the kinds that existed when traces were first written: new kinds append
HISTORICAL_KINDS = ("cell_outage", "interference", "congestion", "ho_failure_storm", "cell_sleep", "flash_crowd")


def _enum_names(enum, prefix: str) -> set[str]:
    return {name.removeprefix(prefix) for name in enum.keys() if name != f"{prefix}UNSPECIFIED"}


# --- the table itself -------------------------------------------------------------------


def test_causes_and_actions_are_exactly_the_proto_enums():
    assert _enum_names(netops_pb2.Cause, "CAUSE_") == set(CAUSES)
    assert _enum_names(netops_pb2.ActionType, "ACTION_") == set(ACTIONS)
    assert _enum_names(netops_pb2.Severity, "SEVERITY_") == set(SEVERITIES)
    # the names the servicers map with f"CAUSE_{name}" / f"ACTION_{name}" all exist
    for name in CAUSES:
        netops_pb2.Cause.Value(f"CAUSE_{name}")
    for name in ACTIONS:
        netops_pb2.ActionType.Value(f"ACTION_{name}")


def test_names_are_keys_and_nothing_is_named_twice():
    assert all(k == c.name for k, c in CAUSES.items()) and all(k == a.name for k, a in ACTIONS.items())
    for name in (*CAUSES, *ACTIONS):
        assert name.isupper() and name.replace("_", "").isalnum(), name
    assert "NORMAL" in CAUSES and "UNKNOWN" in CAUSES
    assert CAUSES["NORMAL"].event_kind is None and CAUSES["UNKNOWN"].event_kind is None


def test_every_playbook_action_is_known_and_inside_its_bounds():
    for a in ACTIONS.values():
        assert a.wording
        if a.parameter is None:
            assert (a.unit, a.minimum, a.maximum, a.needs_target_cell) == ("", 0, 0, False), a.name
        else:
            assert a.parameter.isidentifier() and a.parameter != "type" and a.minimum <= a.maximum, a.name
    for c in CAUSES.values():
        assert c.severity in SEVERITIES, c.name
        assert 1 <= len(c.actions) <= diagnosis.MAX_ACTIONS, c.name
        for action, value in c.actions:
            spec = ACTIONS[action]
            assert (value is None) == (spec.parameter is None), (c.name, action)
            if value is not None:
                assert isinstance(value, int) and spec.minimum <= value <= spec.maximum, (c.name, action, value)


def test_causes_move_only_kpis_the_simulator_emits():
    from sims.kpis import KPI_NAMES

    for c in CAUSES.values():
        kpis = c.kpis
        assert len(set(kpis)) == len(kpis), c.name
        assert set(kpis) <= set(KPI_NAMES), (c.name, set(kpis) - set(KPI_NAMES))
        assert {d for _, d in c.moves} <= {RISES, FALLS, STEADY}, c.name
        if c.event_kind is None:
            assert not c.moves and c.key_kpi is None, c.name
        else:
            assert c.key_kpi in kpis and dict(c.moves)[c.key_kpi] != STEADY, c.name


def test_event_kinds_are_unique_spec_safe_and_carry_simulator_facts():
    from sims.queries import PRIORITIES

    assert len(set(EVENT_KINDS)) == len(EVENT_KINDS) == len(EVENT_CAUSES)
    assert EVENT_KINDS[: len(HISTORICAL_KINDS)] == HISTORICAL_KINDS  # trace int8 codes never shift
    assert LABELS == ("NORMAL", *(c.name for c in EVENT_CAUSES))
    for c in EVENT_CAUSES:
        # 'KIND:CELL@START+DURATION[:SEVERITY]' must parse
        assert c.event_kind.isidentifier() and c.event_kind.islower(), c.event_kind
        lo, hi = c.duration_s
        assert 0 < lo <= hi, c.name
        assert c.asked_by in PRIORITIES, c.name
        if c.proposal is not None:
            assert c.proposal[0] in PRIORITIES and c.proposal[1], c.name
        assert c.keywords and c.wording, c.name
    assert causes.cause_of_event("congestion") is CAUSES["CONGESTION"]


def test_keywords_are_unambiguous_so_free_text_scoring_has_no_ties():
    owner: dict[str, str] = {}
    for c in CAUSES.values():
        for k in c.keywords:
            assert k == k.lower() and k not in owner, k
            owner[k] = c.name
    # two causes' keywords can only match at the same position if one is a prefix of the other
    for a in owner:
        for b in owner:
            if a != b and owner[a] != owner[b]:
                assert not b.startswith(a), (a, b)
    for k, name in owner.items():
        assert diagnosis.cause_from_text(f"I think: {k}.") == name, k
    assert diagnosis.cause_from_text("no idea") == "UNKNOWN"


# --- the simulator reads it, and its physics agrees with it ---------------------------


def test_the_simulator_reads_the_table():
    import sims.events as ev
    import sims.queries as q
    from sims.report import EVENT_COLOURS

    assert ev.EVENT_KINDS == EVENT_KINDS
    assert ev.KIND_INDEX == {k: i for i, k in enumerate(EVENT_KINDS)}
    assert (ev.OUTAGE, ev.INTERFERENCE, ev.CONGESTION, ev.HO_STORM, ev.SLEEP, ev.FLASH) == tuple(
        ev.KIND_INDEX[k] for k in HISTORICAL_KINDS) == tuple(range(6))  # fmt: skip
    for i, c in enumerate(EVENT_CAUSES):
        assert ev._DURATION_S[i] == c.duration_s
        assert q._EVENT_KPIS[i] == c.kpis and q._EVENT_PRIORITY[i] == c.asked_by and q._PROPOSAL[i] == c.proposal
    assert set(EVENT_COLOURS) == set(EVENT_KINDS)
    assert len(set(EVENT_COLOURS.values())) == len(EVENT_KINDS)


def test_the_committed_example_trace_still_reads():
    from pathlib import Path

    import sims
    from sims.trace import read_trace

    trace = read_trace(Path(sims.__file__).parent / "examples" / "city-3sites")
    kinds = {EVENT_KINDS[k] for k in trace.events.kind}
    assert kinds and kinds <= set(EVENT_KINDS)


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_the_physics_moves_each_kpi_the_way_the_table_says(kind):
    from sims.events import KIND_INDEX, EventTable, cells_for_kind
    from sims.simulate import SimConfig, Simulator
    from sims.timefmt import parse_start
    from sims.topology import generate_topology

    topo = generate_topology(3, seed=11, cells_per_site=(3, 3))
    cfg = SimConfig(duration_s=1800, interval_s=60, seed=5, start=parse_start("2025-06-02T12:00:00"))
    k = KIND_INDEX[kind]
    cell = int(cells_for_kind(topo, k)[0])
    events = EventTable.build([k], [cell], [300.0], [1200.0], [0.8])
    with_event = Simulator(topo, events, cfg).window(0, 30).kpis
    without = Simulator(topo, EventTable.empty(), cfg).window(0, 30).kpis
    inside = slice(10, 20)  # fully inside the event, past a flash crowd's ramp-up
    for name, direction in causes.cause_of_event(kind).moves:
        a, b = with_event[name][inside, cell], without[name][inside, cell]
        if np.isnan(a).all():  # unreported while the cell is off: the KPI is gone, it fell
            assert direction == FALLS, (kind, name)
            continue
        change = (np.nanmean(a) - np.nanmean(b)) / max(abs(float(np.nanmean(b))), 1e-6)
        if direction == STEADY:
            assert abs(change) < 0.1, (kind, name, change)
        else:
            assert change * direction > 0.05, (kind, name, change)


# --- the serving side and the evaluation read it -------------------------------------


def test_diagnosis_schema_and_prompt_read_the_table():
    schema = diagnosis.diagnosis_schema(["bs-01/c1"])
    assert schema["properties"]["cause"]["enum"] == list(CAUSES)
    assert schema["properties"]["severity"]["enum"] == list(SEVERITIES)
    by_type = {s["properties"]["type"]["const"]: s for s in schema["properties"]["actions"]["items"]["anyOf"]}
    assert list(by_type) == list(ACTIONS)
    for a in ACTIONS.values():
        props = by_type[a.name]["properties"]
        if a.parameter is None:
            assert set(props) == {"type"}
        else:
            assert props[a.parameter] == {"type": "integer", "minimum": a.minimum, "maximum": a.maximum}
            assert ("target_cell" in props) == a.needs_target_cell
    assert diagnosis.CAUSES == tuple(CAUSES)
    assert diagnosis.ACTIONS == {
        a.name: None if a.parameter is None else (a.parameter, a.unit, a.minimum, a.maximum, a.needs_target_cell)
        for a in ACTIONS.values()
    }
    text = diagnosis.diagnosis_instructions()
    assert all(f"- {c.name}: {c.wording}" in text for c in CAUSES.values())
    assert f"actions (from: {', '.join(ACTIONS)})" in text


def test_a_new_cause_row_and_action_appear_in_the_schema_the_prompt_and_the_scoring(monkeypatch):
    monkeypatch.setitem(CAUSES, "TEST_DROUGHT", causes.Cause("TEST_DROUGHT", "no rain", keywords=("drought",)))
    monkeypatch.setitem(ACTIONS, "TEST_RAIN", causes.ActionSpec("TEST_RAIN", "mm", "mm", 1, 9, False, "make rain"))
    schema = diagnosis.diagnosis_schema([])
    assert "TEST_DROUGHT" in schema["properties"]["cause"]["enum"]
    assert "- TEST_DROUGHT: no rain" in diagnosis.diagnosis_instructions()
    assert diagnosis.cause_from_text("a drought, clearly") == "TEST_DROUGHT"
    answer = {"cause": "TEST_DROUGHT", "affected_cells": [], "severity": "LOW",
              "actions": [{"type": "TEST_RAIN", "mm": 4}], "confidence_pct": 50, "rationale": "dry"}  # fmt: skip
    d = diagnosis.parse_diagnosis(json.dumps(answer), [])
    assert d.cause == "TEST_DROUGHT" and d.actions[0] == diagnosis.Action("TEST_RAIN", "", 4.0, "mm")


def test_dataset_rules_and_metrics_read_the_table():
    from airan.evaluation import dataset, metrics, rules

    assert dataset.LABELS == LABELS
    assert all(dataset.label_of(c.event_kind) == c.name for c in EVENT_CAUSES)
    assert {c.key_kpi for c in EVENT_CAUSES} <= set(dataset.FOCUS_KPIS)
    assert metrics.PREDICTED[: len(CAUSES)] == tuple(CAUSES)
    assert set(rules.RULE_CAUSES) <= set(LABELS)
    items = dataset.build_dataset(len(LABELS), 1)
    assert [i.label for i in items] == list(LABELS)
    assert {p.cause for p in rules.predict(items, rules.RuleThresholds())} <= set(rules.RULE_CAUSES)


# --- a new event kind flows through from one table row --------------------------------

_NEW_KIND_SCRIPT = r'''
import pathlib, sys, types
import airan.core

# the table with one more event row, before UNKNOWN, as a developer would add it
src = pathlib.Path(airan.core.__file__).with_name("causes.py").read_text()
marker = '        Cause("UNKNOWN"'
assert src.count(marker) == 1, "causes.py: expected one UNKNOWN row to insert before"
row = """        Cause("TEST_DROUGHT", "no rain: UEs stay, nothing moves", event_kind="test_drought",
              moves=(("RRC.ConnMean", STEADY), ("PEE.AvgPower", STEADY)), key_kpi="PEE.AvgPower",
              severity="HIGH", actions=(("ESCALATE", None),), keywords=("drought",),
              duration_s=(900.0, 1800.0), asked_by="NON_RT"),
"""
mod = types.ModuleType("airan.core.causes")
mod.__file__ = "causes.py"
sys.modules["airan.core.causes"] = mod
exec(compile(src.replace(marker, row + marker), "causes.py", "exec"), mod.__dict__)
airan.core.causes = mod

import sims.events as ev
from sims.events import EventTable, events_from_specs, random_events
from sims.report import EVENT_COLOURS
from sims.simulate import SimConfig, Simulator, run
from sims.topology import generate_topology
from airan.core.diagnosis import diagnosis_schema
from airan.evaluation import dataset

old = ("cell_outage", "interference", "congestion", "ho_failure_storm", "cell_sleep", "flash_crowd")
assert ev.EVENT_KINDS == (*old, "test_drought"), ev.EVENT_KINDS
assert ev.FLASH == 5 and ev.KIND_INDEX["test_drought"] == 6 and ev._DURATION_S[6] == (900.0, 1800.0)
assert "test_drought" in EVENT_COLOURS
topo = generate_topology(2, seed=3, cells_per_site=(2, 2))
assert len(random_events(topo, 3600.0, 7, seed=1)) == 7
events = events_from_specs([f"test_drought:{topo.cell_ids[0]}@5m+20m:0.9"], topo)
queries = run(Simulator(topo, events, SimConfig(duration_s=20 * 60, interval_s=60, seed=1))).queries
explain = [q for q in queries if q.trigger == "test_drought"]
assert [q.kind for q in explain] == ["event_explain"], [q.kind for q in explain]  # no proposal row: none
assert explain[0].priority == "NON_RT"
assert {k["name"] for k in explain[0].kpi_context if k["cell_id"] == topo.cell_ids[0]} == {"RRC.ConnMean", "PEE.AvgPower"}
assert "TEST_DROUGHT" in diagnosis_schema([])["properties"]["cause"]["enum"]
assert dataset.LABELS[-1] == "TEST_DROUGHT"
item = dataset.build_item(7, "TEST_DROUGHT", "x")
assert item.label == "TEST_DROUGHT" and item.affected_cells == (item.focus_cell,)
print("ok")
'''


def test_a_new_event_kind_row_reaches_the_simulator_queries_schema_and_dataset():
    """A fresh interpreter with one more row in the table (the simulator derives at import)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_NEW_KIND_SCRIPT)], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
