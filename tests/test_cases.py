"""Labelled cases: the label never shapes the layout; sets are deterministic and disjoint."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airan.core.causes import LABELS
from airan.evaluation.cases import (
    CELL_QUESTIONS_HELDOUT, CELL_QUESTIONS_TRAIN, SHIFTED, SITE_QUESTIONS_HELDOUT, SITE_QUESTIONS_TRAIN, STANDARD,
    build_case, build_cases, shifted_cases,
)  # fmt: skip


def layout(item) -> tuple:
    """Everything a method sees except the values: cells, KPI names, times, which samples are missing, wording."""
    question = item.question.replace(item.focus_cell, "{cell}").replace(item.site_id, "{site}")
    return (
        tuple((k.name, k.cell_id, k.time_s) for k in item.kpis),
        question,
        tuple(c.replace(item.focus_cell, "{cell}") for c in item.cell_ids),
    )


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), shifted=st.booleans())
def test_the_layout_of_a_context_does_not_depend_on_the_label(seed, shifted):
    setting = SHIFTED if shifted else STANDARD
    items = {label: build_case(seed, label, "x", setting) for label in LABELS if label != "CELL_SLEEP"}
    layouts = {label: layout(item) for label, item in items.items()}
    # the focus cell's name may differ (it is drawn the same way); its KPI set, times and wording do not
    reference = layouts["NORMAL"]
    for label, lay in layouts.items():
        assert [(n, t) for n, _, t in lay[0]] == [(n, t) for n, _, t in reference[0]], label
        assert lay[1] == reference[1] and lay[2] == reference[2], label


def test_every_cell_gets_the_same_kpi_set():
    for item in build_cases(70, 5):
        by_cell: dict[str, set[str]] = {}
        for k in item.kpis:
            by_cell.setdefault(k.cell_id, set()).add(k.name)
        assert len({frozenset(v) for v in by_cell.values()}) == 1, item.item_id


def test_sets_are_deterministic_balanced_and_disjoint():
    a, b = build_cases(21, 3), build_cases(21, 3)
    assert json.dumps([i.to_json() for i in a]) == json.dumps([i.to_json() for i in b])  # NaN-aware
    assert [i.label for i in a] == list(LABELS) * 3
    assert not {i.seed for i in a} & {i.seed for i in build_cases(21, 4)}


def test_labels_name_the_event_cells_and_normal_names_none():
    for item in build_cases(140, 6):
        if item.label == "NORMAL":
            assert item.affected_cells == () and item.severity == 0
        else:
            assert item.focus_cell in item.affected_cells
            if item.cell_ids:
                assert item.cell_ids == (item.focus_cell,)


def test_outages_report_nan_as_a_real_stack_does():
    outages = [i for i in build_cases(70, 7) if i.label == "CELL_OUTAGE"]
    assert any(math.isnan(k.value) for i in outages for k in i.kpis if k.cell_id == i.focus_cell)


def test_the_shifted_set_uses_settings_and_wordings_training_never_sees():
    train_words = {q.split("{")[0] for q in CELL_QUESTIONS_TRAIN + SITE_QUESTIONS_TRAIN}
    held = {q.split("{")[0] for q in CELL_QUESTIONS_HELDOUT + SITE_QUESTIONS_HELDOUT}
    assert not train_words & held
    items = shifted_cases(28)
    assert all(not any(i.question.startswith(w) for w in train_words if w) for i in items)
    assert SHIFTED.severity[1] <= STANDARD.severity[0] and SHIFTED.hours[1] <= STANDARD.hours[0]
    # single-cell sites and two concurrent events both occur
    n_cells = [len({k.cell_id for k in i.kpis}) for i in items]
    assert 1 in n_cells and any(len(i.affected_cells) >= 1 for i in items)


def test_unknown_label_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        build_case(1, "ALIENS", "x")
