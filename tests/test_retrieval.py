"""Retrieval on plain data: tokenisation of KPI names, BM25 search, budgeted selection, citations."""
import pytest

from airan.core.knowledge import KnowledgeBase, Passage, evidence_passage
from airan.core.retrieval import (
    NOT_COVERED, Citation, KnowledgeIndex, cited_ids, estimate_tokens, free_text_messages, packaged_index,
    parse_citations, passage_line, select_passages, strip_citations, tokenize,
)  # fmt: skip


def test_kpi_names_are_tokens_whole_and_in_parts():
    assert tokenize("DRB.UEThpDl") == ["drb.uethpdl", "drb", "ue", "thp", "dl"]
    assert tokenize("L1M.SS-SINR")[0] == "l1m.ss-sinr" and {"ss", "sinr"} <= set(tokenize("L1M.SS-SINR"))
    # everyday words map onto the names' parts
    assert {"ue", "thp", "dl"} <= set(tokenize("mean downlink UE throughput of users"))
    assert tokenize("What is the handover failure ratio?") == ["ho", "fail", "ratio"]


def _kb(*passages):
    return KnowledgeBase(tuple(passages))


def _kpi(name, title, text):
    return Passage(f"kpi:{name}", "kpi", title, f"{name}: {title}. {text}", name)


SMALL = _kb(
    _kpi("DRB.UEThpDl", "Mean downlink UE throughput", "Falls in congestion."),
    _kpi("DRB.UEThpUl", "Mean uplink UE throughput", "Falls with uplink interference."),
    _kpi("RRU.PrbUsedDl", "Mean downlink PRBs used", "Rises with traffic."),
    Passage("cause:CONGESTION", "cause", "Congestion", "PRB use near 100 %, DRB.UEThpDl falls.", "CONGESTION"),
)


@pytest.mark.parametrize("question", ["UEThpDl?", "DRB UE throughput downlink", "What is the mean downlink UE throughput",
                                      "explain drb.uethpdl"])  # fmt: skip
def test_a_kpi_is_found_by_its_name_its_parts_or_its_words(question):
    hits = KnowledgeIndex(SMALL).search(question, k=2)
    assert hits[0].passage.id == "kpi:DRB.UEThpDl" and hits[0].score > hits[1].score > 0


def test_an_exact_kpi_name_outranks_passages_that_mention_it_more():
    hits = KnowledgeIndex(SMALL).search("Why does congestion lower DRB.UEThpDl?", k=4)
    assert hits[0].passage.id == "kpi:DRB.UEThpDl" and hits[1].passage.id == "cause:CONGESTION"


def test_a_question_with_no_known_term_retrieves_nothing():
    assert KnowledgeIndex(SMALL).search("What is the capital of France?") == []
    assert KnowledgeIndex(SMALL).search("") == []


def test_the_packaged_index_answers_the_issues_questions():
    index = packaged_index()
    top = lambda q, k=3: [h.passage.id for h in index.search(q, k)]  # noqa: E731
    assert top("What does RRU.PrbUsedDl measure?")[0] == "kpi:RRU.PrbUsedDl"
    assert "cause:HO_FAILURE_STORM" in top("How do I reduce handover failures between two cells?")
    assert "cause:CONGESTION" in top("List the KPIs that show downlink congestion.")
    assert "loop:near-rt" in top("What budget does the near-RT loop have?")
    assert top("What does UNAVAILABLE mean?")[0] == "status:UNAVAILABLE"


def test_selection_keeps_order_and_budget_and_skips_what_does_not_fit():
    short = [_kpi(f"A.K{i}", "t", "x" * 30) for i in range(3)]
    long = _kpi("B.Long", "t", "y" * 400)
    chosen = select_passages([short[0], long, short[1], short[2]], budget_tokens=40)
    assert [p.id for p in chosen] == ["kpi:A.K0", "kpi:A.K1"]
    assert sum(estimate_tokens(passage_line(p)) + 1 for p in chosen) <= 40
    assert select_passages(short, 0) == [] and select_passages([], 100) == []
    counted = select_passages(short, 100, count_tokens=lambda text: 50)  # the served tokenizer may be passed
    assert len(counted) == 1


def test_the_prompt_shows_ids_evidence_and_the_question():
    ev = evidence_passage(["bs-01/c1 DRB.UEThpDl 16.6 → 7.1 Mbit/s (−57%)"])
    msgs = free_text_messages("Why slow?", [ev, SMALL.passages[0]], site_ids=["bs-01"])
    user = msgs[1]["content"]
    assert "[evidence] KPI evidence of this request: bs-01/c1 DRB.UEThpDl 16.6 → 7.1 Mbit/s" in user
    assert "[kpi:DRB.UEThpDl] DRB.UEThpDl: Mean downlink UE throughput" in user
    assert user.endswith("Question: Why slow?") and "Sites: bs-01" in user
    assert NOT_COVERED in msgs[0]["content"] and "e+" not in user and "nan" not in user
    assert "(no passages)" in free_text_messages("q", [])[1]["content"]


def test_citations_keep_only_shown_passages_and_count_the_rest():
    shown = (Citation("kpi:DRB.UEThpDl", "t", 3.0), Citation("evidence", "e"))
    text = "Throughput fell [kpi:DRB.UEThpDl] as shown [evidence]; see [kpi:DRB.UEThpDl, cause:CONGESTION] [1] [Foo.Bar]."
    assert cited_ids(text) == ["kpi:DRB.UEThpDl", "evidence", "cause:CONGESTION"]
    kept, dropped = parse_citations(text, shown)
    assert [c.passage_id for c in kept] == ["kpi:DRB.UEThpDl", "evidence"] and dropped == 1
    assert parse_citations("no citations here", shown) == ((), 0)
    assert parse_citations("[kpi:DRB.UEThpDl.]", shown)[0][0].passage_id == "kpi:DRB.UEThpDl"
    assert strip_citations(text) == "Throughput fell as shown; see."


def test_unverified_names_are_those_neither_known_nor_given():
    from airan.core.retrieval import unverified_names

    text = "Use RRU.PrbUsedDl, Foo.BarBaz and NEW_THING [kpi:Not.Shown]"
    assert unverified_names(text, {"RRU.PrbUsedDl"}) == ("Foo.BarBaz", "NEW_THING")
    assert unverified_names(text, {"RRU.PrbUsedDl"}, "Is Foo.BarBaz ok?", "NEW_THING") == ()
    assert unverified_names("plain words only, IoT and 5G", frozenset()) == ()
