"""Training pairs for free-text answers grounded in the knowledge base (not trained yet).

Questions come from the TRAIN template pool (`airan.evaluation.qa.train_questions`: every aspect of
every passage in several wordings, plus topics the base does not hold), never from the evaluation's
pool. Each pair is what the served model must learn: the prompt is exactly the one the gateway
renders for the controller's free-text request (proto round trip, retrieval, token budget:
`served_qa_query` + `PromptRenderer.render`), and the target is the reference answer for the
passages that prompt shows (`airan.evaluation.qa.reference_answer`): the passage's own facts with
its id cited, or "The context does not cover this." when the passage holding the answer was not
retrieved (or the question is unanswerable), so the model learns to say so instead of inventing.

The pairs are `netops_data.Example`s (label `QA`, loss on the target and `<|im_end|>` only), the
format the LoRA pipeline (`airan.factory.variants.lora`) trains on, so they can be mixed into its
training data; `airan model build` does not read them yet.
"""
from __future__ import annotations

from collections.abc import Sequence

from airan.core.knowledge import KnowledgeBase, packaged_knowledge
from airan.core.retrieval import NOT_COVERED
from airan.evaluation.qa import QAItem, reference_answer, train_questions
from airan.evaluation.qa_runner import QA_MAX_TOKENS, served_qa_query
from airan.factory.variants import netops_data as D
from airan.factory.variants.netops_data import MAX_MODEL_LEN

QA_LABEL = "QA"


def build_qa_example(renderer, item: QAItem, kb: KnowledgeBase) -> D.Example:
    query = served_qa_query(item, retrieval=True)
    prompt = renderer.render(query, MAX_MODEL_LEN - QA_MAX_TOKENS)
    shown = tuple(c.passage_id for c in prompt.passages)
    target = reference_answer(item, kb, shown)
    tok = renderer.tokenizer
    ids = list(tok(target, add_special_tokens=False)["input_ids"])[: QA_MAX_TOKENS - 1]
    ids.append(tok.convert_tokens_to_ids("<|im_end|>"))
    return D.Example(item.item_id, QA_LABEL, (), (), False, shown, tuple(prompt.token_ids) + tuple(ids),
                     len(prompt.token_ids), target)  # fmt: skip


def build_qa_examples(renderer, per_passage: int = 3, kb: KnowledgeBase | None = None,
                      items: Sequence[QAItem] | None = None) -> list[D.Example]:  # fmt: skip
    kb = kb or packaged_knowledge()
    items = items if items is not None else train_questions(kb, per_passage)
    return [build_qa_example(renderer, item, kb) for item in items]


def describe_qa(examples: Sequence[D.Example]) -> dict:
    """Counts for a manifest: pairs, refusals, targets that cite, token sizes."""
    n = max(1, len(examples))
    return {
        "pairs": len(examples),
        "refusals": sum(e.target == NOT_COVERED for e in examples),
        "citing": sum("[" in e.target for e in examples),
        "prompt_tokens_mean": round(sum(e.n_prompt for e in examples) / n, 1),
        "target_tokens": sum(len(e.input_ids) - e.n_prompt for e in examples),
    }
