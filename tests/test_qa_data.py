"""QA training pairs: the gateway's own free-text prompt, a grounded target, loss on the target only."""
import pytest

from airan.core.knowledge import packaged_knowledge
from airan.core.prompting import PromptRenderer
from airan.core.retrieval import NOT_COVERED, cited_ids
from airan.evaluation.qa import eval_set, train_questions
from airan.evaluation.qa_runner import QA_MAX_TOKENS, served_qa_query
from airan.factory.tiny import ensure_tiny_model
from airan.factory.variants.netops_data import MAX_MODEL_LEN
from airan.factory.variants.qa_data import build_qa_examples, describe_qa


@pytest.fixture(scope="module")
def renderer():
    return PromptRenderer(ensure_tiny_model())


@pytest.fixture(scope="module")
def pairs(renderer):
    kb = packaged_knowledge()
    items = train_questions(kb, per_passage=1)[::3]
    return items, build_qa_examples(renderer, kb=kb, items=items)


def test_prompts_are_the_gateways_and_loss_is_on_the_target_only(renderer, pairs):
    items, examples = pairs
    for item, ex in list(zip(items, examples))[:40]:
        prompt = renderer.render(served_qa_query(item), MAX_MODEL_LEN - QA_MAX_TOKENS)
        assert list(ex.input_ids[: ex.n_prompt]) == prompt.token_ids
        labels = ex.labels
        assert all(x == -100 for x in labels[: ex.n_prompt]) and all(x != -100 for x in labels[ex.n_prompt :])
        assert ex.input_ids[-1] == renderer.tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert len(ex.input_ids) - ex.n_prompt <= QA_MAX_TOKENS


def test_targets_cite_only_shown_passages_or_say_not_covered(pairs):
    items, examples = pairs
    for item, ex in zip(items, examples):
        if not item.answerable:
            assert ex.target == NOT_COVERED
        elif item.passage_ids[0] in ex.citable:
            assert cited_ids(ex.target) == [item.passage_ids[0]]
        else:  # the passage holding the answer was not retrieved: the honest answer
            assert ex.target == NOT_COVERED
    facts = describe_qa(examples)
    assert facts["pairs"] == len(examples) and 0 < facts["refusals"] < facts["pairs"] and facts["citing"] > 0


def test_no_training_question_is_an_evaluation_question(pairs):
    items, _ = pairs
    assert not {i.question for i in items} & {i.question for i in eval_set(packaged_knowledge())}


def test_qa_split_holds_out_whole_question_groups_and_no_evaluation_question():
    from airan.factory.variants.qa_data import qa_split

    kb = packaged_knowledge()
    train, dev = qa_split(kb, 2, 200, 20)
    assert len(train) == 200 and len(dev) == 20 and sum(not i.answerable for i in dev) == 4
    # DEV asks what training never asks in any wording: a DEV item's whole group (its consecutive
    # per_passage wordings in the pool) stays out of training
    pool = train_questions(kb, 2)
    held = {k // 2 for k, i in enumerate(pool) if i in dev}
    assert len(held) == 20 and not {pool[k] for g in held for k in (2 * g, 2 * g + 1)} & set(train)
    assert not {i.question for i in dev} & {i.question for i in train}
    assert not {i.question for i in train + dev} & {i.question for i in eval_set(kb)}
    assert qa_split(kb, 2, 200, 20) == (train, dev)  # deterministic
    with pytest.raises(ValueError):
        qa_split(kb, 2, 10_000, 20)


def test_qa_dev_scores_count_facts_refusals_and_invented_names(renderer):
    from airan.factory.variants.qa_data import qa_dev_scores, qa_split

    kb = packaged_knowledge()
    _, dev = qa_split(kb, 2, 0, 10)
    examples = build_qa_examples(renderer, kb=kb, items=dev)
    refs = [ex.target for ex in examples]
    perfect = qa_dev_scores(refs, dev, examples, kb)
    assert perfect["qa_score"] == 1.0 and perfect["invented_names"] == 0
    wrong = qa_dev_scores(["It is RRU.FooBarDl. " + NOT_COVERED[::-1]] * len(dev), dev, examples, kb)
    assert wrong["qa_score"] < 0.2 and wrong["invented_names"] == len(dev)
