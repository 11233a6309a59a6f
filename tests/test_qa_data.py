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
