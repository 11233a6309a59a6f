"""Prompt budgeting on the real tokenizer/chat template of the generated tiny model."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airan.errors import AiranError
from airan.factory.tiny import ensure_tiny_model
from airan.core.prompting import PromptRenderer, build_messages, kpi_rows
from airan.core.query import KpiSample, Query

KPI_NAMES = ["DRB.UEThpDl", "RRU.PrbUsedDl", "RRC.ConnMean", "DRB.RlcSduDelayDl", "TB.BlerDl"]


@pytest.fixture(scope="module")
def renderer():
    return PromptRenderer(ensure_tiny_model())


def test_rows_are_grouped_per_cell_and_time_oldest_first():
    kpis = (
        KpiSample("DRB.UEThpDl", 900, "kbit/s", "bs-01/c1", 120.0),
        KpiSample("RRU.PrbUsedDl", 270, "PRB", "bs-01/c1", 120.0),
        KpiSample("DRB.UEThpDl", 38000, "kbit/s", "bs-01/c1", 60.0),
    )
    assert kpi_rows(kpis) == [
        "bs-01/c1 @00:01:00: DRB.UEThpDl=3.8e+04 kbit/s",
        "bs-01/c1 @00:02:00: DRB.UEThpDl=900 kbit/s; RRU.PrbUsedDl=270 PRB",
    ]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    question=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=200).filter(str.strip),
    n_rows=st.integers(0, 80),
    budget=st.integers(120, 1500),
)
def test_budget_keeps_the_question_and_the_most_relevant_passages(renderer, question, n_rows, budget):
    from airan.core.prompting import free_text_candidates

    kpis = tuple(
        KpiSample(KPI_NAMES[i % 5], float(i), "", f"bs-01/c{i % 3 + 1}", 1000.0 + i) for i in range(n_rows)
    )
    query = Query(question=question, request_id="r", kpis=kpis)
    try:
        prompt = renderer.render(query, budget)
    except AiranError as e:  # only when the question alone cannot fit
        assert "question alone" in e.message
        assert len(renderer.render(Query(question=question, request_id="r", retrieval=False), 10**6).token_ids) > budget
        return
    assert len(prompt.token_ids) <= budget
    text = renderer.tokenizer.decode(prompt.token_ids)
    assert question.strip() in text or question in text
    candidates, _ = free_text_candidates(query, renderer.index)
    shown = [c.passage_id for c in prompt.passages]
    assert prompt.context_rows == len(candidates) and prompt.context_rows_dropped == len(candidates) - len(shown)
    assert shown == [p.id for p in candidates if p.id in shown]  # in order of relevance, the evidence first
    for p in candidates:
        assert (f"[{p.id}]" in text) == (p.id in shown)


def test_diagnosis_mode_adds_the_cause_guide():
    msgs = build_messages(Query(question="why?", request_id="r", mode="diagnosis"))
    assert "CONGESTION" in msgs[0]["content"] and "JSON" in msgs[0]["content"]


# --- the compact diagnosis prompt --------------------------------------------------------------

def _case_query(item, priority=None):
    from airan.core.query import KpiSample
    from airan.core.routing import Priority

    return Query(
        question=item.question, request_id="r", mode="diagnosis", cell_ids=item.cell_ids,
        kpis=tuple(KpiSample(k.name, k.value, k.unit, k.cell_id, k.time_s) for k in item.kpis),
        priority=priority or Priority.NON_RT,
    )  # fmt: skip


def test_diagnosis_prompt_shows_aliases_evidence_and_the_question_never_raw_rows():
    from airan.core.prompting import diagnosis_context, diagnosis_messages
    from airan.evaluation.cases import build_cases

    item = next(i for i in build_cases(14, 21) if i.label == "CONGESTION" and len({k.cell_id for k in i.kpis}) > 1)
    query = _case_query(item)
    ctx = diagnosis_context(query)
    user = diagnosis_messages(query, ctx)[1]["content"]
    assert user.startswith("Cells: A=") and "Evidence:\n- " in user and user.endswith(f"Question: {item.question}")
    assert not any(c in user for c in ("e+0", "e-0", "nan", "inf"))
    assert item.focus_cell not in user.split("\n", 1)[1].replace(f"Question: {item.question}", "")  # aliases only


def test_diagnosis_prompt_drops_evidence_lines_to_fit_and_never_the_question():
    from airan.core.prompting import diagnosis_context
    from airan.evaluation.cases import build_cases

    renderer = PromptRenderer(ensure_tiny_model())
    query = _case_query(build_cases(2, 22)[1])
    ctx = diagnosis_context(query)
    full = renderer.render(query, 4096, ctx)
    assert full.version == "netops-v3" and full.context_rows_dropped == 0
    tight = renderer.render(query, len(full.token_ids) - 1, ctx)
    assert tight.context_rows_dropped >= 1 and len(tight.token_ids) < len(full.token_ids)
    assert set(tight.citable_kpis) <= set(full.citable_kpis)
