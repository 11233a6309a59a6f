"""The QA evaluation set and its scorers, on plain data."""
import itertools
from dataclasses import replace

import pytest

from airan.core.knowledge import packaged_knowledge
from airan.core.retrieval import NOT_COVERED
from airan.evaluation.qa import (
    EVAL_TEMPLATES, EVAL_UNANSWERABLE, TRAIN_TEMPLATES, TRAIN_UNANSWERABLE, QAAnswer, eval_set, invented,
    reference_answer, says_not_covered, score, states, template_words, train_questions,
)  # fmt: skip


@pytest.fixture(scope="module")
def kb():
    return packaged_knowledge()


@pytest.fixture(scope="module")
def items(kb):
    return eval_set(kb)


def test_the_eval_set_is_large_deterministic_and_grounded(kb, items):
    assert len(items) >= 200 and items == eval_set(kb)
    unanswerable = [i for i in items if not i.answerable]
    assert len(unanswerable) >= 15 and all(not i.passage_ids and not i.facts for i in unanswerable)
    assert {i.passage_ids[0] for i in items if i.aspect == "measures"} == {f"kpi:{k}" for k in kb.kpi_names}
    assert {i.passage_ids[0].split(":")[0] for i in items if i.answerable} >= {"kpi", "cause", "concept", "loop", "api", "status", "config"}
    for i in items:
        if i.answerable:  # every key fact is stated by the passage the item names
            assert all(states(kb[i.passage_ids[0]].text, f) for f in i.facts), (i.question, i.facts)


def _ngrams(words, n=3):
    return {words[k : k + n] for k in range(len(words) - n + 1)}


def test_eval_wordings_are_disjoint_from_training_wordings(kb, items):
    train = [t for pool in TRAIN_TEMPLATES.values() for t in pool]
    evals = [t for pool in EVAL_TEMPLATES.values() for t in pool]
    assert not set(train) & set(evals)
    train_grams = set().union(*(_ngrams(template_words(t)) for t in train))
    for t in evals:  # no eval wording shares three consecutive words with a training wording
        assert not _ngrams(template_words(t)) & train_grams, t
    assert not set(TRAIN_UNANSWERABLE) & set(EVAL_UNANSWERABLE)
    assert not {i.question for i in train_questions(kb)} & {i.question for i in items}


def test_unanswerable_topics_are_not_in_the_knowledge_base(kb):
    known = kb.known_names()
    for topic in (*TRAIN_UNANSWERABLE, *EVAL_UNANSWERABLE):
        assert not any(n in known for n in invented(topic, "", frozenset())), topic
        assert kb.get(f"kpi:{topic.split()[-1]}") is None


def test_fact_matching():
    assert states("It counts the PRBs used on the downlink", "PRB|resource block; used|usage; downlink|DL")
    assert not states("It counts the PRBs used on the uplink", "PRB|resource block; used|usage; downlink|DL")
    assert states("reported in W", "W|watt") and not states("reported when idle", "W|watt")  # short terms are words
    assert states("about 10 % of attempts", "10") and not states("about 100 % of attempts", "10")
    assert says_not_covered(NOT_COVERED) and says_not_covered("The passages do not mention it.")
    assert not says_not_covered("RRU.PrbUsedDl counts PRBs.")


def test_reference_answers_score_perfectly_and_mistakes_are_counted(kb, items):
    perfect = [QAAnswer(i.item_id, reference_answer(i, kb, i.passage_ids), 100.0 + k,
                        citations=tuple(i.passage_ids)) for k, i in enumerate(items)]  # fmt: skip
    s = score(items, perfect, kb)
    assert (s.key_fact_recall, s.citation_precision, s.refusal_accuracy, s.invented_names) == (1.0, 1.0, 1.0, 0)
    assert s.false_refusals == 0 and s.citation_rate == 1.0 and s.n == len(items) and s.errors == 0
    assert 100 < s.latency_p50_ms < s.latency_p95_ms

    answerable = next(i for i in items if i.aspect == "measures")
    refused = next(i for i in items if not i.answerable)
    bad = [
        QAAnswer(answerable.item_id, "It is the HTH.TurboRate of the cell [cause:CONGESTION] [kpi:RRU.PrbTotDl]", 50.0),
        QAAnswer(refused.item_id, "It is 42 [kpi:RRU.PrbTotDl]", 60.0),
    ]
    s = score([answerable, refused], bad, kb)
    assert s.key_fact_recall == 0.0 and s.refusal_accuracy == 0.0 and s.invented_names == 1
    assert s.examples_invented == ["HTH.TurboRate"] and s.citation_precision is not None and s.citation_precision < 1
    assert s.invented_unflagged == 1  # the response did not flag it
    flagged = [replace(bad[0], unverified_names=("HTH.TurboRate",)), bad[1]]
    assert score([answerable, refused], flagged, kb).invented_unflagged == 0
    errored = score([refused], [QAAnswer(refused.item_id, "", 0.0, error="UNAVAILABLE: x")], kb)
    assert errored.errors == 1 and errored.refusal_accuracy == 0.0 and errored.latency_p50_ms == 0.0


def test_names_from_the_question_or_the_base_are_not_invented(kb):
    known = kb.known_names()
    assert invented("DRB.UEThpDl and share_pct [kpi:DRB.UEThpDl]", "q", known) == []
    assert invented("QF.SessionTimeUE is not covered", "What is QF.SessionTimeUE?", known) == []
    assert invented("use HoToHo.Gain", "q", known) == ["HoToHo.Gain"]


def test_training_questions_cover_every_aspect_many_times(kb):
    train = train_questions(kb, per_passage=2)
    per_aspect = {a: sum(i.aspect == a for i in train) for a in TRAIN_TEMPLATES}
    assert all(n > 0 for n in per_aspect.values()), per_aspect
    assert len({i.question for i in train}) > 0.6 * len(train)  # many wordings, few repeats
    assert sum(not i.answerable for i in train) == 2 * len(TRAIN_UNANSWERABLE)
    for i, j in itertools.islice(itertools.combinations(train[:50], 2), 200):
        assert i.item_id != j.item_id


def test_a_written_run_rescores_to_the_same_scores(kb, items, tmp_path):
    from dataclasses import asdict

    from airan.evaluation.qa_runner import QAEvaluation, rescore

    some = items[::20]
    answers = {"m": [QAAnswer(i.item_id, reference_answer(i, kb, i.passage_ids if k % 2 else ()), 10.0 * k,
                              citations=tuple(i.passage_ids)) for k, i in enumerate(some)]}  # fmt: skip
    run = QAEvaluation({"n": len(some)}, some, answers, {"m": score(some, answers["m"], kb)})
    run.write(tmp_path)
    assert rescore(tmp_path, kb)["methods"]["m"] == asdict(run.scores["m"])
